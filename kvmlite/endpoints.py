"""Where a migration goes or comes from, as typed values.

    tcp:HOST:PORT    a destination VMM (`kvmlite run --incoming tcp:HOST:PORT`)
    tcp:PORT         the same on 127.0.0.1: listening on loopback is the default
    unix:PATH        a destination VMM on this host, over a Unix socket; with
                     `migrate --local` the guest's RAM (a memfd) is handed over
                     with SCM_RIGHTS instead of being sent
    file:PATH        a snapshot: the same stream, written to (or read from) a file
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class TcpUri:
    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True)
class UnixUri:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


# sun_path is 108 bytes on Linux (unix(7)), the last one its terminating NUL
MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class FileUri:
    path: str

    def __str__(self) -> str:
        return f"file:{self.path}"


Uri = TcpUri | UnixUri | FileUri


def parse_uri(uri: str) -> Uri:
    """`tcp:HOST:PORT`, `tcp:PORT` (loopback), `unix:PATH` or `file:PATH`; raises ConfigError."""
    if not isinstance(uri, str):
        raise ConfigError(f"{uri!r}: expected tcp:HOST:PORT, unix:PATH or file:PATH")
    if uri.startswith("file:"):
        if not uri[5:]:
            raise ConfigError(f"{uri!r}: expected file:PATH")
        return FileUri(uri[5:])
    if uri.startswith("unix:"):
        path = uri[5:]
        if not path or "\0" in path or len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise ConfigError(f"{uri!r}: expected unix:PATH (a path of at most {MAX_UNIX_PATH} bytes)")
        return UnixUri(path)
    if not uri.startswith("tcp:"):
        raise ConfigError(f"{uri!r}: expected tcp:HOST:PORT, tcp:PORT, unix:PATH or file:PATH")
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
