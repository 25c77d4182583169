"""Labs 7 and 8: live-migrate a guest on several vCPUs between two kvmlite processes.

    python docs/labs/code/migrate_smp.py --smp 2 --cmdline "workload=sleep ms=400 count=4"
    python docs/labs/code/migrate_smp.py --smp 2 --cmdline "workload=churn pages=5000 rounds=0" --finish
    python docs/labs/code/migrate_smp.py ... --dirty-ring     # the source tracks dirty pages in rings

Like lab 4's script it prints the commands it runs, as three terminals would
(the destination gets no --smp: the vCPU count arrives with the stream),
waits `--after` seconds once the guest has started its CPUs, migrates, and
prints what `kvmlite migrate --json` reported.  Then it lets the guest finish
on the destination (`--finish` asks a workload that runs until told to stop)
and prints what the guest said there: its sleeps, each CPU's own check, its
summary.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from kvmlite.procs import VmProcess, free_port, start_destination

ROOT = Path(__file__).resolve().parents[3]
SHOWN = ("sleep", "ipi:", "KVMLITE-CPU", "KVMLITE-SUMMARY")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--cmdline", default="workload=sleep ms=400 count=4")
    ap.add_argument("--after", type=float, default=0.6, help="seconds to let the guest run before migrating")
    ap.add_argument("--dirty-ring", action="store_true", help="the source tracks dirty pages with rings")
    ap.add_argument("--finish", action="store_true", help="then ask the guest to finish (x-guest-finish)")
    args = ap.parse_args()

    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    dst = start_destination(port)
    print(f"terminal 1: {typed(dst)}")
    src = VmProcess(["guest/guest.bin", "--smp", str(args.smp), "--memory", args.memory,
                     "--cmdline", args.cmdline] + ["--dirty-ring"] * args.dirty_ring)
    print(f"terminal 2: {typed(src)}")
    with src, dst:
        up = src.wait_for(r"^smp: .*", timeout=60)
        print(f"source guest: {up.group(0)}")
        time.sleep(args.after)
        migrate = ["python", "-m", "kvmlite", "migrate", "--monitor", src.monitor_path, uri, "--json"]
        print("terminal 3: " + shlex.join(migrate))
        out = subprocess.run([sys.executable, *migrate[1:]], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            print(out.stdout + out.stderr)
            return 1
        s = json.loads(out.stdout)
        rounds = [r["pages"] for r in s["x-rounds"]]
        print(f"  status {s['status']}, dirty log: {s['x-dirty-log']}, {len(rounds)} round(s): {rounds}")
        syncs = ", ".join(f"{ms:.2f}" for ms in s["x-sync-ms"])
        print(f"  dirty-log syncs in ms: {syncs}")
        print(f"  total {s['x-total-time-ms']:.0f} ms, downtime {s['x-downtime-ms']:.1f} ms: "
              + ", ".join(f"{name} {ms:.1f}" for name, ms in s["x-downtime-parts"].items()))
        source_status = src.wait(30)
        if args.finish:
            dst.execute("x-guest-finish")
        status = dst.wait(120)
        print(f"source exited {source_status}; on the destination:")
        shown = [line for line in dst.stdout_lines if line.startswith(SHOWN)]
        # the CPUs print side by side: their sleep lines in CPU order, then the summary's
        for line in sorted(l for l in shown if l.startswith("sleep")) + [l for l in shown if not l.startswith("sleep")]:
            print("  " + line)
        print(f"destination exited {status}")
        return 0 if status == 0 and source_status == 0 else 1


def typed(vm: VmProcess) -> str:
    """The command line a terminal would show for `vm`."""
    return "python " + shlex.join(vm.args[1:])


if __name__ == "__main__":
    sys.exit(main())
