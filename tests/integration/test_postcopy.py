"""Post-copy migration between two `kvmlite run` processes, driven by `kvmlite migrate`.

What a user checks: the guest's own self-check on the destination (churn
verifies every live page each round and reports `corrupted=`), the exit
status of every process, and the figures `kvmlite migrate --json` and the
destination's query-migrate print.  A page that was free at the switch and
that the guest takes afterwards is resolved on the destination with a zero
page: it is never requested, on either side's count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kvmlite.procs import VmProcess, free_port, start_destination

from .helpers import FINAL, GUEST, ROOT, Relay, fill_vm, finish_and_check, kvmlite

pytestmark = pytest.mark.slow

CHURN = "workload=churn pages=6000 rounds=0 free=50"


def churn_vm(memory: str = "256M", extra=()) -> VmProcess:
    """The churn guest, allocating, freeing and verifying pages flat out until told to stop."""
    vm = VmProcess([str(GUEST), "--memory", memory, "--cmdline", CHURN, *extra])
    vm.wait_for(r"^churn: pages=", timeout=60)
    return vm


def migrate_cli(src: VmProcess, uri: str, *args: str, timeout: float = 180):
    """`kvmlite migrate --monitor SRC URI ARGS --json`: (exit status, final stats, stderr)."""
    r = kvmlite("migrate", "--monitor", src.monitor_path, uri, "--json", *args, timeout=timeout)
    try:
        stats = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from kvmlite migrate (rc {r.returncode}):\n{r.stdout}\n{r.stderr}") from None
    return r.returncode, stats, r.stderr


def finish(dst: VmProcess) -> dict:
    """Stop the churn on the destination: it verifies every live page once more and exits 0."""
    dst.execute("guest-finish")
    assert dst.wait(120) == 0, dst.output()
    s = dst.summary()
    assert s["status"] == "ok" and s["errors"] == 0 and s["corrupted"] == 0, s
    return s


def check_counted_on_both_sides(s: dict, dst: VmProcess) -> tuple[dict, dict]:
    """Every page still to come arrived; faults on pages free at the switch were
    resolved at the destination, and none was asked of the source."""
    pc = s["postcopy"]
    d = dst.execute("query-migrate")
    assert d["status"] == "running" and d["incoming"], d
    dpc = d["postcopy"]
    assert pc["destination"]["faults_zero_free"] == dpc["faults_zero_free"]
    assert pc["pages_pending"] == dpc["pages_pending"] > 0 and dpc["pages_left"] == 0
    assert pc["pages_pushed"] + pc["pages_on_request"] >= pc["pages_pending"]
    # the churning guest took free pages after the switch: each one a local zero page
    assert dpc["faults_zero_free"] > 0
    # ... and the source never saw a request for one, nor for a page it never promised
    assert pc["requests_for_free"] == 0 and pc["requests_not_pending"] == 0
    return pc, dpc


def test_postcopy_now_the_guest_runs_on_and_free_pages_are_never_requested():
    src = churn_vm()
    port = free_port()
    dst = start_destination(port)
    with src, dst:
        rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port}", "--postcopy-now")
        assert rc == 0 and s["status"] == "completed", (s, err)
        assert s["rounds"] == 0 and s["postcopy"]["switch"].startswith("at once")
        pc, dpc = check_counted_on_both_sides(s, dst)
        # one link: every remote fault was one request the source read
        assert dpc["faults_remote"] == pc["requests"]
        assert dpc["remote_latency_us"]["n"] == dpc["faults_remote"]
        assert src.wait(30) == 0
        # the page map: pages by how they came, as the destination saw them
        states = dst.execute("query-pagemap")["postcopy"]
        assert states is not None
        finish(dst)


def test_precopy_that_does_not_converge_switches_to_postcopy():
    """Under a bandwidth limit the churning guest dirties pages as fast as the rounds
    send them: pre-copy stops converging, and --postcopy switches instead of throttling."""
    src = churn_vm()
    port = free_port()
    dst = start_destination(port)
    with src, dst:
        rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port}", "--postcopy", "--bandwidth", "40M",
                                 "--downtime-ms", "1")
        assert rc == 0 and s["status"] == "completed", (s, err)
        assert s["rounds"] >= 2 and s["postcopy"]["switch"].startswith("not converging"), s["postcopy"]
        assert s["throttle_pct"] == 0                  # switched, never slowed the guest
        check_counted_on_both_sides(s, dst)
        assert src.wait(30) == 0
        finish(dst)


def test_migrate_start_postcopy_switches_a_running_precopy():
    """The monitor's migrate-start-postcopy, as QEMU's: a slow pre-copy round is cut
    short between chunks and the guest moves."""
    src = churn_vm("512M")
    port = free_port()
    dst = start_destination(port)
    with src, dst:
        c = src.client()
        c.execute("migrate", uri=f"tcp:127.0.0.1:{port}", postcopy=True, bandwidth="4M",
                  **{"max-rounds": 50})
        deadline = time.monotonic() + 30
        while c.execute("query-migrate")["bytes_wire"] < (1 << 20):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c.execute("migrate-start-postcopy")
        while (s := c.execute("query-migrate"))["status"] not in FINAL:
            assert time.monotonic() < deadline + 60, s
            time.sleep(0.05)
        c.close()
        assert s["status"] == "completed", s
        assert s["postcopy"]["switch"].startswith("asked"), s["postcopy"]
        # the first round (24 MiB of live pages at 4 MiB/s) was cut short between chunks
        assert s["rounds"] == 0 and s["pages_sent"] > 0, s
        check_counted_on_both_sides(s, dst)
        assert src.wait(30) == 0
        finish(dst)


def _wait_status(vm: VmProcess, want: str, timeout: float = 60) -> dict:
    c = vm.client()
    try:
        deadline = time.monotonic() + timeout
        while (s := c.execute("query-migrate"))["status"] != want:
            assert time.monotonic() < deadline, f"wanted {want}: {s}"
            time.sleep(0.05)
        return s
    finally:
        c.close()


# The fill guest: 20 % of RAM live, re-written slowly (500 pages/s), so after the
# switch its pages mostly come by the push, which a bandwidth limit keeps going
# for seconds: time to cut the link mid-way.
FILL = {"live": 20, "stale": 50, "dirty": 500}
SLOW = "8M"


def _wait_postcopy_midway(src: VmProcess) -> dict:
    """Until the source serves post-copy pages and many are still to send."""
    c = src.client()
    try:
        deadline = time.monotonic() + 60
        while True:
            s = c.execute("query-migrate")
            pc = s.get("postcopy") or {}
            if s["status"] == "postcopy-active" and pc.get("pages_pushed", 0) > 500:
                assert pc["pages_left"] > 1000, "the push is nearly done: too late to cut"
                return s
            assert s["status"] not in FINAL and time.monotonic() < deadline, s
            time.sleep(0.02)
    finally:
        c.close()


def test_a_cut_link_pauses_both_halves_and_resume_finishes(tmp_path):
    """Keyed link (page tags on every post-copy record) through a relay; the relay is
    cut mid-push: both sides go to postcopy-paused and keep their halves, the guest
    keeps running on the pages it has; `kvmlite migrate --resume` reconnects (new
    handshake, new keys), the destination says which pages it still needs, and the
    migration completes with the guest's self-check passing."""
    key = tmp_path / "key"
    key.write_text("a key the two VMMs share, 32 bytes+\n")
    os.chmod(key, 0o600)
    src, fill = fill_vm(**FILL, extra=["--auth-key", str(key)])
    port = free_port()
    dst = start_destination(port, extra=["--auth-key", str(key)])
    relay = Relay(port)
    with src, dst:
        c = src.client()
        c.execute("migrate", uri=f"tcp:127.0.0.1:{relay.port}", postcopy=True,
                  **{"postcopy-now": True}, bandwidth=SLOW)
        c.close()
        _wait_postcopy_midway(src)
        relay.cut()
        s = _wait_status(src, "postcopy-paused")
        assert "post-copy link broken" in s["error"]
        _wait_status(dst, "postcopy-paused")
        # the source will not resume the guest: its newer state is at the destination
        refused = src.client()
        with pytest.raises(Exception, match="cannot resume it"):
            refused.execute("x-migrate-resolve", owner="source")
        with pytest.raises(Exception, match="not ours to undo"):
            refused.execute("cont")
        refused.close()
        # the destination waits on its own address; migrate-recover moves it (QEMU's name)
        port2 = free_port()
        dst.execute("migrate-recover", uri=f"tcp:127.0.0.1:{port2}")
        rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port2}", "--resume")
        assert rc == 0 and s["status"] == "completed", (s, err)
        pc = s["postcopy"]
        assert pc["recoveries"] == 1 and pc["connections"] == 2
        assert 0 < pc["pages_needed_at_recovery"] < pc["pages_pending"]
        assert pc["requests_for_free"] == 0 and pc["requests_not_pending"] == 0
        d = dst.execute("query-migrate")
        assert d["status"] == "running" and len(d["postcopy"]["recoveries_ms"]) == 1
        assert src.wait(30) == 0
        finish_and_check(dst, fill["live"])


