"""A VM put together from a RunConfig and run: `kvmlite run`, as a library call.

    status = runner.run(RunConfig(machine=MachineConfig(memory=256 << 20),
                                  boot=BootConfig("guest/guest.bin", "workload=hello")))

Boot an image or receive one (`incoming`), serve the QMP monitor and the gdb
stub meanwhile, and report how it ended: the exit status `kvmlite run` exits
with (kvmlite/exitcodes.py), a crash report on stderr, page counts with
`stats`.  After migrating the VM away the VMM stays, as QEMU's does in
`postmigrate`, until the monitor's `quit` (or `postmigrate_timeout`).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import replace
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import exitcodes
from .config import RunConfig
from .hooks import NO_HOOKS, Hooks
from .log import log
from .machine import Machine, RunResult

if TYPE_CHECKING:
    from .config import MigrationParams
    from .control.monitor import Monitor
    from .migration.destination import Incoming
    from .migration.source import Migration

    MigrationClass = type[Migration] | None


def run(cfg: RunConfig, *, hooks: Hooks = NO_HOOKS, migration_class: MigrationClass = None) -> int:
    """Run the VM `cfg` describes until it ends; returns its exit status.

    `hooks` and `migration_class` are for tests (tests/harness.py): named
    fault points, and a sender built another way."""
    if cfg.incoming is not None:
        return _run_incoming(cfg, hooks, migration_class)
    from .loader import read_image
    boot = cfg.boot
    assert boot is not None          # RunConfig has one or the other
    read_image(boot.image)       # a missing image fails before /dev/kvm is opened
    if cfg.gdb:
        from .gdbstub import parse_endpoint
        parse_endpoint(cfg.gdb)  # and so does a bad --gdb
    if cfg.creds.tls:
        from .migration.transport import check_tls
        check_tls(cfg.creds)     # bad certificates fail now, not when a migration starts
    with Machine(cfg.machine) as machine:
        machine.boot(boot)
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


def open_monitor(cfg: RunConfig, machine: Machine | None, *, hooks: Hooks = NO_HOOKS,
                 migration_class: MigrationClass = None,
                 incoming_factory: Callable[[str], Incoming] | None = None) -> Monitor:
    """The QMP monitor `cfg.monitor` asks for, listening, bound to `machine`
    (None: a destination whose VM has not arrived yet)."""
    from .control.monitor import Monitor

    def new_migration(params: MigrationParams) -> Migration:
        if params.local:
            from .migration.local import LocalMigration
            return LocalMigration(monitor.machine, params, hooks=hooks)
        from .migration.source import Migration
        return (migration_class or Migration)(monitor.machine, params, hooks=hooks)

    assert cfg.monitor is not None

    monitor = Monitor(machine, new_migration=new_migration, creds=cfg.creds, timeout=cfg.timeout,
                      incoming_factory=incoming_factory)
    monitor.listen(cfg.monitor)
    # The migration code is imported when first used, so that a VM without a
    # monitor starts fast; with one, import it now, beside the guest, rather than
    # inside the first `migrate` (measured: ~80 ms of its total time).
    threading.Thread(target=_import_migration, name="warm-up", daemon=True).start()
    return monitor


def _import_migration() -> None:
    import importlib
    for module in ("kvmlite.migration.source", "kvmlite.migration.destination"):
        importlib.import_module(module)


def _run_incoming(cfg: RunConfig, hooks: Hooks, migration_class: MigrationClass) -> int:
    from .endpoints import UnixUri
    from .errors import KvmliteError
    from .migration.destination import Incoming
    wanted = cfg.incoming
    assert wanted is not None
    premade = None
    if cfg.machine.memory is not None and (wanted.deferred or not isinstance(wanted.target, UnixUri)):
        # As QEMU's -m with -mem-prealloc: fault every page in before the
        # stream starts, so receiving is not slowed by first-touch faults.
        # (Not on unix:, where the RAM may come with the stream: a local
        # migration's memfd.)
        premade = Machine(replace(cfg.machine, prefault=True))
    machine: Machine | None = None
    monitor: Monitor | None = None
    incoming: Incoming | None = None

    def open_incoming(uri: str) -> Incoming:
        inc_cfg = replace(wanted, uri=uri)
        inc_cfg.check_peers(cfg.creds)
        incoming = Incoming(inc_cfg, cfg.creds, cfg.machine, hooks=hooks, machine=premade)
        incoming.listen()        # a busy port is said at once
        return incoming

    try:
        deferred = wanted.deferred
        incoming = None if deferred else open_incoming(wanted.uri)
        if cfg.monitor:
            monitor = open_monitor(cfg, None, hooks=hooks, migration_class=migration_class,
                                   incoming_factory=open_incoming if deferred else None)
            if incoming is not None:
                monitor.attach_incoming(incoming)
        if deferred:
            assert monitor is not None       # RunConfig: defer needs --monitor
            log.info("waiting for migrate-incoming on the monitor (--incoming defer)")
            incoming = monitor.wait_incoming()
            if incoming is None:          # quit first
                monitor.shutdown("host-qmp-quit")
                return exitcodes.OK
        assert incoming is not None
        try:
            machine = incoming.run()
        except KvmliteError:
            if monitor is not None and monitor.quit_requested.is_set():
                monitor.shutdown("host-qmp-quit")
                return exitcodes.OK
            if monitor is not None and not monitor.exit_on_error:
                # migrate-incoming's exit-on-error false: stay, to be asked why, until quit
                log.error("the incoming migration failed; waiting for quit on the monitor")
                monitor.wait_quit()
                monitor.shutdown("host-qmp-quit")
            elif monitor is not None:
                monitor.shutdown("host-error")
            raise
        return serve(machine, cfg, hooks=hooks, migration_class=migration_class, monitor=monitor,
                     incoming=incoming)
    finally:
        if incoming is not None:
            incoming.close()       # post-copy's threads stop before guest RAM goes
        if monitor is not None:
            monitor.close()
        for m in {id(x): x for x in (machine, premade) if x is not None}.values():
            m.close()


def serve(machine: Machine, cfg: RunConfig, *, hooks: Hooks = NO_HOOKS,
          migration_class: MigrationClass = None, monitor: Monitor | None = None,
          incoming: Incoming | None = None) -> int:
    """Run until the guest ends, or after migrating away until the monitor's
    quit; serve the monitor meanwhile (`monitor`, or one made here from
    `cfg.monitor`); report crash and stats.  Returns the exit status.
    `incoming`: the migration this VM arrived by (post-copy may still be
    bringing its pages)."""
    if monitor is None and cfg.monitor:
        monitor = open_monitor(cfg, machine, hooks=hooks, migration_class=migration_class)
    elif monitor is not None:
        monitor.attach(machine)
    cause = "host-error"
    try:
        try:
            result = machine.run()
        except KeyboardInterrupt:
            cause = "host-signal"
            raise
        if incoming is not None and incoming.postcopy is not None:
            _finish_postcopy(incoming, cfg.timeout)
        if result.reason == "migrated" and monitor is not None:
            _postmigrate(monitor, cfg.postmigrate_timeout)
        cause = shutdown_cause(result, monitor)
        if monitor is not None and monitor.migration is not None:
            # A migration thread still running reads guest RAM, which closing the
            # machine unmaps: a pre-copy one (the guest ended, or quit, mid-round)
            # is cancelled first, then each is given time to finish.
            monitor.migration.cancel()
            monitor.migration.wait(5.0)
    finally:
        if monitor is not None:
            monitor.shutdown(cause)
    report(machine, result, stats=cfg.stats)
    return exitcodes.of_result(result)


def _postmigrate(monitor: Monitor, timeout: float | None) -> None:
    """The VM runs elsewhere now: stay, as QEMU's postmigrate, so that a client
    can read the final figures, until quit (or `timeout` seconds)."""
    how = "quit" if timeout is None else f"quit or {timeout:g} s"
    log.info(f"postmigrate: the VM runs elsewhere now; this VMM waits for {how} on the monitor")
    if not monitor.wait_quit(timeout):
        log.info(f"postmigrate: no quit within {timeout:g} s (--postmigrate-timeout); exiting")


def _finish_postcopy(incoming: Incoming, timeout: float) -> None:
    """The guest ended while post-copy still brought pages: let the source finish
    (it would otherwise find the link broken and wait for a resume) while the link
    is up; a paused one is not waited for."""
    from .migration.status import ReceiveState as R
    if incoming.status is R.POSTCOPY_ACTIVE:
        log.info("the guest ended during post-copy: waiting for the last pages")
        incoming.wait_postcopy(timeout)


def shutdown_cause(result: RunResult, monitor: Monitor | None = None) -> str:
    """QAPI ShutdownCause of how a run ended, for the SHUTDOWN event."""
    if monitor is not None and monitor.quit_requested.is_set():
        return "host-qmp-quit"
    return {"exit": "guest-shutdown", "hlt": "guest-shutdown", "crash": "guest-panic",
            "quit": "host-qmp-quit"}.get(result.reason, "none")


def report(machine: Machine, result: RunResult, *, stats: bool) -> None:
    """A crash report for a crash; page counts with `stats`."""
    if result.reason == "crash" and result.crash is not None:
        from .crash import crash_report
        print(crash_report(machine, result.crash, result.vcpu), file=sys.stderr)
    if result.reason == "exit" and result.status != exitcodes.of_result(result):
        log.warning(f"the guest's exit status {result.status} is above {exitcodes.GUEST_MAX}: "
                    f"exiting {exitcodes.GUEST_MAX} (statuses above it are kvmlite's own)")
    if stats:
        print_stats(machine)


def print_stats(machine: Machine) -> None:
    total = machine.memory.npages
    if machine.fph.registration is None:
        log.info(f"stats: pages total {total}, no free-page bitmap registered, exits {machine.exits}")
    else:
        free = machine.fph.count_free()
        log.info(f"stats: pages total {total}, free per bitmap {free}, active {total - free}, "
                 f"exits {machine.exits}")
    if machine.nvcpus > 1:
        for vt in machine.vcpu_threads:
            kinds = ", ".join(f"{k} {n}" for k, n in list(machine.exits_by_kind(vt.index).items())[:3])
            log.info(f"stats: vCPU {vt.index}: exits {vt.exits} ({kinds})")
