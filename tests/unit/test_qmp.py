"""The QMP monitor protocol, driven by QEMU's own client library (qemu.qmp),
by qmp-shell, by kvmlite's client and by raw sockets, against a prototype
command table: a fake VM whose fake migration emits MIGRATION and
MIGRATION_PASS events.  No /dev/kvm: the protocol is the thing under test."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from kvmlite.control import qmp, schema
from kvmlite.control.client import (QmpClient, QmpClientError, QmpCommandError,
                                    QmpDisconnected, QmpTimeout)
from kvmlite.control.qapi import ErrorClass, QmpError
from kvmlite.control.qmp import CommandTable, MonitorError, QmpServer, handles

# ---- the prototype: a fake VM bound to the real schema ----------------------------------------

import kvmlite

VERSION_TRIPLE = dict(zip(("major", "minor", "micro"), map(int, kvmlite.__version__.split("."))))


class FakeVM:
    """What a monitor binds: state, handlers marked with @handles, events."""

    def __init__(self):
        self.emit = None                    # the server's, once it exists
        self.status = "running"
        self.caps = {"events": False, "auto-converge": True, "x-free-page-hint": True}
        self.params = {"downtime-limit": 300, "max-bandwidth": 0, "x-max-rounds": 30,
                       "x-stall-timeout": 0, "x-auth-key": ""}
        self.mig = {"status": "none"}
        self.migrations_started = 0
        self.passes = 3
        self.step = threading.Event()       # a test may hold the migration between rounds
        self.step.set()
        self.stuck = 0.0                    # seconds query-status takes (to provoke timeouts)
        self.quit_called = threading.Event()

    @handles("query-status")
    def query_status(self):
        time.sleep(self.stuck)
        return {"status": self.status, "running": self.status == "running"}

    @handles("stop")
    def stop(self):
        if self.status == "running":
            self.status = "paused"
            self.emit("STOP")

    @handles("cont")
    def cont(self):
        if self.mig["status"] in ("setup", "active", "device"):
            raise QmpError(ErrorClass.GENERIC, "a migration holds the VM paused")
        if self.status != "running":
            self.status = "running"
            self.emit("RESUME")

    @handles("quit")
    def quit(self):
        self.quit_called.set()

    @handles("query-kvm")
    def query_kvm(self):
        return {"enabled": True, "present": True}

    @handles("migrate-set-capabilities")
    def set_caps(self, capabilities):
        for c in capabilities:
            self.caps[c["capability"]] = c["state"]

    @handles("query-migrate-capabilities")
    def query_caps(self):
        return [{"capability": k, "state": v} for k, v in self.caps.items()]

    @handles("migrate-set-parameters")
    def set_params(self, **params):
        for k, v in params.items():
            self.params[k.replace("_", "-")] = v

    @handles("query-migrate-parameters")
    def query_params(self):
        return dict(self.params)

    @handles("migrate")
    def migrate(self, uri, detach=False, resume=False, x_keep_running=False):
        # Handlers run one at a time, so this check-then-start cannot race
        # a second client's migrate.
        if self.mig["status"] in ("setup", "active", "device"):
            raise QmpError(ErrorClass.GENERIC, "There's a migration process in progress")
        if resume:
            raise QmpError(ErrorClass.GENERIC, "kvmlite cannot resume a paused migration")
        self.migrations_started += 1
        self._set_mig("setup")
        threading.Thread(target=self._run_migration, daemon=True).start()

    @handles("migrate_cancel")
    def migrate_cancel(self):
        if self.mig["status"] in ("setup", "active"):
            self._set_mig("cancelled")

    @handles("query-migrate")
    def query_migrate(self):
        m = self.mig
        if m["status"] == "none":
            return {}
        info = {"status": m["status"], "total-time": 12, "setup-time": 1,
                "x-free-page-hint": self.caps["x-free-page-hint"], "x-live": True,
                "x-rounds": [{"pages": 100, "ms": 1.5}] * m.get("passes", 0)}
        if m["status"] != "setup":
            info["ram"] = {
                "transferred": 409600, "remaining": 0, "total": 1 << 26, "duplicate": 10,
                "normal": 90, "normal-bytes": 90 * 4096, "dirty-pages-rate": 0, "mbps": 262.144,
                "dirty-sync-count": m.get("passes", 0), "postcopy-requests": 0, "page-size": 4096,
                "multifd-bytes": 0, "pages-per-second": 8000, "precopy-bytes": 400000,
                "downtime-bytes": 9600, "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 0,
                "x-skipped-free": 16000, "x-resent": 5}
        if m["status"] == "completed":
            info["downtime"] = 3
            info["x-downtime-parts"] = {"pause": 0.1, "final-pass": 2.0, "state": 0.9}
        return info

    def _set_mig(self, status):
        self.mig["status"] = status
        if self.caps["events"]:
            self.emit("MIGRATION", {"status": status})

    def _run_migration(self):
        self._set_mig("active")
        for n in range(1, self.passes + 1):
            self.step.wait()
            if self.mig["status"] == "cancelled":
                return
            self.mig["passes"] = n
            if self.caps["events"]:
                self.emit("MIGRATION_PASS", {"pass": n})
        self.status = "finish-migrate"
        self.emit("STOP")
        self._set_mig("device")
        self._set_mig("completed")
        self.status = "postmigrate"


@pytest.fixture
def vm_server(tmp_path):
    vm = FakeVM()
    table = CommandTable(schema.COMMANDS, schema.EVENTS, check_returns=True)
    table.bind_all(vm)
    server = QmpServer(table)
    vm.emit = server.emit
    path = str(tmp_path / "vm.sock")
    server.listen(f"unix:{path}")
    yield vm, server, path
    server.close()


# ---- a raw client, to see exactly what goes over the wire -------------------------------------


class Raw:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(10)
        self.buf = b""

    def send(self, data: bytes | dict):
        if isinstance(data, dict):
            data = json.dumps(data).encode()        # no newline: QMP needs none
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def msg(self) -> dict:
        return json.loads(self.line())

    def reply(self) -> dict:
        """The next message that is not an event."""
        while True:
            m = self.msg()
            if "event" not in m:
                return m

    def negotiate(self):
        self.msg()
        self.send({"execute": "qmp_capabilities"})
        assert self.msg() == {"return": {}}

    def close(self):
        self.sock.close()


def error(desc: str, cls: str = "GenericError") -> dict:
    return {"error": {"class": cls, "desc": desc}}


# ---- the protocol ------------------------------------------------------------------------------


def test_greeting_negotiation_crlf_and_id(vm_server):
    vm, server, path = vm_server
    c = Raw(path)
    greeting = c.line()
    assert json.loads(greeting) == {"QMP": {"version": {"qemu": VERSION_TRIPLE,
                                                        "package": f"kvmlite {kvmlite.__version__}"},
                                            "capabilities": []}}
    # before negotiation: CommandNotFound, with QEMU's words
    c.send({"execute": "query-status", "id": 1})
    assert c.msg() == {**error("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound"), "id": 1}
    c.send({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 2})
    assert c.msg() == {**error("Capability 'oob' not available"), "id": 2}
    c.send({"execute": "qmp_capabilities", "id": 3})
    assert c.msg() == {"return": {}, "id": 3}
    c.send({"execute": "qmp_capabilities"})
    assert c.msg() == error("Capabilities negotiation is already complete, command ignored",
                            "CommandNotFound")
    # id is echoed whatever JSON value it is
    for req_id in ["a", 7, 1.5, None, [1, {"x": []}], {"k": "v"}, True]:
        c.send({"execute": "query-status", "id": req_id})
        assert c.msg() == {"return": {"status": "running", "running": True}, "id": req_id}
    # every message ends with CRLF, and the stream has nothing else in it
    c.send(b'{"execute": "query-kvm"}')
    raw = c.sock.recv(4096)
    assert raw == b'{"return": {"enabled": true, "present": true}}\r\n'


def test_requests_without_newlines_split_anywhere(vm_server):
    vm, server, path = vm_server
    c = Raw(path)
    c.negotiate()
    reqs = b"".join(json.dumps({"execute": "query-status", "id": i}).encode() for i in range(3))
    for i in range(len(reqs)):                  # one byte at a time
        c.send(reqs[i:i + 1])
    assert [c.msg()["id"] for _ in range(3)] == [0, 1, 2]
    # several in one write, and one cut in the middle of a string escape
    c.send(b'{"execute": "query-kvm", "id": "a\\')
    time.sleep(0.05)
    c.send(b'"b"}{"execute": "query-kvm", "id": 2}')
    assert c.msg()["id"] == 'a"b'
    assert c.msg()["id"] == 2


def test_request_shape_errors(vm_server):
    vm, server, path = vm_server
    c = Raw(path)
    c.negotiate()
    cases = [
        (b'[1, 2]', error("QMP input must be a JSON object")),
        (b'{"arguments": {}}', error("QMP input lacks member 'execute'")),
        (b'{"execute": 5, "id": 1}', {**error("QMP input member 'execute' must be a string"), "id": 1}),
        (b'{"execute": "stop", "arguments": [], "id": 2}',
         {**error("QMP input member 'arguments' must be an object"), "id": 2}),
        (b'{"execute": "stop", "extra": 1}', error("QMP input member 'extra' is unexpected")),
        (b'{"execute": "system_reset", "id": 3}',
         {**error("The command system_reset has not been found", "CommandNotFound"), "id": 3}),
        # declared in the schema but not bound by this monitor: not found either
        (b'{"execute": "migrate-start-postcopy"}',
         error("The command migrate-start-postcopy has not been found", "CommandNotFound")),
        (b'{"execute": }', error("JSON parse error, expecting value")),
    ]
    for req, want in cases:
        c.send(req)
        assert c.msg() == want, req
    assert vm.status == "running"


@pytest.mark.parametrize("args, desc", [
    # string booleans are not booleans (issue 11: "hint": "no" ran as true)
    ({"capabilities": [{"capability": "events", "state": "false"}]},
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ({"capabilities": [{"capability": "events", "state": 0}]},
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ({"capabilities": [{"capability": "xbzrle", "state": True}]},
     "Parameter 'capability' does not accept value 'xbzrle'"),
    ({"capabilities": [{"capability": "events"}]}, "Parameter 'capabilities[0].state' is missing"),
    ({"capabilities": {"capability": "events", "state": True}},
     "Invalid parameter type for 'capabilities', expected: array"),
    ({}, "Parameter 'capabilities' is missing"),
    ({"capabilities": [], "hint": True}, "Parameter 'hint' is unexpected"),
])
def test_capability_arguments_are_strict(vm_server, args, desc):
    vm, server, path = vm_server
    before = dict(vm.caps)
    with QmpClient(f"unix:{path}") as q:
        with pytest.raises(QmpCommandError) as e:
            q.execute("migrate-set-capabilities", args)
    assert (e.value.cls, e.value.desc) == ("GenericError", desc)
    assert vm.caps == before                   # refused before any side effect


@pytest.mark.parametrize("raw, desc", [
    (b'{"downtime-limit": -1}', "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 ms"),
    (b'{"downtime-limit": 2000001}', "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 ms"),
    (b'{"downtime-limit": 1.5}', "Parameter 'downtime-limit' expects uint64"),
    (b'{"downtime-limit": 300.0}', "Parameter 'downtime-limit' expects uint64"),
    (b'{"downtime-limit": "300"}', "Parameter 'downtime-limit' expects uint64"),
    (b'{"downtime-limit": true}', "Parameter 'downtime-limit' expects uint64"),
    (b'{"downtime-limit": null}', "Parameter 'downtime-limit' expects uint64"),
    (b'{"downtime-limit": NaN}', "JSON parse error, NaN is not a JSON number"),
    (b'{"x-stall-timeout": Infinity}', "JSON parse error, Infinity is not a JSON number"),
    (b'{"x-stall-timeout": -Infinity}', "JSON parse error, -Infinity is not a JSON number"),
    (b'{"x-stall-timeout": 1e400}', "JSON parse error, number 1e400 is out of range"),
    (b'{"x-max-rounds": 0}', "Parameter 'x-max-rounds' expects an integer in the range of 1 to 10000"),
    (b'{"max-bandwidth": -5}', "Parameter 'max-bandwidth' expects an integer in the range of 0 to 18446744073709551615 bytes"),
    (b'{"max-bandwidth": "100M"}', "Parameter 'max-bandwidth' expects uint64"),
    (b'{"x-auth-key": 5}', "Invalid parameter type for 'x-auth-key', expected: string"),
    (b'{"downtime_limit": 5}', "Parameter 'downtime_limit' is unexpected"),
])
def test_parameter_types_and_ranges(vm_server, raw, desc):
    vm, server, path = vm_server
    before = dict(vm.params)
    c = Raw(path)
    c.negotiate()
    c.send(b'{"execute": "migrate-set-parameters", "id": 9, "arguments": ' + raw + b"}")
    reply = c.msg()
    # a JSON-level error comes before the id could be read: no id (as the spec says)
    want = error(desc) if desc.startswith("JSON") else {**error(desc), "id": 9}
    assert reply == want
    assert vm.params == before
    c.send(b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 50, "x-max-rounds": 7}}')
    assert c.msg() == {"return": {}}
    assert (vm.params["downtime-limit"], vm.params["x-max-rounds"]) == (50, 7)


def test_hostile_inputs_leave_the_connection_usable(vm_server):
    vm, server, path = vm_server
    c = Raw(path)
    c.negotiate()

    def still_works(tag):
        c.send({"execute": "query-status", "id": tag})
        assert c.reply() == {"return": {"status": "running", "running": True}, "id": tag}

    # 1. nesting deep enough to crash a recursive parser
    c.send(b"[" * 200_000 + b"]" * 200_000)
    assert c.msg() == error("JSON nesting depth limit exceeded (at most 64 levels)")
    still_works("deep")
    # 2. a 10 MB request whose tail looks like commands: one error, the tail never runs
    tail = b'\\"}\n{\\"execute\\": \\"quit\\"}\n' * 100
    c.send(b'{"execute": "migrate", "arguments": {"uri": "' + b"x" * (10 << 20) + tail + b'"}}')
    assert c.msg() == error("JSON size limit exceeded (at most 1048576 bytes)")
    still_works("big")
    assert vm.migrations_started == 0 and not vm.quit_called.is_set()
    # 3. garbage, stray brackets, binary: one error per run
    c.send(b"hello world }]] 12 \"str\" ")
    assert c.msg() == error("QMP input must be a JSON object (got 'hello world }]] 12')")
    still_works("junk")
    c.send(b"\x00\x01\x02\x80\xfe")
    assert c.msg() == error("JSON parse error, stray byte 0x00")
    still_works("binary")
    # 4. a half-sent request abandoned with a control byte (qmp-spec: known-good state)
    c.send(b'{"execute": "quit", "argu')
    c.send(b"\x1b")
    assert c.msg() == error("JSON parse error, stray byte 0x1b")
    still_works("reset")
    assert not vm.quit_called.is_set()
    # 5. invalid UTF-8 in a string
    c.send(b'{"execute": "migrate", "arguments": {"uri": "\xc3\x28"}}')
    assert c.msg() == error("JSON parse error, invalid UTF-8")
    still_works("utf8")
    # 6. no error ever carries a Python traceback or signature
    c.send(b'{"execute": "migrate", "arguments": {"uri": "x", "**kwargs": 1}}')
    desc = c.msg()["error"]["desc"]
    assert desc == "Parameter '**kwargs' is unexpected"
    assert vm.migrations_started == 0


def test_handler_bugs_are_internal_errors_not_tracebacks(tmp_path, caplog):
    table = CommandTable([schema.QUERY_STATUS, schema.QUERY_MIGRATE, schema.QUERY_KVM],
                         check_returns=True)
    table.bind("query-status", lambda: 1 / 0)
    table.bind("query-migrate", lambda: {"status": "completing"})    # not in QEMU's enum
    table.bind("query-kvm", lambda: {"enabled": float("nan"), "present": object()})
    with QmpServer(table) as server:
        server.listen(f"unix:{tmp_path}/s")
        with QmpClient(f"unix:{tmp_path}/s") as q:
            with pytest.raises(QmpCommandError) as e:
                q.execute("query-status")
            assert e.value.desc == "internal error in 'query-status' (the VMM's log has the details)"
            with pytest.raises(QmpCommandError) as e:
                q.execute("query-migrate")
            assert "Traceback" not in e.value.desc
            with pytest.raises(QmpCommandError, match="internal error in 'query-kvm'"):
                q.execute("query-kvm")
            table.check_returns = False
            with pytest.raises(QmpCommandError, match="internal error in 'query-kvm'"):
                q.execute("query-kvm")             # not JSON at all: caught on the way out
            assert q.execute("query-migrate") == {"status": "completing"}   # still serving
    assert "ZeroDivisionError" in caplog.text
    assert "Parameter 'status' does not accept value 'completing'" in caplog.text


def test_bind_checks_handler_signatures():
    table = CommandTable(schema.COMMANDS)
    with pytest.raises(TypeError, match="does not take argument 'uri'"):
        table.bind("migrate", lambda: None)
    with pytest.raises(TypeError, match="optional argument 'detach' needs a default"):
        table.bind("migrate", lambda uri, detach, resume=False: None)
    with pytest.raises(TypeError, match="requires 'force', which the command does not declare"):
        table.bind("stop", lambda force: None)
    with pytest.raises(KeyError):
        table.bind("no-such-command", lambda: None)
    table.bind("migrate-set-parameters", lambda **params: None)      # **kwargs takes them all
    table.bind("migrate", lambda uri, **rest: None)
    assert "migrate" not in table.unbound()


def test_two_clients_commands_and_events(vm_server):
    vm, server, path = vm_server
    a, b = QmpClient(f"unix:{path}"), QmpClient(f"unix:{path}")
    not_negotiated = Raw(path)
    not_negotiated.msg()
    a.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    vm.step.clear()                          # hold the migration in its first round
    a.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
    # a second migrate from the other client is refused while the first runs
    with pytest.raises(QmpCommandError, match="There's a migration process in progress"):
        b.execute("migrate", {"uri": "tcp:127.0.0.1:4445"})
    assert b.execute("query-migrate")["status"] == "active"
    vm.step.set()
    for q in (a, b):                         # both see the whole sequence
        q.wait_event("MIGRATION", 5, {"status": "completed"})
        assert [e["data"]["pass"] for e in q.events("MIGRATION_PASS")] == [1, 2, 3]
        assert len(q.events("STOP")) == 1
    assert vm.migrations_started == 1
    assert a.execute("query-status")["status"] == b.execute("query-status")["status"] == "postmigrate"
    # the connection that never negotiated got no events at all
    not_negotiated.sock.settimeout(0.2)
    with pytest.raises(socket.timeout):
        not_negotiated.sock.recv(100)
    a.close()
    b.close()


def test_simultaneous_migrates_from_many_clients_start_one(vm_server):
    """Issue 11: two monitor clients sending migrate at the same moment both
    ran.  Handlers run one at a time, so the handler's own check is atomic."""
    vm, server, path = vm_server
    vm.step.clear()
    clients = [QmpClient(f"unix:{path}") for _ in range(8)]
    results = []
    go = threading.Barrier(len(clients))

    def fire(q):
        go.wait()
        try:
            q.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
            results.append("started")
        except QmpCommandError as e:
            results.append(e.desc)
    threads = [threading.Thread(target=fire, args=(q,)) for q in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    vm.step.set()
    assert sorted(results) == ["There's a migration process in progress"] * 7 + ["started"]
    assert vm.migrations_started == 1
    for q in clients:
        q.close()


def test_event_sequence_as_a_client_sees_it(vm_server):
    vm, server, path = vm_server
    c = Raw(path)
    c.negotiate()
    c.send({"execute": "migrate-set-capabilities",
            "arguments": {"capabilities": [{"capability": "events", "state": True}]}})
    assert c.msg() == {"return": {}}
    t0 = time.time()
    c.send({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}, "id": "m"})
    msgs = []
    while not (any(m.get("id") == "m" for m in msgs)
               and any(m.get("data") == {"status": "completed"} for m in msgs)):
        msgs.append(c.msg())
    t1 = time.time()
    events = [(m["event"], m.get("data")) for m in msgs if "event" in m]
    assert events == [("MIGRATION", {"status": "setup"}), ("MIGRATION", {"status": "active"}),
                      ("MIGRATION_PASS", {"pass": 1}), ("MIGRATION_PASS", {"pass": 2}),
                      ("MIGRATION_PASS", {"pass": 3}), ("STOP", None),
                      ("MIGRATION", {"status": "device"}), ("MIGRATION", {"status": "completed"})]
    # the setup event is emitted inside the command, so it precedes the command's reply
    replies = [i for i, m in enumerate(msgs) if m.get("id") == "m"]
    assert replies and replies[0] > 0 and msgs[replies[0]] == {"return": {}, "id": "m"}
    for m in msgs:
        if "event" in m:
            ts = m["timestamp"]
            assert set(ts) == {"seconds", "microseconds"} and 0 <= ts["microseconds"] < 1_000_000
            assert int(t0) <= ts["seconds"] + ts["microseconds"] / 1e6 <= t1 + 1
    assert all("data" not in m for m in msgs if m.get("event") == "STOP")   # STOP has no data