def test_a_destination_killed_after_the_switch_loses_the_vm_and_the_source_refuses_to_resume():
    """As with QEMU: after the switch the VM is split.  The destination dies; the source
    pauses, a resume finds nobody, and the source refuses to run the guest itself."""
    src, _ = fill_vm(**FILL)
    port = free_port()
    dst = start_destination(port)
    with src, dst:
        c = src.client()
        c.execute("migrate", uri=f"tcp:127.0.0.1:{port}", postcopy=True, **{"postcopy-now": True},
                  bandwidth=SLOW)
        c.close()
        _wait_postcopy_midway(src)
        dst.proc.send_signal(signal.SIGKILL)
        dst.wait(30)
        s = _wait_status(src, "postcopy-paused")
        rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port}", "--resume", timeout=60)
        assert rc == 1 and s["status"] == "postcopy-paused", s
        assert "recovery failed" in s["error"] and "nothing listens" in s["error"], s
        r = kvmlite("migrate", "--monitor", src.monitor_path, "--resolve", "source")
        assert r.returncode == 1 and "cannot resume it" in r.stderr, r.stderr
        assert src.execute("query-status")["status"] == "paused"
        src.execute("quit")
        assert src.wait(30) == 0
    assert "the VM is lost" in " ".join(kvmlite("migrate", "--help").stdout.split())


