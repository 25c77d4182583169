"""`kvmlite run --smp N`: the guest on several vCPUs, as a user runs it.

What is checked is what the guest itself reports: its per-CPU KVMLITE-CPU
lines, the totals on its KVMLITE-SUMMARY line, and its exit status.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from kvmlite import exitcodes

from .helpers import kvmlite, summary


def cpu_lines(stdout: str) -> dict[int, dict]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("KVMLITE-CPU "):
            fields = dict(kv.split("=", 1) for kv in line.split()[1:])
            out[int(fields["cpu"])] = {k: int(v) if v.isdigit() else v for k, v in fields.items()}
    return out


def test_churn_on_two_vcpus_passes_its_self_check(guest_image):
    """churn on 2 vCPUs: both CPUs allocate, write and verify pages in the one bitmap; no error, the bitmap count adds up."""
    r = kvmlite("run", str(guest_image), "--smp", "2", "--memory", "256M",
                "--cmdline", "workload=churn pages=4000 rounds=10")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    s = summary(r.stdout)
    assert s["status"] == "ok" and s["cpus"] == 2 and s["errors"] == 0 and s["corrupted"] == 0
    cpus = cpu_lines(r.stdout)
    assert set(cpus) == {0, 1}
    for c in cpus.values():
        # each CPU did a 1-CPU guest's work: 4000 slots refilled over 10 rounds
        assert c["pages_written"] >= 4000 + 9 * 2000 and c["verified"] >= c["pages_written"] - 4000
        assert c["errors"] == 0 and c["live"] == 2000
    assert cpus[1]["started_by"] == "cpustart"
    assert s["pages_written"] == cpus[0]["pages_written"] + cpus[1]["pages_written"]
    assert "guest: ERROR" not in r.stdout


@pytest.mark.parametrize("how,shown", [("pv", "cpu-start device"), ("sipi", "INIT-SIPI")])
def test_aps_start_both_ways(guest_image, how, shown):
    """The same image starts its CPUs with the CPU-start device or with INIT-SIPI-SIPI (smpboot=sipi)."""
    r = kvmlite("run", str(guest_image), "--smp", "3", "--cmdline", f"workload=hello smpboot={how}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert re.search(r"^smp: 3 of 3 CPUs online in \d+ us", r.stdout, re.MULTILINE), r.stdout
    for cpu in (1, 2):
        assert f"hello: CPU {cpu} up at CPL 3 (started by {shown})" in r.stdout
    assert summary(r.stdout)["status"] == "ok"


def test_lapic_timer_sleep_wakes_never_early(guest_image):
    """sleep on 2 vCPUs: every sleep ends by its own LAPIC timer interrupt, none before the deadline."""
    r = kvmlite("run", str(guest_image), "--smp", "2", "--cmdline", "workload=sleep ms=20 count=10")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    lines = re.findall(r"^sleep(?:\[1\])?: 10 sleeps of 20 ms with the LAPIC timer: late median (\d+) us, "
                       r"mean \d+ us, max \d+ us, early 0, timer interrupts (\d+)$", r.stdout, re.MULTILINE)
    assert len(lines) == 2, r.stdout
    assert all(int(irqs) == 10 for _, irqs in lines)
    s = summary(r.stdout)
    assert s["status"] == "ok" and s["elapsed_ms"] >= 200


def test_sleep_without_irqchip_uses_the_idle_device(guest_image):
    """On one vCPU (no irqchip) the same workload sleeps through the idle device instead, and still never early."""
    r = kvmlite("run", str(guest_image), "--cmdline", "workload=sleep ms=20 count=3")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^sleep: 3 sleeps of 20 ms with the idle device: .* early 0, timer interrupts 0$",
                     r.stdout, re.MULTILINE), r.stdout


def test_ipi_wakes_a_halted_cpu(guest_image):
    """ipi: CPU 1 halts with no timer armed; each of CPU 0's IPIs wakes it, and its LAPIC counts them."""
    r = kvmlite("run", str(guest_image), "--smp", "2", "--cmdline", "workload=ipi count=20")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert re.search(r"^ipi: 20 IPIs sent, 20 woke their CPU: latency median \d+ us", r.stdout,
                     re.MULTILINE), r.stdout
    assert cpu_lines(r.stdout)[1]["lapic_irqs"] == 20
    assert summary(r.stdout)["status"] == "ok"


