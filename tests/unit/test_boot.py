"""The boot protocol, version 2 (docs/boot.md): page tables, GDT, boot-info block, boot area.

Checked the way the CPU and a guest would read them, from bytes in guest
memory, not by re-running kvmlite's own arithmetic.  No /dev/kvm.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlite import boot
from kvmlite.errors import ConfigError, GuestMemoryError, ImageError
from kvmlite.vstate.memory import GuestMemory

MIB, GIB = 1 << 20, 1 << 30
MIB2 = 2 * MIB

# Page-table entry bits (SDM Vol. 3A, 4.5, tables 4-15..4-19), written out here
# rather than taken from kvmlite.boot.
P, RW, US, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF         # bits 51:12: next table / 4 KiB frame
ADDR_MASK_2M = ((1 << 52) - 1) & ~(MIB2 - 1)  # bits 51:21 of a 2 MiB leaf


class TopMemory:
    """Guest memory that claims `size` bytes of RAM but stores only its last
    `stored` bytes, where the boot area goes: no host memory for 64 GiB."""

    def __init__(self, size: int, stored: int = MIB):
        self.size = size
        self.base = size - stored
        self.data = bytearray(stored)

    def write(self, gpa: int, data: bytes) -> None:
        assert self.base <= gpa and gpa + len(data) <= self.size, f"write at {gpa:#x} outside the top MiB"
        self.data[gpa - self.base:gpa - self.base + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        assert self.base <= gpa and gpa + length <= self.size
        return bytes(self.data[gpa - self.base:gpa - self.base + length])

    def u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.read(gpa, 8))[0]


def boot_area(ram_size: int, cmdline: str = "console=ttyS0") -> tuple[TopMemory, int]:
    """A boot area written for an image at 1 MiB: (memory, its GPA)."""
    mem = TopMemory(ram_size)
    area = boot.place_boot_area(ram_size, 0x100000, 0x200000)
    boot.write_boot_area(mem, boot_area=area, cmdline=cmdline, boot_info=b"\xAA" * boot.BOOT_INFO.size)
    return mem, area


def walk_all(mem: TopMemory, cr3: int) -> dict[int, tuple[int, int]]:
    """Every present leaf mapping under CR3, as the MMU finds them with 4-level paging:
    {virtual address: (physical address, effective flags P/RW/US of all levels + PS of the leaf)}."""
    maps = {}
    for i4 in range(512):
        e4 = mem.u64((cr3 & ADDR_MASK) + 8 * i4)
        if not e4 & P:
            continue
        assert not e4 & PS, "PS is reserved in a PML4 entry"
        for i3 in range(512):
            e3 = mem.u64((e4 & ADDR_MASK) + 8 * i3)
            if not e3 & P:
                continue
            assert not e3 & PS, "unexpected 1 GiB page"
            for i2 in range(512):
                e2 = mem.u64((e3 & ADDR_MASK) + 8 * i2)
                if not e2 & P:
                    continue
                assert e2 & PS, "unexpected 4 KiB page table"
                va = i4 << 39 | i3 << 30 | i2 << 21
                flags = e4 & e3 & e2 & (P | RW | US) | (e2 & PS)
                maps[va] = (e2 & ADDR_MASK_2M, flags)
    return maps


# ---- page tables and the boot area's place -------------------------------------------

@pytest.mark.parametrize("ram_size", [256 * MIB, GIB + MIB2, 4 * GIB, boot.MAX_RAM],
                         ids=["256M", "1G+2M", "4G", "64G"])
def test_page_tables_identity_map_exactly_ram(ram_size):
    """Walking the tables from CR3 (the boot area's page tables) maps each 2 MiB of RAM to itself, P|RW|U/S|PS, and nothing else."""
    mem, area = boot_area(ram_size)
    maps = walk_all(mem, area + 0x8000)
    expected = {gpa: (gpa, P | RW | US | PS) for gpa in range(0, ram_size, MIB2)}
    assert maps == expected


@pytest.mark.parametrize("ram_size", [256 * MIB, GIB + MIB2, 4 * GIB, boot.MAX_RAM])
def test_boot_area_is_at_the_top_of_ram_with_documented_size(ram_size):
    """The boot area is 32 KiB + PML4, PDPT and one PD per GiB, and ends exactly at the end of RAM."""
    tables = boot.build_page_tables(ram_size, 0)
    npds = -(-ram_size // GIB)
    assert len(tables) == 4096 * (2 + npds) == 4096 * boot.page_table_pages(ram_size)
    assert boot.boot_area_size(ram_size) == 0x8000 + len(tables)
    area = boot.place_boot_area(ram_size, 0x100000, 0x200000)
    assert area % 4096 == 0 and area + boot.boot_area_size(ram_size) == ram_size


def test_boot_area_goes_below_an_image_at_the_top_and_is_refused_without_room():
    """An image at the top of RAM gets the boot area right below it; one that leaves no room is refused."""
    ram, size = 16 * MIB, boot.boot_area_size(16 * MIB)
    assert boot.place_boot_area(ram, 0, 0x1000) == ram - size          # an image at 0: top of RAM
    assert boot.place_boot_area(ram, 8 * MIB, ram) == 8 * MIB - size    # an image that ends RAM: below it
    assert boot.place_boot_area(ram, 8 * MIB + 100, ram) == (8 * MIB + 100 - size) & ~0xFFF
    with pytest.raises(ImageError, match="boot area"):
        boot.place_boot_area(ram, size - 4096, ram)                    # room neither above nor below


def test_page_tables_refuse_ram_above_64_gib():
    """RAM above MAX_RAM (64 GiB) is refused with a ConfigError, 64 GiB itself is accepted."""
    assert boot.MAX_RAM == 64 * GIB
    boot.build_page_tables(boot.MAX_RAM, 0)
    with pytest.raises(ConfigError, match="64 GiB"):
        boot.build_page_tables(boot.MAX_RAM + 4096, 0)
    with pytest.raises(ConfigError):
        boot_area(boot.MAX_RAM + MIB2)


def test_page_tables_refuse_ram_that_is_not_whole_2mib_pages():
    """257 MiB cannot be identity-mapped with 2 MiB pages without mapping past RAM: refused."""
    with pytest.raises(ConfigError, match="multiple of 2 MiB"):
        boot.build_page_tables(257 * MIB, 0)


# ---- segment descriptors and the GDT ---------------------------------------------------

def decode_descriptor(d: int) -> dict:
    """An 8-byte code/data descriptor split at the SDM Vol. 3A 3.4.5 bit positions."""
    g = d >> 55 & 1
    raw_limit = (d & 0xFFFF) | (d >> 48 & 0xF) << 16
    return {
        "base": (d >> 16 & 0xFFFFFF) | (d >> 56 & 0xFF) << 24,
        "limit": (raw_limit << 12 | 0xFFF) if g else raw_limit,
        "type": d >> 40 & 0xF, "s": d >> 44 & 1, "dpl": d >> 45 & 3, "present": d >> 47 & 1,
        "avl": d >> 52 & 1, "l": d >> 53 & 1, "db": d >> 54 & 1, "g": g,
    }


@given(base=st.integers(0, 2**32 - 1), limit=st.integers(0, 2**20 - 1), type_=st.integers(0, 15),
       s=st.integers(0, 1), dpl=st.integers(0, 3), present=st.integers(0, 1), l=st.integers(0, 1),
       db=st.integers(0, 1), g=st.integers(0, 1))
@settings(max_examples=200, deadline=None)
def test_segment_descriptor_decodes_back(base, limit, type_, s, dpl, present, l, db, g):
    """segment_descriptor() packs base, limit, type and flags where the SDM says a CPU reads them."""
    byte_limit = (limit << 12 | 0xFFF) if g else limit
    d = boot.segment_descriptor(base, byte_limit, type_, s=s, dpl=dpl, present=present, l=l, db=db, g=g)
    assert 0 <= d < 1 << 64
    assert decode_descriptor(d) == {"base": base, "limit": byte_limit, "type": type_, "s": s,
                                    "dpl": dpl, "present": present, "avl": 0, "l": l, "db": db, "g": g}


def gdt_entries() -> list[int]:
    raw = boot.gdt_bytes()
    assert len(raw) == 3 * 8                      # GDTR limit 23 in docs/boot.md
    return list(struct.unpack("<3Q", raw))


def test_gdt_code64_descriptor_is_architectural_64bit_code():
    """GDT entry 0x08 is a present, DPL 0, execute/read, L=1 D=0, 4 GiB flat code segment."""
    code = gdt_entries()[boot.GDT_CODE64_SEL >> 3]
    assert boot.GDT_CODE64_SEL == 0x08
    f = decode_descriptor(code)
    assert f["present"] == 1 and f["s"] == 1 and f["dpl"] == 0
    assert f["type"] & 0b1000, "code segment (type bit 3)"
    assert f["type"] & 0b0010, "readable (type bit 1)"
    assert f["l"] == 1 and f["db"] == 0, "64-bit code requires L=1, D=0 (SDM 5.2.1)"
    assert f["base"] == 0 and f["limit"] == 0xFFFFFFFF and f["g"] == 1
    # The same value built by hand from the SDM bit positions: limit 15:0, type 43:40,
    # S 44, P 47, limit 19:16 at 51:48, L 53, G 55.  It is Linux's 64-bit boot CS, accessed.
    by_hand = 0xFFFF | 0xB << 40 | 1 << 44 | 1 << 47 | 0xF << 48 | 1 << 53 | 1 << 55
    assert code == by_hand == 0x00AF9B000000FFFF


def test_gdt_data_descriptor_is_flat_writable_data():
    """GDT entry 0x10 is a present, DPL 0, read/write, 4 GiB flat data segment."""
    data = gdt_entries()[boot.GDT_DATA_SEL >> 3]
    f = decode_descriptor(data)
    assert f["present"] == 1 and f["s"] == 1 and f["dpl"] == 0
    assert not f["type"] & 0b1000 and f["type"] & 0b0010, "data, writable"
    assert f["base"] == 0 and f["limit"] == 0xFFFFFFFF and f["g"] == 1 and f["db"] == 1
    assert data == 0x00CF93000000FFFF


def test_gdt_null_entry_and_gdt_matches_segment_registers():
    """Entry 0 is null, and the descriptors equal the CS/DS values loaded into the vCPU (a reload changes nothing)."""
    null, code, data = gdt_entries()
    assert null == 0
    for desc, seg in ((code, boot.CODE64), (data, boot.DATA)):
        f = decode_descriptor(desc)
        assert {k: f[k] for k in ("base", "limit", "type", "s", "dpl", "present", "l", "db", "g", "avl")} \
            == {k: seg[k] for k in ("base", "limit", "type", "s", "dpl", "present", "l", "db", "g", "avl")}
    assert boot.CODE64["selector"] == 0x08 and boot.DATA["selector"] == 0x10


# ---- the boot-info block -----------------------------------------------------------------

# docs/boot.md, "The boot-info block": (offset, struct format, field)
BOOT_INFO_TABLE = [
    (0x00, "<I", "magic"), (0x04, "<H", "version"), (0x06, "<H", "size"),
    (0x08, "<Q", "ram_size"), (0x10, "<Q", "cmdline_gpa"), (0x18, "<I", "cmdline_len"),
    (0x1C, "<I", "flags"), (0x20, "<H", "uart_port"), (0x22, "<H", "debugcon_port"),
    (0x24, "<H", "exit_port"), (0x26, "<H", "fph_port"), (0x28, "<Q", "tsc_khz"),
    (0x30, "<Q", "image_start"), (0x38, "<Q", "image_end"), (0x40, "<Q", "reserved_end"),
    (0x48, "<Q", "pagetable_gpa"), (0x50, "<H", "idle_port"),
    (0x58, "<Q", "boot_area_gpa"), (0x60, "<I", "cpu_count"), (0x64, "<H", "cpustart_port"),
]


def read_boot_info(raw: bytes) -> dict:
    return {name: struct.unpack_from(fmt, raw, off)[0] for off, fmt, name in BOOT_INFO_TABLE}


@pytest.mark.parametrize("fph", [True, False])
def test_boot_info_fields_at_documented_offsets(fph):
    """Each boot-info field reads back from the offset and width in docs/boot.md's table."""
    area = 0x1234_5677_0000
    raw = boot.boot_info_bytes(ram_size=0x1234_5678_9000, boot_area=area, cmdline_len=0x0ABC, fph=fph,
                               tsc_khz=2_999_999, image_start=0x100000, image_end=0x1A3000,
                               uart_port=0x3F8, debugcon_port=0xE9, exit_port=0x501, fph_port=0x520,
                               idle_port=0x504)
    assert len(raw) == 0x68
    assert read_boot_info(raw) == {
        "magic": 0x4F464E49, "version": 2, "size": 0x68, "ram_size": 0x1234_5678_9000,
        "cmdline_gpa": area + 0x1000, "cmdline_len": 0x0ABC, "flags": 1 if fph else 0,
        "uart_port": 0x3F8, "debugcon_port": 0xE9, "exit_port": 0x501, "fph_port": 0x520,
        "tsc_khz": 2_999_999, "image_start": 0x100000, "image_end": 0x1A3000,
        "reserved_end": area + boot.boot_area_size(0x1234_5678_9000), "pagetable_gpa": area + 0x8000,
        "idle_port": 0x504, "boot_area_gpa": area, "cpu_count": 1, "cpustart_port": 0,
    }
    assert raw[:4] == b"INFO"


def test_boot_info_smp_fields_and_flags():
    """cpu_count and cpustart_port land at 0x60 and 0x64; flags bit 1 = LAPIC, bit 2 = CPU-start device."""
    raw = boot.boot_info_bytes(ram_size=GIB, boot_area=GIB - boot.boot_area_size(GIB), cmdline_len=0,
                               fph=True, tsc_khz=1, image_start=0, image_end=4096, uart_port=0x3F8,
                               debugcon_port=0xE9, exit_port=0x501, fph_port=0x520, cpu_count=3,
                               lapic=True, cpustart_port=0x540)
    info = read_boot_info(raw)
    assert (info["cpu_count"], info["cpustart_port"], info["flags"]) == (3, 0x540, 0b111)


# ---- the boot area in guest memory ---------------------------------------------------------

def test_guest_memory_needs_no_kvm():
    """GuestMemory is plain anonymous mmap: creating, writing and reading it opens nothing (no /dev/kvm)."""
    mem = GuestMemory(4 * MIB)
    try:
        mem.write(0x1000, b"abc")
        assert mem.read(0x1000, 3) == b"abc" and mem.size == 4 * MIB and mem.npages == 1024
        with pytest.raises(GuestMemoryError):
            mem.write(4 * MIB - 2, b"abc")
    finally:
        mem.close()


def test_write_boot_area_lays_out_guest_memory():
    """In a real GuestMemory: boot info, command line, GDT and page tables at their offsets in the boot area at the top of RAM."""
    mem = GuestMemory(256 * MIB)
    try:
        area = boot.place_boot_area(mem.size, 0x100000, 0x101000)
        info = boot.boot_info_bytes(ram_size=mem.size, boot_area=area, cmdline_len=9, fph=True, tsc_khz=0,
                                    image_start=0x100000, image_end=0x101000, uart_port=0x3F8,
                                    debugcon_port=0xE9, exit_port=0x501, fph_port=0x520)
        boot.write_boot_area(mem, boot_area=area, cmdline="quiet x=1", boot_info=info)
        assert area == 256 * MIB - 0x8000 - 3 * 4096
        assert mem.read(area + 0x2000, 24) == boot.gdt_bytes()
        assert mem.read(area + 0x1000, 10) == b"quiet x=1\0"
        info = read_boot_info(mem.read(area, 0x68))
        assert info["ram_size"] == 256 * MIB and info["cmdline_gpa"] == area + 0x1000
        assert mem.read(area + 0x8000, 3 * 4096) == boot.build_page_tables(mem.size, area + 0x8000)
        assert mem.read(0, 0x100000) == bytes(0x100000), "nothing below the image is touched"
    finally:
        mem.close()


def test_write_boot_area_accepts_4095_byte_cmdline():
    """A 4095-byte command line (the documented maximum) fits, NUL included, within its page."""
    mem, area = boot_area(256 * MIB, cmdline="x" * 4095)
    assert mem.read(area + 0x1000, 4096) == b"x" * 4095 + b"\0"
    assert mem.read(area + 0x2000, 24) == boot.gdt_bytes(), "the GDT after it is intact"


@pytest.mark.parametrize("cmdline", ["x" * 4096, "é" * 2048], ids=["4096-ascii", "4096-utf8-bytes"])
def test_write_boot_area_refuses_long_cmdline(cmdline):
    """A command line over 4095 bytes (counted in UTF-8) is refused with ConfigError, nothing written."""
    mem = TopMemory(256 * MIB)
    with pytest.raises(ConfigError, match="4095"):
        boot.write_boot_area(mem, boot_area=256 * MIB - 0xB000, cmdline=cmdline, boot_info=b"")
    assert mem.data == bytes(MIB)