def test_a_fresh_destination_refuses_to_resume_what_it_never_had():
    """A new `kvmlite run --incoming` on the dead destination's port is not the VM's
    other half: it refuses the resume, and the source stays paused."""
    src, _ = fill_vm(**FILL)
    port = free_port()
    dst = start_destination(port)
    with src, dst:
        c = src.client()
        c.execute("migrate", uri=f"tcp:127.0.0.1:{port}", postcopy=True, **{"postcopy-now": True},
                  bandwidth=SLOW)
        c.close()
        _wait_postcopy_midway(src)
        dst.kill()
        _wait_status(src, "postcopy-paused")
        fresh = start_destination(port)
        with fresh:
            rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port}", "--resume", timeout=60)
            assert rc == 1 and s["status"] == "postcopy-paused", s
            assert "refused" in s["error"] or "closed" in s["error"], s
            assert fresh.wait(30) == 1
            assert not fresh.stdout_lines, "the fresh destination must not run a guest"
        src.execute("quit")
        src.wait(30)


def test_postcopy_soak_many_migrations_no_page_lost():
    """`python -m kvmlite.soak --postcopy`: the churning guest moved by post-copy again
    and again (each destination becomes the next source); 0 corrupted pages, and no
    page free at a switch ever requested."""
    r = subprocess.run([sys.executable, "-m", "kvmlite.soak", "--postcopy", "--migrations", "10",
                        "--memory", "256M", "--pages", "6000", "--json"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["completed"] == 10 and out["corrupted_pages"] == 0 and out["guest_errors"] == 0
    assert out["postcopy_requests_for_free"] == 0 and out["postcopy_faults_zero_free"] > 0
