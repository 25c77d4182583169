"""Migration that loses nothing: peers killed or stopped at every stage, and cancel at every stage."""

from __future__ import annotations

import signal
import time

import pytest

from kvmlite import exitcodes
from kvmlite.procs import VmProcess, free_port, start_destination

from tests.harness import vmm_command

from .helpers import FINAL, begin, fill_vm, finish_and_check, migrate

MEMORY = "64M"
# busy_vm dirties 20,000 pages/s: every pre-copy round finds pages to send,
# so each named point inside a round is reached.
# downtime 0: never converges early, so the source runs all four pre-copy rounds
LIVE = {"downtime_ms": 0, "max_rounds": 4}
# ... and rounds of ~0.4 s each (50 MiB/s), so that even a guest starved of CPU
# by a loaded host dirties pages in round 3: a round that finds nothing dirty
# would end the migration early, converged
SLOW = {**LIVE, "bandwidth": 50 << 20}


def busy_vm(*faults: str, extra=()) -> tuple[VmProcess, int]:
    """A small fill guest dirtying 20,000 pages/s (its VMM through the harness with
    `faults`, POINT=ACTION): (the process, its live pages)."""
    vm, fill = fill_vm(MEMORY, live=30, stale=40, dirty=20000, faults=faults, extra=extra)
    return vm, fill["live"]


FILL_ARGS = ["--memory", MEMORY, "--cmdline", "workload=fill live=30 stale=40 dirty=20000"]


# Ten points in the destination's life (docs/reliability.md), and how the migration runs.
DEST_POINTS = [
    ("dst:accepted", LIVE),          # TCP accepted, before the handshake
    ("dst:handshake", LIVE),         # handshake done, before the stream header
    ("dst:header", LIVE),            # header read, before any page
    ("dst:round:0:pages", LIVE),     # mid-round 1
    ("dst:round:1", LIVE),           # between rounds 1 and 2
    ("dst:round:2:pages", SLOW),     # mid-round 3, or a later one (LATER_ROUNDS)
    ("dst:round:0:pages", {"stop_copy": True}),   # during complete: the stop-copy pass
    ("dst:state", LIVE),             # device and vCPU state read, before END
    ("dst:end", LIVE),               # END checked, before the state is restored
    ("dst:restored", LIVE),          # state restored, before READY is sent
]


# A round finds no page dirty when the guest got no CPU since the last sync
# (a loaded host): its ":pages" point never comes.  "Mid-round 3" is then the
# first later pre-copy round, or the final pass, with pages.
LATER_ROUNDS = {"dst:round:2:pages": [f"dst:round:{n}:pages" for n in range(2, 6)]}


@pytest.mark.parametrize("point,how", DEST_POINTS,
                         ids=[f"{p}-{'stopcopy' if h.get('stop_copy') else 'live'}" for p, h in DEST_POINTS])
def test_destination_killed_at_each_point_source_resumes(point, how):
    """The destination is SIGKILLed at a point; the source resumes, and a second migration succeeds intact."""
    src, live = busy_vm()
    port = free_port()
    points = LATER_ROUNDS.get(point, [point])
    dst = start_destination(port, vmm=vmm_command([f"{p}=kill" for p in points]))
    with src, dst:
        s = migrate(src, port, **how)
        assert s["status"] == "failed" and s["error-desc"], s
        assert dst.wait(30) == -signal.SIGKILL, dst.output()
        said = "\n".join(dst.stderr_lines)
        assert any(f"test fault at {p}" in said for p in points), said
        assert not dst.stdout_lines, "the half-migrated guest must not have run"
        assert src.execute("query-status")["status"] == "running"
        src.wait_for("keeps running here", timeout=10, stream="stderr")    # stderr is read by a thread
        # ... and the VM can still leave: a second migration completes, memory intact
        port2 = free_port()
        dst2 = start_destination(port2)
        with dst2:
            s2 = migrate(src, port2, **how)
            assert s2["status"] == "completed", s2
            assert src.wait(30) == 0
            finish_and_check(dst2, live)


@pytest.mark.parametrize("action,message", [("kill", "truncated"), ("stop", "timed out")])
def test_source_killed_or_stopped_mid_stream_destination_never_runs_the_guest(action, message):
    """A source killed (or hung) after round 1: the destination exits with a clear error, guest not started."""
    src, _ = busy_vm(f"src:round:1={action}")
    port = free_port()
    dst = start_destination(port, extra=["--timeout", "2"])
    with src, dst:
        begin(src, port, **LIVE).close()
        assert dst.wait(60) == exitcodes.DATAERR
        err = "\n".join(dst.stderr_lines)
        assert message in err and "the guest was not started" in err, err
        assert "Traceback" not in err
        assert not dst.stdout_lines
        if action == "stop":
            assert src.proc.poll() is None       # still there, stopped
            src.proc.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("stage,dst_faults,src_faults,args", [
    ("setup", "dst:accepted=sleep:3", None, {}),             # waiting for the destination's HELLO
    ("active", None, None, {"bandwidth": 8 << 20}),          # mid pre-copy
    ("device", None, "src:paused=sleep:2", {}),              # the vCPUs are paused for the last pass
])
def test_cancel_at_each_stage_resumes_the_guest(stage, dst_faults, src_faults, args):
    """migrate_cancel in setup, in pre-copy and with the vCPU paused for completion: the guest runs on at the source."""
    src, live = busy_vm(*([src_faults] if src_faults else []))
    port = free_port()
    dst = start_destination(port, vmm=vmm_command([dst_faults] if dst_faults else []))
    with src, dst:
        c = begin(src, port, **args)
        deadline = time.monotonic() + 30
        while c.execute("query-migrate")["status"] != stage:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        c.execute("migrate_cancel")
        while (s := c.execute("query-migrate"))["status"] not in FINAL:
            time.sleep(0.01)
        assert s["status"] == "cancelled", s
        assert c.execute("query-status")["status"] == "running"
        c.close()
        if stage == "setup":
            # no VM state was sent: the destination refuses the dead peer and waits on
            dst.wait_for("refused a connection", stream="stderr")
            assert dst.proc.poll() is None
        else:
            assert dst.wait(30) == exitcodes.DATAERR
            assert "the guest was not started" in "\n".join(dst.stderr_lines)
        finish_and_check(src, live)
