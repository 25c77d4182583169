"""QEMU driven over QMP, for `make bench-qemu`: the same guest image and workloads as kvmlite.

QEMU boots guest/guest.bin with `-kernel` (Multiboot v1); the guest finds no
free-page-hint device there and runs without hints.  A migration here is two
QEMU processes on this machine, the destination started with `-incoming defer`,
both configured over QMP, the source told `migrate uri=tcp:127.0.0.1:PORT`.

Nothing is installed from here: without `qemu-system-x86_64` the bench says
how to get it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from kvmlite.procs import ChildProcess

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guest" / "guest.bin"

# kvm_pvm on the reference host aborts QEMU on plain `-cpu host` (it cannot set
# IA32_ARCH_CAPABILITIES); without that one feature QEMU runs.
CPU = "host,-arch-capabilities"
EXIT_PORT = 0x501                    # isa-debug-exit: QEMU's status is (byte << 1) | 1
UNLIMITED_BW = 100 << 30             # bytes/s: QEMU's default max-bandwidth (128 MiB/s) would throttle it

HOW_TO_INSTALL = """\
qemu-system-x86_64 was not found on PATH; the QEMU comparison needs it.
Install it from the distribution's packages, then run `make bench-qemu` again:
    Debian/Ubuntu:  sudo apt-get install qemu-system-x86
    Fedora/RHEL:    sudo dnf install qemu-system-x86-core
    Arch:           sudo pacman -S qemu-system-x86
(this bench installs nothing by itself; `python -m bench.qemu --only scaling`
runs the part without QEMU)"""


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else out.strip().splitlines()[0] if out.strip() else "?"


def connect_qmp(path: str, timeout: float = 30.0):
    """kvmlite's QMP client (the one the bench drives kvmlite with), connected to
    a QEMU's QMP socket once QEMU has created it."""
    from kvmlite.control.client import QmpClient, QmpClientError
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpClient(f"unix:{path}", timeout=60)
        except QmpClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class QemuVm(ChildProcess):
    """One qemu-system-x86_64 process: serial on its stdout, QMP on a unix socket."""

    def __init__(self, binary: str, memory_mib: int, cmdline: str, *, incoming: bool = False,
                 prealloc: bool = False, extra=(), smp: int = 1):
        fd, self.qmp_path = tempfile.mkstemp(prefix="kvmlite-qmp-", suffix=".sock")
        os.close(fd)
        os.unlink(self.qmp_path)
        args = [binary, "-accel", "kvm", "-cpu", CPU, "-m", f"{memory_mib}M",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(GUEST), "-append", cmdline,
                "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=1",
                "-serial", "stdio", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if prealloc:
            args.append("-mem-prealloc")
        if smp > 1:
            args += ["-smp", str(smp)]     # the guest starts CPU 1.. with INIT-SIPI-SIPI (cpus=N)
        if incoming:
            args += ["-incoming", "defer"]
        self._qmp = None
        super().__init__(args + list(extra))

    @property
    def lines(self) -> list[str]:
        """The guest's serial output."""
        return self.stdout_lines

    @property
    def qmp(self):
        if self._qmp is None:
            self._qmp = connect_qmp(self.qmp_path)
        return self._qmp

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for exit; returns the guest's exit byte (isa-debug-exit) or -1 if QEMU ended otherwise."""
        try:
            rc = super().wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"QEMU did not exit within {timeout} s:\n{self.output()}") from None
        return rc >> 1 if rc > 0 and rc & 1 else -1

    def kill(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        super().kill()
        try:
            os.unlink(self.qmp_path)
        except OSError:
            pass


class Spinner:
    """A process spinning on a CPU for as long as the `with` block lasts: the load a
    guest that spins (`idle=0`) puts on the host, for the raw sendall baseline."""

    def __enter__(self):
        import sys
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.write('x'); "
                                      "sys.stdout.flush()\nwhile True: pass"], stdout=subprocess.PIPE)
        self.proc.stdout.read(1)          # spinning from here on
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


# ---- one migration ------------------------------------------------------------------

DOWNTIME_MS = 5             # kvmlite's default downtime limit; "QEMU best" gets the same

