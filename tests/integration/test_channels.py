"""Migration over several connections (--channels N; over QMP, QEMU's multifd capability
and multifd-channels): pages spread, rounds kept in step."""

from __future__ import annotations

import json
import subprocess
import sys

from kvmlite.procs import VmProcess, free_port, start_destination

from .helpers import GUEST, ROOT, fill_vm, finish_and_check, migrate, pages_transferred
from .test_migration import error_lines


def test_stop_copy_over_two_channels_sends_every_page_once(guest_image):
    """Hint off, stop-copy, 2 channels: the pages of one connection, and the guest passes."""
    port = free_port()
    dst = start_destination(port, "256M")
    src, fill = fill_vm(live=20, stale=50)
    with src, dst:
        src.execute("stop")
        out = subprocess.run([sys.executable, "-m", "kvmlite", "migrate", "--monitor", src.monitor_path,
                              f"tcp:127.0.0.1:{port}", "--stop-copy", "--no-free-page-hint",
                              "--channels", "2", "--json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        assert s["status"] == "completed" and len(s["x-rounds"]) == 1 and s["ram"]["x-resent"] == 0
        assert pages_transferred(s) == 65536
        # the second connection carried about half of the page bytes
        assert 0.3 < s["ram"]["multifd-bytes"] / s["ram"]["normal-bytes"] < 0.7, s["ram"]
        assert src.wait(30) == 0
        assert "over 2 connections" in "\n".join(dst.stderr_lines)
        finish_and_check(dst, fill["live"])


def test_live_ping_pong_under_churn_over_three_channels(guest_image):
    """A page re-sent in a later round may take another connection: the destination keeps
    the rounds in step, so no page the churning guest uses is ever stale."""
    vm = VmProcess([str(GUEST), "--memory", "256M", "--cmdline",
                    "workload=churn pages=20000 rounds=100000 free=50"])
    procs = [vm]
    try:
        for _hop in range(3):
            n = len(vm.stdout_lines)
            vm.wait_for(r"^churn: round \d+", timeout=60)
            port = free_port()
            nxt = start_destination(port, "256M")
            procs.append(nxt)
            s = migrate(vm, port, channels=3)
            assert s["status"] == "completed", (s, vm.output(), nxt.output())
            assert len(s["x-rounds"]) >= 2
            assert vm.wait(30) == 0
            assert not error_lines(vm.stdout_lines[n:])
            assert "over 3 connections" in "\n".join(nxt.stderr_lines)
            vm = nxt
        vm.wait_for(r"^churn: round \d+", timeout=60)
        vm.execute("quit")
        vm.wait(30)
        bad = [l for p in procs for l in error_lines(p.stdout_lines)]
        assert not bad, bad
    finally:
        for p in procs:
            p.kill()


def test_keyed_channels_tag_their_pages_each_under_its_own_keys(guest_image, tmp_path):
    """With --auth-key every channel runs the keyed handshake and tags its pages with
    keys of its own connection; a churning guest's migration over 4 passes intact."""
    key = tmp_path / "key"
    key.write_text("a key shared by the two VMMs, 32+ bytes\n")
    key.chmod(0o600)
    port = free_port()
    dst = start_destination(port, "256M", extra=["--auth-key", str(key)])
    src = VmProcess([str(GUEST), "--memory", "256M", "--auth-key", str(key), "--cmdline",
                     "workload=fill live=20 stale=20 dirty=2000"])
    with src, dst:
        live = int(src.wait_for(r"^fill: ready live=(\d+)", timeout=60).group(1))
        s = migrate(src, port, channels=4)
        assert s["status"] == "completed", (s, dst.output())
        assert len(s["x-rounds"]) >= 2 and s["ram"]["multifd-bytes"] > 0
        assert src.wait(30) == 0
        assert "over 4 connections" in "\n".join(dst.stderr_lines)
        finish_and_check(dst, live)


def test_channels_to_an_smp_guest(guest_image):
    """Two vCPUs writing while the pages go over two connections, live, to a
    destination that makes its VM (two vCPUs, RAM not pre-faulted) from the header."""
    port = free_port()
    dst = start_destination(port)
    src, fill = fill_vm(live=20, stale=30, dirty=2000, extra=["--smp", "2"])
    with src, dst:
        s = migrate(src, port, channels=2)
        assert s["status"] == "completed", (s, dst.output())
        assert src.wait(30) == 0
        finish_and_check(dst, fill["live"])