def test_fill_shares_its_pages_and_dirtying_among_cpus(guest_image):
    """fill on 2 vCPUs: the same totals as on one, each CPU writing and checking half."""
    r = kvmlite("run", str(guest_image), "--smp", "2", "--memory", "128M",
                "--cmdline", "workload=fill live_pages=2000 stale=10 dirty=1000 seconds=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert re.search(r"^fill: ready live=2000 stale=\d+", r.stdout, re.MULTILINE), r.stdout
    cpus = cpu_lines(r.stdout)
    assert cpus[0]["live"] == cpus[1]["live"] == 1000
    assert summary(r.stdout)["status"] == "ok"


def test_smp_options_are_checked(guest_image):
    """--smp 0 and --smp 65 give one clear line, --smp with --gdb is accepted (its port is
    checked like any); more vCPUs than host CPUs says so."""
    for bad in ("0", "65"):
        r = kvmlite("run", str(guest_image), "--smp", bad)
        assert r.returncode == exitcodes.CONFIG and f"--smp {bad}" in r.stderr and "Traceback" not in r.stderr
    r = kvmlite("run", str(guest_image), "--smp", "2", "--gdb", "tcp:127.0.0.1:0x")
    assert r.returncode == exitcodes.CONFIG and "expected tcp:HOST:PORT" in r.stderr and "--smp" not in r.stderr
    n = (os.cpu_count() or 1) + 1
    r = kvmlite("run", str(guest_image), "--smp", str(n), "--cmdline", "workload=hello")
    assert r.returncode == 0, r.stderr
    assert f"{n} vCPUs on {n - 1} host CPUs: overcommitted" in r.stderr
    assert summary(r.stdout)["cpus"] == n


QEMU = shutil.which("qemu-system-x86_64")


@pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")
def test_same_image_starts_its_cpus_under_qemu(guest_image):
    """Under QEMU -smp 2 (Multiboot, no CPU-start device) the image starts CPU 1 with INIT-SIPI-SIPI and churns on both."""
    from bench.qemu import CPU
    r = subprocess.run([QEMU, "-accel", "kvm", "-cpu", CPU, "-smp", "2", "-m", "256M", "-nodefaults",
                        "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(guest_image),
                        "-append", "workload=churn pages=2000 rounds=3 cpus=2",
                        "-device", "isa-debug-exit,iobase=0x501,iosize=1", "-serial", "stdio"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == (0 << 1) | 1, r.stdout[-3000:] + r.stderr     # isa-debug-exit: (status << 1) | 1
    assert "(multiboot boot)" in r.stdout and "smp: 2 of 2 CPUs online" in r.stdout
    cpus = cpu_lines(r.stdout)
    assert cpus[1]["started_by"] == "sipi" and cpus[1]["verified"] > 0
    s = summary(r.stdout)
    assert s["status"] == "ok" and s["cpus"] == 2


def test_inspect_and_stats_report_every_vcpu(guest_image):
    """`kvmlite inspect --json` has registers and exits for each vCPU, each inside the image at
    CPL 3; `--stats` adds a line per vCPU."""
    import json

    from kvmlite.procs import VmProcess
    vm = VmProcess([str(guest_image), "--smp", "2", "--cmdline", "workload=churn pages=2000 rounds=0"])
    with vm:
        vm.wait_for(r"^smp: 2 of 2 CPUs online", timeout=60)
        out = kvmlite("inspect", "--monitor", vm.monitor_path, "--json")
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert [v["cpu-index"] for v in info["vcpus"]] == [0, 1]
        image = info["image"]
        for v in info["vcpus"]:
            regs = v["registers"]
            assert image["start"] <= regs["rip"] < image["end"] and regs["cs"]["selector"] & 3 == 3, v
            assert v["exits-total"] > 0
        assert info["exits-total"] == sum(v["exits-total"] for v in info["vcpus"])
    r = kvmlite("run", str(guest_image), "--smp", "2", "--stats", "--cmdline", "workload=churn pages=2000 rounds=2")
    assert r.returncode == 0, r.stderr
    per_cpu = [line for line in r.stderr.splitlines() if line.startswith("kvmlite: stats: vCPU ")]
    assert [line.split()[3].rstrip(":") for line in per_cpu] == ["0", "1"], r.stderr
