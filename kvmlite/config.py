"""Typed, validated configuration: what the CLI (or a Python caller) asks for.

Every config is a frozen dataclass that checks itself when it is made, so
nothing below can be handed a size that is not a size, a NaN timeout or a
string where a boolean belongs.  The CLI turns its arguments into these;
library users build them directly:

    from kvmlite import Machine, MachineConfig, BootConfig
    with Machine(MachineConfig(memory=256 << 20)) as vm:
        vm.boot(BootConfig("guest/guest.bin", cmdline="workload=hello"))
        result = vm.run()
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field

from .boot import MAX_RAM as MAX_MEMORY, MIB2 as MEMORY_GRANULE
from .endpoints import FileUri, TcpUri, UnixUri, Uri, parse_uri
from .errors import ConfigError
from .log import log

MIB = 1 << 20
MIN_MEMORY = 2 * MIB
DEFAULT_MEMORY = 256 * MIB
MAX_VCPUS = 64
DEFAULT_TIMEOUT = 30.0            # seconds without progress before a migration gives up
MAX_TIMEOUT = 24 * 3600.0
MAX_DOWNTIME_MS = 60_000.0
MAX_ROUNDS = 1000
MEMORY_BACKENDS = ("anon", "memfd")
MAX_CHANNELS = 8                  # connections a migration may spread its pages over
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096


def _check_bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise ConfigError(f"{what} must be true or false, not {value!r}")
    return value


def _check_int(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ConfigError(f"{what} must be an integer from {lo} to {hi}, not {value!r}")
    return value


def _check_number(value: object, what: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value < lo or (lo_open and value == lo) or value > hi:
        bound = f"more than {lo:g}" if lo_open else f"from {lo:g}"
        raise ConfigError(f"{what} must be a number {bound} to {hi:g}, not {value!r}")
    return float(value)


def check_memory(size: int, what: str = "--memory") -> int:
    """A guest RAM size kvmlite can boot: 2 MiB granules, 2 MiB to 64 GiB."""
    if type(size) is not int:
        raise ConfigError(f"{what} must be a size in bytes, not {size!r}")
    if size < MIN_MEMORY:
        raise ConfigError(f"{what}: at least {MIN_MEMORY >> 20} MiB is needed")
    if size % MEMORY_GRANULE:
        raise ConfigError(f"{what}: must be a multiple of 2 MiB "
                          "(the boot page tables map RAM in 2 MiB pages)")
    if size > MAX_MEMORY:
        raise ConfigError(f"{what}: at most {MAX_MEMORY >> 30} GiB is supported")
    return size


@dataclass(frozen=True)
class MachineConfig:
    """The VM's shape.  `memory` None: sized later (by an incoming stream's header)."""
    memory: int | None = DEFAULT_MEMORY
    vcpus: int = 1
    prefault: bool = False        # fault all of RAM in at start (QEMU's -mem-prealloc)
    trace: bool = False           # log every VM exit
    dirty_ring: bool = False      # migrations track dirty pages with per-vCPU rings, not the bitmap
    # "anon": private anonymous memory; "memfd": a sealed memfd mapped shared,
    # which a local migration hands to the destination (QEMU's memory-backend-memfd)
    memory_backend: str = "anon"

    def __post_init__(self) -> None:
        if self.memory is not None:
            check_memory(self.memory)
        if self.memory_backend not in MEMORY_BACKENDS:
            raise ConfigError(f"--memory-backend {self.memory_backend!r}: one of "
                              f"{', '.join(MEMORY_BACKENDS)}")
        if type(self.vcpus) is not int or not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"--smp {self.vcpus}: the vCPU count is 1 to {MAX_VCPUS}")
        _check_bool(self.prefault, "prefault")
        _check_bool(self.trace, "trace")
        _check_bool(self.dirty_ring, "dirty_ring")


@dataclass(frozen=True)
class BootConfig:
    """A guest image to boot: flat binary (at `load`, default 1 MiB) or ELF."""
    image: str
    cmdline: str = ""
    load: int | None = None
    entry: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image:
            raise ConfigError("no guest image given (try: kvmlite run guest/guest.bin)")
        if not isinstance(self.cmdline, str):
            raise ConfigError("the guest command line must be a string")
        for name in ("load", "entry"):
            v = getattr(self, name)
            if v is not None:
                _check_int(v, f"--{name}", 0, (1 << 64) - 1)


@dataclass(frozen=True)
class Credentials:
    """What a VMM proves itself with: a shared key, TLS certificates, or neither."""
    key: bytes | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def any(self) -> bool:
        return self.key is not None or self.tls

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


def read_key(path: str) -> bytes:
    """The shared key: the file's bytes, surrounding whitespace removed.

    Only a regular file is read (a FIFO would hang start-up), and a key that
    others may read is reported: anyone who can read it can send this VMM a VM.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"--auth-key {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"--auth-key {path}: not a regular file")
        if st.st_mode & 0o077:
            log.warning(f"--auth-key {path} can be read by other users "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}; chmod 600 it)")
        key = os.read(fd, MAX_KEY_BYTES + 1).strip()
    finally:
        os.close(fd)
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ConfigError(f"--auth-key {path}: a key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} "
                          "bytes (e.g. head -c 32 /dev/urandom | base64 > key)")
    return key


