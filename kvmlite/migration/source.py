"""The source side of a migration: setup → iterate → complete (as QEMU's ram.c).

Runs on its own thread in the source VMM while the vCPU keeps running.
The heart of it is :meth:`Migration._send_dirty`, which for every chunk of RAM
fetches-and-clears the dirty log first and only then reads the guest's free
bitmap (claim 2 of US 9552233): a page the guest takes after that read is
written after the clear, so it is dirty again and goes in the next round.
"""

from __future__ import annotations

import gc
import socket
import threading
import zlib
import time

import numpy as np

from .. import faults
from ..errors import KvmliteError, MigrationError
from ..vstate.memory import PAGE_SHIFT, PAGE_SIZE
from . import transport, wire
from .stats import MigrationStats

CHUNK_PAGES = 1 << 16            # 256 MiB of RAM per dirty-log clear and bitmap read
assert CHUNK_PAGES <= wire.MAX_RUN_PAGES   # so a run inside a chunk fits one record
MAX_IOV = 512                    # buffers per sendmsg (Linux allows 1024)
MAX_BATCH_BYTES = 32 << 20
CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 30.0
REPLY_TIMEOUT = 30.0
STATE_VERSION = 1
# Socket buffers, both ends.  Measured on loopback here: 1 MiB buffers move
# 6.6 GB/s against 4.3 GB/s with the kernel's autotuned ones, and they bound
# what is still in flight when the vCPU pauses, which the downtime must drain.
SOCKET_BUFFER = 1 << 20
# Chunks with at least this many pages to send first ask /proc/self/pagemap
# which pages were never backed: those are zero and need not be read.
PAGEMAP_MIN_PAGES = 4096


