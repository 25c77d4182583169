"""kvmlite's QMP monitor (kvmlite/control/monitor.py) bound to a fake machine,
as a QMP client sees it: run states and their events, a migration's events
and figures in QEMU's shapes, parameters feeding the migration, the handover's
operator command, a destination's monitor, and the inspection commands.
No /dev/kvm: the migrations go to a fake sink (tests/fakes.py)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlite import abi
from kvmlite.bitmap import PAGE_SIZE
from kvmlite.control.arraycodec import decode_array, mask_to_words, words_to_mask
from kvmlite.control.client import QmpClient, QmpCommandError
from kvmlite.control.monitor import Monitor
from kvmlite.migration.status import ReceiveState as R, RECEIVE_TRANSITIONS, StateMachine
from kvmlite.pagemap.model import DIRTY, FREE, UNTOUCHED, from_monitor
from kvmlite.vstate.memory import GuestMemory

from kvmlite.migration.source import Migration
from tests.fakes import FakeMachine, StreamSink, new_migration_for

NPAGES = 1024                   # 4 MiB


@pytest.fixture
def machine():
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    for p in range(0, NPAGES, 4):                 # every fourth page holds data
        mem.write(p * PAGE_SIZE, (p + 1).to_bytes(4, "little") * (PAGE_SIZE // 4))
    m = FakeMachine(mem)
    yield m
    mem.close()


@pytest.fixture
def make_monitor(tmp_path):
    """A monitor on a fresh socket, its replies checked against the schema."""
    made = []

    def make(machine, **kw):
        kw.setdefault("new_migration", new_migration_for(machine) if machine is not None else None)
        mon = Monitor(machine, check_returns=True, **kw)
        mon.path = f"{tmp_path}/m{len(made)}.sock"
        mon.listen(f"unix:{mon.path}")
        made.append(mon)
        return mon
    yield make
    for mon in made:
        if isinstance(mon.migration, Migration):   # its thread reads guest RAM the fixture unmaps next
            mon.migration.cancel()
            assert mon.migration.wait(10), "a migration thread outlived its test"
        mon.close()


def client(mon) -> QmpClient:
    return QmpClient(f"unix:{mon.path}", timeout=10)


def ask(mon, command: str, arguments: dict | None = None) -> dict:
    """One request straight to the engine, as if from a negotiated client: the whole reply."""
    req = {"execute": command}
    if arguments is not None:
        req["arguments"] = arguments
    reply = mon.server.handle(None, req)
    json.dumps(reply)           # always JSON
    return reply


def events(q: QmpClient, n: int = 0) -> list:
    """(name, data) of the events received so far, after `n` more seconds."""
    time.sleep(n)
    return [(e["event"], e.get("data")) for e in q.events()]


def wait_status(q: QmpClient, *final: str) -> dict:
    deadline = time.monotonic() + 30
    while (info := q.execute("query-migrate")).get("status") not in final:
        assert time.monotonic() < deadline, info
        time.sleep(0.01)
    return info


# ---- the socket and the run state -----------------------------------------------------------


def test_the_monitor_listens_on_a_private_socket_and_removes_it(machine, make_monitor):
    mon = make_monitor(machine)
    assert stat.S_ISSOCK(os.stat(mon.path).st_mode) and stat.S_IMODE(os.stat(mon.path).st_mode) == 0o600
    mon.close()
    assert not os.path.exists(mon.path)


def test_stop_and_cont_change_the_run_state_and_say_so(machine, make_monitor):
    mon = make_monitor(machine)
    with client(mon) as q:
        assert q.execute("query-status") == {"status": "running", "running": True}
        q.execute("stop")
        assert q.execute("query-status") == {"status": "paused", "running": False}
        q.execute("stop")                                   # already paused: nothing, no event
        assert machine.calls == ["pause"]
        q.execute("cont")
        assert machine.calls == ["pause", "resume"]
        assert events(q) == [("STOP", None), ("RESUME", None)]
        machine.running = False
        assert q.execute("query-status")["status"] == "shutdown"
        with pytest.raises(QmpCommandError, match="^stop: the guest is not running$"):
            q.execute("stop")


def test_shutdown_follows_the_reply_to_quit(machine, make_monitor):
    """quit: the reply, then SHUTDOWN (the runner's), then the connection closes."""
    mon = make_monitor(machine)
    with client(mon) as q:
        done = threading.Event()

        def runner():                      # what runner.serve does once the machine has quit
            machine.quit_event.wait(10)
            mon.shutdown("host-qmp-quit")
            done.set()
        threading.Thread(target=runner, daemon=True).start()
        assert q.execute("quit") == {}
        assert done.wait(10)
        assert q.wait_event("SHUTDOWN", 5)["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert machine.calls[-1] == ("quit", "quit", 0)


# ---- a migration as a QMP client sees it --------------------------------------------------------


def test_a_live_migration_events_figures_and_postmigrate(machine, make_monitor):
    mon = make_monitor(machine)
    with client(mon) as q:
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        info = wait_status(q, "completed")
        seen = events(q, 0.05)
        assert seen[0] == ("MIGRATION", {"status": "setup"})
        assert seen[1] == ("MIGRATION", {"status": "active"})
        passes = [d["pass"] for name, d in seen if name == "MIGRATION_PASS"]
        assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 2
        tail = [e for e in seen if e[0] != "MIGRATION_PASS"][2:]
        assert tail == [("STOP", None), ("MIGRATION", {"status": "device"}),
                        ("MIGRATION", {"status": "handover"}), ("MIGRATION", {"status": "completed"})]
        ram = info["ram"]
        data_pages = NPAGES // 4
        assert ram["normal"] == data_pages and ram["normal"] + ram["duplicate"] == NPAGES
        assert ram["normal-bytes"] == data_pages * PAGE_SIZE and ram["total"] == NPAGES * PAGE_SIZE
        assert ram["page-size"] == PAGE_SIZE and ram["dirty-sync-count"] == len(passes)
        assert ram["transferred"] > ram["normal-bytes"]
        assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
        # megabits per second, QEMU's unit: bytes * 8 / 10^6 over the whole migration
        expected = ram["transferred"] * 8 / 1e6 / (info["x-total-time-ms"] / 1000)
        assert ram["mbps"] == pytest.approx(expected, rel=0.01)
        assert info["x-live"] is True and info["x-free-page-hint"] is True
        # a pass is a dirty-log sync (QEMU's MIGRATION_PASS); x-rounds are the rounds that sent
        assert len(info["x-rounds"]) <= len(passes) and info["x-rounds"][0]["pages"] == NPAGES
        assert info["downtime"] == round(info["x-downtime-ms"]) and info["x-downtime-parts"]
        # the VM runs elsewhere now: it stays here, paused for good, until quit
        assert q.execute("query-status") == {"status": "postmigrate", "running": False}
        for command in ("cont", "stop"):
            with pytest.raises(QmpCommandError, match="migrated to tcp:127.0.0.1:9 and runs there now"):
                q.execute(command)
        with pytest.raises(QmpCommandError, match="migrated to tcp:127.0.0.1:9"):
            q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        assert q.execute("query-migrate")["status"] == "completed"     # as often as asked
        q.execute("quit")
        assert mon.quit_requested.is_set()


def test_stop_then_migrate_is_one_pass(machine, make_monitor):
    """QEMU's stop-copy: a VM the user stopped goes in one pass, and stays stopped meanwhile."""
    mon = make_monitor(machine)
    with client(mon) as q:
        q.execute("stop")
        q.execute("migrate", {"uri": "file:/dev/null"})
        info = wait_status(q, "completed")
        assert info["x-live"] is False and len(info["x-rounds"]) == 1
        assert info["ram"]["dirty-sync-count"] == 1
        assert events(q, 0.05) == [("STOP", None)]          # the user's; the migration paused nothing
        assert machine.calls.count("pause") == 1 and "resume" not in machine.calls


@pytest.mark.parametrize("answers,error", [(("error",), "destination refused the VM: test"),
                                           (("ready", "aborted"), "gave up before COMMIT arrived")])
def test_a_failed_migration_resumes_the_guest_here_and_says_why(machine, make_monitor, answers, error):
    mon = make_monitor(machine, new_migration=new_migration_for(machine, lambda: StreamSink(answers=answers)))
    with client(mon) as q:
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        info = wait_status(q, "failed")
        assert error in info["error-desc"]
        assert events(q, 0.05) == [("STOP", None), ("RESUME", None)]   # MIGRATION needs the capability
        assert q.execute("query-status")["status"] == "running"
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})                 # and it may try again
        assert wait_status(q, "failed", "completed")["status"] == "failed"


