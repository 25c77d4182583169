"""Live migration of guests on several vCPUs, between real kvmlite processes.

What is checked is what the guest reports on the destination: each CPU's
KVMLITE-CPU line (its own self-check), the summary, the exit status, and the
lateness of its LAPIC-timer sleeps.  The destinations get no --smp: the vCPU
count arrives with the stream.
"""

from __future__ import annotations

import re
import time

import pytest

from kvmlite.procs import VmProcess, free_port, start_destination

from .helpers import GUEST, migrate
from .test_smp import cpu_lines


@pytest.mark.parametrize("log,dst_memory", [("bitmap", "512M"), ("ring", None)])
def test_a_guest_churning_on_two_cpus_migrates_and_each_cpu_checks_out(guest_image, log, dst_memory):
    """Both CPUs allocate, fill and free pages in the one bitmap while it migrates (dirty
    bitmap, or the vCPUs' dirty rings); on the destination each CPU's own check passes,
    no page is corrupted, and both CPUs finished their share there.  The destination
    has RAM pre-faulted (--memory) or not, and no --smp either way."""
    port = free_port()
    dst = start_destination(port, dst_memory)
    src = VmProcess([str(GUEST), "--smp", "2", "--memory", "512M",
                     "--cmdline", "workload=churn pages=6000 rounds=0 free=50",
                     *(["--dirty-ring"] if log == "ring" else [])])
    with src, dst:
        src.wait_for(r"^churn: pages=6000", timeout=60)
        time.sleep(0.3)                                  # both CPUs are churning
        s = migrate(src, port)
        assert s["status"] == "completed", s
        assert s["x-dirty-log"] == log and len(s["x-rounds"]) >= 2, s
        assert src.wait(30) == 0, src.output()
        dst.execute("x-guest-finish")
        assert dst.wait(120) == 0, dst.output()
        out = "\n".join(dst.stdout_lines)
        summary = dst.summary()
        assert summary["status"] == "ok" and summary["cpus"] == 2, summary
        assert summary["corrupted"] == 0 and summary["errors"] == 0, summary
        cpus = cpu_lines(out)
        assert set(cpus) == {0, 1}, out[-3000:]
        for c in cpus.values():
            assert c["errors"] == 0 and c["corrupted"] == 0 and c["live"] == 3000, c   # free=50
            assert c["verified"] >= 6000, c
        print(f"\n{log}: {len(s['x-rounds'])} rounds, {s['ram']['normal'] + s['ram']['duplicate']} pages, "
              f"downtime {s['x-downtime-ms']:.2f} ms {s['x-downtime-parts']}")


SLEEP = re.compile(r"^(sleep(?:\[1\])?): (\d+) sleeps of (\d+) ms with the LAPIC timer: late median (\d+) us, "
                   r"mean \d+ us, max (\d+) us, early (\d+), timer interrupts (\d+)$", re.MULTILINE)
LATE_BOUND_US = 100_000      # generous: a shared host; the figure is printed


def test_a_guest_sleeping_on_its_lapic_timer_wakes_on_time_at_the_destination(guest_image):
    """Both CPUs sleep 400 ms at a time on their TSC-deadline timers, halted; the guest
    migrates mid-sleep.  On the destination every sleep still ends by its own timer
    interrupt, none early, and the latest wake-up is within a generous bound."""
    port = free_port()
    dst = start_destination(port)
    src = VmProcess([str(GUEST), "--smp", "2", "--cmdline", "workload=sleep ms=400 count=5"])
    with src, dst:
        src.wait_for(r"^smp: 2 of 2 CPUs online", timeout=60)
        time.sleep(0.6)                                  # into the second sleep
        s = migrate(src, port)
        assert s["status"] == "completed", s
        assert src.wait(30) == 0, src.output()
        assert dst.wait(60) == 0, dst.output()
        out = "\n".join(dst.stdout_lines)
    lines = SLEEP.findall(out)
    assert sorted(line[0] for line in lines) == ["sleep", "sleep[1]"], out[-3000:]
    for who, n, ms, _median, late_max, early, irqs in lines:
        assert (n, ms, early, irqs) == ("5", "400", "0", "5"), (who, out[-2000:])
        assert int(late_max) < LATE_BOUND_US, (who, late_max)
    worst = max(int(line[4]) for line in lines)
    print(f"\nmigrated mid-sleep (downtime {s['x-downtime-ms']:.2f} ms, {s['x-downtime-parts']}): "
          f"latest wake-up {worst} us late; medians {[int(line[3]) for line in lines]} us")
    assert dst.summary()["status"] == "ok"
