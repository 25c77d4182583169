"""The post-copy machinery without a VM: kvmlite._postcopy's threads on plain memory.

A source GuestMemory served by PostcopySender, a destination GuestMemory under
PostcopyIncoming, a loopback TCP connection between them, and a thread that
touches destination pages the way a vCPU would (one byte, without the GIL).
Needs userfaultfd (root or /dev/userfaultfd), not /dev/kvm.
"""

from __future__ import annotations

import socket
import struct
import threading
import zlib

import numpy as np
import pytest

from kvmlite._postcopy import ffi, lib
from kvmlite.errors import PostcopyLinkError, UserfaultError
from kvmlite.migration import transport, wire
from kvmlite.bitmap import mask_to_words, words_to_mask
from kvmlite.migration.postcopy import PostcopyIncoming, PostcopySender, switch_sets
from kvmlite.vstate.dirtylog import BitmapLog
from kvmlite.vstate.memory import GuestMemory
from kvmlite.vstate.uffd import Userfault

PS = 4096
NPAGES = 2048                                   # 8 MiB
HERE, PENDING, FREE = 0, 1, 2


def _uffd_problem() -> str | None:
    try:
        Userfault().close()
    except UserfaultError as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(_uffd_problem() is not None, reason=f"{_uffd_problem()}")


def pattern(page: int) -> bytes:
    return struct.pack("<Q", page * 0x9E3779B97F4A7C15 & (1 << 64) - 1) * 512


def kinds(seed=1) -> np.ndarray:
    """Per page: here already (as if sent by pre-copy), still to come, or free at the switch."""
    k = np.random.default_rng(seed).choice([HERE, PENDING, FREE], NPAGES, p=[0.2, 0.5, 0.3])
    k[:3] = [HERE, PENDING, FREE]
    return k


class Pair:
    """Source and destination memory, a loopback connection, sender and incoming."""

    def __init__(self, seed=1, *, stale=True, push=True, timeout=5.0, zero_pages=(), keys=None,
                 seq0=0):
        self.kind = kinds(seed)
        self.keys, self.seq0 = keys, seq0
        self.src = GuestMemory(NPAGES * PS)
        self.dst = GuestMemory(NPAGES * PS)
        for p in range(NPAGES):
            if p in zero_pages:
                continue
            self.src.write(p * PS, pattern(p))
            if self.kind[p] == HERE:
                self.dst.write(p * PS, pattern(p))
            elif self.kind[p] == PENDING and stale and p % 2:
                self.dst.write(p * PS, b"\xee" * PS)          # a stale pre-copy copy
        self.pending = mask_to_words(self.kind == PENDING)
        self.free = mask_to_words(self.kind == FREE)
        present = self.kind == HERE
        if stale:
            present = present | ((self.kind == PENDING) & (np.arange(NPAGES) % 2 == 1))
        self.inc = PostcopyIncoming(self.dst, self.pending, self.free, present=present,
                                    timeout=timeout, integrity=keys is not None)
        self.inc.start()
        self.push = push
        self.timeout = timeout
        self.sender = None
        self.connect()

    def connect(self):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        self.d_sock = socket.create_connection(srv.getsockname())
        self.s_sock, _ = srv.accept()
        srv.close()
        for s in (self.d_sock, self.s_sock):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sink = transport.SocketSink(self.s_sock, self.keys)
        if self.sender is None:
            self.sender = PostcopySender(self.src, sink, self.pending, self.free, push=self.push,
                                         timeout=self.timeout, seq0=self.seq0)
        return sink

    def attach(self, keys="same"):
        self.inc.attach(self.d_sock, self.keys if keys == "same" else keys, self.seq0)

    def run_sender(self):
        out = {}

        def go():
            try:
                out["stats"] = self.sender.run()
            except Exception as e:       # noqa: BLE001 - handed to the test
                out["error"] = e
        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t, out

    def touch(self, page: int) -> None:
        lib.kvmlite_touch(ffi.cast("void *", self.dst.host_addr + page * PS), 1, PS)

    def close(self):
        self.inc.close()
        for s in (self.d_sock, self.s_sock):
            s.close()


