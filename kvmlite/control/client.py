"""A small synchronous QMP client, for kvmlite's monitor and for QEMU's.

    with QmpClient("unix:/tmp/vm1.sock") as qmp:
        qmp.execute("migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]})
        qmp.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
        qmp.wait_event("MIGRATION", timeout=60, match={"status": "completed"})
        info = qmp.execute("query-migrate")

It reads the greeting, negotiates capabilities, sends each command with an
``id`` and waits for the reply carrying that id; events that arrive meanwhile
are kept (up to MAX_EVENTS) for `events()` and `wait_event()`.  No threads:
everything happens inside the call that needs it.  Errors are KvmliteErrors
with a sentence a user can act on: a command's error (QmpCommandError, with
QMP's class), a timeout, or the peer gone.
"""

from __future__ import annotations

import collections
import itertools
import json
import socket
import time
from typing import Any

from ..errors import KvmliteError
from .jsonstream import JsonError, JsonStream
from .qmp import MonitorError, parse_address

MAX_REPLY = 256 << 20           # bytes: x-query-pagemap of a large guest is megabytes
MAX_EVENTS = 10_000             # kept between calls; the oldest go first

__all__ = ["QmpClient", "QmpClientError", "QmpCommandError", "QmpTimeout", "QmpDisconnected"]


class QmpClientError(KvmliteError):
    """Talking to a QMP server failed."""


class QmpCommandError(QmpClientError):
    """The server answered a command with an error."""

    def __init__(self, command: str, cls: str, desc: str):
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.cls = cls
        self.desc = desc


class QmpTimeout(QmpClientError):
    """No answer in time; the connection stays usable (a late reply is dropped)."""


class QmpDisconnected(QmpClientError):
    """The server closed the connection (or it broke)."""