@pytest.mark.parametrize("owner,status,state", [("source", "failed", "running"),
                                                ("destination", "completed", "postmigrate")])
def test_an_unresolved_handover_waits_for_the_operator(machine, make_monitor, owner, status, state):
    """No answer to COMMIT: paused here, cont and cancel refused, until x-migrate-resolve."""
    mon = make_monitor(machine, new_migration=new_migration_for(machine, lambda: StreamSink(answers=("ready",))))
    with client(mon) as q:
        q.execute("migrate-set-parameters", {"x-stall-timeout": 300})
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        info = wait_status(q, "unresolved")
        assert "error-desc" in info
        assert q.execute("query-status") == {"status": "finish-migrate", "running": False}
        with pytest.raises(QmpCommandError, match="a migration is unresolved: the VM is paused"):
            q.execute("cont")
        with pytest.raises(QmpCommandError, match="too late to cancel: the migration is unresolved"):
            q.execute("migrate_cancel")
        with pytest.raises(QmpCommandError, match="There's a migration process in progress"):
            q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        with pytest.raises(QmpCommandError, match="Parameter 'owner' does not accept value 'both'"):
            q.execute("x-migrate-resolve", {"owner": "both"})
        q.execute("x-migrate-resolve", {"owner": owner})
        assert q.execute("query-migrate")["status"] == status
        assert q.execute("query-status")["status"] == state
        assert events(q, 0.05) == [("STOP", None)] + [("RESUME", None)] * (owner == "source")
        with pytest.raises(QmpCommandError, match="nothing to resolve"):
            q.execute("x-migrate-resolve", {"owner": owner})