def test_every_page_arrives_and_free_pages_are_never_requested():
    """Touch every page in random order while the push runs.  Afterwards: every page
    still to come holds the source's data (the stale copies are gone), every page that
    was here is untouched, every free page reads zero, and no free page was ever asked
    for: the destination resolved each locally, and the source saw no request for one."""
    pair = Pair()
    pair.inc.attach(pair.d_sock)
    t, out = pair.run_sender()
    order = np.random.default_rng(2).permutation(NPAGES)
    for p in order.tolist():
        pair.touch(p)
    assert pair.inc.wait(10) == "done", pair.inc.error
    t.join(10)
    assert "error" not in out, out
    src, inc = out["stats"], pair.inc.stats()
    for p in range(NPAGES):
        got = pair.dst.read(p * PS, PS)
        if pair.kind[p] == FREE:
            assert got == bytes(PS), p
        else:
            assert got == pattern(p), p
    nfree = int((pair.kind == FREE).sum())
    assert inc.faults_zero_free == nfree                  # each free page: one local fault
    assert src.requests_for_free == 0 and src.requests_not_pending == 0
    assert inc.faults_remote == src.requests              # what one side asked, the other saw
    assert src.pages_pushed + src.pages_on_request == src.pages_pending == int((pair.kind == PENDING).sum())
    assert inc.pages_left == 0 and inc.duplicates == 0
    # every fault event is accounted for, by the time its thread is back
    assert inc.faults == (inc.faults_remote + inc.faults_zero_free + inc.faults_zero_other
                          + inc.faults_already_arrived + inc.faults_joined)
    assert inc.faults_outside_ram == 0
    counts = pair.inc.page_counts()
    assert counts["pushed"] + counts["by fault"] == src.pages_pending
    assert counts["free, zero page here"] == nfree
    pair.inc.finish()
    pair.close()


def test_requests_only_every_touched_page_comes_by_request():
    """Without the push, a touched page still to come arrives only because its fault
    asked for it: the remote-fault path on its own."""
    pair = Pair(seed=3, push=False)
    pair.inc.attach(pair.d_sock)
    t, out = pair.run_sender()
    pending = np.flatnonzero(pair.kind == PENDING)
    for p in pending.tolist():
        pair.touch(p)
    assert pair.inc.wait(10) == "done", pair.inc.error
    t.join(10)
    src, inc = out["stats"], pair.inc.stats()
    assert src.pages_pushed == 0 and src.pages_on_request == len(pending)
    assert inc.faults_remote == len(pending) and inc.remote_latency_us["n"] == len(pending)
    assert all(pair.dst.read(p * PS, PS) == pattern(p) for p in pending.tolist())
    pair.close()


def test_all_zero_pages_travel_as_zero_records():
    zeros = {1, 7, 8}
    pair = Pair(seed=1, zero_pages=zeros)
    pair.inc.attach(pair.d_sock)
    t, out = pair.run_sender()
    assert pair.inc.wait(10) == "done", pair.inc.error
    t.join(10)
    expect = sum(1 for p in zeros if pair.kind[p] == PENDING)
    assert out["stats"].zero_pages == expect == pair.inc.stats().zero_received
    for p in zeros:
        if pair.kind[p] == PENDING:
            assert pair.dst.read(p * PS, PS) == bytes(PS)
    pair.close()


def test_a_broken_link_pauses_both_halves_and_resume_sends_only_what_is_needed():
    """Cut the link mid-push: both sides report it; the destination keeps resolving
    free pages locally meanwhile; NEED lists exactly the pages not here yet, the source
    sends those on the new connection, and every page ends up right."""
    pair = Pair(seed=5, push=False)
    pair.inc.attach(pair.d_sock)
    t, out = pair.run_sender()
    pending = np.flatnonzero(pair.kind == PENDING)
    first = pending[:100]
    for p in first.tolist():
        pair.touch(p)
    pair.sender.cut()
    t.join(10)
    assert isinstance(out.get("error"), PostcopyLinkError)
    assert pair.inc.wait(10) == "broken"
    free_page = int(np.flatnonzero(pair.kind == FREE)[-1])
    pair.touch(free_page)                                     # no link needed for this one
    assert pair.dst.read(free_page * PS, PS) == bytes(PS)
    need = words_to_mask(pair.inc.need(), NPAGES)
    assert np.array_equal(need, (pair.kind == PENDING) & ~np.isin(np.arange(NPAGES), first))
    # recovery: a new connection, NEED, the rest
    pair.d_sock.close()
    pair.s_sock.close()
    sink = pair.connect()
    pair.sender.resume(sink, pair.inc.need())
    pair.sender.push = True
    pair.inc.attach(pair.d_sock)
    t, out = pair.run_sender()
    assert pair.inc.wait(10) == "done", pair.inc.error
    t.join(10)
    st = out["stats"]
    assert st.connections == 2 and st.pages_resent == 0
    assert st.pages_on_request + st.pages_pushed == len(pending)
    assert all(pair.dst.read(p * PS, PS) == pattern(p) for p in pending.tolist())
    pair.close()


