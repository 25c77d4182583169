"""How a migration stream travels: to a TCP peer (optionally TLS, optionally keyed) or a file.

On TCP, before any of the stream, the two VMMs run the connection handshake
of docs/wire-format.md: the destination says whether it requires a shared key,
and if it does, each side proves it holds the key (HMAC-SHA256 over both
sides' random nonces, so neither proof can be replayed) before the
destination reads a single byte of VM state.  With `--tls-*` the handshake
and the stream run inside TLS with certificates checked both ways.

A destination serves several pending connections at once, each with one
deadline for its whole handshake, so peers that say nothing or drip a byte
at a time cannot keep a real source out (`Listener`).

Over `unix:PATH` (a destination on this host) the same handshake runs without
TLS; the destination takes only a source of its own user (or root), and a
local migration hands the guest's RAM over as a descriptor (`UnixSink.send_fd`,
`FdReceiver`).  A migration over several TCP connections (`--channels N`)
asks for them in the handshake; kvmlite/migration/channels.py sends and
receives on them.
"""

from __future__ import annotations

import array
import hashlib
import hmac
import os
import selectors
import socket
import stat
import threading
import time
from typing import Any, Protocol

from ..config import MAX_CHANNELS, Credentials
from ..endpoints import FileUri, TcpUri, UnixUri, parse_uri  # noqa: F401  (re-exported for callers)
from ..errors import ConfigError, MigrationError, StreamError
from ..log import log
from . import wire

HANDSHAKE_VERSION = 1
NONCE_SIZE = 32
MAX_FRAME = 4096                 # handshake frames: small, and read before authentication
OFFERS = ("postcopy",)           # what a destination's HELLO may say it can take
AUTH_NONE = "none"
AUTH_HMAC = "hmac-sha256"
# Domain separation: a source's proof can never pass as a destination's.
_SOURCE_PROOF = b"kvmlite-auth-v1 source"
_DEST_PROOF = b"kvmlite-auth-v1 destination"
# Coalesce small buffers into TLS records of up to this size: one record per
# 13-byte PAGES head would cost more in record overhead than the pages.
TLS_COALESCE = 256 * 1024
# Socket buffers, both ends.  Measured on loopback here: 1 MiB buffers move
# 6.6 GB/s against 4.3 GB/s with the kernel's autotuned ones, and they bound
# what is still in flight when the vCPUs pause, which the downtime must drain.
SOCKET_BUFFER = 1 << 20
# A peer has this long, in all, from connecting to the end of the handshake.
HANDSHAKE_TIMEOUT = 5.0
# Connections whose handshakes run at once; the oldest is dropped for a newer one.
MAX_PENDING = 64


# ---- TLS contexts ---------------------------------------------------------------------

def tls_context(creds: Credentials, server: bool):
    import ssl   # imported here: ssl costs start-up time a VM without TLS need not pay
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(creds.tls_cert, creds.tls_key)
        ctx.load_verify_locations(creds.tls_ca)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot load the TLS certificates: {e}") from None
    if server:
        ctx.verify_mode = ssl.CERT_REQUIRED      # mutual: the source shows a certificate too
    return ctx


def check_tls(creds: Credentials) -> None:
    """Load the certificates once, so that bad ones fail at start-up, not mid-migration."""
    if creds.tls:
        tls_context(creds, server=True)


# ---- the handshake ------------------------------------------------------------------------

class _Deadline:
    """A socket whose every receive ends at one deadline, however the peer paces its bytes."""

    def __init__(self, sock, deadline: float):
        self.sock = sock
        self.deadline = deadline

    def recv_into(self, view, n: int = 0) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake deadline")
        self.sock.settimeout(left)
        return self.sock.recv_into(view, n)

    def sendall(self, data) -> None:
        self.sock.settimeout(max(self.deadline - time.monotonic(), 0.001))
        self.sock.sendall(data)


def _read_frame(sock, what: str) -> dict:
    try:
        return wire.read_frame(sock, what, max_len=MAX_FRAME)
    except StreamError as e:
        msg = str(e)
        if "timed out" in msg:
            raise StreamError(f"{what}: the peer sent nothing (timed out)") from None
        raise


