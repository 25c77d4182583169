"""The command line: `kvmlite run`, `kvmlite info`, `kvmlite migrate`."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import KvmliteError

MIN_MEMORY = 2 << 20
DEFAULT_MEMORY = "256M"

EPILOG_RUN = """exit status: the guest's status byte (exit device, port 0x501); 0 when the
guest halts; 125 when the guest crashes (triple fault, failed VM entry, KVM
internal error); 1 when kvmlite cannot run it (bad image, no /dev/kvm, ...)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmlite", description="A small KVM virtual machine monitor that live-migrates "
        "a running guest, sending only the pages the guest is using (free page hinting).")
    p.add_argument("--version", action="version", version=f"kvmlite {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a guest image (or wait for an incoming migration)",
                         epilog=EPILOG_RUN)
    run.add_argument("image", nargs="?", help="flat binary or ELF64 guest image")
    run.add_argument("-m", "--memory", default=None,
                     help=f"guest RAM, e.g. 256M or 1G (default {DEFAULT_MEMORY})")
    run.add_argument("--cmdline", default="", help="guest command line (see guest/README.md)")
    run.add_argument("--load", metavar="ADDR", help="load address for flat images (default 0x100000)")
    run.add_argument("--entry", metavar="ADDR", help="entry point (default: load address / e_entry)")
    run.add_argument("--stats", action="store_true",
                     help="print page counts from the guest's free-page bitmap at exit")
    run.add_argument("--trace", action="store_true", help="log every VM exit to stderr")
    run.add_argument("--monitor", metavar="unix:PATH", help="JSON-lines control socket")
    run.add_argument("--incoming", metavar="tcp:HOST:PORT",
                     help="wait for a migration stream instead of booting an image")
    run.add_argument("--prealloc", action="store_true",
                     help="pre-fault all guest RAM at start (default for --incoming with --memory)")

    sub.add_parser("info", help="what /dev/kvm offers here")

    mig = sub.add_parser("migrate", help="live-migrate a running VM to a destination")
    mig.add_argument("--monitor", required=True, metavar="PATH", help="the source VM's monitor socket")
    mig.add_argument("uri", metavar="tcp:HOST:PORT", help="destination (kvmlite run --incoming)")
    mig.add_argument("--no-free-page-hint", dest="hint", action="store_false",
                     help="send free pages too (baseline; zero pages are still detected)")
    mig.add_argument("--stop-copy", action="store_true", help="pause first, then copy in one pass")
    mig.add_argument("--downtime-ms", type=float, default=5.0, help="downtime limit (default 5)")
    mig.add_argument("--bandwidth", default="0", help="bandwidth limit per second, e.g. 100M (0 = none)")
    mig.add_argument("--max-rounds", type=int, default=30, help="pre-copy rounds before forcing completion")
    mig.add_argument("--json", action="store_true", help="print the final stats as JSON")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from .commands import cmd_run
            return cmd_run(args)
        if args.command == "info":
            from .commands import cmd_info
            return cmd_info(args)
        if args.command == "migrate":
            from .commands import cmd_migrate
            return cmd_migrate(args)
    except KvmliteError as e:
        print(f"kvmlite: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmlite: interrupted", file=sys.stderr)
        return 130
    return 2
