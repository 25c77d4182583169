"""Post-copy: `make bench-postcopy` (docs/postcopy.md; issue 13's table).

    python -m bench.postcopy                 # all three tables
    python -m bench.postcopy --only 3        # the comparison only
    python -m bench.postcopy --quick         # smaller, for a smoke run

Table 1, the fault machinery alone (no vCPU, no /dev/kvm): a source process
serves N MiB of RAM with kvmlite's PostcopySender; this process registers its
own N MiB with PostcopyIncoming and one thread touches pages in random order
(one byte each, without the GIL, as a vCPU would), timing every touch.  A
quarter of the pages are free at the switch.  Rows:
  * requests only: the source does not push; every page still to come is a
    remote fault: the bare round trip, the baseline of the other rows;
  * push with MAX_INFLIGHT of 64 KiB, 128 KiB (the default) and 1 MiB: the
    background push runs, and a request waits behind what is queued;
  * the push alone, nothing touched: what the push moves per second.
Latency is what the touching thread saw (fault to return, its wake-up
included); "engine" is the C fault thread's own timing (request sent to page
placed).  Every page's contents are checked afterwards.

Table 2, the real guest: `kvmlite run` twice and `kvmlite migrate` move the
churning guest by post-copy, at once and after two rounds; its self-check
must pass.  The destination's faults by kind, the remote-fault latency, the
downtime in parts, and the source's requests for pages free at the switch
(always 0).

Table 3, the issue's comparison: a 1 GiB guest, 25 % live + 50 % stale,
re-writing its live pages faster than a 64 MiB/s link carries them, so that
pre-copy cannot converge; kvmlite post-copy (hint on, hint off, at once or
when not converging), kvmlite pre-copy with auto-converge, and QEMU 7.2's
post-copy (when qemu-system-x86_64 is installed), interleaved, medians.
Both VMMs are migrated by the same QMP client code (bench/qmpmig.py:
postcopy-ram on both sides, max-bandwidth, migrate, migrate-start-postcopy)
and read from the same query-migrate fields and events.

Figures are printed, never asserted: timings on this shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PY = sys.executable
console = Console(width=max(Console().width, 200))
FREE_EVERY = 4                  # page i is free at the switch when i % 4 == 3
PATTERN = np.uint64(0x9E3779B97F4A7C15)


def _sets(npages: int):
    from kvmlite.bitmap import mask_to_words
    free = (np.arange(npages) % FREE_EVERY) == FREE_EVERY - 1
    pending = ~free
    return mask_to_words(pending), mask_to_words(free), pending, free


def _fill(mem) -> None:
    """Page i, word w holds (i << 20 | w) * PATTERN: a misplaced page shows."""
    words = np.frombuffer(mem.view, dtype=np.uint64).reshape(mem.npages, 512)
    words[:] = ((np.arange(mem.npages, dtype=np.uint64)[:, None] << np.uint64(20))
                | np.arange(512, dtype=np.uint64)) * PATTERN


# ---- the source process of table 1 ------------------------------------------------------

def serve(args) -> int:
    from kvmlite.migration import transport
    from kvmlite.migration.postcopy import PostcopySender
    from kvmlite.vstate.memory import GuestMemory
    mem = GuestMemory(args.mib << 20)
    _fill(mem)
    pending, free, _, _ = _sets(mem.npages)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    conn.settimeout(30)
    sender = PostcopySender(mem, transport.SocketSink(conn), pending, free,
                            max_inflight=args.inflight, push=bool(args.push), push_batch=args.batch)
    stats = sender.run()
    print(json.dumps(stats.__dict__), flush=True)
    return 0


# ---- table 1: this process is the destination --------------------------------------------

def synthetic(mib: int, push: bool, inflight: int, touches: int, batch: int = 32) -> dict:
    from kvmlite._postcopy import ffi, lib
    from kvmlite.migration.postcopy import PostcopyIncoming
    from kvmlite.vstate.memory import GuestMemory
    src = subprocess.Popen([PY, "-m", "bench.postcopy", "serve", "--mib", str(mib),
                            "--inflight", str(inflight), "--push", str(int(push)),
                            "--batch", str(batch)],
                           cwd=ROOT, stdout=subprocess.PIPE, text=True)
    port = int(src.stdout.readline())
    mem = GuestMemory(mib << 20)
    pending_w, free_w, pending, free = _sets(mem.npages)
    pc = PostcopyIncoming(mem, pending_w, free_w, present=np.zeros(mem.npages, bool))
    pc.start()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pc.attach(sock)
    rng = np.random.default_rng(1)
    order = rng.permutation(mem.npages)
    if not push:
        touches = mem.npages        # every page is touched, so every page gets asked for
    order = order[:touches]
    base = int(ffi.cast("uintptr_t", mem.pointer))
    kinds, lat = [], []
    touch = lib.kvmlite_touch
    clock = time.perf_counter_ns
    state = pc.state
    for p in order.tolist():
        before = int(state[p])
        t0 = clock()
        touch(ffi.cast("void *", base + (p << 12)), 1, 4096)
        lat.append(clock() - t0)
        kinds.append(before)
    link = pc.wait(60)
    sstats = json.loads(src.stdout.readline() or "{}")
    src.wait(10)
    st = pc.stats()
    engine = pc.latencies_us()
    pc.finish()
    # every page still to come must hold the source's data
    words = np.frombuffer(mem.view, dtype=np.uint64).reshape(mem.npages, 512)
    expect = ((np.arange(mem.npages, dtype=np.uint64)[:, None] << np.uint64(20))
              | np.arange(512, dtype=np.uint64)) * PATTERN
    bad = int(np.count_nonzero((words != expect).any(axis=1) & pending))
    kinds = np.array(kinds)
    lat = np.array(lat) / 1000.0
    remote = lat[kinds == lib.KVMLITE_PC_PENDING]
    zero = lat[kinds == lib.KVMLITE_PC_FREE]
    sock.close()
    mem.close()

    def pct(a, q):
        return round(float(np.percentile(a, q)), 1) if len(a) else None
    return {"mib": mib, "push": push, "inflight": inflight, "link": link,
            "touches": len(order), "remote": len(remote), "remote_p50": pct(remote, 50),
            "remote_p99": pct(remote, 99), "remote_max": pct(remote, 100),
            "engine_p50": pct(engine, 50), "engine_p99": pct(engine, 99),
            "zero_faults": st.faults_zero_free, "zero_p50": pct(zero, 50), "zero_p99": pct(zero, 99),
            "requests_for_free": sstats.get("requests_for_free"),
            "requests_already_sent": sstats.get("requests_already_sent"),
            "pages_pending": st.pages_pending, "bad_pages": bad,
            "switch_to_last_page_ms": st.switch_to_last_page_ms,
            # every page still to come, over the time until the last one was here
            "push_mb_s": round(st.bytes_received / (1 << 20)
                               / max((st.switch_to_last_page_ms or 0) / 1000, 1e-9), 1)}


def table1(quick: bool) -> list[dict]:
    mib = 64 if quick else 256
    touches = 4000 if quick else 20000
    rows = [synthetic(mib, False, 0, touches)]
    for inflight in (64 << 10, 128 << 10, 1 << 20):
        rows.append(synthetic(mib, True, inflight, touches))
    rows.append(synthetic(mib, True, 128 << 10, 0))       # the push alone: its throughput
    base = rows[0]["remote_p50"] or 1
    t = Table(title=f"Post-copy fault machinery, {mib} MiB over loopback, 1/{FREE_EVERY} of pages "
                    f"free at the switch, random touches from one thread (µs)")
    for col in ("source push", "remote faults", "p50", "p99", "max", "p50 / requests-only",
                "engine p50", "engine p99", "zero-page faults", "zero p50", "zero p99",
                "free pages requested", "pages bad", "push MB/s", "switch → last page ms"):
        t.add_column(col, justify="right")
    for r in rows:
        push = "requests only" if not r["push"] else f"MAX_INFLIGHT {r['inflight'] >> 10} KiB"
        if r["touches"] == 0:
            push += ", no touches"
        ratio = f"{r['remote_p50'] / base:.2f}×" if r["remote_p50"] else "-"
        t.add_row(push, str(r["remote"]), str(r["remote_p50"]), str(r["remote_p99"]),
                  str(r["remote_max"]), ratio, str(r["engine_p50"]), str(r["engine_p99"]),
                  str(r["zero_faults"]), str(r["zero_p50"]), str(r["zero_p99"]),
                  str(r["requests_for_free"]), str(r["bad_pages"]), str(r["push_mb_s"]),
                  str(r["switch_to_last_page_ms"]))
    console.print(t)
    return rows


# ---- kvmlite between two processes ------------------------------------------------------

def kvmlite_run(memory: str, cmdline: str, migrate_args: list[str], ready: str,
                finish: bool = True) -> dict:
    """`kvmlite run` twice and `kvmlite migrate --json ARGS`; the guest finishes on the
    destination and must pass its self-check.  Returns the source's last
    query-migrate, with the guest's summary and the destination's query-migrate
    under "destination_query"."""
    from kvmlite.procs import VmProcess, free_port, start_destination
    port = free_port()
    dst = start_destination(port)
    src = VmProcess(["guest/guest.bin", "--memory", memory, "--cmdline", cmdline])
    with src, dst:
        src.wait_for(ready, timeout=300)
        r = subprocess.run([PY, "-m", "kvmlite", "migrate", "--monitor", src.monitor_path,
                            f"tcp:127.0.0.1:{port}", "--json", *migrate_args],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
        s = json.loads(r.stdout)
        if s["status"] != "completed":
            raise RuntimeError(f"kvmlite migration {s['status']}: {s.get('error-desc')}\n{r.stderr}")
        s["destination_query"] = dst.execute("query-migrate")
        src.wait(60)
        if finish:
            dst.execute("x-guest-finish")
        rc = dst.wait(300)
        g = dst.summary() or {}
        if rc != 0 or g.get("errors") != 0 or g.get("corrupted", 0) != 0:
            raise RuntimeError(f"the guest failed on the destination ({rc}): {g}\n{dst.output()}")
        s["guest"] = g
        return s


def table2(quick: bool) -> list[dict]:
    """The real guest (churn, flat out) moved by post-copy at once and after two rounds."""
    memory = "256M" if quick else "1G"
    pages = 12000 if quick else 40000
    cmd = f"workload=churn pages={pages} rounds=0 free=50"
    rows = []
    for label, args in (("at once", ["--postcopy-now"]), ("after 2 rounds", ["--postcopy-after", "2"])):
        s = kvmlite_run(memory, cmd, args, r"^churn: pages=")
        s["label"] = label
        rows.append(s)
    t = Table(title=f"Post-copy of the real guest ({memory}, {cmd}), loopback, one connection")
    for col in ("switch", "guest", "pages to come", "free at switch", "downtime ms", "downtime parts ms",
                "remote faults", "p50 µs", "p99 µs", "max µs", "local zero-page faults",
                "free pages requested", "switch → last page ms"):
        t.add_column(col, justify="right")
    for r in rows:
        pc = r["x-postcopy"]
        d = pc["destination"]
        lat = d["remote-latency-us"]
        parts = " ".join(f"{k} {v:.1f}" for k, v in r["x-downtime-parts"].items())
        t.add_row(r["label"], f"ok, {r['guest']['corrupted']} corrupted", str(pc["pages-pending"]),
                  str(pc["pages-free"]), f"{r['x-downtime-ms']:.1f}", parts, str(d["faults-remote"]),
                  str(lat.get("p50")), str(lat.get("p99")), str(lat.get("max")),
                  str(d["faults-zero-free"]), str(pc["requests-for-free"]),
                  str(d["switch-to-last-page-ms"]))
    console.print(t)
    return [{k: v for k, v in r.items() if k != "destination_query"} for r in rows]


# ---- table 3: the issue's comparison -------------------------------------------------------

MEMORY_MIB = 1024
FILL = "live=25 stale=50"
DIRTY = 25000                  # pages/s the guest re-writes: ~98 MiB/s
BANDWIDTH_MIB = 64             # the link: the guest dirties faster than it carries
QEMU_SECONDS = 60              # the guest's lifetime under QEMU (no hint device to stop it)
ON = "kvmlite post-copy now, hint on"
PRE = "kvmlite pre-copy + auto-converge"
QEMU = "QEMU 7.2 post-copy now"


def table3(quick: bool, reps: int) -> dict:
    """1 GiB, 25 % live + 50 % stale, re-writing its live pages faster than the link
    carries them: pre-copy cannot converge.  kvmlite post-copy (hint on and off,
    at once and when not converging), kvmlite pre-copy with auto-converge, and
    QEMU 7.2's post-copy at once, same guest image and link limit, interleaved."""
    from bench.qemu import migrate_postcopy_once, qemu_binary
    from bench.scaling import kvmlite_migrate, median_range
    mib = 256 if quick else MEMORY_MIB
    bw = BANDWIDTH_MIB << 20
    cmd = f"workload=fill {FILL} dirty={DIRTY} idle=0"
    # (capabilities, parameters, migrate-start-postcopy after N syncs) for qmpmig,
    # as for QEMU's row; x-postcopy-now makes kvmlite's "at once" exact
    now = ({"postcopy-ram": True}, {"max-bandwidth": bw, "x-postcopy-now": True}, 0)
    configs = {
        ON: now,
        "kvmlite post-copy now, hint off": ({**now[0], "x-free-page-hint": False}, now[1], 0),
        "kvmlite postcopy-ram (auto switch)": ({"postcopy-ram": True}, {"max-bandwidth": bw}, None),
        PRE: ({}, {"max-bandwidth": bw, "x-max-rounds": 12}, None),
    }
    binary = qemu_binary()
    if binary:
        configs[QEMU] = None
    runs = {c: [] for c in configs}
    for _ in range(reps):
        for c, how in configs.items():
            if how is None:
                r = migrate_postcopy_once(binary, mib, f"{cmd} seconds={QEMU_SECONDS}", bandwidth=bw)
                r.update(remote_faults=r.get("postcopy_requests"), slowed_ms=0.0, throttle_pct=0)
            else:
                caps, params, postcopy = how
                # the destination's RAM is not pre-faulted, as QEMU's here (no -mem-prealloc)
                r = kvmlite_migrate(mib, cmd, capabilities=caps, parameters=params, postcopy=postcopy,
                                    prealloc_dst=False)
                info = r.pop("info")
                r.update(pages=r["pages_sent"] + r["pages_zero"],
                         # auto-converge: from the first throttle to the pause (kvmlite's own figure)
                         slowed_ms=info.get("x-throttled-ms", 0.0), throttle_pct=r.get("throttle_pct", 0))
            runs[c].append(r)
            console.print(f"  {c:36s} total {r['total_ms']:8.0f} ms  downtime {r['downtime_ms']:7.2f} ms  "
                          f"{r['bytes_wire'] / (1 << 20):7.1f} MiB", highlight=False)
    med = {c: {k: median_range(r[k] for r in rs) for k in ("total_ms", "downtime_ms", "bytes_wire")}
           for c, rs in runs.items()}
    base = QEMU if binary else "kvmlite post-copy now, hint off"
    pre = PRE
    t = Table(title=f"{mib} MiB guest, {FILL}, re-writing {DIRTY} pages/s; link {BANDWIDTH_MIB} MiB/s; "
                    f"medians of {reps} (min–max); ×… against {base}")
    for col in ("migration", "total ms", "downtime ms", "MiB", "×total", "×bytes",
                "remote faults", "p50 µs", "p99 µs", "zero here", "free asked", "slowed ms (throttle)"):
        t.add_column(col, justify="left" if col == "migration" else "right", no_wrap=True)
    for c, rs in runs.items():
        m, last = med[c], rs[-1]
        t.add_row(c, _r(m["total_ms"], 0), _r(m["downtime_ms"], 1), f"{m['bytes_wire'][0] / (1 << 20):.0f}",
                  f"{m['total_ms'][0] / med[base]['total_ms'][0]:.2f}",
                  f"{m['bytes_wire'][0] / med[base]['bytes_wire'][0]:.2f}",
                  str(last.get("remote_faults")), str(last.get("p50", "")), str(last.get("p99", "")),
                  str(last.get("zero_faults", "")), str(last.get("requests_for_free", "")),
                  f"{last['slowed_ms']:.0f} ({last['throttle_pct']} %)")
    console.print(t)
    console.print("remote faults: kvmlite's destination's faults that asked the source; QEMU's "
                  "postcopy-requests.  Times from QMP events for every row: total from migrate to the "
                  "source's MIGRATION completed, downtime from its STOP to the destination's RESUME.  "
                  "postcopy-ram alone switched: "
                  + "; ".join(str(r.get("switch")) for r in runs["kvmlite postcopy-ram (auto switch)"]),
                  highlight=False)
    on = med[ON]
    lat = [r["p50"] for r in runs[ON] if r["p50"] is not None]
    lat99 = [r["p99"] for r in runs[ON] if r["p99"] is not None]
    targets = [("remote fault p50 ≤ 250 µs (loopback)", statistics.median(lat) if lat else float("nan"), 250),
               ("remote fault p99 ≤ 2000 µs (loopback)", statistics.median(lat99) if lat99 else float("nan"), 2000),
               ("downtime ≤ 5 ms", on["downtime_ms"][0], 5.0)]
    if binary:
        targets[:0] = [("total ≤ 0.5× QEMU post-copy", on["total_ms"][0] / med[base]["total_ms"][0], 0.5),
                       ("bytes ≤ 0.35× QEMU post-copy", on["bytes_wire"][0] / med[base]["bytes_wire"][0], 0.35)]
    console.print(f"Targets ({ON}):", highlight=False)
    for name, v, lim in targets:
        console.print(f"  {name}: {v:.2f} → {'met' if v <= lim else 'NOT met'}", highlight=False)
    p = med[pre]
    console.print(f"Against kvmlite pre-copy with auto-converge on the same guest: total "
                  f"{on['total_ms'][0]:.0f} ms against {p['total_ms'][0]:.0f} ms "
                  f"({on['total_ms'][0] / p['total_ms'][0]:.2f}×); the guest slowed 0 ms against "
                  f"{statistics.median(r['slowed_ms'] for r in runs[pre]):.0f} ms "
                  f"(throttled to {runs[pre][-1]['throttle_pct']} % at the end), downtime "
                  f"{on['downtime_ms'][0]:.1f} ms against {p['downtime_ms'][0]:.0f} ms", highlight=False)
    return {"memory_mib": mib, "fill": FILL, "dirty": DIRTY, "bandwidth_mib": BANDWIDTH_MIB,
            "reps": reps, "runs": runs, "medians": med,
            "targets": [{"target": n, "value": v, "limit": lim, "met": v <= lim} for n, v, lim in targets]}


def _r(v, d=1):
    return f"{v[0]:.{d}f} ({v[1]:.{d}f}–{v[2]:.{d}f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.postcopy")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--mib", type=int, required=True)
    s.add_argument("--inflight", type=int, required=True)
    s.add_argument("--push", type=int, required=True)
    s.add_argument("--batch", type=int, default=32)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("1", "2", "3"), action="append")
    p.add_argument("--reps", type=int, default=3, help="runs of table 3 per row (medians)")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        return serve(args)
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    which = args.only or ["1", "2", "3"]
    if "1" in which:
        results["machinery"] = table1(args.quick)
    if "2" in which:
        results["guest"] = table2(args.quick)
    if "3" in which:
        results["comparison"] = table3(args.quick, args.reps)
    (OUT / "postcopy.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