def test_resume_refuses_a_need_beyond_what_was_to_come():
    pair = Pair(seed=6)
    bogus = mask_to_words(pair.kind == FREE)
    with pytest.raises(Exception, match="not still to come"):
        pair.sender.resume(transport.SocketSink(pair.s_sock), bogus)
    pair.close()


# ---- a hostile source: the C receive thread refuses, the link counts as broken ---------

def _feed(records: list[bytes], seed=7) -> PostcopyIncoming:
    pair = Pair(seed=seed, stale=False)
    pair.inc.attach(pair.d_sock)
    pair.s_sock.sendall(b"".join(records))
    state = pair.inc.wait(5)
    return pair, state


def _pages(page: int, n: int = 1) -> bytes:
    return wire.pages_header(page * PS, n) + b"".join(pattern(page + i) for i in range(n))


def test_a_page_that_was_not_still_to_come_is_refused():
    k = kinds(7)
    free_page = int(np.flatnonzero(k == FREE)[0])
    pair, state = _feed([_pages(free_page)])
    assert state == "broken"
    assert "was not still to come at the switch" in pair.inc.error
    assert pair.inc.stats().pages_received == 0
    pair.close()


@pytest.mark.parametrize("make,why", [
    (lambda pend: wire._RUN.pack(wire.REC_PAGES, NPAGES * PS, 1), "not a run inside RAM"),
    (lambda pend: wire._RUN.pack(wire.REC_ZERO, pend * PS + 5, 1), "not a run inside RAM"),
    (lambda pend: wire._RUN.pack(wire.REC_PAGES, pend * PS, 0), "not a run inside RAM"),
    (lambda pend: b"\x99" * 13, "unknown record type 0x99"),
    (lambda pend: wire.postcopy_end_record(0, 0, 0), "still to come"),
    (lambda pend: _pages(pend) + wire.postcopy_end_record(1, 0, 12345), "checksum mismatch"),
    (lambda pend: _pages(pend) + wire.postcopy_end_record(
        2, 0, zlib.crc32(wire.pages_header(pend * PS, 1))), "counts 2 pages"),
])
def test_a_hostile_post_copy_stream_is_refused(make, why):
    k = kinds(7)
    pend = int(np.flatnonzero(k == PENDING)[0])
    pair, state = _feed([make(pend)])
    assert state == "broken"
    assert why in pair.inc.error, pair.inc.error
    pair.close()


def test_a_page_sent_twice_keeps_the_first_copy():
    """After a recovery a page may come again; the copy that arrived first stays."""
    k = kinds(7)
    pend = int(np.flatnonzero(k == PENDING)[0])
    second = wire.pages_header(pend * PS, 1) + b"\x55" * PS
    pair, state = _feed([_pages(pend), second])
    pair.inc.wait(0.5)
    st = pair.inc.stats()
    assert st.pages_received == 1 and st.duplicates == 1
    assert pair.dst.read(pend * PS, PS) == pattern(pend)
    pair.close()


# ---- the switch's order ------------------------------------------------------------------

class FakeVm:
    """Records the order of dirty-log calls; pages 0..9 dirty, page 3 free."""

    manual_protect = True

    def __init__(self, log):
        self.log = log

    def get_dirty_log(self, slot):
        self.log.append("fetch")
        w = np.zeros(2, dtype=np.uint64)
        w[0] = (1 << 10) - 1
        return w

    def clear_dirty_log(self, slot, first, words):
        self.log.append(("clear", first, int(words[0])))


def test_switch_fetches_the_dirty_log_before_it_reads_the_free_bits_and_clears_nothing():
    """Claim 2 at the switch: fetch the dirty log, *then* read the free bits.  No
    clear: the guest never runs on this side again under this log."""
    log = []

    def free_words(w0, w1):
        log.append("free")
        out = np.zeros(w1 - w0, dtype=np.uint64)
        out[0] = (1 << 3) | (1 << 20)          # page 3 dirty and free, page 20 clean and free
        return out
    dirty = np.zeros(2, dtype=np.uint64)
    dirty[1] = 1                                # page 64: not sent yet (from pre-copy)
    pending, free = switch_sets(BitmapLog(FakeVm(log)), dirty, free_words)
    assert log == ["fetch", "free"]
    assert int(pending[0]) == ((1 << 10) - 1) & ~(1 << 3) and int(pending[1]) == 1
    assert int(free[0]) == (1 << 3) | (1 << 20)
    assert not dirty.any()


def test_switch_without_a_bitmap_sends_every_dirty_page():
    dirty = np.full(2, np.uint64(0xFFFFFFFFFFFFFFFF))
    pending, free = switch_sets(BitmapLog(FakeVm([])), dirty, lambda w0, w1: None)
    assert int(np.bitwise_count(pending).sum()) == 128 and not free.any()


