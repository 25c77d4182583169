"""`make demo`: two kvmlite processes on this machine, one live migration mid-workload.

The source boots guest/guest.bin running the churn workload (allocate, fill,
free, verify); after a few rounds it is live-migrated to a destination process
with free page hinting.  The guest finishes on the destination, checks all of
its memory there, and its exit status becomes the demo's.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from . import exitcodes
from .images import image_or_say
from .tools.migrate import migrate, print_stats
from .procs import VmProcess, free_port, start_destination


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmlite.demo", description=__doc__)
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--pages", type=int, default=40000, help="churn working set, in pages")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--migrate-after", type=int, default=15, help="churn round to migrate at")
    ap.add_argument("--image", help="the guest image (default: the checkout's guest/guest.bin, "
                    "else the one packaged with kvmlite)")
    args = ap.parse_args(argv)
    args.image = image_or_say(args.image, "kvmlite demo")
    if args.image is None:
        return exitcodes.NOINPUT
    con = Console(highlight=False)
    cmdline = f"workload=churn pages={args.pages} rounds={args.rounds} free=50"
    port = free_port()
    con.rule("[bold]kvmlite demo: live migration with free page hinting")
    con.print(f"destination: kvmlite run --incoming tcp:127.0.0.1:{port} --memory {args.memory}")
    dst = start_destination(port, args.memory, echo="[dst] ")
    con.print(f"source:      kvmlite run {args.image} --memory {args.memory} --cmdline \"{cmdline}\"")
    src = VmProcess([args.image, "--memory", args.memory, "--cmdline", cmdline], echo="[src] ")
    try:
        src.wait_for(rf"^churn: round {args.migrate_after}/", timeout=300)
        free = src.execute("x-query-free-pages")
        con.print(f"\n[bold]migrating[/bold] at churn round {args.migrate_after}: the guest's bitmap says "
                  f"{free['active']} pages active, {free['free']} free of {free['pages-total']}\n")
        # what `kvmlite migrate` does over QMP: migrate, follow query-migrate, quit the source
        info = migrate(f"unix:{src.monitor_path}", f"tcp:127.0.0.1:{port}")
        src_rc = src.wait(60)
        rc = dst.wait(600)
        con.print()
        print_stats(info)
        summary = dst.summary() or {}
        ram = info["ram"]
        con.print(f"RAM {ram['total'] / (1 << 20):.0f} MiB; on the wire {ram['transferred'] / (1 << 20):.1f} MiB "
                  f"({ram['transferred'] / ram['total']:.1%} of RAM); "
                  f"{ram['x-skipped-free']} free pages never sent")
        if src_rc == 0:
            con.print("source exited 0: the destination confirmed it was running, then the "
                      "source, in postmigrate, was told to quit")
        else:
            con.print(f"[red]source exited {src_rc}:[/red]\n" + "\n".join(src.stderr_lines[-10:]))
        ok = rc == 0 and summary.get("errors") == 0
        con.print(f"[bold {'green' if ok else 'red'}]guest finished on the destination: exit status {rc}, "
                  f"verified {summary.get('verified')} pages, errors {summary.get('errors')}")
        return rc
    finally:
        src.kill()
        dst.kill()


if __name__ == "__main__":
    sys.exit(main())
