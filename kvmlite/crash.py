"""The crash report: what a user needs to see when the guest dies."""

from __future__ import annotations

from . import exits as ex
from .boot import CR0_PG, EFER_LMA

CODE_BYTES = 32


def describe_exit(exit_: ex.Exit) -> str:
    match exit_:
        case ex.Shutdown():
            return "KVM_EXIT_SHUTDOWN: the vCPU shut down (triple fault: an exception " \
                   "occurred while delivering a double fault)"
        case ex.FailEntry(reason, cpu):
            return f"KVM_EXIT_FAIL_ENTRY: VM entry failed, hardware reason {reason:#x} on host CPU {cpu}"
        case ex.InternalError(suberror, data):
            return (f"KVM_EXIT_INTERNAL_ERROR: {exit_.suberror_name} (suberror {suberror}), "
                    f"data [{', '.join(hex(d) for d in data)}]")
        case ex.Unhandled(reason, hw):
            extra = f", hardware exit reason {hw:#x}" if hw else ""
            return f"{exit_.name}: kvmlite does not handle this exit{extra}"
        case ex.SystemEvent(type_):
            return f"KVM_EXIT_SYSTEM_EVENT type {type_}"
    return repr(exit_)


def disassemble(code: bytes, address: int, bits: int, count: int = 6) -> list[str]:
    try:
        import capstone
    except ImportError:
        return [f"  {address:#018x}: {code[:16].hex(' ')}  (install capstone to disassemble)"]
    mode = {64: capstone.CS_MODE_64, 32: capstone.CS_MODE_32, 16: capstone.CS_MODE_16}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    lines = []
    for insn in md.disasm(code, address):
        marker = "=>" if insn.address == address else "  "
        lines.append(f"{marker} {insn.address:#018x}: {insn.bytes.hex(' '):<24} "
                     f"{insn.mnemonic} {insn.op_str}".rstrip())
        if len(lines) >= count:
            break
    if not lines:
        lines.append(f"=> {address:#018x}: {code[:16].hex(' ')}  (not a valid instruction)")
    return lines


def crash_report(machine, exit_: ex.Exit, index: int = 0) -> str:
    """A multi-line report: the vCPU and its exit, registers, control registers,
    code at RIP, and where the other vCPUs were.  Registers are read on each
    vCPU's own thread."""
    vcpu = machine.vcpu_proxy(index)
    who = f" on vCPU {index}" if machine.nvcpus > 1 else ""
    out = [f"guest crashed{who}: {describe_exit(exit_)}"]
    try:
        regs = vcpu.regs_dict()
        sregs = vcpu.sregs_dict()
    except Exception as e:  # a vCPU in a state KVM refuses to report
        out.append(f"  (registers unavailable: {e})")
        return "\n".join(out)
    rip = regs["rip"]
    cs = sregs["cs"]
    bits = 64 if (sregs["efer"] & EFER_LMA and cs["l"]) else (32 if cs["db"] else 16)
    out.append(f"  RIP {rip:#018x}  RFLAGS {regs['rflags']:#010x}  CPL {cs['selector'] & 3}  "
               f"mode {bits}-bit")
    names = [n for n in regs if n not in ("rip", "rflags")]
    for i in range(0, len(names), 4):
        out.append("  " + "  ".join(f"{n.upper():>3} {regs[n]:#018x}" for n in names[i:i + 4]))
    out.append(f"  CR0 {sregs['cr0']:#010x}  CR2 {sregs['cr2']:#018x}  CR3 {sregs['cr3']:#010x}  "
               f"CR4 {sregs['cr4']:#010x}  EFER {sregs['efer']:#x}")
    for seg in ("cs", "ss", "ds", "tr"):
        s = sregs[seg]
        out.append(f"  {seg.upper():>3} sel {s['selector']:#06x} base {s['base']:#x} "
                   f"limit {s['limit']:#x} type {s['type']:#x} dpl {s['dpl']} l {s['l']}")
    out.append(f"  GDT {sregs['gdt']['base']:#x}/{sregs['gdt']['limit']:#x}  "
               f"IDT {sregs['idt']['base']:#x}/{sregs['idt']['limit']:#x}")
    gpa = rip + cs["base"]
    if sregs["cr0"] & CR0_PG:
        gpa = vcpu.translate(gpa)
    if gpa is not None and machine.memory.contains(gpa, 1):
        n = min(CODE_BYTES, machine.memory.gpa + machine.memory.size - gpa)
        code = machine.memory.read(gpa, n)
        out.append(f"  code at RIP (GPA {gpa:#x}):")
        out.extend("  " + line for line in disassemble(code, rip, bits))
    else:
        out.append("  code at RIP: not in guest RAM")
    for other in range(machine.nvcpus):
        if other != index:
            try:
                rip = machine.call(other, lambda v: v.get_regs().rip, timeout=1.0)
                out.append(f"  vCPU {other}: RIP {rip:#018x}")
            except Exception as e:
                out.append(f"  vCPU {other}: registers unavailable ({e})")
    return "\n".join(out)
