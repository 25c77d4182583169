"""The QMP monitor of real VMMs, driven the way QEMU's users drive QEMU: QEMU's
own client library (qemu.qmp) and qmp-shell, `-incoming defer` with
migrate-incoming, postmigrate until quit, and a monitor that does not let
itself be taken over or crash (issue 11)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from kvmlite import exitcodes
from kvmlite.control.client import QmpCommandError
from kvmlite.procs import VmProcess, free_port, start_deferred_destination, start_destination

from .helpers import GUEST, ROOT, fill_vm, finish_and_check, kvmlite, migrate

MEMORY = "64M"


def small_vm(**kw) -> tuple[VmProcess, int]:
    vm, fill = fill_vm(MEMORY, live=20, stale=30, dirty=200, **kw)
    return vm, fill["live"]


def test_qemu_qmp_client_migrates_a_kvmlite_vm_and_hears_every_event():
    """QEMU's asyncio client library: negotiation, commands, the MIGRATION/STOP events of a
    real live migration, query-migrate in QAPI's shape, quit and SHUTDOWN."""
    src, live = small_vm()
    port = free_port()
    dst = start_destination(port, MEMORY)

    async def session():
        qmp = QMPClient("kvmlite-test")
        await qmp.connect(src.monitor_path)
        status = await qmp.execute("query-status")
        await qmp.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "events", "state": True}]})
        events = []
        with qmp.listener() as listener:
            await qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            async for event in listener:
                events.append((event["event"], event.get("data")))
                if event["event"] == "MIGRATION" and event["data"]["status"] in ("completed", "failed"):
                    break
            info = await qmp.execute("query-migrate")
            after = await qmp.execute("query-status")
            await qmp.execute("quit")
            async for event in listener:
                events.append((event["event"], event.get("data")))
                if event["event"] == "SHUTDOWN":
                    break
        try:
            await qmp.disconnect()
        except EOFError:
            pass              # the VMM hung up after quit, as QEMU does: qemu.qmp reports it so
        return status, events, info, after

    with src, dst:
        src.wait_monitor()
        status, events, info, after = asyncio.run(asyncio.wait_for(session(), 120))
        assert status == {"status": "running", "running": True}
        names = [e for e in events if e[0] != "MIGRATION_PASS"]
        assert names == [("MIGRATION", {"status": "setup"}), ("MIGRATION", {"status": "active"}),
                         ("STOP", None), ("MIGRATION", {"status": "device"}),
                         ("MIGRATION", {"status": "handover"}), ("MIGRATION", {"status": "completed"}),
                         ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})], events
        passes = [d["pass"] for name, d in events if name == "MIGRATION_PASS"]
        assert passes == list(range(1, len(passes) + 1)) and passes[-1] == info["ram"]["dirty-sync-count"]
        assert info["status"] == "completed" and info["ram"]["x-skipped-free"] > 0
        assert info["ram"]["normal"] >= live and info["downtime"] >= 0
        assert after == {"status": "postmigrate", "running": False}
        assert src.wait(30) == 0
        finish_and_check(dst, live)


def test_qmp_shell_reads_commands_from_a_pipe():
    """qmp-shell, QEMU's interactive shell, against a real VM: query, stop, cont, quit."""
    vm, live = small_vm()
    shell = Path(sys.executable).with_name("qmp-shell")
    with vm:
        vm.wait_monitor()
        r = subprocess.run([str(shell), vm.monitor_path], timeout=60, capture_output=True, text=True,
                           input="query-status\nstop\nquery-status\nx-query-free-pages\ncont\n"
                                 "migrate-set-parameters downtime-limit=-1\nquit\n",
                           env={**os.environ, "HOME": str(ROOT / "build")})
        assert r.returncode == 0, r.stderr
        replies = [json.loads(line.split(") ", 1)[1]) for line in r.stdout.splitlines()
                   if line.startswith("(QEMU) {")]
        assert replies[0] == {"return": {"status": "running", "running": True}}
        assert replies[2] == {"return": {"status": "paused", "running": False}}
        assert replies[3]["return"]["pages-total"] == 16384 and replies[3]["return"]["registered"]
        assert replies[5]["error"]["desc"] == \
            "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 ms"
        assert replies[6] == {"return": {}}
        assert vm.wait(30) == 0                  # quit


