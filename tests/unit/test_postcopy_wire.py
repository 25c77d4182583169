"""Post-copy's part of the wire format (docs/wire-format.md, "Post-copy"): PAGESET in
the stream, the return path's REQUEST/DONE, NEED at recovery.  Round trips and hostile
peers; no /dev/kvm."""

from __future__ import annotations

import numpy as np
import pytest

from kvmlite.bitmap import mask_to_words, words_to_mask
from kvmlite.errors import StreamError
from kvmlite.migration import wire
from kvmlite.migration.wire import PageSet, ReturnPathDecoder, State, StreamDecoder
from tests.unit.test_wire import INFO, MEM_SIZE, PS, RAM, Builder, FakeSock, page_data

REGIONS = [(gpa, size) for gpa, size in RAM]
PC_INFO = {**INFO, "postcopy": True, "migration_id": bytes(range(16))}


def sets(seed: int = 1):
    """Random disjoint pending/free sets for each region of INFO: {gpa: (pending, free)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for gpa, size in REGIONS:
        n = size // PS
        pick = rng.integers(0, 3, n)           # 0 here, 1 pending, 2 free
        out[gpa] = (mask_to_words(pick == 1), mask_to_words(pick == 2), n)
    return out


def postcopy_stream(s=None, *, order=("pending", "free"), extra=None) -> bytes:
    s = s or sets()
    b = Builder(PC_INFO).pages(0, page_data(1, 3)).round(1)
    for gpa, (pending, free, n) in s.items():
        for kind in order:
            k, words = ((wire.PAGESET_PENDING, pending) if kind == "pending"
                        else (wire.PAGESET_FREE, free))
            b.struct(wire.pageset_record(k, gpa, n, words))
    if extra:
        b.struct(extra)
    return b.state().end().bytes()


def read_all(data: bytes, seed=None):
    dec = StreamDecoder(FakeSock(data, seed, max_chunk=7 if seed is not None else 1 << 30))
    dec.read_preamble()
    mem = memoryview(bytearray(MEM_SIZE))
    out = []
    while True:
        r = dec.next_record(lambda g, n: mem[g:g + n])
        out.append(r)
        if isinstance(r, wire.End):
            return dec, out


@pytest.mark.parametrize("seed", [None, 3, 4])
def test_pagesets_round_trip_and_mark_the_stream_post_copy(seed):
    """Both sets of every region come back bit for bit, in any split of the bytes;
    the decoder then says the stream switches to post-copy, and END still verifies."""
    s = sets()
    dec, recs = read_all(postcopy_stream(s), seed)
    got = [r for r in recs if isinstance(r, PageSet)]
    assert len(got) == 2 * len(REGIONS)
    for r in got:
        pending, free, n = s[r.gpa]
        assert r.npages == n
        assert np.array_equal(r.words, pending if r.kind == wire.PAGESET_PENDING else free)
    assert dec.postcopy and dec.ended
    assert isinstance(recs[-2], State)


def test_a_pre_copy_stream_is_not_post_copy():
    dec, _ = read_all(Builder().pages(0, page_data(1, 2)).state().end().bytes())
    assert not dec.postcopy


def test_a_flipped_bit_in_a_pageset_fails_the_checksum():
    """The sets are structure: a bit flipped on the wire would zero-fill a page the guest
    uses, so END's checksum covers them."""
    data = bytearray(postcopy_stream())
    pos = data.index(bytes([wire.REC_PAGESET, wire.PAGESET_FREE])) + 14   # first bitmap byte
    data[pos] ^= 0x01
    with pytest.raises(StreamError, match="checksum mismatch|both still to come and free"):
        read_all(bytes(data))


def test_a_page_both_pending_and_free_is_refused():
    s = sets()
    gpa = REGIONS[0][0]
    pending, free, n = s[gpa]
    both = pending.copy()
    s[gpa] = (pending, free | both, n)
    with pytest.raises(StreamError, match="both still to come and free"):
        read_all(postcopy_stream(s))


def test_a_set_missing_for_a_region_is_refused_at_state():
    s = sets()
    with pytest.raises(StreamError, match="no free PAGESET"):
        read_all(postcopy_stream(s, order=("pending",)))


def test_a_second_set_of_the_same_kind_is_refused():
    gpa, size = REGIONS[0]
    pending, _, n = sets()[gpa]
    with pytest.raises(StreamError, match="a second pending set"):
        read_all(postcopy_stream(extra=wire.pageset_record(wire.PAGESET_PENDING, gpa, n, pending)))