# The QEMU set-ups compared.  Every one has max-bandwidth raised.
SETUPS = {
    # QEMU's defaults: destination faults its RAM in as pages arrive, one stream,
    # downtime-limit 300 ms.
    "defaults": {"prealloc": False, "multifd": False, "downtime_ms": None},
    # QEMU at its best here: destination RAM pre-allocated (-mem-prealloc),
    # multifd with 2 channels, and kvmlite's downtime limit.
    "best": {"prealloc": True, "multifd": True, "downtime_ms": DOWNTIME_MS},
}


class GuestEndedEarly(RuntimeError):
    """The guest's `seconds=` ran out on the source before the migration finished."""


def migrate_once(binary: str, memory_mib: int, cmdline: str, *, live: bool, setup: dict,
                 ready_timeout: float = 120.0, smp: int = 1) -> dict:
    """Boot the guest in QEMU, wait for `fill: ready`, migrate it to a second QEMU
    with the code that migrates kvmlite (bench/qmpmig.py), let the guest finish
    there and check its self-check.  Returns qmpmig's figures.

    Without the hint device nobody can tell the guest's fill workload to stop,
    so `cmdline` carries `seconds=N`: long enough for the migration to finish
    first, or GuestEndedEarly is raised.

    Times are end to end, for both VMMs alike (qmpmig): total from the migrate
    command (or `stop`, for stop-copy) to the destination's RESUME event,
    downtime from the source's STOP event to that RESUME.  QEMU's own
    query-migrate times end on the source side, before the destination has
    loaded the last state; they are kept as vmm_total_ms and vmm_downtime_ms."""
    from kvmlite.control.client import QmpClientError
    from kvmlite.procs import free_port

    from bench import qmpmig
    # stop-copy: the source is paused before `migrate`; without the global state
    # the destination starts the VM as soon as it has it (else it would stay paused).
    extra = [] if live else ["-global", "migration.store-global-state=off"]
    dst = QemuVm(binary, memory_mib, cmdline, incoming=True, prealloc=setup["prealloc"], extra=extra, smp=smp)
    src = QemuVm(binary, memory_mib, cmdline, extra=extra, smp=smp)
    from bench.scaling import PeakRss
    dst_rss = PeakRss(dst.proc.pid)
    try:
        caps = {"multifd": bool(setup["multifd"])}
        params = {"max-bandwidth": UNLIMITED_BW}
        if setup["multifd"]:
            params["multifd-channels"] = 2
        if setup["downtime_ms"] is not None:
            params["downtime-limit"] = int(setup["downtime_ms"])
        dst.qmp.execute("migrate-set-parameters", params)     # multifd-channels: both sides
        src.wait_for(r"fill: ready", timeout=ready_timeout)
        try:
            r = qmpmig.migrate(src.qmp, dst.qmp, f"tcp:127.0.0.1:{free_port()}", live=live,
                               src_capabilities=caps, dst_capabilities=caps, parameters=params,
                               timeout=120)
        except (QmpClientError, qmpmig.MigrationFailed) as e:
            time.sleep(0.1)
            if src.proc.poll() is not None or src.summary():
                raise GuestEndedEarly(f"the guest finished on the source first: {src.summary()}") from None
            raise RuntimeError(f"QEMU migration failed: {e}\n{src.output()}\n{dst.output()}") from None
        status = dst.wait(300)
        summ = dst.summary()
        if status != 0 or not summ or summ.get("errors") != 0:
            raise RuntimeError(f"guest failed after the QEMU migration (exit {status}): {summ}\n{dst.output()}")
        r.update(guest_verified=summ["verified"], dst_maxrss_kib=dst_rss.stop())
        return r
    finally:
        src.kill()
        dst.kill()


# ---- post-copy -------------------------------------------------------------------------

