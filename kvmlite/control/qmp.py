"""A QMP server: QEMU's machine protocol, as docs/interop/qmp-spec.rst
specifies it, for any table of commands.

    table = CommandTable(schema.COMMANDS, schema.EVENTS)
    table.bind("query-status", monitor.query_status)       # or @handles + bind_all
    server = QmpServer(table)
    server.listen("unix:/tmp/vm1.sock")
    ...
    server.emit("STOP")
    server.close()

The protocol (docs/monitor.md has the whole of it):

* On connect the server sends the greeting
  ``{"QMP": {"version": {"qemu": {"major", "minor", "micro"}, "package"}, "capabilities": []}}``.
* Until the client sends ``qmp_capabilities``, every other command gets
  CommandNotFound, and no events are sent (capabilities negotiation).
* Requests are JSON objects, back to back with or without whitespace
  (jsonstream.py splits them); ``{"execute": NAME, "arguments": {...}, "id": ANY}``.
* Each request gets one reply, ``{"return": ...}`` or
  ``{"error": {"class", "desc"}}``, with the request's ``id`` when it had one;
  every message the server sends ends with CRLF.
* Events ``{"event", "data", "timestamp": {"seconds", "microseconds"}}`` go
  to every connection that has negotiated.

Threads: each connection has a reader thread, which parses requests and runs
their handlers, and a writer thread, which sends replies and events in order.
Handlers run one at a time across all connections (as QEMU runs commands
under its big lock), so a handler may check-then-act without racing another
client; a handler must therefore return promptly and leave long work to its
own thread.
"""

from __future__ import annotations

import collections
import errno
import inspect
import json
import logging
import os
import socket
import stat
import threading
import time
from typing import Any, Callable, Iterable

from .. import __version__
from ..errors import KvmliteError
from .jsonstream import MAX_SIZE, JsonError, JsonStream
from .qapi import (EMPTY, INT, STR, Array, Command, Enum, ErrorClass, Event, QmpError,
                   Struct)

log = logging.getLogger("kvmlite.monitor")

MAX_CONNECTIONS = 16            # at once; more are closed as soon as accepted
MAX_BACKLOG = 16 << 20          # bytes queued for a client that does not read: then it is dropped
READ_SIZE = 64 << 10

__all__ = ["CommandTable", "QmpServer", "QmpError", "ErrorClass", "MonitorError", "handles",
           "parse_address", "BUILTIN_COMMANDS"]


class MonitorError(KvmliteError):
    """The monitor cannot listen where it was asked to."""


# ---- the commands every QMP server has ------------------------------------------------
# qapi/control.json

QMP_CAPABILITY = Enum("QMPCapability", ("oob",))
VERSION_TRIPLE = Struct("VersionTriple", {"major": INT, "minor": INT, "micro": INT})
VERSION_INFO = Struct("VersionInfo", {"qemu": VERSION_TRIPLE, "package": STR})
COMMAND_INFO = Struct("CommandInfo", {"name": STR})

QMP_CAPABILITIES = Command(
    "qmp_capabilities", {"*enable": Array(QMP_CAPABILITY)},
    doc="Leave capabilities negotiation; required before any other command.")
QUERY_VERSION = Command(
    "query-version", returns=VERSION_INFO,
    doc="The server's version (kvmlite's, in QEMU's triple) and package string.")
QUERY_COMMANDS = Command(
    "query-commands", returns=Array(COMMAND_INFO, max_len=1 << 16),
    doc="The commands this server runs.")
BUILTIN_COMMANDS = (QMP_CAPABILITIES, QUERY_VERSION, QUERY_COMMANDS)


def handles(name: str) -> Callable:
    """Mark a method as the handler of command `name`, for `CommandTable.bind_all`."""
    def mark(fn):
        fn.__qmp_command__ = name
        return fn
    return mark


