"""The source side of a migration: setup → iterate → complete → handover (as QEMU's ram.c).

Runs on its own thread in the source VMM while the vCPUs keep running.
The heart of it is :meth:`Migration._send_dirty`, which for every chunk of RAM
fetches-and-clears the dirty log first and only then reads the guest's free
bitmap (claim 2 of US 9552233): a page the guest takes after that read is
written after the clear, so it is dirty again and goes in the next round.

The handover (docs/wire-format.md) gives the VM one owner at every instant:
after END the source waits for READY, sends COMMIT, and from then on never
resumes the guest on its own; only the destination's answer or an operator
decides (`resolve`).

Post-copy (docs/postcopy.md): when the rounds stop converging, after
`postcopy_after` rounds, at once (`postcopy_now`) or when asked
(`start_postcopy`), the last pass sends no pages: the switch sends the set of
pages still to come and the set of pages free, then STATE and END, and the
same handover follows.  After COMMIT the guest runs at the destination and
this side only serves its pages (postcopy-active); a broken link pauses both
halves until `resume`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bitmap import (PAGE_SHIFT, PAGE_SIZE, all_set, count, expand_runs, list_runs, page_runs,
                      words_to_mask)
from ..config import MAX_TIMEOUT, MigrationParams
from ..endpoints import FileUri, TcpUri
from ..errors import KvmliteError, MigrationError, PostcopyLinkError
from ..hooks import NO_HOOKS, Hooks
from ..log import log
from ..machine import Machine, RunResult
from ..rt import favoured, realtime
from ..util import gc_paused
from . import channels, transport, wire
from .state import collect_state
from .stats import MigrationStats
from .status import POSTCOPY_STATES, SOURCE_TRANSITIONS, MigrationStatus as S, StateMachine

if TYPE_CHECKING:
    from .postcopy import PostcopySender

CHUNK_PAGES = 1 << 16            # 256 MiB of RAM per dirty-log clear and bitmap read
assert CHUNK_PAGES <= wire.MAX_RUN_PAGES   # so a run inside a chunk fits one record
MAX_IOV = 512                    # buffers per sendmsg (Linux allows 1024)
MAX_BATCH_BYTES = 32 << 20
# With several channels a batch goes to one of them: smaller batches (and runs
# cut to fit) keep every channel busy rather than one 256 MiB run on one.
CHANNEL_BATCH_BYTES = 4 << 20
CONNECT_TIMEOUT = 5.0
# Chunks with at least this many pages to send first ask /proc/self/pagemap
# which pages were never backed: those are zero and need not be read.
PAGEMAP_MIN_PAGES = 4096
# While the guest runs, wait up to this long for the destination to take in
# what was sent: bytes still queued at the pause would count as downtime.
DRAIN_TIMEOUT = 1.0
# While the bandwidth limit holds the sender back, how often it looks for migrate-start-postcopy.
SWITCH_POLL = 0.05
# How long the source waits for the destination's post-copy stats after DONE.
POSTCOPY_STATS_WAIT = 2.0


class _SwitchNow(Exception):
    """Raised between chunks of a round when the switch to post-copy was asked for."""


def answer_wait(ready: dict[str, Any], timeout: float) -> float:
    """How long to wait for the answer to COMMIT, given READY and this side's `timeout`.

    The destination waits for COMMIT for the `commit_timeout` READY carries,
    then sends ABORTED.  Were the source to give up first (with equal
    timeouts it would, by the time COMMIT took to travel), a lost COMMIT
    would leave the migration unresolved instead of coming back as ABORTED.
    So: the destination's wait, and this side's timeout more for ABORTED to
    arrive.  A READY without a sane `commit_timeout` gets `timeout`."""
    theirs = ready.get("commit_timeout")
    if not isinstance(theirs, (int, float)) or isinstance(theirs, bool) \
            or not 0 < theirs <= MAX_TIMEOUT:                                # NaN fails too
        return timeout
    return max(timeout, theirs + timeout)


def split_runs(starts: np.ndarray, lengths: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The same pages as runs of at most `most`: ([0], [5]), 2 -> ([0, 2, 4], [2, 2, 1])."""
    pieces = (lengths + most - 1) // most
    if len(pieces) == 0 or pieces.max() <= 1:
        return starts, lengths
    run = np.repeat(np.arange(len(starts)), pieces)
    k = np.arange(len(run)) - np.repeat(np.cumsum(pieces) - pieces, pieces)    # piece within its run
    return starts[run] + k * most, np.minimum(lengths[run] - k * most, most)