def test_capabilities_and_parameters_become_the_migrations_params(machine, make_monitor, tmp_path):
    made = []
    factory = new_migration_for(machine)

    def recording(params):
        made.append(params)
        return factory(params)
    mon = make_monitor(machine, new_migration=recording, timeout=12.0)
    key = tmp_path / "key"
    key.write_text("sixteen bytes or more of key\n")
    key.chmod(0o600)
    with client(mon) as q:
        defaults = q.execute("query-migrate-parameters")
        assert defaults == {"downtime-limit": 5, "max-bandwidth": 0, "multifd-channels": 2,
                            "x-max-rounds": 30, "x-stall-timeout": 0, "x-auth-key": "",
                            "x-postcopy-after": 0, "x-postcopy-now": False}
        q.execute("migrate", {"uri": "file:/dev/null"})
        wait_status(q, "completed")
        p = made[-1]
        assert (p.hint, p.auto_converge, p.downtime_ms, p.bandwidth, p.max_rounds, p.timeout) == \
            (True, True, 5.0, 0, 30, 12.0)               # the VMM's own --timeout by default
        assert p.creds.key is None and not p.postcopy
        assert (p.channels, p.local) == (1, False)       # multifd and x-local are off by default

    machine2 = FakeMachine(machine.memory)
    factory = new_migration_for(machine2)
    mon = make_monitor(machine2, new_migration=recording)
    with client(mon) as q:
        q.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-free-page-hint", "state": False},
            {"capability": "auto-converge", "state": False}]})
        q.execute("migrate-set-parameters", {"downtime-limit": 50, "max-bandwidth": 1 << 30,
                                             "x-max-rounds": 7, "x-stall-timeout": 2500,
                                             "x-auth-key": str(key)})
        assert q.execute("query-migrate-parameters")["x-auth-key"] == str(key)
        assert {c["capability"]: c["state"] for c in q.execute("query-migrate-capabilities")} == \
            {"events": False, "auto-converge": False, "multifd": False, "postcopy-ram": False,
             "x-free-page-hint": False, "x-local": False}
        # refused as a whole: nothing changes
        with pytest.raises(QmpCommandError, match="downtime-ms must be a number from 0 to 60000"):
            q.execute("migrate-set-parameters", {"downtime-limit": 100_000, "x-max-rounds": 8})
        with pytest.raises(QmpCommandError, match="--auth-key /nonexistent: No such file"):
            q.execute("migrate-set-parameters", {"x-auth-key": "/nonexistent"})
        assert q.execute("query-migrate-parameters")["x-max-rounds"] == 7
        q.execute("migrate", {"uri": "file:/dev/null"})
        wait_status(q, "completed")
        p = made[-1]
        assert (p.hint, p.auto_converge, p.downtime_ms, p.bandwidth, p.max_rounds, p.timeout) == \
            (False, False, 50.0, 1 << 30, 7, 2.5)
        assert p.creds.key == b"sixteen bytes or more of key"


def test_multifd_and_x_local_become_channels_and_a_local_migration(machine, make_monitor, tmp_path):
    """QEMU's multifd capability with multifd-channels asks for that many connections;
    kvmlite's x-local for the RAM handed over; each refused where its uri cannot have it,
    with the VM left running."""
    made = []
    factory = new_migration_for(machine)

    def recording(params):
        made.append(params)
        return factory(params)
    mon = make_monitor(machine, new_migration=recording)
    with client(mon) as q:
        q.execute("migrate-set-parameters", {"multifd-channels": 3})
        assert len(made) == 0 and q.execute("query-migrate-parameters")["multifd-channels"] == 3
        with pytest.raises(QmpCommandError, match="multifd-channels' expects an integer in the range of 1 to 8"):
            q.execute("migrate-set-parameters", {"multifd-channels": 9})
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
        with pytest.raises(QmpCommandError, match="channels are connections to a tcp: destination"):
            q.execute("migrate", {"uri": "file:/dev/null"})
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        wait_status(q, "completed")
        assert (made[-1].channels, made[-1].local) == (3, False)

    machine2 = FakeMachine(machine.memory)
    factory = new_migration_for(machine2)
    mon = make_monitor(machine2, new_migration=recording)
    with client(mon) as q:
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-local", "state": True}]})
        with pytest.raises(QmpCommandError, match="a local migration goes to unix:PATH"):
            q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        assert q.execute("query-status")["status"] == "running" and len(made) == 1
        q.execute("migrate", {"uri": f"unix:{tmp_path}/dst.sock"})
        wait_status(q, "completed")
        assert (made[-1].channels, made[-1].local, made[-1].uri) == (1, True, f"unix:{tmp_path}/dst.sock")


def test_query_memdev_says_which_backend_the_ram_is_in(make_monitor):
    """QEMU's Memdev: memory-backend-ram for anonymous RAM, memory-backend-memfd (shared,
    with the bytes the memfd holds) for the RAM a local migration hands over."""
    for backend, qom in (("anon", "memory-backend-ram"), ("memfd", "memory-backend-memfd")):
        mem = GuestMemory(NPAGES * PAGE_SIZE, backend=backend)
        try:
            mem.write(0, b"\x01" * (3 * PAGE_SIZE))
            (dev,) = ask(make_monitor(FakeMachine(mem)), "query-memdev")["return"]
            assert dev["size"] == NPAGES * PAGE_SIZE and dev["x-backend"] == qom
            assert dev["share"] is (backend == "memfd") and dev["prealloc"] is False
            if backend == "memfd":
                assert dev["x-allocated"] == 3 * PAGE_SIZE
            else:
                assert "x-allocated" not in dev
        finally:
            mem.close()


def test_settings_are_refused_while_a_migration_runs(machine, make_monitor):
    gate = threading.Event()

    class SlowSink(StreamSink):
        def send(self, bufs):
            gate.wait(10)
            super().send(bufs)
    mon = make_monitor(machine, new_migration=new_migration_for(machine, SlowSink))
    with client(mon) as q:
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        for command, args in (("migrate", {"uri": "tcp:127.0.0.1:9"}),
                              ("migrate-set-capabilities",
                               {"capabilities": [{"capability": "events", "state": True}]})):
            with pytest.raises(QmpCommandError, match="There's a migration process in progress"):
                q.execute(command, args)
        assert q.execute("query-migrate")["status"] in ("setup", "active")
        q.execute("migrate_cancel")
        gate.set()
        assert wait_status(q, "cancelled")["error-desc"] == "cancelled by the user"
        assert q.execute("query-status")["status"] == "running"


