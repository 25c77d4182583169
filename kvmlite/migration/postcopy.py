"""Post-copy migration: the guest moves first, its pages follow (docs/postcopy.md).

Three pieces, each meant to be called by the core's state machine
(`Migration` on the source, `Incoming` on the destination):

* :func:`switch_sets` -- on the source, with the vCPUs paused: fetch and clear
  the dirty log, *then* read the free bits (claim 2 of US 9552233, as in every
  pre-copy round), and return the two sets the switch sends as PAGESET
  records: the pages still to come and the pages free at the switch.
* :class:`PostcopySender` -- on the source, after the handover: pushes the
  pages still to come in the background and serves the destination's
  requests first, on the same connection; returns when the destination says
  DONE, raises :class:`PostcopyLinkError` when the link breaks (both sides
  then keep their halves until :meth:`PostcopySender.resume`).
* :class:`PostcopyIncoming` -- on the destination: registers guest RAM with
  userfaultfd and runs kvmlite._postcopy's fault and receive threads (C, no GIL):
  a fault on a page free at the switch is resolved here with a zero page, a
  fault on a page still to come sends a REQUEST, and arriving pages are
  placed with UFFDIO_COPY.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .._postcopy import ffi, lib
from ..bitmap import PAGE_SHIFT, PAGE_SIZE, list_runs, mask_to_words, words_to_mask
from ..errors import PostcopyLinkError, StreamError
from ..hooks import NO_HOOKS
from ..vstate.uffd import Userfault
from . import wire

# The source's push: pages per batch, and at most this many bytes sent but not yet
# acknowledged (SIOCOUTQ).  A requested page waits behind what is queued, so this
# bounds a remote fault's latency on a real link (about MAX_INFLIGHT / bandwidth);
# docs/postcopy.md has the measured trade-off.
PUSH_BATCH = 32
MAX_INFLIGHT = 128 << 10
IO_TIMEOUT = 30.0            # seconds without progress before a link counts as broken

STATE_NAMES = {lib.KVMLITE_PC_OTHER: "here", lib.KVMLITE_PC_PENDING: "to come",
               lib.KVMLITE_PC_REQUESTED: "requested", lib.KVMLITE_PC_PUSHED: "pushed",
               lib.KVMLITE_PC_FAULTED: "by fault", lib.KVMLITE_PC_FREE: "free",
               lib.KVMLITE_PC_ZERO_FREE: "free, zero page here",
               lib.KVMLITE_PC_ZERO_OTHER: "zero page here"}


def discard_runs(pending: np.ndarray, free: np.ndarray,
                 present: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The page runs a destination drops at the switch (bool per page in, (starts, lengths) out).

    Every page still to come that is present here must go.  A run may also
    take in free pages (their contents do not matter: a later fault gets a zero
    page) and pages not present (nothing to drop), so a churned guest's
    scattered pages make a few long runs instead of one per page; only a page
    here with data the guest uses ends a run.  Each run costs about a
    microsecond of downtime.
    """
    drop = pending if present is None else pending & present
    if not drop.any():
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    # present None: any page may be here (pre-faulted RAM), so none counts as absent
    ok = drop | free if present is None else drop | free | ~present
    starts, lengths = list_runs(np.flatnonzero(ok))
    ends = starts + lengths
    # trim each run to its first and last page to drop; runs with none are skipped
    idx = np.flatnonzero(drop)
    first = np.searchsorted(idx, starts)                 # first drop page at or after start
    last = np.searchsorted(idx, ends) - 1                # last drop page before end
    has = (first < len(idx)) & (last >= first)
    has[has] = idx[first[has]] < ends[has]
    s = idx[first[has]]
    e = idx[last[has]] + 1
    return s.astype(np.int64), (e - s).astype(np.int64)


# ---- the switch (source, vCPUs paused) -------------------------------------------------


def _c_wire(integrity: bool):
    return ffi.new("struct kvmlite_pc_wire *", wire.postcopy_c_wire(integrity))