def test_emit_checks_the_declaration(vm_server):
    vm, server, path = vm_server
    with pytest.raises(ValueError, match="not declared"):
        server.emit("NO_SUCH_EVENT")
    with pytest.raises(ValueError, match="does not accept value 'completing'"):
        server.emit("MIGRATION", {"status": "completing"})
    with pytest.raises(ValueError, match="carries no data"):
        server.emit("STOP", {"why": "x"})


# ---- QEMU's client library and qmp-shell ----------------------------------------------------------


def test_qemu_qmp_client_executes_and_receives_events(vm_server):
    vm, server, path = vm_server

    async def session():
        qmp = QMPClient("kvmlite-test")
        await qmp.connect(path)                      # greeting and negotiation, QEMU's way
        status = await qmp.execute("query-status")
        version = await qmp.execute("query-version")
        names = {c["name"] for c in await qmp.execute("query-commands")}
        try:
            await qmp.execute("migrate-set-parameters", {"downtime-limit": "300"})
        except ExecuteError as e:
            refused = (e.error_class, str(e))
        await qmp.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "events", "state": True}]})
        events = []
        with qmp.listener(("MIGRATION", "MIGRATION_PASS")) as listener:
            await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
            async for event in listener:
                events.append((event["event"], event["data"]))
                if event["event"] == "MIGRATION" and event["data"]["status"] == "completed":
                    break
        info = await qmp.execute("query-migrate")
        await qmp.disconnect()
        return status, version, names, refused, events, info

    status, version, names, refused, events, info = asyncio.run(asyncio.wait_for(session(), 30))
    assert status == {"status": "running", "running": True}
    assert version["qemu"] == VERSION_TRIPLE
    assert {"qmp_capabilities", "query-status", "migrate", "query-migrate", "migrate_cancel"} <= names
    assert "migrate-start-postcopy" not in names             # declared, not bound here
    assert refused == ("GenericError", "Parameter 'downtime-limit' expects uint64")
    assert events == [("MIGRATION", {"status": "setup"}), ("MIGRATION", {"status": "active"}),
                      ("MIGRATION_PASS", {"pass": 1}), ("MIGRATION_PASS", {"pass": 2}),
                      ("MIGRATION_PASS", {"pass": 3}), ("MIGRATION", {"status": "device"}),
                      ("MIGRATION", {"status": "completed"})]
    assert info["status"] == "completed" and info["ram"]["x-skipped-free"] == 16000


