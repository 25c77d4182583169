"""Where a migration stream goes: a TCP peer (optionally TLS, optionally keyed) or a file.

    tcp:HOST:PORT    a destination VMM (`kvmlite run --incoming tcp:HOST:PORT`)
    tcp:PORT         the same on 127.0.0.1: listening on loopback is the default
    file:PATH        a snapshot: the same stream, written to (or read from) a file

On TCP, before any of the stream, the two VMMs run the connection handshake
of docs/wire-format.md: the destination says whether it requires a shared key,
and if it does, each side proves it holds the key (HMAC-SHA256 over both
sides' random nonces, so neither proof can be replayed) before the
destination reads a single byte of VM state.  With `--tls-*` the handshake
and the stream run inside TLS with certificates checked both ways.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass

import msgpack

from ..errors import ConfigError, MigrationError, StreamError

HANDSHAKE_VERSION = 1
NONCE_SIZE = 32
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096
MAX_FRAME = 4096
AUTH_NONE = "none"
AUTH_HMAC = "hmac-sha256"
# Domain separation: a source's proof can never pass as a destination's.
_SOURCE_PROOF = b"kvmlite-auth-v1 source"
_DEST_PROOF = b"kvmlite-auth-v1 destination"
# Coalesce small buffers into TLS records of up to this size: one record per
# 24-byte PAGES head would cost more in record overhead than the pages.
TLS_COALESCE = 256 * 1024


# ---- URIs ------------------------------------------------------------------------

@dataclass(frozen=True)
class TcpUri:
    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True)
class FileUri:
    path: str

    def __str__(self) -> str:
        return f"file:{self.path}"


def parse_uri(uri: str) -> TcpUri | FileUri:
    """`tcp:HOST:PORT`, `tcp:PORT` (loopback) or `file:PATH`; raises MigrationError."""
    if not isinstance(uri, str):
        raise MigrationError(f"{uri!r}: expected tcp:HOST:PORT or file:PATH")
    if uri.startswith("file:"):
        if not uri[5:]:
            raise MigrationError(f"{uri!r}: expected file:PATH")
        return FileUri(uri[5:])
    if not uri.startswith("tcp:"):
        raise MigrationError(f"{uri!r}: expected tcp:HOST:PORT, tcp:PORT or file:PATH")
    host, _, port = uri[4:].rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise MigrationError(f"{uri!r}: expected tcp:HOST:PORT")
    return TcpUri(host, int(port))


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


# ---- credentials --------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """What a VMM proves itself with: a shared key, TLS certificates, or neither."""
    key: bytes | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def load(cls, auth_key: str | None = None, tls_cert: str | None = None,
             tls_key: str | None = None, tls_ca: str | None = None) -> "Credentials":
        key = read_key(auth_key) if auth_key else None
        tls = (tls_cert, tls_key, tls_ca)
        if any(tls) and not all(tls):
            raise ConfigError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        for path in filter(None, tls):
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: no such file")
        return cls(key, *tls)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED      # mutual: the source shows a certificate too
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # verifies the peer and its name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        return ctx

    def _load(self, ctx: ssl.SSLContext) -> None:
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
            ctx.load_verify_locations(self.tls_ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"cannot load the TLS certificates: {e}") from None


def read_key(path: str) -> bytes:
    """The shared key: the file's bytes, surrounding whitespace removed."""
    try:
        with open(path, "rb") as f:
            key = f.read(MAX_KEY_BYTES + 1).strip()
    except OSError as e:
        raise ConfigError(f"--auth-key {path}: {e.strerror}") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ConfigError(f"--auth-key {path}: a key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} "
                          "bytes (e.g. head -c 32 /dev/urandom | base64 > key)")
    return key


# ---- handshake frames: u32 length + msgpack map, as the migration reply ---------------

def encode_frame(obj: dict) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    assert len(body) <= MAX_FRAME
    return len(body).to_bytes(4, "little") + body