def _encode(obj: dict) -> bytes:
    return wire.encode_frame(obj, max_len=MAX_FRAME)


def _field(obj: dict, name: str, kind, what: str, size: int | None = None):
    value = obj.get(name)
    if not isinstance(value, kind) or (size is not None and len(value) != size):
        raise StreamError(f"{what}: field {name!r} is missing or malformed")
    return value


def _mac(key: bytes, label: bytes, *nonces: bytes) -> bytes:
    return hmac.new(key, label + b"".join(nonces), hashlib.sha256).digest()


def server_handshake(sock, creds: Credentials, *, offers: dict | None = None, channels: int = 1,
                     asked: dict | None = None):
    """Destination side: HELLO, then (with a key) check the source's proof and prove ours.

    `offers`: what this destination can take, added to HELLO (`{"postcopy": 1}`).
    Raises StreamError if the source cannot prove it holds the key; by then
    the destination has read only handshake frames, no VM state.  Returns the
    stream's integrity keys (or None).  With `channels` > 1, HELLO offers that
    many connections; `asked`, if given, gets what the source asked for:
    {"channels": N, "session": this connection's nonce} on a main connection,
    {"join": session, "channel": i} on a secondary one.
    """
    nonce_d = os.urandom(NONCE_SIZE)
    auth = AUTH_HMAC if creds.key else AUTH_NONE
    hello = {**(offers or {}), "kvmlite": HANDSHAKE_VERSION, "auth": auth, "nonce": nonce_d}
    if channels > 1:
        hello["channels"] = channels
    sock.sendall(_encode(hello))
    what = "handshake from the source"
    reply = _read_frame(sock, what)
    if reply.get("kvmlite") != HANDSHAKE_VERSION:
        raise StreamError(f"{what}: not a kvmlite source speaking handshake version {HANDSHAKE_VERSION}")
    request = _channel_request(reply, channels, what)
    if asked is not None:
        asked.update(request, session=nonce_d)
    if creds.key is None:
        return None
    proof = reply.get("mac")
    if proof is None:
        why = "the source has no key (start it with --auth-key)"
    else:
        nonce_s = _field(reply, "nonce", bytes, what, NONCE_SIZE)
        good = isinstance(proof, bytes) and hmac.compare_digest(
            proof, _mac(creds.key, _SOURCE_PROOF, nonce_d, nonce_s))
        why = None if good else "the source's key does not match"
    if why:
        _send_quietly(sock, _encode({"status": "error", "error": f"authentication failed: {why}"}))
        raise StreamError(f"authentication failed: {why}")
    sock.sendall(_encode({"status": "ok", "mac": _mac(creds.key, _DEST_PROOF, nonce_s, nonce_d)}))
    return _stream_keys(creds, nonce_d, nonce_s)


def _channel_request(reply: dict, offered: int, what: str) -> dict:
    """The channel fields of a source's frame 2, checked against what HELLO offered."""
    if "join" in reply:
        token, i = reply.get("join"), reply.get("channel")
        if not isinstance(token, bytes) or len(token) != NONCE_SIZE or type(i) is not int \
                or not 1 <= i < offered:
            raise StreamError(f"{what}: a malformed request to join as a secondary channel")
        return {"join": token, "channel": i}
    n = reply.get("channels", 1)
    if type(n) is not int or not 1 <= n <= offered:
        raise StreamError(f"{what}: asks for {wire._show(n, 20)} connections; this destination "
                          f"takes 1 to {offered}")
    return {"channels": n}


