"""A small VM for the probes: N vCPUs, each on its own thread, and the probe
guest (guest.S) at 1 MiB with a real-mode trampoline at 0x8000.

The probes measure what this host's KVM does with several vCPUs, the in-kernel
interrupt controller, its timer, HLT, IPIs and the dirty ring; docs/boot.md
("Measured on kvm_pvm") records the numbers.  Run one with
    .venv/bin/python -m bench.probes.<name>
Nothing here is used by kvmlite itself.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from elftools.elf.elffile import ELFFile

from kvmlite import boot, exits as ex, kvm
from kvmlite.kvm import ffi, lib
from kvmlite.vstate import GuestMemory, Kvm, Vm

HERE = Path(__file__).resolve().parent

GDT = 0x3000
IDT = 0x4000
TRAMP_GDTR = 0x9020
PML4 = 0x10000             # the probe's own identity map (4 GiB at least: the xAPIC page too)
TSS_BASE = 0x30000         # TSS i at TSS_BASE + i * 0x3000
TSS_LIMIT = 104 + 8192     # 104-byte TSS, 8 KiB I/O bitmap (all ports allowed), 0xFF
KSTACK_TOP = 0x44000       # ring-0 stack of CPU i ends at KSTACK_TOP + i * 0x4000
PB = 0x200000              # parameter block of CPU i at PB + i * 0x10000
MAX_CPUS = 8
SEL_TSS = 0x30

PORT_DONE, PORT_LOOP, PORT_AP, PORT_ROUND, PORT_START, PORT_EXC = 0xF0, 0xF2, 0xF3, 0xF4, 0xF7, 0xFE


def build_guest() -> tuple[Path, dict[str, int]]:
    """Assemble guest.S with gcc and link it with probe.ld; returns the ELF and its symbols."""
    out = Path(tempfile.mkdtemp(prefix="kvmlite-probe-"))
    subprocess.run(["gcc", "-c", "-o", out / "guest.o", HERE / "guest.S"], check=True)
    subprocess.run(["ld", "-nostdlib", "-static", "-T", HERE / "probe.ld", "--no-warn-rwx-segments",
                    "-o", out / "guest.elf", out / "guest.o"], check=True)
    with open(out / "guest.elf", "rb") as f:
        elf = ELFFile(f)
        syms = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols() if s.name}
    return out / "guest.elf", syms


def _gate(handler: int, dpl: int = 0) -> bytes:
    """A 64-bit interrupt gate (type 0xE) to selector 0x08 (SDM Vol. 3A, 6.14.1)."""
    attr = 0x8E00 | dpl << 13
    return struct.pack("<HHHHII", handler & 0xFFFF, 0x08, attr, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)


class ProbeVm:
    def __init__(self, ncpus: int, mem_size: int = 128 << 20, *, irqchip: bool = True,
                 dirty_ring: int = 0, map_gib: int = 4):
        self.kvm = Kvm()
        self.vm = Vm(self.kvm)
        self.irqchip = irqchip
        if irqchip:
            kvm.KVM_CREATE_IRQCHIP(self.vm.fd)
        if dirty_ring:
            cap = ffi.new("struct kvm_enable_cap *", {"cap": lib.KVM_CAP_DIRTY_LOG_RING,
                                                      "args": [dirty_ring, 0, 0, 0]})
            kvm.KVM_ENABLE_CAP(self.vm.fd, cap)
        self.mem = GuestMemory(mem_size)
        self.vm.add_memory(self.mem)
        self.elf, self.sym = build_guest()
        self._load()
        cpuid = self.kvm.supported_cpuid()
        self.vcpus = []
        for i in range(ncpus):
            v = self.vm.create_vcpu()
            # CPUID.1:EBX[31:24] is the initial APIC ID; KVM leaves it to the VMM.
            for j in range(cpuid.nent):
                e = cpuid.entries[j]
                if e.function == 1:
                    e.ebx = (e.ebx & 0x00FFFFFF) | i << 24
            v.set_cpuid(cpuid)
            self.vcpus.append(v)
        self.tsc_khz = self.vcpus[0].tsc_khz()
        self._tables(ncpus, max(map_gib << 30, mem_size))
        self.counts = [dict() for _ in range(ncpus)]
        self.results = [None] * ncpus
        self.stop = False

    def _load(self) -> None:
        with open(self.elf, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]:
                    self.mem.write(seg["p_paddr"], seg.data())

    def _tables(self, ncpus: int, map_size: int) -> None:
        d = boot.segment_descriptor
        gdt = [0,
               d(0, 0xFFFFFFFF, 0xB, s=1, dpl=0, l=1),          # 0x08 kernel code64
               d(0, 0xFFFFFFFF, 0x3, s=1, dpl=0, db=1),         # 0x10 kernel data
               d(0, 0xFFFFFFFF, 0x3, s=1, dpl=3, db=1),         # 0x18 user data
               d(0, 0xFFFFFFFF, 0xB, s=1, dpl=3, l=1),          # 0x20 user code64
               d(0, 0xFFFFFFFF, 0xB, s=1, dpl=0, db=1)]         # 0x28 kernel code32
        raw = struct.pack(f"<{len(gdt)}Q", *gdt)
        for i in range(MAX_CPUS):
            base = TSS_BASE + i * 0x3000
            lo = d(base, TSS_LIMIT, 0x9, s=0, dpl=0, g=0)      # 64-bit TSS, available
            raw += struct.pack("<QQ", lo, base >> 32)
            tss = bytearray(TSS_LIMIT + 1)
            struct.pack_into("<Q", tss, 4, KSTACK_TOP + i * 0x4000)   # RSP0
            struct.pack_into("<H", tss, 0x66, 104)                    # I/O map base
            tss[-1] = 0xFF
            self.mem.write(base, bytes(tss))
        self.mem.write(GDT, raw)
        self.gdt_limit = len(raw) - 1
        self.mem.write(TRAMP_GDTR, struct.pack("<HI", self.gdt_limit, GDT))
        idt = bytearray(256 * 16)
        s = self.sym
        for v in range(32):
            idt[v * 16:(v + 1) * 16] = _gate(s[f"exc_{v}"])
        for v, name, dpl in ((0x40, "isr_timer", 0), (0x41, "isr_ipi", 0), (0x81, "isr_null", 3),
                             (3, "isr_null", 3), (6, "isr_ud", 0), (13, "isr_gp", 0),
                             (0xFF, "isr_spurious", 0)):
            idt[v * 16:(v + 1) * 16] = _gate(s[name], dpl)
        self.mem.write(IDT, bytes(idt))
        # Identity map of map_size with 2 MiB pages, U/S on: RAM and the xAPIC page at 0xFEE00000.
        self.mem.write(PML4, boot.build_page_tables(map_size, PML4))

    # ---- parameters and results ---------------------------------------------

    def params(self, cpu: int, *values: int) -> None:
        self.mem.write(PB + cpu * 0x10000, struct.pack(f"<{len(values)}Q", *values))

    def result(self, cpu: int, offset: int) -> int:
        return self.mem.read_u64(PB + cpu * 0x10000 + offset)

    def samples(self, cpu: int, n: int, offset: int = 0x1000) -> list[int]:
        raw = self.mem.read(PB + cpu * 0x10000 + offset, 8 * n)
        return list(struct.unpack(f"<{n}Q", raw))

    # ---- starting vCPUs ---------------------------------------------------------

    def enter(self, cpu: int, label: str) -> None:
        """Put vCPU `cpu` at `label`: long mode, CPL 0, the probe's GDT/IDT and TSS `cpu`."""
        v = self.vcpus[cpu]
        # kvmlite's long-mode state with CR3 = PML4, then the probe's GDT, IDT and TSS
        boot.set_long_mode_sregs(v, PML4 - boot.BA_PAGE_TABLES)
        s = v.get_sregs()
        s.gdt.base, s.gdt.limit = GDT, self.gdt_limit
        s.idt.base, s.idt.limit = IDT, 256 * 16 - 1
        s.tr.base, s.tr.limit, s.tr.selector = TSS_BASE + cpu * 0x3000, TSS_LIMIT, SEL_TSS + 16 * cpu
        v.set_sregs(s)
        boot.set_entry_regs(v, rip=self.sym[label], rsp=KSTACK_TOP + cpu * 0x4000, rdi=cpu)
        if self.irqchip:
            self.set_mp_state(cpu, lib.KVM_MP_STATE_RUNNABLE)

    def set_mp_state(self, cpu: int, state: int) -> None:
        mp = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        kvm.KVM_SET_MP_STATE(self.vcpus[cpu].fd, mp)

    def mp_state(self, cpu: int) -> int:
        mp = ffi.new("struct kvm_mp_state *")
        kvm.KVM_GET_MP_STATE(self.vcpus[cpu].fd, mp)
        return mp.mp_state

    # ---- running -------------------------------------------------------------------

    def run_cpu(self, cpu: int, on_exit=None) -> tuple[str, int]:
        """KVM_RUN vCPU `cpu` on the calling thread until the guest reports done."""
        v = self.vcpus[cpu]
        v.bind_thread()
        counts = self.counts[cpu]
        while True:
            e = v.run()
            counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1
            if on_exit is not None:
                r = on_exit(cpu, e)
                if r is not None:
                    return r
            match e:
                case ex.IoOut(port, _, value) if port == PORT_DONE:
                    return ("done", value)
                case ex.IoOut(port, _, value) if port == PORT_EXC:
                    # The CPU's frame on the ring-0 stack: [error code,] RIP, CS, ...
                    rsp = v.get_regs().rsp
                    has_error = value in (8, 10, 11, 12, 13, 14, 17, 21, 29, 30)
                    frame = struct.unpack("<6Q", self.mem.read(rsp, 48))[int(has_error):]
                    return ("exception", value, f"rip {frame[0]:#x} cs {frame[1]:#x}",
                            f"error {frame[0 - 1] if has_error else 0:#x}" if has_error else "")
                case ex.IoOut(port, _, _) if port in (PORT_LOOP, PORT_ROUND, PORT_START, 0xF6):
                    pass
                case ex.IoOut(port, _, value) if port == PORT_AP:
                    counts["ap_apic_id"] = value
                case ex.Interrupted():
                    if self.stop:
                        return ("stopped",)
                case _:
                    regs = v.get_regs()
                    return ("unexpected", repr(e), hex(regs.rip))

    def run_all(self, cpus, on_exit=None, timeout: float = 60.0) -> float:
        """Run the given vCPUs, one thread each; returns the wall time until all are done."""
        threads = []

        def body(i):
            self.results[i] = self.run_cpu(i, on_exit)

        t0 = time.perf_counter()
        for i in cpus:
            th = threading.Thread(target=body, args=(i,), daemon=True)
            th.start()
            threads.append(th)
        deadline = t0 + timeout
        for th in threads:
            th.join(max(0.0, deadline - time.perf_counter()))
        if any(th.is_alive() for th in threads):
            self.stop = True            # park the rest, so their state can be read
            for i in cpus:
                self.vcpus[i].kick()
            for th in threads:
                th.join(1.0)
            raise TimeoutError(f"vCPUs still running after {timeout} s; results {self.results}")
        return time.perf_counter() - t0

    def lapic(self, cpu: int) -> bytes:
        state = ffi.new("struct kvm_lapic_state *")
        kvm.KVM_GET_LAPIC(self.vcpus[cpu].fd, state)
        return bytes(ffi.buffer(state))

    def close(self) -> None:
        self.vm.close()
        self.kvm.close()


def cycles_to_us(cycles: float, tsc_khz: int) -> float:
    return cycles * 1000.0 / tsc_khz


def host_cpus() -> int:
    return os.cpu_count() or 1