def read_frame(sock, what: str) -> dict:
    """One handshake frame from `sock`; StreamError on anything unexpected."""
    head = _recv_exactly(sock, 4, what)
    n = int.from_bytes(head, "little")
    if not 1 <= n <= MAX_FRAME:
        raise StreamError(f"{what}: frame length {n} is outside 1 to {MAX_FRAME}")
    body = _recv_exactly(sock, n, what)
    try:
        obj = msgpack.unpackb(bytes(body), raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types for malformed input
        raise StreamError(f"{what}: not a msgpack map ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise StreamError(f"{what}: a {type(obj).__name__}, not a map")
    return obj


def _recv_exactly(sock, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise StreamError(f"{what}: the peer sent nothing (timed out)") from None
        except OSError as e:
            raise StreamError(f"{what}: connection lost: {e.strerror or type(e).__name__}") from None
        if not k:
            raise StreamError(f"{what}: the peer closed the connection")
        got += k
    return buf


def _field(obj: dict, name: str, kind, what: str, size: int | None = None):
    value = obj.get(name)
    if not isinstance(value, kind) or (size is not None and len(value) != size):
        raise StreamError(f"{what}: field {name!r} is missing or malformed")
    return value


def _mac(key: bytes, label: bytes, *nonces: bytes) -> bytes:
    return hmac.new(key, label + b"".join(nonces), hashlib.sha256).digest()


def server_handshake(sock, creds: Credentials) -> None:
    """Destination side: HELLO, then (with a key) check the source's proof and prove ours.

    Raises StreamError if the source cannot prove it holds the key; by then
    the destination has read only handshake frames, no VM state.
    """
    nonce_d = os.urandom(NONCE_SIZE)
    auth = AUTH_HMAC if creds.key else AUTH_NONE
    sock.sendall(encode_frame({"kvmlite": HANDSHAKE_VERSION, "auth": auth, "nonce": nonce_d}))
    what = "handshake from the source"
    reply = read_frame(sock, what)
    if reply.get("kvmlite") != HANDSHAKE_VERSION:
        raise StreamError(f"{what}: not a kvmlite source speaking handshake version {HANDSHAKE_VERSION}")
    if creds.key is None:
        return
    proof = reply.get("mac")
    if proof is None:
        why = "the source has no key (start it with --auth-key)"
    else:
        nonce_s = _field(reply, "nonce", bytes, what, NONCE_SIZE)
        good = isinstance(proof, bytes) and hmac.compare_digest(
            proof, _mac(creds.key, _SOURCE_PROOF, nonce_d, nonce_s))
        why = None if good else "the source's key does not match"
    if why:
        _send_quietly(sock, encode_frame({"status": "error", "error": f"authentication failed: {why}"}))
        raise StreamError(f"authentication failed: {why}")
    sock.sendall(encode_frame({"status": "ok", "mac": _mac(creds.key, _DEST_PROOF, nonce_s, nonce_d)}))


def client_handshake(sock, creds: Credentials) -> None:
    """Source side: read HELLO, prove the key if asked, check the destination's proof.

    A source that holds a key refuses a destination that does not ask for
    one: it would otherwise hand the VM to whoever listens on the port.
    """
    what = "handshake from the destination"
    hello = read_frame(sock, what)
    if hello.get("kvmlite") != HANDSHAKE_VERSION:
        raise MigrationError(f"{what}: not a kvmlite destination speaking handshake "
                             f"version {HANDSHAKE_VERSION}")
    auth = hello.get("auth")
    if auth not in (AUTH_NONE, AUTH_HMAC):
        raise MigrationError(f"{what}: unknown authentication {auth!r}")
    if auth == AUTH_NONE:
        if creds.key is not None:
            raise MigrationError("the destination does not authenticate (start it with --auth-key); "
                                 "refusing to send the VM to an unauthenticated peer")
        sock.sendall(encode_frame({"kvmlite": HANDSHAKE_VERSION}))
        return
    if creds.key is None:
        sock.sendall(encode_frame({"kvmlite": HANDSHAKE_VERSION}))   # so the destination can say why
        raise MigrationError("the destination requires authentication: give --auth-key")
    nonce_d = _field(hello, "nonce", bytes, what, NONCE_SIZE)
    nonce_s = os.urandom(NONCE_SIZE)
    sock.sendall(encode_frame({"kvmlite": HANDSHAKE_VERSION, "nonce": nonce_s,
                               "mac": _mac(creds.key, _SOURCE_PROOF, nonce_d, nonce_s)}))
    answer = read_frame(sock, what)
    if answer.get("status") == "error":
        raise MigrationError(f"the destination refused: {str(answer.get('error'))[:200]}")
    proof = answer.get("mac")
    if answer.get("status") != "ok" or not isinstance(proof, bytes) or not hmac.compare_digest(
            proof, _mac(creds.key, _DEST_PROOF, nonce_s, nonce_d)):
        raise MigrationError("authentication failed: the destination's key does not match")


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


class SocketSink:
    """Plain TCP: `sendmsg` straight from guest memory, no copies."""
    kind = "tcp"
    expects_reply = True

    def __init__(self, sock: socket.socket):
        self.sock = sock

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


class FileSink:
    """A snapshot file, written as PATH.part and renamed when complete, so a
    failed or cancelled save never leaves a file that looks like a snapshot."""
    kind = "file"
    expects_reply = False

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

    def __init__(self, path: str):
        try:
            self.f = open(path, "rb", buffering=0)
        except OSError as e:
            raise MigrationError(f"cannot read {path}: {e.strerror}") from None

    def recv_into(self, view, n: int) -> int:
        return self.f.readinto(memoryview(view)[:n])

    def settimeout(self, t: float) -> None:
        pass

    def close(self) -> None:
        self.f.close()


def connect(uri: TcpUri, creds: Credentials, *, connect_timeout: float, io_timeout: float,
            sndbuf: int, on_socket=None):
    """Connect to a destination, run TLS and the handshake; returns a sink.

    `on_socket(sock)` is called as soon as the socket exists, so that a
    cancel can shut it down while connect or the handshake still waits.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in uri.host else socket.AF_INET)
    if on_socket is not None:
        on_socket(sock)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(connect_timeout)
        sock.connect((uri.host, uri.port))
        sock.settimeout(io_timeout)
        if creds.tls:
            try:
                sock = creds.client_context().wrap_socket(sock, server_hostname=uri.host)
            except ssl.SSLError as e:
                raise MigrationError(f"TLS with {uri} failed: {e.reason or e}") from None
        client_handshake(sock, creds)
    except BaseException:
        sock.close()
        raise
    return TlsSink(sock) if creds.tls else SocketSink(sock)


def accept_tls(conn: socket.socket, creds: Credentials):
    try:
        return creds.server_context().wrap_socket(conn, server_side=True)
    except ssl.SSLError as e:
        raise StreamError(f"TLS handshake failed: {e.reason or e}") from None
