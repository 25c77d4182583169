"""Lab 5: what free page hinting saves as the guest's free share grows.

    python docs/labs/code/lab5_sweep.py
    python docs/labs/code/lab5_sweep.py --memory 512M --stale 0 40 80 --live-mode

For each stale share, boots a guest (workload=fill) whose `live` percent of
RAM holds data and whose `stale` percent was written and then freed, migrates
it once with the hint on and once with it off (`kvmlite migrate --json`),
and prints the bytes on the wire beside a prediction: with the hint on, only
the live pages should travel; with it off, the stale ones too.  Pages never
touched are all zero and cost a few bytes either way.

It ends by checking the shape the theory predicts, within TOLERANCE:
bytes with the hint off grow with the stale share, and bytes with the hint
on stay flat.  Exit status 1 if they do not.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from kvmlite.procs import VmProcess, free_port, start_destination

ROOT = Path(__file__).resolve().parents[3]
PAGE = 4096
MIB = 1 << 20
TOLERANCE = 0.05    # hint on: every run within 5 % of the smallest; off: each step up by > 5 %


def migrate_once(memory: str, live: int, stale: int, hint: bool, stop_copy: bool) -> tuple[dict, dict]:
    """One guest, one migration; returns (the guest's fill figures, the migration's stats)."""
    port = free_port()
    dst = start_destination(port, memory)
    src = VmProcess(["guest/guest.bin", "--memory", memory, "--cmdline",
                     f"workload=fill live={live} stale={stale} dirty=500"])
    with src, dst:
        m = src.wait_for(r"^fill: ready live=(\d+) stale=(\d+)", timeout=60)
        fill = {"live": int(m.group(1)), "stale": int(m.group(2))}
        cmd = [sys.executable, "-m", "kvmlite", "migrate", "--monitor", src.monitor_path,
               f"tcp:127.0.0.1:{port}", "--json"]
        cmd += [] if hint else ["--no-free-page-hint"]
        cmd += ["--stop-copy"] if stop_copy else []
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise SystemExit(f"migration failed:\n{out.stdout}{out.stderr}")
        src.wait(30)
        dst.execute("x-guest-finish")
        if dst.wait(60) != 0:
            raise SystemExit(f"the guest failed its check on the destination:\n{dst.output()}")
        return fill, json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--live", type=int, default=10, help="percent of RAM kept live")
    ap.add_argument("--stale", type=int, nargs="+", default=[0, 25, 50, 75],
                    help="stale shares to try, percent of RAM (live + stale <= 100)")
    ap.add_argument("--live-mode", action="store_true", help="live pre-copy instead of stop-copy")
    args = ap.parse_args()

    print(f"{args.memory} guest, {args.live} % live, {'live' if args.live_mode else 'stop-copy'} migration")
    print("stale %   predicted MiB on/off   sent MiB hint on   sent MiB hint off   off/on")
    on, off = [], []
    for stale in args.stale:
        fill, s_on = migrate_once(args.memory, args.live, stale, True, not args.live_mode)
        _, s_off = migrate_once(args.memory, args.live, stale, False, not args.live_mode)
        on.append(s_on["ram"]["transferred"])       # query-migrate's bytes on the wire
        off.append(s_off["ram"]["transferred"])
        predicted_on = fill["live"] * PAGE / MIB
        predicted_off = (fill["live"] + fill["stale"]) * PAGE / MIB
        print(f"{stale:7d}   {predicted_on:9.1f} / {predicted_off:6.1f}   {on[-1] / MIB:16.1f}   "
              f"{off[-1] / MIB:17.1f}   {off[-1] / on[-1]:6.2f}")

    flat = max(on) <= min(on) * (1 + TOLERANCE)
    grows = all(b > a * (1 + TOLERANCE) for a, b in zip(off, off[1:]))
    print(f"hint on stays flat (all within {TOLERANCE:.0%} of the smallest): {'yes' if flat else 'NO'}")
    print(f"hint off grows with the stale share (each step > {TOLERANCE:.0%} more): {'yes' if grows else 'NO'}")
    return 0 if flat and grows else 1


if __name__ == "__main__":
    sys.exit(main())
