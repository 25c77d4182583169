"""Post-copy migration between two `kvmlite run` processes, driven by `kvmlite migrate`.

What a user checks: the guest's own self-check on the destination (churn
verifies every live page each round and reports `corrupted=`), the exit
status of every process, and the figures both monitors' query-migrate give
(`kvmlite migrate --json` prints the source's last one): QEMU's postcopy-*
members and kvmlite's x-postcopy.  A page that was free at the switch and
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

from kvmlite import exitcodes
from kvmlite.control.client import QmpCommandError
from kvmlite.procs import VmProcess, free_port, start_destination

from .helpers import FINAL, GUEST, ROOT, Relay, begin, fill_vm, finish_and_check, kvmlite

pytestmark = pytest.mark.slow

CHURN = "workload=churn pages=6000 rounds=0 free=50"


def churn_vm(memory: str = "256M", extra=()) -> VmProcess:
    """The churn guest, allocating, freeing and verifying pages flat out until told to stop."""
    vm = VmProcess([str(GUEST), "--memory", memory, "--cmdline", CHURN, *extra])
    vm.wait_for(r"^churn: pages=", timeout=60)
    return vm


def migrate_cli(src: VmProcess, uri: str, *args: str, timeout: float = 180):
    """`kvmlite migrate --monitor SRC URI ARGS --json`: (exit status, the last
    query-migrate, stderr)."""
    r = kvmlite("migrate", "--monitor", src.monitor_path, uri, "--json", *args, timeout=timeout)
    try:
        stats = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from kvmlite migrate (rc {r.returncode}):\n{r.stdout}\n{r.stderr}") from None
    return r.returncode, stats, r.stderr


def finish(dst: VmProcess) -> dict:
    """Stop the churn on the destination: it verifies every live page once more and exits 0."""
    dst.execute("x-guest-finish")
    assert dst.wait(120) == 0, dst.output()
    s = dst.summary()
    assert s["status"] == "ok" and s["errors"] == 0 and s["corrupted"] == 0, s
    return s


def check_counted_on_both_sides(s: dict, dst: VmProcess) -> tuple[dict, dict]:
    """Every page still to come arrived; faults on pages free at the switch were
    resolved at the destination, and none was asked of the source."""
    pc = s["x-postcopy"]
    d = dst.execute("query-migrate")
    assert d["status"] == "completed", d
    dpc = d["x-postcopy-incoming"]
    assert pc["destination"]["faults-zero-free"] == dpc["faults-zero-free"]
    assert pc["pages-pending"] == dpc["pages-pending"] > 0 and dpc["pages-left"] == 0
    assert pc["pages-pushed"] + pc["pages-on-request"] >= pc["pages-pending"]
    # the churning guest took free pages after the switch: each one a local zero page
    assert dpc["faults-zero-free"] > 0
    # ... and the source never saw a request for one, nor for a page it never promised
    assert pc["requests-for-free"] == 0 and pc["requests-not-pending"] == 0
    # QEMU's members: the bytes after the switch, and (one vCPU) how long it waited
    assert s["ram"]["postcopy-bytes"] > 0 and d["ram"]["postcopy-bytes"] > 0
    assert s["postcopy-blocktime"] == d["postcopy-blocktime"] == round(dpc["remote-wait-ms"])
    return pc, dpc


def test_postcopy_now_the_guest_runs_on_and_free_pages_are_never_requested():
    src = churn_vm()
    port = free_port()
    dst = start_destination(port)
    with src, dst:
        rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port}", "--postcopy-now")
        assert rc == 0 and s["status"] == "completed", (s, err)
        assert s["x-rounds"] == [] and s["x-postcopy"]["switch"].startswith("at once")
        assert s["ram"]["precopy-bytes"] < 64 << 10          # the header: no page before the switch
        pc, dpc = check_counted_on_both_sides(s, dst)
        # one link: every remote fault was one request the source read
        assert dpc["faults-remote"] == s["ram"]["postcopy-requests"]
        assert dpc["remote-latency-us"]["n"] == dpc["faults-remote"]
        assert src.wait(30) == 0
        # the page map: pages by how they came, as the destination saw them
        from kvmlite.control.arraycodec import decode_array
        states = decode_array(dst.execute("x-query-pagemap")["postcopy-state"])
        assert len(states) == 256 << 8 and states.any()
        finish(dst)


def test_postcopy_to_a_memfd_destination_is_refused_before_anything_moves():
    """A destination whose RAM is a memfd does not offer post-copy (a dropped stale copy
    would stay in the memfd, read without a fault): the source is refused at once and
    keeps running its guest; pre-copy to such a destination completes."""
    src, fill = fill_vm("256M")
    port = free_port()
    dst = start_destination(port, "256M", extra=["--memory-backend", "memfd"])
    with src, dst:
        rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port}", "--postcopy-now")
        assert rc != 0 and s["status"] == "failed", (s, err)
        assert "cannot take a post-copy migration" in s["error-desc"], s
        assert src.execute("query-status")["status"] == "running"
        dst.wait_for("post-copy not offered: its RAM is a memfd", timeout=10, stream="stderr")
        assert dst.wait(30) != 0 and not dst.stdout_lines, "the destination never ran the guest"
        port2 = free_port()
        dst2 = start_destination(port2, "256M", extra=["--memory-backend", "memfd"])
        with dst2:
            rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port2}")
            assert rc == 0 and s["status"] == "completed", (s, err)
            assert src.wait(30) == 0
            finish_and_check(dst2, fill["live"])


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
        assert len(s["x-rounds"]) >= 2, s
        assert s["x-postcopy"]["switch"].startswith("not converging"), s["x-postcopy"]
        assert "cpu-throttle-percentage" not in s      # switched, never slowed the guest
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
        with src.client() as events:
            events.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": "events", "state": True}]})
            c = begin(src, port, postcopy=True, bandwidth=4 << 20, max_rounds=50)
            deadline = time.monotonic() + 30
            while (c.execute("query-migrate").get("ram") or {}).get("transferred", 0) < (1 << 20):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            c.execute("migrate-start-postcopy")
            while (s := c.execute("query-migrate"))["status"] not in FINAL:
                assert time.monotonic() < deadline + 60, s
                time.sleep(0.05)
            statuses: list[str] = []
            while "completed" not in statuses:      # each change, as the source saw it
                statuses += [e["data"]["status"] for e in events.events("MIGRATION")]
                assert time.monotonic() < deadline + 70, statuses
                time.sleep(0.01)
            c.execute("quit")                    # the source is in postmigrate
            c.close()
        assert s["status"] == "completed", s
        assert s["x-postcopy"]["switch"].startswith("asked"), s["x-postcopy"]
        # the first round (24 MiB of live pages at 4 MiB/s) was cut short between chunks
        assert s["x-rounds"] == [] and s["ram"]["precopy-bytes"] >= 1 << 20, s
        assert statuses == ["setup", "active", "device", "handover", "postcopy-active", "completed"]
        check_counted_on_both_sides(s, dst)
        assert src.wait(30) == 0
        finish(dst)


def test_postcopy_after_rounds_to_a_prefaulted_destination_keeps_what_precopy_sent():
    """A destination with --memory (RAM pre-faulted: any page may be present) drops
    the stale copies of the pages still to come at the switch, and nothing else: the
    pages pre-copy sent and the guest has not touched since stay, its free-page
    bitmap among them."""
    src, fill = fill_vm(live=20, stale=50, dirty=2000)
    port = free_port()
    dst = start_destination(port, "256M")
    with src, dst:
        # 32 MiB/s: neither round leaves little enough for the 5 ms downtime limit
        rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port}", "--postcopy-after", "2",
                                 "--bandwidth", "32M")
        assert rc == 0 and s["status"] == "completed", (s, err)
        assert len(s["x-rounds"]) == 2 and s["x-postcopy"]["switch"].startswith("after 2 rounds")
        d = dst.execute("query-migrate")["x-postcopy-incoming"]
        assert d["faults-zero-other"] == 0, d        # no page the guest uses read back as zeros
        assert src.wait(30) == 0
        finish_and_check(dst, fill["live"])


def _wait_status(vm: VmProcess, want: str, timeout: float = 60) -> dict:
    with vm.client() as c:
        deadline = time.monotonic() + timeout
        while (s := c.execute("query-migrate")).get("status") != want:
            assert time.monotonic() < deadline, f"wanted {want}: {s}"
            time.sleep(0.05)
        return s


# The fill guest: 20 % of RAM live, re-written slowly (500 pages/s), so after the
# switch its pages mostly come by the push, which a bandwidth limit keeps going
# for seconds: time to cut the link mid-way.
FILL = {"live": 20, "stale": 50, "dirty": 500}
SLOW = 8 << 20                   # bytes/s


def _begin_postcopy_now(src: VmProcess, uri_port: int) -> None:
    """postcopy-ram and x-postcopy-now on a slow link, then migrate."""
    begin(src, uri_port, postcopy=True, postcopy_now=True, bandwidth=SLOW).close()


def _wait_postcopy_midway(src: VmProcess) -> dict:
    """Until the source serves post-copy pages and many are still to send."""
    with src.client() as c:
        deadline = time.monotonic() + 60
        while True:
            s = c.execute("query-migrate")
            pc = s.get("x-postcopy") or {}
            if s["status"] == "postcopy-active" and pc.get("pages-pushed", 0) > 500:
                assert pc["pages-left"] > 1000, "the push is nearly done: too late to cut"
                return s
            assert s["status"] not in FINAL and time.monotonic() < deadline, s
            time.sleep(0.02)


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
        _begin_postcopy_now(src, relay.port)
        _wait_postcopy_midway(src)
        relay.cut()
        s = _wait_status(src, "postcopy-paused")
        assert "post-copy link broken" in s["error-desc"]
        _wait_status(dst, "postcopy-paused")
        assert dst.execute("query-status")["status"] == "running"     # on the pages it has
        # the source will not resume the guest: its newer state is at the destination
        with src.client() as refused:
            with pytest.raises(QmpCommandError, match="cannot resume it"):
                refused.execute("x-migrate-resolve", {"owner": "source"})
            with pytest.raises(QmpCommandError, match="since the switch to post-copy"):
                refused.execute("cont")
        # the destination waits on its own address; migrate-recover moves it (QEMU's name)
        port2 = free_port()
        dst.execute("migrate-recover", uri=f"tcp:127.0.0.1:{port2}")
        rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port2}", "--resume")
        assert rc == 0 and s["status"] == "completed", (s, err)
        pc = s["x-postcopy"]
        assert pc["recoveries"] == 1 and pc["connections"] == 2
        assert 0 < pc["pages-needed-at-recovery"] < pc["pages-pending"]
        assert pc["requests-for-free"] == 0 and pc["requests-not-pending"] == 0
        d = dst.execute("query-migrate")
        assert d["status"] == "completed" and len(d["x-postcopy-incoming"]["recoveries-ms"]) == 1
        assert src.wait(30) == 0
        finish_and_check(dst, fill["live"])


def test_a_destination_killed_after_the_switch_loses_the_vm_and_the_source_refuses_to_resume():
    """As with QEMU: after the switch the VM is split.  The destination dies; the source
    pauses, a resume finds nobody, and the source refuses to run the guest itself."""
    src, _ = fill_vm(**FILL)
    port = free_port()
    dst = start_destination(port)
    with src, dst:
        _begin_postcopy_now(src, port)
        _wait_postcopy_midway(src)
        dst.proc.send_signal(signal.SIGKILL)
        dst.wait(30)
        s = _wait_status(src, "postcopy-paused")
        rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port}", "--resume", timeout=60)
        assert rc == exitcodes.PROTOCOL and s["status"] == "postcopy-paused", s
        assert "recovery failed" in s["error-desc"] and "nothing listens" in s["error-desc"], s
        assert "--resume" in err
        r = kvmlite("migrate", "--monitor", src.monitor_path, "--resolve", "source")
        assert r.returncode == exitcodes.TEMPFAIL and "cannot resume it" in r.stderr, r.stderr
        assert src.execute("query-status")["status"] == "finish-migrate"
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
        _begin_postcopy_now(src, port)
        _wait_postcopy_midway(src)
        dst.kill()
        _wait_status(src, "postcopy-paused")
        fresh = start_destination(port)
        with fresh:
            rc, s, err = migrate_cli(src, f"tcp:127.0.0.1:{port}", "--resume", timeout=60)
            assert rc == exitcodes.PROTOCOL and s["status"] == "postcopy-paused", s
            assert "refused" in s["error-desc"] or "closed" in s["error-desc"], s
            assert fresh.wait(30) == exitcodes.DATAERR       # a resume is not a stream
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
