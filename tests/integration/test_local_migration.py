"""Local migration that copies nothing: guest RAM in a memfd, handed over a unix socket,
driven over QMP (the x-local capability) as `kvmlite migrate --local` drives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from kvmlite.control.client import QmpCommandError
from kvmlite.procs import VmProcess, free_port, start_destination
from tests.harness import vmm_command

from .helpers import GUEST, ROOT, finish_and_check, migrate, pages_transferred
from .test_migration import error_lines

MEMORY = "256M"


def local_destination(path: str, *, faults=(), extra=()) -> VmProcess:
    """`kvmlite run --incoming unix:PATH`, returned once it listens; with
    `faults` (POINT=ACTION) its VMM runs through the test harness."""
    dst = VmProcess(["--incoming", f"unix:{path}", *extra],
                    **({"vmm": vmm_command(faults)} if faults else {}))
    dst.wait_for(r"waiting for a migration", timeout=60, stream="stderr")
    return dst


def memfd_vm(cmdline: str, ready: str, *, memory: str = MEMORY, extra=()) -> VmProcess:
    vm = VmProcess([str(GUEST), "--memory", memory, "--memory-backend", "memfd",
                    "--cmdline", cmdline, *extra])
    vm.wait_for(ready, timeout=120)
    return vm


def migrate_local(src: VmProcess, path: str, **settings) -> dict:
    """x-local on, then migrate to unix:PATH: the final query-migrate (the source,
    left in postmigrate, quit)."""
    return migrate(src, f"unix:{path}", local=True, **settings)


def ram_allocated(pid: int) -> int:
    """Bytes the VMM's guest-RAM memfd holds, as the host sees it (its st_blocks)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:kvmlite-ram"):
                return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
        except OSError:
            continue
    raise AssertionError(f"process {pid} holds no kvmlite-ram memfd")


def test_local_migration_copies_no_page_and_gives_free_pages_back(guest_image, tmp_path):
    """No page crosses the socket; the destination's RAM holds the active pages, not the
    stale free ones; the guest's self-check passes there.  (The downtime limit bounds
    the punching, ~1.5 us a page; 1 s lets every stale page go.)"""
    path = str(tmp_path / "in.sock")
    dst = local_destination(path)
    src = memfd_vm("workload=fill live=20 stale=50 dirty=500", r"^fill: ready")
    live = int(src.wait_for(r"^fill: ready live=(\d+)").group(1))
    with src, dst:
        before = ram_allocated(src.proc.pid)
        (memdev,) = src.execute("query-memdev")
        assert memdev["x-backend"] == "memory-backend-memfd" and memdev["share"] is True
        assert abs(memdev["x-allocated"] - before) <= 1 << 20      # the guest runs meanwhile
        s = migrate_local(src, path, downtime_ms=1000)
        assert s["status"] == "completed", (s, src.output(), dst.output())
        assert s["ram"]["normal"] == 0 and s["ram"]["duplicate"] == 0 and s["x-rounds"] == []
        assert s["ram"]["transferred"] < 64 << 10    # preamble, state, END: no page
        assert src.wait(30) == 0, src.output()
        assert not os.path.exists(path)              # the destination removed its socket
        after = ram_allocated(dst.proc.pid)
        assert abs(dst.execute("query-memdev")[0]["x-allocated"] - after) <= 1 << 20
        active = dst.execute("x-query-free-pages")["active"] * 4096
        # the 50 % stale pages were allocated at the source and are given back here
        assert before >= (live + 0.45 * 65536) * 4096, before
        assert live * 4096 <= after <= active + (1 << 20), (after, active)
        assert "free pages punched out" in "\n".join(dst.stderr_lines)
        finish_and_check(dst, live)


def test_local_ping_pong_under_churn_keeps_memory_intact(guest_image, tmp_path):
    """A→B→C→D by local migration while the guest allocates and frees flat out:
    every hop punches the pages free at its pause, and no page the guest uses is lost."""
    vm = memfd_vm("workload=churn pages=20000 rounds=100000 free=50", r"^churn: round \d+")
    procs = [vm]
    try:
        for hop in range(3):
            path = str(tmp_path / f"hop{hop}.sock")
            nxt = local_destination(path)
            procs.append(nxt)
            n = len(vm.stdout_lines)
            vm.wait_for(r"^churn: round \d+", timeout=60)
            s = migrate_local(vm, path)
            assert s["status"] == "completed", (s, vm.output(), nxt.output())
            assert pages_transferred(s) == 0
            assert vm.wait(30) == 0
            assert not error_lines(vm.stdout_lines[n:])
            vm = nxt
        k = len(vm.stdout_lines)
        vm.wait_for(r"^churn: round \d+", timeout=60)
        while len([l for l in vm.stdout_lines[k:] if l.startswith("churn: round")]) < 3:
            time.sleep(0.1)                        # a few rounds verified after the last hop
        vm.execute("quit")
        vm.wait(30)
        bad = [l for p in procs for l in error_lines(p.stdout_lines)]
        assert not bad, bad
        assert all("free pages punched out" in "\n".join(p.stderr_lines) for p in procs[1:])
    finally:
        for p in procs:
            p.kill()


