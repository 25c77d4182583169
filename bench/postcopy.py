"""Post-copy: remote-fault latency over loopback and faults resolved locally as zero pages.

    python -m bench.postcopy                 # both tables
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

Table 2, the real guest: tests/postcopy_pair.py (SCAFFOLDING until the core
has post-copy) boots guest/guest.bin (churn) in one process and moves it by
post-copy into another; the guest's self-check must pass.  Printed: the
destination's faults by kind and the remote-fault latency, and on the source
the requests for pages free at the switch (always 0).

Figures are printed, never asserted: timings on this shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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
console = Console(width=150)
FREE_EVERY = 4                  # page i is free at the switch when i % 4 == 3
PATTERN = np.uint64(0x9E3779B97F4A7C15)


def _sets(npages: int):
    from kvmlite.migration.postcopy import _words
    free = (np.arange(npages) % FREE_EVERY) == FREE_EVERY - 1
    pending = ~free
    return _words(pending), _words(free), pending, free


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


# ---- table 2: the real guest --------------------------------------------------------------

def pair(memory: str, cmdline: str, after: float, rounds: int) -> dict:
    from tests.postcopy_pair import STATS_TAG
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dst = subprocess.Popen([PY, "-m", "tests.postcopy_pair", "dest", "--listen", f"127.0.0.1:{port}"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    src = subprocess.run([PY, "-m", "tests.postcopy_pair", "src", "guest/guest.bin", "--memory", memory,
                          "--cmdline", cmdline, "--to", f"127.0.0.1:{port}", "--after", str(after),
                          "--precopy-rounds", str(rounds)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    out, err = dst.communicate(timeout=300)

    def stats(text):
        for line in text.splitlines():
            if line.startswith(STATS_TAG):
                return json.loads(line[len(STATS_TAG):])
        return {}
    summary = next((ln for ln in out.splitlines() if ln.startswith("KVMLITE-SUMMARY")), "")
    return {"source": stats(src.stderr), "destination": stats(err), "summary": summary,
            "guest_status": dst.returncode, "memory": memory, "cmdline": cmdline, "rounds": rounds}


def table2(quick: bool) -> list[dict]:
    memory = "256M" if quick else "1G"
    pages = 40000 if quick else 160000
    rounds = 60 if quick else 30
    cmd = f"workload=churn pages={pages} rounds={rounds}"
    rows = [pair(memory, cmd, 1.0 if quick else 2.0, r) for r in (0, 2)]
    t = Table(title=f"Post-copy of the real guest ({memory}, {cmd}), loopback, one connection")
    for col in ("pre-copy rounds", "guest", "pages to come", "free at switch", "downtime ms",
                "remote faults", "p50 µs", "p99 µs", "max µs", "local zero-page faults",
                "free pages requested", "switch → last page ms"):
        t.add_column(col, justify="right")
    for r in rows:
        s, d = r["source"], r["destination"]
        inc = d.get("incoming", {})
        lat = inc.get("remote_latency_us", {})
        ok = "ok" if "status=ok" in r["summary"] and r["guest_status"] == 0 else f"FAIL {r['guest_status']}"
        t.add_row(str(r["rounds"]), ok, str(s.get("pending")), str(s.get("free")),
                  str(s.get("downtime_ms")), str(inc.get("faults_remote")), str(lat.get("p50")),
                  str(lat.get("p99")), str(lat.get("max")), str(inc.get("faults_zero_free")),
                  str(s.get("sender", {}).get("requests_for_free")),
                  str(inc.get("switch_to_last_page_ms")))
    console.print(t)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.postcopy")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--mib", type=int, required=True)
    s.add_argument("--inflight", type=int, required=True)
    s.add_argument("--push", type=int, required=True)
    s.add_argument("--batch", type=int, default=32)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("1", "2"))
    args = p.parse_args(argv)
    if args.cmd == "serve":
        return serve(args)
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only in (None, "1"):
        results["machinery"] = table1(args.quick)
    if args.only in (None, "2"):
        results["guest"] = table2(args.quick)
    (OUT / "postcopy.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
