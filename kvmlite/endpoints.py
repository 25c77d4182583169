"""Where kvmlite listens, connects, reads or writes, as typed values: one
parser for every address a user gives (`--incoming`, `--gdb`, `--monitor`,
`migrate`'s uri), accepting QEMU's spellings.

    tcp:HOST:PORT    a TCP endpoint; HOST may be a name, an IPv4 address or [IPv6]
    tcp:PORT         the same on 127.0.0.1: listening on loopback is the default
    tcp::PORT        QEMU's spelling of an empty host: also 127.0.0.1 here (QEMU
                     listens on every interface; give 0.0.0.0 for that)
    unix:PATH        a Unix socket: the monitor (a bare PATH means the same there), or a
                     destination VMM on this host; with `migrate --local` the guest's
                     RAM (a memfd) is handed over with SCM_RIGHTS instead of being sent
    file:PATH        a snapshot: the migration stream, written to (or read from) a file

The monitor also takes QEMU's chardev options after a comma (`server`,
`server=on`, `wait=off`, `nowait`): they say what kvmlite always does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError

LOOPBACK = "127.0.0.1"
# QEMU's -qmp/-monitor chardev options that describe what kvmlite always does
CHARDEV_OPTIONS = frozenset({"server", "server=on", "wait=off", "nowait"})
# sun_path is 108 bytes on Linux (unix(7)), the last one its terminating NUL
MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class TcpUri:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixUri:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class FileUri:
    path: str

    def __str__(self) -> str:
        return f"file:{self.path}"


Uri = TcpUri | UnixUri | FileUri
Endpoint = Uri

_EXAMPLES = {"tcp": "tcp:HOST:PORT", "unix": "unix:PATH", "file": "file:PATH"}


def parse_endpoint(text: str, *, what: str = "address", kinds: tuple[str, ...] = ("tcp", "file"),
                   bare_path: bool = False, chardev_options: bool = False,
                   port_zero: bool = False) -> Endpoint:
    """`text` as one of `kinds` ("tcp", "unix", "file"); raises a ConfigError
    that names `what` (the option, e.g. "--gdb") and quotes `text`.

    `bare_path`: a string with no scheme is a Unix socket path (the monitor).
    `chardev_options`: QEMU's `,server,wait=off` suffixes are accepted.
    `port_zero`: port 0 (let the kernel choose) is allowed, for listeners."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} {text!r}: expected {_expected(kinds)}")
    base = text
    if chardev_options and "," in text:
        base, *opts = text.split(",")
        for opt in opts:
            if opt not in CHARDEV_OPTIONS:
                raise ConfigError(f"{what} {text!r}: option {opt!r} is not supported "
                                  f"(only {', '.join(sorted(CHARDEV_OPTIONS))})")
    scheme, sep, rest = base.partition(":")
    if not sep or scheme not in _EXAMPLES:
        if bare_path and "unix" in kinds and base and not base.startswith(("tcp:", "file:")):
            return _unix(base, what, text)
        raise ConfigError(f"{what} {text!r}: expected {_expected(kinds)}")
    if scheme not in kinds:
        raise ConfigError(f"{what} {text!r}: {scheme}: is not accepted here; expected {_expected(kinds)}")
    if scheme in ("unix", "file"):
        if not rest:
            raise ConfigError(f"{what} {text!r}: expected {_EXAMPLES[scheme]}")
        return _unix(rest, what, text) if scheme == "unix" else FileUri(rest)
    host, _, port = rest.rpartition(":")
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(f"{what} {text!r}: expected tcp:HOST:PORT (an IPv6 host in brackets)")
    host = host[1:-1] if host.startswith("[") else host
    lowest = 0 if port_zero else 1
    if not (port.isascii() and port.isdigit()) or not lowest <= int(port) < 65536:
        raise ConfigError(f"{what} {text!r}: expected tcp:HOST:PORT, tcp:PORT or tcp::PORT "
                          f"with a port from {lowest} to 65535")
    return TcpUri(host or LOOPBACK, int(port))


def _unix(path: str, what: str, text: str) -> UnixUri:
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:  # a lone surrogate the file system encoding cannot carry
        size = MAX_UNIX_PATH + 1
    if "\0" in path or size > MAX_UNIX_PATH:
        raise ConfigError(f"{what} {text!r}: expected unix:PATH (a path of at most "
                          f"{MAX_UNIX_PATH} bytes, no NUL)")
    return UnixUri(path)


def _expected(kinds: tuple[str, ...]) -> str:
    return " or ".join(_EXAMPLES[k] for k in kinds)


def parse_uri(uri: str) -> Uri:
    """A migration's destination or source: `tcp:HOST:PORT`, `tcp:PORT`
    (loopback), `unix:PATH` (a VMM on this host) or `file:PATH`; raises ConfigError."""
    return parse_endpoint(uri, what="migration uri", kinds=("tcp", "unix", "file"))


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one."""
    import ipaddress
    import socket
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