class CommandTable:
    """The commands and events a server knows, and the handlers bound to them.

    A command runs only once a handler is bound to it; `query-commands`
    lists exactly those.  A handler is called with the command's arguments as
    keywords, wire names with ``-`` turned into ``_`` (``downtime-limit`` →
    ``downtime_limit``); an optional argument the client left out is not
    passed, so the handler's default applies.  It returns the ``return``
    value (None means ``{}``) or raises QmpError (or a KvmliteError, which
    becomes a GenericError with its message).
    """

    def __init__(self, commands: Iterable[Command] = (), events: Iterable[Event] = (),
                 check_returns: bool = False):
        self.commands: dict[str, Command] = {c.name: c for c in BUILTIN_COMMANDS}
        for c in commands:
            self.commands[c.name] = c
        self.events: dict[str, Event] = {e.name: e for e in events}
        self.check_returns = check_returns
        self._handlers: dict[str, Callable] = {}

    def bind(self, name: str, handler: Callable) -> None:
        spec = self.commands.get(name)
        if spec is None:
            raise KeyError(f"no command {name!r} is declared")
        if spec in BUILTIN_COMMANDS:
            raise ValueError(f"{name} is built into the server")
        _check_signature(spec, handler)
        self._handlers[name] = handler

    def bind_all(self, obj: Any) -> list[str]:
        """Bind every method of `obj` marked with @handles; returns their names."""
        bound = []
        for attr in dir(type(obj)):
            fn = getattr(type(obj), attr, None)
            name = getattr(fn, "__qmp_command__", None)
            if name is not None:
                self.bind(name, getattr(obj, attr))
                bound.append(name)
        return bound

    def handler(self, name: str) -> Callable:
        """Decorator form of `bind`, for plain functions."""
        def deco(fn):
            self.bind(name, fn)
            return fn
        return deco

    def unbound(self) -> list[str]:
        builtin = {c.name for c in BUILTIN_COMMANDS}
        return sorted(n for n in self.commands if n not in self._handlers and n not in builtin)

    def names(self) -> list[str]:
        return sorted({c.name for c in BUILTIN_COMMANDS} | set(self._handlers))

    def call(self, name: str, arguments: dict) -> Any:
        """Check the arguments against the declaration, then run the handler."""
        handler = self._handlers.get(name)
        if handler is None:
            raise QmpError(ErrorClass.COMMAND_NOT_FOUND, f"The command {name[:128]} has not been found")
        spec = self.commands[name]
        args = spec.args.check(arguments, "")
        result = handler(**{k.replace("-", "_"): v for k, v in args.items()})
        if result is None:
            result = {}
        if self.check_returns and spec.returns is not None:
            try:
                spec.returns.check(result, "")
            except QmpError as e:
                raise TypeError(f"{name} returned a value outside its declaration: {e.desc}") from None
        return result


def _check_signature(spec: Command, handler: Callable) -> None:
    """A handler must take every argument the declaration allows, and need no
    other: checked once at bind time, so no call can fail with a TypeError."""
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for m in spec.args.fields:
        p = params.get(m.pyname)
        if p is None and not var_kw:
            raise TypeError(f"handler for {spec.name} does not take argument {m.name!r} "
                            f"(as keyword {m.pyname!r})")
        if p is not None and p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"handler for {spec.name}: {m.pyname!r} must be a keyword parameter")
        if p is not None and m.optional and p.default is p.empty:
            raise TypeError(f"handler for {spec.name}: optional argument {m.name!r} needs a default")
    declared = {m.pyname for m in spec.args.fields}
    for p in params.values():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.name not in declared and p.default is p.empty:
            raise TypeError(f"handler for {spec.name} requires {p.name!r}, which the command "
                            "does not declare")


# ---- addresses -----------------------------------------------------------------------

def parse_address(address: str) -> tuple:
    """``unix:PATH`` or a bare path → ("unix", path); ``tcp:HOST:PORT``,
    ``tcp:PORT`` or QEMU's ``tcp::PORT`` (both 127.0.0.1; ``[v6]`` hosts in
    brackets) → ("tcp", host, port).  QEMU's chardev options ``server``,
    ``server=on``, ``wait=off`` and ``nowait`` are accepted and mean what
    kvmlite always does.  The parser is kvmlite's one for every address
    (endpoints.parse_endpoint); a bad one is a MonitorError."""
    from ..endpoints import TcpUri, parse_endpoint
    from ..errors import ConfigError
    try:
        where = parse_endpoint(address, what="monitor address", kinds=("tcp", "unix"),
                               bare_path=True, chardev_options=True, port_zero=True)
    except ConfigError as e:
        raise MonitorError(str(e)) from None
    if isinstance(where, TcpUri):
        return ("tcp", where.host, where.port)
    return ("unix", where.path)


# ---- the server --------------------------------------------------------------------------