class Migration:
    """One outgoing migration of `machine`, as `params` asks.

    `sink`: a transport already connected (transport.py's interface), instead
    of connecting to `params.uri`: how tests and other transports plug in."""

    def __init__(self, machine: Machine, params: MigrationParams, *, hooks: Hooks = NO_HOOKS,
                 sink: transport.Sink | None = None) -> None:
        self.machine = machine
        self.params = params
        self.target = params.target
        self.hooks = hooks
        self.state = StateMachine(S.NONE, SOURCE_TRANSITIONS)
        self.stats = MigrationStats(hint=params.hint, live=params.live,
                                    pages_total=machine.memory.npages)
        self.state.listeners.append(self._on_state)
        self.done = threading.Event()      # the migration thread has finished
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.sink: transport.Sink | None = None   # where the stream goes: SocketSink, TlsSink, FileSink
        self._given_sink = sink
        self._connecting: socket.socket | None = None
        self._crc = 0
        self._integrity: wire.Integrity | None = None   # page tags and structure MAC, when the link needs them
        self._t0 = 0.0
        self._paused_here = False          # this migration paused the vCPUs (and so resumes them)
        # The round that last sent each page (0: never): counts re-sends, and
        # `kvmlite pagemap` draws it.
        self.sent_round = np.zeros(machine.memory.npages, dtype=np.uint8)
        self.dirty_words: np.ndarray | None = None   # pages dirty and not yet sent, while it runs
        self._free_pages = machine.free_pages if params.hint else None
        self.log = machine.dirty_log     # the dirty bitmap or the vCPUs' rings (vstate/dirtylog.py)
        self.stats.dirty_log = self.log.kind
        self._first_sync: float | None = None   # when pre-copy's first sync ran
        self._dirtied = 0                # pages found dirty again at later syncs
        self._not_converging = 0         # rounds in a row that did not shrink enough
        self._first_pass_done = False    # every page has been examined once
        self._examined = 0               # pages examined in the first pass so far
        self._distinct_sent = 0          # pages sent at least once
        # Called with the sync count at each dirty-log sync (a pre-copy round,
        # or the last pass): the monitor's MIGRATION_PASS event.
        self.sync_listeners: list[Callable[[int], None]] = []
        # post-copy
        self.migration_id = os.urandom(wire.MIGRATION_ID_SIZE)
        self._switch_asked = threading.Event()
        self._switch_reason: str | None = None   # why the switch happened; None: pre-copy
        # The switch's records (sets, STATE, END) are not held to the bandwidth
        # limit: they are the downtime, and the page server has its own limit.
        self._in_switch = False
        self._in_rounds = False
        self.switched = False            # the switch to post-copy happened (the sets went out)
        self.sender: PostcopySender | None = None   # the page server, once the downtime is over
        self._operator = threading.Condition()
        self._resume_uri: str | None = None      # set by resume(), taken by the migration thread
        self._seq0 = 0                   # page tags the pre-copy part numbered (integrity)
        self._precopy_bytes = 0          # bytes_wire up to END; post-copy's are the page server's
        self._throttled_since: float | None = None   # auto-converge's first throttle
        self.stats.refresh = self._refresh_stats

    def _on_state(self, old: S, new: S) -> None:
        self.stats.status = new.value

    @property
    def status(self) -> S:
        return self.state.state

    # ---- control ---------------------------------------------------------------------

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self.state.advance(S.SETUP)
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self._thread.start()

    def cancel(self) -> bool:
        """Stop the migration and resume the guest here, if COMMIT was not sent yet.
        Returns False when it is too late: the handover has begun."""
        if not self.state.advance(S.CANCELLING, only_from=(S.SETUP, S.ACTIVE, S.DEVICE)):
            return self.status in (S.CANCELLING, S.CANCELLED)
        self._cancel.set()
        sink = self.sink
        if sink is not None:
            sink.abort()                   # a blocked send or receive returns at once
        elif self._connecting is not None:     # still connecting or in the handshake
            try:
                self._connecting.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def start_postcopy(self) -> None:
        """Switch to post-copy at the next chance (QEMU's migrate-start-postcopy):
        between two batches of pages of the round in progress, or before the next."""
        if not self.params.postcopy:
            raise MigrationError("this migration may not switch to post-copy (start it with "
                                 "the postcopy-ram capability on: kvmlite migrate --postcopy)")
        if self.switched or self._switch_reason is not None or self.status in POSTCOPY_STATES:
            return                 # switching already (as QEMU, asking again is no error)
        if self.status not in (S.SETUP, S.ACTIVE):
            raise MigrationError(f"too late to switch to post-copy: the migration is {self.status.value}")
        self._switch_asked.set()

    def resume(self, uri: str | None = None) -> None:
        """Reconnect a post-copy migration whose link broke (QEMU's migrate with
        resume: true), to `uri` or where it went before.  Returns at once, in
        postcopy-recover; the migration thread connects, and the state moves to
        postcopy-active, or back to postcopy-paused (unresolved) if it fails."""
        if uri is not None:
            from ..endpoints import TcpUri, parse_uri
            if not isinstance(parse_uri(uri), TcpUri):
                raise MigrationError(f"resume: {uri} is not a tcp: address")
        if not self.switched:
            raise MigrationError(f"nothing to resume: the migration is {self.status.value}"
                                 + ("" if self.status in (S.POSTCOPY_PAUSED, S.UNRESOLVED)
                                    else "; resume recovers a post-copy migration whose link broke"))
        with self._operator:
            if not self.state.advance(S.POSTCOPY_RECOVER, only_from=(S.POSTCOPY_PAUSED, S.UNRESOLVED)):
                raise MigrationError(f"nothing to resume: the migration is {self.status.value} "
                                     "(resume recovers a post-copy migration whose link broke)")
            self._resume_uri = uri or self.params.uri
            self._operator.notify_all()

    def resolve(self, owner: str) -> None:
        """An operator's decision after a lost answer (state unresolved):
        "destination" (the VM runs there: stop here) or "source" (it does not:
        resume here).  Refused in any other state."""
        if owner not in ("source", "destination"):
            raise MigrationError(f"resolve: owner must be 'source' or 'destination', not {owner!r}")
        if self.status in POSTCOPY_STATES:
            # The guest ran at the destination after the switch: its newer state
            # (vCPUs, devices, every page written since) exists only there.
            raise MigrationError(
                f"the migration is {self.status.value}: the VM has run at the destination since "
                "the switch to post-copy, and its newer state is there, not here, so this VMM "
                "cannot resume it.  Recover the link (kvmlite migrate --resume); if the "
                "destination is gone, the VM is lost (quit this VMM)")
        new = S.FAILED if owner == "source" else S.COMPLETED
        with self._operator:
            if not self.state.advance(new, only_from=(S.UNRESOLVED,)):
                raise MigrationError(f"nothing to resolve: the migration is {self.status.value}")
            self._operator.notify_all()
        if owner == "source":
            self.stats.error = "resolved by the operator: the VM resumes here"
            log.info("operator: the VM was not started at the destination; it resumes here")
            self._resume_here()
        else:
            log.info("operator: the VM runs at the destination; this VMM stops")
            self.machine.quit(RunResult("migrated", 0))

    # ---- the migration thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            dirty = self._setup()
            if self.params.postcopy_now:
                self._switch_reason = "at once (x-postcopy-now)"
            elif self.params.live:
                self._iterate(dirty)
            # From the pause to the destination's answer, waiting for a CPU is
            # downtime: this thread goes first meanwhile (kvmlite/rt.py).  Not
            # when a stop-copy pass goes over channels: their threads would wait
            # behind this one (1 GiB, hint off, 2 channels: 1.35x the time of
            # one connection with it, 1.11x without).
            one_stream = self.params.live or self._sink().channels == 1
            with realtime() if one_stream else contextlib.nullcontext():
                if self._switch_reason is None:
                    self._complete(dirty)
                else:
                    self._switch(dirty)
                self._handover()
        except Exception as e:
            self._fail(e)
        try:
            if self.status in POSTCOPY_STATES or (self.status is S.UNRESOLVED and self.switched):
                self._postcopy()
        except Exception as e:     # a bug: never resume the guest here, say why
            self.stats.error = self._describe(e)
            log.error(f"post-copy migration to {self.params.uri}: {self.stats.error}")
        finally:
            self.machine.set_throttle(0)      # back to full speed, here or (after failure) still here
            if self._throttled_since is not None and not self.stats.throttled_ms:
                self.stats.throttled_ms = round((time.perf_counter() - self._throttled_since) * 1000, 1)
            if self.sink is not None:
                self.sink.close()
                self.sink = None
            self.done.set()

    def _fail(self, e: Exception) -> None:
        self.stats.error = self._describe(e)
        self.stats.total_ms = (time.perf_counter() - self._t0) * 1000
        if self.status in (S.HANDOVER, S.UNRESOLVED):
            # COMMIT may have reached the destination: the guest may run there.
            # It stays paused here until the destination's answer or an operator.
            also = ""
            if self.switched:
                # the switch's figures, before anyone reads "unresolved"
                self._after_switch()
                # post-copy: should the destination have the VM, it waits for its pages
                also = ("; if it does (post-copy), `kvmlite migrate --monitor SOCKET URI --resume` "
                        "reconnects and finishes")
            self.state.advance(S.UNRESOLVED, only_from=(S.HANDOVER,))
            if self.switched:
                self._drop_sink()
            log.error(f"migration to {self.params.uri}: {self.stats.error}; COMMIT was sent, so "
                      "the VM may be running there: it stays paused here. Resolve with "
                      "`kvmlite migrate --monitor SOCKET --resolve source|destination` "
                      f"(docs/wire-format.md, \"Handover\"){also}")
            return
        if self.status in POSTCOPY_STATES:
            return          # never resumed here: _postcopy() handles the link
        # Resumed before the state says so: whoever reads "failed" or
        # "cancelled" finds the guest running again.
        self._resume_here()
        self.state.advance(S.CANCELLED if self.status is S.CANCELLING else S.FAILED)
        log.info(f"migration to {self.params.uri} {self.status.value}: {self.stats.error}; "
                 "the VM keeps running here")

    def _resume_here(self) -> None:
        machine = self.machine
        try:
            self.log.stop()
        except KvmliteError:
            pass
        if self._paused_here:
            self._paused_here = False
            machine.resume_all()   # nothing is lost: the guest carries on here

    def _setup(self) -> np.ndarray:
        """Connect, start dirty logging, send the preamble.  Returns the dirty
        bitmap, all ones: every page starts dirty (as QEMU's first bitmap sync)."""
        mem = self.machine.memory
        self._connect()
        self.hooks.point("src:connected")
        info = {"page_size": PAGE_SIZE, "ram": [[mem.gpa, mem.size]], "vcpus": self.machine.nvcpus,
                "hint": self.params.hint, "live": self.params.live, "source": "kvmlite"}
        keys = self._sink().keys
        if keys is not None:
            # A keyed link without TLS, or a snapshot file: tag every page record.
            self._integrity = wire.Integrity(keys)
            info["integrity"] = wire.INTEGRITY
        if self.params.postcopy:
            self._check_postcopy_peer()
            info["postcopy"] = True
            info["migration_id"] = self.migration_id
        self.log.start()
        dirty = all_set(mem.npages)
        self.dirty_words = dirty
        self._send(wire.encode_preamble(info), structural=True)
        self._sink().begin(info)
        if self.params.postcopy:
            # The destination makes its VM from the header and says so: at the
            # switch its set-up is done, and the downtime is the switch's alone.
            sink = self._sink()
            sink.settimeout(self.params.timeout)
            answer = wire.read_frame(sink, "the destination's answer to the header",
                                     wire.DEST_ANSWERS_TO_HEADER)
            if answer["status"] == wire.ERROR:
                raise MigrationError(f"destination refused the VM: {answer['error']}")
        self.stats.setup_ms = (time.perf_counter() - self._t0) * 1000
        self._check_cancel()
        self.state.advance(S.ACTIVE if self.params.live else S.DEVICE, only_from=(S.SETUP,))
        return dirty

    def _check_postcopy_peer(self) -> None:
        offers = getattr(self.sink, "offers", {})
        if self._sink().kind == "tls":
            raise MigrationError("post-copy does not run over TLS here (its C threads use the "
                                 "socket itself; kernel TLS is not built): use --auth-key, whose "
                                 "page tags protect post-copy records too")
        if not offers.get("postcopy"):
            raise MigrationError("the destination cannot take a post-copy migration (it has no "
                                 "userfaultfd for faults KVM takes, its RAM is a memfd, or it is "
                                 "an older kvmlite; its log says which): migrate without --postcopy")

    def _iterate(self, dirty: np.ndarray) -> None:
        """Pre-copy rounds while the guest runs, until what is left fits the downtime
        limit, or (post-copy) until it is time to switch."""
        self._in_rounds = True
        try:
            self._rounds(dirty)
        except _SwitchNow:
            self._switch_reason = "asked (migrate-start-postcopy)"
        finally:
            self._in_rounds = False

    def _rounds(self, dirty: np.ndarray) -> None:
        while True:
            self._check_cancel()
            self._check_switch()
            if self.params.postcopy and self.stats.rounds and \
                    self.stats.rounds >= (self.params.postcopy_after or self.params.max_rounds):
                self._switch_reason = (f"after {self.stats.rounds} rounds (x-postcopy-after)"
                                       if self.params.postcopy_after else
                                       f"after {self.stats.rounds} rounds (x-max-rounds)")
                return
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
            if self.converged(pending):
                return
            self._count_not_converging(pending)
            if self.params.postcopy:
                if self._not_converging >= 2:
                    self._switch_reason = (f"not converging (round {self.stats.rounds}: "
                                           f"{pending} pages dirty again)")
                    return
            else:
                self._auto_converge(pending)
            r0 = time.perf_counter()
            sent = self._send_dirty(dirty)
            self.stats.round_ms.append(round((time.perf_counter() - r0) * 1000, 3))
            self.stats.round_pages.append(sent)
            self._send_round()
            self.hooks.point(f"src:round:{self.stats.rounds}")

    def converged(self, pending: int) -> bool:
        """After at least one round: what is left fits the downtime limit at the
        measured bandwidth, or the rounds are used up (without post-copy, which
        switches instead)."""
        if self.stats.rounds == 0:
            return False
        limit = self.params.downtime_ms / 1000
        return (pending * PAGE_SIZE <= self._bandwidth_estimate() * limit
                or (self.stats.rounds >= self.params.max_rounds and not self.params.postcopy))

    def _count_not_converging(self, pending: int) -> None:
        """Rounds in a row in which the guest dirtied at least half of what the last round sent."""
        if len(self.stats.round_pages) >= 2 and pending * 2 >= self.stats.round_pages[-1]:
            self._not_converging += 1
        else:
            self._not_converging = 0

    def _auto_converge(self, pending: int) -> None:
        """If the guest dirtied at least half of what the last round sent, twice
        running, slow its vCPUs down: 20 % of their time, then 10 % more each time."""
        if self.params.auto_converge and self._not_converging >= 2:
            share = 0.2 if not self.stats.throttle_pct else self.stats.throttle_pct / 100 + 0.1
            self.machine.set_throttle(share)
            self.stats.throttle_pct = round(min(share, 0.95) * 100)
            if self._throttled_since is None:
                self._throttled_since = time.perf_counter()
            self._not_converging = 0

    def _complete(self, dirty: np.ndarray) -> None:
        """Pause the vCPUs, send what is still dirty, the state and END."""
        machine = self.machine
        if self.params.live:
            # The last pass is small: on the main stream alone it needs no
            # hand-off between threads inside the downtime.
            self._sink().close_channels()
            self._drain()
            self._check_cancel()
            self.state.advance(S.DEVICE, only_from=(S.ACTIVE,))
        # The vCPU threads must get a CPU to park, and again to save their
        # state on their own threads: favoured until then (kvmlite/rt.py).
        with gc_paused(), favoured([vt.thread.native_id for vt in machine.vcpu_threads
                                    if vt.thread.native_id is not None]):
            # (a collection inside the downtime would add milliseconds)
            self._marks = [("pause", time.perf_counter())]   # the downtime starts at the pause request
            self.stats.precopy_bytes = self.stats.bytes_wire
            if not machine.paused:        # a VM the user stopped stays stopped if this fails
                self._paused_here = True
                machine.pause_all()
            if self._throttled_since is not None:      # slowed from the first throttle to the pause
                self.stats.throttled_ms = round((time.perf_counter() - self._throttled_since) * 1000, 1)
            if not machine.running:
                # Parked because the guest ended (exit, crash, quit), not for us:
                # its state is not a guest to carry on anywhere.
                raise MigrationError("the guest ended before the migration could complete")
            self.hooks.point("src:paused")
            self._final_pass(dirty)
            self._mark("state")
            self._send(wire.state_record(collect_state(machine)), structural=True)
            # END's crc covers every structural byte sent before it, and END's own head.
            self._sendall([wire.end_record(self.stats.pages_sent, self.stats.pages_zero, self._crc,
                                           self._integrity)])
            self._check_cancel()
            self.hooks.point("src:end")

    def _switch(self, dirty: np.ndarray) -> None:
        """The switch to post-copy (docs/postcopy.md): pause, the two page sets in
        claim 2's order, STATE and END; no page travels in the downtime."""
        from .postcopy import switch_records, switch_sets
        machine, mem = self.machine, self.machine.memory
        self._drain()
        self._check_cancel()
        self.state.advance(S.DEVICE, only_from=(S.ACTIVE,))
        if self._free_pages is not None:
            self._free_pages.free_view()   # a new registration's view is built now, not paused
        log.info(f"switching to post-copy: {self._switch_reason}")
        # the vCPU threads must get a CPU to park and to save their state (kvmlite/rt.py)
        with gc_paused(), favoured([vt.thread.native_id for vt in machine.vcpu_threads
                                    if vt.thread.native_id is not None]):
            self._marks = [("pause", time.perf_counter())]
            self.stats.precopy_bytes = self.stats.bytes_wire
            if not machine.paused:
                self._paused_here = True
                machine.pause_all()
            if not machine.running:
                raise MigrationError("the guest ended before the migration could complete")
            self.hooks.point("src:paused")
            self._mark("sets")
            self._in_switch = True
            # fetch the dirty log, then read the free bits (claim 2)
            pending, free = switch_sets(self.log, dirty, self._free_words)
            self._mark("state")
            self._send(switch_records(mem.gpa, mem.npages, pending, free), structural=True)
            self._send(wire.state_record(collect_state(machine)), structural=True)
            self._sendall([wire.end_record(self.stats.pages_sent, self.stats.pages_zero, self._crc,
                                           self._integrity)])
            self._check_cancel()
            self.hooks.point("src:end")
        self.switched = True
        self._seq0 = self._integrity.seq if self._integrity is not None else 0
        self._precopy_bytes = self.stats.bytes_wire
        self._switch_sets = (pending, free)

    def _after_switch(self) -> None:
        """Once the downtime is over (the guest runs at the destination, or may): the
        page server (~0.5 ms for 1 GiB: the guest's first remote fault waits for it,
        not the whole downtime) and the switch's figures."""
        from .postcopy import PostcopySender
        pending, free = self._switch_sets
        self.sender = PostcopySender(self.machine.memory, self.sink, pending, free,
                                     timeout=self.params.timeout, seq0=self._seq0,
                                     bandwidth=self.params.bandwidth)
        free_mask = words_to_mask(free, self.machine.memory.npages)
        # free at the switch and never sent by a round: skipped for good
        self.stats.pages_skipped_free = int(np.count_nonzero(free_mask & (self.sent_round == 0)))
        self.stats.postcopy = {"switch": self._switch_reason,
                               "pages_pending": int(np.bitwise_count(pending).sum()),
                               "pages_free": int(np.count_nonzero(free_mask))}

    def _final_pass(self, dirty: np.ndarray) -> None:
        """With the vCPUs parked: the last sync and the pages still dirty."""
        self._mark("sync")
        self._sync(dirty)             # the vCPUs are parked: what is dirty now is final
        self._mark("pages")
        self.stats.round_pages.append(self._send_dirty(dirty))
        self._send_round()
        self._sink().close_channels()    # every page is out: STATE may follow (stop-copy's channels)

    def _send_round(self) -> None:
        """ROUND: the round's pages are all sent (on every channel too)."""
        self.stats.rounds += 1
        self._sink().end_round(self.stats.rounds)
        self._send(wire.round_record(self.stats.rounds), structural=True)

    def _mark(self, name: str) -> None:
        self._marks.append((name, time.perf_counter()))

    def _handover(self) -> None:
        """READY from the destination, then COMMIT, then its acknowledgement
        (docs/wire-format.md, "Handover").  A snapshot file needs none of it."""
        sink = self._sink()
        self._mark("ready")
        if not sink.expects_reply:
            sink.finish()        # a snapshot is complete once it is on disk
            return self._completed(keep_running=self.params.keep_running)
        sink.settimeout(self.params.timeout)
        reply = wire.read_frame(sink, "the destination's answer to END", wire.DEST_ANSWERS_TO_END)
        if reply["status"] != wire.READY:
            raise MigrationError(f"destination refused the VM: {reply['error']}")
        self.hooks.point("src:ready")
        # From the first byte of COMMIT on, the guest may run at the destination.
        if not self.state.advance(S.HANDOVER, only_from=(S.DEVICE,)):
            raise MigrationError("cancelled")
        self._mark("commit")
        sink.send([wire.encode_frame({"status": wire.COMMIT})])
        self.hooks.point("src:committed")
        sink.settimeout(answer_wait(reply, self.params.timeout))
        answer = wire.read_frame(sink, "the destination's answer to COMMIT", wire.DEST_ANSWERS_TO_COMMIT)
        if answer["status"] == wire.ABORTED:
            # The destination did not take COMMIT in time and promised never
            # to run the guest: it is still ours alone.
            self.stats.error = f"the destination gave up before COMMIT arrived: {answer['error']}"
            self._resume_here()
            self.state.advance(S.FAILED, only_from=(S.HANDOVER,))
            log.info(f"migration to {self.params.uri} failed: {self.stats.error}; "
                     "the VM keeps running here")
            return
        if self.switched:
            # Post-copy: the guest runs there now; its pages still to come are served from here.
            self._end_downtime()
            self._after_switch()
            self.state.advance(S.POSTCOPY_ACTIVE, only_from=(S.HANDOVER,))
            log.info(f"post-copy: the VM runs at {self.target} (downtime "
                     f"{self.stats.downtime_ms:.2f} ms); {self.stats.postcopy['pages_pending']} "
                     "pages follow")
            return
        self._completed(keep_running=False)

    def _end_downtime(self) -> None:
        now = time.perf_counter()
        self._mark("end")
        marks = self._marks
        self.stats.downtime_parts_ms = {name: round((b - a) * 1000, 3)
                                        for (name, a), (_, b) in zip(marks, marks[1:])}
        self.stats.downtime_ms = (now - marks[0][1]) * 1000

    def _completed(self, keep_running: bool) -> None:
        now = time.perf_counter()
        if not self.switched:
            self._end_downtime()
        self.stats.total_ms = (now - self._t0) * 1000
        self.stats.throughput_mib_s = self.stats.bytes_wire / (1 << 20) / max(now - self._t0, 1e-9)
        if keep_running:
            # A snapshot taken, the VM goes on here from the state it saved;
            # resumed before the state says so, as after a failure: whoever
            # reads "completed" finds the guest running again.
            self.log.stop()
            if self._paused_here:
                self._paused_here = False
                self.machine.resume_all()
        self.state.advance(S.COMPLETED)
        where = (f"saved in {self.target.path}" if isinstance(self.target, FileUri)
                 else f"running at {self.target}")
        done = (f"migration completed in {self.stats.total_ms:.0f} ms "
                f"(downtime {self.stats.downtime_ms:.2f} ms): the VM is {where}")
        if keep_running:
            log.info(f"{done}, and keeps running here")
        else:
            log.info(done)
            self.machine.quit(RunResult("migrated", 0))

    # ---- post-copy: serving the destination's pages ------------------------------------

    def _postcopy(self) -> None:
        """Serve the pages still to come until the destination has them all.  A broken
        link pauses (both halves wait); resume() reconnects.  Never resumes the guest."""
        while True:
            if self.status is S.POSTCOPY_ACTIVE:
                try:
                    self._sender().run(self.hooks)
                except PostcopyLinkError as e:
                    self.stats.error = f"post-copy link broken: {e}"
                    self._drop_sink()
                    self.state.advance(S.POSTCOPY_PAUSED, only_from=(S.POSTCOPY_ACTIVE,))
                    log.error(f"migration to {self.params.uri}: {self.stats.error}; postcopy-paused: "
                              "the VM is split between the two VMMs and waits: `kvmlite migrate "
                              "--monitor SOCKET URI --resume` reconnects and finishes")
                    continue
                self._postcopy_done()
                return
            asked = self._wait_for_operator()
            if asked is None:
                return                      # resolved by the operator (unresolved only)
            uri, back = asked
            try:
                self._recover(uri)
            except (KvmliteError, OSError) as e:
                self.stats.error = f"recovery failed: {self._describe(e)}"
                self._drop_sink()
                self.state.advance(back, only_from=(S.POSTCOPY_RECOVER,))
                log.error(f"migration to {uri}: {self.stats.error}; still {back.value}")

    def _wait_for_operator(self) -> tuple[str, S] | None:
        """Paused (or unresolved): wait for resume() or resolve().  (uri, the state
        a failed recovery goes back to), or None once resolved."""
        with self._operator:
            back = S.UNRESOLVED if self.status is S.UNRESOLVED else S.POSTCOPY_PAUSED
            while self._resume_uri is None:
                if self.status.finished:
                    return None
                self._operator.wait()
            uri, self._resume_uri = self._resume_uri, None
            return uri, back

    def _recover(self, uri: str) -> None:
        """postcopy-recover: connect and authenticate as before, name the migration,
        read what the destination still needs, and serve it (docs/wire-format.md,
        "Recovery")."""
        from ..endpoints import TcpUri, parse_uri
        self.hooks.point("src:postcopy:recover")
        self.stats.postcopy = {**self.stats.postcopy,
                               "recoveries": self.stats.postcopy.get("recoveries", 0) + 1}
        target = parse_uri(uri)
        if not isinstance(target, TcpUri):       # resume() checks it
            raise MigrationError(f"resume: {uri} is not a tcp: address")
        try:
            sink = transport.connect(target, self.params.creds, connect_timeout=CONNECT_TIMEOUT,
                                     io_timeout=self.params.timeout)
        except ConnectionRefusedError:
            raise MigrationError(f"nothing listens on {uri} (the destination waits for the resume "
                                 "on its --incoming address, or where migrate-recover said)") from None
        try:
            if not sink.offers.get("postcopy"):
                raise MigrationError(f"{uri} cannot take a post-copy migration")
            sink.send([wire.encode_frame({"resume": 1, "migration": self.migration_id})])
            answer = wire.read_frame(sink, "the destination's answer to RESUME",
                                     wire.DEST_ANSWERS_TO_RESUME)
            if answer["status"] == wire.ERROR:
                raise MigrationError(f"the destination refused to resume: {answer['error']}")
            mem = self.machine.memory
            _, _, need = wire.read_need(sink, [(mem.gpa, mem.size)], sink.keys)
            self._sender().resume(sink, need)
        except BaseException:
            sink.close()
            raise
        self.sink = sink
        self.stats.postcopy = {**self.stats.postcopy,
                               "pages_needed_at_recovery": int(np.bitwise_count(need).sum())}
        self.state.advance(S.POSTCOPY_ACTIVE, only_from=(S.POSTCOPY_RECOVER,))
        self.stats.error = None
        log.info(f"post-copy recovered: {uri} needs "
                 f"{self.stats.postcopy['pages_needed_at_recovery']} more pages")

    def _drop_sink(self) -> None:
        """Close the connection now: a destination still reading sees the link break
        and listens for the recovery."""
        if self.sink is not None:
            self.sink.abort()
            self.sink.close()
            self.sink = None

    def _postcopy_done(self) -> None:
        """DONE came: every page is at the destination.  Its own figures follow in a frame."""
        self._refresh_stats(self.stats)
        try:
            self.stats.postcopy = {**self.stats.postcopy, "destination": self._destination_stats()}
        except (KvmliteError, OSError) as e:
            log.debug(f"no post-copy stats from the destination: {e}")
        self._completed(keep_running=False)

    def _destination_stats(self) -> dict[str, Any]:
        """The destination's post-copy stats frame, which follows DONE (informational)."""
        from .postcopy import Leftover
        sink = self._sink()
        sock = Leftover(sink, self._sender().leftover())
        sink.settimeout(POSTCOPY_STATS_WAIT)
        frame = wire.read_frame(sock, "the destination's post-copy stats", (wire.POSTCOPY_STATS,))
        stats = frame.get("stats")
        return stats if isinstance(stats, dict) else {}

    def _refresh_stats(self, stats: MigrationStats) -> None:
        """query-migrate during post-copy: the page server's counters, as they are now."""
        sender = self.sender
        if sender is None or self.status not in POSTCOPY_STATES | {S.COMPLETED}:
            return
        st = sender.stats()
        stats.postcopy = dict(stats.postcopy,
            pages_pushed=st.pages_pushed, pages_on_request=st.pages_on_request,
            pages_left=st.to_send_left, zero_pages=st.zero_pages, pages_resent=st.pages_resent,
            requests=st.requests, requests_already_sent=st.requests_already_sent,
            requests_for_free=st.requests_for_free, requests_not_pending=st.requests_not_pending,
            bytes=st.bytes_sent, bytes_return=st.bytes_received, connections=st.connections,
            switch_to_done_ms=st.switch_to_done_ms)
        stats.bytes_wire = self._precopy_bytes + st.bytes_sent

    def _describe(self, e: Exception) -> str:
        if self._cancel.is_set():
            return "cancelled by the user"
        if isinstance(e, KvmliteError):
            return str(e)
        if isinstance(e, socket.timeout):
            return (f"the destination stopped responding ({self.params.timeout:g} s "
                    "without progress)")
        if isinstance(e, (BrokenPipeError, ConnectionResetError)):
            why = self._refusal()
            return f"destination refused the VM: {why}" if why else "the destination closed the connection"
        if isinstance(e, ConnectionRefusedError):
            return (f"nothing listens on {self.params.uri} "
                    f"(start: kvmlite run --incoming {self.params.uri})")
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
            reply = wire.read_frame(sink, "the destination's refusal", (wire.ERROR,))
        except (OSError, KvmliteError):
            return None
        return str(reply["error"])

    def _drain(self) -> None:
        """Wait, with the guest still running, until the destination has taken in
        what was sent: bytes still queued at pause time would count as downtime."""
        deadline = time.perf_counter() + DRAIN_TIMEOUT
        while time.perf_counter() < deadline and not self._cancel.is_set():
            if self._sink().unacked() == 0:
                return
            time.sleep(0.0002)

    def _sink(self) -> transport.Sink:
        assert self.sink is not None, "not connected"
        return self.sink

    def _sender(self) -> PostcopySender:
        assert self.sender is not None, "not switched to post-copy"
        return self.sender

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationError("cancelled")

    def _switch_pending(self) -> bool:
        return self._in_rounds and self._switch_asked.is_set()

    def _check_switch(self) -> None:
        if self._switch_pending():
            raise _SwitchNow()

    def _connect(self) -> None:
        if self._given_sink is not None:
            self.sink = self._given_sink
            return
        if isinstance(self.target, FileUri):
            self.sink = transport.FileSink(self.target.path)
            return
        if isinstance(self.target, TcpUri) and self.params.channels > 1:
            self.sink = channels.connect(self.target, self.params.creds, self.params.channels,
                                         connect_timeout=CONNECT_TIMEOUT, io_timeout=self.params.timeout,
                                         on_socket=self._set_connecting)
            return
        self.sink = transport.connect(self.target, self.params.creds, connect_timeout=CONNECT_TIMEOUT,
                                      io_timeout=self.params.timeout, on_socket=self._set_connecting)

    def _set_connecting(self, sock: socket.socket) -> None:
        self._connecting = sock
        if self._cancel.is_set():       # cancelled before the socket existed
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---- dirty tracking ---------------------------------------------------------------

    def _sync(self, dirty: np.ndarray) -> None:
        """Fetch the dirty log into `dirty` (QEMU's migration_bitmap_sync).

        The bitmap under manual protect is fetched, not cleared: _send_dirty
        clears each chunk just before reading it.  The rings are harvested and
        reset here, before any free bit of the round is read.
        """
        t = time.perf_counter()
        self.log.sync(dirty)
        self.stats.sync_ms.append(round((time.perf_counter() - t) * 1000, 3))
        self.stats.dirty_syncs += 1
        for listener in list(self.sync_listeners):
            listener(self.stats.dirty_syncs)

    def _free_words(self, w0: int, w1: int) -> np.ndarray | None:
        """The guest's free bits for RAM words [w0, w1) as they are now; None without the hint."""
        if self._free_pages is None:
            return None
        view = self._free_pages.free_view()
        return None if view is None else view.free_words(w0, w1)

    def _count_pending(self, dirty: np.ndarray) -> int:
        free = self._free_words(0, len(dirty))
        return count(dirty if free is None else dirty & ~free)

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
        log = self.log
        total = 0
        for w0, w1, chunk in self._dirty_chunks(dirty):
            look = chunk
            if log.clears_per_chunk:      # (the rings were cleared at the sync)
                first_look = self._free_words(w0, w1)
                if first_look is not None:
                    look = chunk & ~first_look
                # 1. clear: re-protect these pages, so later writes dirty them again
                if look.any():
                    log.clear(w0, look)
            # 2. only now read the guest's free bits (claim 2)
            free = self._free_words(w0, w1)
            # 3. send them, reading page contents now
            total += self._send_chunk(w0, w1, look if free is None else look & ~free, hinted=free is not None)
            # cleared only now, so that `kvmlite pagemap` shows a chunk's pages dirty until sent
            dirty[w0:w1] = 0
            self._check_switch()        # asked while this chunk went: switch before the next
        self._first_pass_done = True
        return total

    def _dirty_chunks(self, dirty: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """(w0, w1, a copy of dirty[w0:w1]) for each 256 MiB chunk with dirty pages."""
        step = CHUNK_PAGES // 64
        for w0 in range(0, len(dirty), step):
            w1 = min(w0 + step, len(dirty))
            chunk = dirty[w0:w1].copy()
            if chunk.any():
                self._check_cancel()
                self._check_switch()
                if not self._first_pass_done:
                    self._examined += count(chunk)
                yield w0, w1, chunk

    def _send_chunk(self, w0: int, w1: int, send: np.ndarray, *, hinted: bool) -> int:
        """Send the pages set in `send` (words w0..w1 of RAM); update the skip count."""
        runs = page_runs(send)
        backed = None
        # Without the hint, untouched RAM is sent too: ask pagemap which
        # pages were never backed.  With it, sent pages are ones the guest
        # uses, nearly all backed, and pagemap (~45 ns a page) would be waste.
        if not hinted and int(runs[1].sum()) >= PAGEMAP_MIN_PAGES:
            n = min((w1 - w0) * 64, self.machine.memory.npages - w0 * 64)
            backed = self.machine.memory.backed_pages(w0 * 64, n)
        sent = self._send_pages(w0 * 64, runs, backed)
        self.stats.pages_skipped_free = self._examined - self._distinct_sent
        return sent

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
            self._send(recs, structural=True)
            self.stats.pages_zero += int(zl.sum())
        # PAGES records: head, then the pages straight from guest memory (and
        # tags), in batches, each on the main stream or a channel the sink picks
        ds, dl = list_runs(absolute[~zero])
        if len(ds):
            most = MAX_BATCH_BYTES if self._sink().channels == 1 else CHANNEL_BATCH_BYTES
            ds, dl = split_runs(ds, dl, most >> PAGE_SHIFT)
            heads = memoryview(wire.run_records(wire.REC_PAGES, mem.gpa + (ds << PAGE_SHIFT), dl))
            size = wire.PAGES_HEADER_SIZE
            # Batches of at most MAX_IOV buffers (head, payload, and tags) and
            # about `most` bytes: a new one where either count crosses a multiple.
            records = MAX_IOV // (3 if self._integrity is not None else 2)
            before = (np.cumsum(dl) - dl) << PAGE_SHIFT          # bytes before each record
            key = np.arange(len(ds)) // records * (1 << 40) + before // most
            cuts = [0, *(np.flatnonzero(np.diff(key)) + 1).tolist(), len(ds)]
            for lo, hi in zip(cuts, cuts[1:]):
                if lo:
                    # migrate-start-postcopy between batches, not only between 256 MiB
                    # chunks; what the chunk has not sent stays dirty and goes after it
                    self._check_switch()
                self._send_page_batch(heads[lo * size:hi * size], ds[lo:hi] << PAGE_SHIFT, dl[lo:hi])
                self.stats.pages_sent += int(dl[lo:hi].sum())     # END counts what went, batch by batch
        return len(pages)

    def _send_page_batch(self, heads: memoryview, offsets: np.ndarray, npages: np.ndarray) -> None:
        """PAGES records whose pages are at `offsets` of guest memory: on a
        channel, which tags and checksums them in its own stream, or here."""
        mem = self.machine.memory
        channel = self._sink().page_channel()
        if channel is not None:
            sent = channel.send_pages(heads, mem, offsets, npages)
            self.stats.bytes_wire += sent
            self.stats.multifd_bytes += sent
            self._limit_bandwidth()
            return
        self._structure(heads)                        # payloads and tags are not structure
        tags = None
        if self._integrity is not None:
            # Tagged from memory as it is now; should the guest write a page
            # before sendmsg reads it, that page's tag will not match, and the
            # page, dirty again, goes in a later record (docs/wire-format.md).
            tags = memoryview(self._integrity.tags(heads, mem.pointer, offsets, npages))
        self._sendall(wire.page_buffers(heads, mem.view, offsets, npages, tags))

    def _structure(self, data: bytes | memoryview) -> None:
        """Structural bytes (all but page payloads and tags): checksummed, and MACed."""
        self._crc = wire.crc(data, self._crc)
        if self._integrity is not None:
            self._integrity.structure(data)

    def _send(self, data: bytes, *, structural: bool) -> None:
        if structural:
            self._structure(data)
        self._sendall([data])

    def _sendall(self, bufs: list[Any]) -> None:
        """Every buffer onto the wire (a socket with a timeout may send part), at the bandwidth asked."""
        self.stats.bytes_wire += sum(len(b) for b in bufs)
        self._sink().send(bufs)
        self._limit_bandwidth()

    def _limit_bandwidth(self) -> None:
        bandwidth = self.params.bandwidth
        if not bandwidth or self._in_switch:
            return
        while (ahead := self.stats.bytes_wire / bandwidth - (time.perf_counter() - self._t0)) > 0:
            if self._cancel.wait(min(ahead, SWITCH_POLL)):
                raise MigrationError("cancelled")
            if self._switch_pending():
                return      # the switch need not wait out a low limit: the next batch or chunk takes it

    def _bandwidth_estimate(self) -> float:
        elapsed = time.perf_counter() - self._t0
        if self.stats.bytes_wire < (1 << 20) or elapsed <= 0:
            return 1e9  # before any real data moved, assume loopback-class bandwidth
        return self.stats.bytes_wire / elapsed