@pytest.mark.parametrize("command,arguments,desc", [
    ("migrate", {}, "Parameter 'uri' is missing"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "hint": False}, "Parameter 'hint' is unexpected"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "x-keep-running": "yes"},
     "Invalid parameter type for 'x-keep-running', expected: boolean"),
    ("migrate", {"uri": "ftp://x"}, "migration uri 'ftp://x': expected tcp:HOST:PORT or unix:PATH or file:PATH"),
    ("migrate", {"uri": "tcp:host:²"}, "migration uri 'tcp:host:²'"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "x-keep-running": True}, "keep-running is for snapshots"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "resume": True}, "Cannot resume if there is no paused migration"),
    ("migrate-start-postcopy", {}, "Enable postcopy with migrate_set_capability"),
    ("migrate-recover", {"uri": "tcp:127.0.0.1:1"}, "can only be run when postcopy is paused"),
    ("migrate-set-parameters", {"x-postcopy-after": -1},
     "Parameter 'x-postcopy-after' expects an integer in the range of 0 to 10000"),
    ("migrate-set-parameters", {"x-postcopy-now": 1},
     "Invalid parameter type for 'x-postcopy-now', expected: boolean"),
    ("migrate-set-parameters", {"downtime-limit": "fast"}, "Parameter 'downtime-limit' expects uint64"),
    ("migrate-set-parameters", {"max-bandwidth": "100M"}, "Parameter 'max-bandwidth' expects uint64"),
    ("migrate-set-parameters", {"x-max-rounds": 0},
     "Parameter 'x-max-rounds' expects an integer in the range of 1 to 10000"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "x-free-page-hint", "state": "false"}]},
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ("query-status", {"verbose": True}, "Parameter 'verbose' is unexpected"),
])
def test_bad_arguments_are_refused_before_anything_happens(machine, make_monitor, command, arguments, desc):
    mon = make_monitor(machine)
    reply = ask(mon, command, arguments)
    assert reply["error"]["class"] == "GenericError" and desc in reply["error"]["desc"], reply
    assert mon.migration is None and mon.parameters["x-max-rounds"] == 30
    assert machine.calls == []


def test_the_other_commands(machine, make_monitor):
    mon = make_monitor(machine)
    names = {c["name"] for c in ask(mon, "query-commands")["return"]}
    assert {"query-status", "stop", "cont", "migrate", "migrate_cancel", "quit", "query-migrate",
            "migrate-set-parameters", "x-migrate-resolve", "x-query-vcpus", "migrate-incoming"} <= names
    assert {"migrate-start-postcopy", "migrate-recover"} <= names
    assert ask(mon, "query-migrate") == {"return": {}}           # QEMU's answer before any migration
    assert ask(mon, "query-kvm") == {"return": {"enabled": True, "present": True}}
    assert ask(mon, "x-query-free-pages") == {"return": {"pages-total": NPAGES, "registered": False}}
    assert ask(mon, "x-query-image") == {"return": {"loaded": False}}
    assert ask(mon, "migrate-incoming", {"uri": "tcp:127.0.0.1:1"})["error"]["desc"] == \
        "'-incoming' was not specified on the command line"
    assert ask(mon, "x-guest-finish") == {"return": {}}
    assert machine.fph.host_events & abi.HOST_EVENT_STOP
    assert ask(mon, "migrate_cancel") == {"return": {}}          # nothing to cancel: fine, as QEMU
    assert ask(mon, "quit") == {"return": {}}
    assert machine.calls[-1] == ("quit", "quit", 0)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                               max_size=3),
                    max_leaves=8)
SAFE_COMMANDS = st.sampled_from(["query-status", "query-migrate", "x-query-free-pages", "query-commands",
                                 "cont", "stop", "x-guest-finish", "migrate_cancel", "x-query-vcpus",
                                 "query-migrate-parameters", "migrate-set-parameters",
                                 "x-migrate-resolve", "bogus", ""])


@given(req=st.one_of(JSON, st.fixed_dictionaries({"execute": SAFE_COMMANDS},
                                                 optional={"arguments": JSON, "id": JSON})))
@settings(max_examples=300, deadline=None)
def test_any_request_gets_exactly_one_return_or_error(req):
    """Whatever arrives: {"return": ...} or {"error": {"class", "desc"}}, never an exception."""
    mon = Monitor(FakeMachine(GuestMemory(1 << 20)), check_returns=True)
    try:
        reply = mon.server.handle(None, req)
    finally:
        mon.machine.memory.close()
    assert ("return" in reply) != ("error" in reply)
    if "error" in reply:
        assert set(reply["error"]) == {"class", "desc"} and "Traceback" not in reply["error"]["desc"]
    json.dumps(reply)


# ---- a destination's monitor ----------------------------------------------------------------


class FakeIncoming:
    def __init__(self):
        self.state = StateMachine(R.WAITING, RECEIVE_TRANSITIONS)
        self.stats = None
        self.machine = None
        self.aborted = False
        self.pc_stats = None           # post-copy's figures, once switched
        self.states = None             # post-copy's page states
        self.recover_uri = None

    @property
    def status(self):
        return self.state.state

    def abort(self):
        self.aborted = True

    def postcopy_stats(self):
        return self.pc_stats

    def page_states(self):
        return self.states

    def recover(self, uri):
        self.recover_uri = uri


