"""Lab 1: a VM from nothing, one KVM ioctl at a time, with a run loop of our own.

    python docs/labs/code/lab1_from_nothing.py

Builds docs/labs/code/lab1_guest.S with gcc and ld, gives it 2 MiB of RAM and
one vCPU in long mode, and runs it.  Every step names the ioctl(s) it issues;
kvmlite.vstate wraps each one (Kvm, Vm, GuestMemory, Vcpu).
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from kvmlite import boot
from kvmlite import exits as ex
from kvmlite.vstate import GuestMemory, Kvm, Vm

HERE = Path(__file__).resolve().parent
RAM = 2 << 20                  # one 2 MiB page of the identity map
LOAD = boot.DEFAULT_LOAD_ADDR  # 1 MiB, where flat images go (docs/boot.md)
DEBUGCON = 0xE9


def assemble(source: Path, out_dir: Path) -> bytes:
    """gcc assembles, ld links at LOAD and writes a flat binary: the bytes to load."""
    obj, binary = out_dir / "guest.o", out_dir / "guest.bin"
    subprocess.run(["gcc", "-c", "-o", obj, source], check=True)
    subprocess.run(["ld", "--oformat", "binary", f"-Ttext={LOAD:#x}", "-o", binary, obj], check=True)
    return binary.read_bytes()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        image = assemble(HERE / "lab1_guest.S", Path(tmp))

    kvm = Kvm()                                     # open /dev/kvm
    print(f"KVM_GET_API_VERSION            -> {kvm.api_version}")
    vm = Vm(kvm)                                    # KVM_CREATE_VM
    print(f"KVM_CREATE_VM                  -> VM fd {vm.fd}")
    mem = GuestMemory(RAM)                          # anonymous mmap in this process
    vm.add_memory(mem)                              # KVM_SET_USER_MEMORY_REGION
    print(f"KVM_SET_USER_MEMORY_REGION     -> slot 0: GPA 0, {RAM >> 20} MiB at host {mem.host_addr:#x}")
    vcpu = vm.create_vcpu()                         # KVM_CREATE_VCPU, mmap of struct kvm_run
    print(f"KVM_CREATE_VCPU                -> vCPU fd {vcpu.fd}, "
          f"kvm_run area {kvm.vcpu_mmap_size} bytes (KVM_GET_VCPU_MMAP_SIZE)")
    cpuid = kvm.supported_cpuid()                   # KVM_GET_SUPPORTED_CPUID
    vcpu.set_cpuid(cpuid)                           # KVM_SET_CPUID2
    print(f"KVM_SET_CPUID2                 -> {cpuid.nent} CPUID leaves")

    # Long mode needs paging, so page tables and a GDT go into guest RAM first,
    # in the boot area at the top of RAM (docs/boot.md), out of the image's way.
    area = boot.place_boot_area(RAM, LOAD, LOAD + len(image))
    mem.write(area + boot.BA_GDT, boot.gdt_bytes())
    mem.write(area + boot.BA_PAGE_TABLES, boot.build_page_tables(RAM, area + boot.BA_PAGE_TABLES))
    mem.write(LOAD, image)
    boot.setup_long_mode(vcpu, LOAD, area)          # KVM_GET/SET_SREGS, KVM_GET/SET_REGS
    s = vcpu.get_sregs()
    print(f"KVM_SET_SREGS                  -> CR0 {s.cr0:#x} CR3 {s.cr3:#x} CR4 {s.cr4:#x} "
          f"EFER {s.efer:#x} CS.L {s.cs.l}")
    print(f"KVM_SET_REGS                   -> RIP {vcpu.get_regs().rip:#x}, {len(image)} bytes of code there")

    out = bytearray()
    exits = 0
    while True:
        exit_ = vcpu.run()                          # KVM_RUN
        exits += 1
        print(f"KVM_RUN exit {exits}: {exit_}")
        match exit_:
            case ex.IoOutString(DEBUGCON, 1, data):
                out += data
            case ex.IoOut(DEBUGCON, 1, value):
                out.append(value)
            case ex.IoIn(DEBUGCON, 1, 1):
                vcpu.complete_io_in(bytes([DEBUGCON]))   # "the debug console is here"
            case ex.Hlt():
                break
            case _:
                print("an exit this loop does not handle; stopping")
                break
    print(f"the guest printed: {out.decode()}", end="")
    vm.close()
    kvm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