def _version_triple(version: str) -> dict:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    parts += [0] * (3 - len(parts))
    return {"major": parts[0], "minor": parts[1], "micro": parts[2]}


def _encode(msg: dict) -> bytes:
    # The spec: the server's output is ASCII and each message ends with CRLF.
    return json.dumps(msg, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\r\n"


def _error(cls: str, desc: str) -> dict:
    return {"error": {"class": cls, "desc": desc}}


class QmpServer:
    """Serves a CommandTable on any number of Unix and TCP listeners, to any
    number of clients at once."""

    def __init__(self, table: CommandTable, *, version: str = __version__,
                 package: str | None = None, max_request: int = MAX_SIZE,
                 max_connections: int = MAX_CONNECTIONS):
        self.table = table
        self.version_info = {"qemu": _version_triple(version),
                             "package": package if package is not None else f"kvmlite {version}"}
        self.max_request = max_request
        self.max_connections = max_connections
        self._lock = threading.Lock()          # connections and listeners
        self._dispatch = threading.Lock()      # handlers run one at a time
        self._listeners: list[_Listener] = []
        self._conns: set[_Connection] = set()
        self._closed = False
        self._running = threading.local()      # .handler: this thread is running a handler

    # -- listening

    def listen(self, address: str) -> str:
        """Start accepting at `address`; returns where it listens (with the
        port a ``tcp:HOST:0`` got)."""
        kind, *where = parse_address(address)
        listener = _Listener.unix(where[0]) if kind == "unix" else _Listener.tcp(*where)
        with self._lock:
            if self._closed:
                listener.close()
                raise MonitorError("the monitor is closed")
            self._listeners.append(listener)
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True,
                         name=f"qmp-accept {listener.address}").start()
        return listener.address

    @property
    def addresses(self) -> list[str]:
        return [listener.address for listener in self._listeners]

    def _accept_loop(self, listener: _Listener) -> None:
        while True:
            try:
                sock, _ = listener.sock.accept()
            except OSError:
                return                          # the listener was closed
            with self._lock:
                full = self._closed or len(self._conns) >= self.max_connections
                if not full:
                    conn = _Connection(self, sock, listener.address)
                    self._conns.add(conn)
            if full:
                if not self._closed:
                    log.warning("monitor %s: refusing a connection: %d are open",
                                listener.address, self.max_connections)
                sock.close()
                continue
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    # -- events

    def emit(self, name: str, data: dict | None = None) -> None:
        """Send event `name` to every connection that has negotiated.
        Raises ValueError if the event or its data is not as declared."""
        spec = self.table.events.get(name)
        if spec is None:
            raise ValueError(f"event {name!r} is not declared")
        struct = spec.struct
        if struct is None and data is not None:
            raise ValueError(f"event {name} carries no data")
        if struct is not None:
            try:
                struct.check(data if data is not None else {}, "")
            except QmpError as e:
                raise ValueError(f"event {name}: {e.desc}") from None
        now = time.time()
        msg: dict = {"event": name}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = {"seconds": int(now), "microseconds": int(now * 1e6) % 1_000_000}
        raw = _encode(msg)
        with self._lock:
            conns = [c for c in self._conns if c.negotiated]
        for conn in conns:
            conn.push(raw, event=True)

    # -- requests

    def handle(self, conn: _Connection | None, item: Any) -> dict:
        """One parsed request (or parse error) → its reply.  Never raises."""
        if isinstance(item, JsonError):
            return _error(ErrorClass.GENERIC, item.desc)
        if not isinstance(item, dict):
            return _error(ErrorClass.GENERIC, "QMP input must be a JSON object")
        try:
            reply = {"return": self._execute(conn, item)}
        except QmpError as e:
            reply = _error(e.cls, e.desc)
        if "id" in item:
            reply["id"] = item["id"]
        return reply

    def reply(self, conn: _Connection | None, item: Any) -> bytes:
        """`handle`, encoded for the wire.  A handler's result that JSON
        cannot carry (NaN, an object) is a bug: logged, answered as one."""
        reply = self.handle(conn, item)
        try:
            return _encode(reply)
        except (TypeError, ValueError) as e:
            name = item.get("execute") if isinstance(item, dict) else None
            log.error("monitor: the reply to %s is not JSON: %s", name, e)
            bad = _error(ErrorClass.GENERIC, f"internal error in '{name}' (the VMM's log has the details)")
            if "id" in reply:
                bad["id"] = reply["id"]
            return _encode(bad)

    def _execute(self, conn: _Connection | None, req: dict) -> Any:
        # qapi/qmp-dispatch.c: qmp_dispatch_check_obj, then the command
        for key, value in req.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise QmpError(ErrorClass.GENERIC, "QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError(ErrorClass.GENERIC, "QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpError(ErrorClass.GENERIC, f"QMP input member '{key[:64]}' is unexpected")
        if "execute" not in req:
            raise QmpError(ErrorClass.GENERIC, "QMP input lacks member 'execute'")
        name, args = req["execute"], req.get("arguments", {})
        negotiated = conn is None or conn.negotiated
        if name == QMP_CAPABILITIES.name:
            if negotiated:
                raise QmpError(ErrorClass.COMMAND_NOT_FOUND,
                               "Capabilities negotiation is already complete, command ignored")
            for cap in QMP_CAPABILITIES.args.check(args, "").get("enable", []):
                raise QmpError(ErrorClass.GENERIC, f"Capability '{cap}' not available")
            conn.negotiated = True
            return {}
        if not negotiated:
            raise QmpError(ErrorClass.COMMAND_NOT_FOUND,
                           "Expecting capabilities negotiation with 'qmp_capabilities'")
        if name in (QUERY_VERSION.name, QUERY_COMMANDS.name):
            EMPTY.check(args, "")
            if name == QUERY_VERSION.name:
                return self.version_info
            return [{"name": n} for n in self.table.names()]
        with self._dispatch:
            if self._closed:                   # queued behind a quit: the VMM is going
                raise QmpError(ErrorClass.GENERIC, "the monitor is closing")
            self._running.handler = True
            try:
                return self.table.call(name, args)
            except QmpError:
                raise
            except KvmliteError as e:
                raise QmpError(ErrorClass.GENERIC, str(e)) from None
            except Exception:
                log.exception("monitor: command %s failed", name)
                raise QmpError(ErrorClass.GENERIC, f"internal error in '{name}' "
                                                   "(the VMM's log has the details)") from None
            finally:
                self._running.handler = False

    def greeting(self) -> dict:
        return {"QMP": {"version": self.version_info, "capabilities": []}}

    # -- shutting down

    def settle(self, timeout: float = 2.0) -> None:
        """Wait (up to `timeout`) until every request being handled has its
        reply queued: so that an event raised because of a command (SHUTDOWN
        after quit) follows that command's reply, as in QEMU."""
        deadline = time.monotonic() + timeout
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            if threading.current_thread() is conn._reader:
                continue                       # called from a handler: its reply is not due yet
            with conn._cv:
                while conn._busy and not conn._dead:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    conn._cv.wait(left)

    def linger(self, timeout: float) -> None:
        """Wait (up to `timeout`) for the clients to hang up first.  A client that
        sent quit reads the reply and the SHUTDOWN event, then closes: QEMU's
        clients (qmp-shell, qemu.qmp) report an error if the server closes
        before they do."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._conns:
                    return
            time.sleep(0.01)

    def close(self, timeout: float = 2.0) -> None:
        """Stop listening; send what is queued (up to `timeout`), then close
        every connection.  A handler may call it (``quit``): its own reply
        still goes out, and commands queued behind it are refused."""
        with self._lock:
            self._closed = True
            listeners, self._listeners = self._listeners, []
            conns = list(self._conns)
        for listener in listeners:
            listener.close()
        deadline = time.monotonic() + timeout
        for conn in conns:
            conn.close()
        if getattr(self._running, "handler", False):
            return      # a handler (quit) closes: the others wait for its lock; they finish alone
        for conn in conns:
            conn.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> QmpServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Connection:
    def __init__(self, server: QmpServer, sock: socket.socket, where: str):
        self.server = server
        self.sock = sock
        self.where = where
        self.negotiated = False
        self._out: collections.deque[bytes] = collections.deque()
        self._queued = 0                      # bytes in _out
        self._cv = threading.Condition()
        self._closing = False                 # send what is queued, then hang up
        self._busy = False                    # a request is being handled: its reply is to come
        self._dead = False                    # hung up: nothing more is sent
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name=f"qmp {where}")
        self._writer = threading.Thread(target=self._write_loop, daemon=True, name=f"qmp-out {where}")

    def start(self) -> None:
        self._writer.start()
        self._reader.start()

    def push(self, raw: bytes, event: bool = False) -> None:
        """Queue a message.  A reply waits while the client is behind (the
        reader stops reading its requests meanwhile); an event never waits:
        a client that lets MAX_BACKLOG bytes pile up is hung up on."""
        with self._cv:
            if not event:
                self._busy = False
            if self._dead:
                return
            if event and self._queued > MAX_BACKLOG:
                log.warning("monitor %s: client is not reading; hanging up", self.where)
                self._hang_up()
                return
            while not event and self._queued > MAX_BACKLOG and not self._dead:
                self._cv.wait(1.0)
            self._out.append(raw)
            self._queued += len(raw)
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()

    def join(self, timeout: float) -> None:
        """Wait for the connection to end; past `timeout`, hang up on it.  When
        a handler of this connection closes the server (quit), its reply is
        still to be queued: the writer sends it, then hangs up."""
        if threading.current_thread() is self._reader:
            return
        self._reader.join(timeout)
        if self._reader.is_alive():
            with self._cv:
                if not self._dead:
                    self._hang_up()

    def _hang_up(self) -> None:               # with self._cv held
        self._dead = True
        self._out.clear()
        self._queued = 0
        self._cv.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_loop(self) -> None:
        stream = JsonStream(max_size=self.server.max_request)
        try:
            self.push(_encode(self.server.greeting()))
            while not self._dead:
                try:
                    data = self.sock.recv(READ_SIZE)
                except OSError:
                    break
                items = stream.feed(data) if data else stream.eof()
                for item in items:
                    with self._cv:
                        if self._closing or self._dead:
                            break              # the server is closing: no new commands
                        self._busy = True
                    self.push(self.server.reply(self, item))
                if not data:
                    break
        except Exception:                      # a bug here must not take the VMM down
            log.exception("monitor %s: connection failed", self.where)
        finally:
            with self._cv:
                self._busy = False
            self.close()
            self._writer.join()
            self.sock.close()
            self.server._forget(self)

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self._out and not self._dead and (not self._closing or self._busy):
                    self._cv.wait()
                if self._dead or not self._out:
                    self._hang_up()
                    return
                raw = self._out.popleft()
            try:
                self.sock.sendall(raw)
            except OSError:
                with self._cv:
                    self._hang_up()
                return
            with self._cv:
                self._queued -= len(raw)
                self._cv.notify_all()


class _Listener:
    def __init__(self, sock: socket.socket, address: str, path: str | None = None):
        self.sock = sock
        self.address = address
        self.path = path
        self.inode = os.stat(path).st_ino if path else None

    @classmethod
    def unix(cls, path: str) -> _Listener:
        _clear_unix_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)              # the monitor controls the VM: its owner only
            sock.listen(8)
        except OSError as e:
            sock.close()
            why = "someone else created it meanwhile" if e.errno == errno.EADDRINUSE else e.strerror or e
            raise MonitorError(f"cannot listen on monitor socket {path}: {why}") from None
        return cls(sock, f"unix:{path}", path)

    @classmethod
    def tcp(cls, host: str, port: int) -> _Listener:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=8)
        except OSError as e:
            raise MonitorError(f"cannot listen on monitor tcp:{host}:{port}: {e.strerror or e}") from None
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
        return cls(sock, f"tcp:{shown}:{bound_port}")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()
        if self.path is not None:
            # remove the socket only if it is still ours, not a successor's
            try:
                if os.stat(self.path).st_ino == self.inode:
                    os.unlink(self.path)
            except OSError:
                pass


def _clear_unix_path(path: str) -> None:
    """Make `path` free for a new socket, or say why not.  Only a stale socket
    (one nobody listens on) is removed; anything else is left alone."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise MonitorError(f"cannot create monitor socket {path}: directory {parent} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise MonitorError(f"cannot create monitor socket {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MonitorError(f"cannot create monitor socket {path}: it is a directory")
    if not stat.S_ISSOCK(st.st_mode):
        raise MonitorError(f"cannot create monitor socket {path}: a file that is not a socket "
                           "is there; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass                                   # stale: its owner is gone
    except OSError as e:
        raise MonitorError(f"cannot create monitor socket {path}: cannot tell whether "
                           f"it is in use ({e.strerror or e})") from None
    else:
        raise MonitorError(f"cannot create monitor socket {path}: another process is listening "
                           "on it (another VMM with the same --monitor?)")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