def test_a_destination_answers_before_its_vm_arrives(make_monitor):
    opened = []

    def factory(uri):
        opened.append(uri)
        return FakeIncoming()
    mon = make_monitor(None, incoming_factory=factory)
    with client(mon) as q:
        assert q.execute("query-status") == {"status": "inmigrate", "running": False}
        assert q.execute("query-migrate") == {}
        with pytest.raises(QmpCommandError, match="no VM here yet"):
            q.execute("x-query-free-pages")
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        got = []
        waiter = threading.Thread(target=lambda: got.append(mon.wait_incoming()))
        waiter.start()
        q.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:4444"})
        waiter.join(5)
        assert opened == ["tcp:127.0.0.1:4444"] and got == [mon.incoming]
        with pytest.raises(QmpCommandError, match="already been started"):
            q.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:4445"})
        inc = mon.incoming
        inc.state.advance(R.RECEIVING)
        assert q.execute("query-migrate") == {"status": "active"}
        inc.state.advance(R.READY)
        assert q.execute("query-migrate") == {"status": "handover"}
        inc.stats = SimpleNamespace(pages=10, zero_pages=5, bytes=50_000, rounds=2, ms=4.0)
        inc.state.advance(R.RUNNING)
        m = FakeMachine(GuestMemory(1 << 20))
        try:
            inc.machine = m
            mon.attach(m)
            info = q.execute("query-migrate")
            assert info["status"] == "completed" and info["ram"]["normal"] == 10
            assert info["ram"]["duplicate"] == 5 and info["ram"]["transferred"] == 50_000
            assert q.execute("query-status")["status"] == "running"
            assert events(q, 0.05) == [("MIGRATION", {"status": "active"}),
                                       ("MIGRATION", {"status": "handover"}),
                                       ("MIGRATION", {"status": "completed"}), ("RESUME", None)]
        finally:
            m.memory.close()


def test_quit_on_a_waiting_destination_abandons_the_incoming_migration(make_monitor):
    mon = make_monitor(None)
    inc = FakeIncoming()
    mon.attach_incoming(inc)
    assert ask(mon, "quit") == {"return": {}}
    assert inc.aborted and mon.quit_requested.is_set()
    assert mon.wait_incoming() is None          # the runner's wait for migrate-incoming ends


# ---- inspection: x-query-vcpus' pause policy, x-query-pagemap's arrays ------------------------------


def test_query_vcpus_pauses_a_running_vm_and_resumes_it(make_monitor):
    m = FakeMachine()
    r = ask(make_monitor(m), "x-query-vcpus")["return"]
    assert m.calls == ["pause", "resume"] and not m.paused
    assert r[0]["cpu-index"] == 0 and r[0]["registers"]["rip"] == 0x101000
    assert r[0]["registers"]["cs"]["dpl"] == 3
    assert r[0]["exits"] == {"IoOut": 4, "IoIn": 1} and r[0]["exits-total"] == 5


def test_query_vcpus_leaves_a_stopped_vm_stopped(make_monitor):
    m = FakeMachine(paused=True)
    r = ask(make_monitor(m), "x-query-vcpus", {"cpu-index": 0})["return"]
    assert m.calls == [] and m.paused and r[0]["registers"]["rip"] == 0x101000
    assert ask(make_monitor(m), "x-query-vcpus", {"cpu-index": 3})["error"]["desc"] == \
        "Invalid CPU index 3: the VM has 1 vCPU(s)"


def test_query_vcpus_does_not_touch_a_migrating_vm(make_monitor):
    m = FakeMachine()
    mon = make_monitor(m)
    mon.migration = SimpleNamespace(done=threading.Event())
    r = ask(mon, "x-query-vcpus")["return"]
    assert m.calls == [] and r[0]["registers"] is None and "migration" in r[0]["registers-unread"]


def test_query_pagemap_arrays_decode_to_the_machine_bitmaps(make_monitor):
    n = 100
    free = np.zeros(n, dtype=bool)
    free[10:60] = True
    backed = np.ones(n, dtype=bool)
    backed[40:] = False
    m = FakeMachine()
    m.fph = SimpleNamespace(free_mask=lambda: free)
    m.memory = SimpleNamespace(npages=n, backed_pages=lambda first, count: backed[first:first + count])
    mon = make_monitor(m)
    sent = np.zeros(n, dtype=np.uint8)
    sent[:5] = 1
    dirty = mask_to_words(np.arange(n) == 70)
    mon.migration = SimpleNamespace(done=threading.Event(), dirty_words=dirty, sent_round=sent,
                                    status=SimpleNamespace(value="active"),
                                    params=SimpleNamespace(hint=True), stats=SimpleNamespace(rounds=1))
    r = ask(mon, "x-query-pagemap")["return"]
    assert np.array_equal(words_to_mask(decode_array(r["free"]), n), free)
    assert np.array_equal(words_to_mask(decode_array(r["backed"]), n), backed)
    assert np.flatnonzero(words_to_mask(decode_array(r["dirty"]), n)).tolist() == [70]
    got = from_monitor(r)
    assert got.rounds[:6].tolist() == [1] * 5 + [0]
    assert got.states[70] == DIRTY and got.states[50] == UNTOUCHED and got.states[20] == FREE
    mon.migration.done.set()
    assert ask(mon, "x-query-pagemap")["return"]["dirty"] is None


def test_the_tools_take_keyword_arguments_not_a_command_line(make_monitor, capsys):
    """inspect_command and pagemap_command called from Python against a live monitor: no argparse."""
    from kvmlite.tools.inspect import inspect_command
    from kvmlite.tools.pagemap import pagemap_command
    n = 100
    free = np.zeros(n, dtype=bool)
    free[10:60] = True
    backed = np.arange(n) < 40
    m = FakeMachine()
    m.fph = SimpleNamespace(registration=object(), count_free=lambda: int(free.sum()),
                            free_mask=lambda: free)
    m.memory = SimpleNamespace(npages=n, backed_pages=lambda first, count: backed[first:first + count])
    mon = make_monitor(m)
    assert inspect_command(monitor=mon.path, as_json=True) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vcpus"][0]["registers"]["rip"] == 0x101000 and info["pages"]["free"] == 50
    assert info["exits"] == {"IoOut": 4, "IoIn": 1} and info["status"] == "running"
    assert m.calls == ["pause", "resume"]
    assert pagemap_command(monitor=mon.path, width=10) == 0
    out = capsys.readouterr().out        # no colour on a captured stdout: a letter a page
    rows = [line for line in out.splitlines() if line and set(line) <= set("#-.D")]
    assert rows == ["#" * 10] + ["-" * 10] * 3 + ["." * 10] * 2 + ["#" * 10] * 4


