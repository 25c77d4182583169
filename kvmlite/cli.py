"""The command line: `kvmlite run`, `info`, `migrate`, `pagemap`, `inspect`."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import KvmliteError

DEFAULT_MEMORY = "256M"

EPILOG_RUN = """exit status: the guest's status byte (exit device, port 0x501); 0 when the
guest halts; 125 when the guest crashes (triple fault, failed VM entry, KVM
internal error); 1 when kvmlite cannot run it (bad image, no /dev/kvm, ...)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmlite", description="A small KVM virtual machine monitor that live-migrates "
        "a running guest, sending only the pages the guest is using (free page hinting).")
    p.add_argument("--version", action="version", version=f"kvmlite {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more of the VMM's own messages")
    p.add_argument("-q", "--quiet", action="store_true", help="only the VMM's warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a guest image (or wait for an incoming migration)",
                         epilog=EPILOG_RUN)
    run.add_argument("image", nargs="?", help="flat binary or ELF64 guest image")
    run.add_argument("-m", "--memory", default=None,
                     help=f"guest RAM, e.g. 256M or 1G (default {DEFAULT_MEMORY})")
    run.add_argument("--cmdline", default="", help="guest command line (see guest/README.md)")
    run.add_argument("--load", metavar="ADDR", help="load address for flat images (default 0x100000)")
    run.add_argument("--entry", metavar="ADDR", help="entry point (default: load address / e_entry)")
    run.add_argument("--smp", type=int, default=1, metavar="N",
                     help="vCPUs (default 1); N > 1 adds the in-kernel irqchip and the "
                     "CPU-start device (docs/boot.md)")
    run.add_argument("--stats", action="store_true",
                     help="print page counts from the guest's free-page bitmap at exit")
    run.add_argument("--trace", action="store_true", help="log every VM exit to stderr")
    run.add_argument("--monitor", metavar="unix:PATH", help="JSON-lines control socket")
    run.add_argument("--gdb", metavar="tcp:HOST:PORT",
                     help="wait for gdb (target remote HOST:PORT) before the guest's first instruction")
    run.add_argument("--incoming", metavar="tcp:[HOST:]PORT|unix:PATH|file:PATH",
                     help="wait for a migration (listening on 127.0.0.1 unless HOST is given), "
                     "or restore a snapshot file, instead of booting an image")
    run.add_argument("--insecure", action="store_true",
                     help="with --incoming on an address other than loopback: accept peers "
                     "without --auth-key or TLS")
    run.add_argument("--max-memory", metavar="SIZE",
                     help="with --incoming: the largest RAM a stream may ask for "
                     "(default: this host's physical memory)")
    run.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="migration in or out: give up after this long without progress (default 30)")
    _security_options(run)
    run.add_argument("--prealloc", action="store_true",
                     help="pre-fault all guest RAM at start (default for --incoming with --memory)")
    run.add_argument("--memory-backend", choices=("anon", "memfd"), default="anon",
                     help="guest RAM in private anonymous memory (default) or in a memfd, which "
                     "`migrate --local` hands to a destination on this host without copying a page")

    sub.add_parser("info", help="what /dev/kvm offers here")

    mig = sub.add_parser("migrate", help="live-migrate a running VM to a destination, or save it to a file")
    mig.add_argument("--monitor", required=True, metavar="PATH", help="the source VM's monitor socket")
    mig.add_argument("uri", nargs="?", metavar="tcp:HOST:PORT|unix:PATH|file:PATH",
                     help="destination (kvmlite run --incoming), or a snapshot file to write")
    mig.add_argument("--no-free-page-hint", dest="hint", action="store_false",
                     help="send free pages too (baseline; zero pages are still detected)")
    mig.add_argument("--stop-copy", action="store_true", help="pause first, then copy in one pass")
    mig.add_argument("--downtime-ms", type=float, default=5.0, help="downtime limit (default 5)")
    mig.add_argument("--bandwidth", default="0", help="bandwidth limit per second, e.g. 100M (0 = none)")
    mig.add_argument("--max-rounds", type=int, default=30, help="pre-copy rounds before forcing completion")
    mig.add_argument("--json", action="store_true", help="print the final stats as JSON")
    mig.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="give up after this long without progress (default: the VM's, 30)")
    mig.add_argument("--auth-key", metavar="FILE",
                     help="shared key to prove to the destination (default: the VM's own --auth-key)")
    mig.add_argument("--keep-running", action="store_true",
                     help="with file:PATH: save a snapshot and let the VM carry on here")
    mig.add_argument("--channels", type=int, default=1, metavar="N",
                     help="tcp: spread the pages over N connections, each sent from its own thread "
                     "(QEMU's multifd; 1 to 8, default 1; 1 under TLS)")
    mig.add_argument("--local", action="store_true",
                     help="with unix:PATH: hand the guest's RAM (--memory-backend memfd) to a "
                     "destination on this host instead of copying it; it gives the free pages' "
                     "memory back to the host")
    mig.add_argument("--pagemap", metavar="FILE.png",
                     help="when it ends, draw which round sent each page into this PNG")
    mig.add_argument("--resolve", choices=("source", "destination"),
                     help="settle a migration left unresolved (the destination's answer to COMMIT "
                     "was lost): where the VM runs now; 'source' resumes it here")

    pm = sub.add_parser("pagemap", help="draw guest memory as a grid, one cell per page")
    pm.add_argument("source", nargs="?", metavar="file:STREAM",
                    help="a migration stream saved to a file, instead of --monitor")
    pm.add_argument("--monitor", metavar="PATH", help="a running VM's monitor socket")
    pm.add_argument("--png", metavar="OUT.png", help="write a PNG instead of drawing on the terminal")
    pm.add_argument("--width", type=int, metavar="N",
                    help="cells per row (default 64 on the terminal, 256 in a PNG)")
    pm.add_argument("--sent-rounds", action="store_true",
                    help="colour pages by the migration round that sent them")

    ins = sub.add_parser("inspect", help="registers, exit counts and page counts of a running VM")
    ins.add_argument("--monitor", required=True, metavar="PATH", help="the VM's monitor socket")
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def _security_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--auth-key", metavar="FILE",
                   help="shared key (16+ bytes) both VMMs must hold: an incoming migration is "
                   "accepted only from a peer that proves it has the key, and outgoing ones go "
                   "only to such a peer")
    p.add_argument("--tls-cert", metavar="FILE", help="this VMM's TLS certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="CA certificate that signed the peer's (TLS is mutual: both sides check)")


def run_config(args) -> "RunConfig":
    """`kvmlite run`'s arguments as a validated RunConfig (ConfigError on a bad one)."""
    from .config import BootConfig, Credentials, IncomingConfig, MachineConfig, RunConfig
    from .units import parse_addr, parse_size
    memory = parse_size(args.memory) if args.memory else None
    if memory is None and not args.incoming:
        memory = parse_size(DEFAULT_MEMORY)
    machine = MachineConfig(memory=memory, vcpus=args.smp, prefault=args.prealloc, trace=args.trace,
                            memory_backend=args.memory_backend)
    creds = Credentials.load(args.auth_key, args.tls_cert, args.tls_key, args.tls_ca)
    timeout = args.timeout if args.timeout is not None else 30.0
    boot = incoming = None
    if args.incoming:
        if args.image:
            from .errors import ConfigError
            raise ConfigError("give either an image or --incoming, not both")
        incoming = IncomingConfig(
            args.incoming, timeout=timeout, insecure=args.insecure,
            max_memory=parse_size(args.max_memory, "--max-memory") if args.max_memory else None)
    elif args.image:
        boot = BootConfig(args.image, args.cmdline,
                          parse_addr(args.load, "--load") if args.load else None,
                          parse_addr(args.entry, "--entry") if args.entry else None)
    return RunConfig(machine=machine, boot=boot, incoming=incoming, monitor=args.monitor,
                     gdb=args.gdb, stats=args.stats, creds=creds, timeout=timeout)


def main(argv=None, *, hooks=None, migration_class=None) -> int:
    """The command line.  `hooks` and `migration_class` are injected by the test
    harness (tests/harness.py); users never pass them."""
    args = _parser().parse_args(argv)
    from . import log
    log.setup(-1 if args.quiet else args.verbose)
    try:
        if args.command == "run":
            from . import runner
            from .hooks import NO_HOOKS
            return runner.run(run_config(args), hooks=hooks or NO_HOOKS,
                              migration_class=migration_class)
        if args.command == "info":
            from .tools.info import info_command
            return info_command()
        if args.command == "migrate":
            from .tools.migrate import migrate_command
            return migrate_command(
                monitor=args.monitor, uri=args.uri, hint=args.hint, stop_copy=args.stop_copy,
                downtime_ms=args.downtime_ms, bandwidth=args.bandwidth, max_rounds=args.max_rounds,
                as_json=args.json, timeout=args.timeout, auth_key=args.auth_key,
                keep_running=args.keep_running, pagemap=args.pagemap, resolve=args.resolve,
                channels=args.channels, local=args.local)
        if args.command == "pagemap":
            from .tools.pagemap import pagemap_command
            return pagemap_command(source=args.source, monitor=args.monitor, png=args.png,
                                   width=args.width, sent_rounds=args.sent_rounds)
        if args.command == "inspect":
            from .tools.inspect import inspect_command
            return inspect_command(monitor=args.monitor, as_json=args.json)
    except KvmliteError as e:
        print(f"kvmlite: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmlite: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout went away (`kvmlite migrate ... | head`): not worth a traceback
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    return 2