def migrate_postcopy_once(binary: str, memory_mib: int, cmdline: str, *, bandwidth: int,
                          switch_after_rounds: int = 0, ready_timeout: float = 120.0) -> dict:
    """QEMU's post-copy through the code that migrates kvmlite (bench/qmpmig.py):
    the `postcopy-ram` capability on both sides, then `migrate-start-postcopy`
    at once (`switch_after_rounds` 0: right after `migrate`) or once QEMU has
    synced its dirty bitmap that many times more.  `bandwidth` bytes/s for the
    pre-copy part and the post-copy push alike (max-bandwidth,
    max-postcopy-bandwidth).  The guest must finish on the destination with
    its self-check passing.

    Times end to end from QMP events, as qmpmig takes them for both VMMs:
    total from `migrate` to the source's MIGRATION completed (every page
    sent), downtime from the source's STOP to the destination's RESUME (the
    guest runs there before its pages do)."""
    from kvmlite.control.client import QmpClientError
    from kvmlite.procs import free_port

    from bench import qmpmig
    dst = QemuVm(binary, memory_mib, cmdline, incoming=True)
    src = QemuVm(binary, memory_mib, cmdline)
    try:
        caps = {"postcopy-ram": True}
        params = {"max-bandwidth": bandwidth, "max-postcopy-bandwidth": bandwidth,
                  "downtime-limit": DOWNTIME_MS}
        src.wait_for(r"fill: ready", timeout=ready_timeout)
        try:
            r = qmpmig.migrate(src.qmp, dst.qmp, f"tcp:127.0.0.1:{free_port()}",
                               src_capabilities=caps, dst_capabilities=caps, parameters=params,
                               postcopy=switch_after_rounds, timeout=600)
        except (QmpClientError, qmpmig.MigrationFailed) as e:
            time.sleep(0.1)
            if src.proc.poll() is not None or src.summary() or dst.summary():
                raise GuestEndedEarly(f"the guest finished first: {src.summary() or dst.summary()}") from None
            raise RuntimeError(f"QEMU post-copy failed: {e}\n{src.output()}\n{dst.output()}") from None
        if "switch_ms" not in r:
            raise RuntimeError(f"QEMU did not switch to post-copy: {r['info']}")
        status = dst.wait(300)
        summ = dst.summary()
        if status != 0 or not summ or summ.get("errors") != 0:
            raise RuntimeError(f"guest failed after QEMU post-copy (exit {status}): {summ}\n{dst.output()}")
        r.update(guest_verified=summ["verified"])
        return r
    finally:
        src.kill()
        dst.kill()


# ---- the comparison ----------------------------------------------------------------

MEMORY_MIB = 1024
DIRTY = 1000               # guest re-writes of live pages per second during pre-copy
# (label, guest fill arguments, live?)
CASES = [
    ("25% live, rest never touched, live", "live=25 stale=0", True),
    ("25% live + 50% stale, live", "live=25 stale=50", True),
    ("25% live, rest never touched, stop-copy", "live=25 stale=0", False),
    ("25% live + 50% stale, stop-copy", "live=25 stale=50", False),
]
MAIN_CASE = "25% live + 50% stale, live"      # the case hinting exists for; the targets apply here
STALE_SWEEP = (0, 25, 50, 75)        # % of RAM freed with stale data, 25% live, live migration: for the plot
# kvmlite over as many connections as QEMU best's multifd channels (--channels)
KVMLITE_CHANNELS = 2
CHANNEL_CONFIGS = (f"kvmlite hint off ×{KVMLITE_CHANNELS}", f"kvmlite hint on ×{KVMLITE_CHANNELS}")
CONFIGS = ("QEMU defaults", "QEMU best", "kvmlite hint off", "kvmlite hint on", *CHANNEL_CONFIGS)
SWEEP_CONFIGS = CONFIGS[:4]          # the stale sweep (for the plot) runs without channels
SMP_CONFIGS = CONFIGS[:4]            # and so does the SMP case
# measured right after each case's runs, in the live cases under a spinning process
RAW = ("raw sendall, bytes of hint on", "raw sendall, bytes of QEMU best")
# `seconds=` for the guest in QEMU: it must outlast the migration; a retry triples it.
QEMU_SECONDS = {"QEMU defaults": 7, "QEMU best": 2}
METRICS = ("total_ms", "downtime_ms", "mib_wire", "pages_sent", "mib_s")


