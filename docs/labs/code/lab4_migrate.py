"""Lab 4: migrate a running guest between two kvmlite processes on this machine.

    python docs/labs/code/lab4_migrate.py --stop-copy     # pause, then one pass
    python docs/labs/code/lab4_migrate.py                 # live pre-copy

It runs the same three commands you would type in three terminals (printed
with the terminal's number), waits for the right moments, and prints the figures that
`kvmlite migrate --json` reports.  The guest runs workload=fill: live% of RAM
holds data it keeps re-writing, stale% was written and freed (the bitmap says
free), the rest was never touched.  At the end the guest checks every live
page on the destination and its exit status becomes the destination's.
"""

import argparse
import json
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
    args = ap.parse_args()

    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    cmdline = f"workload=fill live={args.live} stale={args.stale} dirty={args.dirty}"
    print(f"terminal 1: python -m kvmlite run --incoming {uri} --memory {args.memory}")
    dst = start_destination(port, args.memory)
    src = VmProcess(["guest/guest.bin", "--memory", args.memory, "--cmdline", cmdline])
    print(f'terminal 2: python -m kvmlite run guest/guest.bin --memory {args.memory} --cmdline "{cmdline}" '
          f"--monitor unix:{src.monitor_path}")
    with src, dst:
        ready = src.wait_for(r"^fill: ready.*", timeout=60)
        print(f"source guest: {ready.group(0)}")
        before = src.execute("query-free-pages")
        print(f"source bitmap: {before['active']} pages active, {before['free']} free, "
              f"of {before['pages_total']}")

        migrate = ["python", "-m", "kvmlite", "migrate", "--monitor", src.monitor_path, uri, "--json"]
        migrate += ["--stop-copy"] * args.stop_copy + ["--no-free-page-hint"] * args.no_free_page_hint
        print("terminal 3: " + " ".join(migrate))
        out = subprocess.run([sys.executable, *migrate[1:]], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            print(out.stdout + out.stderr)
            return 1
        s = json.loads(out.stdout)
        print(f"  status {s['status']}, {'live' if s['live'] else 'stop-copy'}, "
              f"hint {'on' if s['hint'] else 'off'}, {s['rounds']} round(s): {s['round_pages']}")
        print(f"  pages: {s['pages_sent']} with data + {s['pages_zero']} zero = {s['pages_transferred']} "
              f"transferred, {s['pages_resent']} of them more than once, "
              f"{s['pages_skipped_free']} skipped as free")
        print(f"  on the wire {s['bytes_wire'] / (1 << 20):.1f} MiB; total {s['total_ms']:.0f} ms, "
              f"downtime {s['downtime_ms']:.1f} ms")
        distinct = s["pages_transferred"] - s["pages_resent"]
        print(f"  distinct pages transferred = active pages before: {distinct == before['active']}")

        source_status = src.wait(30)
        dst.execute("guest-finish")              # fill runs until the host asks it to stop
        status = dst.wait(60)
        summary = dst.summary() or {}
        print(f"source exited {source_status}; destination guest exited {status}: "
              f"verified {summary.get('verified')} pages, errors {summary.get('errors')}")
        return 0 if status == 0 and source_status == 0 and summary.get("errors") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
