"""The test harness: a kvmlite VMM with test hooks injected, and a soak of such VMMs.

    python -m tests.harness vmm [--fault POINT=ACTION ...] [--broken-order] -- run ...
    python -m tests.harness soak --broken-order --migrations 10

`vmm` runs kvmlite's own command line (`kvmlite.cli.main`) with two injected
objects, never an environment switch:

* `FaultHooks`: at a named point (docs/reliability.md lists them) the
  process is killed (SIGKILL: it dies as a crashed host would, with no
  cleanup), stopped (SIGSTOP: a hung peer) or made to sleep (`sleep:SECONDS`).
* `BrokenOrderMigration`: a sender that reads the guest's free bits *before*
  clearing the dirty log, the race claim 2 of the patent exists to prevent.
  It lives here, not in kvmlite, so no user can switch it on.

Everything else, the C receive fast path included, is what users run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from kvmlite import cli, soak
from kvmlite.hooks import Hooks
from kvmlite.migration.source import Migration

ACTIONS = ("kill", "stop")


def parse_faults(specs) -> dict[str, str]:
    """["a=kill", "b=sleep:0.5"] -> {"a": "kill", "b": "sleep:0.5"}; raises ValueError."""
    faults = {}
    for item in specs:
        name, sep, action = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--fault {item!r} is not POINT=ACTION")
        if action not in ACTIONS and not (action.startswith("sleep:") and _is_number(action[6:])):
            raise ValueError(f"--fault {item!r}: {action!r} is not kill, stop or sleep:SECONDS")
        faults[name] = action
    return faults


def _is_number(s: str) -> bool:
    try:
        return float(s) >= 0
    except ValueError:
        return False


class FaultHooks(Hooks):
    """Kill, stop or stall this process at the named points."""

    def __init__(self, faults: dict[str, str]):
        self.faults = faults
        self.seen: list[str] = []

    def point(self, name: str) -> None:
        self.seen.append(name)
        action = self.faults.get(name)
        if action is None:
            return
        print(f"kvmlite: test fault at {name}: {action}", file=sys.stderr, flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            # Aimed at this thread, so that it stops before point() returns.
            # os.kill(getpid()) aims at the main thread: a hook on another
            # thread (the migration's, a handshake's) ran on until the
            # kernel got round to the group stop, and a source stopped at
            # src:ready still sent COMMIT (4 runs of 10).  Any thread's stop
            # stops them all.
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        else:
            time.sleep(float(action[6:]))


class BrokenOrderMigration(Migration):
    """The race claim 2 prevents, for tests and lab 4 only.

    Reads the free bits first, for the whole round, and clears each chunk's
    dirty log afterwards (with the dirty rings: reads them before the sync's
    harvest and reset).  A page the guest allocates and fills in between
    was free in the snapshot, so it is not sent, and its dirty bit is then
    cleared, so no later round sends it either: the destination gets a stale
    or zero page.
    """

    def _sync(self, dirty):
        # With the dirty rings the clear is the sync's reset: read the free bits before it.
        self._free_first = self._free_words(0, len(dirty))
        super()._sync(dirty)

    def _send_dirty(self, dirty):
        log = self.log
        # 1. (wrongly) the free bits first: the bitmap's before its per-chunk clear,
        #    the rings' before the sync that harvested and reset them
        free_all = self._free_first if log.kind == "ring" else self._free_words(0, len(dirty))
        total = 0
        for w0, w1, chunk in self._dirty_chunks(dirty):
            if log.clears_per_chunk:
                log.clear(w0, chunk)                     # 2. then clear the dirty log
            send = chunk if free_all is None else chunk & ~free_all[w0:w1]
            total += self._send_chunk(w0, w1, send, hinted=free_all is not None)
            dirty[w0:w1] = 0
        self._first_pass_done = True
        return total


HARNESS = (sys.executable, "-m", "tests.harness", "vmm")


def vmm_command(faults=(), broken_order: bool = False) -> tuple[str, ...]:
    """The command that starts `kvmlite` through this harness (for kvmlite.procs' `vmm=`)."""
    args = [*HARNESS]
    for f in faults:
        args += ["--fault", f]
    if broken_order:
        args.append("--broken-order")
    return (*args, "--")


def vmm_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.harness vmm")
    ap.add_argument("--fault", action="append", default=[], metavar="POINT=ACTION")
    ap.add_argument("--broken-order", action="store_true")
    ap.add_argument("kvmlite_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    rest = args.kvmlite_args[1:] if args.kvmlite_args[:1] == ["--"] else args.kvmlite_args
    hooks = FaultHooks(parse_faults(args.fault))
    return cli.main(rest, hooks=hooks,
                    migration_class=BrokenOrderMigration if args.broken_order else None)


def soak_main(argv) -> int:
    def options(ap):
        ap.add_argument("--broken-order", action="store_true",
                        help="every VMM reads the free bits before clearing the dirty log")

    def vmm(args):
        if args.broken_order:
            return vmm_command(broken_order=True), "BROKEN ORDER: free bits read first"
        return vmm_command(), "through the test harness"
    return soak.main(argv, vmm=vmm, prog="python -m tests.harness soak", extra_options=options)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vmm"]:
        return vmm_main(argv[1:])
    if argv[:1] == ["soak"]:
        return soak_main(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