def run_config(binary: str, config: str, fill: str, live: bool) -> dict:
    from bench.scaling import kvmlite_migrate
    if config.startswith("kvmlite"):
        # idle=0: the guest spins between paced writes, as it must under QEMU,
        # which has no idle device; so both VMMs migrate the same busy guest.
        # the same client code and the same figures as QEMU's (bench/qmpmig.py);
        # ×2: over as many connections as QEMU best's multifd channels
        channels = KVMLITE_CHANNELS if config in CHANNEL_CONFIGS else 1
        r = kvmlite_migrate(MEMORY_MIB, f"workload=fill {fill} dirty={DIRTY} idle=0",
                            hint=" on" in config, live=live, downtime_ms=DOWNTIME_MS, prealloc_dst=True,
                            channels=channels)
        r.pop("info", None)
        return r
    setup = SETUPS["best" if config == "QEMU best" else "defaults"]
    for attempt in range(3):
        try:
            return migrate_once(binary, MEMORY_MIB,
                                f"workload=fill {fill} dirty={DIRTY} seconds={QEMU_SECONDS[config]}",
                                live=live, setup=setup)
        except GuestEndedEarly:
            if attempt == 2:
                raise
            QEMU_SECONDS[config] *= 3


def summarize(rs: list[dict]) -> dict:
    from bench.scaling import median_range
    return {"total_ms": median_range(r["total_ms"] for r in rs),
            "downtime_ms": median_range(r["downtime_ms"] for r in rs),
            "mib_wire": median_range(r["bytes_wire"] / (1 << 20) for r in rs),
            "pages_sent": median_range(r["pages_sent"] for r in rs),
            "mib_s": median_range(r["bytes_wire"] / (1 << 20) / (r["total_ms"] / 1000) for r in rs),
            "n": len(rs)}