def test_incoming_defer_then_migrate_incoming():
    """`run --incoming defer`: the destination's monitor answers before the VM arrives,
    migrate-incoming names the port, query-migrate follows the incoming migration."""
    dst = start_deferred_destination(MEMORY)
    src, live = small_vm()
    port = free_port()
    with src, dst, dst.client() as d:
        assert d.execute("query-status") == {"status": "inmigrate", "running": False}
        assert d.execute("query-migrate") == {}
        d.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        d.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        dst.wait_for("waiting for a migration on tcp:127.0.0.1:", stream="stderr")
        assert d.execute("query-migrate") == {"status": "setup"}
        with pytest.raises(QmpCommandError, match="already been started"):
            d.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        s = migrate(src, port)
        assert s["status"] == "completed", s
        d.wait_event("RESUME", 30)
        info = d.execute("query-migrate")
        assert info["status"] == "completed" and info["ram"]["normal"] == s["ram"]["normal"]
        assert [e["data"]["status"] for e in d.events("MIGRATION")] == ["active", "handover", "completed"]
        assert d.execute("query-status")["status"] == "running"
        finish_and_check(dst, live)


def test_a_deferred_destination_quits_before_any_migration():
    dst = start_deferred_destination()
    with dst, dst.client() as d:
        d.execute("quit")
        assert d.wait_event("SHUTDOWN", 10)["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert dst.wait(30) == 0


def test_a_failed_incoming_migration_waits_to_be_asked_with_exit_on_error_off():
    """migrate-incoming exit-on-error false: a refused stream leaves the VMM up, status failed."""
    dst = start_deferred_destination(MEMORY)
    port = free_port()
    with dst, dst.client() as d:
        d.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}", "exit-on-error": False})
        dst.wait_for("waiting for a migration", stream="stderr")
        from kvmlite.migration import transport
        with socket.create_connection(("127.0.0.1", port)) as s:
            transport.client_handshake(s, transport.Credentials())
            s.sendall(b"not a stream at all, though long enough to be read" * 10)
        dst.wait_for("waiting for quit", stream="stderr")
        assert d.execute("query-migrate")["status"] == "failed"
        assert d.execute("query-status")["status"] == "inmigrate"
        d.execute("quit")
        assert dst.wait(30) == exitcodes.DATAERR


def test_the_source_stays_in_postmigrate_until_quit_or_its_timeout():
    """As QEMU's: after migrating away the source VMM waits for quit; --postmigrate-timeout ends that."""
    src, live = small_vm()
    port = free_port()
    dst = start_destination(port, MEMORY)
    with src, dst:
        s = migrate(src, port, quit=False)
        assert s["status"] == "completed"
        time.sleep(1.0)
        assert src.proc.poll() is None                        # still there
        assert src.execute("query-status")["status"] == "postmigrate"
        assert src.execute("query-migrate")["status"] == "completed"
        with pytest.raises(QmpCommandError, match="runs there now"):
            src.execute("cont")
        src.execute("quit")
        assert src.wait(30) == 0
        finish_and_check(dst, live)

    src, live = small_vm(extra=["--postmigrate-timeout", "0.5"])
    port = free_port()
    dst = start_destination(port, MEMORY)
    with src, dst:
        assert migrate(src, port, quit=False)["status"] == "completed"
        assert src.wait(30) == 0
        src.wait_for("no quit within 0.5 s", stream="stderr")
        finish_and_check(dst, live)


def test_two_clients_migrating_at_once_start_one_migration():
    """Two monitor clients send migrate at the same moment: one runs, the other is refused (issue 11)."""
    src, live = small_vm()
    ports = [free_port(), free_port()]
    dsts = [start_destination(p, MEMORY) for p in ports]
    with src, dsts[0], dsts[1]:
        clients = [src.client(), src.client()]
        go = threading.Barrier(2)
        outcome = [None, None]

        def send(i):
            go.wait()
            try:
                clients[i].execute("migrate", {"uri": f"tcp:127.0.0.1:{ports[i]}"})
                outcome[i] = "started"
            except QmpCommandError as e:
                outcome[i] = e.desc
        threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcome) == ["There's a migration process in progress", "started"], outcome
        winner = outcome.index("started")
        while clients[0].execute("query-migrate")["status"] not in ("completed", "failed"):
            time.sleep(0.02)
        assert clients[0].execute("query-migrate")["status"] == "completed"
        clients[0].execute("quit")
        for c in clients:
            c.close()
        assert src.wait(30) == 0
        finish_and_check(dsts[winner], live)
        assert dsts[1 - winner].proc.poll() is None             # the other never got a byte