def _key(keys) -> object:
    """The page-tag key for the C engines: 16 bytes, or NULL without integrity."""
    return ffi.NULL if keys is None else ffi.new("uint8_t[]", keys.pages)


def switch_sets(log, dirty: np.ndarray, free_words) -> tuple[np.ndarray, np.ndarray]:
    """The two sets of the switch, in claim 2's order.  The vCPUs must be paused.

    `dirty` holds the pages not yet sent or dirtied since (all ones when no
    pre-copy round ran); `free_words(w0, w1)` reads the guest's free bits for
    RAM words [w0, w1) (None without a registered bitmap), as the pre-copy
    rounds do; `log` is the machine's dirty log (vstate/dirtylog.py: the
    bitmap or the vCPUs' rings).
      1. fetch the dirty log into `dirty`;
      2. only then read the free bits;
      3. pending = dirty and not free; free = every page free now.
    The rounds also clear (write-protect) the pages they send, so that a
    write after the free bits were read dirties the page again for the next
    round.  Here there is no next round on this side: the vCPUs stay paused
    until COMMIT hands the guest over, and a switch that fails before it
    ends the migration and dirty logging with it (the next one starts from
    all pages dirty).  So the switch does not clear: re-protecting the pages
    still to come cost ~2 ms of downtime per 65,000 of them, for nothing.
    Returns (pending, free) as uint64 words; `dirty` is left cleared.
    """
    log.sync(dirty)
    free = free_words(0, len(dirty))
    free = np.zeros_like(dirty) if free is None else np.asarray(free, dtype=np.uint64).copy()
    pending = dirty & ~free
    dirty[:] = 0
    return pending, free


def switch_records(gpa: int, npages: int, pending: np.ndarray, free: np.ndarray) -> bytes:
    """The two PAGESET records for one RAM region (structural: they go into the crc)."""
    return (wire.pageset_record(wire.PAGESET_PENDING, gpa, npages, pending)
            + wire.pageset_record(wire.PAGESET_FREE, gpa, npages, free))


# ---- the source's page server ----------------------------------------------------------

@dataclass
class SenderStats:
    pages_pending: int = 0          # pages still to come at the switch
    pages_pushed: int = 0           # sent by the background push
    pages_on_request: int = 0       # sent because a REQUEST asked for them
    zero_pages: int = 0             # of those, sent as ZERO records (all-zero pages)
    pages_resent: int = 0           # sent again after a recovery
    requests: int = 0               # REQUEST records read
    requests_already_sent: int = 0  # for a page already on its way: nothing to do
    requests_for_free: int = 0      # for a page free at the switch: must stay 0
    requests_not_pending: int = 0   # for a page that was not still to come: must stay 0
    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0            # 1, plus one per recovery
    switch_to_done_ms: float = 0.0
    to_send_left: int = 0           # pages still to send on this connection
    error: str = ""


