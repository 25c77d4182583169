"""The destination side: `kvmlite run --incoming tcp:HOST:PORT` (or `unix:PATH`, `file:PATH`).

Waits for a source that completes the connection handshake (transport.py),
reads one migration stream straight into guest memory, restores the vCPUs
and devices only once the END record has proved the stream complete and
intact, and then hands over (docs/wire-format.md): READY to the source, and
the guest runs here only once COMMIT has come back.  Whatever goes wrong
before that, the guest never runs here.  The stream is hostile input.

A post-copy stream (docs/postcopy.md) ends with the sets of pages still to
come and free: before READY the destination puts its RAM under userfaultfd,
and after COMMIT the guest runs at once while its pages arrive; a broken link
pauses it (faults on pages still to come wait) until the source reconnects.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bitmap import PAGE_SHIFT, words_for, words_to_mask
from ..config import Credentials, IncomingConfig, MachineConfig
from ..endpoints import FileUri
from ..errors import KvmliteError, MigrationError, StreamError, UserfaultError
from ..hooks import NO_HOOKS, Hooks
from ..log import log
from ..rt import favoured
from ..util import gc_paused
from . import channels as multi, transport, wire
# imported now, not when a local migration's preamble comes: the source waits
# for the answer to it (~8 ms here, more on a busy host)
from .local import log_give_back, receive_local
from .state import restore_state, validate_state
from .status import RECEIVE_TRANSITIONS, ReceiveState as R, StateMachine

if TYPE_CHECKING:
    from ..machine import Machine
    from ..vstate.memory import GuestMemory
    from .local import LocalHandover
    from .postcopy import PostcopyIncoming


@dataclass
class ReceiveStats:
    pages: int = 0
    zero_pages: int = 0
    bytes: int = 0
    rounds: int = 0
    ms: float = 0.0
    connections: int = 1
    local: LocalHandover | None = None    # a local migration's: the RAM came as a memfd
    # a post-copy stream: what the switch said, for the handover (not stats)
    postcopy: "Switched | None" = field(default=None, repr=False, compare=False)


@dataclass
class Switched:
    """What a post-copy stream left for the handover: the switch's two sets (uint64
    words), the pages the stream wrote here, and what a recovery must match."""
    pending: np.ndarray
    free: np.ndarray
    written: np.ndarray
    migration_id: bytes
    seq: int                     # page tags the pre-copy part used (integrity): the next number


# A destination without pre-faulted RAM populates a PAGES run of POPULATE_MIN to
# POPULATE_MAX bytes in one madvise before receiving into it, rather than
# fault its pages in one at a time inside recv_into.  Receiver CPU for 256 MiB
# into fresh RAM, populate against faults, interleaved pairs: runs of 64 KiB
# 0.87x, 256 KiB 0.83x, 512 KiB 0.81x; of 1 MiB 1.03-1.06x and 4 MiB 1.01x, so
# larger runs are left to fault.
POPULATE_MIN = 64 << 10
POPULATE_MAX = 1 << 20


def receive(conn: Any, machine: Machine | None, *, keys: wire.StreamKeys | None = None,
            machine_config: MachineConfig | None = None, max_memory: int | None = None,
            hooks: Hooks = NO_HOOKS, make_machine: Callable[[MachineConfig], Machine] | None = None,
            channels: Sequence[tuple[Any, wire.StreamKeys | None]] = (),
            downtime: contextlib.ExitStack | None = None,
            postcopy: bool = False) -> tuple[Machine, ReceiveStats]:
    """Read a whole stream into `machine` (made from the header if None); restore its
    vCPUs (parked) and devices.  With `keys` the stream must carry integrity
    tags, and does not pass unless every page the guest uses arrived intact.
    `channels`: the secondary channels' (connection, keys), read on their own
    threads.  `downtime`: where this thread's priority from the first round on
    is entered, for the caller to leave before the guest runs (kvmlite/rt.py).
    `postcopy`: this side can take a post-copy stream (its header is answered
    with PREPARED once the VM is made).  Returns (machine, ReceiveStats).
    StreamError on anything wrong with the stream."""
    t0 = time.perf_counter()
    # The decoder's buffer (256 KiB) holds ~60 one-page records for the C fast
    # path per call; a larger one would copy big runs' payloads twice.
    dec = wire.StreamDecoder(conn, keys=keys, ram_fd_allowed=isinstance(conn, transport.FdReceiver))
    header = dec.read_preamble()
    if header.ram_fd:
        if machine is not None:
            machine.close()      # made for --memory; the RAM comes with the stream instead
        machine, local = receive_local(dec, conn, header, machine_config or MachineConfig(memory=None),
                                       max_memory=max_memory, hooks=hooks, downtime=downtime)
        return machine, ReceiveStats(0, 0, dec.bytes_received, dec.rounds,
                                     (time.perf_counter() - t0) * 1000, local=local)
    if len(header.ram) != 1 or header.ram[0][0] != 0:
        raise StreamError(f"RAM layout {header.ram} is not supported (one region at GPA 0)")
    ram_size = header.ram[0][1]
    hooks.point("dst:header")
    if machine is None:
        if max_memory is not None and ram_size > max_memory:
            raise StreamError(f"the stream's RAM ({ram_size >> 20} MiB) exceeds this destination's "
                              f"limit of {max_memory >> 20} MiB (--max-memory)")
        # Not pre-faulted here: measured on the reference host, pre-faulting
        # costs ~0.6 s per GiB of RAM, while letting recv_into fault in only
        # the pages that arrive costs ~2.5 us per page received, so migration
        # time follows the pages in use and not the guest's size.  Pre-fault
        # at start-up with --memory instead.
        if machine_config is not None and machine_config.memory not in (None, ram_size):
            raise StreamError(f"the source has {ram_size >> 20} MiB of RAM, this destination "
                              f"{machine_config.memory >> 20} MiB (--memory must match)")
        cfg = replace(machine_config or MachineConfig(), memory=ram_size, prefault=False,
                      vcpus=header.vcpus)
        machine = (make_machine or _machine)(cfg)
        populate = True
    elif machine.memory.size != ram_size:
        raise StreamError(f"the source has {ram_size >> 20} MiB of RAM, this destination "
                          f"{machine.memory.size >> 20} MiB (--memory must match)")
    else:
        populate = False         # --memory: pre-faulted at start-up
    if machine.nvcpus != header.vcpus:
        # RAM pre-faulted (--memory) before the header said how many vCPUs: keep it
        machine = machine.remade(vcpus=header.vcpus)
    if header.postcopy:
        if not postcopy:
            raise StreamError("the source may switch to post-copy, which this destination cannot "
                              "take (no userfaultfd for KVM's faults, TLS, or a snapshot file)")
        # The VM is made: the source may pause for the switch whenever it likes.
        conn.sendall(wire.encode_frame({"status": wire.PREPARED}))
    mem = machine.memory
    # Pages never written here are still zero: a ZERO record only has work
    # to do for pages that earlier rounds filled with data.
    written = np.zeros(mem.npages, dtype=np.uint8)
    # Pages whose last tag did not match (integrity on): a later record must
    # bring them intact, unless the guest has freed them.
    unverified = np.zeros(mem.npages, dtype=np.uint8) if dec.integrity is not None else None

    def target(gpa: int, nbytes: int) -> memoryview:
        # RAM not pre-faulted: back a large run's pages in one madvise before
        # receiving into it, rather than fault them in one at a time in recv_into.
        if populate and POPULATE_MIN <= nbytes < POPULATE_MAX:
            mem.populate(gpa, nbytes)
        return mem.slice(gpa, nbytes)

    sync = multi.RoundSync(1 + len(channels), getattr(conn, "gettimeout", lambda: None)() or 30.0)
    readers = [multi.ChannelReader(c, k, i, header, mem, written, unverified, target, sync)
               for i, (c, k) in enumerate(channels, 1)]
    for r in readers:
        r.start()
    try:
        state = _receive_main(dec, mem, written, unverified, target, header, machine, hooks,
                              sync, readers, downtime)
    except BaseException:
        sync.fail("the main stream failed")
        raise
    # The END record proved the stream complete and its structure intact.
    if state is None:
        raise StreamError("the stream ended without the vCPU and device state (no STATE record)")
    try:
        restore_state(machine, state)
    except KvmliteError as e:
        raise StreamError(f"the migrated state was refused: {e}") from None
    tags_bad = dec.tags_bad + sum(r.tags_bad for r in readers)
    switched = None
    if dec.postcopy:
        pending = dec.pagesets[(wire.PAGESET_PENDING, mem.gpa)]
        free = dec.pagesets[(wire.PAGESET_FREE, mem.gpa)]
        if unverified is not None:
            # Post-copy: a page whose tag failed is still to come (dirty again
            # after it was sent) or free; the guest's bitmap is not read here,
            # its pages may still be to come.
            later = words_to_mask(pending | free, mem.npages)
            _refuse_unverified(unverified.astype(bool) & ~later, tags_bad)
        # decode_header refuses a post-copy stream without one
        assert header.migration_id is not None
        switched = Switched(pending, free, written, header.migration_id,
                            dec.integrity.seq if dec.integrity is not None else 0)
    elif unverified is not None:
        _check_integrity(machine, unverified, tags_bad)
    stats = ReceiveStats(dec.pages, dec.zero_pages, dec.bytes_received + sum(r.bytes for r in readers),
                         dec.rounds, (time.perf_counter() - t0) * 1000, connections=1 + len(readers),
                         postcopy=switched)
    return machine, stats


def _receive_main(dec: wire.StreamDecoder, mem: GuestMemory, written: np.ndarray,
                  unverified: np.ndarray | None, target: Callable[[int, int], memoryview],
                  header: wire.Header, machine: Machine, hooks: Hooks, sync: multi.RoundSync,
                  readers: list[multi.ChannelReader], downtime: contextlib.ExitStack | None,
                  ) -> dict[str, Any] | None:
    """The main stream's records until END; returns the validated STATE (None if none came)."""
    state = None
    round_started = False
    while True:
        if dec.scatter_buffered(mem, written, unverified):
            if not round_started:
                round_started = True
                hooks.point(f"dst:round:{dec.rounds}:pages")
            continue
        rec = dec.next_record(target)
        match rec:
            case wire.Pages(gpa, npages, failed):
                first = gpa >> PAGE_SHIFT
                written[first:first + npages] = 1
                if unverified is not None:
                    unverified[first:first + npages] = failed
                if not round_started:
                    round_started = True
                    hooks.point(f"dst:round:{dec.rounds}:pages")
            case wire.Zero(gpa, npages):
                first = gpa >> PAGE_SHIFT
                if unverified is not None:
                    unverified[first:first + npages] = 0
                was = written[first:first + npages]
                if was.any():
                    for s in np.flatnonzero(was).tolist():
                        mem.zero((first + s) << PAGE_SHIFT, 1 << PAGE_SHIFT)
                    was[:] = 0
            case wire.Round(n):
                round_started = False
                if dec.rounds == 1 and downtime is not None:
                    # From the end of the first round on, waiting for a CPU is (or
                    # soon will be) downtime: this thread first (kvmlite/rt.py).
                    downtime.enter_context(favoured())
                if readers:
                    sync.arrive(0, dec.rounds)
                hooks.point(f"dst:round:{n}")
            case wire.PageSet():
                pass                     # kept by the decoder (dec.pagesets)
            case wire.State(st):
                # Every channel sent its last pages and its END before STATE.
                for r in readers:
                    r.finish()
                    dec.pages += r.pages     # the main END counts every connection's pages
                state = validate_state(st, header.vcpus, machine.devices(), machine.irqchip)
                hooks.point("dst:state")
            case wire.End():
                hooks.point("dst:end")
                return state