def client_handshake(sock, creds: Credentials, ask=None, offers: dict | None = None):
    """Source side: read HELLO, prove the key if asked, check the destination's proof.

    A source that holds a key refuses a destination that does not ask for
    one: it would otherwise hand the VM to whoever listens on the port.
    `ask(hello)`, if given, returns fields to add to frame 2 (the connections
    asked for, or a secondary channel's join).  `offers`, if given, gets what
    the destination said it can take (HELLO's `postcopy`).  Returns the
    stream's keys.
    """
    what = "handshake from the destination"
    hello = _read_frame(sock, what)
    if offers is not None:
        offers.update({k: hello[k] for k in OFFERS if hello.get(k) == 1})
    if hello.get("kvmlite") != HANDSHAKE_VERSION:
        raise MigrationError(f"{what}: not a kvmlite destination speaking handshake "
                             f"version {HANDSHAKE_VERSION}")
    auth = hello.get("auth")
    if auth not in (AUTH_NONE, AUTH_HMAC):
        raise MigrationError(f"{what}: unknown authentication {auth!r}")
    mine = {**(ask(hello) if ask is not None else {}), "kvmlite": HANDSHAKE_VERSION}
    if auth == AUTH_NONE:
        if creds.key is not None:
            raise MigrationError("the destination does not authenticate (start it with --auth-key); "
                                 "refusing to send the VM to an unauthenticated peer")
        sock.sendall(_encode(mine))
        return None
    if creds.key is None:
        sock.sendall(_encode({"kvmlite": HANDSHAKE_VERSION}))   # so the destination can say why
        raise MigrationError("the destination requires authentication: give --auth-key")
    nonce_d = _field(hello, "nonce", bytes, what, NONCE_SIZE)
    nonce_s = os.urandom(NONCE_SIZE)
    sock.sendall(_encode({**mine, "nonce": nonce_s,
                          "mac": _mac(creds.key, _SOURCE_PROOF, nonce_d, nonce_s)}))
    answer = _read_frame(sock, what)
    if answer.get("status") == "error":
        raise MigrationError(f"the destination refused: {str(answer.get('error'))[:200]}")
    proof = answer.get("mac")
    if answer.get("status") != "ok" or not isinstance(proof, bytes) or not hmac.compare_digest(
            proof, _mac(creds.key, _DEST_PROOF, nonce_s, nonce_d)):
        raise MigrationError("authentication failed: the destination's key does not match")
    return _stream_keys(creds, nonce_d, nonce_s)


def _stream_keys(creds: Credentials, nonce_d: bytes, nonce_s: bytes) -> "wire.StreamKeys | None":
    """The keys that protect the stream's integrity: derived from the shared key
    and this connection's nonces, on a keyed link without TLS.  With TLS the
    records of TLS protect it already."""
    if creds.key is None or creds.tls:
        return None
    return wire.StreamKeys.derive(creds.key, nonce_d, nonce_s)


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


# ---- sending: one interface over a plain socket, a TLS socket and a file ----------------

def _after(bufs: list, n: int) -> list:
    """What is left of `bufs` once the first `n` bytes went out (a partial sendmsg/writev)."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = memoryview(rest[0])[n:]
    return rest


class PageChannel(Protocol):
    """A secondary channel the sender hands a batch of PAGES records to
    (channels.py): it tags and checksums them in its own stream."""
    def send_pages(self, heads: memoryview, memory: Any, offsets: Any, npages: Any) -> int: ...


class Sink(Protocol):
    """Where a migration stream goes: SocketSink, TlsSink, UnixSink, FileSink,
    channels.ChannelSink, or a test's fake (Migration's `sink=`).  `keys`: the
    stream's integrity keys when page records must carry tags (a keyed link
    without TLS, a snapshot file).  `channels` and the four calls after
    `close` are the sender's questions about channels (OneStream answers
    them for a sink of one stream); `send_fd`, a local migration's."""
    @property
    def kind(self) -> str: ...
    @property
    def expects_reply(self) -> bool: ...
    @property
    def keys(self) -> wire.StreamKeys | None: ...
    @property
    def channels(self) -> int: ...

    def send(self, bufs: list[Any]) -> None: ...
    def unacked(self) -> int: ...
    def settimeout(self, t: float) -> None: ...    # a sink that expects_reply also has recv_into
    def abort(self) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...
    def begin(self, info: dict[str, Any]) -> None: ...
    def page_channel(self) -> PageChannel | None: ...
    def end_round(self, n: int) -> None: ...
    def close_channels(self) -> None: ...
    def send_fd(self, data: bytes, fd: int) -> None: ...


