"""The boot protocol (docs/boot.md): memory layout, page tables, GDT, boot info,
and the vCPU state at the image's first instruction."""

from __future__ import annotations

import struct

import numpy as np

from .errors import ConfigError

# ---- layout (docs/boot.md, "Guest-physical memory map") ----
BOOT_INFO_GPA = 0x1000
CMDLINE_GPA = 0x2000
CMDLINE_MAX = 4095
GDT_GPA = 0x3000
PML4_GPA = 0x10000
BOOT_STACK_TOP = 0x80000
RESERVED_END = 0x80000
DEFAULT_LOAD_ADDR = 0x100000
MAX_RAM = 64 << 30           # page tables must fit between PML4_GPA and the stack
KVMLITE_RSI_MAGIC = 0x4B564D4C

# ---- boot-info block (docs/boot.md, "The boot-info block") ----
BOOT_INFO_MAGIC = 0x4F464E49  # "INFO"
BOOT_INFO_VERSION = 1
# magic, version, size, ram_size, cmdline_gpa, cmdline_len, flags, uart, debugcon,
# exit, fph ports, tsc_khz, image_start, image_end, reserved_end, pagetable_gpa,
# idle port, 3 reserved u16
BOOT_INFO = struct.Struct("<IHHQQIIHHHHQQQQQHHHH")
BOOT_INFO_FLAG_FPH = 1 << 0

# ---- architectural bits (Intel SDM Vol. 3A, ch. 2 and 4) ----
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA = 1 << 0, 1 << 8, 1 << 10
PTE_P, PTE_RW, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
RFLAGS_RESERVED = 1 << 1          # RFLAGS bit 1 is reserved and must be 1
SEG_TYPE_CODE_XR_ACCESSED = 0xB
SEG_TYPE_DATA_RW_ACCESSED = 0x3
SEG_TYPE_TSS64_BUSY = 0xB
SEG_TYPE_LDT = 0x2

GDT_CODE64_SEL = 0x08
GDT_DATA_SEL = 0x10

GIB = 1 << 30
MIB2 = 2 << 20


def segment_descriptor(base: int, limit: int, type_: int, *, s: int, dpl: int = 0,
                       present: int = 1, l: int = 0, db: int = 0, g: int = 1) -> int:
    """Pack an 8-byte segment descriptor (SDM Vol. 3A, 3.4.5)."""
    if g:
        limit >>= 12
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | (type_ & 0xF) << 40 | s << 44
            | dpl << 45 | present << 47 | ((limit >> 16) & 0xF) << 48 | l << 53 | db << 54
            | g << 55 | ((base >> 24) & 0xFF) << 56)


CODE64 = dict(base=0, limit=0xFFFFFFFF, type=SEG_TYPE_CODE_XR_ACCESSED, s=1, dpl=0, present=1,
              l=1, db=0, g=1, avl=0, unusable=0, selector=GDT_CODE64_SEL)
DATA = dict(base=0, limit=0xFFFFFFFF, type=SEG_TYPE_DATA_RW_ACCESSED, s=1, dpl=0, present=1,
            l=0, db=1, g=1, avl=0, unusable=0, selector=GDT_DATA_SEL)


def gdt_bytes() -> bytes:
    """null, code64, data: the GDT the VMM loads (docs/boot.md)."""
    entries = [0]
    for seg in (CODE64, DATA):
        entries.append(segment_descriptor(seg["base"], seg["limit"], seg["type"], s=seg["s"],
                                          dpl=seg["dpl"], present=seg["present"], l=seg["l"],
                                          db=seg["db"], g=seg["g"]))
    return struct.pack(f"<{len(entries)}Q", *entries)


def page_table_pages(ram_size: int) -> int:
    """PML4 + PDPT + one PD per GiB of RAM."""
    return 2 + (ram_size + GIB - 1) // GIB


