"""Where a migration goes or comes from, as typed values.

    tcp:HOST:PORT    a destination VMM (`kvmlite run --incoming tcp:HOST:PORT`)
    tcp:PORT         the same on 127.0.0.1: listening on loopback is the default
    file:PATH        a snapshot: the same stream, written to (or read from) a file
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


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


Uri = TcpUri | FileUri


def parse_uri(uri: str) -> Uri:
    """`tcp:HOST:PORT`, `tcp:PORT` (loopback) or `file:PATH`; raises ConfigError."""
    if not isinstance(uri, str):
        raise ConfigError(f"{uri!r}: expected tcp:HOST:PORT or file:PATH")
    if uri.startswith("file:"):
        if not uri[5:]:
            raise ConfigError(f"{uri!r}: expected file:PATH")
        return FileUri(uri[5:])
    if not uri.startswith("tcp:"):
        raise ConfigError(f"{uri!r}: expected tcp:HOST:PORT, tcp:PORT or file:PATH")
    host, _, port = uri[4:].rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{uri!r}: expected tcp:HOST:PORT")
    return TcpUri(host, int(port))


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one."""
    import ipaddress
    import socket
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
