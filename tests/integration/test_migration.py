"""Live migration between two real kvmlite processes on loopback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from kvmlite import exitcodes
from kvmlite.migration import transport, wire
from kvmlite.procs import VmProcess, free_port, start_destination

from .helpers import FINAL, ROOT, begin, fill_vm, finish_and_check, migrate, pages_transferred

def error_lines(lines: list[str]) -> list[str]:
    """Guest lines reporting a non-zero error count.  A line the migration cut in
    two (its start printed by the source, its end by the destination) carries no
    count and is not an error."""
    return [l for l in lines if any(int(n) for n in re.findall(r"errors=(\d+)", l))]


def test_stop_copy_sends_exactly_the_active_pages(guest_image):
    """Stop-copy: pages transferred equal the active pages at pause; the guest passes on the destination."""
    port = free_port()
    dst = start_destination(port, "256M")
    src, fill = fill_vm()
    with src, dst:
        src.execute("stop")
        at_pause = src.execute("x-query-free-pages")
        out = subprocess.run([sys.executable, "-m", "kvmlite", "migrate", "--monitor", src.monitor_path,
                              f"tcp:127.0.0.1:{port}", "--stop-copy", "--json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        ram = s["ram"]
        assert s["status"] == "completed" and len(s["x-rounds"]) == 1 and s["x-live"] is False
        assert pages_transferred(s) == at_pause["active"]
        assert ram["x-skipped-free"] == at_pause["free"]
        assert ram["x-resent"] == 0
        # the wire carries the pages plus a few bytes of framing per run and the state
        assert ram["normal-bytes"] < ram["transferred"] < ram["normal-bytes"] + (1 << 20)
        assert src.wait(30) == 0, src.output()
        finish_and_check(dst, fill["live"])


def test_hint_off_sends_the_free_pages_too(guest_image):
    """Hint off sends the stale free pages as well: the extra bytes match the free share."""
    results = {}
    for hint in (True, False):
        port = free_port()
        dst = start_destination(port, "256M")
        src, fill = fill_vm(live=20, stale=50)
        with src, dst:
            results[hint] = migrate(src, port, hint=hint, stop_copy=True)
            assert results[hint]["status"] == "completed", results[hint]
            assert src.wait(30) == 0
            finish_and_check(dst, fill["live"])
    on, off = results[True]["ram"], results[False]["ram"]
    extra = off["transferred"] - on["transferred"]
    stale_bytes = fill["stale"] * 4096
    assert abs(extra - stale_bytes) < 0.02 * stale_bytes, (extra, stale_bytes)
    assert off["x-skipped-free"] == 0
    assert on["x-skipped-free"] >= fill["stale"]


def test_live_ping_pong_under_churn_keeps_memory_intact(guest_image):
    """Live migration A→B→A→B→A while the guest allocates and frees: no corrupted page."""
    ports = [free_port(), free_port()]
    vm = VmProcess([str(guest_image), "--memory", "256M", "--cmdline",
                    "workload=churn pages=20000 rounds=100000 free=50"])
    hops, procs = 4, [vm]
    try:
        for hop in range(hops):
            n = len(vm.stdout_lines)
            vm.wait_for(r"^churn: round \d+", timeout=60)      # it is running here
            port = ports[hop % 2]
            nxt = start_destination(port, "256M")
            procs.append(nxt)
            s = migrate(vm, port)
            assert s["status"] == "completed", (s, vm.output(), nxt.output())
            assert len(s["x-rounds"]) >= 2 and s["ram"]["x-skipped-free"] > 0
            assert vm.wait(30) == 0
            assert not error_lines(vm.stdout_lines[n:])
            vm = nxt
        vm.wait_for(r"^churn: round \d+", timeout=60)
        vm.execute("quit")
        vm.wait(30)
        bad = [l for p in procs for l in error_lines(p.stdout_lines)]
        assert not bad, bad
        rounds = [l for p in procs[1:] for l in p.stdout_lines if l.startswith("churn: round")]
        assert rounds, "the guest made no progress after migrating"
    finally:
        for p in procs:
            p.kill()


def test_destination_killed_mid_stream_source_keeps_running(guest_image):
    """If the destination dies mid-stream the migration fails and the guest carries on at the source."""
    port = free_port()
    dst = start_destination(port, "256M")
    src, fill = fill_vm(live=50, stale=10)
    with src, dst:
        c = begin(src, port, bandwidth=16 << 20)
        time.sleep(1.0)
        assert c.execute("query-migrate")["status"] == "active"
        dst.kill()
        deadline = time.monotonic() + 60
        while (s := c.execute("query-migrate"))["status"] not in FINAL:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert s["status"] == "failed" and s["error-desc"], s
        assert c.execute("query-status")["status"] == "running"
        c.close()
        finish_and_check(src, fill["live"])
    src.wait_for("keeps running here", timeout=10, stream="stderr")


def test_cancel_and_unreachable_destination_keep_the_vm(guest_image):
    """A cancelled migration or one to nowhere leaves the VM running."""
    src, fill = fill_vm(live=50, stale=0)
    with src:
        s = migrate(src, free_port())      # nothing listens there
        assert s["status"] == "failed" and "nothing listens" in s["error-desc"]
        port = free_port()
        dst = start_destination(port, "256M")
        with dst:
            c = begin(src, port, bandwidth=16 << 20)
            time.sleep(0.5)
            c.execute("migrate_cancel")
            while (s := c.execute("query-migrate"))["status"] not in FINAL:
                time.sleep(0.05)
            assert s["status"] == "cancelled"
            assert c.execute("query-status")["status"] == "running"
            c.close()
            assert dst.wait(30) == exitcodes.DATAERR
            assert "the guest was not started" in "\n".join(dst.stderr_lines)
        finish_and_check(src, fill["live"])


class _Bytes:
    """Bytes read back through the socket interface wire.read_frame expects."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)

    def recv_into(self, view, n: int = 0) -> int:
        n = min(n or len(view), len(self.data))
        view[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


def _send_to_destination(payload: bytes) -> VmProcess:
    port = free_port()
    dst = start_destination(port, "64M", monitor=False)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(10)
        transport.client_handshake(s, transport.Credentials())   # a peer the destination accepts
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        reply = s.recv(65536)
    dst.reply = reply
    return dst


@pytest.mark.parametrize("payload,message", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a kvmlite migration stream"),
    (wire.encode_preamble({"page_size": 4096, "ram": [[0, 64 << 20]], "vcpus": 1})
     + wire.pages_header(0x100000, 4) + b"\x90" * 5000, "truncated"),
    (wire.encode_preamble({"page_size": 4096, "ram": [[0, 64 << 20]], "vcpus": 1})
     + wire.pages_header(1 << 40, 1), "does not lie inside"),
    (wire.encode_preamble({"page_size": 4096, "ram": [[0, 32 << 20]], "vcpus": 1}), "RAM"),
])
def test_hostile_or_truncated_streams_are_refused(payload, message):
    """Garbage, truncation, out-of-RAM pages, mismatched RAM: the destination refuses and never runs a guest."""
    dst = _send_to_destination(payload)
    with dst:
        assert dst.wait(30) == exitcodes.DATAERR
        err = "\n".join(dst.stderr_lines)
        assert message in err and "the guest was not started" in err, err
        assert "Traceback" not in err
        assert not dst.stdout_lines
        if dst.reply:
            assert wire.read_frame(_Bytes(dst.reply), "the reply", wire.DEST_ANSWERS_TO_END)["status"] == "error"


