"""Local migration that copies nothing, against the same migration over TCP, same run.

For each case: a guest booted with `--memory-backend memfd`, `workload=fill`,
migrated locally (QMP: the x-local capability, then `migrate unix:PATH`; the
CLI's `migrate --local`) to a destination on this host, and the same guest
(anonymous RAM) migrated live over loopback TCP with the free page hint, the
destination faulting in only the pages that arrive (as bench/scaling.py).
Both are driven over QMP as `kvmlite migrate` drives them
(kvmlite/tools/migrate.py).  Figures per run, from the source's
query-migrate: total and downtime (x-total-time-ms, x-downtime-ms: pause →
the destination's RUNNING; for the local case that includes the
destination's punching of the free pages, which it does after COMMIT and
before the guest resumes), bytes on the wire; then the destination's RSS and,
for the memfd, the bytes it holds at the source before and at the
destination after the punch (query-memdev's x-allocated, the memfd's
st_blocks).  The guest's self-check must pass on the destination.

    python -m bench.local [--reps 5] [--only N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
GUEST = ROOT / "guest" / "guest.bin"
# (label, memory, fill arguments, downtime limit ms (downtime-limit: whole ms), extra `run` arguments): the
# goal's case first.  A local migration punches free pages within the limit
# (~1.5 us a page): with 512 MiB of stale pages, 5 ms gives back a little of
# it, 1 s all of it.
CASES = [("16 GiB, 64 MiB live", "16G", "live_pages=16384 stale=0", 5, ()),
         ("1 GiB, 25 % live + 50 % stale", "1G", "live=25 stale=50", 5, ()),
         ("1 GiB, 25 % live + 50 % stale, limit 1 s", "1G", "live=25 stale=50", 1000, ()),
         ("1 GiB, 2 vCPUs, 25 % live + 50 % stale", "1G", "live=25 stale=50", 5, ("--smp", "2"))]


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _memfd_bytes(vm) -> int | None:
    """The bytes the VM's RAM memfd holds (QMP query-memdev's x-allocated)."""
    return vm.execute("query-memdev")[0].get("x-allocated")


def one(memory: str, fill: str, local: bool, downtime_ms: int, extra=()) -> dict:
    from kvmlite.procs import VmProcess, free_port, start_destination
    from kvmlite.tools.migrate import configure, finish, follow, start

    from bench.qmpmig import figures
    cmd = f"workload=fill {fill} dirty=1000"
    if local:
        path = tempfile.mktemp(prefix="kvmlite-local-", suffix=".sock")
        dst = VmProcess(["--incoming", f"unix:{path}"])
        dst.wait_for(r"waiting for a migration", timeout=60, stream="stderr")
        src = VmProcess([str(GUEST), "--memory", memory, "--memory-backend", "memfd", "--cmdline", cmd,
                         *extra])
        uri = f"unix:{path}"
    else:
        port = free_port()
        dst = start_destination(port)
        src = VmProcess([str(GUEST), "--memory", memory, "--cmdline", cmd, *extra])
        uri = f"tcp:127.0.0.1:{port}"
    try:
        live = int(src.wait_for(r"^fill: ready live=(\d+)", timeout=300).group(1))
        src_allocated = _memfd_bytes(src) if local else None
        with src.client() as c:
            configure(c, downtime_ms=downtime_ms, local=local)
            start(c, uri)
            info = follow(c, timeout=300, interval=0.002)
            finish(c, info)           # quit the source, left in postmigrate
        if info["status"] != "completed":
            raise RuntimeError(f"{info['status']}: {info.get('error-desc')}\n{src.output()}\n{dst.output()}")
        s = figures(info)
        src.proc.wait(60)
        punch_ms = 0.0
        if local:
            line = dst.wait_for(r"RAM handed over", stream="stderr").string
            m = re.search(r"punched out in \d+ ranges \(([\d.]+) ms\)", line)
            punch_ms = float(m.group(1)) if m else 0.0
        dst.wait_monitor()
        time.sleep(0.05)
        r = {"total_ms": s["vmm_total_ms"], "downtime_ms": s["vmm_downtime_ms"], "punch_ms": punch_ms,
             "bytes_wire": s["bytes_wire"], "pages_sent": s["pages_sent"] + s["pages_zero"],
             "live_pages": live, "dst_rss_kib": _status_kib(dst.proc.pid, "VmRSS"),
             "dst_memfd_bytes": _memfd_bytes(dst) if local else None,
             "src_memfd_bytes": src_allocated, "downtime_parts_ms": s.get("downtime_parts_ms", {}),
             "setup_ms": s["vmm_setup_ms"]}
        dst.execute("x-guest-finish")
        rc = dst.proc.wait(300)
        for t in dst._readers:
            t.join(5)
        summ = dst.summary()
        if rc != 0 or not summ or summ.get("errors") != 0:
            raise RuntimeError(f"guest failed after migration ({rc}): {summ}\n{dst.output()}")
        return r
    finally:
        src.kill()
        dst.kill()


def med(rs, key):
    v = [r[key] for r in rs]
    return statistics.median(v), min(v), max(v)


def main() -> int:
    from rich.console import Console
    from rich.table import Table
    ap = argparse.ArgumentParser(prog="python -m bench.local", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", type=int, help="run only case N (0-based)")
    args = ap.parse_args()
    console = Console(width=160)
    cases = CASES if args.only is None else [CASES[args.only]]
    results = {"loadavg_start": os.getloadavg()[0]}
    for label, memory, fill, limit, extra in cases:
        runs = {"local": [], "tcp": []}
        for _ in range(args.reps):
            for kind in ("local", "tcp"):         # interleaved: the same noise for both
                r = one(memory, fill, kind == "local", limit, extra)
                runs[kind].append(r)
                console.print(f"  {label:42s} {kind:5s} total {r['total_ms']:7.1f} ms  downtime "
                              f"{r['downtime_ms']:6.2f} ms (punch {r['punch_ms']:.2f})  "
                              f"{r['bytes_wire'] / 2**20:7.2f} MiB  dst RSS {r['dst_rss_kib'] / 1024:6.0f} MiB"
                              + (f"  memfd {r['src_memfd_bytes'] / 2**20:.0f} -> "
                                 f"{r['dst_memfd_bytes'] / 2**20:.0f} MiB"
                                 if r["dst_memfd_bytes"] is not None else "")
                              + f"  setup {r['setup_ms']:.1f} ms, downtime parts {r['downtime_parts_ms']}",
                              highlight=False)
        results[label] = runs
        t = Table(title=f"{label}: local (memfd handed over) against TCP with the hint, medians of "
                        f"{args.reps} (min–max), downtime limit {limit:g} ms", title_justify="left")
        for col in ("how", "total ms", "downtime ms", "of it punch ms", "MiB on the wire",
                    "pages copied", "dst RSS MiB", "memfd MiB src → dst"):
            t.add_column(col, justify="right" if col != "how" else "left")
        for kind in ("local", "tcp"):
            rs = runs[kind]
            tot, down, pun = med(rs, "total_ms"), med(rs, "downtime_ms"), med(rs, "punch_ms")
            mem = (f"{statistics.median(r['src_memfd_bytes'] for r in rs) / 2**20:.0f} → "
                   f"{statistics.median(r['dst_memfd_bytes'] for r in rs) / 2**20:.0f}") if kind == "local" else ""
            t.add_row(kind, f"{tot[0]:.1f} ({tot[1]:.1f}–{tot[2]:.1f})",
                      f"{down[0]:.2f} ({down[1]:.2f}–{down[2]:.2f})", f"{pun[0]:.2f}",
                      f"{med(rs, 'bytes_wire')[0] / 2**20:.2f}", f"{med(rs, 'pages_sent')[0]:,.0f}",
                      f"{med(rs, 'dst_rss_kib')[0] / 1024:.0f}", mem)
        lo, tc = runs["local"], runs["tcp"]
        t.add_row("local / tcp", f"{med(lo, 'total_ms')[0] / med(tc, 'total_ms')[0]:.2f}×",
                  f"{med(lo, 'downtime_ms')[0] / med(tc, 'downtime_ms')[0]:.2f}×", "",
                  f"{med(lo, 'bytes_wire')[0] / med(tc, 'bytes_wire')[0]:.4f}×", "",
                  f"{med(lo, 'dst_rss_kib')[0] / med(tc, 'dst_rss_kib')[0]:.2f}×", "")
        console.print(t)
        console.print(f"live pages {lo[0]['live_pages']:,} = {lo[0]['live_pages'] * 4096 / 2**20:.0f} MiB; "
                      "downtime = the source's pause → the destination's RUNNING, which for a local "
                      "migration comes after the punch", highlight=False)
    results["loadavg_end"] = os.getloadavg()[0]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "local.json").write_text(json.dumps(results, indent=1))
    console.print(f"1-minute load average {results['loadavg_start']:.2f} at the start, "
                  f"{results['loadavg_end']:.2f} at the end; results: {OUT / 'local.json'}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
