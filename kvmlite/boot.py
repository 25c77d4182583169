"""The boot protocol (docs/boot.md): memory layout, page tables, GDT, boot info,
and the vCPU state at the image's first instruction."""

from __future__ import annotations

import struct

import numpy as np

from .errors import ConfigError, ImageError

# ---- layout (docs/boot.md, "Guest-physical memory map") ----
# Version 2: the VMM's boot structures form one block, the boot area, placed
# at the top of RAM (or, if the image is there, right below the image), so an
# image may use any other RAM, address 0 included.  Offsets in the boot area:
BA_INFO = 0x0000             # boot-info block
BA_CMDLINE = 0x1000          # command line, NUL-terminated
BA_GDT = 0x2000              # the GDT the VMM loads
BA_TSS = 0x3000              # a zeroed 64-bit TSS for TR (the guest installs its own)
BA_STACK_TOP = 0x8000        # boot stack: 16 KiB below this offset
BA_PAGE_TABLES = 0x8000      # PML4, PDPT, one PD per GiB
CMDLINE_MAX = 4095
DEFAULT_LOAD_ADDR = 0x100000
MAX_RAM = 64 << 30           # the identity map's page directories cover at most 64 GiB
KVMLITE_RSI_MAGIC = 0x4B564D4C
PAGE = 4096

# ---- boot-info block (docs/boot.md, "The boot-info block") ----
BOOT_INFO_MAGIC = 0x4F464E49  # "INFO"
BOOT_INFO_VERSION = 2
# magic, version, size, ram_size, cmdline_gpa, cmdline_len, flags, uart, debugcon,
# exit, fph ports, tsc_khz, image_start, image_end, reserved_end, pagetable_gpa,
# idle port, 3 reserved u16; version 2: boot_area_gpa, cpu_count, cpustart port, reserved u16
BOOT_INFO = struct.Struct("<IHHQQIIHHHHQQQQQHHHHQIHH")
BOOT_INFO_FLAG_FPH = 1 << 0       # the free-page-hint device is present
BOOT_INFO_FLAG_LAPIC = 1 << 1     # in-kernel LAPIC per vCPU (timer, IPIs, INIT-SIPI); HLT waits
BOOT_INFO_FLAG_CPUSTART = 1 << 2  # the CPU-start device is present at cpustart_port


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


def boot_area_size(ram_size: int) -> int:
    """Bytes of the boot area for `ram_size` bytes of RAM (page tables grow with RAM)."""
    return BA_PAGE_TABLES + PAGE * page_table_pages(ram_size)


def place_boot_area(ram_size: int, image_start: int, image_end: int) -> int:
    """GPA of the boot area: at the top of RAM, or, if the image is there, the
    highest page-aligned place right below the image.  ConfigError if neither fits."""
    check_ram(ram_size)
    size = boot_area_size(ram_size)
    top = ram_size - size
    if image_end <= top:
        return top
    below = (image_start - size) & ~(PAGE - 1)
    if below >= 0 and image_start >= size:
        return below
    raise ImageError(f"no room for the boot area ({size // 1024} KiB) above or below the image "
                      f"at {image_start:#x}-{image_end:#x} in {ram_size >> 20} MiB of RAM "
                      f"(use a larger --memory)")


def check_ram(ram_size: int) -> None:
    if ram_size > MAX_RAM:
        raise ConfigError(f"RAM above {MAX_RAM >> 30} GiB is not supported by the boot protocol")
    if ram_size % MIB2:
        # A 2 MiB page would map past the end of RAM (docs/boot.md: nothing beyond RAM is mapped).
        raise ConfigError(f"RAM of {ram_size} bytes is not a multiple of 2 MiB")


def build_page_tables(ram_size: int, base: int) -> bytes:
    """Identity map of [0, ram_size) with 2 MiB pages, every entry P|RW|U/S,
    as the bytes of tables that will sit at GPA `base` (PML4 first)."""
    check_ram(ram_size)
    npds = (ram_size + GIB - 1) // GIB
    tables = np.zeros((2 + npds, 512), dtype=np.uint64)
    flags = PTE_P | PTE_RW | PTE_US
    pdpt_gpa = base + PAGE
    tables[0, 0] = pdpt_gpa | flags
    tables[1, :npds] = (pdpt_gpa + PAGE * (1 + np.arange(npds, dtype=np.uint64))) | flags
    n2m = (ram_size + MIB2 - 1) // MIB2
    pd = tables[2:].reshape(-1)
    pd[:n2m] = (np.arange(n2m, dtype=np.uint64) * MIB2) | (flags | PTE_PS)
    return tables.tobytes()