class PostcopySender:
    """The source after the switch: push what is still to come, serve requests first.

    `sink` is a transport sink over plain TCP (SocketSink) whose socket carries
    the post-copy stream one way and the destination's REQUEST/DONE records
    the other.  On a keyed link (`sink.keys`) every record carries page tags
    and DONE must carry its own: `seq0` is the first record's tag number
    (the count of PAGES records the pre-copy part of the stream tagged, so no
    IV is used twice; 0 on a recovery's new connection, whose keys are new).
    `pending` and `free` are the switch's sets (uint64 words over the RAM
    region `memory`).  :meth:`run` (on the migration thread; the loop
    is kvmlite._postcopy's C page server, run without the GIL) returns the
    stats when the destination says DONE; on a broken link it raises
    PostcopyLinkError and keeps what is still to send, for :meth:`resume`
    with a new sink.  :meth:`cut` (any thread) breaks the link on purpose.
    """

    def __init__(self, memory, sink, pending: np.ndarray, free: np.ndarray | None = None, *,
                 push_batch: int = PUSH_BATCH, max_inflight: int = MAX_INFLIGHT,
                 timeout: float = IO_TIMEOUT, push: bool = True, seq0: int = 0,
                 bandwidth: int = 0):
        n = memory.npages
        self.memory = memory
        self.sink = sink
        self.integrity = getattr(sink, "keys", None) is not None
        self._seq0 = seq0
        self.bandwidth = bandwidth        # bytes/s for the push (requests too count), 0: none
        pending = np.ascontiguousarray(pending, dtype=np.uint64)
        free = (np.zeros_like(pending) if free is None
                else np.ascontiguousarray(free, dtype=np.uint64))
        if len(pending) != (n + 63) // 64 or len(free) != len(pending):
            raise ValueError(f"page sets of {len(pending)} and {len(free)} words for {n} pages")
        self.flags = np.empty(n, dtype=np.uint8)
        lib.kvmlite_pcs_flags(ffi.from_buffer("uint8_t[]", self.flags),
                              ffi.from_buffer("uint64_t[]", pending), ffi.from_buffer("uint64_t[]", free), n)
        self.push_batch = min(max(int(push_batch), 1), 256)
        self.max_inflight = max(int(max_inflight), 4096)
        self.timeout = timeout
        self.push = push          # False: serve requests only (a latency baseline for the bench)
        self.connections = 1
        self._s = ffi.gc(lib.kvmlite_pcs_new(ffi.cast("const uint8_t *", memory.host_addr),
                                             memory.gpa, n, ffi.from_buffer("uint8_t[]", self.flags),
                                             _c_wire(self.integrity)), lib.kvmlite_pcs_free)
        if self._s == ffi.NULL:
            raise MemoryError("kvmlite_pcs_new")

    def run(self, hooks=NO_HOOKS) -> SenderStats:
        hooks.point("src:postcopy:start")
        keys = self.sink.keys
        if (keys is not None) != self.integrity:
            raise PostcopyLinkError("a post-copy link must keep its integrity setting across a recovery")
        link = lib.kvmlite_pcs_run(self._s, self.sink.sock.fileno(), self.push_batch,
                                   self.max_inflight, int(self.push), int(self.timeout * 1000),
                                   _key(keys), self._seq0, self.bandwidth)
        if link != lib.KVMLITE_PC_LINK_DONE:
            hooks.point("src:postcopy:paused")
            raise PostcopyLinkError(self.error or "post-copy link broken")
        hooks.point("src:postcopy:done")
        return self.stats()

    def cut(self) -> None:
        """Break the link now (tests; an operator's cancel of a recovery)."""
        lib.kvmlite_pcs_cancel(self._s)
        self.sink.abort()

    def resume(self, sink, need: np.ndarray) -> None:
        """A recovered link: send exactly the pages the destination says it still needs.

        `need` (uint64 words) comes from its NEED record; a page in it that was
        not still to come at the switch is refused (the destination asked for
        something the switch never promised).
        """
        need = words_to_mask(need, self.memory.npages)
        stray = need & ((self.flags & lib.KVMLITE_PCS_PENDING) == 0)
        if stray.any():
            raise StreamError(f"NEED lists {int(stray.sum())} pages that were not still to come "
                              f"at the switch (the first is page {int(np.flatnonzero(stray)[0])})")
        self.flags &= ~np.uint8(lib.KVMLITE_PCS_TO_SEND)
        self.flags[need] |= np.uint8(lib.KVMLITE_PCS_TO_SEND)
        self.sink = sink
        self._seq0 = 0                 # a new connection: new keys, tags numbered from 0
        self.connections += 1

    @property
    def error(self) -> str:
        buf = ffi.new("char[512]")
        n = lib.kvmlite_pcs_error(self._s, buf, 512)
        return ffi.string(buf, n).decode(errors="replace")

    def stats(self) -> SenderStats:
        st = ffi.new("struct kvmlite_pcs_stats *")
        lib.kvmlite_pcs_stats(self._s, st)
        done = (st.t_done_ns - st.t_start_ns) / 1e6 if st.t_done_ns else 0.0
        return SenderStats(
            pages_pending=st.pending_total, pages_pushed=st.pages_pushed,
            pages_on_request=st.pages_on_request, zero_pages=st.zero_pages,
            pages_resent=st.pages_resent, requests=st.requests,
            requests_already_sent=st.requests_already_sent,
            requests_for_free=st.requests_for_free, requests_not_pending=st.requests_not_pending,
            bytes_sent=st.bytes_sent, bytes_received=st.bytes_received,
            connections=self.connections, switch_to_done_ms=round(done, 3),
            to_send_left=st.to_send_left, error=self.error)

    def leftover(self) -> bytes:
        """What the destination sent after DONE that the page server read with it."""
        buf = ffi.new("uint8_t[]", 65536)
        n = lib.kvmlite_pcs_leftover(self._s, buf, 65536)
        return bytes(ffi.buffer(buf, n))