def _check_integrity(machine: Machine, unverified: np.ndarray, tags_bad: int) -> None:
    """Every page whose last tag did not match must be free in the guest's own
    bitmap, as it arrived (bitmap pages are never free, so they were checked):
    a page the guest uses arrived intact, or the stream is refused.

    A tag fails honestly when the guest wrote the page while it was being
    sent; that page was dirty again and went in a later record, which
    supersedes it."""
    bad = unverified.astype(bool)
    if not bad.any():
        return
    view = machine.free_pages.free_view()
    if view is not None:
        free = words_to_mask(view.free_words(0, words_for(len(bad))), len(bad))
        bad &= ~free
    _refuse_unverified(bad, tags_bad)


def _refuse_unverified(bad: np.ndarray, tags_bad: int) -> None:
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise StreamError(f"{int(bad.sum())} page(s) the guest uses failed the integrity check "
                          f"(the first at GPA {first << PAGE_SHIFT:#x}; {tags_bad} page tag(s) "
                          "did not match): the stream was changed on the way or at rest")


def _machine(cfg: MachineConfig) -> Machine:
    from ..machine import Machine
    return Machine(cfg)


class Incoming:
    """One incoming migration: wait, receive, hand over.  `run()` returns the
    machine, its vCPUs restored and parked, once the VM is this side's to run
    (COMMIT received, or a snapshot restored); it raises, and the guest never
    runs here, on any failure.

    After a post-copy switch `run()` returns at COMMIT too, with the pages
    still to come arriving on their own thread (state postcopy-active); a
    broken link pauses them (postcopy-paused) and this side listens again,
    where `recover()` says or on its own address, for the source's resume."""

    def __init__(self, config: IncomingConfig, creds: Credentials | None = None,
                 machine_config: MachineConfig | None = None, *, hooks: Hooks = NO_HOOKS,
                 machine: Machine | None = None) -> None:
        self.config = config
        self.creds = creds or Credentials()
        self.machine_config = machine_config or MachineConfig(memory=None)
        self.hooks = hooks
        self.machine = machine          # pre-made (--memory: RAM pre-faulted), or None
        self._prefaulted = machine is not None
        self.state = StateMachine(R.WAITING, RECEIVE_TRANSITIONS)
        self.stats: ReceiveStats | None = None
        self.listener: transport.Listener | None = None
        self.peer: str | None = None
        self._conn: Any = None          # the source's connection, while receiving
        self._chans: list[tuple[Any, wire.StreamKeys | None]] = []   # and its secondary channels
        self._aborted = False
        self.can_postcopy: str | None = None    # None: it can; else why not
        # post-copy
        self.postcopy: PostcopyIncoming | None = None   # while pages arrive, and after
        self._switched: Switched | None = None
        self._pc_final: dict[str, Any] | None = None    # its stats once finished
        self._pc_conn: Any = None
        self._pc_thread: threading.Thread | None = None
        self._recover_uri: str | None = None
        self._recover_listener: transport.Listener | None = None
        self._closing = False
        self.recoveries: list[float] = []         # ms from a broken link to its recovery

    @property
    def status(self) -> R:
        return self.state.state

    def listen(self) -> None:
        """Open the port (before anything else may fail, so a busy port is said at once)."""
        target = self.config.target
        if isinstance(target, FileUri):
            self.can_postcopy = "a snapshot file"
            return
        if self.config.insecure and not self.creds.any:
            log.warning(f"--insecure: any peer that reaches {target} may send this VMM a VM")
        self.can_postcopy = _postcopy_problem(self.creds, self.machine_config)
        if self.can_postcopy is None:
            from . import postcopy  # noqa: F401  (imported now, not in the downtime)
        else:
            log.info(f"post-copy not offered: {self.can_postcopy}")
        self.listener = transport.Listener(target, self.creds, io_timeout=self.config.timeout,
                                           hooks=self.hooks, offers=self._offers())
        log.info(f"waiting for a migration on {target}"
                 + (" (TLS)" if self.creds.tls else "") + (" (key required)" if self.creds.key else ""))

    def _offers(self) -> dict[str, Any]:
        return {"postcopy": 1} if self.can_postcopy is None else {}

    def run(self) -> Machine:
        target = self.config.target
        conn: Any
        keys: wire.StreamKeys | None
        try:
            if isinstance(target, FileUri):
                conn, self.peer = transport.FileSource(target.path), target.path
                keys = conn.keys
                log.info(f"restoring the VM saved in {target.path}")
            else:
                if self.listener is None:
                    self.listen()
                assert self.listener is not None
                conn, self.peer, keys = self.listener.accept()
                self.hooks.point("dst:handshake")
            self._conn = conn
            if self._aborted:
                conn.close()
                raise KvmliteError("the incoming migration was abandoned")
        except BaseException:
            if self.listener is not None:
                self.listener.close()
            self.state.advance(R.FAILED)
            raise
        chans: list[tuple[Any, wire.StreamKeys | None]] = []
        # This thread's priority from the first round to the guest's resumption.
        downtime = contextlib.ExitStack()
        keep = False
        try:
            try:
                if self.listener is not None:
                    # the secondary channels a source asked for (--channels N) come next
                    chans = self._chans = self.listener.accept_channels(multi.JOIN_TIMEOUT)
            finally:
                if self.listener is not None:
                    self.listener.close()
            self.state.advance(R.RECEIVING)
            with gc_paused():   # no collection pauses while the source's vCPUs are paused
                try:
                    self.machine, self.stats = receive(
                        conn, self.machine, keys=keys, machine_config=self.machine_config,
                        max_memory=self.config.memory_cap, hooks=self.hooks, channels=chans,
                        downtime=downtime, postcopy=self.can_postcopy is None)
                    self.hooks.point("dst:restored")
                    self._switched = self.stats.postcopy
                    if self._switched is not None:
                        self._prepare_postcopy(keys)
                except KvmliteError as e:
                    if not isinstance(target, FileUri):
                        _send_quietly(conn, {"status": wire.ERROR, "error": str(e)})
                    raise
                if not isinstance(target, FileUri):
                    self._handover(conn)
                    if self._switched is not None:
                        self._start_postcopy(conn, keys)
                        keep = True
        except KvmliteError as e:
            self._drop_postcopy()
            self.state.advance(R.FAILED)
            # a refused stream stays a StreamError: `kvmlite run` exits 65 for it
            kind = StreamError if isinstance(e, StreamError) else MigrationError
            raise kind(f"incoming migration from {self.peer} failed: {e}; "
                       "the guest was not started") from None
        finally:
            self._conn = None
            self._chans = []
            downtime.close()
            if not keep:                # post-copy: the connection now carries the pages
                conn.close()
            for c, _ in chans:
                c.close()
        if isinstance(target, FileUri):
            self.state.advance(R.RUNNING)
        s = self.stats
        if self._switched is not None:
            pending = int(np.bitwise_count(self._switched.pending).sum())
            log.info(f"post-copy: the guest resumes here; {pending} pages still to come, "
                     f"{int(np.bitwise_count(self._switched.free).sum())} free at the switch "
                     "(resolved here with zero pages when touched)")
        else:
            over = f" over {s.connections} connections" if s.connections > 1 else ""
            what = ("the RAM handed over as a memfd, no page copied" if s.local is not None else
                    f"{s.pages} pages with data, {s.zero_pages} zero")
            log.info(f"migration received: {what}, {s.bytes} bytes{over} in {s.ms:.0f} ms; guest resumed")
        return self.machine

    def abort(self) -> None:
        """Give up from another thread (the monitor's quit): stop waiting, or
        cut the stream being received; `run()` then raises and the guest
        never runs here.  Once COMMIT has arrived it is too late: the guest
        is this side's."""
        self._aborted = True
        if self.listener is not None:
            self.listener.close()
        for conn in [self._conn, *(c for c, _ in self._chans)]:
            if conn is not None:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except (OSError, AttributeError):
                    pass

    def _handover(self, conn: Any) -> None:
        """READY, then the guest is ours only once COMMIT arrives (docs/wire-format.md)."""
        try:
            # READY says how long this side waits for COMMIT, so that the source
            # listens for our answer longer than that: a lost COMMIT then comes
            # back as ABORTED and settles itself (docs/reliability.md).
            conn.sendall(wire.encode_frame({"status": wire.READY,
                                            "commit_timeout": self.config.timeout}))
        except OSError as e:
            raise StreamError(f"could not tell the source the VM is ready: {e.strerror or e}") from None
        self.state.advance(R.READY)
        self.hooks.point("dst:ready")
        conn.settimeout(self.config.timeout)
        try:
            wire.read_frame(conn, "the source's COMMIT", wire.SOURCE_ANSWERS_TO_READY)
        except StreamError as e:
            # No COMMIT: the source keeps (or takes back) the VM.  Promise it
            # that this side never runs the guest, in case COMMIT is late.
            _send_quietly(conn, {"status": wire.ABORTED,
                                 "error": f"no COMMIT within {self.config.timeout:g} s"})
            raise StreamError(f"no COMMIT from the source: {e}") from None
        # From here the VM is this side's, whether or not the answer arrives.
        if self._switched is not None:
            # Faults are served before the guest can take one: free pages need no link.
            pc, machine = self._postcopy(), self._machine()
            pc.start()
            machine.memory.before_read = pc.touch
            self.state.advance(R.POSTCOPY_ACTIVE)
        else:
            self.state.advance(R.RUNNING)
        self.hooks.point("dst:committed")
        local = self.stats.local if self.stats is not None else None
        if local is not None and self.machine is not None:
            # A local migration: every vCPU of both VMMs is parked, and the source
            # never resumes on its own now; give the free pages' memory back.
            log_give_back(self.machine, local)
        if self._switched is not None:
            # Not _send_quietly: that would leave the socket in blocking mode with a
            # 1 s timeout; the C threads take it as it is.
            try:
                conn.sendall(wire.encode_frame({"status": wire.RUNNING}))
            except OSError:
                pass      # the source will find the link broken and recover it
        else:
            _send_quietly(conn, {"status": wire.RUNNING})

    # ---- post-copy -----------------------------------------------------------------------

    def _postcopy(self) -> PostcopyIncoming:
        assert self.postcopy is not None, "not a post-copy migration"
        return self.postcopy

    def _machine(self) -> Machine:
        assert self.machine is not None, "no VM yet"
        return self.machine

    def _switch(self) -> Switched:
        assert self._switched is not None, "not a post-copy migration"
        return self._switched

    def _prepare_postcopy(self, keys: wire.StreamKeys | None) -> None:
        """Before READY: guest RAM under userfaultfd, stale copies of the pages still
        to come dropped, so the guest's first touch of each faults."""
        from .postcopy import PostcopyIncoming
        sw = self._switch()
        present = None if self._prefaulted else sw.written.view(bool)
        try:
            self.postcopy = PostcopyIncoming(self._machine().memory, sw.pending, sw.free,
                                             present=present, timeout=self.config.timeout,
                                             integrity=keys is not None)
        except UserfaultError as e:
            raise StreamError(f"post-copy: {e}") from None

    def _start_postcopy(self, conn: Any, keys: wire.StreamKeys | None) -> None:
        """After COMMIT: the receive thread on this connection, and a thread that
        follows the link (done, or broken: listen for the recovery)."""
        self._pc_conn = conn
        pc = self._postcopy()
        try:
            pc.attach(conn, keys, self._switch().seq)
        except StreamError as e:
            pc.abort(str(e))    # the guest is ours now: a broken link, to recover
        self._pc_thread = threading.Thread(target=self._follow_link, name="postcopy-link",
                                           daemon=True)
        self._pc_thread.start()

    def _follow_link(self) -> None:
        pc = self._postcopy()
        while not self._closing:
            link = pc.wait()
            if self._closing:
                return
            if link == "done":
                self._postcopy_done()
                return
            t_broken = time.perf_counter()
            self.state.advance(R.POSTCOPY_PAUSED, only_from=(R.POSTCOPY_ACTIVE, R.POSTCOPY_RECOVER))
            self._close_pc_conn()
            log.error(f"post-copy link to {self.peer} broken: {pc.error}; postcopy-paused: the guest "
                      "keeps running on the pages it has, a fault on a page still to come waits "
                      "for the source's resume")
            self.hooks.point("dst:postcopy:paused")
            if not self._accept_recovery():
                return
            self.recoveries.append(round((time.perf_counter() - t_broken) * 1000, 1))

    def _accept_recovery(self) -> bool:
        """postcopy-paused: listen for the source's resume; attach its connection."""
        from ..endpoints import TcpUri, parse_uri
        pc = self._postcopy()
        while not self._closing:
            uri = self._recover_uri or self.config.uri
            try:
                where = parse_uri(uri)
                if not isinstance(where, TcpUri):      # recover() and --incoming check it
                    raise MigrationError(f"post-copy recovery needs a tcp: address, not {uri}")
                listener = transport.Listener(where, self.creds, io_timeout=self.config.timeout,
                                              hooks=None, offers=self._offers())
            except KvmliteError as e:
                log.error(f"post-copy recovery: {e}; retrying in 1 s")
                time.sleep(1.0)
                continue
            self._recover_listener = listener
            if (self._recover_uri or self.config.uri) != uri or self._closing:
                listener.close()             # recover() moved it while it was being opened
                self._recover_listener = None
                continue
            log.info(f"post-copy: waiting for the source to resume on {uri}")
            try:
                conn, peer, keys = listener.accept()
            except (OSError, ValueError, MigrationError):
                continue                     # closed: recover() moved it, or close()
            finally:
                listener.close()
                self._recover_listener = None
            try:
                conn.settimeout(self.config.timeout)
                frame = wire.read_frame(conn, "the source's RESUME", max_len=transport.MAX_FRAME)
                if frame.get("resume") != 1 or frame.get("migration") != self._switch().migration_id:
                    raise StreamError("not a resume of this VMM's post-copy migration")
                self.state.advance(R.POSTCOPY_RECOVER, only_from=(R.POSTCOPY_PAUSED,))
                conn.sendall(wire.encode_frame({"status": wire.OK}))
                conn.sendall(pc.need_record(keys))
                self._pc_conn = conn
                pc.attach(conn, keys, 0)
            except (KvmliteError, OSError) as e:
                _send_quietly(conn, {"status": wire.ERROR, "error": str(e)})
                conn.close()
                self.state.advance(R.POSTCOPY_PAUSED, only_from=(R.POSTCOPY_RECOVER,))
                log.info(f"refused a recovery from {peer}: {e}; still waiting")
                continue
            self.peer = peer
            self.state.advance(R.POSTCOPY_ACTIVE, only_from=(R.POSTCOPY_RECOVER,))
            log.info(f"post-copy recovered: {peer} resumes sending {pc.stats().pages_left} pages")
            return True
        return False

    def _postcopy_done(self) -> None:
        """Every page is here: tell the source our figures, release userfaultfd."""
        pc = self._postcopy()
        st = self.postcopy_stats()
        assert st is not None
        conn = self._pc_conn
        if conn is not None:
            try:
                conn.sendall(wire.encode_frame({"status": wire.POSTCOPY_STATS, "stats": st}))
            except (OSError, ValueError):
                pass
        self._machine().memory.before_read = None
        pc.finish()
        self._pc_final = st
        self._close_pc_conn()
        self.state.advance(R.RUNNING, only_from=(R.POSTCOPY_ACTIVE,))
        lat = st["remote_latency_us"]
        log.info(f"post-copy completed: {st['pages_pending']} pages came ({st['faults_remote']} by "
                 f"fault, remote p50 {lat.get('p50', '-')} us p99 {lat.get('p99', '-')} us), "
                 f"{st['faults_zero_free']} free pages got a zero page here, none requested; "
                 f"the last page {st['switch_to_last_page_ms']} ms after the switch")
        self.hooks.point("dst:postcopy:done")

    def _close_pc_conn(self) -> None:
        conn, self._pc_conn = self._pc_conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def recover(self, uri: str) -> None:
        """Listen for the source's resume on `uri` instead (QEMU's migrate-recover)."""
        from ..endpoints import TcpUri, parse_uri
        if not isinstance(parse_uri(uri), TcpUri):
            raise KvmliteError(f"migrate-recover: {uri} is not a tcp: address")
        if self.status is not R.POSTCOPY_PAUSED:
            raise KvmliteError(f"nothing to recover: the incoming migration is {self.status.value}")
        self._recover_uri = uri
        listener = self._recover_listener
        if listener is not None:
            listener.close()          # the waiting thread reopens where asked

    def postcopy_stats(self) -> dict[str, Any] | None:
        """The destination's post-copy figures (docs/postcopy.md, "Stats"), or None."""
        if self._pc_final is not None:
            return self._pc_final
        if self.postcopy is None:
            return None
        d = asdict(self.postcopy.stats())
        d["recoveries_ms"] = list(self.recoveries)
        return d

    def page_states(self) -> np.ndarray | None:
        """Per page, how it came since the switch (postcopy.STATE_NAMES): for the page map."""
        return None if self.postcopy is None else self.postcopy.state.copy()

    def wait_postcopy(self, timeout: float | None = None) -> bool:
        """Wait until every page is here (True), or `timeout` seconds."""
        t = self._pc_thread
        if t is None:
            return True
        t.join(timeout)
        return self.status is R.RUNNING

    def _drop_postcopy(self) -> None:
        pc, self.postcopy = self.postcopy, None
        if pc is not None:
            if self.machine is not None:
                self.machine.memory.before_read = None
            pc.close()

    def close(self) -> None:
        """Tear post-copy down (the VM is going away: its vCPUs have stopped)."""
        self._closing = True
        listener = self._recover_listener
        if listener is not None:
            listener.close()
        pc = self.postcopy
        if pc is not None and self._pc_final is None:
            pc.abort("this VMM is closing")
        t = self._pc_thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
        self._close_pc_conn()
        if self._pc_final is None:
            self._drop_postcopy()


def _postcopy_problem(creds: Credentials, machine_config: MachineConfig | None) -> str | None:
    """Why this destination cannot take post-copy, or None if it can."""
    if creds.tls:
        return "TLS (post-copy's C threads use the socket itself; kernel TLS is not built)"
    if machine_config is not None and machine_config.memory_backend != "anon":
        # Dropping a stale copy (MADV_DONTNEED) leaves a memfd's page in its page
        # cache, so the guest would read it without the fault that fetches the real one.
        return (f"its RAM is a {machine_config.memory_backend} (--memory-backend): post-copy "
                "needs anonymous memory, whose missing pages fault")
    try:
        from ..vstate.uffd import Userfault
        Userfault().close()
    except (UserfaultError, ImportError) as e:
        return str(e)
    return None


def _send_quietly(conn: Any, frame: dict[str, Any]) -> None:
    try:
        conn.settimeout(1.0)
        conn.sendall(wire.encode_frame(frame))
    except OSError:
        pass