# ---- post-copy: QEMU's names, kvmlite's figures --------------------------------------------------


def postcopy_sink(gate: threading.Event | None = None):
    """A destination that offers post-copy, takes the header, says READY and
    never answers COMMIT (so the switch ends unresolved); `gate` holds the
    first send (the header) until it is set."""
    class Sink(StreamSink):
        offers = {"postcopy": 1}

        def send(self, bufs):
            if gate is not None:
                gate.wait(10)
            super().send(bufs)
    return lambda: Sink(answers=("prepared", "ready"))


def test_postcopy_ram_and_the_x_postcopy_parameters_become_the_migrations_params(machine, make_monitor):
    made = []
    factory = new_migration_for(machine)

    def recording(params):
        made.append(params)
        return factory(params)
    mon = make_monitor(machine, new_migration=recording)
    with client(mon) as q:
        # without postcopy-ram the post-copy parameters mean nothing (as QEMU's)
        q.execute("migrate-set-parameters", {"x-postcopy-after": 3, "x-postcopy-now": True})
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        wait_status(q, "completed")
        assert (made[-1].postcopy, made[-1].postcopy_after, made[-1].postcopy_now) == (False, 0, False)

    machine2 = FakeMachine(machine.memory)
    factory = new_migration_for(machine2)
    mon = make_monitor(machine2, new_migration=recording)
    with client(mon) as q:
        q.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "postcopy-ram", "state": True}]})
        q.execute("migrate-set-parameters", {"x-postcopy-after": 3})
        assert {c["capability"]: c["state"] for c in q.execute("query-migrate-capabilities")}[
            "postcopy-ram"] is True
        with pytest.raises(QmpCommandError, match="post-copy moves a running VM to a destination VMM"):
            q.execute("migrate", {"uri": "file:/dev/null"})
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        info = wait_status(q, "failed")      # this fake destination does not offer post-copy
        assert "cannot take a post-copy migration" in info["error-desc"]
        assert (made[-1].postcopy, made[-1].postcopy_after, made[-1].postcopy_now) == (True, 3, False)
        assert q.execute("query-status")["status"] == "running"


def test_migrate_start_postcopy_switches_and_resume_reconnects(machine, make_monitor):
    """postcopy-ram, migrate, migrate-start-postcopy: the switch (no page before it);
    COMMIT unanswered leaves it unresolved; migrate with resume: true tries to
    reconnect, and falls back to unresolved when nothing listens."""
    from kvmlite.procs import free_port
    gate = threading.Event()
    mon = make_monitor(machine, new_migration=new_migration_for(machine, postcopy_sink(gate)))
    with client(mon) as q:
        q.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "postcopy-ram", "state": True}, {"capability": "events", "state": True}]})
        q.execute("migrate-set-parameters", {"x-stall-timeout": 300})
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        q.execute("migrate-start-postcopy")         # while the header waits: before any round
        gate.set()
        info = wait_status(q, "unresolved")
        pc = info["x-postcopy"]
        assert pc["switch"] == "asked (migrate-start-postcopy)" and info["x-rounds"] == []
        assert pc["pages-pending"] == NPAGES and pc["pages-free"] == 0 and info["ram"]["normal"] == 0
        q.execute("migrate-start-postcopy")         # switched already: no error, as QEMU
        with pytest.raises(QmpCommandError, match="a migration is unresolved: the VM is paused"):
            q.execute("cont")
        gone = f"tcp:127.0.0.1:{free_port()}"
        q.execute("migrate", {"uri": gone, "resume": True})
        info = wait_status(q, "unresolved")
        assert f"recovery failed: nothing listens on {gone}" in info["error-desc"]
        assert info["x-postcopy"]["recoveries"] == 1
        statuses = [d["status"] for name, d in events(q, 0.05) if name == "MIGRATION"]
        assert statuses == ["setup", "active", "device", "handover", "unresolved",
                            "postcopy-recover", "unresolved"]
        q.execute("x-migrate-resolve", {"owner": "source"})
        assert wait_status(q, "failed") and q.execute("query-status")["status"] == "running"


class PostcopyMigration:
    """What the monitor sees of a Migration that has switched to post-copy: the
    source's own state machine and stats, moved by the test; the stats filled
    by the source's own code from a page server's counters."""

    def __init__(self, machine, params):
        from kvmlite.migration.postcopy import SenderStats
        from kvmlite.migration.stats import MigrationStats
        from kvmlite.migration.status import SOURCE_TRANSITIONS, MigrationStatus as S
        self.machine, self.params, self.target = machine, params, params.target
        self.state = StateMachine(S.NONE, SOURCE_TRANSITIONS)
        self.stats = MigrationStats(pages_total=NPAGES)
        self.state.listeners.append(lambda old, new: setattr(self.stats, "status", new.value))
        self.sync_listeners = []
        self.done = threading.Event()
        self.dirty_words = None
        self.sent_round = np.zeros(NPAGES, dtype=np.uint8)
        self.sender = SimpleNamespace(stats=lambda: SenderStats(
            pages_pending=600, pages_pushed=400, pages_on_request=50, zero_pages=10, requests=55,
            requests_already_sent=5, bytes_sent=1_900_000, bytes_received=900, connections=1,
            to_send_left=150))
        self._precopy_bytes = 0
        self.resumed_to = None

    @property
    def status(self):
        return self.state.state

    def start(self):
        from kvmlite.migration.source import Migration
        from kvmlite.migration.status import MigrationStatus as S
        for status in (S.SETUP, S.ACTIVE, S.DEVICE):
            self.state.advance(status)
        self.machine.pause_all()
        self.stats.bytes_wire = self.stats.precopy_bytes = 1_000_000
        self.stats.bytes_wire += 20_000
        self._precopy_bytes = self.stats.bytes_wire
        self.stats.downtime_ms, self.stats.downtime_parts_ms = 2.5, {"pause": 0.5, "sets": 2.0}
        self.state.advance(S.HANDOVER)
        self.stats.postcopy = {"switch": "asked (migrate-start-postcopy)", "pages_pending": 600,
                               "pages_free": 300}
        self.stats.refresh = lambda stats: Migration._refresh_stats(self, stats)
        self.state.advance(S.POSTCOPY_ACTIVE)

    def cancel(self):
        return False

    def resume(self, uri):
        from kvmlite.migration.status import MigrationStatus as S
        self.resumed_to = uri
        self.state.advance(S.POSTCOPY_RECOVER)


