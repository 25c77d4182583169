"""Lab 4: migrate a running guest between two kvmlite processes on this machine.

    python docs/labs/code/lab4_migrate.py --stop-copy     # pause, then one pass
    python docs/labs/code/lab4_migrate.py                 # live pre-copy
    python docs/labs/code/lab4_migrate.py --bandwidth 8M --max-rounds 8 --json

It runs the same three commands you would type in three terminals (printed
with the terminal's number, exactly as it runs them: a fresh monitor socket
for each VM and a free port), waits for the right moments, and prints the
figures that `kvmlite migrate --json` reports: QMP's query-migrate, QEMU's
MigrationInfo with kvmlite's own figures as x- members (--json: all of it).  The
guest runs workload=fill: live% of RAM holds data it keeps re-writing, stale%
was written and freed (the bitmap says free), the rest was never touched.  At
the end the guest checks every live page on the destination and its exit
status becomes the destination's.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from kvmlite.procs import VmProcess, free_port, start_destination

ROOT = Path(__file__).resolve().parents[3]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="128M")
    ap.add_argument("--live", type=int, default=20, help="percent of RAM the guest keeps live")
    ap.add_argument("--stale", type=int, default=50, help="percent of RAM written, then freed")
    ap.add_argument("--dirty", type=int, default=2000, help="live pages re-written per second")
    ap.add_argument("--stop-copy", action="store_true")
    ap.add_argument("--no-free-page-hint", action="store_true")
    ap.add_argument("--bandwidth", help="kvmlite migrate --bandwidth: the link's limit per second, e.g. 8M")
    ap.add_argument("--max-rounds", type=int, help="kvmlite migrate --max-rounds")
    ap.add_argument("--json", action="store_true", help="also print every figure of the migration")
    args = ap.parse_args()

    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    cmdline = f"workload=fill live={args.live} stale={args.stale} dirty={args.dirty}"
    dst = start_destination(port, args.memory)
    print(f"terminal 1: {typed(dst)}")
    src = VmProcess(["guest/guest.bin", "--memory", args.memory, "--cmdline", cmdline])
    print(f"terminal 2: {typed(src)}")
    with src, dst:
        ready = src.wait_for(r"^fill: ready.*", timeout=60)
        print(f"source guest: {ready.group(0)}")
        before = src.execute("x-query-free-pages")
        print(f"source bitmap: {before['active']} pages active, {before['free']} free, "
              f"of {before['pages-total']}")

        migrate = ["python", "-m", "kvmlite", "migrate", "--monitor", src.monitor_path, uri, "--json"]
        migrate += ["--stop-copy"] * args.stop_copy + ["--no-free-page-hint"] * args.no_free_page_hint
        migrate += ["--bandwidth", args.bandwidth] if args.bandwidth else []
        migrate += ["--max-rounds", str(args.max_rounds)] if args.max_rounds else []
        print("terminal 3: " + shlex.join(migrate))
        out = subprocess.run([sys.executable, *migrate[1:]], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            print(out.stdout + out.stderr)
            return 1
        s = json.loads(out.stdout)                # QMP's query-migrate (docs/monitor.md)
        ram = s["ram"]
        rounds = [r["pages"] for r in s["x-rounds"]]
        transferred = ram["normal"] + ram["duplicate"]
        print(f"  status {s['status']}, {'live' if s['x-live'] else 'stop-copy'}, "
              f"hint {'on' if s['x-free-page-hint'] else 'off'}, {len(rounds)} round(s): {rounds}")
        print(f"  pages: {ram['normal']} with data + {ram['duplicate']} zero = {transferred} "
              f"transferred, {ram['x-resent']} of them more than once, "
              f"{ram['x-skipped-free']} skipped as free")
        print(f"  on the wire {ram['transferred'] / (1 << 20):.1f} MiB; total {s['x-total-time-ms']:.0f} ms, "
              f"downtime {s['x-downtime-ms']:.1f} ms")
        parts = ", ".join(f"{name} {ms:.1f}" for name, ms in s["x-downtime-parts"].items())
        print(f"  downtime in ms: {parts}")
        if s.get("cpu-throttle-percentage"):
            print(f"  the vCPU was throttled to sit out {s['cpu-throttle-percentage']} % of its time")
        distinct = transferred - ram["x-resent"]
        print(f"  distinct pages transferred = active pages before: {distinct == before['active']}")
        if args.json:
            print(json.dumps(s, indent=1))

        source_status = src.wait(30)
        dst.execute("x-guest-finish")            # fill runs until the host asks it to stop
        status = dst.wait(60)
        summary = dst.summary() or {}
        print(f"source exited {source_status}; destination guest exited {status}: "
              f"verified {summary.get('verified')} pages, errors {summary.get('errors')}")
        return 0 if status == 0 and source_status == 0 and summary.get("errors") == 0 else 1


def typed(vm: VmProcess) -> str:
    """The command line a terminal would show for `vm`."""
    return "python " + shlex.join(vm.args[1:])


if __name__ == "__main__":
    sys.exit(main())