def boot_info_bytes(*, ram_size: int, boot_area: int, cmdline_len: int, fph: bool, tsc_khz: int,
                    image_start: int, image_end: int, uart_port: int, debugcon_port: int,
                    exit_port: int, fph_port: int, idle_port: int = 0, cpu_count: int = 1,
                    lapic: bool = False, cpustart_port: int = 0) -> bytes:
    flags = ((BOOT_INFO_FLAG_FPH if fph else 0) | (BOOT_INFO_FLAG_LAPIC if lapic else 0)
             | (BOOT_INFO_FLAG_CPUSTART if cpustart_port else 0))
    return BOOT_INFO.pack(BOOT_INFO_MAGIC, BOOT_INFO_VERSION, BOOT_INFO.size, ram_size,
                          boot_area + BA_CMDLINE, cmdline_len, flags,
                          uart_port, debugcon_port, exit_port, fph_port, tsc_khz,
                          image_start, image_end, boot_area + boot_area_size(ram_size),
                          boot_area + BA_PAGE_TABLES, idle_port, 0, 0, 0,
                          boot_area, cpu_count, cpustart_port, 0)


def set_long_mode_sregs(vcpu, boot_area: int) -> None:
    """64-bit mode, CPL 0, the boot area's GDT, TSS and page tables."""
    s = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        for field, value in (CODE64 if name == "cs" else DATA).items():
            setattr(seg, field, value)
    # KVM requires a usable TR in long mode: a busy 64-bit TSS (zeroed, in the boot area).
    s.tr.base, s.tr.limit, s.tr.selector = boot_area + BA_TSS, 0x67, 0
    s.tr.type, s.tr.present, s.tr.s, s.tr.unusable = SEG_TYPE_TSS64_BUSY, 1, 0, 0
    s.ldt.base, s.ldt.limit, s.ldt.selector = 0, 0xFFFF, 0
    s.ldt.type, s.ldt.present, s.ldt.s, s.ldt.unusable = SEG_TYPE_LDT, 1, 0, 0
    s.gdt.base, s.gdt.limit = boot_area + BA_GDT, 3 * 8 - 1
    s.idt.base, s.idt.limit = 0, 0
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    s.cr3 = boot_area + BA_PAGE_TABLES
    s.efer = EFER_SCE | EFER_LME | EFER_LMA
    vcpu.set_sregs(s)


def set_entry_regs(vcpu, *, rip: int, rsp: int, rdi: int, rdx: int = 0) -> None:
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                 "r14", "r15"):
        setattr(regs, name, 0)
    regs.rflags = RFLAGS_RESERVED
    regs.rip, regs.rsp, regs.rdi, regs.rdx = rip, rsp, rdi, rdx
    regs.rsi = KVMLITE_RSI_MAGIC
    vcpu.set_regs(regs)


def setup_long_mode(vcpu, entry: int, boot_area: int) -> None:
    """Put the boot vCPU at `entry` in 64-bit mode, CPL 0, with the VMM's GDT and
    page tables, its boot stack, and RDI = the boot-info block (docs/boot.md)."""
    set_long_mode_sregs(vcpu, boot_area)
    set_entry_regs(vcpu, rip=entry, rsp=boot_area + BA_STACK_TOP, rdi=boot_area + BA_INFO)


def setup_ap(vcpu, cpu: int, *, entry: int, stack: int, arg: int, boot_area: int) -> None:
    """Start vCPU `cpu` as the CPU-start device asks (docs/boot.md, "Starting the
    other CPUs"): the boot vCPU's mode, RIP = entry, RSP = stack, RDI = arg,
    RDX = the CPU's index."""
    set_long_mode_sregs(vcpu, boot_area)
    set_entry_regs(vcpu, rip=entry, rsp=stack, rdi=arg, rdx=cpu)


def write_boot_area(mem, *, boot_area: int, cmdline: str, boot_info: bytes) -> None:
    """Write GDT, page tables, command line and boot info into the boot area
    (the TSS and the stack are RAM a new VM has zeroed)."""
    raw = cmdline.encode()
    if len(raw) > CMDLINE_MAX:
        raise ConfigError(f"command line is {len(raw)} bytes; the limit is {CMDLINE_MAX}")
    mem.write(boot_area + BA_GDT, gdt_bytes())
    mem.write(boot_area + BA_PAGE_TABLES, build_page_tables(mem.size, boot_area + BA_PAGE_TABLES))
    mem.write(boot_area + BA_CMDLINE, raw + b"\0")
    mem.write(boot_area + BA_INFO, boot_info)