def machine_info(binary: str | None) -> dict:
    import platform
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    kvm = next((m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if os.path.exists(f"/sys/module/{m}")), "kvm")
    return {"host": os.uname().nodename, "cpu": cpu, "cpus": os.cpu_count(), "mem_gib": round(mem_gib, 1),
            "kernel": os.uname().release, "kvm": kvm, "python": platform.python_version(),
            "qemu": qemu_version(binary) if binary else None, "qemu_cpu": CPU,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def compare(binary: str, reps: int, console) -> dict:
    """Run every case and set-up `reps` times, interleaved; returns runs and medians."""
    from bench.__main__ import loopback_sendall
    from bench.scaling import median_range
    jobs = [(case, fill, live, CONFIGS) for case, fill, live in CASES]
    jobs += [(f"stale={p}", f"live=25 stale={p}", True, SWEEP_CONFIGS) for p in STALE_SWEEP if p not in (0, 50)]
    runs = {case: {c: [] for c in configs} for case, _, _, configs in jobs}
    raw = {case: {name: [] for name in RAW} for case, _, _ in CASES}
    total, done, t0 = reps * sum(len(configs) for *_, configs in jobs), 0, time.monotonic()
    for _ in range(reps):
        for case, fill, live, configs in jobs:
            for config in configs:
                r = run_config(binary, config, fill, live)
                runs[case][config].append(r)
                done += 1
                console.print(f"  [{done:2d}/{total}] {case:40s} {config:18s} total {r['total_ms']:7.1f} ms  "
                              f"downtime {r['downtime_ms']:6.2f} ms  {r['bytes_wire'] / (1 << 20):6.1f} MiB"
                              f"   ({time.monotonic() - t0:.0f} s)", highlight=False)
            if case in raw:
                # The physical ceiling, right after the runs it is compared with and
                # under the load they ran under: in the live cases a process spinning
                # as the guest does (a stop-copy guest is paused meanwhile).
                with Spinner() if live else contextlib.nullcontext():
                    for name, config in zip(RAW, ("kvmlite hint on", "QEMU best")):
                        nbytes = runs[case][config][-1]["bytes_wire"]
                        raw[case][name].append({"total_ms": loopback_sendall(nbytes) * 1000,
                                                "bytes_wire": nbytes})
    summary = {}
    for case, _, _ in CASES:
        summary[case] = {c: summarize(runs[case][c]) for c in CONFIGS}
        best, dflt = summary[case]["QEMU best"], summary[case]["QEMU defaults"]
        for c in CONFIGS:
            s = summary[case][c]
            s["vs_best"] = {k: s[k][0] / best[k][0] for k in METRICS}
            s["vs_defaults"] = {k: s[k][0] / dflt[k][0] for k in METRICS}
        for name in RAW:
            rs = raw[case][name]
            summary[case][name] = {"total_ms": median_range(r["total_ms"] for r in rs),
                                   "mib_wire": median_range(r["bytes_wire"] / (1 << 20) for r in rs),
                                   "mib_s": median_range(r["bytes_wire"] / (1 << 20) / (r["total_ms"] / 1000)
                                                         for r in rs)}
        for c in ("kvmlite hint on", CHANNEL_CONFIGS[1]):
            s = summary[case][c]
            s["vs_raw"] = s["mib_s"][0] / summary[case][RAW[0]]["mib_s"][0]
    sweep = {}
    for p in STALE_SWEEP:
        case = {0: CASES[0][0], 50: CASES[1][0]}.get(p, f"stale={p}")
        sweep[str(p)] = {c: summarize(runs[case][c]) for c in SWEEP_CONFIGS}
    m = summary[MAIN_CASE]
    on, off = m["kvmlite hint on"], m["kvmlite hint off"]
    targets = [
        ("hint on: total ≤ 0.5× QEMU best", on["vs_best"]["total_ms"], 0.5),
        ("hint on: bytes ≤ 0.35× QEMU best", on["vs_best"]["mib_wire"], 0.35),
        ("hint on: downtime ≤ 5 ms", on["downtime_ms"][0], 5.0),
        ("hint on: downtime ≤ 1.0× QEMU best (same limit)", on["vs_best"]["downtime_ms"], 1.0),
        ("hint off: total ≤ 1.0× QEMU best", off["vs_best"]["total_ms"], 1.0),
        ("hint on: downtime ≤ 5 ms in every run",
         max(r["downtime_ms"] for r in runs[MAIN_CASE]["kvmlite hint on"]), 5.0),
    ]
    # Every case: the best kvmlite set-up (1 or 2 connections) against QEMU best.
    for case, _, _ in CASES:
        for hint in ("off", "on"):
            ratio = min(summary[case][c]["vs_best"]["total_ms"]
                        for c in (f"kvmlite hint {hint}", f"kvmlite hint {hint} ×{KVMLITE_CHANNELS}"))
            targets.append((f"{case}, hint {hint}: total ≤ 1.0× QEMU best (best of 1 or "
                            f"{KVMLITE_CHANNELS} connections)", ratio, 1.0))
    # Active pages streamed with the guest spinning, against the raw sendall of the same
    # bytes under the same load: "≥ 0.8×" is written as "raw's MiB/s ≤ 1.25× kvmlite's".
    for case, _, live in CASES:
        if live:
            targets.append((f"{case}, hint on: MiB/s ≥ 0.8× raw sendall under load (raw/kvmlite ≤ 1.25)",
                            1 / summary[case]["kvmlite hint on"]["vs_raw"], 1.25))
    return {"memory_mib": MEMORY_MIB, "dirty_pages_per_s": DIRTY, "downtime_limit_ms": DOWNTIME_MS,
            "kvmlite_channels": KVMLITE_CHANNELS,
            "setups": SETUPS, "cases": [c for c, _, _ in CASES], "main_case": MAIN_CASE, "configs": list(CONFIGS),
            "reps": reps, "runs": runs, "raw_runs": raw, "summary": summary, "stale_sweep": sweep,
            "targets": [{"target": n, "value": v, "limit": lim, "met": v <= lim} for n, v, lim in targets]}


# ---- several vCPUs: kvmlite --smp 2 against QEMU -smp 2 ---------------------------------

SMP = 2
SMP_CASE = f"25% live + 50% stale, live, {SMP} vCPUs"
SMP_FILL = "live=25 stale=50"


def run_smp_config(binary: str, config: str) -> dict:
    """The main case on 2 vCPUs.  Both VMMs give the guest LAPICs here, so the
    guest sleeps on its LAPIC timer between paced writes under both (idle=1):
    two spinning vCPUs would take both of this host's CPUs from the VMMs."""
    from bench.scaling import kvmlite_migrate
    fill = f"workload=fill {SMP_FILL} dirty={DIRTY} idle=1"
    if config.startswith("kvmlite"):
        r = kvmlite_migrate(MEMORY_MIB, fill, hint=config.endswith("on"), live=True, downtime_ms=DOWNTIME_MS,
                            prealloc_dst=True, src_args=("--smp", str(SMP)))
        return {k: r.get(k) for k in ("total_ms", "downtime_ms", "bytes_wire", "pages_sent", "pages_zero",
                                      "rounds", "downtime_parts_ms", "guest_verified")}
    setup = SETUPS["best" if config == "QEMU best" else "defaults"]
    for attempt in range(3):
        try:
            return migrate_once(binary, MEMORY_MIB, f"{fill} cpus={SMP} seconds={QEMU_SECONDS[config]}",
                                live=True, setup=setup, smp=SMP)
        except GuestEndedEarly:
            if attempt == 2:
                raise
            QEMU_SECONDS[config] *= 3


def compare_smp(binary: str, reps: int, console) -> dict:
    """kvmlite --smp 2 against QEMU -smp 2 on the same image, interleaved runs."""
    runs = {c: [] for c in SMP_CONFIGS}
    for _ in range(reps):
        for config in SMP_CONFIGS:
            r = run_smp_config(binary, config)
            runs[config].append(r)
            console.print(f"  {SMP_CASE:40s} {config:16s} total {r['total_ms']:7.1f} ms  "
                          f"downtime {r['downtime_ms']:6.2f} ms  {r['bytes_wire'] / (1 << 20):6.1f} MiB",
                          highlight=False)
    summary = {c: summarize(runs[c]) for c in SMP_CONFIGS}
    best, dflt = summary["QEMU best"], summary["QEMU defaults"]
    for c in SMP_CONFIGS:
        s = summary[c]
        s["vs_best"] = {k: s[k][0] / best[k][0] for k in METRICS}
        s["vs_defaults"] = {k: s[k][0] / dflt[k][0] for k in METRICS}
    return {"case": SMP_CASE, "vcpus": SMP, "configs": list(SMP_CONFIGS), "reps": reps, "runs": runs,
            "summary": summary}


def print_smp(q: dict, console) -> None:
    from rich import box
    from rich.table import Table
    table = Table(title=f"{q['case']}: kvmlite --smp {q['vcpus']} against QEMU -smp {q['vcpus']}, same image "
                  "(the guest starts CPU 1 with INIT-SIPI-SIPI under QEMU, with the CPU-start device under "
                  "kvmlite); ×… = ratio to QEMU best", box=box.SIMPLE_HEAD, title_justify="left")
    for col in HEAD:
        table.add_column(col, justify="left" if col == "VMM" else "right", no_wrap=True)
    for c in q["configs"]:
        x = q["summary"][c]
        table.add_row(c, _r(x["total_ms"], 0), _r(x["downtime_ms"]), f"{x['mib_wire'][0]:.0f}",
                      f"{x['pages_sent'][0]:,.0f}", f"{x['mib_s'][0]:,.0f}",
                      *(f"{x['vs_best'][k]:.2f}" for k in METRICS), f"{x['vs_defaults']['total_ms']:.2f}")
    console.print(table)


def _r(v, d=None):
    if d is None:
        d = 1 if v[0] < 100 else 0
    return f"{v[0]:.{d}f} ({v[1]:.{d}f}–{v[2]:.{d}f})"


RAW_LABEL = {RAW[0]: "raw sendall, on's bytes", RAW[1]: "raw sendall, best's bytes"}
HEAD = ("VMM", "total ms", "downtime ms", "MiB sent", "pages sent", "MiB/s",
        "×total", "×down", "×bytes", "×pages", "×MiB/s", "×dflt")


def case_rows(q: dict, case: str):
    """Cells per row of one case: medians (min–max), then ratios to QEMU best and to QEMU defaults."""
    s = q["summary"][case]
    for c in q["configs"]:
        x = s[c]
        yield (c, _r(x["total_ms"], 0), _r(x["downtime_ms"]), f"{x['mib_wire'][0]:.0f}",
               f"{x['pages_sent'][0]:,.0f}", f"{x['mib_s'][0]:,.0f}",
               *(f"{x['vs_best'][k]:.2f}" for k in METRICS), f"{x['vs_defaults']['total_ms']:.2f}")
    for name in RAW:
        x = s[name]
        yield (RAW_LABEL[name], _r(x["total_ms"], 0), "", f"{x['mib_wire'][0]:.0f}", "",
               f"{x['mib_s'][0]:,.0f}", "", "", "", "", "", "")


def print_qemu(q: dict, console) -> None:
    from rich import box
    from rich.table import Table
    console.print(f"[bold]kvmlite against QEMU[/bold]: {q['memory_mib'] // 1024} GiB guest dirtying "
                  f"{q['dirty_pages_per_s']} pages/s; medians of {q['reps']} runs (min–max); "
                  "×… = ratio to QEMU best, ×dflt = total time's ratio to QEMU defaults")
    for case in q["cases"]:
        table = Table(title=case, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
        for col in HEAD:
            table.add_column(col, justify="left" if col == "VMM" else "right", no_wrap=True)
        for cells in case_rows(q, case):
            table.add_row(*cells)
        console.print(table)
    console.print("QEMU best: destination -mem-prealloc, multifd (2 channels), downtime-limit "
                  f"{q['downtime_limit_ms']:g} ms like kvmlite's; QEMU defaults: downtime-limit 300 ms, "
                  "one stream, destination RAM faulted in as pages arrive; both with max-bandwidth raised.  "
                  "kvmlite's destination has --memory (pre-faulted); ×2: kvmlite with multifd and "
                  f"multifd-channels {q.get('kvmlite_channels', 2)}.  raw sendall: the same bytes over "
                  "loopback TCP between two threads, measured after each case's runs, in the live cases while "
                  "a process spins on a CPU as the guest does.  Both VMMs are driven by the same QMP "
                  "client code (bench/qmpmig.py) and read from the same query-migrate fields; times are end "
                  "to end for both: total from the migrate command to the destination's RESUME event, "
                  "downtime from the source's STOP event to it.  Each VMM's own query-migrate times "
                  "(total-time, downtime; QEMU's end on the source side, before the destination has loaded "
                  "the last state), medians:", highlight=False)
    for case in q["cases"]:
        parts = []
        for c in ("QEMU defaults", "QEMU best", "kvmlite hint off", "kvmlite hint on"):
            rs = q["runs"][case][c]
            parts.append(f"{c} {statistics.median(r['vmm_total_ms'] for r in rs):.0f} ms total, "
                         f"{statistics.median(r['vmm_downtime_ms'] for r in rs):.1f} ms downtime")
        console.print(f"  {case}: " + "; ".join(parts), highlight=False)
    console.print(f"\nTargets, {q['main_case']}, against QEMU at its best in the same run:", highlight=False)
    for t in q["targets"]:
        console.print(f"  {t['target']}: {t['value']:.2f} → {'met' if t['met'] else 'NOT met'}", highlight=False)
    console.print()


def markdown(results: dict) -> str:
    """The tables as Markdown, for the README."""
    m = results["machine"]
    out = [f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['mem_gib']} GiB, Linux {m['kernel']} ({m['kvm']}), "
           f"QEMU {m['qemu']} (`-accel kvm -cpu {m['qemu_cpu']}`), Python {m['python']}, {m['date']}.", ""]
    q = results.get("qemu")
    if q:
        out += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        for case in q["cases"]:
            out.append(f"| **{case}** |" + " |" * (len(HEAD) - 1))
            out += ["| " + " | ".join(cells) + " |" for cells in case_rows(q, case)]
        out += ["", "Targets (" + q["main_case"] + "): " +
                "; ".join(f"{t['target']}: {t['value']:.2f} ({'met' if t['met'] else 'not met'})"
                          for t in q["targets"]), ""]
    q = results.get("smp")
    if q:
        out += [f"**{q['case']}** (kvmlite --smp {q['vcpus']} against QEMU -smp {q['vcpus']}):", "",
                "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        for c in q["configs"]:
            x = q["summary"][c]
            out.append("| " + " | ".join((c, _r(x["total_ms"], 0), _r(x["downtime_ms"]), f"{x['mib_wire'][0]:.0f}",
                                          f"{x['pages_sent'][0]:,.0f}", f"{x['mib_s'][0]:,.0f}",
                                          *(f"{x['vs_best'][k]:.2f}" for k in METRICS),
                                          f"{x['vs_defaults']['total_ms']:.2f}")) + " |")
        out.append("")
    s = results.get("scaling")
    if s:
        from bench.scaling import markdown_rows
        out += markdown_rows(s)
    return "\n".join(out) + "\n"


# the parts of this bench, in the order they run
PARTS = ("qemu", "smp", "postcopy", "scaling")


def main() -> int:
    import argparse
    from rich.console import Console
    ap = argparse.ArgumentParser(prog="python -m bench.qemu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="runs per figure (default 3; medians and min–max)")
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="run only this part (postcopy: bench/postcopy.py's table 3, QEMU's post-copy "
                    "against kvmlite's)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    console = Console(width=max(Console().width, 160))
    which = args.only or list(PARTS)
    binary = qemu_binary()
    if ("qemu" in which or "smp" in which or "postcopy" in which) and binary is None:
        console.print(HOW_TO_INSTALL, highlight=False)
        return 2
    if not GUEST.exists():
        console.print(f"{GUEST} is missing: run `make guest` first", highlight=False)
        return 2
    info = machine_info(binary)
    console.print(f"[bold]make bench-qemu[/bold] on {info['host']}: {info['cpu']}, {info['cpus']} CPUs, "
                  f"{info['mem_gib']} GiB, Linux {info['kernel']} ({info['kvm']}), QEMU {info['qemu']}, "
                  f"Python {info['python']}\n", highlight=False)
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "qemu.json"
    results = {"machine": info}
    if json_path.exists():          # keep a part not re-run this time, for the plot
        try:
            old = json.loads(json_path.read_text())
            results.update({k: old[k] for k in PARTS if k in old and k not in which})
        except ValueError:
            pass
    t = time.monotonic()
    if "qemu" in which:
        results["qemu"] = compare(binary, args.reps, console)
        print_qemu(results["qemu"], console)
    if "smp" in which:
        results["smp"] = compare_smp(binary, args.reps, console)
        print_smp(results["smp"], console)
    if "postcopy" in which:
        # A guest pre-copy cannot move (it dirties faster than the link carries):
        # kvmlite's post-copy with the hint against QEMU 7.2's (docs/postcopy.md).
        from bench.postcopy import table3
        results["postcopy"] = table3(False, args.reps)
    if "scaling" in which:
        from bench.scaling import print_scaling, run as run_scaling
        results["scaling"] = run_scaling(args.reps, console=console)
        print_scaling(results["scaling"], console)
    results["wall_s"] = round(time.monotonic() - t, 1)
    results["loadavg_start_end"] = [info["loadavg"][0], round(os.getloadavg()[0], 2)]
    json_path.write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "qemu.md").write_text(markdown(results))
    console.print(f"results: {json_path}, tables as Markdown: {out_dir / 'qemu.md'}", highlight=False)
    if not args.no_plot:
        from bench.plot import plot
        try:
            console.print(f"plot: {plot(results, out_dir / 'qemu.png')}", highlight=False)
        except ImportError as e:
            console.print(f"no plot: {e} (pip install '.[bench]')", highlight=False)
    console.print(f"wall time {results['wall_s']:.0f} s; 1-minute load average {results['loadavg_start_end'][0]:.2f} "
                  f"at the start, {results['loadavg_start_end'][1]:.2f} at the end (the bench itself keeps about "
                  "one CPU busy; more means other jobs ran alongside and added noise)", highlight=False)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