def test_a_postcopy_migration_in_query_migrate_events_and_run_state(machine, make_monitor):
    """QEMU's MigrationInfo members for post-copy (postcopy-bytes, postcopy-requests,
    postcopy-blocktime), kvmlite's figures under x-postcopy, the postcopy-* states
    as MIGRATION events, and `cont` refused while the VM is split."""
    from dataclasses import asdict

    from kvmlite.migration.postcopy import IncomingStats
    from kvmlite.migration.status import MigrationStatus as S
    made = []

    def factory(params):
        made.append(PostcopyMigration(machine, params))
        return made[-1]
    mon = make_monitor(machine, new_migration=factory)
    with client(mon) as q:
        q.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "postcopy-ram", "state": True}, {"capability": "events", "state": True}]})
        q.execute("migrate", {"uri": "tcp:127.0.0.1:9"})
        mig = made[-1]
        info = q.execute("query-migrate")
        assert info["status"] == "postcopy-active" and info["downtime"] == 2
        ram = info["ram"]
        assert (ram["postcopy-bytes"], ram["postcopy-requests"]) == (1_900_000, 55)
        assert ram["transferred"] == 1_020_000 + 1_900_000
        assert (ram["precopy-bytes"], ram["downtime-bytes"]) == (1_000_000, 20_000)
        assert ram["normal"] == 440 and ram["duplicate"] == 10 and ram["remaining"] == 150 * PAGE_SIZE
        pc = info["x-postcopy"]
        assert pc["switch"] == "asked (migrate-start-postcopy)" and pc["pages-free"] == 300
        assert (pc["pages-pushed"], pc["pages-on-request"], pc["requests-for-free"]) == (400, 50, 0)
        assert "destination" not in pc and "postcopy-blocktime" not in info
        assert q.execute("query-status") == {"status": "finish-migrate", "running": False}
        for command, why in (("cont", "since the switch to post-copy"),
                             ("migrate_cancel", "too late to cancel: the migration is postcopy-active")):
            with pytest.raises(QmpCommandError, match=why):
                q.execute(command)
        mig.state.advance(S.POSTCOPY_PAUSED)
        mig.stats.error = "post-copy link broken: test"
        assert q.execute("query-migrate")["error-desc"] == "post-copy link broken: test"
        q.execute("migrate", {"uri": "tcp:127.0.0.1:4445", "resume": True})
        assert mig.resumed_to == "tcp:127.0.0.1:4445"
        mig.state.advance(S.POSTCOPY_ACTIVE)
        # DONE: the destination's own figures follow, and the migration completes
        dest = asdict(IncomingStats(pages_pending=600, faults=60, faults_remote=50,
                                    faults_zero_free=7, remote_latency_us={"p50": 90.5, "p99": 400.0,
                                                                           "max": 900.0, "n": 50},
                                    remote_wait_ms=12.6, switch_to_last_page_ms=80.0, link="done"))
        mig.stats.postcopy = dict(mig.stats.postcopy, destination=dict(dest, recoveries_ms=[35.0]))
        mig.state.advance(S.COMPLETED)
        machine.quit(SimpleNamespace(reason="migrated", status=0))
        info = q.execute("query-migrate")
        d = info["x-postcopy"]["destination"]
        assert (d["faults-remote"], d["faults-zero-free"], d["recoveries-ms"]) == (50, 7, [35.0])
        assert d["remote-latency-us"] == {"p50": 90.5, "p99": 400.0, "max": 900.0, "n": 50}
        assert info["postcopy-blocktime"] == 13              # one vCPU: its remote waits, in ms
        assert q.execute("query-status")["status"] == "postmigrate"
        statuses = [d["status"] for name, d in events(q, 0.05) if name == "MIGRATION"]
        assert statuses == ["setup", "active", "device", "handover", "postcopy-active",
                            "postcopy-paused", "postcopy-recover", "postcopy-active", "completed"]


def test_a_postcopy_migrations_figures_are_all_declared():
    """Every figure the source's page server and the destination report has its
    member in the schema (the monitor leaves out what is not declared)."""
    from dataclasses import fields

    from kvmlite.control import schema
    from kvmlite.migration.postcopy import IncomingStats, SenderStats
    from kvmlite.migration.source import Migration
    from kvmlite.migration.stats import MigrationStats
    from kvmlite.migration.status import MigrationStatus as S
    fake = SimpleNamespace(sender=SimpleNamespace(stats=SenderStats), status=S.POSTCOPY_ACTIVE,
                           _precopy_bytes=0)
    stats = MigrationStats()
    Migration._refresh_stats(fake, stats)
    declared = {m.name.replace("-", "_") for m in schema.X_POSTCOPY.fields}
    # bytes and requests are QEMU's ram.postcopy-bytes and ram.postcopy-requests
    assert set(stats.postcopy) - {"bytes", "requests"} <= declared
    incoming = {m.name.replace("-", "_") for m in schema.X_POSTCOPY_INCOMING.fields}
    assert {f.name for f in fields(IncomingStats)} | {"recoveries_ms"} == incoming


