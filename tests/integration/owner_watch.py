"""Watching a migration from outside for two running copies of one VM, and a
relay that loses or delays the handover's messages (docs/wire-format.md,
"Handover").  Used by test_one_owner.py."""

from __future__ import annotations

import os
import queue
import socket
import struct
import subprocess
import threading
import time

import msgpack

from kvmlite.control.client import QmpClient
from kvmlite.errors import KvmliteError
from kvmlite.procs import VmProcess

SAMPLE_EVERY = 0.01
# A guest line reaches the test through a pipe and a reader thread: a line the
# source's guest printed before its pause may be seen this much later on a
# loaded host.  The fill guest prints a line a second, so two copies running
# for longer than this still show.
PIPE_GRACE = 1.5


class Side:
    """One VMM's samples: (t_asked, t_answered, status) from its QMP monitor's
    query-status (a destination says "inmigrate" until its guest runs), and
    the time each new line of guest output was first seen: None for a line
    that came out as the VMM exited.  That one is no sign of a guest running:
    a line the guest had half written when its vCPUs were paused is flushed
    to the pipe at the pause, but without its newline the test's reader
    returns it only at EOF, when the VMM exits (after `quit`, seconds later)."""

    def __init__(self, name: str, vm: VmProcess):
        self.name = name
        self.vm = vm
        self.samples: list[tuple[float, float, str]] = []
        self.lines_seen: list[float | None] = []
        self._client: QmpClient | None = None

    def sample(self) -> None:
        vm = self.vm
        n = len(vm.stdout_lines)
        now = time.monotonic()
        if n > len(self.lines_seen):
            try:
                # EOF (the reader's last line) comes a moment before the exit
                # can be reaped: give it that moment
                vm.proc.wait(0.2)
                exited = True
            except subprocess.TimeoutExpired:
                exited = False
            self.lines_seen += [None if exited else now] * (n - len(self.lines_seen))
        if vm.proc.poll() is not None:
            self.samples.append((now, now, "gone"))
            return
        if self._client is None:
            if not os.path.exists(vm.monitor_path):
                return                        # the VMM is still starting
            try:
                self._client = QmpClient(f"unix:{vm.monitor_path}", timeout=0.5)
            except KvmliteError:
                return
        asked = time.monotonic()
        try:
            status = self._client.execute("query-status")["status"]
        except KvmliteError:
            self._drop_client()
            return
        self.samples.append((asked, time.monotonic(), status))

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def first_run(self) -> float | None:
        """When this side was first seen running the guest (an upper bound on when it began)."""
        times = [answered for _, answered, st in self.samples if st == "running"]
        times += [t for t in self.lines_seen if t is not None][:1]
        return min(times) if times else None

    def statuses(self) -> list[str]:
        out = []
        for _, _, st in self.samples:
            if not out or out[-1] != st:
                out.append(st)
        return out


class OwnerWatch:
    """Samples both sides every 10 ms, each on its own thread (a stopped VMM
    stalls only its own side's samples), until `stop()`.  `check()` fails if
    the source was ever seen running after the destination began running the
    guest: the source's status asked for after that instant, or a line from
    its guest seen more than PIPE_GRACE after it."""

    def __init__(self, src: VmProcess, dst: VmProcess):
        self.src = Side("source", src)
        self.dst = Side("destination", dst)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(side,), daemon=True)
                         for side in (self.src, self.dst)]
        for t in self._threads:
            t.start()

    def _loop(self, side: Side) -> None:
        while not self._stop.is_set():
            side.sample()
            self._stop.wait(SAMPLE_EVERY)
        side.sample()
        side._drop_client()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def two_running(self) -> list[str]:
        """Evidence that both copies ran at one instant (empty: none)."""
        t_dst = self.dst.first_run()
        if t_dst is None:
            return []
        bad = [f"source status {st!r} asked {asked - t_dst:+.3f} s after the destination ran"
               for asked, _, st in self.src.samples if st == "running" and asked > t_dst]
        bad += [f"source guest line seen {t - t_dst:+.3f} s after the destination ran"
                + f": {self.src.vm.stdout_lines[i]!r}"
                for i, t in enumerate(self.src.lines_seen) if t is not None and t > t_dst + PIPE_GRACE]
        return bad

    def check(self) -> None:
        bad = self.two_running()
        assert not bad, (f"two copies of the VM ran at once ({len(bad)} signs):\n  " + "\n  ".join(bad[:5])
                         + f"\nsource statuses {self.src.statuses()}, "
                         f"destination statuses {self.dst.statuses()}")

    def summary(self) -> str:
        return (f"source {' -> '.join(self.src.statuses())} ({len(self.src.samples)} samples); "
                f"destination {' -> '.join(self.dst.statuses()) or '(never up)'} "
                f"({len(self.dst.samples)} samples, {len(self.dst.lines_seen)} guest lines)")


# ---- a relay between source and destination -------------------------------------------

_U32 = struct.Struct("<I")
FRAME_MAX = 64 * 1024


