"""The free-page-hint ABI (docs/abi.md): registration through the device's ports,
every refusal reason, the bitmap as the VMM reads it, and migrated state.

Guest RAM is a real GuestMemory (anonymous mmap); no /dev/kvm.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import logging

from kvmlite import abi
from kvmlite.log import log
from kvmlite.devices import FreePageHint, IoBus
from kvmlite.vstate.memory import GuestMemory

RAM = 16 << 20
PAGE = 4096
NPAGES = RAM // PAGE
PORT = 0x520
HDR = 0x200000           # header GPA used by most tests
BITMAP = 0x201000        # bitmap GPA used by most tests

# docs/abi.md header table: (offset, format)
FIELDS = {"magic": (0x00, "<I"), "version": (0x04, "<H"), "header_size": (0x06, "<H"),
          "page_size": (0x08, "<I"), "flags": (0x0C, "<I"), "base_gpa": (0x10, "<Q"),
          "npages": (0x18, "<Q"), "bitmap_gpa": (0x20, "<Q"), "bitmap_size": (0x28, "<Q"),
          "free_pages": (0x30, "<Q"), "reserved": (0x38, "<Q")}


def header_bytes(**overrides) -> bytes:
    """A 64-byte header laid out by hand from docs/abi.md: whole RAM, bitmap at BITMAP."""
    f = {"magic": 0x48505246, "version": 1, "header_size": 64, "page_size": 4096, "flags": 0,
         "base_gpa": 0, "npages": NPAGES, "bitmap_gpa": BITMAP, "bitmap_size": NPAGES // 8,
         "free_pages": 0, "reserved": 0}
    f.update(overrides)
    raw = bytearray(64)
    for name, (off, fmt) in FIELDS.items():
        struct.pack_into(fmt, raw, off, f[name])
    return bytes(raw)


@pytest.fixture(scope="module")
def shared_mem():
    mem = GuestMemory(RAM)
    yield mem
    mem.close()


@pytest.fixture
def mem(shared_mem):
    shared_mem.zero(0, RAM)
    return shared_mem


class LogLines(logging.Handler):
    """What the VMM logged, as message strings."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class Guest:
    """The guest's side of the protocol: 32-bit port accesses at PORT, through an IoBus."""

    def __init__(self, mem):
        self.mem = mem
        self.capture = LogLines()
        self.log = self.capture.lines
        self.dev = FreePageHint(mem)
        self.bus = IoBus()
        self.bus.register(PORT, abi.PORT_COUNT, self.dev)

    def inl(self, off):
        return int.from_bytes(self.bus.read(PORT + off, 4), "little")

    def outl(self, off, value):
        self.bus.write(PORT + off, 4, value)

    def register(self, gpa: int) -> int:
        """docs/abi.md rule 1: REGION_LO, REGION_HI, COMMAND = 1, then read STATUS."""
        self.outl(0x04, gpa & 0xFFFFFFFF)
        self.outl(0x08, gpa >> 32)
        self.outl(0x0C, 1)
        return self.inl(0x0C)

    def set_free(self, pages, bitmap_gpa=BITMAP):
        """Set bit i (bit i % 8 of byte i // 8, LSB first) for each page index."""
        for i in pages:
            byte = self.mem.read(bitmap_gpa + i // 8, 1)[0]
            self.mem.write(bitmap_gpa + i // 8, bytes([byte | 1 << (i % 8)]))


@pytest.fixture
def guest(mem):
    g = Guest(mem)
    log.addHandler(g.capture)
    yield g
    log.removeHandler(g.capture)


# ---- the device's registers ------------------------------------------------------------------

def test_device_id_and_initial_status(guest):
    """ID reads 'FPH1' (0x31485046), STATUS 0 and HOST_EVENTS 0 before anything is registered."""
    assert guest.inl(0x00) == 0x31485046
    assert guest.inl(0x0C) == 0
    assert guest.inl(0x10) == 0
    assert guest.dev.free_mask() is None and guest.dev.count_free() == 0


def test_other_access_widths_ignored(guest):
    """Non-4-byte accesses read all ones and their writes are ignored."""
    assert guest.bus.read(PORT, 1) == b"\xff"
    assert guest.bus.read(PORT + 0x0C, 2) == b"\xff\xff"
    guest.bus.write(PORT + 0x04, 2, 0x1234)
    assert guest.inl(0x04) == 0


def test_region_registers_read_back(guest):
    """REGION_LO and REGION_HI read back as last written."""
    guest.outl(0x04, 0xDEADBEE8)
    guest.outl(0x08, 0x12)
    assert (guest.inl(0x04), guest.inl(0x08)) == (0xDEADBEE8, 0x12)


def test_host_stop_request_visible_to_guest(guest):
    """request_stop() sets HOST_EVENTS bit 0."""
    guest.dev.request_stop()
    assert guest.inl(0x10) & 1


# ---- a good registration ---------------------------------------------------------------------

def test_good_registration_and_free_mask(guest, mem):
    """A valid header registers (STATUS 1); free_mask marks exactly the pages whose bits the guest set."""
    mem.write(HDR, header_bytes())
    rng = np.random.default_rng(1)
    free = sorted(set(rng.integers(0, NPAGES, 700).tolist()) - {HDR // PAGE, BITMAP // PAGE})
    guest.set_free(free)
    assert guest.register(HDR) == 1
    assert guest.dev.registration == abi.Registration(HDR, 0, NPAGES, BITMAP)
    mask = guest.dev.free_mask()
    assert mask.shape == (NPAGES,) and mask.dtype == bool
    assert np.flatnonzero(mask).tolist() == free
    assert guest.dev.count_free() == len(free)
    assert guest.log == []


def test_bitmap_is_read_live(guest, mem):
    """Bits the guest sets or clears after registering show in the next free_mask()."""
    mem.write(HDR, header_bytes())
    assert guest.register(HDR) == 1
    assert guest.dev.count_free() == 0
    guest.set_free([10, 11, 4095])
    assert np.flatnonzero(guest.dev.free_mask()).tolist() == [10, 11, 4095]
    mem.write(BITMAP + 1, b"\x00")              # page 11 (byte 1, bit 3) and page 10 taken again
    assert np.flatnonzero(guest.dev.free_mask()).tolist() == [4095]


def test_header_and_bitmap_pages_never_free(guest, mem):
    """Bits set for the header's page and the bitmap's pages are ignored: those pages are always sent."""
    hdr = 0x300FF8          # header straddles pages 0x300 and 0x301
    bitmap = 0x402FF8       # 512-byte bitmap straddles pages 0x402 and 0x403
    mem.write(hdr, header_bytes(bitmap_gpa=bitmap))
    guest.set_free(range(NPAGES), bitmap_gpa=bitmap)
    assert guest.register(hdr) == 1
    mask = guest.dev.free_mask()
    assert not mask[[0x300, 0x301, 0x402, 0x403]].any()
    assert guest.dev.count_free() == NPAGES - 4
    assert guest.dev.always_sent_pages() == [(0x300, 2), (0x402, 2)]


def test_pages_outside_covered_range_never_free(guest, mem):
    """With base_gpa/npages covering only part of RAM, pages outside it are never free; bit i is page base+i."""
    base, n = 0x400000, 100
    mem.write(HDR, header_bytes(base_gpa=base, npages=n, bitmap_size=16))
    mem.write(BITMAP, b"\xff" * 16)          # 128 bits set: 28 of them past npages
    assert guest.register(HDR) == 1
    assert np.flatnonzero(guest.dev.free_mask()).tolist() == list(range(base // PAGE, base // PAGE + n))


def test_larger_header_size_accepted(guest, mem):
    """header_size above 64 is accepted (later versions append fields)."""
    mem.write(HDR, header_bytes(header_size=128))
    assert guest.register(HDR) == 1


def test_unregister(guest, mem):
    """COMMAND = 2 unregisters: STATUS 0, no free pages."""
    mem.write(HDR, header_bytes())
    guest.set_free([7])
    assert guest.register(HDR) == 1
    guest.outl(0x0C, 2)
    assert guest.inl(0x0C) == 0
    assert guest.dev.registration is None and guest.dev.free_mask() is None


def test_header_not_reread_after_registration(guest, mem):
    """A guest rewriting its header after REGISTER cannot move the VMM: the registered numbers stay in use."""
    mem.write(HDR, header_bytes())
    guest.set_free([5, 6])
    assert guest.register(HDR) == 1
    before = guest.dev.free_mask().copy()
    mem.write(HDR, header_bytes(base_gpa=0xFFFF_F000, npages=1 << 40, bitmap_gpa=RAM - 8,
                                bitmap_size=1 << 37, magic=0))
    assert guest.dev.registration == abi.Registration(HDR, 0, NPAGES, BITMAP)
    assert np.array_equal(guest.dev.free_mask(), before)
    assert guest.dev.save_state()["registration"] == {"region_gpa": HDR, "base_gpa": 0,
                                                      "npages": NPAGES, "bitmap_gpa": BITMAP}


# ---- refusals ----------------------------------------------------------------------------------

# (case, header GPA, header field overrides, reason from docs/abi.md's STATUS table)
REFUSALS = [
    ("misaligned header", HDR + 4, {}, 1),
    ("header crosses end of RAM", RAM - 32, {}, 1),
    ("header above RAM (REGION_HI)", 1 << 40, {}, 1),
    ("header at 2^64-8", (1 << 64) - 8, {}, 1),
    ("bad magic", HDR, {"magic": 0x48505247}, 2),
    ("version 0", HDR, {"version": 0}, 3),
    ("version 2", HDR, {"version": 2}, 3),
    ("page size 8192", HDR, {"page_size": 8192}, 4),
    ("flags set", HDR, {"flags": 1}, 4),
    ("header_size 63", HDR, {"header_size": 63}, 4),
    ("npages 0", HDR, {"npages": 0, "bitmap_size": 0}, 5),
    ("base_gpa not page aligned", HDR, {"base_gpa": 0x800}, 5),
    ("range past RAM", HDR, {"base_gpa": PAGE}, 5),
    ("range far past RAM", HDR, {"npages": 1 << 50, "bitmap_size": (1 << 50) // 8}, 5),
    ("bitmap past RAM", HDR, {"bitmap_gpa": RAM - 8}, 6),
    ("bitmap misaligned", HDR, {"bitmap_gpa": BITMAP + 4}, 6),
    ("bitmap overlaps header from above", HDR, {"bitmap_gpa": HDR + 56}, 6),
    ("bitmap overlaps header from below", HDR, {"bitmap_gpa": HDR - 8}, 6),
    ("bitmap_size too small", HDR, {"bitmap_size": NPAGES // 8 - 8}, 6),
    ("bitmap_size too large", HDR, {"bitmap_size": NPAGES // 8 + 8}, 6),
    ("bitmap_size not rounded to words", HDR, {"npages": 65, "bitmap_size": 9}, 6),
]


@pytest.mark.parametrize("case,gpa,fields,reason", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refusal_reasons(guest, mem, case, gpa, fields, reason):
    """Each bad registration reads STATUS 0x80000000 | the documented reason, registers nothing and logs why."""
    if 0 <= gpa and gpa + 64 <= RAM:
        mem.write(gpa, header_bytes(**fields))
    elif 0 <= gpa < RAM:
        mem.write(gpa, header_bytes(**fields)[:RAM - gpa])
    assert guest.register(gpa) == 0x80000000 | reason
    assert guest.dev.registration is None and guest.dev.free_mask() is None
    assert len(guest.log) == 1 and f"{gpa:#x}" in guest.log[0]
    assert abi.REASONS[reason] in guest.log[0]


def test_same_refusal_repeated_is_logged_once(guest, mem):
    """A guest repeating one bad REGISTER in a loop cannot flood the VMM's log; a different one is logged."""
    mem.write(HDR, header_bytes())
    for _ in range(100):
        assert guest.register(HDR + 4) == 0x80000001
        assert guest.register(HDR) == 1
    assert len(guest.log) == 1
    assert guest.register(HDR + 8) == 0x80000002     # no magic there
    assert len(guest.log) == 2


def test_readers_answer_for_the_registration_they_are_given(guest, mem):
    """A migration that read `registration` gets answers for that one even if the guest unregistered since."""
    mem.write(HDR, header_bytes())
    guest.set_free([9])
    assert guest.register(HDR) == 1
    reg = guest.dev.registration
    guest.outl(0x0C, 2)                       # the vCPU thread unregisters meanwhile
    assert guest.dev.free_mask() is None
    free = guest.dev.free_mask(reg)
    assert np.flatnonzero(free).tolist() == [9]
    assert guest.dev.hintable_mask(reg).sum() == NPAGES - 2   # all but the header's and bitmap's pages
    assert len(guest.dev.bitmap_words(reg)) == NPAGES // 64
    assert guest.dev.always_sent_pages(reg) == [(HDR // PAGE, 1), (BITMAP // PAGE, 1)]


def test_refusal_drops_earlier_registration(guest, mem):
    """A refused REGISTER after a good one leaves nothing registered (STATUS shows the refusal)."""
    mem.write(HDR, header_bytes())
    assert guest.register(HDR) == 1
    assert guest.register(HDR + 4) == 0x80000001
    assert guest.dev.registration is None


# ---- hostile headers ----------------------------------------------------------------------------

U64 = st.integers(0, (1 << 64) - 1)
ANY_GPA = st.one_of(st.integers(0, RAM // 8).map(lambda q: q * 8), st.integers(0, RAM + PAGE), U64)

# Per field: values near and far from valid ones.
MUTATIONS = {
    "magic": st.integers(0, (1 << 32) - 1),
    "version": st.integers(0, 0xFFFF),
    "header_size": st.integers(0, 0xFFFF),
    "page_size": st.sampled_from([0, 512, 4095, 8192, 1 << 21, (1 << 32) - 1]),
    "flags": st.integers(1, (1 << 32) - 1),
    "base_gpa": ANY_GPA,
    "npages": st.one_of(st.integers(0, NPAGES + 64), U64),
    "bitmap_gpa": ANY_GPA,
    "bitmap_size": st.one_of(st.integers(0, NPAGES // 8 + 64), U64),
    "free_pages": U64,
    "reserved": U64,
}


@st.composite
def hostile_header(draw):
    """A plausible header (random covered range and bitmap place), then 0-3 fields set to anything."""
    npages = draw(st.integers(1, NPAGES))
    f = {"magic": abi.HEADER_MAGIC, "version": 1, "header_size": 64, "page_size": 4096, "flags": 0,
         "base_gpa": draw(st.integers(0, NPAGES - npages)) * PAGE, "npages": npages,
         "bitmap_gpa": draw(st.integers(0, RAM // 8 - 1)) * 8, "bitmap_size": abi.bitmap_size(npages),
         "free_pages": 0, "reserved": 0}
    for name in draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=3)):
        f[name] = draw(MUTATIONS[name])
    return header_bytes(**f)


HEADER_GPA = st.one_of(st.integers(0, RAM // 64 - 1).map(lambda q: q * 64), ANY_GPA,
                       st.sampled_from([RAM - 64, RAM - 63, RAM - 8, RAM, (1 << 64) - 8]))


@given(data=st.one_of(hostile_header(), st.binary(min_size=64, max_size=64)), gpa=HEADER_GPA)
@settings(max_examples=400, deadline=None)
def test_hostile_header_registered_inside_ram_or_refused(shared_mem, data, gpa):
    """Any 64 bytes at any GPA give either a registration whose header, pages and bitmap lie in RAM, or a refusal."""
    if gpa + 64 <= RAM:
        shared_mem.write(gpa, data)
    g = Guest(shared_mem)
    status = g.register(gpa)
    reg = g.dev.registration
    if status == 1:
        assert reg is not None and reg.region_gpa == gpa
        assert gpa % 8 == 0 and gpa + 64 <= RAM
        assert reg.npages >= 1 and reg.base_gpa % PAGE == 0
        assert reg.base_gpa + reg.npages * PAGE <= RAM
        assert reg.bitmap_gpa % 8 == 0 and reg.bitmap_gpa + reg.bitmap_size <= RAM
        assert reg.bitmap_gpa + reg.bitmap_size <= gpa or gpa + 64 <= reg.bitmap_gpa
        assert g.dev.free_mask().shape == (NPAGES,)
    else:
        assert reg is None
        assert status & 0x80000000 and (status & 0x7FFFFFFF) in abi.REASONS


INTS = st.one_of(st.integers(-(1 << 70), 1 << 70), st.sampled_from([0, 8, PAGE, RAM - 8, RAM]),
                 st.booleans(), st.floats(allow_nan=True), st.none(), st.text(max_size=3))


@given(region=INTS, base=INTS, npages=INTS, bitmap=INTS)
@settings(max_examples=150, deadline=None)
def test_validate_numbers_inside_ram_or_registration_error(region, base, npages, bitmap):
    """validate_numbers on arbitrary values (negative, huge, bool, float, None) returns an in-RAM Registration or raises RegistrationError."""
    try:
        reg = abi.validate_numbers(region, base, npages, bitmap, RAM)
    except abi.RegistrationError as e:
        assert e.reason in abi.REASONS
        return
    assert all(type(v) is int for v in (region, base, npages, bitmap))
    assert reg.region_gpa + 64 <= RAM and reg.base_gpa + reg.npages * PAGE <= RAM
    assert reg.bitmap_gpa + reg.bitmap_size <= RAM and reg.npages >= 1


# ---- migrated state --------------------------------------------------------------------------

def test_state_round_trip(guest, mem):
    """save_state() → restore_state() on a VMM with the same RAM gives the same registration and free pages."""
    mem.write(HDR, header_bytes())
    guest.set_free([3, 4, 1000])
    assert guest.register(HDR) == 1
    state = guest.dev.save_state()
    dst = FreePageHint(mem)
    dst.restore_state(state)
    assert dst.registration == guest.dev.registration
    assert dst.io_read(0x0C, 4) == 1
    assert np.array_equal(dst.free_mask(), guest.dev.free_mask())


@pytest.mark.parametrize("bad", [
    {"npages": NPAGES + 1},
    {"npages": 1 << 60},
    {"base_gpa": RAM},
    {"bitmap_gpa": RAM - 8},
    {"region_gpa": RAM - 32},
    {"region_gpa": -8},
    {"npages": 0},
    {"bitmap_gpa": HDR + 8},
    {"npages": True},
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_restore_state_validates_numbers_against_ram(mem, bad):
    """A migrated registration whose numbers leave this VMM's RAM (or overlap) is refused with RegistrationError."""
    reg = {"region_gpa": HDR, "base_gpa": 0, "npages": NPAGES, "bitmap_gpa": BITMAP}
    reg.update(bad)
    state = {"region_lo": HDR, "region_hi": 0, "status": 1, "host_events": 0, "registration": reg}
    dev = FreePageHint(mem)
    with pytest.raises(abi.RegistrationError):
        dev.restore_state(state)
    assert issubclass(abi.RegistrationError, ValueError)


def test_restore_state_into_smaller_ram_refused(guest, mem):
    """State from a 16 MiB VM does not restore into an 8 MiB VM whose RAM the bitmap would leave."""
    mem.write(HDR, header_bytes())
    assert guest.register(HDR) == 1
    small = GuestMemory(8 << 20)
    try:
        with pytest.raises(abi.RegistrationError):
            FreePageHint(small).restore_state(guest.dev.save_state())
    finally:
        small.close()