# ---- what the destination drops at the switch -------------------------------------------

def test_discard_runs_drop_every_stale_copy_and_nothing_the_guest_uses():
    """Runs may take in free and absent pages to stay long, but never a page here
    with data in use, and never miss a page still to come that is present."""
    from kvmlite.migration.postcopy import discard_runs
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 300))
        k = rng.integers(0, 4, n)                       # 0 in use, 1 to come, 2 free, 3 absent
        pend, free = k == 1, k == 2
        present = ((k != 3) & (rng.random(n) < 0.8)) | (k == 0)
        # None: what the destination passes when its RAM was pre-faulted (--memory):
        # any page may be here, an absent one included
        for known in (present, None):
            starts, lengths = discard_runs(pend, free, known)
            cover = np.zeros(n, dtype=int)
            for s, l in zip(starts.tolist(), lengths.tolist()):
                cover[s:s + l] += 1
            assert cover.max(initial=0) <= 1                 # runs do not overlap
            assert (cover[pend & (present if known is not None else True)] == 1).all()
            assert (cover[k == 0] == 0).all()
            if known is None:
                assert (cover[k == 3] == 0).all()            # absent here means unknown: kept
            assert len(starts) <= max(int(pend.sum()), 0)


def test_discard_runs_merge_across_free_pages():
    """A churned guest: pages to come scattered among free ones make one run."""
    from kvmlite.migration.postcopy import discard_runs
    k = np.array([1, 2, 1, 2, 2, 1, 0, 1, 2, 1])
    starts, lengths = discard_runs(k == 1, k == 2, np.ones(len(k), bool))
    assert starts.tolist() == [0, 7] and lengths.tolist() == [6, 3]


KEYS = wire.StreamKeys.derive(b"a key both sides hold, 32 bytes", b"n" * 32, b"s" * 32)


def test_with_integrity_every_record_is_tagged_and_checked():
    """A keyed link: every post-copy record carries page tags numbered on from the
    pre-copy part (seq0), DONE carries one too, and every page arrives intact."""
    pair = Pair(seed=5, keys=KEYS, seq0=17)
    pair.attach()
    t, out = pair.run_sender()
    for p in np.random.default_rng(6).permutation(NPAGES)[:300].tolist():
        pair.touch(p)
    assert pair.inc.wait(10) == "done", pair.inc.error
    t.join(10)
    assert "error" not in out, out
    for p in range(NPAGES):
        if pair.kind[p] != FREE:
            assert pair.dst.read(p * PS, PS) == pattern(p), p
    st = pair.inc.stats()
    # the tags went on the wire: 16 bytes more per page than without
    assert st.bytes_received >= st.pages_received * (PS + wire.TAG_SIZE)
    pair.inc.finish()
    pair.close()


@pytest.mark.parametrize("dst_keys, dst_seq0", [
    (wire.StreamKeys.derive(b"a key both sides hold, 32 bytes", b"n" * 32, b"x" * 32), 17),
    (KEYS, 18),                       # the right key, but records numbered from elsewhere
])
def test_a_record_whose_tags_do_not_match_is_refused_whole(dst_keys, dst_seq0):
    """Tags under another key (or another numbering: a replayed or reordered record)
    fail the first record, and nothing of it reaches guest memory."""
    pair = Pair(seed=5, keys=KEYS, seq0=17)
    pair.inc.attach(pair.d_sock, dst_keys, dst_seq0)
    t, out = pair.run_sender()
    assert pair.inc.wait(10) == "broken"
    assert "does not match" in pair.inc.error
    st = pair.inc.stats()
    assert st.pages_received == 0 and st.zero_received == 0
    pair.close()
    t.join(10)


def test_a_done_without_its_tag_is_refused_by_the_source():
    """A peer on a keyed link that says DONE without the tag (a forged DONE) does not
    make the source stop serving: the page server refuses it."""
    pair = Pair(seed=5, keys=KEYS)
    t, out = pair.run_sender()
    # play a destination that reads everything up to POSTCOPY-END, then answers an untagged DONE
    d = pair.d_sock
    d.settimeout(10)
    got = bytearray()
    while not (pair.sender.stats().pages_pushed == pair.sender.stats().pages_pending
               and len(got) >= 21 and got[-21] == wire.REC_POSTCOPY_END):
        chunk = d.recv(1 << 20)
        assert chunk
        got += chunk
    d.sendall(wire.done_record(int((pair.kind == PENDING).sum())) + bytes(16))
    t.join(10)
    assert isinstance(out.get("error"), PostcopyLinkError), out
    assert "DONE's tag does not match" in str(out["error"])
    pair.close()