class QmpClient:
    def __init__(self, address: str, *, timeout: float = 10.0, negotiate: bool = True):
        self.address = address
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._events: collections.deque[dict] = collections.deque(maxlen=MAX_EVENTS)
        self._pending: collections.deque = collections.deque()   # parsed but not yet consumed
        self._stream = JsonStream(max_size=MAX_REPLY, max_depth=128)
        self._gone: str | None = None
        self.sock = self._connect(address, timeout)
        try:
            self.greeting = self._read(time.monotonic() + timeout, f"greeting within {timeout:g} s")
            self._check_greeting(self.greeting)
            if negotiate:
                self.negotiate()
        except BaseException:
            self.sock.close()
            raise

    @staticmethod
    def _connect(address: str, timeout: float) -> socket.socket:
        try:
            kind, *where = parse_address(address)
        except MonitorError as e:
            raise QmpClientError(str(e)) from None
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = where[0]
        else:
            host, port = where
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            target = (host or "127.0.0.1", port)
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(target)
                return sock
            except BlockingIOError:
                # EAGAIN from a unix socket: the VMM's backlog of connections
                # not yet accepted is full (it is busy, or was stopped while
                # clients kept knocking).  TCP would wait; wait as TCP does.
                if time.monotonic() >= deadline:
                    sock.close()
                    raise QmpTimeout(f"the VMM at {address} accepts no connection within "
                                     f"{timeout:g} s (is it stopped or hung?)") from None
                time.sleep(0.01)
            except OSError as e:
                sock.close()
                why = e.strerror or str(e)
                raise QmpClientError(f"cannot connect to the monitor at {address}: {why} "
                                     "(is the VM running with --monitor there?)") from None

    def _check_greeting(self, greeting: Any) -> None:
        if not isinstance(greeting, dict) or not isinstance(greeting.get("QMP"), dict):
            raise QmpClientError(f"{self.address} is not a QMP server (it greeted with "
                                 f"{json.dumps(greeting)[:80]})")

    @property
    def version(self) -> dict:
        """The greeting's version: ``{"qemu": {"major", "minor", "micro"}, "package"}``."""
        return self.greeting["QMP"].get("version", {})

    def negotiate(self) -> None:
        self.execute("qmp_capabilities")

    # ---- commands --------------------------------------------------------------------

    def execute(self, command: str, arguments: dict | None = None, *,
                timeout: float | None = None) -> Any:
        """Run `command`; its ``return`` value, or QmpCommandError."""
        req_id = next(self._ids)
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        msg["id"] = req_id
        self._send(msg)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            reply = self._read(deadline, f"reply to {command} within {wait:g} s")
            if "event" in reply:
                self._events.append(reply)
                continue
            if reply.get("id") != req_id:
                continue                # a late reply to a command that timed out
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise QmpCommandError(command, str(err.get("class", "GenericError")),
                                      str(err.get("desc", "(no description)")))
            return reply.get("return")

    def command(self, command: str, **arguments: Any) -> Any:
        """`execute` with Python keywords: ``_`` becomes ``-`` (``downtime_limit=300``)."""
        return self.execute(command, {k.replace("_", "-"): v for k, v in arguments.items()})

    # ---- events ------------------------------------------------------------------------

    def events(self, name: str | None = None) -> list[dict]:
        """The events received so far (of `name` only, if given), removed from the queue;
        reads whatever the server has already sent first."""
        self._poll()
        taken = [e for e in self._events if name is None or e.get("event") == name]
        for e in taken:
            self._events.remove(e)
        return taken

    def wait_event(self, name: str, timeout: float, match: dict | None = None) -> dict:
        """The next event `name` whose data has the items of `match`; QmpTimeout
        if none comes within `timeout` seconds.  Other events stay queued."""
        deadline = time.monotonic() + timeout

        def fits(e: dict) -> bool:
            data = e.get("data") or {}
            return e.get("event") == name and all(data.get(k) == v for k, v in (match or {}).items())

        while True:
            for e in self._events:
                if fits(e):
                    self._events.remove(e)
                    return e
            try:
                msg = self._read(deadline, f"event {name}")
            except QmpTimeout:
                raise QmpTimeout(f"{self.address}: no {name} event"
                                 f"{' with ' + json.dumps(match) if match else ''} "
                                 f"within {timeout:g} s") from None
            if "event" in msg:
                self._events.append(msg)

    # ---- the wire ----------------------------------------------------------------------

    def _send(self, msg: dict) -> None:
        if self._gone:
            raise QmpDisconnected(self._gone)
        # A newline is not required by QMP; it helps a human reading a capture.
        raw = json.dumps(msg, allow_nan=False).encode() + b"\n"
        self.sock.settimeout(self.timeout)      # a read may have left a shorter one
        try:
            self.sock.sendall(raw)
        except TimeoutError:
            # part of the request may be in the stream: this connection is done
            self._gone = (f"the VMM at {self.address} did not take a request within "
                          f"{self.timeout:g} s (is it stopped or hung?)")
            raise QmpTimeout(self._gone) from None
        except OSError as e:
            self._gone = self._lost(e)
            raise QmpDisconnected(self._gone) from None

    def _read(self, deadline: float, what: str) -> dict:
        """The next message from the server, waiting until `deadline`."""
        while not self._pending:
            if self._gone:
                raise QmpDisconnected(self._gone)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpTimeout(f"{self.address}: no {what}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError as e:
                self._gone = self._lost(e)
                continue
            if not data:
                self._gone = (f"the monitor at {self.address} closed the connection "
                              f"while waiting for {what} (did the VMM exit?)")
                continue
            for item in self._stream.feed(data):
                if isinstance(item, JsonError):
                    raise QmpClientError(f"{self.address} sent something that is not QMP: {item.desc}")
                if not isinstance(item, dict):
                    raise QmpClientError(f"{self.address} sent something that is not QMP: "
                                         f"{json.dumps(item)[:80]}")
                self._pending.append(item)
        return self._pending.popleft()

    def _lost(self, e: OSError) -> str:
        # EPIPE or ECONNRESET: the VMM closed its end with our request unread,
        # which is what a VMM that was killed (or exited) does
        return (f"lost the monitor at {self.address}: {e.strerror or e} "
                "(did the VMM exit, or was it killed?)")

    def _poll(self) -> None:
        """Take in, without waiting, whatever the server has sent."""
        try:
            while True:
                msg = self._read(time.monotonic() + 0.001, "anything")
                if "event" in msg:
                    self._events.append(msg)
        except (QmpTimeout, QmpDisconnected):
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            self._gone = self._gone or f"the connection to {self.address} was closed"

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
