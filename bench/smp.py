"""Several vCPUs and dirty tracking: `python -m bench --only smp` / `--only dirty`.

Tables (each ratio against a baseline measured in the same run):
  dirty  The dirty bitmap against the vCPUs' dirty rings, on the two cases the
         choice rests on: a 16 GiB guest with 64 MiB live and the 1 GiB case
         (25 % live + 50 % freed with stale data), both live, hint on.  Per
         case: total, downtime, time per dirty-log sync (the first, which
         covers all of RAM, and the later ones), and the setup (logging on).
  smp    1. Guest page writes per second with 1, 2 and 4 vCPUs (4 overcommits
            this 2-CPU host).
         2. Live migration of the 1 GiB case with --smp 2, hint on and off,
            against --smp 1.
         3. Downtime against N = 1, 2, 4, 8 vCPUs, with its parts (pause: the
            time to park N vCPUs; state: N vCPUs' state read on their threads).

    python -m bench --only dirty --reps 3
    python -m bench --only smp --reps 3
"""

from __future__ import annotations

import statistics
import subprocess
import sys

from rich.table import Table

from bench.__main__ import GUEST, ROOT, console, median_range, migrate_once
from kvmlite.procs import parse_summary

CASE_1G = ("1G", "workload=fill live=25 stale=50 dirty=1000")
CASE_16G = ("16G", "workload=fill live_pages=16384 stale=0 dirty=1000")
DOWNTIME_GOAL_MS = 5.0


def _fmt(values, digits: int = 0) -> str:
    m, lo, hi = median_range(values)
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _later_syncs(r: dict) -> list[float]:
    """Syncs after the first (which fetches a log that covers all of RAM) during pre-copy."""
    return r["sync_ms"][1:-1] or r["sync_ms"][-1:]


# ---- dirty bitmap against dirty rings ------------------------------------------------

def bench_dirty(reps: int) -> dict:
    cases = [("16 GiB, 64 MiB live", *CASE_16G, 1), ("1 GiB, 25+50 %", *CASE_1G, 1),
             ("1 GiB, 25+50 %, 2 vCPUs", *CASE_1G, 2)]
    runs: dict = {}
    for _ in range(reps):
        for name, memory, cmdline, cpus in cases:
            for log in ("bitmap", "ring"):
                args = ("--smp", str(cpus)) + (("--dirty-ring",) if log == "ring" else ())
                # the destination faults in only what arrives (no --memory), as bench.scaling
                r = _migrate_once(memory, cmdline, hint=True, live=True, src_args=args, dst_memory=False)
                if r["dirty_log"] != log:
                    raise RuntimeError(f"asked for the {log} log, the source used {r['dirty_log']}")
                runs.setdefault(name, {}).setdefault(log, []).append(r)
    table = Table(title="Dirty tracking: the bitmap log against the vCPUs' dirty rings (live, hint on; "
                  "medians, min–max)")
    for col in ("case", "log", "total ms", "downtime ms", "setup ms", "1st sync ms",
                "later syncs ms", "rounds", "MiB sent", "total vs bitmap"):
        table.add_column(col, justify="right")
    out = {}
    for name, by_log in runs.items():
        base = statistics.median(r["total_ms"] for r in by_log["bitmap"])
        for log, rs in by_log.items():
            tot = [r["total_ms"] for r in rs]
            table.add_row(name, log, _fmt(tot), _fmt([r["downtime_ms"] for r in rs], 1),
                          f"{statistics.median(r['setup_ms'] for r in rs):.1f}",
                          f"{statistics.median(r['sync_ms'][0] for r in rs):.2f}",
                          f"{statistics.median(x for r in rs for x in _later_syncs(r)):.2f}",
                          f"{statistics.median(r['rounds'] for r in rs):.0f}",
                          f"{statistics.median(r['bytes_wire'] for r in rs) / (1 << 20):.1f}",
                          f"{statistics.median(tot) / base:.2f}×")
        out[name] = {log: [_keep(r) for r in rs] for log, rs in by_log.items()}
    console.print(table)
    console.print("setup: connect, logging on (the ring's write-protects all of RAM), header; "
                  "a sync: the bitmap's fetch (its clears are per chunk, inside the rounds), "
                  "or harvest and reset of every ring\n")
    return out


def _keep(r: dict) -> dict:
    return {k: r[k] for k in ("total_ms", "downtime_ms", "setup_ms", "sync_ms", "rounds", "bytes_wire",
                              "round_pages", "round_ms", "downtime_parts_ms", "dirty_log")}


def _figures(r: dict) -> dict:
    """bench.migrate_once's result (kvmlite's own times, and the source's last
    query-migrate as `info`) with the fields this bench reads, by name."""
    info = r["info"]
    rounds = info.get("x-rounds", [])
    return dict(r, setup_ms=info.get("x-setup-time-ms", 0.0), sync_ms=info.get("x-sync-ms", []),
                rounds=len(rounds), bytes_wire=info["ram"]["transferred"],
                round_pages=[x["pages"] for x in rounds], round_ms=[x["ms"] for x in rounds],
                downtime_parts_ms=info.get("x-downtime-parts", {}), dirty_log=info.get("x-dirty-log", ""))


# ---- several vCPUs ------------------------------------------------------------------