# ---- the destination -------------------------------------------------------------------

@dataclass
class IncomingStats:
    pages_pending: int = 0          # pages still to come at the switch
    pages_left: int = 0
    faults: int = 0                 # fault events read from the userfaultfd
    faults_remote: int = 0          # resolved by a REQUEST to the source
    faults_zero_free: int = 0       # resolved here with a zero page: free at the switch
    faults_zero_other: int = 0      # resolved here with a zero page: never written, not to come
    faults_already_arrived: int = 0 # the page arrived between the fault and its handling
    faults_joined: int = 0          # a second fault on a page already requested
    faults_outside_ram: int = 0     # fault events for addresses not in guest RAM: must stay 0
    requests_while_down: int = 0
    pages_received: int = 0         # placed from PAGES records
    zero_received: int = 0          # placed from ZERO records
    duplicates: int = 0             # arrived again and dropped
    bytes_received: int = 0
    bytes_sent: int = 0
    remote_latency_us: dict = field(default_factory=dict)   # p50, p99, max, n
    remote_wait_ms: float = 0.0     # the remote faults' latencies, summed
    switch_to_last_page_ms: float | None = None
    link: str = "none"
    error: str = ""


LINKS = {lib.KVMLITE_PC_LINK_NONE: "none", lib.KVMLITE_PC_LINK_UP: "up",
         lib.KVMLITE_PC_LINK_BROKEN: "broken", lib.KVMLITE_PC_LINK_DONE: "done"}


