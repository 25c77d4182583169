"""Local migration's pieces without KVM: bit ranges and runs, the memfd (adopted,
refused, its extents), the punch of free pages, and a descriptor over a unix socket."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmlite import abi
from kvmlite.bitmap import clear_bit_range, list_runs, set_bit_range, words_to_mask
from kvmlite.devices.fph import FreePageHint
from kvmlite.errors import KvmliteError, StreamError
from kvmlite.migration import local, transport
from kvmlite.migration.local import allocated_words, bit_runs, data_words, punch_free_pages, set_page_runs
from kvmlite.vstate.memory import PAGE_SIZE, GuestMemory

RAM = 16 << 20
NPAGES = RAM // PAGE_SIZE
REGION = 0x10000                      # header GPA; the bitmap follows it


def bits_of(words: np.ndarray) -> np.ndarray:
    return words_to_mask(words, len(words) * 64)


@given(st.lists(st.tuples(st.integers(0, 640), st.integers(0, 640)), max_size=8))
@settings(max_examples=300, deadline=None)
def test_bit_ranges_and_runs_agree_with_a_plain_bool_array(ranges):
    """set/clear_bit_range and bit_runs match the same operations on one bool per bit,
    and the runs are maximal (no two touch)."""
    words = np.zeros(10, dtype=np.uint64)
    ref = np.zeros(640, dtype=bool)
    for i, (a, b) in enumerate(ranges):
        lo, hi = min(a, b), max(a, b)
        (set_bit_range if i % 3 else clear_bit_range)(words, lo, hi)
        ref[lo:hi] = bool(i % 3)
    assert (bits_of(words) == ref).all()
    starts, lengths = bit_runs(words)
    got = np.zeros(640, dtype=bool)
    for s, n in zip(starts.tolist(), lengths.tolist()):
        assert n > 0 and not got[s:s + n].any()
        got[s:s + n] = True
    assert (got == ref).all()
    assert all(starts[i] + lengths[i] < starts[i + 1] for i in range(len(starts) - 1))


def test_bit_runs_join_whole_words_and_mixed_words():
    """Long runs of all-ones words come back as one run each, joined with the
    free bits of the mixed words at their edges."""
    words = np.full(1 << 16, np.uint64(0xFFFF_FFFF_FFFF_FFFF), dtype=np.uint64)   # 16 GiB of pages
    words[100] = np.uint64(0xFFFF_0000_0000_0000)      # free: the top 16 bits, joining word 101
    words[200] = np.uint64(0xF0)
    starts, lengths = bit_runs(words)
    assert starts.tolist() == [0, 100 * 64 + 48, 200 * 64 + 4, 201 * 64]
    assert lengths.tolist() == [100 * 64, 16 + 99 * 64, 4, ((1 << 16) - 201) * 64]


def test_bit_runs_of_gathered_words_name_the_true_pages():
    words = np.array([0x3, 0xFFFF_FFFF_FFFF_FFFF, 0x1], dtype=np.uint64)
    starts, lengths = bit_runs(words, np.array([5, 9, 10]))
    assert starts.tolist() == [5 * 64, 9 * 64] and lengths.tolist() == [2, 65]


@given(st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 300)), max_size=12))
@settings(max_examples=100, deadline=None)
def test_set_page_runs_matches_set_bit_range(runs):
    """The vectorised many-runs version sets exactly what one set_bit_range per run sets."""
    a = np.zeros(80, dtype=np.uint64)
    b = np.zeros(80, dtype=np.uint64)
    for s, n in runs:
        set_bit_range(a, s, min(s + n, 80 * 64))
    if runs:
        st_ = np.array([s for s, _ in runs], dtype=np.int64)
        ln = np.array([min(s + n, 80 * 64) - s for s, n in runs], dtype=np.int64)
        set_page_runs(b, st_, ln)
    assert (a == b).all()


def register(mem: GuestMemory, base_page: int, npages: int, free: np.ndarray) -> FreePageHint:
    """Register a bitmap as the guest does (header laid out by docs/abi.md), `free` one bool a page."""
    bitmap_gpa = REGION + abi.HEADER_MIN_SIZE
    size = abi.bitmap_size(npages)
    mem.write(REGION, abi.HEADER.pack(abi.HEADER_MAGIC, abi.HEADER_VERSION, abi.HEADER_MIN_SIZE,
                                      PAGE_SIZE, 0, base_page * PAGE_SIZE, npages, bitmap_gpa, size, 0, 0))
    bits = np.zeros(size * 8, dtype=bool)
    bits[:npages] = free
    mem.write(bitmap_gpa, np.packbits(bits, bitorder="little").tobytes())
    fph = FreePageHint(mem)
    fph.io_write(abi.REG_REGION_LO, 4, REGION)
    fph.io_write(abi.REG_REGION_HI, 4, 0)
    fph.io_write(abi.REG_COMMAND_STATUS, 4, abi.CMD_REGISTER)
    assert fph.registration is not None, fph.refusal
    return fph


@pytest.mark.parametrize("base_page", [0, 64, 100])     # aligned to a RAM word, and not
def test_the_free_view_built_by_ranges_is_the_device_free_mask(base_page):
    """free_words(w0, w1) (its hintable words now built a range at a time) says exactly
    what free_mask says: free only inside the registered range, never the header's
    or the bitmap's pages."""
    mem = GuestMemory(RAM)
    rng = np.random.default_rng(base_page)
    npages = NPAGES - base_page - 7
    fph = register(mem, base_page, npages, rng.random(npages) < 0.6)
    view = fph.free_view()
    want = fph.free_mask()
    for w0, w1 in ((0, NPAGES // 64), (3, 17), (NPAGES // 64 - 2, NPAGES // 64)):
        assert (bits_of(view.free_words(w0, w1)) == want[w0 * 64:w1 * 64]).all()
    assert not bits_of(view.free_words(0, NPAGES // 64))[REGION // PAGE_SIZE]   # the header's page
    mem.close()


def test_punch_gives_back_only_free_allocated_pages_and_keeps_the_rest():
    """Pages the bitmap calls free and the memfd holds lose their memory and read zero;
    pages in use keep their bytes; holes stay holes (nothing to punch there)."""
    mem = GuestMemory(RAM, backend="memfd")
    free = np.zeros(NPAGES, dtype=bool)
    free[1000:3000] = True                    # free: half of them hold stale data
    used = [20, 999, 3000, 3500]
    for p in used + list(range(1000, 2000)):
        mem.write(p * PAGE_SIZE, b"data %d" % p)
    fph = register(mem, 0, NPAGES, free)
    before = mem.allocated_bytes()
    assert bits_of(data_words(mem))[1000:2000].all()
    r = punch_free_pages(mem, fph.free_view())
    assert r["pages_punched"] == 1000 and r["ranges"] == 1
    assert before - mem.allocated_bytes() == 1000 * PAGE_SIZE == r["allocated_before"] - r["allocated_after"]
    for p in used:
        assert mem.read(p * PAGE_SIZE, len(b"data %d" % p)) == b"data %d" % p
    assert mem.zero_pages(1000, 1000).all()
    mem.close()


def test_a_punched_page_reads_zero_in_every_mapping_of_the_memfd():
    """The destination maps the source's memfd: a page punched through one mapping
    reads zero through the other, the host's memory given back once."""
    src = GuestMemory(RAM, backend="memfd")
    src.write(5 * PAGE_SIZE, b"stale")
    dst = GuestMemory.from_fd(os.dup(src.fd), RAM)
    assert dst.read(5 * PAGE_SIZE, 5) == b"stale"
    dst.punch_pages(5, 1)
    assert src.allocated_bytes() == 0
    assert src.read(5 * PAGE_SIZE, 5) == bytes(5)     # (a read of a shmem hole backs it again)
    dst.close()
    src.close()


def test_a_zero_budget_punches_nothing_and_says_what_is_left():
    """The downtime budget is checked before each piece: with none left nothing is
    punched, and every candidate page is reported as left allocated."""
    mem = GuestMemory(RAM, backend="memfd")
    free = np.zeros(NPAGES, dtype=bool)
    free[2000:2600] = True
    mem.write(2000 * PAGE_SIZE, b"s" * 600 * PAGE_SIZE)
    fph = register(mem, 0, NPAGES, free)
    r = punch_free_pages(mem, fph.free_view(), budget_ms=0)
    assert r["pages_punched"] == 0 and r["pages_left"] == 600
    assert r["allocated_after"] == r["allocated_before"]
    r = punch_free_pages(mem, fph.free_view(), budget_ms=None)
    assert r["pages_punched"] == 600 and r["pages_left"] == 0
    mem.close()


@pytest.mark.parametrize("scattered", [False, True])
def test_punch_asks_the_view_per_window_or_whole_and_gets_the_same(scattered):
    """A RAM whose allocated pages lie in few runs of words is asked window by
    window, a fragmented one (more than MAX_WINDOWS runs) in one call: the free
    allocated pages go, the others stay, whichever way."""
    ram = 64 << 20
    npages = ram // PAGE_SIZE
    mem = GuestMemory(ram, backend="memfd")
    pages = np.arange(200, npages, 128) if scattered else np.arange(1000, 2500)   # every other word
    for p in pages.tolist():
        mem.write(p * PAGE_SIZE, b"z")
    assert (len(list_runs(allocated_words(mem)[0])[0]) > local.MAX_WINDOWS) == scattered
    free = np.zeros(npages, dtype=bool)
    free[pages[::2]] = True                        # half of the allocated pages are free
    free[3300:3390] = True                         # free holes (between allocated pages): nothing to punch
    fph = register(mem, 0, npages, free)
    r = punch_free_pages(mem, fph.free_view())
    assert r["pages_punched"] == len(pages[::2]) and r["pages_left"] == 0
    backed = mem.backed_pages(0, npages)
    assert not backed[pages[::2]].any() and backed[pages[1::2]].all()
    mem.close()


def test_a_memfd_is_adopted_only_whole_and_sealed():
    """from_fd refuses what is not a memfd, a memfd of another size, and one whose
    size another process could still change; each time it closes the descriptor."""
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(KvmliteError, match="not a memfd"):
        GuestMemory.from_fd(r, RAM)
    with pytest.raises(OSError):
        os.fstat(r)                                   # closed by the refusal
    other = GuestMemory(RAM // 2, backend="memfd")
    with pytest.raises(KvmliteError, match=f"not the {RAM} of the stream's RAM"):
        GuestMemory.from_fd(os.dup(other.fd), RAM)
    other.close()
    loose = os.memfd_create("loose", os.MFD_ALLOW_SEALING)
    os.ftruncate(loose, RAM)
    with pytest.raises(KvmliteError, match="not sealed"):
        GuestMemory.from_fd(loose, RAM)


def test_one_descriptor_crosses_a_unix_socket_and_a_second_is_refused():
    """UnixSink.send_fd attaches the memfd to the first byte; FdReceiver keeps it for
    take_fd, and refuses a peer that sends more than one."""
    a, b = socket.socketpair()
    mem = GuestMemory(RAM, backend="memfd")
    mem.write(0, b"shared")
    transport.UnixSink(a).send_fd(b"hello", mem.fd)
    rx = transport.FdReceiver(b)
    buf = bytearray(5)
    assert rx.recv_into(buf, 5) == 5 and buf == b"hello"
    fd = rx.take_fd()
    assert fd is not None and GuestMemory.from_fd(fd, RAM).read(0, 6) == b"shared"
    transport.UnixSink(a).send_fd(b"x", mem.fd)
    transport.UnixSink(a).send_fd(b"y", mem.fd)
    with pytest.raises(StreamError, match="more than 1 descriptor"):
        rx.recv_into(bytearray(2), 2)
        rx.recv_into(bytearray(2), 2)
    assert rx.fds == []
    rx.close()
    a.close()
    mem.close()