def guest_rates(cpus: int) -> dict:
    """churn on `cpus` vCPUs, each CPU its own 10,000 slots for 50 rounds, in 256 MiB
    (as table 3 of `make bench`: pages recycle, so first touches of host memory
    do not dominate)."""
    out = subprocess.run([sys.executable, "-m", "kvmlite", "run", str(GUEST), "--memory", "256M",
                          "--smp", str(cpus), "--cmdline", "workload=churn pages=10000 rounds=50"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    line = [l for l in out.stdout.splitlines() if l.startswith("KVMLITE-SUMMARY")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"churn on {cpus} vCPUs failed ({out.returncode}):\n"
                           f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    s = parse_summary(line[-1])
    return {"write_rate": s["pages_per_sec"], "throughput": s["pages_written"] / (s["elapsed_ms"] / 1000)}


def bench_smp(reps: int, parts=("rates", "migration", "downtime")) -> dict:
    result: dict = {}
    if "rates" in parts:
        result["guest_rates"] = bench_rates(reps)
    if "migration" in parts:
        result["migration_1g"] = bench_smp_migration(reps)
    if "downtime" in parts:
        result["downtime_by_n"] = bench_downtime(reps)
    return result


def bench_rates(reps: int) -> dict:
    # 1. page writes per second
    rates: dict[int, list] = {1: [], 2: [], 4: []}
    for _ in range(reps):
        for n in rates:
            rates[n].append(guest_rates(n))
    table = Table(title="Guest page writes per second on N vCPUs (256 MiB, churn pages=10000 per CPU, "
                  "rounds=50; this host has 2 CPUs, shared)")
    for col in ("vCPUs", "write rate, all CPUs (pages/s)", "ratio to 1 vCPU", "pages written ÷ elapsed",
                "ratio to 1 vCPU"):
        table.add_column(col, justify="right")
    w1 = statistics.median(r["write_rate"] for r in rates[1])
    t1 = statistics.median(r["throughput"] for r in rates[1])
    for n, rs in rates.items():
        w = [r["write_rate"] for r in rs]
        t = [r["throughput"] for r in rs]
        table.add_row(f"{n}" + (" (overcommitted)" if n > 2 else ""), _fmt(w), f"{statistics.median(w) / w1:.2f}×",
                      _fmt(t), f"{statistics.median(t) / t1:.2f}×")
    console.print(table)
    return rates


def bench_smp_migration(reps: int) -> dict:
    """The 1 GiB case with --smp 2, hint on and off, against --smp 1."""
    memory, cmdline = CASE_1G
    mig: dict = {}
    for _ in range(reps):
        for n in (1, 2):
            for hint in (True, False):
                r = _migrate_once(memory, cmdline, hint=hint, live=True, src_args=("--smp", str(n)))
                mig.setdefault((n, hint), []).append(r)
    table = Table(title="Live migration, 1 GiB, 25 % live + 50 % stale, dirty=1000 pages/s (shared among the CPUs)")
    for col in ("vCPUs", "hint", "total ms", "downtime ms", "MiB on wire", "total vs 1 vCPU", "downtime vs 1 vCPU"):
        table.add_column(col, justify="right")
    for (n, hint), rs in mig.items():
        base = mig[(1, hint)]
        tot, down = [r["total_ms"] for r in rs], [r["downtime_ms"] for r in rs]
        table.add_row(str(n), "on" if hint else "off", _fmt(tot), _fmt(down, 2),
                      f"{statistics.median(r['bytes_wire'] for r in rs) / (1 << 20):.1f}",
                      f"{statistics.median(tot) / statistics.median(r['total_ms'] for r in base):.2f}×",
                      f"{statistics.median(down) / statistics.median(r['downtime_ms'] for r in base):.2f}×")
    console.print(table)
    return {f"{n} vCPUs, hint {'on' if h else 'off'}": [_keep(r) for r in rs] for (n, h), rs in mig.items()}


def bench_downtime(reps: int) -> dict:
    """Downtime against N vCPUs, with its parts."""
    down: dict[int, list] = {n: [] for n in (1, 2, 4, 8)}
    for _ in range(reps):
        for n in down:
            down[n].append(_migrate_once("1G", "workload=fill live_pages=16384 stale=0 dirty=1000",
                                        hint=True, live=True, src_args=("--smp", str(n))))
    table = Table(title="Downtime against N vCPUs (1 GiB, 64 MiB live, live, hint on): medians, ms")
    for col in ("vCPUs", "downtime", "vs 1 vCPU", "pause (park N)", "final sync", "final pages", "state (N vCPUs)",
                "destination to READY", "COMMIT"):
        table.add_column(col, justify="right")
    d1 = statistics.median(r["downtime_ms"] for r in down[1])
    for n, rs in down.items():
        parts = {k: statistics.median(r["downtime_parts_ms"].get(k, 0) for r in rs)
                 for k in ("pause", "sync", "pages", "state", "ready", "commit")}
        d = [r["downtime_ms"] for r in rs]
        table.add_row(f"{n}" + (" (overcommitted)" if n > 2 else ""), _fmt(d, 2),
                      f"{statistics.median(d) / d1:.2f}×",
                      *(f"{parts[k]:.2f}" for k in ("pause", "sync", "pages", "state", "ready", "commit")))
    console.print(table)
    d2 = statistics.median(r["downtime_ms"] for r in down[2])
    console.print(f"downtime at N = 2: {d2:.2f} ms (goal ≤ {DOWNTIME_GOAL_MS:g}) → "
                  f"{'met' if d2 <= DOWNTIME_GOAL_MS else 'NOT met'}\n")
    return {n: [_keep(r) for r in rs] for n, rs in down.items()}


def _migrate_once(*args, **kw) -> dict:
    return _figures(migrate_once(*args, **kw))
