"""The destination side: `kvmlite run --incoming tcp:HOST:PORT` (or `file:PATH`).

Waits for a source that completes the connection handshake (transport.py),
reads one migration stream straight into guest memory, restores the vCPUs
and devices only once the END record has proved the stream complete and
intact, and then hands over (docs/wire-format.md): READY to the source, and
the guest runs here only once COMMIT has come back.  Whatever goes wrong
before that, the guest never runs here.  The stream is hostile input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from ..bitmap import PAGE_SHIFT
from ..config import Credentials, IncomingConfig, MachineConfig
from ..endpoints import FileUri
from ..errors import KvmliteError, StreamError
from ..hooks import NO_HOOKS, Hooks
from ..log import log
from ..util import gc_paused
from . import transport, wire
from .state import restore_state, validate_state
from .status import RECEIVE_TRANSITIONS, ReceiveState as R, StateMachine


@dataclass
class ReceiveStats:
    pages: int = 0
    zero_pages: int = 0
    bytes: int = 0
    rounds: int = 0
    ms: float = 0.0


def receive(conn, machine, *, machine_config: MachineConfig | None = None,
            max_memory: int | None = None, hooks: Hooks = NO_HOOKS, make_machine=None):
    """Read a whole stream into `machine` (made from the header if None); restore its
    vCPUs (parked) and devices.  Returns (machine, ReceiveStats).  StreamError on
    anything wrong with the stream."""
    t0 = time.perf_counter()
    # The decoder's buffer (256 KiB) holds ~60 one-page records for the C fast
    # path per call; a larger one would copy big runs' payloads twice.
    dec = wire.StreamDecoder(conn)
    header = dec.read_preamble()
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
        cfg = replace(machine_config or MachineConfig(), memory=ram_size, prefault=False,
                      vcpus=header.vcpus)
        machine = (make_machine or _machine)(cfg)
    elif machine.memory.size != ram_size:
        raise StreamError(f"the source has {ram_size >> 20} MiB of RAM, this destination "
                          f"{machine.memory.size >> 20} MiB (--memory must match)")
    if machine.nvcpus != header.vcpus:
        raise StreamError(f"the stream has {header.vcpus} vCPUs, this destination "
                          f"{machine.nvcpus}")
    mem = machine.memory
    # Pages never written here are still zero: a ZERO record only has work
    # to do for pages that earlier rounds filled with data.
    written = np.zeros(mem.npages, dtype=np.uint8)

    def target(gpa: int, nbytes: int):
        return mem.slice(gpa, nbytes)

    state = None
    round_started = False
    while True:
        if dec.scatter_buffered(mem, written):
            if not round_started:
                round_started = True
                hooks.point(f"dst:round:{dec.rounds}:pages")
            continue
        rec = dec.next_record(target)
        match rec:
            case wire.Pages(gpa, npages):
                first = gpa >> PAGE_SHIFT
                written[first:first + npages] = 1
                if not round_started:
                    round_started = True
                    hooks.point(f"dst:round:{dec.rounds}:pages")
            case wire.Zero(gpa, npages):
                first = gpa >> PAGE_SHIFT
                was = written[first:first + npages]
                if was.any():
                    for s in np.flatnonzero(was).tolist():
                        mem.zero((first + s) << PAGE_SHIFT, 1 << PAGE_SHIFT)
                    was[:] = 0
            case wire.Round(n):
                round_started = False
                hooks.point(f"dst:round:{n}")
            case wire.State(st):
                state = validate_state(st, header.vcpus, machine.devices())
                hooks.point("dst:state")
            case wire.End():
                hooks.point("dst:end")
                break
    # The END record proved the stream complete and its structure intact.
    try:
        restore_state(machine, state)
    except KvmliteError as e:
        raise StreamError(f"the migrated state was refused: {e}") from None
    stats = ReceiveStats(dec.pages, dec.zero_pages, dec.bytes_received, dec.rounds,
                         (time.perf_counter() - t0) * 1000)
    return machine, stats


def _machine(cfg: MachineConfig):
    from ..machine import Machine
    return Machine(cfg)


class Incoming:
    """One incoming migration: wait, receive, hand over.  `run()` returns the
    machine, its vCPUs restored and parked, once the VM is this side's to run
    (COMMIT received, or a snapshot restored); it raises, and the guest never
    runs here, on any failure."""

    def __init__(self, config: IncomingConfig, creds: Credentials, machine_config: MachineConfig,
                 *, hooks: Hooks = NO_HOOKS, machine=None):
        self.config = config
        self.creds = creds
        self.machine_config = machine_config
        self.hooks = hooks
        self.machine = machine          # pre-made (--memory: RAM pre-faulted), or None
        self.state = StateMachine(R.WAITING, RECEIVE_TRANSITIONS)
        self.stats: ReceiveStats | None = None
        self.listener: transport.Listener | None = None
        self.peer: str | None = None

    @property
    def status(self) -> R:
        return self.state.state

    def listen(self) -> None:
        """Open the port (before anything else may fail, so a busy port is said at once)."""
        target = self.config.target
        if isinstance(target, FileUri):
            return
        if self.config.insecure and not self.creds.any:
            log.warning(f"--insecure: any peer that reaches {target} may send this VMM a VM")
        self.listener = transport.Listener(target, self.creds, io_timeout=self.config.timeout,
                                           hooks=self.hooks)
        log.info(f"waiting for a migration on {target}"
                 + (" (TLS)" if self.creds.tls else "") + (" (key required)" if self.creds.key else ""))

    def run(self):
        target = self.config.target
        try:
            if isinstance(target, FileUri):
                conn, self.peer = transport.FileSource(target.path), target.path
                log.info(f"restoring the VM saved in {target.path}")
            else:
                if self.listener is None:
                    self.listen()
                conn, self.peer = self.listener.accept()
                self.listener.close()
                self.hooks.point("dst:handshake")
        except BaseException:
            self.state.advance(R.FAILED)
            raise
        self.state.advance(R.RECEIVING)
        try:
            with gc_paused():   # no collection pauses while the source's vCPUs are paused
                try:
                    self.machine, self.stats = receive(
                        conn, self.machine, machine_config=self.machine_config,
                        max_memory=self.config.memory_cap, hooks=self.hooks)
                    self.hooks.point("dst:restored")
                except KvmliteError as e:
                    if not isinstance(target, FileUri):
                        _send_quietly(conn, {"status": wire.ERROR, "error": str(e)})
                    raise
                if not isinstance(target, FileUri):
                    self._handover(conn)
        except KvmliteError as e:
            self.state.advance(R.FAILED)
            raise KvmliteError(f"incoming migration from {self.peer} failed: {e}; "
                               "the guest was not started") from None
        finally:
            conn.close()
        if isinstance(target, FileUri):
            self.state.advance(R.RUNNING)
        s = self.stats
        log.info(f"migration received: {s.pages} pages with data, {s.zero_pages} zero, "
                 f"{s.bytes} bytes in {s.ms:.0f} ms; guest resumed")
        return self.machine

    def _handover(self, conn) -> None:
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
        self.state.advance(R.RUNNING)
        self.hooks.point("dst:committed")
        _send_quietly(conn, {"status": wire.RUNNING})


def _send_quietly(conn, frame: dict) -> None:
    try:
        conn.settimeout(1.0)
        conn.sendall(wire.encode_frame(frame))
    except OSError:
        pass
