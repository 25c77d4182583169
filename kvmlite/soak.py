"""`make soak`: live-migrate a churning guest back and forth, many times, and count lost pages.

The guest runs `workload=churn rounds=0`: it allocates, fills, frees and
verifies pages as fast as it can, forever, so its free bits flip while every
pre-copy round reads them.  Each migration goes to a fresh destination
process, which becomes the next source.  At the end the guest checks every
live page once more and reports how many pages it ever found corrupted.

    python -m kvmlite.soak --migrations 1000
    python -m kvmlite.soak --migrations 100 --postcopy   # each one switches to post-copy at once
    python -m kvmlite.soak --migrations 100 --smp 2              # allocators on both CPUs at once
    python -m tests.harness soak --migrations 5 --broken-order   # the race claim 2 prevents

With --postcopy every migration moves the vCPU at once (x-postcopy-now) and
its pages follow under userfaultfd (docs/postcopy.md); the soak also counts
requests for pages that were free at the switch, which must stay 0.

The broken order lives with the tests (tests/harness.py), not in kvmlite: its
soak starts every VMM through the harness, which gives it a sender that reads
the free bits before clearing the dirty log, and pages go missing.  Exit
status: 0 when no page was corrupted and every migration completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from . import exitcodes
from .images import default_guest, image_or_say
from .procs import KVMLITE, VmProcess, free_port, start_destination
from .tools.migrate import run_migration


def soak(migrations: int, *, memory: str = "1G", pages: int = 12000, image: str | None = None,
         log=print, vmm=KVMLITE, label: str = "", extra=(), smp: int = 1,
         postcopy: bool = False) -> dict:
    """Run the soak; returns its figures (see main for their meaning).  `vmm` is
    the command that starts each VMM (the test harness injects a sender there);
    `extra`, options every VMM gets.  With `smp` > 1 the guest churns on every
    CPU, `pages` slots in all; the destinations learn the vCPU count from the stream.
    `postcopy`: every migration switches to post-copy at once."""
    image = image or str(default_guest())
    cmdline = f"workload=churn pages={max(pages // smp, 1)} rounds=0 free=50"
    vm = VmProcess([image, "--memory", memory, "--smp", str(smp), "--cmdline", cmdline, *extra], vmm=vmm)
    t0 = time.perf_counter()
    done, failed, downtimes, sent, errors = 0, 0, [], 0, []
    # post-copy's counters, summed over the migrations (query-migrate's names)
    pc = {"pages-pending": 0, "requests": 0, "requests-for-free": 0, "faults-zero-free": 0,
          "faults-remote": 0}
    old = []
    try:
        vm.wait_for(r"^churn: pages=", timeout=60)
        nxt = start_destination(free_port(), None, vmm=vmm, extra=extra)
        for i in range(1, migrations + 1):
            uri = nxt.args[nxt.args.index("--incoming") + 1]
            s = _migrate(vm, uri, postcopy=postcopy)
            if s["status"] == "completed":
                done += 1
                downtimes.append(s["x-downtime-ms"])
                sent += s["ram"]["normal"] + s["ram"]["duplicate"]
                p = s.get("x-postcopy") or {}
                if postcopy and not p:
                    errors.append(f"migration {i}: completed without switching to post-copy")
                for k in ("pages-pending", "requests-for-free"):
                    pc[k] += p.get(k, 0)
                pc["requests"] += s["ram"].get("postcopy-requests", 0)
                for k in ("faults-zero-free", "faults-remote"):
                    pc[k] += (p.get("destination") or {}).get(k, 0)
                old.append(vm)
                vm, nxt = nxt, None
                vm.wait_monitor()
            else:
                failed += 1
                errors.append(s.get("error-desc") or s["status"])
                nxt.kill()
            # the next destination is waiting by the time this one is needed
            nxt = start_destination(free_port(), None, vmm=vmm, extra=extra)
            for p in old:
                try:
                    if p.wait(30) != 0:
                        errors.append(f"migration {i}: the source exited {p.proc.returncode}")
                except subprocess.TimeoutExpired:
                    errors.append(f"migration {i}: the source did not exit after migrating")
                    p.kill()
            old.clear()
            if log and (i % 50 == 0 or i == migrations):
                log(f"soak: {i}/{migrations} migrations, {failed} failed, "
                    f"{time.perf_counter() - t0:.0f} s")
        nxt.kill()
        vm.execute("x-guest-finish")
        rc = vm.wait(120)
        summary = vm.summary() or {}
    finally:
        vm.kill()
        for p in old:
            p.kill()
    return {
        "migrations": migrations, "completed": done, "failed": failed, "failures": errors[:5],
        "seconds": round(time.perf_counter() - t0, 1),
        "pages_sent": sent,
        "downtime_ms_median": round(statistics.median(downtimes), 2) if downtimes else None,
        "downtime_ms_max": round(max(downtimes), 2) if downtimes else None,
        "guest_exit_status": rc,
        "guest_pages_verified": summary.get("verified"),
        "guest_errors": summary.get("errors"),
        "corrupted_pages": summary.get("corrupted"),
        "cpus": summary.get("cpus", 1),
        "vmm": label or "kvmlite",
        **({f"postcopy_{k.replace('-', '_')}": v for k, v in pc.items()} if postcopy else {}),
    }


def _migrate(vm: VmProcess, uri: str, timeout: float = 120.0, postcopy: bool = False) -> dict:
    """Migrate `vm` to `uri` over its monitor and quit it once it is in
    postmigrate (kvmlite migrate's steps); the final query-migrate.
    `postcopy`: switch to post-copy at once (postcopy-ram, x-postcopy-now)."""
    with vm.client() as client:
        return run_migration(client, uri, timeout=timeout, interval=0.005,
                             postcopy=postcopy, postcopy_now=postcopy)


def main(argv=None, *, vmm=KVMLITE, label: str = "", prog: str = "python -m kvmlite.soak",
         extra_options=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--migrations", type=int, default=20)
    ap.add_argument("--memory", default="1G",
                    help="guest RAM; several 256 MiB chunks make the broken order bite")
    ap.add_argument("--pages", type=int, default=12000, help="churn slots (working set, all CPUs')")
    ap.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs of the guest, each churning")
    ap.add_argument("--dirty-ring", action="store_true",
                    help="every VMM tracks dirty pages with the vCPUs' dirty rings")
    ap.add_argument("--auth-key", metavar="FILE",
                    help="every VMM holds this key: the links are keyed, and page data carries "
                    "integrity tags (docs/wire-format.md)")
    ap.add_argument("--postcopy", action="store_true",
                    help="every migration switches to post-copy at once (docs/postcopy.md)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--image", help="the guest image (default: the checkout's guest/guest.bin, "
                    "else the one packaged with kvmlite)")
    if extra_options:
        extra_options(ap)
    args = ap.parse_args(argv)
    args.image = image_or_say(args.image, "kvmlite soak")
    if args.image is None:
        return exitcodes.NOINPUT
    if callable(vmm):
        vmm, label = vmm(args)
    extra = ("--auth-key", args.auth_key) if args.auth_key else ()
    if args.dirty_ring:
        extra += ("--dirty-ring",)
    r = soak(args.migrations, memory=args.memory, pages=args.pages, image=args.image, vmm=vmm,
             label=label, extra=extra,
             smp=args.smp, postcopy=args.postcopy,
             log=None if args.json else lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table
        t = Table(title="migration soak" + (f" ({r['vmm']})" if label else ""))
        t.add_column("figure")
        t.add_column("value", justify="right")
        for k, v in r.items():
            t.add_row(k.replace("_", " "), str(v))
        Console().print(t)
        print(f"corrupted pages: {r['corrupted_pages']}")
    ok = r["corrupted_pages"] == 0 and r["guest_errors"] == 0 and r["failed"] == 0 \
        and r["guest_exit_status"] == 0 and not r["failures"] \
        and r.get("postcopy_requests_for_free", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