def test_destination_refusal_reaches_the_source(guest_image):
    """A destination with the wrong RAM size refuses; the source reports why and keeps the guest."""
    port = free_port()
    dst = start_destination(port, "128M")
    src, fill = fill_vm(live=20, stale=0)
    with src, dst:
        s = migrate(src, port)
        assert s["status"] == "failed"
        assert "refused" in s["error-desc"] and "--memory must match" in s["error-desc"], s
        assert dst.wait(30) == exitcodes.DATAERR
        assert "the guest was not started" in "\n".join(dst.stderr_lines)
        finish_and_check(src, fill["live"])


def test_auto_converge_throttles_a_guest_that_outruns_the_link(guest_image):
    """A guest dirtying faster than a 64 MiB/s link gets throttled, and still migrates intact."""
    port = free_port()
    dst = start_destination(port, "256M")
    src = VmProcess([str(guest_image), "--memory", "256M", "--cmdline",
                     "workload=churn pages=20000 rounds=100000 free=50"])
    with src, dst:
        src.wait_for(r"^churn: round 3/", timeout=60)
        s = migrate(src, port, bandwidth=64 << 20, max_rounds=6)
        assert s["status"] == "completed", s
        assert s.get("cpu-throttle-percentage", 0) >= 20, s
        assert src.wait(30) == 0
        dst.wait_for(r"^churn: round \d+", timeout=60)      # carries on at the destination
        dst.execute("quit")
        dst.wait(30)
        bad = [l for p in (src, dst) for l in error_lines(p.stdout_lines)]
        assert not bad, bad


def test_destination_caps_the_ram_a_stream_may_ask_for():
    """A stream asking for more RAM than --max-memory is refused before any RAM is set up."""
    port = free_port()
    dst = start_destination(port, monitor=False, extra=["--max-memory", "32M"])
    with dst, socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(10)
        transport.client_handshake(s, transport.Credentials())
        s.sendall(wire.encode_preamble({"page_size": 4096, "ram": [[0, 1 << 30]], "vcpus": 1}))
        assert dst.wait(30) == exitcodes.DATAERR
        err = "\n".join(dst.stderr_lines)
        assert "exceeds this destination's limit of 32 MiB" in err and "not started" in err, err