def test_qmp_shell_runs_commands_non_interactively(vm_server, tmp_path):
    vm, server, path = vm_server
    shell = Path(sys.executable).with_name("qmp-shell")
    commands = "query-status\nmigrate-set-parameters downtime-limit=100\nstop\nquery-status\n" \
               "migrate-set-parameters downtime-limit=-1\n"
    r = subprocess.run([str(shell), path], input=commands, capture_output=True, text=True,
                       timeout=30, env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert f"Connected to QEMU {kvmlite.__version__}" in r.stdout
    replies = [json.loads(line.split(") ", 1)[1]) for line in r.stdout.splitlines()
               if line.startswith("(QEMU) {")]
    assert replies == [
        {"return": {"status": "running", "running": True}},
        {"return": {}},
        {"return": {}},
        {"return": {"status": "paused", "running": False}},
        error("Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 ms"),
    ]
    assert vm.params["downtime-limit"] == 100 and vm.status == "paused"


# ---- kvmlite's client -------------------------------------------------------------------------------


def test_client_timeout_then_the_late_reply_is_dropped(vm_server):
    vm, server, path = vm_server
    with QmpClient(f"unix:{path}", timeout=5) as q:
        vm.stuck = 0.5
        with pytest.raises(QmpTimeout, match="no reply to query-status within 0.1 s"):
            q.execute("query-status", timeout=0.1)
        vm.stuck = 0
        assert q.execute("query-kvm") == {"enabled": True, "present": True}


def test_client_says_so_when_the_server_goes_away(tmp_path):
    table = CommandTable([schema.QUERY_STATUS, schema.QUIT])
    server = QmpServer(table)
    table.bind("query-status", lambda: {"status": "running", "running": True})
    table.bind("quit", server.close)         # as a VMM's quit does: the reply still goes out
    server.listen(f"unix:{tmp_path}/s")
    q = QmpClient(f"unix:{tmp_path}/s")
    assert q.execute("quit") == {}                      # the reply comes before the hang-up
    with pytest.raises(QmpDisconnected, match="closed the connection while waiting for event SHUTDOWN"):
        q.wait_event("SHUTDOWN", 5)
    with pytest.raises(QmpDisconnected):
        q.execute("query-status")
    assert not os.path.exists(f"{tmp_path}/s")          # the server removed its socket


def test_quit_closes_the_server_and_what_was_queued_behind_it_never_runs(tmp_path):
    ran = []
    table = CommandTable([schema.QUERY_STATUS, schema.QUIT])
    server = QmpServer(table)

    def quit_():
        time.sleep(0.3)                      # another client's command arrives meanwhile
        server.close()
    table.bind("quit", quit_)
    table.bind("query-status", lambda: ran.append("query-status") or {"status": "running", "running": True})
    server.listen(f"unix:{tmp_path}/s")
    a, b = QmpClient(f"unix:{tmp_path}/s"), QmpClient(f"unix:{tmp_path}/s")
    late = []
    t = threading.Timer(0.1, lambda: late.append(_outcome(b, "query-status")))
    t.start()
    t0 = time.monotonic()
    assert a.execute("quit") == {}
    t.join()
    assert time.monotonic() - t0 < 1.5      # close() did not wait out its timeout
    assert late in (["the monitor is closing"], ["disconnected"])
    assert ran == []


def _outcome(q: QmpClient, command: str) -> str:
    try:
        q.execute(command)
        return "ran"
    except QmpCommandError as e:
        return e.desc
    except QmpDisconnected:
        return "disconnected"


def test_client_connection_errors(tmp_path):
    with pytest.raises(QmpClientError, match=r"cannot connect to the monitor at unix:/nonexistent.sock"):
        QmpClient("unix:/nonexistent.sock")
    # something that is not QMP
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(f"{tmp_path}/http")
    srv.listen(1)

    def speak_http():
        conn, _ = srv.accept()
        conn.sendall(b'{"hello": "world"}\n')
        time.sleep(0.5)
        conn.close()
    threading.Thread(target=speak_http, daemon=True).start()
    with pytest.raises(QmpClientError, match="is not a QMP server"):
        QmpClient(f"unix:{tmp_path}/http")
    srv.close()


# ---- where the monitor listens ---------------------------------------------------------------------


def _table():
    table = CommandTable([schema.QUERY_STATUS])
    table.bind("query-status", lambda: {"status": "running", "running": True})
    return table


def test_unix_listener_refuses_a_live_socket(tmp_path):
    path = f"{tmp_path}/vm.sock"
    first = QmpServer(_table())
    first.listen(path)
    with pytest.raises(MonitorError, match="another process is listening on it"):
        QmpServer(_table()).listen(f"unix:{path}")
    with QmpClient(f"unix:{path}") as q:                 # the first is still reachable
        assert q.execute("query-status")["status"] == "running"
    first.close()
    assert not os.path.exists(path)


def test_unix_listener_refuses_other_files_and_replaces_a_stale_socket(tmp_path):
    regular = tmp_path / "notes.txt"
    regular.write_text("precious")
    with pytest.raises(MonitorError, match="a file that is not a socket is there; refusing to replace it"):
        QmpServer(_table()).listen(str(regular))
    assert regular.read_text() == "precious"
    with pytest.raises(MonitorError, match="it is a directory"):
        QmpServer(_table()).listen(str(tmp_path))
    with pytest.raises(MonitorError, match="directory /nonexistent/dir does not exist"):
        QmpServer(_table()).listen("/nonexistent/dir/vm.sock")
    with pytest.raises(MonitorError, match="a path of at most 107 bytes"):
        QmpServer(_table()).listen(f"{tmp_path}/{'x' * 200}")
    link = tmp_path / "link.sock"
    link.symlink_to(regular)
    with pytest.raises(MonitorError, match="not a socket"):
        QmpServer(_table()).listen(str(link))
    assert regular.read_text() == "precious"
    # a socket nobody listens on any more (its VMM was killed) is replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(f"{tmp_path}/stale.sock")
    stale.close()
    with QmpServer(_table()) as server:
        server.listen(f"unix:{tmp_path}/stale.sock")
        with QmpClient(f"unix:{tmp_path}/stale.sock") as q:
            assert q.execute("query-status")["running"] is True
        assert oct(os.stat(f"{tmp_path}/stale.sock").st_mode & 0o777) == "0o600"


def test_closing_leaves_a_successors_socket_alone(tmp_path):
    path = f"{tmp_path}/vm.sock"
    first = QmpServer(_table())
    first.listen(path)
    os.unlink(path)                                      # an operator removed it...
    second = QmpServer(_table())
    second.listen(path)                                  # ...and another VMM took the path
    first.close()
    with QmpClient(f"unix:{path}") as q:
        assert q.execute("query-status")["running"] is True
    second.close()


def test_tcp_listener():
    with QmpServer(_table()) as server:
        where = server.listen("tcp:127.0.0.1:0,server=on,wait=off")
        assert where.startswith("tcp:127.0.0.1:") and not where.endswith(":0")
        with QmpClient(where) as q:
            assert q.execute("query-status")["status"] == "running"
    with pytest.raises(MonitorError, match="option 'reconnect=1' is not supported"):
        QmpServer(_table()).listen("tcp:127.0.0.1:0,reconnect=1")
    with pytest.raises(MonitorError, match="expected tcp:HOST:PORT"):
        QmpServer(_table()).listen("tcp:127.0.0.1:http")


def test_connections_beyond_the_limit_are_closed_at_once(tmp_path):
    with QmpServer(_table(), max_connections=2) as server:
        where = server.listen(f"unix:{tmp_path}/s")
        a, b = QmpClient(where), QmpClient(where)
        with pytest.raises(QmpDisconnected, match="closed the connection while waiting for greeting"):
            QmpClient(where, timeout=5)
        a.close()
        for _ in range(100):                 # once a's connection has ended, there is room again
            try:
                with QmpClient(where, timeout=5) as c:
                    assert c.execute("query-status")["running"] is True
                break
            except QmpDisconnected:
                time.sleep(0.02)
        else:
            raise AssertionError("no room after a client left")
        b.close()


def test_a_client_that_never_reads_is_dropped_not_waited_for(vm_server, monkeypatch):
    vm, server, path = vm_server
    monkeypatch.setattr(qmp, "MAX_BACKLOG", 1 << 20)
    lazy = Raw(path)
    lazy.negotiate()
    for _ in range(40_000):                  # 3.6 MB of events: more than the backlog allows
        server.emit("MIGRATION", {"status": "active"})
    # emit never blocked on it (the loop ended); the server hung up on it
    lazy.sock.settimeout(10)
    received = 0
    while chunk := lazy.sock.recv(1 << 20):
        received += len(chunk)
    assert 0 < received < 3_600_000
    with QmpClient(f"unix:{path}") as q:     # and everyone else is served
        assert q.execute("query-status")["running"] is True
