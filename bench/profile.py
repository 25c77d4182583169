"""Where a migration's time goes with the guest spinning (bench-qemu's idle=0 cases).

One live migration of a 1 GiB guest (`workload=fill live=25 stale=50
dirty=1000 idle=0`) between two kvmlite processes, as `make bench-qemu` runs
it, while this reads every thread's CPU time and run-queue wait
(/proc/PID/task/TID/schedstat: ns on a CPU, ns runnable but waiting for one)
in the source and the destination from the `migrate` command to completion.
Optionally under py-spy (`--py-spy`: one flame graph per process, GIL-holding
samples marked) or `perf record` (`--perf`: the kernel's side, system-wide).

    python -m bench.profile [--reps 3] [--hint off] [--channels N] [--py-spy] [--perf] [--extra-src ARG...]

Prints, per thread: CPU ms, wait ms, and their share of the migration's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "profile"
GUEST = ROOT / "guest" / "guest.bin"


def thread_times(pid: int) -> dict[int, tuple[str, int, int]]:
    """{tid: (name, ns on CPU, ns waiting on a run queue)} for every thread of `pid`."""
    out = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                run, wait, _ = f.read().split()
            with open(f"{base}/{tid}/comm") as f:
                name = f.read().strip()
        except (OSError, ValueError):
            continue
        out[int(tid)] = (name, int(run), int(wait))
    return out


def delta(before: dict, after: dict, pid: int) -> list[dict]:
    rows = []
    for tid, (name, run, wait) in after.items():
        _, run0, wait0 = before.get(tid, (name, 0, 0))
        rows.append({"tid": tid, "main": tid == pid, "new": tid not in before,
                     "cpu_ms": (run - run0) / 1e6, "wait_ms": (wait - wait0) / 1e6})
    return sorted(rows, key=lambda r: -r["cpu_ms"])


def label(rows: list[dict], side: str, nvcpus: int = 1) -> list[dict]:
    """Name the threads that matter (Python does not name them for the kernel):
    on the source the migration thread is the busiest thread started after
    `migrate`, the others started then are its channels; of the threads that
    were there before, the `nvcpus` busiest are the vCPUs (the guest spins:
    idle=0) and another busy one serves the monitor (this bench's queries); the
    destination's main thread receives, threads it started during the
    migration are channel readers."""
    for r in rows:
        r["what"] = ""
    new = [r for r in rows if r["new"]]
    if side == "src":
        if new:
            sender = max(new, key=lambda r: r["cpu_ms"])
            sender["what"] = "sender (migration)"
            for r in new:
                if r is not sender and r["cpu_ms"] > 1:
                    r["what"] = "channel"
        old = sorted((r for r in rows if not r["new"] and not r["main"]), key=lambda r: -r["cpu_ms"])
        for i, r in enumerate(old):
            if i < nvcpus:
                r["what"] = f"vCPU {i}"
            elif r["cpu_ms"] > 1:
                r["what"] = "monitor"
    else:
        for r in rows:
            if r["main"]:
                r["what"] = "receiver (main)"
            elif r["new"] and r["cpu_ms"] > 1:
                r["what"] = "channel reader or vCPU"
    return rows


def profile_once(hint: bool, memory_mib: int, fill: str, *, py_spy: bool, perf: bool,
                 tag: str, extra_src=(), extra_dst=(), live: bool = True, channels: int = 1) -> dict:
    from kvmlite.procs import VmProcess, free_port, start_destination
    from kvmlite.tools.migrate import FINAL, configure, finish, start

    from bench.qmpmig import figures
    port = free_port()
    dst = start_destination(port, f"{memory_mib}M", extra=list(extra_dst))
    src = VmProcess([str(GUEST), "--memory", f"{memory_mib}M", "--cmdline",
                     f"workload=fill {fill}", *extra_src])
    spies = []
    try:
        src.wait_for(r"^fill: ready", timeout=300)
        time.sleep(0.3)          # let the spinning settle
        OUT.mkdir(parents=True, exist_ok=True)
        if py_spy:
            spy = ROOT / ".venv" / "bin" / "py-spy"
            for who, p in (("src", src), ("dst", dst)):
                out = OUT / f"{tag}-{who}.txt"
                spies.append(subprocess.Popen(
                    [str(spy), "record", "--pid", str(p.proc.pid), "--rate", "2000", "--threads", "--gil",
                     "--idle", "--nonblocking", "--duration", "3", "--format", "raw", "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        if perf:
            spies.append(subprocess.Popen(
                ["perf", "record", "-g", "-F", "20000", "-o", str(OUT / f"{tag}.perf.data"),
                 "-p", f"{src.proc.pid},{dst.proc.pid}", "--", "sleep", "2"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        c = src.client()
        configure(c, hint=hint, downtime_ms=5, channels=channels)
        s0, d0 = thread_times(src.proc.pid), thread_times(dst.proc.pid)
        t0 = time.perf_counter()
        stopped = start(c, f"tcp:127.0.0.1:{port}", stop_copy=not live)
        s2, d2 = {}, {}
        while True:
            info = c.execute("query-migrate")
            # every thread's latest figures: the migration thread is gone once it is done
            s2.update(thread_times(src.proc.pid))
            d2.update(thread_times(dst.proc.pid))
            if info["status"] in FINAL:
                break
            time.sleep(0.02)     # each query costs the source ~0.3 ms of CPU: not too often
        wall = (time.perf_counter() - t0) * 1000
        finish(c, info, stopped=stopped)      # quit the source, left in postmigrate
        c.close()
        if info["status"] != "completed":
            raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}\n{src.output()}\n"
                               f"{dst.output()}")
        # the source's own figures (x-total-time-ms, x-downtime-ms), flat
        f = figures(info)
        s = dict(f, total_ms=f["vmm_total_ms"], downtime_ms=f["vmm_downtime_ms"])
        src.proc.wait(60)
        dst.execute("x-guest-finish")
        rc = dst.proc.wait(300)
        for sp in spies:
            sp.wait(30)
        summ = dst.summary()
        if rc != 0 or not summ or summ.get("errors") != 0:
            raise RuntimeError(f"guest failed after migration ({rc}): {summ}\n{dst.output()}")
        return {"stats": s, "wall_ms": wall,
                "src": label(delta(s0, s2, src.proc.pid), "src", _smp(extra_src)),
                "dst": label(delta(d0, d2, dst.proc.pid), "dst")}
    finally:
        for sp in spies:
            if sp.poll() is None:
                sp.kill()
        src.kill()
        dst.kill()


def _smp(args) -> int:
    args = list(args)
    for i, a in enumerate(args):
        if a == "--smp" and i + 1 < len(args):
            return int(args[i + 1])
        if a.startswith("--smp="):
            return int(a[6:])
    return 1


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hint", choices=("on", "off"), default="on")
    ap.add_argument("--memory", type=int, default=1024, help="MiB")
    ap.add_argument("--fill", default="live=25 stale=50 dirty=1000 idle=0")
    ap.add_argument("--stop-copy", action="store_true")
    ap.add_argument("--py-spy", action="store_true")
    ap.add_argument("--perf", action="store_true")
    ap.add_argument("--extra-src", action="append", default=[], help="extra `kvmlite run` argument (source)")
    ap.add_argument("--extra-dst", action="append", default=[], help="extra `kvmlite run` argument (destination)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--channels", type=int, default=1, help="migrate over N connections")
    args = ap.parse_args()
    runs = []
    for i in range(args.reps):
        r = profile_once(args.hint == "on", args.memory, args.fill, py_spy=args.py_spy, perf=args.perf,
                         tag=f"hint{args.hint}-{i}", extra_src=args.extra_src, extra_dst=args.extra_dst,
                         live=not args.stop_copy, channels=args.channels)
        runs.append(r)
        s = r["stats"]
        print(f"run {i}: total {s['total_ms']:.1f} ms (wall {r['wall_ms']:.0f}), downtime {s['downtime_ms']:.2f} ms "
              f"{s['downtime_parts_ms']}, {s['bytes_wire'] / 2**20:.0f} MiB, "
              f"{s['bytes_wire'] / 2**20 / s['total_ms'] * 1000:.0f} MiB/s, rounds {s['rounds']} {s['round_ms']}")
        for side in ("src", "dst"):
            for t in r[side]:
                if t["cpu_ms"] + t["wait_ms"] < 1:
                    continue
                print(f"   {side} {t['tid']:>7} {t['what']:20s} cpu {t['cpu_ms']:7.1f} ms "
                      f"({t['cpu_ms'] / r['wall_ms']:4.0%})  waiting for a CPU {t['wait_ms']:6.1f} ms "
                      f"({t['wait_ms'] / r['wall_ms']:4.0%})")
    if args.reps > 1:
        tot = [r["stats"]["total_ms"] for r in runs]
        print(f"total ms median {statistics.median(tot):.1f} ({min(tot):.1f}–{max(tot):.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