def test_kvmlite_migrate_says_so_in_one_line_when_the_source_dies():
    """The source VMM killed while `kvmlite migrate` follows it: one line, exit 69, no traceback."""
    src, _ = small_vm()
    port = free_port()
    dst = start_destination(port, MEMORY)
    with src, dst:
        proc = subprocess.Popen([sys.executable, "-m", "kvmlite", "migrate", "--monitor", src.monitor_path,
                                 f"tcp:127.0.0.1:{port}", "--bandwidth", "4M"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        src.proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == exitcodes.UNAVAILABLE, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "closed the connection" in err or "lost the monitor" in err, err


def test_a_second_vmm_cannot_take_a_live_monitor_socket(tmp_path):
    """--monitor on a socket another VMM serves, on a regular file, on a directory: one line, exit 73
    (EX_CANTCREAT), and the first VMM, or the file, untouched."""
    vm, _ = small_vm()
    with vm:
        vm.wait_monitor()
        r = kvmlite("run", str(GUEST), "--memory", "16M", "--monitor", f"unix:{vm.monitor_path}")
        assert r.returncode == exitcodes.CANTCREAT and "another process is listening" in r.stderr, r.stderr
        assert vm.execute("query-status")["status"] == "running"       # the first is still reachable
        precious = tmp_path / "notes.txt"
        precious.write_text("keep me")
        r = kvmlite("run", str(GUEST), "--memory", "16M", "--monitor", str(precious))
        assert r.returncode == exitcodes.CANTCREAT and "not a socket" in r.stderr
        assert precious.read_text() == "keep me"
        r = kvmlite("run", str(GUEST), "--memory", "16M", "--monitor", str(tmp_path))
        assert r.returncode == exitcodes.CANTCREAT and "is a directory" in r.stderr
        assert "Traceback" not in r.stderr
        vm.execute("quit")


def test_hostile_input_to_a_real_monitor_leaves_it_serving():
    """Deep nesting, a 10 MB request and binary junk: errors, and the next command is answered."""
    vm, _ = small_vm()
    with vm:
        vm.wait_monitor()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(vm.monitor_path)
            f = s.makefile("rwb", buffering=0)
            f.readline()
            f.write(b'{"execute": "qmp_capabilities"}')
            assert json.loads(f.readline()) == {"return": {}}
            f.write(b'{"execute": "query-status", "arguments": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
            assert "nesting depth" in json.loads(f.readline())["error"]["desc"]
            f.write(b'{"execute": "stop", "pad": "' + b"x" * (10 << 20) + b'"}')
            assert "size limit" in json.loads(f.readline())["error"]["desc"]
            f.write(b"\x00\xff junk")
            f.readline()
            f.write(b'{"execute": "query-status", "id": 7}')
            while (msg := json.loads(f.readline())).get("id") != 7:
                pass
            assert msg["return"]["status"] == "running"           # the padded stop never ran
        vm.execute("quit")


def test_sigterm_ends_the_vmm_with_shutdown_and_143():
    vm, _ = small_vm()
    with vm, vm.client() as q:
        vm.proc.send_signal(signal.SIGTERM)
        assert q.wait_event("SHUTDOWN", 10)["data"] == {"guest": False, "reason": "host-signal"}
        assert vm.wait(30) == exitcodes.SIGTERM


def test_the_readme_qmp_client_example_migrates_a_vm():
    """README.md's QmpClient example, run as a user would paste it, against a real VM."""
    import re
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The monitor: QMP"):text.index("## From Python")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    src, live = small_vm()
    port = free_port()
    dst = start_destination(port, MEMORY)
    with src, dst:
        src.wait_monitor()
        code = code.replace("/tmp/vm1.sock", src.monitor_path).replace("4444", str(port))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert re.search(r"^[\d.]+ Mbit/s, \d+ pages skipped as free$", r.stdout, re.M), r.stdout
        assert src.wait(30) == 0
        finish_and_check(dst, live)