class OneStream:
    """What a sink of one stream answers to the sender's questions about
    channels: it has none.  (channels.ChannelSink spreads PAGES over several
    connections.)  Nor can it carry a descriptor (UnixSink can)."""
    channels = 1
    kind = "stream"

    def begin(self, info: dict[str, Any]) -> None:
        """The main stream's preamble, with header `info`, has been sent."""

    def page_channel(self) -> PageChannel | None:
        """Where the next batch of PAGES records goes: None is the main stream."""
        return None

    def end_round(self, n: int) -> None:
        """Round n's pages are all handed over; ROUND n follows on the main stream."""

    def close_channels(self) -> None:
        """Every channel ends (its END); later pages go on the main stream."""

    def send_fd(self, data: bytes, fd: int) -> None:
        """Send `data` with descriptor `fd` attached (SCM_RIGHTS): only over unix:PATH."""
        raise MigrationError(f"a {self.kind} stream cannot carry the guest's RAM as a descriptor: "
                             "a local migration goes to unix:PATH")


class SocketSink(OneStream):
    """Plain TCP: `sendmsg` straight from guest memory, no copies.  `keys`:
    the stream's integrity keys on a keyed link (none over TLS, which has its own).
    `offers`: what the destination said in the handshake it can take."""
    kind = "tcp"
    expects_reply = True

    def __init__(self, sock: socket.socket, keys=None, offers: dict | None = None):
        self.sock = sock
        self.keys = keys
        self.offers = offers or {}

    def send(self, bufs: list) -> None:
        while bufs:
            bufs = _after(bufs, self.sock.sendmsg(bufs))

    def unacked(self) -> int:
        """Bytes sent but not yet acknowledged by the peer (SIOCOUTQ)."""
        import fcntl
        import termios
        out = bytearray(4)
        fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, out)   # = SIOCOUTQ on a TCP socket
        return int.from_bytes(out, "little")

    def settimeout(self, t: float) -> None:
        self.sock.settimeout(t)

    def recv_into(self, view, n: int) -> int:
        return self.sock.recv_into(view, n)

    def abort(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


class TlsSink(SocketSink):
    """TLS: no sendmsg on an SSLSocket, so small buffers are coalesced into records."""
    kind = "tls"

    def send(self, bufs: list) -> None:
        sock = self.sock
        pending = bytearray()
        for b in bufs:
            if len(b) >= TLS_COALESCE:
                if pending:
                    sock.sendall(pending)
                    pending.clear()
                sock.sendall(b)
            else:
                pending += b
                if len(pending) >= TLS_COALESCE:
                    sock.sendall(pending)
                    pending.clear()
        if pending:
            sock.sendall(pending)


class UnixSink(SocketSink):
    """A unix socket to a destination on this host: `sendmsg` as over TCP, and
    `send_fd` to hand over a descriptor (SCM_RIGHTS) with the first bytes of a piece."""
    kind = "unix"

    def send_fd(self, data: bytes, fd: int) -> None:
        """Send `data` with `fd` attached to its first byte, then the rest of it."""
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        n = self.sock.sendmsg([data], fds)
        if n < len(data):                 # the descriptor went with the first byte
            self.send([memoryview(data)[n:]])


class FdReceiver:
    """The destination's end of a unix socket: the socket interface the stream
    decoder and the handshake use, with every descriptor that arrives
    (SCM_RIGHTS) kept aside.  At most MAX_FDS may come in one connection; a
    peer that sends more, or whose descriptors the kernel had to cut
    (MSG_CTRUNC), is refused, and every descriptor received is closed unless
    `take_fd` claimed it."""
    MAX_FDS = 1

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fds: list[int] = []
        self._anc = socket.CMSG_SPACE(self.MAX_FDS * array.array("i").itemsize)

    def recv_into(self, view, n: int = 0) -> int:
        view = memoryview(view).cast("B")
        got, anc, flags, _ = self.sock.recvmsg_into([view[:n or len(view)]], self._anc)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC or len(self.fds) > self.MAX_FDS:
            self._close_fds()
            raise StreamError(f"the peer sent more than {self.MAX_FDS} descriptor(s)")
        return got

    def take_fd(self) -> int | None:
        """The descriptor received, if one was; it is the caller's from now on."""
        return self.fds.pop() if self.fds else None

    def sendall(self, data) -> None:
        self.sock.sendall(data)

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def _close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def close(self) -> None:
        self._close_fds()
        self.sock.close()


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a unix socket (SO_PEERCRED)."""
    ucred = array.array("i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                             3 * array.array("i").itemsize))   # pid, uid, gid
    return ucred[1]


def _local(creds: Credentials) -> Credentials:
    """The credentials a unix socket uses: the key only.  The peer is on this
    host (checked by its user id), so there is no TLS; both ends drop it alike."""
    return Credentials(key=creds.key)


class FileSink(OneStream):
    """A snapshot file, written as PATH.part and renamed when complete, so a
    failed or cancelled save never leaves a file that looks like a snapshot."""
    kind = "file"
    expects_reply = False
    offers: dict = {}
    keys = wire.FILE_KEYS      # a snapshot carries tags: a changed bit anywhere is found

    def __init__(self, path: str):
        self.path = path
        self.part = path + ".part"
        try:
            self.fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            raise MigrationError(f"cannot write {self.part}: {e.strerror}") from None
        self.done = False

    def send(self, bufs: list) -> None:
        while bufs:
            bufs = _after(bufs, os.writev(self.fd, bufs[:1024]))    # IOV_MAX is 1024 on Linux

    def unacked(self) -> int:
        return 0

    def settimeout(self, t: float) -> None:
        pass

    def abort(self) -> None:
        pass

    def finish(self) -> None:
        os.fsync(self.fd)
        os.rename(self.part, self.path)
        self.done = True

    def close(self) -> None:
        os.close(self.fd)
        if not self.done:
            try:
                os.unlink(self.part)
            except OSError:
                pass


class FileSource:
    """Reads a snapshot file with the socket interface StreamDecoder expects."""
    keys = wire.FILE_KEYS

    def __init__(self, path: str):
        try:
            self.f = open(path, "rb", buffering=0)
        except OSError as e:
            raise StreamError(f"cannot read {path}: {e.strerror}") from None

    def recv_into(self, view, n: int) -> int:
        return self.f.readinto(memoryview(view)[:n])

    def settimeout(self, t: float) -> None:
        pass

    def close(self) -> None:
        self.f.close()


def connect(uri: TcpUri | UnixUri, creds: Credentials, *, connect_timeout: float, io_timeout: float,
            on_socket=None, ask=None):
    """Connect to a destination, run TLS and the handshake; returns a sink.

    `on_socket(sock)` is called as soon as the socket exists, so that a
    cancel can shut it down while connect or the handshake still waits.
    `ask`: client_handshake's (what frame 2 asks for besides).
    """
    if isinstance(uri, UnixUri):
        return _connect_unix(uri, creds, connect_timeout, io_timeout, on_socket)
    sock = socket.socket(socket.AF_INET6 if ":" in uri.host else socket.AF_INET)
    if on_socket is not None:
        on_socket(sock)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(connect_timeout)
        sock.connect((uri.host, uri.port))
        sock.settimeout(io_timeout)
        if creds.tls:
            import ssl
            try:
                sock = tls_context(creds, server=False).wrap_socket(sock, server_hostname=uri.host)
            except ssl.SSLError as e:
                raise MigrationError(f"TLS with {uri} failed: {e.reason or e}") from None
        offers: dict = {}
        keys = client_handshake(sock, creds, ask, offers)
    except BaseException:
        sock.close()
        raise
    return TlsSink(sock, None, offers) if creds.tls else SocketSink(sock, keys, offers)


def _connect_unix(uri: UnixUri, creds: Credentials, connect_timeout: float, io_timeout: float,
                  on_socket) -> UnixSink:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if on_socket is not None:
        on_socket(sock)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(uri.path)
        except FileNotFoundError:
            raise ConnectionRefusedError(f"no socket at {uri.path}") from None
        sock.settimeout(io_timeout)
        keys = client_handshake(sock, _local(creds))
    except BaseException:
        sock.close()
        raise
    return UnixSink(sock, keys)


class Listener:
    """The destination's port: accepts connections and runs each one's handshake
    on its own thread, under one deadline for the whole handshake; the first
    peer to complete it is the source.  Refused peers are logged and waiting
    goes on, so no peer that cannot authenticate, is silent or drips bytes
    keeps a real source out.

    On tcp: without TLS it offers `channels` connections; a source that asks
    for N gets its N - 1 secondary channels from `accept_channels`.  On unix:
    the socket file is mode 0600 and only a peer of this user (or root) is
    served; its connection is an FdReceiver, which can carry the RAM's memfd."""

    def __init__(self, target: TcpUri | UnixUri, creds: Credentials, *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, io_timeout: float = 30.0,
                 max_pending: int = MAX_PENDING, hooks=None, channels: int = MAX_CHANNELS,
                 offers: dict | None = None):
        self.target = target
        self.unix = isinstance(target, UnixUri)
        self.creds = _local(creds) if self.unix else creds
        self.offer = 1 if self.unix or creds.tls else channels
        self.offers = offers
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        self.max_pending = max_pending
        self.hooks = hooks
        self.refused = 0
        self.asked = 1                  # connections the source asked for
        self._session: bytes | None = None
        self._cond = threading.Condition()
        self._winner = None
        self._joins: dict[tuple[bytes, int], tuple] = {}     # (session, i) -> (sock, keys, peer)
        self._pending: list[socket.socket] = []
        self._closed = False
        # A handshake thread that finishes wakes the accepting thread at once: a
        # source whose stream fits the socket buffers is already waiting for
        # READY (a local migration's for "mapped"), and every millisecond until
        # the destination reads counts as downtime.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.sock = _listen_unix(target, max_pending) if self.unix else _listen_tcp(target, max_pending)
        except BaseException:
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise

    def accept(self) -> tuple[socket.socket, str, "wire.StreamKeys | None"]:
        """Wait for a source that completes the handshake; returns (connection,
        peer, the stream's integrity keys or None)."""
        self._serve(lambda: self._winner is not None)
        return self._winner

    def accept_channels(self, timeout: float) -> list[tuple[socket.socket, "wire.StreamKeys | None"]]:
        """The source's secondary channels, in order: connections that passed the
        handshake quoting its session.  All must come within `timeout`, or
        StreamError.  [] when it asked for one connection."""
        want = [(self._session, i) for i in range(1, self.asked)]
        if not self._serve(lambda: all(k in self._joins for k in want), time.monotonic() + timeout):
            with self._cond:
                got = sum(k in self._joins for k in want)
            raise StreamError(f"{got} of the {len(want)} secondary channels asked for came "
                              f"within {timeout:g} s")
        with self._cond:
            chans = [self._joins.pop(k) for k in want]
        return [(sock, keys) for sock, keys, _ in chans]

    def _serve(self, done, deadline: float | None = None) -> bool:
        """Accept connections and start their handshakes until done() (True) or the deadline."""
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                with self._cond:
                    if done():
                        return True
                    if self._closed:
                        raise MigrationError(f"stopped waiting on {self.target}")
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                for key, _ in sel.select(0.05):
                    if key.data == "wake":
                        try:
                            os.read(self._wake_r, 64)
                        except BlockingIOError:
                            pass
                        continue
                    try:
                        conn, addr = self.sock.accept()
                    except OSError:
                        continue
                    self._start(conn, str(self.target) if self.unix else f"{addr[0]}:{addr[1]}")
        finally:
            sel.close()

    def _wake(self) -> None:
        """(Called with self._cond held, after checking _closed: close() cannot
        have closed the pipe.)"""
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass                # full: it is awake already

    def _start(self, conn: socket.socket, peer: str) -> None:
        with self._cond:
            self._pending.append(conn)
            if len(self._pending) > self.max_pending:
                _shut(self._pending.pop(0))     # the oldest handshake makes room
        threading.Thread(target=self._handshake, args=(conn, peer), daemon=True,
                         name=f"handshake {peer}").start()

    def _handshake(self, conn: socket.socket, peer: str) -> None:
        deadline = time.monotonic() + self.handshake_timeout
        asked: dict = {}
        try:
            if self.hooks is not None:
                self.hooks.point("dst:accepted")
            sock = conn
            if self.unix:
                uid = peer_uid(conn)
                peer = f"{peer} (uid {uid})"
                if uid not in (os.geteuid(), 0):
                    raise StreamError(f"the source runs as uid {uid}, this VMM as {os.geteuid()}")
                sock = FdReceiver(conn)
            else:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.creds.tls:
                    sock = _accept_tls(conn, self.creds, deadline)
            keys = server_handshake(_Deadline(sock, deadline), self.creds, offers=self.offers,
                                    channels=self.offer,
                                    asked=asked)
            if self.unix and sock.fds:
                raise StreamError("a descriptor came during the handshake")
            sock.settimeout(self.io_timeout)
        except (StreamError, ConfigError) as e:
            why = str(e)
            if time.monotonic() >= deadline:
                # however the last read put it ("sent nothing"), the deadline ended it
                why = f"the peer did not finish the handshake in {self.handshake_timeout:g} s"
            self._refuse(conn, peer, why)
            return
        except OSError as e:
            self._refuse(conn, peer, "the peer did not finish the handshake in "
                         f"{self.handshake_timeout:g} s" if isinstance(e, TimeoutError)
                         else (e.strerror or str(e)))
            return
        with self._cond:
            if conn in self._pending:
                self._pending.remove(conn)
            if self._closed or ("join" in asked and len(self._joins) >= self.max_pending):
                _shut(sock)
                return
            if "join" in asked:
                # A secondary channel: it may finish before its main connection
                # has won, so it waits here for accept_channels.
                self._joins.setdefault((asked["join"], asked["channel"]), (sock, keys, peer))
                self._cond.notify_all()
                self._wake()
                return
            if self._winner is not None:
                _shut(sock)
                return
            self._winner = (sock, peer, keys)
            self.asked, self._session = asked["channels"], asked["session"]
            self._cond.notify_all()
            self._wake()

    def _refuse(self, conn: socket.socket, peer: str, why: str) -> None:
        with self._cond:
            if conn in self._pending:
                self._pending.remove(conn)
            self.refused += 1
            closed = self._closed
        _shut(conn)
        if closed:
            # close() cut this handshake short (a source was accepted): its
            # error is only that, and nothing is waiting any more
            log.debug(f"dropped the pending connection from {peer}: a source was accepted")
            return
        log.info(f"refused a connection from {peer}: {why}; still waiting")

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, []
            joins, self._joins = list(self._joins.values()), {}
            os.close(self._wake_w)
        for c in pending:
            _shut(c)
        for sock, _, _ in joins:        # channels of no migration, or left over
            _shut(sock)
        self.sock.close()
        os.close(self._wake_r)
        if self.unix:
            try:
                os.unlink(self.target.path)
            except OSError:
                pass


def _listen_tcp(target: TcpUri, backlog: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET6 if ":" in target.host else socket.AF_INET)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # set before listen(): an accepted socket inherits it, and TCP picks
        # its window scale at the handshake
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        srv.bind((target.host, target.port))
        srv.listen(backlog)
    except OSError as e:
        srv.close()
        raise ConfigError(f"cannot listen on {target}: {e.strerror}") from None
    return srv


def _listen_unix(target: UnixUri, backlog: int) -> socket.socket:
    """A listening unix socket at target.path, readable and writable by this user
    only.  A stale socket left there is replaced; any other file is not."""
    try:
        if stat.S_ISSOCK(os.lstat(target.path).st_mode):
            os.unlink(target.path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        old = os.umask(0o177)         # the socket file is born 0600: no window for others
        try:
            srv.bind(target.path)
        finally:
            os.umask(old)
        srv.listen(backlog)           # the caller says "waiting" only after this
    except OSError as e:
        srv.close()
        raise ConfigError(f"cannot listen on {target}: {e.strerror}") from None
    return srv


def _shut(conn) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def _accept_tls(conn: socket.socket, creds: Credentials, deadline: float):
    import ssl
    conn.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        return tls_context(creds, server=True).wrap_socket(conn, server_side=True)
    except ssl.SSLError as e:
        raise StreamError(f"TLS handshake failed: {e.reason or e}") from None