def build_page_tables(ram_size: int) -> bytes:
    """Identity map of [0, ram_size) with 2 MiB pages; every entry P|RW|U/S."""
    if ram_size > MAX_RAM:
        raise ConfigError(f"RAM above {MAX_RAM >> 30} GiB is not supported by the boot protocol")
    if ram_size % MIB2:
        # A 2 MiB page would map past the end of RAM (docs/boot.md: nothing beyond RAM is mapped).
        raise ConfigError(f"RAM of {ram_size} bytes is not a multiple of 2 MiB")
    npds = (ram_size + GIB - 1) // GIB
    tables = np.zeros((2 + npds, 512), dtype=np.uint64)
    flags = PTE_P | PTE_RW | PTE_US
    pdpt_gpa = PML4_GPA + 0x1000
    tables[0, 0] = pdpt_gpa | flags
    tables[1, :npds] = (pdpt_gpa + 0x1000 * (1 + np.arange(npds, dtype=np.uint64))) | flags
    n2m = (ram_size + MIB2 - 1) // MIB2
    pd = tables[2:].reshape(-1)
    pd[:n2m] = (np.arange(n2m, dtype=np.uint64) * MIB2) | (flags | PTE_PS)
    return tables.tobytes()


def boot_info_bytes(*, ram_size: int, cmdline_len: int, fph: bool, tsc_khz: int,
                    image_start: int, image_end: int, uart_port: int, debugcon_port: int,
                    exit_port: int, fph_port: int, idle_port: int = 0) -> bytes:
    return BOOT_INFO.pack(BOOT_INFO_MAGIC, BOOT_INFO_VERSION, BOOT_INFO.size, ram_size,
                          CMDLINE_GPA, cmdline_len, BOOT_INFO_FLAG_FPH if fph else 0,
                          uart_port, debugcon_port, exit_port, fph_port, tsc_khz,
                          image_start, image_end, RESERVED_END, PML4_GPA, idle_port, 0, 0, 0)


def setup_long_mode(vcpu, entry: int) -> None:
    """Put `vcpu` at `entry` in 64-bit mode, CPL 0, with the VMM's GDT and page tables."""
    s = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        for field, value in (CODE64 if name == "cs" else DATA).items():
            setattr(seg, field, value)
    # KVM requires a usable TR in long mode: a busy 64-bit TSS.
    s.tr.base, s.tr.limit, s.tr.selector = 0, 0x67, 0
    s.tr.type, s.tr.present, s.tr.s, s.tr.unusable = SEG_TYPE_TSS64_BUSY, 1, 0, 0
    s.ldt.base, s.ldt.limit, s.ldt.selector = 0, 0xFFFF, 0
    s.ldt.type, s.ldt.present, s.ldt.s, s.ldt.unusable = SEG_TYPE_LDT, 1, 0, 0
    s.gdt.base, s.gdt.limit = GDT_GPA, 3 * 8 - 1
    s.idt.base, s.idt.limit = 0, 0
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    s.cr3 = PML4_GPA
    s.efer = EFER_SCE | EFER_LME | EFER_LMA
    vcpu.set_sregs(s)

    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                 "r14", "r15"):
        setattr(regs, name, 0)
    regs.rflags = RFLAGS_RESERVED
    regs.rip = entry
    regs.rsp = BOOT_STACK_TOP
    regs.rdi = BOOT_INFO_GPA
    regs.rsi = KVMLITE_RSI_MAGIC
    vcpu.set_regs(regs)


def write_boot_area(mem, *, cmdline: str, boot_info: bytes) -> None:
    """Write GDT, page tables, command line and boot info into guest memory."""
    raw = cmdline.encode()
    if len(raw) > CMDLINE_MAX:
        raise ConfigError(f"command line is {len(raw)} bytes; the limit is {CMDLINE_MAX}")
    mem.write(GDT_GPA, gdt_bytes())
    mem.write(PML4_GPA, build_page_tables(mem.size))
    mem.write(CMDLINE_GPA, raw + b"\0")
    mem.write(BOOT_INFO_GPA, boot_info)