def expand_runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Every page of the runs, in order: ([3, 10], [2, 1]) -> [3, 4, 10]."""
    total = int(lengths.sum())
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - offsets)


def list_runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of consecutive numbers in a sorted page list: (starts, lengths)."""
    if len(pages) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))]
    ends = pages[np.concatenate((breaks - 1, [len(pages) - 1]))] + 1
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def page_runs(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of set bits in a bitmap of uint64 words: (first page, length) arrays.

    Only the non-zero words are unpacked, so a sparse bitmap of a large guest
    costs what its set bits cost, not what its size costs.
    """
    nz = np.flatnonzero(words)
    if len(nz) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 64).view(bool)
    return list_runs((nz[:, None] * 64 + np.arange(64))[bits])


class Migration:
    """One outgoing migration of `machine` to `uri`."""

    def __init__(self, machine, uri: str, *, hint: bool = True, live: bool = True,
                 downtime_ms: float = 5.0, bandwidth: int = 0, max_rounds: int = 30,
                 creds: transport.Credentials | None = None, timeout: float = IO_TIMEOUT,
                 keep_running: bool = False):
        self.machine = machine
        self.uri = uri
        self.target = transport.parse_uri(uri)
        if keep_running and not isinstance(self.target, transport.FileUri):
            raise MigrationError("keep-running is for snapshots (file:PATH): after a migration "
                                 "the VM runs at the destination, not in two places")
        self.keep_running = keep_running
        self.creds = creds or transport.Credentials()
        # seconds without progress (nothing accepted by the peer) before giving up
        self.timeout = timeout if timeout > 0 else IO_TIMEOUT
        self.downtime_limit = max(downtime_ms, 0.0) / 1000.0
        self.bandwidth = max(int(bandwidth), 0)
        self.max_rounds = max(int(max_rounds), 1)
        self.stats = MigrationStats(hint=hint, live=live, pages_total=machine.memory.npages)
        self.hint = hint
        self.live = live
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.sink = None        # where the stream goes: transport.SocketSink, TlsSink or FileSink
        self._connecting: socket.socket | None = None
        self.done = threading.Event()
        self._crc = 0
        # The round that last sent each page (0: never): counts re-sends, and
        # `kvmlite pagemap` draws it.
        self.sent_round = np.zeros(machine.memory.npages, dtype=np.uint8)
        self.dirty_words: np.ndarray | None = None   # pages dirty and not yet sent, while it runs
        self._never_free_for = None     # the registration _hintable was built for
        self._first_sync = None          # when pre-copy's first sync ran
        self._dirtied = 0                # pages found dirty again at later syncs
        self._not_converging = 0         # rounds in a row that did not shrink enough
        self._first_pass_done = False   # every page has been examined once
        self._examined = 0              # pages examined in the first pass so far
        self._distinct_sent = 0         # pages sent at least once

    # ---- control ---------------------------------------------------------------

    def start(self) -> None:
        self.stats.status = "setup"
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()
        sink = self.sink
        if sink is not None:
            sink.abort()
        elif self._connecting is not None:     # still connecting or in the handshake
            try:
                self._connecting.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    # ---- the migration thread ---------------------------------------------------------

    def _run(self) -> None:
        machine = self.machine
        self._t0 = time.perf_counter()
        self._paused_here = False
        try:
            dirty = self._setup()
            if self.live:
                self._iterate(dirty)
            self._complete(dirty)
            where = (f"saved in {self.target.path}" if isinstance(self.target, transport.FileUri)
                     else f"running at {self.target}")
            done = (f"migration completed in {self.stats.total_ms:.0f} ms "
                    f"(downtime {self.stats.downtime_ms:.2f} ms): the VM is {where}")
            if self.keep_running:
                # A snapshot taken, the VM goes on here from the state it saved.
                machine.vm.stop_dirty_log()
                if self._paused_here:
                    machine.resume()
                machine.log(f"{done}, and keeps running here")
            else:
                machine.log(f"{done}; this VMM stops")
                from ..machine import RunResult
                machine.quit(RunResult("migrated", 0, exits=machine.exits))
        except Exception as e:
            self.stats.status = "cancelled" if self._cancel.is_set() else "failed"
            self.stats.error = self._describe(e)
            self.stats.total_ms = (time.perf_counter() - self._t0) * 1000
            try:
                if machine.vm.dirty_logging:
                    machine.vm.stop_dirty_log()
            except KvmliteError:
                pass
            if self._paused_here:
                machine.resume()   # nothing is lost: the guest carries on here
            machine.log(f"migration to {self.uri} {self.stats.status}: {self.stats.error}; "
                        "the VM keeps running here")
        finally:
            gc.enable()
            machine.set_throttle(0)      # back to full speed, here or (after failure) still here
            if self.sink is not None:
                self.sink.close()
                self.sink = None
            self.done.set()

    def _setup(self) -> np.ndarray:
        """Connect, start dirty logging, send the preamble.  Returns the dirty
        bitmap, all ones: every page starts dirty (as QEMU's first bitmap sync)."""
        mem = self.machine.memory
        self._connect()
        self.machine.vm.start_dirty_log()
        dirty = np.full((mem.npages + 63) // 64, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
        if mem.npages % 64:
            dirty[-1] = np.uint64((1 << (mem.npages % 64)) - 1)
        self.dirty_words = dirty
        self._send(wire.encode_preamble({
            "page_size": PAGE_SIZE, "ram": [[mem.gpa, mem.size]], "vcpus": 1,
            "hint": self.hint, "live": self.live, "source": "kvmlite"}), structural=True)
        self.stats.setup_ms = (time.perf_counter() - self._t0) * 1000
        self.stats.status = "active"
        return dirty

    def _iterate(self, dirty: np.ndarray) -> None:
        """Pre-copy rounds while the guest runs, until what is left fits the downtime limit."""
        while True:
            self._check_cancel()
            self._sync(dirty)
            pending = self._count_pending(dirty)
            self.stats.pages_remaining = pending
            now = time.perf_counter()
            if self._first_sync is None:
                self._first_sync = now
            else:
                # pages the guest dirtied (and still uses) while rounds ran, per second
                self._dirtied += pending
                self.stats.dirty_rate_pps = self._dirtied / max(now - self._first_sync, 1e-9)
            if self.stats.rounds > 0 and (
                    pending * PAGE_SIZE <= self._bandwidth_estimate() * self.downtime_limit
                    or self.stats.rounds >= self.max_rounds):
                return
            self._auto_converge(pending)
            r0 = time.perf_counter()
            sent = self._send_dirty(dirty)
            self.stats.round_ms.append(round((time.perf_counter() - r0) * 1000, 3))
            self.stats.round_pages.append(sent)
            self.stats.rounds += 1
            self._send(wire.round_record(self.stats.rounds), structural=True)
            faults.point(f"src:round:{self.stats.rounds}")

    def _auto_converge(self, pending: int) -> None:
        """If the guest dirtied at least half of what the last round sent, twice
        running, slow its vCPU down: 20 % of its time, then 10 % more each time."""
        if len(self.stats.round_pages) >= 2 and pending * 2 >= self.stats.round_pages[-1]:
            self._not_converging += 1
        else:
            self._not_converging = 0
        if self._not_converging >= 2:
            share = 0.2 if not self.stats.throttle_pct else self.stats.throttle_pct / 100 + 0.1
            self.machine.set_throttle(share)
            self.stats.throttle_pct = round(min(share, 0.95) * 100)
            self._not_converging = 0

    def _complete(self, dirty: np.ndarray) -> None:
        """Pause the vCPU, send what is still dirty, the state and END; wait for "running"."""
        machine = self.machine
        self.stats.status = "completing"
        if self.live:
            self._drain()
        gc.disable()   # a collection inside the downtime would add milliseconds
        marks = [("pause", time.perf_counter())]        # the downtime starts at the pause request
        if not machine.paused:        # a VM the user stopped stays stopped if this fails
            machine.pause()
            self._paused_here = True
        faults.point("src:paused")
        marks.append(("sync", time.perf_counter()))
        self._sync(dirty)             # the vCPU is parked: what is dirty now is final
        marks.append(("pages", time.perf_counter()))
        self.stats.round_pages.append(self._send_dirty(dirty))
        self.stats.rounds += 1
        self._send(wire.round_record(self.stats.rounds), structural=True)
        marks.append(("state", time.perf_counter()))
        self._send(wire.state_record(self._collect_state()), structural=True)
        # END's crc covers every structural byte sent before it, and END's own head.
        self._sendall([wire.end_record(self.stats.pages_sent, self.stats.pages_zero, self._crc)])
        marks.append(("reply", time.perf_counter()))
        if self.sink.expects_reply:
            self.sink.settimeout(max(self.timeout, REPLY_TIMEOUT))
            reply = wire.read_reply(self.sink)
            if reply.get("status") != "running":
                raise MigrationError(f"destination refused the VM: {reply.get('error', reply)}")
        else:
            self.sink.finish()        # a snapshot is complete once it is on disk
        now = time.perf_counter()
        marks.append(("end", now))
        self.stats.downtime_parts_ms = {name: round((b - a) * 1000, 3)
                                        for (name, a), (_, b) in zip(marks, marks[1:])}
        self.stats.downtime_ms = (now - marks[0][1]) * 1000
        self.stats.total_ms = (now - self._t0) * 1000
        self.stats.throughput_mbps = self.stats.bytes_wire / (1 << 20) / max(now - self._t0, 1e-9)
        self.stats.status = "completed"

    def _describe(self, e: Exception) -> str:
        if self._cancel.is_set():
            return "cancelled by the user"
        if isinstance(e, KvmliteError):
            return str(e)
        if isinstance(e, socket.timeout):
            return f"the destination stopped responding ({self.timeout:g} s without progress)"
        if isinstance(e, (BrokenPipeError, ConnectionResetError)):
            why = self._refusal()
            return f"destination refused the VM: {why}" if why else "the destination closed the connection"
        if isinstance(e, ConnectionRefusedError):
            return f"nothing listens on {self.uri} (start: kvmlite run --incoming {self.uri})"
        if isinstance(e, OSError):
            return f"{e.strerror or e}"
        return f"{type(e).__name__}: {e}"

    def _refusal(self) -> str | None:
        """The error a destination sent before it hung up (e.g. RAM size mismatch), if any."""
        sink = self.sink
        if sink is None or not sink.expects_reply:
            return None
        try:
            sink.settimeout(0.5)
            reply = wire.read_reply(sink)
        except (OSError, KvmliteError):
            return None
        return reply.get("error") if reply.get("status") == "error" else None

    def _drain(self, timeout: float = 1.0) -> None:
        """Wait, with the guest still running, until the destination has taken in
        what was sent: bytes still queued at pause time would count as downtime."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.sink.unacked() == 0:
                return
            time.sleep(0.0002)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationError("cancelled")

    def _connect(self) -> None:
        if isinstance(self.target, transport.FileUri):
            self.sink = transport.FileSink(self.target.path)
            return
        self.sink = transport.connect(self.target, self.creds, connect_timeout=CONNECT_TIMEOUT,
                                      io_timeout=self.timeout, sndbuf=SOCKET_BUFFER,
                                      on_socket=self._set_connecting)

    def _set_connecting(self, sock: socket.socket) -> None:
        self._connecting = sock
        if self._cancel.is_set():       # cancelled before the socket existed
            self.cancel()

    # ---- dirty tracking ---------------------------------------------------------------

    def _sync(self, dirty: np.ndarray) -> None:
        """Fetch slot 0's dirty log into `dirty` (QEMU's migration_bitmap_sync).

        Under manual protect the fetch does not clear: _send_dirty clears each
        chunk just before reading it.
        """
        dirty |= self.machine.vm.get_dirty_log(0)

    def _free_words(self, w0: int, w1: int) -> np.ndarray | None:
        """Snapshot of the guest's free bits for RAM words [w0, w1), as uint64 words.

        Bits for pages the hint must not cover (outside the registered range,
        the header's and bitmap's own pages) are cleared: those are always sent.
        """
        fph = self.machine.fph
        reg = fph.registration
        if not self.hint or reg is None:
            return None
        if self._never_free_for is not reg:
            self._prepare_hint(reg)
        base_page = reg.base_gpa >> PAGE_SHIFT
        if base_page % 64 == 0:
            # The common case: guest bitmap words line up with RAM words; copy, don't convert.
            out = np.zeros(w1 - w0, dtype=np.uint64)
            gw0 = base_page // 64
            lo, hi = max(w0, gw0), min(w1, gw0 + len(self._guest_words))
            if hi > lo:
                out[lo - w0:hi - w0] = self._guest_words[lo - gw0:hi - gw0]
        else:
            bits = np.zeros((w1 - w0) * 64, dtype=bool)
            mask = fph.free_mask(reg)[w0 * 64:w1 * 64]
            bits[:len(mask)] = mask
            out = np.packbits(bits, bitorder="little").view(np.uint64)
        out &= self._hintable[w0:w1]
        return out

    def _prepare_hint(self, reg) -> None:
        """Per registration: a view of the guest's bitmap and the hintable pages as words."""
        fph = self.machine.fph
        # `reg`, not the registration now: the vCPU thread may have re-registered since
        hintable = fph.hintable_mask(reg)
        hintable = np.pad(hintable, (0, -len(hintable) % 64))
        self._hintable = np.packbits(hintable, bitorder="little").view(np.uint64)
        self._guest_words = fph.bitmap_words(reg)
        self._never_free_for = reg

    def _count_pending(self, dirty: np.ndarray) -> int:
        free = self._free_words(0, len(dirty))
        pending = dirty if free is None else dirty & ~free
        return int(np.bitwise_count(pending).sum())

    # ---- sending ----------------------------------------------------------------------

    def _send_dirty(self, dirty: np.ndarray) -> int:
        """Send every dirty page the guest is using; clear their bits in `dirty`.

        Per 256 MiB chunk, in the order claim 2 of the patent asks for:
          1. clear the dirty log of the pages to be sent: the dirty ones that a
             first look at the bitmap does not show free.  Pages free at that
             look stay dirty in KVM's log (not cleared, not write-protected)
             and come back next round: write-protecting memory the guest is
             not using would make a large idle guest cost its size.
          2. only then read the free bits;
          3. send the pages cleared in 1 that 2 does not show free.
        A page the guest takes after 2 is written after 1, so it is dirty
        again and goes in the next round.
        """
        if faults.broken_order:
            return self._send_dirty_broken(dirty)
        vm = self.machine.vm
        total = 0
        for w0, w1, chunk in self._dirty_chunks(dirty):
            if not self._first_pass_done:
                self._examined += int(np.bitwise_count(chunk).sum())
            look = chunk
            if vm.manual_protect:
                first_look = self._free_words(w0, w1)
                if first_look is not None:
                    look = chunk & ~first_look
                # 1. clear: re-protect these pages, so later writes dirty them again
                if look.any():
                    vm.clear_dirty_log(0, w0 * 64, look)
            # 2. only now read the guest's free bits (claim 2)
            free = self._free_words(w0, w1)
            send = look if free is None else look & ~free
            # 3. send them, reading page contents now
            runs = page_runs(send)
            backed = None
            # Without the hint, untouched RAM is sent too: ask pagemap which
            # pages were never backed.  With it, sent pages are ones the guest
            # uses, nearly all backed, and pagemap (~45 ns a page) would be waste.
            if free is None and int(runs[1].sum()) >= PAGEMAP_MIN_PAGES:
                n = min((w1 - w0) * 64, self.machine.memory.npages - w0 * 64)
                backed = self.machine.memory.backed_pages(w0 * 64, n)
            total += self._send_pages(w0 * 64, runs, backed)
            # cleared only now, so that `kvmlite pagemap` shows a chunk's pages dirty until sent
            dirty[w0:w1] = 0
            self.stats.pages_skipped_free = self._examined - self._distinct_sent
        self._first_pass_done = True
        return total

    def _dirty_chunks(self, dirty: np.ndarray):
        """(w0, w1, a copy of dirty[w0:w1]) for each 256 MiB chunk with dirty pages."""
        step = CHUNK_PAGES // 64
        for w0 in range(0, len(dirty), step):
            w1 = min(w0 + step, len(dirty))
            chunk = dirty[w0:w1].copy()
            if chunk.any():
                self._check_cancel()
                yield w0, w1, chunk

    def _send_dirty_broken(self, dirty: np.ndarray) -> int:
        """The race claim 2 prevents, for tests and lab 4 only (KVMLITE_TEST_BROKEN_ORDER=1).

        Reads the free bits first, for the whole round, and clears each
        chunk's dirty log afterwards.  A page the guest allocates and fills
        in between was free in the snapshot, so it is not sent, and its
        dirty bit is then cleared, so no later round sends it either: the
        destination gets a stale or zero page.
        """
        vm = self.machine.vm
        free_all = self._free_words(0, len(dirty))      # 1. (wrongly) the free bits first
        total = 0
        for w0, w1, chunk in self._dirty_chunks(dirty):
            if vm.manual_protect:
                vm.clear_dirty_log(0, w0 * 64, chunk)    # 2. then clear the dirty log
            send = chunk if free_all is None else chunk & ~free_all[w0:w1]
            total += self._send_pages(w0 * 64, page_runs(send))
            dirty[w0:w1] = 0
        return total

    def _send_pages(self, first: int, runs: tuple[np.ndarray, np.ndarray],
                    backed: np.ndarray | None = None) -> int:
        """Send page runs (relative to `first`): data as PAGES, all-zero pages as ZERO.

        `backed`, if given, says per page (from `first`) whether the host ever
        backed it: an unbacked page is zero without being read.  Everything is
        done for all runs at once with numpy: a guest that churns scatters its
        pages into tens of thousands of runs, and Python per run would cost
        more than the bytes.
        """
        mem = self.machine.memory
        starts, lengths = runs
        if len(starts) == 0:
            return 0
        pages = expand_runs(starts, lengths)              # relative to `first`
        absolute = first + pages
        if backed is None:
            zero = mem.zero_page_list(absolute)
        else:
            zero = ~backed[pages]                         # never backed: zero, left untouched
            zero[~zero] = mem.zero_page_list(absolute[~zero])
        resent = int(np.count_nonzero(self.sent_round[absolute]))
        self.sent_round[absolute] = min(self.stats.rounds + 1, 255)
        self.stats.pages_resent += resent
        self._distinct_sent += len(pages) - resent

        # ZERO records: all of them in one buffer (each page is in one record per round)
        zs, zl = list_runs(absolute[zero])
        if len(zs):
            recs = wire.run_records(wire.REC_ZERO, mem.gpa + (zs << PAGE_SHIFT), zl)
            self._crc = _crc(recs, self._crc)
            self._sendall([recs])
            self.stats.pages_zero += int(zl.sum())
        # PAGES records: head, then the pages straight from guest memory
        ds, dl = list_runs(absolute[~zero])
        if len(ds):
            heads = memoryview(wire.run_records(wire.REC_PAGES, mem.gpa + (ds << PAGE_SHIFT), dl))
            self._crc = _crc(heads, self._crc)            # payloads are not checksummed
            size = wire.PAGES_HEADER_SIZE
            view = mem.view
            offsets = (ds << PAGE_SHIFT).tolist()
            nbytes = (dl << PAGE_SHIFT).tolist()
            bufs, batch = [], 0
            for i, (off, n) in enumerate(zip(offsets, nbytes)):
                bufs.append(heads[i * size:(i + 1) * size])
                bufs.append(view[off:off + n])
                batch += n
                if len(bufs) >= MAX_IOV or batch >= MAX_BATCH_BYTES:
                    self._sendall(bufs)
                    bufs, batch = [], 0
            if bufs:
                self._sendall(bufs)
            self.stats.pages_sent += int(dl.sum())
        return len(pages)

    def _send(self, data: bytes, *, structural: bool) -> None:
        if structural:
            self._crc = _crc(data, self._crc)
        self._sendall([data])

    def _sendall(self, bufs: list) -> None:
        """sendmsg until every buffer is on the wire (a socket with a timeout may send part)."""
        self.stats.bytes_wire += sum(len(b) for b in bufs)
        self.sink.send(bufs)
        if self.bandwidth:
            elapsed = time.time() - self.stats.started_at
            ahead = self.stats.bytes_wire / self.bandwidth - elapsed
            if ahead > 0:
                time.sleep(ahead)

    def _bandwidth_estimate(self) -> float:
        elapsed = time.perf_counter() - self._t0
        if self.stats.bytes_wire < (1 << 20) or elapsed <= 0:
            return 1e9  # before any real data moved, assume loopback-class bandwidth
        return self.stats.bytes_wire / elapsed

    # ---- state ------------------------------------------------------------------------

    def _collect_state(self) -> dict:
        machine = self.machine
        msrs = machine.kvm.migratable_msrs()
        return {
            "version": STATE_VERSION,
            "vcpus": [machine.vcpu.save_state(msrs)],
            "devices": {name: dev.save_state() for name, dev in machine.devices().items()},
        }


_crc = zlib.crc32
