"""The destination side: `kvmlite run --incoming tcp:HOST:PORT` (or `file:PATH`).

Listens (on loopback unless told otherwise), runs the connection handshake
(transport.py: a peer that cannot prove the shared key is refused before a
byte of VM state is read, and the destination goes on waiting), reads one
migration stream straight into guest memory (pre-faulted at start-up when
--memory is given), restores the vCPU and devices only once the END record
has proved the stream complete and intact, replies "running", and runs the
guest.  Any problem with the stream ends the process with a clear error; a
half-migrated guest never runs.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time

import numpy as np

from .. import faults
from ..errors import ConfigError, KvmliteError, StreamError
from ..vstate.memory import PAGE_SHIFT
from . import transport, wire
from .source import SOCKET_BUFFER
from .state import restore_devices, validate_state

RECV_TIMEOUT = 30.0      # seconds without a byte from the source before giving up
# Connections are served one at a time, so a peer that connects and says
# nothing holds the port: it gets this long (at most) to finish the handshake.
HANDSHAKE_TIMEOUT = 5.0


def _log(msg: str) -> None:
    print(f"kvmlite: {msg}", file=sys.stderr, flush=True)


def listen(target: transport.TcpUri) -> socket.socket:
    host, port, uri = target.host, target.port, str(target)
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # set before listen(): an accepted socket inherits it, and TCP picks
        # its window scale at the handshake
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        srv.bind((host, port))
        srv.listen(1)
    except OSError as e:
        srv.close()
        raise KvmliteError(f"cannot listen on {uri}: {e.strerror}") from None
    return srv


def run_incoming(args) -> int:
    from ..commands import _memory, _trace, run_machine
    from ..machine import Machine

    target = transport.parse_uri(args.incoming)
    creds = transport.Credentials.load(getattr(args, "auth_key", None), getattr(args, "tls_cert", None),
                                       getattr(args, "tls_key", None), getattr(args, "tls_ca", None))
    args.creds = creds           # the restored VM migrates onward with the same credentials
    timeout = getattr(args, "timeout", None) or RECV_TIMEOUT
    if isinstance(target, transport.FileUri) and (creds.key or creds.tls):
        raise ConfigError("--auth-key and --tls-* are for tcp: peers, not snapshot files")
    if isinstance(target, transport.TcpUri) and not (creds.key or creds.tls) \
            and not transport.is_loopback(target.host):
        if not getattr(args, "insecure", False):
            raise ConfigError(f"listening on {target.host} lets anyone who can reach it send this VMM "
                              "a VM: give --auth-key (and --tls-* on untrusted networks), "
                              "or --insecure to accept any peer")
        _log(f"warning: --insecure: any peer that reaches {target} may send this VMM a VM")
    machine = None
    if args.memory:
        # As QEMU's -m with -mem-prealloc: fault every page in before the
        # stream starts, so receiving is not slowed by first-touch faults.
        machine = Machine(_memory(args), prefault=True, trace=_trace() if args.trace else None)
    if isinstance(target, transport.FileUri):
        conn, peer, reply = transport.FileSource(target.path), target.path, False
        _log(f"restoring the VM saved in {target.path}")
    else:
        conn, peer = _accept(target, creds, timeout)
        reply = True
    try:
        t0 = time.perf_counter()
        gc.disable()   # no collection pauses while the source waits for "running"
        try:
            machine, stats = receive(conn, machine, args)
            faults.point("dst:restored")
            if reply:
                try:
                    conn.sendall(wire.encode_reply({"status": "running"}))
                except OSError as e:
                    # The source may already have given up and resumed the guest
                    # itself: running it here too would make two of it.
                    raise StreamError(f"could not confirm to the source: {e.strerror or e}") from None
        except KvmliteError as e:
            if reply:
                _reply_error(conn, str(e))
            raise KvmliteError(f"incoming migration from {peer} failed: {e}; "
                               "the guest was not started") from None
        finally:
            gc.enable()
        _log(f"migration received: {stats['pages']} pages with data, {stats['zero_pages']} zero, "
             f"{stats['bytes']} bytes in {(time.perf_counter() - t0) * 1000:.0f} ms; guest resumed")
    finally:
        conn.close()
    try:
        return run_machine(machine, args)
    finally:
        machine.close()


def _accept(target: transport.TcpUri, creds: transport.Credentials, timeout: float):
    """Wait for a source that completes the handshake; refuse (and keep waiting past) any other."""
    srv = listen(target)
    _log(f"waiting for a migration on {target}"
         + (" (TLS)" if creds.tls else "") + (" (key required)" if creds.key else ""))
    try:
        while True:
            conn, addr = srv.accept()
            peer = f"{addr[0]}:{addr[1]}"
            faults.point("dst:accepted")
            try:
                conn.settimeout(min(timeout, HANDSHAKE_TIMEOUT))
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if creds.tls:
                    conn = transport.accept_tls(conn, creds)
                transport.server_handshake(conn, creds)
                conn.settimeout(timeout)
            except KvmliteError as e:
                conn.close()
                _log(f"refused a connection from {peer}: {e}; still waiting")
                continue
            except OSError as e:
                conn.close()
                _log(f"refused a connection from {peer}: {e.strerror or e}; still waiting")
                continue
            faults.point("dst:handshake")
            return conn, peer
    finally:
        srv.close()


def _reply_error(conn, message: str) -> None:
    try:
        conn.settimeout(1.0)
        conn.sendall(wire.encode_reply({"status": "error", "error": message}))
    except OSError:
        pass


def receive(conn, machine, args):
    """Read a whole stream into `machine` (created here if None); returns (machine, stats)."""
    from ..commands import _trace
    from ..machine import Machine

    # The decoder's buffer (256 KiB) holds ~60 one-page records for the C fast
    # path per call; a larger one would copy big runs' payloads twice.
    dec = wire.StreamDecoder(conn)
    header = dec.read_preamble()
    if len(header.ram) != 1 or header.ram[0][0] != 0:
        raise StreamError(f"RAM layout {header.ram} is not supported (one region at GPA 0)")
    ram_size = header.ram[0][1]
    if header.vcpus != 1:
        raise StreamError(f"the stream has {header.vcpus} vCPUs; kvmlite runs 1")
    faults.point("dst:header")
    if machine is None:
        cap = max_memory(args)
        if ram_size > cap:
            raise StreamError(f"the stream's RAM ({ram_size >> 20} MiB) exceeds this destination's "
                              f"limit of {cap >> 20} MiB (--max-memory)")
        # Without --memory, RAM is not pre-faulted here: measured on the
        # reference host, pre-faulting costs ~0.6 s per GiB of RAM, while
        # letting recv_into fault in only the pages that arrive costs ~2.5 us
        # per page received, so migration time follows the pages in use and
        # not the guest's size.  Pre-fault at start-up with --memory instead.
        machine = Machine(ram_size, prefault=False, trace=_trace() if args.trace else None)
    elif machine.memory.size != ram_size:
        raise StreamError(f"the source has {ram_size >> 20} MiB of RAM, this destination "
                          f"{machine.memory.size >> 20} MiB (--memory must match)")
    mem = machine.memory
    # Pages never written here are still zero: a ZERO record only has work
    # to do for pages that earlier rounds filled with data.
    written = np.zeros(mem.npages, dtype=np.uint8)

    def target(gpa: int, nbytes: int):
        return mem.slice(gpa, nbytes)

    state = None
    # With test faults armed, every record goes through the match below so
    # that the named points are reached (the C fast path would skip them).
    fast = not faults.active
    pages_in_round = 0
    while True:
        if fast and dec.scatter_buffered(mem, written):
            continue
        rec = dec.next_record(target)
        match rec:
            case wire.Pages(gpa, npages):
                written[(gpa >> PAGE_SHIFT):(gpa >> PAGE_SHIFT) + npages] = 1
                pages_in_round += 1
                if pages_in_round == 1:
                    faults.point(f"dst:round:{dec.rounds}:pages")
            case wire.Zero(gpa, npages):
                first = gpa >> PAGE_SHIFT
                was = written[first:first + npages]
                if was.any():
                    for s in np.flatnonzero(was).tolist():
                        mem.zero((first + s) << PAGE_SHIFT, 1 << PAGE_SHIFT)
                    was[:] = 0
            case wire.Round(n):
                pages_in_round = 0
                faults.point(f"dst:round:{n}")
            case wire.State(st):
                state = validate_state(st, header.vcpus, machine.devices())
                faults.point("dst:state")
            case wire.End():
                faults.point("dst:end")
                break
    # The END record proved the stream complete and its structure intact.
    restore_devices(state, machine.devices())
    try:
        machine.vcpu.restore_state(state["vcpus"][0])
    except KvmliteError as e:
        raise StreamError(f"KVM refused the migrated vCPU state: {e}") from None
    return machine, {"pages": dec.pages, "zero_pages": dec.zero_pages, "bytes": dec.bytes_received,
                     "rounds": dec.rounds}


def max_memory(args) -> int:
    """The largest RAM this destination accepts from a stream: --max-memory,
    else this host's physical memory (a stream may not make us promise more)."""
    from ..boot import MAX_RAM
    from ..units import parse_size
    value = getattr(args, "max_memory", None)
    if value:
        return min(parse_size(value, "--max-memory"), MAX_RAM)
    return min(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), MAX_RAM)