class Relay:
    """A TCP relay for one migration: the source connects to `relay.port`, the
    relay connects to the destination, and bytes pass both ways, except that
    one handover message is dropped or held back.

    `fault` names it: "ready" or "running" (destination → source, found by
    parsing that direction, which is all frames: HELLO, READY or ERROR, then
    RUNNING or ABORTED), "commit" (source → destination: whatever the source
    sends once READY has passed, since it sends nothing after END until then),
    "dst-to-src" (everything the destination says, from its first byte),
    "dst-to-src-after-handshake" (from READY on) or "partition-after-ready"
    (READY arrives, then nothing more passes either way).  `action` is "drop" (the
    message never arrives; later ones do) or "delay" (it and everything after
    it in that direction arrive `delay` seconds late).  A dropped direction
    also keeps its end-of-stream to itself; otherwise a side that closes is
    closed on to the other."""

    def __init__(self, dst_port: int, fault: str | None = None, action: str = "drop",
                 delay: float = 0.0):
        self.dst_port = dst_port
        self.fault = fault
        self.action = action
        self.delay = delay
        self.frames: list[tuple[float, str, str]] = []   # (time, "dst>src"/"src>dst", what: dropped/delayed/passed)
        self._ready_seen = threading.Event()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(4)
        self.port = self._srv.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    def log(self, direction: str, what: str, fate: str) -> None:
        self.frames.append((time.monotonic(), direction, f"{what}: {fate}"))

    def _accept(self) -> None:
        try:
            src, _ = self._srv.accept()
        except OSError:
            return
        dst = socket.create_connection(("127.0.0.1", self.dst_port))
        for s in (src, dst):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socks += [src, dst]
        to_src = _Writer(src, "dst>src", self)
        to_dst = _Writer(dst, "src>dst", self)
        threading.Thread(target=self._pump_src_to_dst, args=(src, to_dst), daemon=True).start()
        threading.Thread(target=self._pump_dst_to_src, args=(dst, to_src), daemon=True).start()

    def _pump_src_to_dst(self, src: socket.socket, out: "_Writer") -> None:
        held = False
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                out.eof()
                return
            if self.fault == "partition-after-ready" and self._ready_seen.is_set() and not out.dark:
                self.log("src>dst", "everything from COMMIT on", "dropped")
                out.blackhole()
            if self.fault == "commit" and self._ready_seen.is_set() and not held:
                # the source sends nothing after END until READY reaches it: this is COMMIT
                held = True
                self.log("src>dst", "COMMIT", self.action)
                if self.action == "drop":
                    continue
                out.hold(self.delay)
            elif self.fault == "commit" and held and self.action == "drop":
                continue
            out.put(data)

    def _pump_dst_to_src(self, dst: socket.socket, out: "_Writer") -> None:
        buf = bytearray()
        if self.fault == "dst-to-src":
            self.log("dst>src", "everything", "dropped")
            out.blackhole()
        while True:
            try:
                data = dst.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                out.eof()
                return
            buf += data
            while len(buf) >= 4:
                (n,) = _U32.unpack_from(buf)
                if not 1 <= n <= FRAME_MAX:       # not a frame: pass it on as it is
                    out.put(bytes(buf))
                    buf.clear()
                    break
                if len(buf) < 4 + n:
                    break
                frame, buf = bytes(buf[:4 + n]), buf[4 + n:]
                try:
                    body = msgpack.unpackb(frame[4:], raw=False)
                except Exception:
                    body = {}
                status = body.get("status") if isinstance(body, dict) else None
                name = (str(status).upper() if status else "HELLO")
                if status == "ready":
                    if self.fault == "dst-to-src-after-handshake":
                        out.blackhole()
                    elif self.fault == "partition-after-ready":
                        # READY gets through; then nothing more, either way
                        self.log("dst>src", name, "passed")
                        out.put(frame)
                        out.blackhole()
                        self._ready_seen.set()
                        continue
                    self._ready_seen.set()
                if self.fault == name.lower() and status is not None:
                    self.log("dst>src", name, self.action)
                    if self.action == "drop":
                        continue
                    out.hold(self.delay)
                else:
                    self.log("dst>src", name, "passed" if not out.dark else "dropped")
                out.put(frame)

    def saw(self, what: str) -> bool:
        return any(f[2].startswith(what + ":") for f in self.frames)

    def close(self) -> None:
        self._closed = True
        for s in [self._srv, *self._socks]:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Writer:
    """One direction's output: a queue of (deliver_at, bytes or None = end of stream)."""

    def __init__(self, sock: socket.socket, name: str, relay: Relay):
        self.sock = sock
        self.name = name
        self.relay = relay
        self.dark = False
        self._not_before = 0.0
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name=f"relay {name}").start()

    def hold(self, seconds: float) -> None:
        """This and everything after it arrives `seconds` late."""
        self._not_before = time.monotonic() + seconds

    def blackhole(self) -> None:
        self.dark = True

    def put(self, data: bytes) -> None:
        if not self.dark:
            self._q.put((self._not_before, data))

    def eof(self) -> None:
        if not self.dark:
            self._q.put((self._not_before, None))

    def _run(self) -> None:
        while True:
            at, data = self._q.get()
            wait = at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if data is None:
                    self.sock.shutdown(socket.SHUT_WR)
                    return
                self.sock.sendall(data)
            except OSError:
                return
