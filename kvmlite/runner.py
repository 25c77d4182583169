"""A VM put together from a RunConfig and run: `kvmlite run`, as a library call.

    status = runner.run(RunConfig(machine=MachineConfig(memory=256 << 20),
                                  boot=BootConfig("guest/guest.bin", "workload=hello")))

Boot an image or receive one (`incoming`), serve the monitor and the gdb
stub meanwhile, and report how it ended: the exit status `kvmlite run` exits
with, a crash report on stderr, page counts with `stats`.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from .config import MigrationParams, RunConfig
from .hooks import NO_HOOKS, Hooks
from .log import log
from .machine import Machine, RunResult


def run(cfg: RunConfig, *, hooks: Hooks = NO_HOOKS, migration_class=None) -> int:
    """Run the VM `cfg` describes until it ends; returns its exit status.

    `hooks` and `migration_class` are for tests (tests/harness.py): named
    fault points, and a sender built another way."""
    if cfg.incoming is not None:
        return _run_incoming(cfg, hooks, migration_class)
    from .loader import read_image
    read_image(cfg.boot.image)   # a missing image fails before /dev/kvm is opened
    if cfg.gdb:
        from .gdbstub import parse_endpoint
        parse_endpoint(cfg.gdb)  # and so does a bad --gdb
    if cfg.creds.tls:
        from .migration.transport import check_tls
        check_tls(cfg.creds)     # bad certificates fail now, not when a migration starts
    with Machine(cfg.machine) as machine:
        machine.boot(cfg.boot)
        if not cfg.gdb:
            return serve(machine, cfg, hooks=hooks, migration_class=migration_class)
        from .gdbstub import GdbStub
        stub = GdbStub.wait_for_gdb(machine, cfg.gdb)
        status = None
        try:
            status = serve(machine, cfg, hooks=hooks, migration_class=migration_class)
            return status
        finally:
            stub.guest_ended(1 if status is None else status)


def _run_incoming(cfg: RunConfig, hooks: Hooks, migration_class) -> int:
    from .migration.destination import Incoming
    from .endpoints import UnixUri
    machine = None
    if cfg.machine.memory is not None and not isinstance(cfg.incoming.target, UnixUri):
        # As QEMU's -m with -mem-prealloc: fault every page in before the
        # stream starts, so receiving is not slowed by first-touch faults.
        # (On unix: the RAM may come with the stream, a local migration's memfd.)
        machine = Machine(replace(cfg.machine, prefault=True))
    try:
        incoming = Incoming(cfg.incoming, cfg.creds, cfg.machine, hooks=hooks, machine=machine)
        incoming.listen()
        machine = incoming.run()
        return serve(machine, cfg, hooks=hooks, migration_class=migration_class)
    finally:
        if machine is not None:
            machine.close()


def serve(machine: Machine, cfg: RunConfig, *, hooks: Hooks = NO_HOOKS, migration_class=None) -> int:
    """Run until the guest ends; serve the monitor meanwhile; report crash and stats."""
    monitor = None
    if cfg.monitor:
        from .monitor import Monitor
        monitor = Monitor(machine, cfg.monitor,
                          new_migration=_migration_factory(machine, cfg, hooks, migration_class))
        monitor.start()
    try:
        result = machine.run()
        if result.reason == "migrated" and monitor:
            # Let `kvmlite migrate` read the final stats before this process goes.
            monitor.wait_released()
    finally:
        if monitor:
            monitor.stop()
    report(machine, result, stats=cfg.stats)
    return result.status


def _migration_factory(machine: Machine, cfg: RunConfig, hooks: Hooks, migration_class):
    """What the monitor's `migrate` builds: this VMM's credentials and timeout by default."""
    def new_migration(uri: str, **params):
        from .migration.source import Migration
        params.setdefault("creds", cfg.creds)
        params.setdefault("timeout", cfg.timeout)
        mp = MigrationParams(uri, **params)
        if mp.local:
            from .migration.local import LocalMigration
            return LocalMigration(machine, mp, hooks=hooks)
        return (migration_class or Migration)(machine, mp, hooks=hooks)
    return new_migration


def report(machine: Machine, result: RunResult, *, stats: bool) -> None:
    """A crash report for a crash; page counts with `stats`."""
    if result.reason == "crash":
        from .crash import crash_report
        print(crash_report(machine, result.crash, result.vcpu), file=sys.stderr)
    if stats:
        print_stats(machine)


def print_stats(machine: Machine) -> None:
    total = machine.memory.npages
    if machine.fph.registration is None:
        log.info(f"stats: pages total {total}, no free-page bitmap registered, exits {machine.exits}")
        return
    free = machine.fph.count_free()
    log.info(f"stats: pages total {total}, free per bitmap {free}, active {total - free}, "
             f"exits {machine.exits}")