def test_a_postcopy_destination_runs_the_guest_and_recovers_where_told(make_monitor):
    """A destination after the switch: the guest runs here (RESUME, running), its
    figures in query-migrate, its page states in x-query-pagemap; migrate-recover
    only once the link broke; quit no longer abandons a migration."""
    from dataclasses import asdict

    from kvmlite.migration.postcopy import IncomingStats
    mon = make_monitor(None)
    ask(mon, "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    inc = FakeIncoming()
    mon.attach_incoming(inc)
    m = FakeMachine(GuestMemory(NPAGES * PAGE_SIZE))
    try:
        with client(mon) as q:
            inc.state.advance(R.RECEIVING)
            inc.state.advance(R.READY)
            inc.stats = SimpleNamespace(pages=10, zero_pages=5, bytes=50_000, rounds=0, ms=4.0)
            inc.machine = m
            inc.pc_stats = asdict(IncomingStats(pages_pending=600, pages_left=500, faults_remote=3,
                                                faults_zero_free=4, bytes_received=8_000,
                                                remote_latency_us={"p50": 80.0, "p99": 80.0,
                                                                   "max": 80.0, "n": 3},
                                                remote_wait_ms=0.24, link="up"))
            inc.pc_stats["recoveries_ms"] = []
            inc.states = np.zeros(NPAGES, dtype=np.uint8)
            inc.states[:600] = 1                               # still to come
            inc.state.advance(R.POSTCOPY_ACTIVE)
            assert q.execute("query-status") == {"status": "running", "running": True}
            info = q.execute("query-migrate")
            assert info["status"] == "postcopy-active" and info["postcopy-blocktime"] == 0
            assert info["x-postcopy-incoming"]["faults-zero-free"] == 4
            assert info["ram"]["postcopy-bytes"] == 8_000 and info["ram"]["transferred"] == 58_000
            got = q.execute("x-query-pagemap")
            assert np.array_equal(decode_array(got["postcopy-state"]), inc.states)
            with pytest.raises(QmpCommandError, match="can only be run when postcopy is paused"):
                q.execute("migrate-recover", {"uri": "tcp:127.0.0.1:4446"})
            inc.state.advance(R.POSTCOPY_PAUSED)
            q.execute("migrate-recover", {"uri": "tcp:127.0.0.1:4446"})
            assert inc.recover_uri == "tcp:127.0.0.1:4446"
            inc.state.advance(R.POSTCOPY_RECOVER)
            inc.state.advance(R.POSTCOPY_ACTIVE)
            inc.state.advance(R.RUNNING)
            assert events(q, 0.05) == [("MIGRATION", {"status": "active"}),
                                       ("MIGRATION", {"status": "handover"}),
                                       ("MIGRATION", {"status": "postcopy-active"}), ("RESUME", None),
                                       ("MIGRATION", {"status": "postcopy-paused"}),
                                       ("MIGRATION", {"status": "postcopy-recover"}),
                                       ("MIGRATION", {"status": "postcopy-active"}),
                                       ("MIGRATION", {"status": "completed"})]
            q.execute("quit")
            assert not inc.aborted
    finally:
        m.memory.close()


def test_kvmlite_migrate_postcopy_options_become_qmp_settings(machine, make_monitor, capsys):
    """--postcopy-after N: the postcopy-ram capability and x-postcopy-after; a
    destination that cannot take post-copy fails the migration (exit 75)."""
    from kvmlite import exitcodes
    from kvmlite.cli import main
    made = []
    factory = new_migration_for(machine)

    def recording(params):
        made.append(params)
        return factory(params)
    mon = make_monitor(machine, new_migration=recording)
    rc = main(["migrate", "--monitor", mon.path, "tcp:127.0.0.1:9", "--postcopy-after", "3", "--json"])
    assert rc == exitcodes.TEMPFAIL
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "failed" and "cannot take a post-copy migration" in info["error-desc"]
    assert (made[-1].postcopy, made[-1].postcopy_after, made[-1].postcopy_now) == (True, 3, False)
    assert mon.capabilities["postcopy-ram"] and mon.parameters["x-postcopy-after"] == 3


def test_kvmlite_migrate_resume_reconnects_a_paused_postcopy_migration(machine, make_monitor, capsys):
    """--resume: migrate with resume: true to the URI, nothing reconfigured; followed
    to its end, the source quit in postmigrate."""
    from kvmlite.cli import main
    from kvmlite.migration.status import MigrationStatus as S
    made = []

    class Resumable(PostcopyMigration):
        def resume(self, uri):
            super().resume(uri)

            def finish():
                time.sleep(0.1)
                self.state.advance(S.POSTCOPY_ACTIVE)
                self.state.advance(S.COMPLETED)
                self.machine.quit(SimpleNamespace(reason="migrated", status=0))
            threading.Thread(target=finish, daemon=True).start()

    def factory(params):
        made.append(Resumable(machine, params))
        return made[-1]
    mon = make_monitor(machine, new_migration=factory)
    ask(mon, "migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
    ask(mon, "migrate", {"uri": "tcp:127.0.0.1:9"})
    made[-1].state.advance(S.POSTCOPY_PAUSED)
    before = dict(mon.parameters)
    assert main(["migrate", "--monitor", mon.path, "tcp:127.0.0.1:4447", "--resume", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "completed" and info["x-postcopy"]["pages-pending"] == 600
    assert made[-1].resumed_to == "tcp:127.0.0.1:4447" and len(made) == 1
    assert mon.parameters == before and mon.quit_requested.is_set()