@dataclass(frozen=True)
class MigrationParams:
    """One outgoing migration (QEMU's migrate command and its parameters)."""
    uri: str
    hint: bool = True                 # skip pages the guest's bitmap says are free
    live: bool = True                 # pre-copy while the guest runs (else pause, then one pass)
    downtime_ms: float = 5.0          # the final pass must be predicted to fit this
    bandwidth: int = 0                # bytes per second, 0 = no limit
    max_rounds: int = 30              # pre-copy rounds before forcing completion
    timeout: float = DEFAULT_TIMEOUT  # seconds without progress before giving up
    keep_running: bool = False        # file: only: save a snapshot and carry on here
    creds: Credentials = field(default_factory=Credentials)
    auto_converge: bool = True        # throttle a guest that dirties faster than the link sends
    # Post-copy (docs/postcopy.md; QEMU's postcopy-ram capability): switch when
    # pre-copy stops converging, after `postcopy_after` rounds (0: only then, or
    # at max-rounds, or when asked), or at once (`postcopy_now`).
    postcopy: bool = False
    postcopy_after: int = 0
    postcopy_now: bool = False
    # tcp: spread the pages over this many connections (QEMU's multifd)
    channels: int = 1
    # unix: hand the guest's RAM (a memfd) to the destination instead of copying it
    local: bool = False

    def __post_init__(self) -> None:
        target = parse_uri(self.uri)
        _check_bool(self.hint, "hint")
        _check_bool(self.live, "live")
        _check_bool(self.auto_converge, "auto-converge")
        _check_number(self.downtime_ms, "downtime-ms", 0, MAX_DOWNTIME_MS)
        _check_int(self.bandwidth, "bandwidth", 0, 1 << 50)
        _check_int(self.max_rounds, "max-rounds", 1, MAX_ROUNDS)
        _check_number(self.timeout, "timeout", 0, MAX_TIMEOUT, lo_open=True)
        _check_bool(self.keep_running, "keep-running")
        if self.keep_running and not isinstance(target, FileUri):
            raise ConfigError("keep-running is for snapshots (file:PATH): after a migration "
                              "the VM runs at the destination, not in two places")
        if not isinstance(self.creds, Credentials):
            raise ConfigError("creds must be Credentials")
        _check_bool(self.postcopy, "postcopy")
        _check_int(self.postcopy_after, "postcopy-after", 0, MAX_ROUNDS)
        _check_bool(self.postcopy_now, "postcopy-now")
        if (self.postcopy_after or self.postcopy_now) and not self.postcopy:
            raise ConfigError("postcopy-after and postcopy-now need postcopy on")
        if self.postcopy:
            if isinstance(target, FileUri):
                raise ConfigError("post-copy moves a running VM to a destination VMM, not to a "
                                  "snapshot file")
            if not isinstance(target, TcpUri):
                raise ConfigError(f"post-copy runs over a tcp: link, not {self.uri} (a local "
                                  "migration copies no pages: it has none to fetch later)")
            if self.channels > 1:
                raise ConfigError("post-copy serves its pages over one connection: "
                                  "channels must be 1")
            if not self.live:
                raise ConfigError("post-copy moves a running guest; stop-copy pauses it first: "
                                  "choose one (--postcopy-now switches at once)")
            if self.creds.tls:
                raise ConfigError("post-copy does not run over TLS here (its C threads use the "
                                  "socket itself; kernel TLS is not built): use --auth-key, whose "
                                  "page tags protect the post-copy records too")
        _check_int(self.channels, "channels", 1, MAX_CHANNELS)
        if self.channels > 1 and not isinstance(target, TcpUri):
            raise ConfigError(f"channels are connections to a tcp: destination, not {self.uri}")
        _check_bool(self.local, "local")
        if self.local and not isinstance(target, UnixUri):
            raise ConfigError(f"a local migration goes to unix:PATH on this host, not {self.uri}")
        if self.local and self.bandwidth:
            raise ConfigError("a local migration sends no pages: a bandwidth limit has nothing to limit")

    @property
    def target(self) -> Uri:
        return parse_uri(self.uri)