@pytest.mark.parametrize("gpa,npages,why", [
    (0, 63, "not a RAM region"),               # shorter than the region
    (PS, 63, "not a RAM region"),              # shifted
    (0x200000, 8, "not a RAM region"),         # no region there
])
def test_a_set_must_cover_exactly_one_region(gpa, npages, why):
    words = np.zeros((npages + 63) // 64, dtype=np.uint64)
    data = Builder(PC_INFO).struct(wire.pageset_record(wire.PAGESET_FREE, gpa, npages, words)).state().end().bytes()
    with pytest.raises(StreamError, match=why):
        read_all(data)


def test_bits_past_the_region_are_refused():
    gpa, size = REGIONS[1]
    n = size // PS                         # 32 pages: one word, bits 32.. must be 0
    raw = bytearray(wire.pageset_record(wire.PAGESET_FREE, gpa, n, np.zeros(1, np.uint64)))
    raw[14 + 5] = 0x80                     # bit 47
    data = Builder(PC_INFO).struct(bytes(raw)).state().end().bytes()
    with pytest.raises(StreamError, match="past the region's last page"):
        read_all(data)
    with pytest.raises(ValueError):
        wire.pageset_record(wire.PAGESET_FREE, gpa, n, np.array([1 << 40], dtype=np.uint64))


def test_pages_after_a_pageset_are_refused():
    """The sets describe the switch: no page may be sent in the stream after them."""
    gpa, size = REGIONS[0]
    b = Builder(PC_INFO).struct(wire.pageset_record(wire.PAGESET_FREE, gpa, size // PS,
                                             np.zeros(size // PS // 64, np.uint64)))
    b.pages(0, page_data(2, 1))
    with pytest.raises(StreamError, match="follows a PAGESET record"):
        read_all(b.state().end().bytes())


def test_unknown_pageset_kind_is_refused():
    raw = bytearray(wire.pageset_record(wire.PAGESET_FREE, 0, 64, np.zeros(1, np.uint64)))
    raw[1] = 9
    with pytest.raises(StreamError, match="unknown kind 9"):
        read_all(Builder(PC_INFO).struct(bytes(raw)).state().end().bytes())


# ---- the return path ------------------------------------------------------------------

def test_return_path_records_come_back_whatever_the_split():
    stream = (wire.request_record(5 * PS) + wire.request_record(0x100000, 3)
              + wire.done_record(77))
    for cut in range(len(stream) + 1):
        dec = ReturnPathDecoder(REGIONS)
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert got == [wire.Request(5 * PS, 1), wire.Request(0x100000, 3), wire.Done(77)]
        assert dec.done


@pytest.mark.parametrize("raw,why", [
    (wire._RUN.pack(wire.REC_REQUEST, 64 * PS, 1), "not a run inside RAM"),       # past region 0
    (wire._RUN.pack(wire.REC_REQUEST, 63 * PS, 2), "not a run inside RAM"),       # straddles
    (wire._RUN.pack(wire.REC_REQUEST, 5 * PS + 1, 1), "not a run inside RAM"),    # unaligned
    (wire._RUN.pack(wire.REC_REQUEST, 0, 0), "not a run inside RAM"),
    (b"\x00" * 13, "unknown record type 0x00"),
    (wire.done_record(1) + wire.request_record(0), "after DONE"),
])
def test_a_hostile_return_path_is_refused(raw, why):
    with pytest.raises(StreamError, match=why):
        ReturnPathDecoder(REGIONS).feed(raw)


def test_need_round_trips_and_is_checked():
    n = 64
    need = np.zeros(n, bool)
    need[[0, 5, 63]] = True
    sock = FakeSock(wire.need_record(0, n, mask_to_words(need)), seed=1, max_chunk=3)
    gpa, npages, words = wire.read_need(sock, REGIONS)
    assert (gpa, npages) == (0, n) and np.array_equal(words_to_mask(words, n), need)
    with pytest.raises(StreamError, match="not a RAM region"):
        wire.read_need(FakeSock(wire.need_record(0, 32, np.zeros(1, np.uint64))), REGIONS)
    with pytest.raises(StreamError, match="expected a NEED record"):
        wire.read_need(FakeSock(wire.done_record(1) + bytes(8)), REGIONS)


def test_postcopy_end_checksum_folds_its_own_head():
    rec = wire.postcopy_end_record(3, 4, 0x1234)
    import zlib
    assert rec[0] == wire.REC_POSTCOPY_END
    assert int.from_bytes(rec[17:], "little") == zlib.crc32(rec[:17], 0x1234)


def test_a_pageset_in_a_stream_that_did_not_announce_post_copy_is_refused():
    data = Builder().struct(wire.pageset_record(wire.PAGESET_FREE, 0, MEM_SIZE // PS,
                                                np.zeros((MEM_SIZE // PS + 63) // 64, np.uint64)))
    with pytest.raises(StreamError, match="does not announce post-copy"):
        read_all(data.state().end().bytes())


@pytest.mark.parametrize("info, why", [
    ({"postcopy": True}, "needs a migration_id"),
    ({"postcopy": 1, "migration_id": bytes(16)}, "postcopy must be a boolean"),
    ({"postcopy": True, "migration_id": b"short"}, "migration_id must be 16 bytes"),
])
def test_a_post_copy_header_is_checked(info, why):
    with pytest.raises(StreamError, match=why):
        wire.validate_info({**INFO, **info})


def test_need_carries_a_mac_on_a_keyed_link():
    keys = wire.StreamKeys.derive(b"k" * 32, b"a", b"b")
    n = MEM_SIZE // PS
    words = mask_to_words(np.arange(n) % 5 == 0)
    rec = wire.need_record(0, n, words, keys)
    gpa, npages, got = wire.read_need(FakeSock(rec, 2, max_chunk=5), [(0, MEM_SIZE)], keys)
    assert np.array_equal(got, words)
    bad = bytearray(rec)
    bad[20] ^= 1
    with pytest.raises(StreamError, match="MAC does not match"):
        wire.read_need(FakeSock(bytes(bad)), [(0, MEM_SIZE)], keys)
    other = wire.StreamKeys.derive(b"k" * 32, b"a", b"c")
    with pytest.raises(StreamError, match="MAC does not match"):
        wire.read_need(FakeSock(rec), [(0, MEM_SIZE)], other)