def test_smp_guest_migrates_locally(guest_image, tmp_path):
    """Two vCPUs, both writing and checking their memory: every vCPU's state and the
    interrupt controller go with STATE, the RAM with the memfd, and the guest's
    self-check passes at the destination.  Driven by `kvmlite migrate --local`."""
    path = str(tmp_path / "smp.sock")
    dst = local_destination(path)
    src = memfd_vm("workload=fill live=20 stale=30 dirty=500", r"^fill: ready", extra=["--smp", "2"])
    live = int(src.wait_for(r"^fill: ready live=(\d+)").group(1))
    with src, dst:
        out = subprocess.run([sys.executable, "-m", "kvmlite", "migrate", "--monitor", src.monitor_path,
                              f"unix:{path}", "--local", "--json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, (out.stderr, src.output(), dst.output())
        s = json.loads(out.stdout)
        assert s["status"] == "completed", (s, src.output(), dst.output())
        assert pages_transferred(s) == 0
        assert src.wait(30) == 0
        assert len(dst.execute("x-query-vcpus")) == 2
        finish_and_check(dst, live)


@pytest.mark.parametrize("point", ["dst:local:mapped", "dst:state", "dst:end", "dst:restored"])
def test_destination_dying_before_ready_leaves_the_source_to_resume(guest_image, tmp_path, point):
    """The destination is killed after it mapped the RAM and before it said READY:
    the source resumes on its own, its memory whole (nothing was punched), and a
    later local migration succeeds with the guest's self-check passing."""
    path = str(tmp_path / "in.sock")
    dst = local_destination(path, faults=[f"{point}=kill"])
    src = memfd_vm("workload=fill live=30 stale=30 dirty=500", r"^fill: ready")
    live = int(src.wait_for(r"^fill: ready live=(\d+)").group(1))
    with src, dst:
        s = migrate_local(src, path)
        assert s["status"] == "failed" and s["error-desc"], s
        assert src.execute("query-status")["status"] == "running"
        assert dst.wait(30) != 0
        again = local_destination(str(tmp_path / "again.sock"))
        with again:
            s = migrate_local(src, str(tmp_path / "again.sock"))
            assert s["status"] == "completed", s
            assert src.wait(30) == 0
            finish_and_check(again, live)


def test_destination_dying_after_ready_the_operator_resumes_the_source(guest_image, tmp_path):
    """Killed after READY (COMMIT may have arrived): the source stays paused,
    unresolved, as in any migration.  The punch waits for COMMIT, which this
    destination never read: `resolve source` resumes the guest with its memory whole."""
    path = str(tmp_path / "in.sock")
    dst = local_destination(path, faults=["dst:ready=kill"])
    src = memfd_vm("workload=fill live=30 stale=30 dirty=500", r"^fill: ready")
    live = int(src.wait_for(r"^fill: ready live=(\d+)").group(1))
    with src, dst:
        s = migrate_local(src, path)
        assert s["status"] == "unresolved", s
        src.execute("x-migrate-resolve", owner="source")
        assert src.execute("query-status")["status"] == "running"
        finish_and_check(src, live)


def test_local_needs_memfd_ram_and_a_unix_socket(guest_image, tmp_path):
    """x-local refuses a VM whose RAM is anonymous memory, and a tcp: target; the VM runs on."""
    vm = VmProcess([str(guest_image), "--memory", "64M", "--cmdline", "workload=fill live=10 dirty=100"])
    with vm:
        vm.wait_for(r"^fill: ready", timeout=60)
        with vm.client() as c:
            assert c.execute("query-memdev")[0]["x-backend"] == "memory-backend-ram"
            c.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "x-local", "state": True}]})
            with pytest.raises(QmpCommandError, match="--memory-backend memfd"):
                c.execute("migrate", {"uri": f"unix:{tmp_path}/x.sock"})
            with pytest.raises(QmpCommandError, match="unix:PATH"):
                c.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
            assert c.execute("query-status")["status"] == "running"


def test_memfd_ram_migrates_live_over_tcp_and_unix(guest_image, tmp_path):
    """KVM and dirty logging work on memfd RAM: a live TCP migration with the hint
    sends only the active pages to a destination; from there a copying (not --local)
    migration over a unix socket sends them again, and the guest passes."""
    port = free_port()
    dst = start_destination(port, MEMORY)
    src = memfd_vm("workload=fill live=20 stale=50 dirty=2000", r"^fill: ready")
    live = int(src.wait_for(r"^fill: ready live=(\d+)").group(1))
    with src, dst:
        s = migrate(src, port)
        assert s["status"] == "completed", (s, dst.output())
        assert len(s["x-rounds"]) >= 2 and s["ram"]["x-skipped-free"] >= 0.45 * 65536
        assert live <= pages_transferred(s) < live + 0.05 * 65536
        assert src.wait(30) == 0
        path = str(tmp_path / "copy.sock")
        third = local_destination(path)
        with third:
            s = migrate(dst, f"unix:{path}")
            assert s["status"] == "completed", (s, third.output())
            assert live <= pages_transferred(s) < live + 0.05 * 65536
            assert dst.wait(30) == 0
            finish_and_check(third, live)
