"""kvmlite's monitor: QMP (docs/monitor.md), bound to a Machine and its migrations.

    monitor = Monitor(machine, new_migration=factory, creds=creds, timeout=30.0)
    monitor.listen("unix:/tmp/vm1.sock")
    ...                                  # the runner runs the VM meanwhile
    monitor.shutdown("guest-shutdown")   # SHUTDOWN to every client, then close

The engine (qmp.py) speaks the protocol and checks every argument against
its declaration in schema.py before a handler here runs; this module decides
what each command does to the VM and which events it raises.  Handlers run
one at a time across all clients, so a check-then-act (is a migration
running? then start one) cannot race another client.

A destination VMM has a monitor before it has a VM: it answers
`query-status` with "inmigrate" and `query-migrate` with the incoming
migration's state, and `migrate-incoming` starts one when the VMM was run
with `--incoming defer`.  After a migration away the source stays in
`postmigrate` until `quit` (the runner may give up waiting after a timeout).

Post-copy (docs/postcopy.md) uses QEMU's names: the `postcopy-ram`
capability, `migrate-start-postcopy`, `migrate` with `resume: true` on the
source and `migrate-recover` on the destination after a broken link;
kvmlite's own switch policies are the parameters `x-postcopy-after` and
`x-postcopy-now`, and its figures the `x-postcopy` members of query-migrate.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..bitmap import PAGE_SIZE
from ..config import DEFAULT_TIMEOUT, Credentials, MigrationParams, read_key
from ..endpoints import FileUri
from ..migration.status import POSTCOPY_STATES, MigrationStatus as S, ReceiveState as R
from . import schema
from .arraycodec import encode_array, mask_to_words
from .qapi import ErrorClass, Nullable, QmpError, Struct
from .qmp import CommandTable, QmpServer, handles

if TYPE_CHECKING:
    from ..migration.destination import Incoming

__all__ = ["Monitor", "CAPABILITY_DEFAULTS", "PARAMETER_DEFAULTS", "SHUTDOWN_BY_GUEST"]

# Migration capabilities and parameters as a fresh VMM has them (docs/monitor.md):
# kvmlite's defaults, which differ from QEMU's where kvmlite's design does.
_DEFAULT_PARAMS = MigrationParams("file:-")
CAPABILITY_DEFAULTS = {"events": False, "auto-converge": _DEFAULT_PARAMS.auto_converge,
                       "multifd": _DEFAULT_PARAMS.channels > 1, "postcopy-ram": _DEFAULT_PARAMS.postcopy,
                       "x-free-page-hint": _DEFAULT_PARAMS.hint, "x-local": _DEFAULT_PARAMS.local}
PARAMETER_DEFAULTS = {"downtime-limit": round(_DEFAULT_PARAMS.downtime_ms),
                      "max-bandwidth": _DEFAULT_PARAMS.bandwidth,
                      "multifd-channels": 2,          # QEMU's default; used with the multifd capability
                      "x-max-rounds": _DEFAULT_PARAMS.max_rounds,
                      "x-stall-timeout": 0, "x-auth-key": "",
                      "x-postcopy-after": _DEFAULT_PARAMS.postcopy_after,
                      "x-postcopy-now": _DEFAULT_PARAMS.postcopy_now}

# Seconds the VMM waits, once it has said SHUTDOWN, for its clients to hang up
# before it does (qmp-shell and qemu.qmp complain when the server goes first)
LINGER = 1.0

# ShutdownCause values that mean the guest asked (SHUTDOWN's `guest` member)
SHUTDOWN_BY_GUEST = frozenset({"guest-shutdown", "guest-reset", "guest-panic"})

# What a destination's receive states are called in QMP's MigrationStatus
_INCOMING_STATUS = {R.WAITING: "setup", R.RECEIVING: "active", R.READY: "handover",
                    R.RUNNING: "completed", R.FAILED: "failed",
                    R.POSTCOPY_ACTIVE: "postcopy-active", R.POSTCOPY_PAUSED: "postcopy-paused",
                    R.POSTCOPY_RECOVER: "postcopy-recover"}

# A migration holds the VM paused in these: only its own end may resume it
_HANDOVER = (S.DEVICE, S.HANDOVER, S.UNRESOLVED, S.CANCELLING, *POSTCOPY_STATES)

# A destination's states in which the guest runs here (all its pages here, or
# post-copy still bringing them)
_GUEST_HERE = (R.RUNNING, R.POSTCOPY_ACTIVE, R.POSTCOPY_PAUSED, R.POSTCOPY_RECOVER)
# A destination's states before the VM is this side's: quit abandons the migration
_BEFORE_COMMIT = (R.WAITING, R.RECEIVING, R.READY)


def _generic(desc: str) -> QmpError:
    return QmpError(ErrorClass.GENERIC, desc)


class Monitor:
    """The QMP monitor of one VMM.

    `machine`: the VM, or None on a destination until its VM has arrived
    (`attach`).  `new_migration(params)` builds an outgoing Migration
    (runner.py injects the test harness's hooks and sender through it); None:
    this VMM cannot migrate.  `creds` and `timeout` are the VMM's own, the
    defaults for its migrations.  `incoming_factory(uri)` opens an incoming
    migration for `migrate-incoming` (the runner gives one with
    `--incoming defer`)."""

    def __init__(self, machine=None, *, new_migration: Callable | None = None,
                 creds: Credentials | None = None, timeout: float = DEFAULT_TIMEOUT,
                 incoming_factory: Callable | None = None, check_returns: bool = False):
        self.machine = machine
        self.new_migration = new_migration
        self.creds = creds or Credentials()
        self.timeout = timeout
        self.incoming_factory = incoming_factory
        self.migration = None                 # the current or last outgoing Migration
        self.incoming = None                  # the Incoming, on a destination
        self.exit_on_error = True             # migrate-incoming's exit-on-error
        self.capabilities = dict(CAPABILITY_DEFAULTS)
        self.parameters = dict(PARAMETER_DEFAULTS)
        self._auth_key: bytes | None = None   # x-auth-key's key, read when it was set
        self.quit_requested = threading.Event()
        self._wake = threading.Condition()    # the runner waits here: migrate-incoming, quit
        self._stopped_by_migration = False    # a migration paused a running VM (RESUME if it resumes it)
        self.table = CommandTable(schema.COMMANDS, schema.EVENTS, check_returns=check_returns)
        self.table.bind_all(self)
        self.server = QmpServer(self.table)

    # ---- what the runner does ------------------------------------------------------------

    def listen(self, address: str) -> str:
        """Start serving at `address` (unix:PATH, PATH, tcp:HOST:PORT); returns where."""
        return self.server.listen(address)

    @property
    def addresses(self) -> list[str]:
        return self.server.addresses

    def attach(self, machine) -> None:
        """The VM has arrived (a destination), or is built: commands now act on it."""
        self.machine = machine

    def attach_incoming(self, incoming) -> None:
        """Report this incoming migration in query-migrate and MIGRATION events."""
        self.incoming = incoming
        incoming.state.listeners.append(self._on_incoming_state)

    def wait_incoming(self) -> Incoming | None:
        """With `--incoming defer`: wait for migrate-incoming; the Incoming it
        opened, or None if quit came first."""
        with self._wake:
            self._wake.wait_for(lambda: self.incoming is not None or self.quit_requested.is_set())
            return None if self.quit_requested.is_set() else self.incoming

    def wait_quit(self, timeout: float | None = None) -> bool:
        """Wait for `quit` (postmigrate); False if `timeout` seconds passed first."""
        return self.quit_requested.wait(timeout)

    @property
    def postmigrate(self) -> bool:
        """The VM was migrated away: it runs elsewhere now (QEMU's postmigrate)."""
        mig = self.migration
        return mig is not None and mig.status is S.COMPLETED and not mig.params.keep_running

    def shutdown(self, reason: str) -> None:
        """SHUTDOWN (after the reply to a quit that caused it), then stop serving,
        once the clients have hung up or LINGER seconds have passed."""
        self.server.settle()
        self.emit("SHUTDOWN", {"guest": reason in SHUTDOWN_BY_GUEST, "reason": reason})
        self.server.linger(LINGER)
        self.server.close()

    def close(self) -> None:
        self.server.close()

    def emit(self, name: str, data: dict | None = None) -> None:
        self.server.emit(name, data)

    def _migration_event(self, name: str, data: dict) -> None:
        if self.capabilities["events"]:
            self.emit(name, data)

    # ---- run state: qapi/run-state.json, qapi/misc.json ----------------------------------------

    def run_state(self) -> str:
        m, mig = self.machine, self.migration
        if m is None:
            return "inmigrate"
        if mig is not None:
            if self.postmigrate:
                return "postmigrate"
            if mig.status in _HANDOVER and (mig.status is not S.CANCELLING or m.paused):
                return "finish-migrate"
        if self.incoming is not None and self.incoming.status not in _GUEST_HERE:
            return "inmigrate"
        if not m.running:
            return "shutdown"
        return "paused" if m.paused else "running"

    @handles("query-status")
    def query_status(self) -> dict:
        status = self.run_state()
        return {"status": status, "running": status == "running"}

    @handles("query-kvm")
    def query_kvm(self) -> dict:
        return {"enabled": True, "present": True}

    @handles("query-memdev")
    def query_memdev(self) -> list:
        mem = self._machine().memory
        memfd = mem.fd is not None
        dev = {"size": mem.size, "merge": False, "dump": True, "prealloc": mem.preallocated,
               "share": memfd, "host-nodes": [], "policy": "default",
               "x-backend": "memory-backend-memfd" if memfd else "memory-backend-ram"}
        if memfd:
            dev["x-allocated"] = mem.allocated_bytes()
        return [dev]

    @handles("stop")
    def stop(self) -> None:
        m = self._running_machine()
        if not m.paused:          # already paused (stop, or a migration's last pass): nothing to do
            m.pause_all()
            self.emit("STOP")

    @handles("cont")
    def cont(self) -> None:
        mig = self.migration
        if self.postmigrate:
            raise _generic(self._migrated_away(mig))
        if mig is not None and mig.status in POSTCOPY_STATES:
            raise _generic(f"the migration is {mig.status.value}: the VM has run at the destination "
                           "since the switch to post-copy, and its newer state is there, not here")
        if mig is not None and mig.status in _HANDOVER:
            raise _generic(f"a migration is {mig.status.value}: the VM is paused for its "
                           "handover, which only the migration may undo")
        m = self._running_machine()
        if m.paused:
            m.resume_all()
            self.emit("RESUME")

    @handles("quit")
    def quit(self) -> None:
        """Reply, then the runner emits SHUTDOWN and the VMM exits.  A migration
        still running is cancelled first (after COMMIT it cannot be: then the VM
        is the destination's, and this VMM ends as after `x-migrate-resolve
        destination`)."""
        from ..machine import RunResult
        self.quit_requested.set()
        mig = self.migration
        if mig is not None and not mig.status.finished:
            mig.cancel()
        if self.incoming is not None and self.incoming.status in _BEFORE_COMMIT:
            self.incoming.abort()
        m = self.machine
        if m is not None and m.running:
            m.quit(RunResult("quit", 0))
        with self._wake:
            self._wake.notify_all()

    # ---- outgoing migration: qapi/migration.json ---------------------------------------------------

    @handles("migrate-set-capabilities")
    def set_capabilities(self, capabilities: list) -> None:
        self._no_migration_running()
        for c in capabilities:
            self.capabilities[c["capability"]] = c["state"]

    @handles("query-migrate-capabilities")
    def query_capabilities(self) -> list:
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    @handles("migrate-set-parameters")
    def set_parameters(self, **params: Any) -> None:
        """Parameters for the next migration; only those given change.  Checked
        now, as a whole, so a bad value is refused here and not at `migrate`."""
        given = {k.replace("_", "-"): v for k, v in params.items()}
        new = dict(self.parameters, **given)
        key = self._auth_key
        if "x-auth-key" in given:
            key = read_key(new["x-auth-key"]) if new["x-auth-key"] else None
        self._params("file:-", new, key, capabilities=False)   # ConfigError: refused, nothing changed
        self.parameters, self._auth_key = new, key

    @handles("query-migrate-parameters")
    def query_parameters(self) -> dict:
        return dict(self.parameters)

    def _params(self, uri: str, p: dict, key: bytes | None, *, live: bool = True,
                keep_running: bool = False, capabilities: bool = True) -> MigrationParams:
        """The MigrationParams of a migration to `uri` with parameters `p`;
        `capabilities` False leaves out those that depend on the uri (multifd,
        x-local), for checking parameters alone."""
        creds = self.creds
        if key is not None:
            from dataclasses import replace
            creds = replace(creds, key=key)
        caps = self.capabilities
        # x-postcopy-after and x-postcopy-now mean something only with
        # postcopy-ram on (as QEMU's postcopy parameters); set_parameters
        # checks them with it off, by their declared range alone.
        postcopy = capabilities and caps["postcopy-ram"]
        return MigrationParams(
            uri, hint=caps["x-free-page-hint"], live=live,
            downtime_ms=float(p["downtime-limit"]), bandwidth=p["max-bandwidth"],
            max_rounds=p["x-max-rounds"],
            timeout=p["x-stall-timeout"] / 1000 if p["x-stall-timeout"] else self.timeout,
            keep_running=keep_running, creds=creds, auto_converge=caps["auto-converge"],
            postcopy=postcopy, postcopy_after=p["x-postcopy-after"] if postcopy else 0,
            postcopy_now=p["x-postcopy-now"] if postcopy else False,
            channels=p["multifd-channels"] if capabilities and caps["multifd"] else 1,
            local=capabilities and caps["x-local"])

    @handles("migrate")
    def migrate(self, uri: str, detach: bool = False, resume: bool = False,
                x_keep_running: bool = False) -> None:
        """Start a migration on its own thread and return at once.  A VM the
        user stopped goes in one pass (stop-copy, as QEMU's stop + migrate).
        With `resume`, reconnect the post-copy migration in postcopy-paused
        (or unresolved after its switch) to `uri` instead."""
        if resume:
            mig = self.migration
            if mig is None:
                raise _generic("Cannot resume if there is no paused migration")
            mig.resume(uri)          # MigrationError (a GenericError) if it is not paused
            return
        if self.new_migration is None:
            raise _generic("this VMM cannot start migrations")
        self._no_migration_running()
        if self.postmigrate:
            raise _generic(self._migrated_away(self.migration))
        m = self._running_machine()
        params = self._params(uri, self.parameters, self._auth_key, live=not m.paused,
                              keep_running=x_keep_running)
        mig = self.new_migration(params)
        mig.state.listeners.append(lambda old, new: self._on_migration_state(mig, old, new))
        mig.sync_listeners.append(lambda n: self._migration_event("MIGRATION_PASS", {"pass": n}))
        self._stopped_by_migration = False
        self.migration = mig
        mig.start()

    @handles("migrate_cancel")
    def migrate_cancel(self) -> None:
        mig = self.migration
        if mig is not None and not mig.status.finished and not mig.cancel():
            raise _generic(f"too late to cancel: the migration is {mig.status.value} "
                           "(the destination may be running the guest)")

    @handles("migrate-start-postcopy")
    def migrate_start_postcopy(self) -> None:
        """Switch at the next chance (between two 256 MiB chunks of the round in
        progress, or before the next); a switch already under way is left be."""
        mig = self.migration
        if mig is None or mig.status.finished:
            if not self.capabilities["postcopy-ram"]:
                raise _generic("Enable postcopy with migrate_set_capability before the start "
                               "of migration")
            raise _generic("Postcopy must be started after migration has been started")
        mig.start_postcopy()

    @handles("x-migrate-resolve")
    def migrate_resolve(self, owner: str) -> None:
        mig = self.migration
        if mig is None:
            raise _generic("no migration to resolve")
        mig.resolve(owner)

    @handles("query-migrate")
    def query_migrate(self) -> dict:
        if self.migration is not None:
            return migration_info(self.migration)
        if self.incoming is not None:
            return self._incoming_info()
        return {}

    def _on_migration_state(self, mig, old: S, new: S) -> None:
        m = self.machine
        if new is S.DEVICE and m is not None and not m.paused:
            # the migration is about to pause a running VM for its last pass
            self._stopped_by_migration = True
            self.emit("STOP")
        self._migration_event("MIGRATION", {"status": new.value})
        resumed = new in (S.FAILED, S.CANCELLED) or (new is S.COMPLETED and mig.params.keep_running)
        if resumed and self._stopped_by_migration:
            self._stopped_by_migration = False
            self.emit("RESUME")

    def _no_migration_running(self) -> None:
        mig = self.migration
        if mig is not None and mig.status is S.UNRESOLVED:
            raise _generic("There's a migration process in progress: it is unresolved, the VM "
                           "paused here until x-migrate-resolve says where it runs")
        if mig is not None and (not mig.status.finished or not mig.done.is_set()):
            raise _generic("There's a migration process in progress")
        inc = self.incoming
        if inc is not None and inc.status not in (R.RUNNING, R.FAILED):
            raise _generic("There's a migration process in progress")

    @staticmethod
    def _migrated_away(mig) -> str:
        if isinstance(mig.target, FileUri):
            return (f"the VM was saved to {mig.target} and handed over: this VMM no longer has it "
                    "(x-keep-running on migrate saves a snapshot and carries on)")
        return f"the VM was migrated to {mig.target} and runs there now"

    # ---- incoming migration -------------------------------------------------------------------

    @handles("migrate-recover")
    def migrate_recover(self, uri: str) -> None:
        """A destination in postcopy-paused waits for the source's resume on `uri`."""
        inc = self.incoming
        if inc is None or inc.status is not R.POSTCOPY_PAUSED:
            raise _generic("Migrate recover can only be run when postcopy is paused.")
        inc.recover(uri)

    @handles("migrate-incoming")
    def migrate_incoming(self, uri: str, exit_on_error: bool = True) -> None:
        """Open the incoming migration `--incoming defer` left for later."""
        if self.incoming_factory is None:
            raise _generic("'-incoming' was not specified on the command line")
        if self.incoming is not None:
            raise _generic("The incoming migration has already been started")
        incoming = self.incoming_factory(uri)        # listens now: a busy port is said here
        self.exit_on_error = exit_on_error
        self.attach_incoming(incoming)
        with self._wake:
            self._wake.notify_all()

    def _on_incoming_state(self, old: R, new: R) -> None:
        # COMMIT: the guest runs here now (post-copy: its pages still coming)
        committed = new in (R.RUNNING, R.POSTCOPY_ACTIVE) and old not in _GUEST_HERE
        if committed and self.incoming is not None and self.incoming.machine is not None:
            # the VM is this side's from now on: commands act on it at once,
            # not only once the runner has set it going
            self.attach(self.incoming.machine)
        self._migration_event("MIGRATION", {"status": _INCOMING_STATUS[new]})
        if committed:
            self.emit("RESUME")

    def _incoming_info(self) -> dict:
        inc = self.incoming
        info: dict = {"status": _INCOMING_STATUS[inc.status]}
        s = inc.stats
        if s is not None:
            m = inc.machine
            seconds = max(s.ms / 1000, 1e-9)
            info["total-time"] = round(s.ms)
            info["x-total-time-ms"] = round(s.ms, 3)
            info["ram"] = _ram(transferred=s.bytes, remaining=0,
                               total=m.memory.size if m is not None else 0,
                               duplicate=s.zero_pages, normal=s.pages, seconds=seconds,
                               syncs=s.rounds)
        pc = inc.postcopy_stats()
        if pc is not None:
            dest = _qmp_members(pc, schema.X_POSTCOPY_INCOMING)
            if dest is not None:
                info["x-postcopy-incoming"] = dest
            blocktime = _blocktime(dest, inc.machine)
            if blocktime is not None:
                info["postcopy-blocktime"] = blocktime
            ram = info.get("ram")
            if ram is not None:
                received = int(pc.get("bytes_received", 0))
                ram["transferred"] += received
                ram["postcopy-bytes"] = received
                ram["precopy-bytes"] = s.bytes if s is not None else 0
        return info

    # ---- kvmlite's own ---------------------------------------------------------------------------

    @handles("x-query-free-pages")
    def query_free_pages(self) -> dict:
        m = self._machine()
        total = m.memory.npages
        if m.fph.registration is None:
            return {"pages-total": total, "registered": False}
        free = m.fph.count_free()
        return {"pages-total": total, "registered": True, "free": free, "active": total - free}

    @handles("x-query-pagemap")
    def query_pagemap(self) -> dict:
        m = self._machine()
        mig = self.migration
        free = m.fph.free_mask()
        backed = m.memory.backed_pages(0, m.memory.npages)
        dirty = None
        if mig is not None and not mig.done.is_set() and mig.dirty_words is not None:
            dirty = mig.dirty_words.copy()    # the migration thread keeps changing it
        sent = mig.sent_round.copy() if mig is not None else None
        states = self.incoming.page_states() if self.incoming is not None else None
        return {
            "page-size": PAGE_SIZE, "pages": m.memory.npages,
            "registered": free is not None,
            "free": encode_array(mask_to_words(free)) if free is not None else None,
            "backed": encode_array(mask_to_words(backed)) if backed is not None else None,
            "dirty": encode_array(dirty) if dirty is not None else None,
            "sent-round": encode_array(sent) if sent is not None else None,
            "postcopy-state": encode_array(states) if states is not None else None,
            "migration": None if mig is None else {
                "status": mig.status.value, "x-free-page-hint": mig.params.hint,
                "rounds": mig.stats.rounds},
        }

    @handles("x-query-vcpus")
    def query_vcpus(self, cpu_index: int | None = None) -> list:
        """Registers read on each vCPU's own thread with every vCPU parked (one
        consistent picture): a running VM is paused for the read and resumed,
        a stopped one stays stopped, and a migrating one is not touched (its
        pause is not ours to undo)."""
        m = self._machine()
        wanted = range(m.nvcpus) if cpu_index is None else [cpu_index]
        if cpu_index is not None and cpu_index >= m.nvcpus:
            raise _generic(f"Invalid CPU index {cpu_index}: the VM has {m.nvcpus} vCPU(s)")
        mig = self.migration
        regs: dict[int, dict] = {}
        why_not = None
        if not m.running:
            why_not = "the guest is not running here"
        elif mig is not None and not mig.done.is_set():
            why_not = "a migration is in progress (its pause is not ours to undo)"
        else:
            we_pause = not m.paused
            try:
                if we_pause:
                    m.pause_all()
                regs = {i: m.call(i, _registers) for i in wanted}
            finally:
                if we_pause:
                    m.resume_all()
        out = []
        for i in wanted:
            info = {"cpu-index": i, "registers": regs.get(i), "exits": m.exits_by_kind(i),
                    "exits-total": m.vcpu_threads[i].exits}
            if why_not:
                info["registers-unread"] = why_not
            out.append(info)
        return out

    @handles("x-query-image")
    def query_image(self) -> dict:
        image = self._machine().image
        if image is None:
            return {"loaded": False}
        return {"loaded": True, "start": image.start, "end": image.end, "entry": image.entry}

    @handles("x-guest-finish")
    def guest_finish(self) -> None:
        self._machine().fph.request_stop()

    # ---- helpers -----------------------------------------------------------------------------

    def _machine(self):
        if self.machine is None:
            state = self.incoming.status.value if self.incoming is not None else "not started"
            raise _generic(f"no VM here yet: the incoming migration is {state}")
        return self.machine

    def _running_machine(self):
        m = self._machine()
        if not m.running:
            if self.postmigrate:
                raise _generic(self._migrated_away(self.migration))
            raise _generic("the guest is not running")
        return m


def _registers(vcpu) -> dict:
    """General registers, control registers and EFER, and cs/ss, as plain numbers."""
    out = vcpu.regs_dict()
    s = vcpu.sregs_dict()
    for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
        out[name] = s[name]
    for seg in ("cs", "ss"):
        out[seg] = {k: s[seg][k] for k in ("selector", "base", "limit", "dpl", "l", "db")}
    return out


def _ram(*, transferred: int, remaining: int, total: int, duplicate: int, normal: int,
         seconds: float, syncs: int, precopy: int | None = None, dirty_rate: float = 0.0,
         skipped: int = 0, resent: int = 0, postcopy: int = 0, requests: int = 0,
         multifd: int = 0) -> dict:
    """QAPI MigrationStats: QEMU's units (bytes, pages, Mbit/s), kvmlite's x- members.
    `transferred` is split into `precopy` (sent while the guest ran here),
    `postcopy` (after the switch) and the rest, sent in the downtime."""
    return {
        "transferred": transferred, "remaining": remaining, "total": total,
        "duplicate": duplicate, "normal": normal, "normal-bytes": normal * PAGE_SIZE,
        "dirty-pages-rate": round(dirty_rate),
        "mbps": round(transferred * 8 / 1e6 / seconds, 3),      # megabits: QEMU's unit, not MiB/s
        "dirty-sync-count": syncs, "postcopy-requests": requests, "page-size": PAGE_SIZE,
        "multifd-bytes": multifd, "pages-per-second": round((normal + duplicate) / seconds),
        "precopy-bytes": transferred if precopy is None else precopy,
        "downtime-bytes": 0 if precopy is None else transferred - precopy - postcopy,
        "postcopy-bytes": postcopy, "dirty-sync-missed-zero-copy": 0,
        "x-skipped-free": skipped, "x-resent": resent,
    }


def migration_info(mig) -> dict:
    """QAPI MigrationInfo of an outgoing migration: QEMU's members in QEMU's
    units, kvmlite's figures as x- members (docs/monitor.md)."""
    s = mig.stats
    s.update()                  # post-copy's page server counts in C: bring its figures in
    status = mig.status
    info: dict = {"status": status.value}
    ended = status.finished or status is S.UNRESOLVED
    total_ms = s.total_ms if ended and s.total_ms else (time.time() - s.started_at) * 1000
    info["total-time"] = round(total_ms)
    info["x-total-time-ms"] = round(total_ms, 3)
    info["x-free-page-hint"] = s.hint
    info["x-live"] = s.live
    if s.dirty_log:
        info["x-dirty-log"] = s.dirty_log
    if status is S.SETUP:
        return info
    info["setup-time"] = round(s.setup_ms)
    info["x-setup-time-ms"] = round(s.setup_ms, 3)
    seconds = max(total_ms / 1000, 1e-9)
    pc = s.postcopy
    # after the switch: the pages the page server sent count as sent, and what
    # is left is what it has still to send
    pc_sent = int(pc.get("pages_pushed", 0)) + int(pc.get("pages_on_request", 0))
    pc_zero = int(pc.get("zero_pages", 0))
    remaining = int(pc.get("pages_left", 0)) if pc else s.pages_remaining
    info["ram"] = _ram(transferred=s.bytes_wire, remaining=remaining * PAGE_SIZE,
                       total=s.pages_total * PAGE_SIZE, duplicate=s.pages_zero + pc_zero,
                       normal=s.pages_sent + pc_sent - pc_zero,
                       seconds=seconds, syncs=s.dirty_syncs,
                       precopy=s.precopy_bytes or None,
                       dirty_rate=s.dirty_rate_pps, skipped=s.pages_skipped_free,
                       resent=s.pages_resent, postcopy=int(pc.get("bytes", 0)),
                       requests=int(pc.get("requests", 0)), multifd=s.multifd_bytes)
    if status is S.ACTIVE:
        rate = s.bytes_wire / seconds
        if rate > 0:
            info["expected-downtime"] = round(s.pages_remaining * PAGE_SIZE / rate * 1000)
    if s.throttle_pct:
        info["cpu-throttle-percentage"] = s.throttle_pct
    if s.throttled_ms:
        info["x-throttled-ms"] = s.throttled_ms
    if status is S.COMPLETED or (pc and status in POSTCOPY_STATES):
        # post-copy's downtime ended at COMMIT: known from postcopy-active on
        info["downtime"] = round(s.downtime_ms)
        info["x-downtime-ms"] = round(s.downtime_ms, 3)
        info["x-downtime-parts"] = dict(s.downtime_parts_ms)
    if s.error and status in (S.FAILED, S.CANCELLED, S.UNRESOLVED, S.POSTCOPY_PAUSED):
        info["error-desc"] = s.error
    if pc:
        xpc = _qmp_members(pc, schema.X_POSTCOPY) or {}
        if xpc:
            info["x-postcopy"] = xpc
        blocktime = _blocktime(xpc.get("destination"), mig.machine)
        if blocktime is not None:
            info["postcopy-blocktime"] = blocktime
    rounds = [{"pages": int(p), "ms": ms} for p, ms in zip(s.round_pages, s.round_ms)]
    for p in s.round_pages[len(s.round_ms):]:
        # the last pass, with the vCPUs paused: its time is in the downtime's parts
        parts = s.downtime_parts_ms
        last = parts.get("sync", 0.0) + parts.get("pages", 0.0) if "pages" in parts else None
        rounds.append({"pages": int(p), "ms": last})
    info["x-rounds"] = rounds
    info["x-sync-ms"] = list(s.sync_ms)
    return info



def _qmp_members(figures: dict, struct: Struct) -> dict | None:
    """kvmlite's figures (a dict with snake_case keys) as the members `struct`
    declares (kebab-case), recursively.  An optional figure that is missing,
    or not of its declared type, is left out; a required one makes the whole
    None.  The destination's part comes from the peer, whose bytes are not to
    be trusted."""
    out: dict = {}
    for m in struct.fields:
        key = m.name.replace("-", "_")
        value = figures.get(key)
        kind = m.type.of if isinstance(m.type, Nullable) and value is not None else m.type
        if isinstance(kind, Struct) and isinstance(value, dict):
            value = _qmp_members(value, kind)
        if key in figures and (value is not None or isinstance(m.type, Nullable)):
            try:
                out[m.name] = m.type.check(value, m.name)
                continue
            except QmpError:
                pass
        if not m.optional:
            return None
    return out


def _blocktime(dest: dict | None, machine) -> int | None:
    """QEMU's postcopy-blocktime (ms the vCPUs waited for remote pages) from the
    destination's figures: the sum of its remote faults' latencies, which is
    the vCPU's blocked time only on a guest with one vCPU (QEMU counts the time
    all vCPUs were blocked at once, which a per-fault sum cannot tell)."""
    if not dest or "remote-wait-ms" not in dest or machine is None or machine.nvcpus != 1:
        return None
    return min(round(dest["remote-wait-ms"]), (1 << 32) - 1)