def default_max_memory() -> int:
    """The largest RAM a stream may ask of this host by default: what the host
    has, less a quarter (at least 1 GiB) left for the host itself."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = max(total // 4, 1 << 30)
    return max(min(total - room, MAX_MEMORY), MIN_MEMORY)


DEFER = "defer"


@dataclass(frozen=True)
class IncomingConfig:
    """Waiting for a migration (`run --incoming`), or restoring a snapshot.
    `uri` "defer" (QEMU's -incoming defer): the monitor's migrate-incoming
    names it later."""
    uri: str
    max_memory: int | None = None     # the largest RAM a stream may ask for; None: default_max_memory()
    insecure: bool = False            # beyond loopback without a key or TLS
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.uri != DEFER:
            parse_uri(self.uri)
        if self.max_memory is not None:
            check_memory(self.max_memory, "--max-memory")
        _check_bool(self.insecure, "insecure")
        _check_number(self.timeout, "timeout", 0, MAX_TIMEOUT, lo_open=True)

    @property
    def deferred(self) -> bool:
        return self.uri == DEFER

    @property
    def target(self) -> Uri:
        return parse_uri(self.uri)

    def check_peers(self, creds: Credentials) -> None:
        """Refuse to listen where anyone may send a VM, unless a key, TLS or
        `insecure` says who may; credentials are for tcp: peers only."""
        target = self.target
        if isinstance(target, FileUri) and creds.any:
            raise ConfigError("--auth-key and --tls-* are for tcp: peers, not snapshot files")
        if isinstance(target, TcpUri) and not creds.any and not self.insecure:
            from .endpoints import is_loopback
            if not is_loopback(target.host):
                raise ConfigError(
                    f"listening on {target.host} lets anyone who can reach it send this VMM "
                    "a VM: give --auth-key (and --tls-* on untrusted networks), "
                    "or --insecure to accept any peer")

    @property
    def memory_cap(self) -> int:
        return self.max_memory if self.max_memory is not None else default_max_memory()


@dataclass(frozen=True)
class RunConfig:
    """`kvmlite run`: boot an image or receive a VM, and serve it."""
    machine: MachineConfig = field(default_factory=MachineConfig)
    boot: BootConfig | None = None
    incoming: IncomingConfig | None = None
    monitor: str | None = None        # where the QMP monitor listens: unix:PATH or tcp:HOST:PORT
    gdb: str | None = None            # tcp:HOST:PORT for the gdb stub
    stats: bool = False               # page counts from the guest's bitmap at exit
    creds: Credentials = field(default_factory=Credentials)
    timeout: float = DEFAULT_TIMEOUT  # default for migrations started from the monitor
    # After migrating away the VMM stays (QEMU's postmigrate) until the
    # monitor's quit; with this, also until so many seconds have passed.
    postmigrate_timeout: float | None = None

    def __post_init__(self) -> None:
        if (self.boot is None) == (self.incoming is None):
            raise ConfigError("give either an image or --incoming, not both"
                              if self.boot else
                              "no guest image given (try: kvmlite run guest/guest.bin)")
        if self.gdb and self.incoming:
            raise ConfigError("--gdb debugs a guest booted here, not one arriving with --incoming")
        if self.machine.memory is None and self.boot is not None:
            raise ConfigError("a booted guest needs a memory size")
        inc = self.incoming
        if inc is not None:
            if inc.deferred:
                if not self.monitor:
                    raise ConfigError("--incoming defer waits for the monitor's migrate-incoming: "
                                      "give --monitor too")
            else:
                inc.check_peers(self.creds)
                if isinstance(inc.target, UnixUri) and self.machine.memory_backend != "anon":
                    raise ConfigError("--memory-backend is for a booted guest: a VM arriving on "
                                      "unix:PATH keeps the backing it comes with")
        _check_number(self.timeout, "timeout", 0, MAX_TIMEOUT, lo_open=True)
        if self.postmigrate_timeout is not None:
            _check_number(self.postmigrate_timeout, "--postmigrate-timeout", 0, MAX_TIMEOUT)
