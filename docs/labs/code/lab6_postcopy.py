"""Lab 6: a pre-copy that cannot converge, then post-copy with the free-page hint.

    python docs/labs/code/lab6_postcopy.py --precopy     # pre-copy only: the rounds never shrink
    python docs/labs/code/lab6_postcopy.py               # --postcopy: it switches instead
    python docs/labs/code/lab6_postcopy.py --postcopy-now --no-picture

Boots the churn guest (256 MiB, 6000 slots: each round it frees half of its
live pages, takes as many free ones, fills them and checks every live page)
and a destination, migrates it with `kvmlite migrate --json` over a link
limited to --bandwidth, and prints what the migration and the guest report:
the source's last query-migrate (QEMU's MigrationInfo, kvmlite's figures
under x-postcopy, the destination's under x-postcopy.destination).
With post-copy it also draws the destination's page map (`kvmlite pagemap`),
each page by how it came: by fault, by the push, or, for a page free at the
switch that the guest took afterwards, as a zero page made there.  At the
end the guest checks its memory on the destination; exit status 1 if a page
was lost or a figure is not what the lab says.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from kvmlite.procs import VmProcess, free_port, start_destination

ROOT = Path(__file__).resolve().parents[3]
CMDLINE = "workload=churn pages=6000 rounds=0 free=50"


def kvmlite(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # 80 columns, whatever the terminal: the page map's header wraps the same way every time
    return subprocess.run([sys.executable, "-m", "kvmlite", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "80"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bandwidth", default="20M", help="link limit per second (default 20M)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--precopy", action="store_true", help="pre-copy only (no post-copy)")
    mode.add_argument("--postcopy-now", action="store_true", help="switch at once, no pre-copy round")
    ap.add_argument("--no-picture", action="store_true", help="skip the page map")
    args = ap.parse_args()

    port = free_port()
    dst = start_destination(port)
    src = VmProcess(["guest/guest.bin", "--memory", "256M", "--cmdline", CMDLINE])
    ok = True
    with src, dst:
        src.wait_for(r"^churn: pages=", timeout=60)
        print(f"256M guest, {CMDLINE}; link limited to {args.bandwidth}/s")
        how = (["--max-rounds", "8"] if args.precopy else
               ["--postcopy-now"] if args.postcopy_now else ["--postcopy"])
        cmd = ["migrate", "--monitor", src.monitor_path, f"tcp:127.0.0.1:{port}",
               "--bandwidth", args.bandwidth, *how, "--json"]
        print("running: kvmlite " + " ".join(cmd[:2] + ["SRC.sock"] + cmd[3:]))
        r = kvmlite(*cmd)
        if r.returncode != 0:
            raise SystemExit(f"migration failed:\n{r.stdout}{r.stderr}")
        s = json.loads(r.stdout)            # the source's last query-migrate
        pc = s.get("x-postcopy") or {}
        rounds = [r["pages"] for r in s["x-rounds"]]     # the last pass too, without post-copy
        throttle = s.get("cpu-throttle-percentage", 0)
        print("round   pages sent")
        for i, n in enumerate(rounds[:len(rounds) - (0 if pc else 1)], 1):
            print(f"{i:5d}   {n:10d}")
        if not pc:
            # round 1 sends every page in use; from round 2 on, what the guest re-wrote
            first, last = rounds[1], rounds[-2]
            print(f"pre-copy completed after {len(rounds)} rounds, the last with the vCPU paused")
            print(f"the rounds did not shrink: {last} pages in round {len(rounds) - 1}, "
                  f"{first} in round 2: {'yes' if last * 2 > first else 'NO'}")
            print(f"auto-converge slowed the vCPU by {throttle} %")
            print(f"downtime {s['x-downtime-ms']:.0f} ms (the limit was 5 ms)")
            ok &= last * 2 > first and s["x-downtime-ms"] > 5
        else:
            d = pc["destination"]
            lat = d["remote-latency-us"]
            print(f"post-copy after {len(rounds)} rounds: {pc['switch']}")
            print(f"downtime {s['x-downtime-ms']:.1f} ms; the vCPU was slowed by {throttle} %")
            print(f"at the switch: {pc['pages-pending']} pages still to come, {pc['pages-free']} free "
                  "(never sent)")
            print(f"destination: {d['faults-remote']} faults served by the source (p50 {lat.get('p50')} us, "
                  f"p99 {lat.get('p99')} us), {d['faults-zero-free']} free pages taken by the guest "
                  "and given a zero page there")
            print(f"source: {s['ram']['postcopy-requests']} requests, {pc['requests-for-free']} of them "
                  f"for a free page; {pc['pages-pushed']} pages pushed, {pc['pages-on-request']} sent "
                  "on request")
            print(f"the last page arrived {d['switch-to-last-page-ms']:.0f} ms after the switch")
            ok &= pc["requests-for-free"] == 0 and d["faults-zero-free"] > 0 and throttle == 0
            if not args.no_picture:
                print("page map of the destination:")
                m = kvmlite("pagemap", "--monitor", dst.monitor_path, "--width", "64")
                print(m.stdout, end="")
        src.wait(30)
        dst.execute("x-guest-finish")
        status = dst.wait(120)
        g = dst.summary() or {}
        print(f"the guest checked its memory on the destination: {g.get('corrupted')} corrupted pages, "
              f"exit status {status}")
        ok &= status == 0 and g.get("corrupted") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