class PostcopyIncoming:
    """The destination after the switch: guest RAM under userfaultfd, faults served in C.

    Build it once the stream's END has been verified, with the vCPUs restored
    but parked: it registers RAM, drops the stale copies of pages still to come
    (`present`: bool per page, the pages this side holds; None = any may be,
    e.g. RAM pre-faulted with --memory) and prepares the page states.  Then:
    :meth:`start` before the guest resumes, :meth:`attach` with the connection
    (again with a new one after a recovery), :meth:`wait` until "done" or
    "broken", :meth:`finish` once done.
    """

    def __init__(self, memory, pending: np.ndarray, free: np.ndarray, *,
                 present: np.ndarray | None = None, timeout: float = IO_TIMEOUT,
                 integrity: bool = False):
        n = memory.npages
        self.memory = memory
        self.timeout = timeout
        self.integrity = integrity
        pend = words_to_mask(pending, n)
        fr = words_to_mask(free, n)
        if (pend & fr).any():
            raise StreamError("a page cannot be both still to come and free")
        assert lib.KVMLITE_PC_OTHER == 0       # so that one multiply-add builds the states
        self.state = (pend.view(np.uint8) * np.uint8(lib.KVMLITE_PC_PENDING)
                      + fr.view(np.uint8) * np.uint8(lib.KVMLITE_PC_FREE))
        self.uffd = Userfault()
        try:
            self.uffd.register(memory.host_addr, memory.size)
            # Stale copies (from pre-copy rounds, or pre-faulted zeros) must go, so that
            # the guest's next access to each faults and waits for the real page.
            starts, lengths = discard_runs(pend, fr, present)
            if len(starts):
                r = lib.kvmlite_uffd_discard(ffi.cast("void *", memory.host_addr),
                                             ffi.from_buffer("int64_t[]", starts),
                                             ffi.from_buffer("int64_t[]", lengths),
                                             len(starts), 1 << PAGE_SHIFT)
                if r < 0:
                    raise StreamError(f"cannot drop the stale copies of pages still to come: "
                                      f"madvise: errno {-r}")
            self._pc = lib.kvmlite_pc_new(self.uffd.fd, ffi.cast("void *", memory.host_addr),
                                          memory.gpa, n, ffi.from_buffer("uint8_t[]", self.state),
                                          _c_wire(integrity))
            if self._pc == ffi.NULL:
                raise MemoryError("kvmlite_pc_new")
        except BaseException:
            self.uffd.close()
            raise
        self._sock = None
        self._final: IncomingStats | None = None

    def start(self) -> None:
        """Start resolving faults: call before the guest resumes.  Free pages need no link."""
        r = lib.kvmlite_pc_start_faults(self._pc)
        if r < 0:
            raise StreamError(f"cannot start the post-copy fault thread: errno {-r}")

    def attach(self, sock, keys=None, seq0: int = 0) -> None:
        """Read the post-copy stream from `sock` and send requests on it (a plain TCP
        socket: the C threads use its descriptor).  After a recovery, call again
        with the new connection once the NEED record went out; the pages requested
        while the link was down are asked for again first.  `keys`: the
        connection's integrity keys (its records must carry tags), `seq0` the
        first record's tag number (as PostcopySender's)."""
        if (keys is not None) != self.integrity:
            raise StreamError("the post-copy link's integrity differs from the migration's")
        self._sock = sock
        timeout_ms = int(self.timeout * 1000) if self.timeout else -1
        r = lib.kvmlite_pc_attach(self._pc, sock.fileno(), timeout_ms, _key(keys), seq0)
        if r < 0:
            raise StreamError(f"cannot start the post-copy receive thread: errno {-r}")
        for page in self.requested_pages():
            lib.kvmlite_pc_send(self._pc, wire.request_record(self.memory.gpa + (page << PAGE_SHIFT)),
                                wire.PAGES_HEADER_SIZE)

    def touch(self, offset: int, length: int) -> None:
        """Bring guest RAM [offset, offset + length) in, without the GIL (cffi releases
        it for the call): GuestMemory.before_read while post-copy runs."""
        if length > 0 and self._pc != ffi.NULL:
            lib.kvmlite_touch(ffi.cast("char *", self.memory.host_addr) + offset, length, PAGE_SIZE)

    def wait(self, timeout: float | None = None) -> str:
        """Block until the link is "done" (every page is here) or "broken"; "up" on timeout."""
        ms = -1 if timeout is None else int(timeout * 1000)
        return LINKS[lib.kvmlite_pc_wait(self._pc, ms)]

    def abort(self, why: str) -> None:
        """Treat the link as broken now (e.g. an operator cut it)."""
        lib.kvmlite_pc_break(self._pc, why.encode())

    @property
    def error(self) -> str:
        buf = ffi.new("char[512]")
        n = lib.kvmlite_pc_error(self._pc, buf, 512)
        return ffi.string(buf, n).decode(errors="replace")

    def requested_pages(self) -> list[int]:
        buf = ffi.new("uint64_t[1024]")
        n = lib.kvmlite_pc_requested(self._pc, buf, 1024)
        return [buf[i] for i in range(n)]

    def need(self) -> np.ndarray:
        """The NEED set for a recovery: pages still to come that have not arrived (words)."""
        s = self.state
        return mask_to_words((s == lib.KVMLITE_PC_PENDING) | (s == lib.KVMLITE_PC_REQUESTED))

    def need_record(self, keys=None) -> bytes:
        return wire.need_record(self.memory.gpa, self.memory.npages, self.need(), keys)

    def latencies_us(self) -> np.ndarray:
        """Each remote fault's latency: fault event read -> page placed (and the vCPU woken)."""
        if self._pc == ffi.NULL:
            return self._final_lat
        st = ffi.new("struct kvmlite_pc_stats *")
        lib.kvmlite_pc_stats(self._pc, st)
        out = np.zeros(max(int(st.latency_samples), 1), dtype=np.uint64)
        n = lib.kvmlite_pc_latencies(self._pc, ffi.from_buffer("uint64_t[]", out), len(out))
        return out[:n] / 1000.0

    def stats(self) -> IncomingStats:
        if self._pc == ffi.NULL:
            return self._final
        st = ffi.new("struct kvmlite_pc_stats *")
        lib.kvmlite_pc_stats(self._pc, st)
        lat = self.latencies_us()
        pct = ({"p50": round(float(np.percentile(lat, 50)), 1),
                "p99": round(float(np.percentile(lat, 99)), 1),
                "max": round(float(lat.max()), 1), "n": len(lat)} if len(lat) else {"n": 0})
        last = ((st.t_last_page_ns - st.t_start_ns) / 1e6
                if st.t_last_page_ns and st.t_start_ns else None)
        return IncomingStats(
            pages_pending=st.pending_total, pages_left=st.pending_left, faults=st.fault_events,
            faults_remote=st.remote, faults_zero_free=st.zero_free,
            faults_zero_other=st.zero_other, faults_already_arrived=st.already,
            faults_joined=st.joined, faults_outside_ram=st.stray, requests_while_down=st.requests_unsent,
            pages_received=st.pages_received, zero_received=st.zero_received,
            duplicates=st.duplicates, bytes_received=st.bytes_received, bytes_sent=st.bytes_sent,
            remote_latency_us=pct, remote_wait_ms=round(float(lat.sum()) / 1000, 3),
            switch_to_last_page_ms=None if last is None else round(last, 3),
            link=LINKS[st.link], error=self.error)

    def page_counts(self) -> dict[str, int]:
        """Pages by how they came (or not) since the switch: for the page-map picture."""
        counts = np.bincount(self.state, minlength=len(STATE_NAMES))
        return {name: int(counts[k]) for k, name in STATE_NAMES.items()}

    def finish(self, *, force: bool = False) -> None:
        """Every page is here: stop handling faults and release the userfaultfd.

        A page free at the switch that the guest never touched is still unmapped;
        once unregistered, its first touch is an ordinary fault the kernel
        resolves with a zero page, as before.  With pages still to come this
        refuses unless `force` (the vCPUs have stopped for good): released
        early, a missing page would read as zeros instead of the guest's data.
        """
        if self._pc == ffi.NULL:
            return
        final = self.stats()
        self._final_lat = self.latencies_us()
        if final.pages_left and not force:
            raise StreamError(f"post-copy cannot finish with {final.pages_left} pages still to come")
        try:
            for addr, length in list(self.uffd.ranges):
                self.uffd.unregister(addr, length)
        finally:
            lib.kvmlite_pc_free(self._pc)
            self._pc = ffi.NULL
            self.uffd.close()
            self._final = final

    def close(self) -> None:
        """Tear down: the VM is going away, its vCPUs have stopped."""
        self.finish(force=True)


def stats_dict(stats) -> dict:
    return asdict(stats)


class Leftover:
    """A socket read as `recv_into` expects, starting with bytes already read."""

    def __init__(self, sock, first: bytes):
        self._sock = sock
        self._first = bytearray(first)

    def recv_into(self, view, n: int = 0) -> int:
        n = n or len(view)
        if self._first:
            k = min(n, len(self._first))
            view[:k] = self._first[:k]
            del self._first[:k]
            return k
        return self._sock.recv_into(view, n)
