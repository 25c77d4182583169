"""`make bench`: kvmlite's speed, each figure beside a baseline measured in the same run.

Tables:
  1. VM exits: kvmlite's Python run loop against a C loop (bench/cref.c) on the same VM.
  2. Start-up: `kvmlite run` of the hello guest to its first serial byte, against
     the bare interpreter start.
  3. Guest speed: page writes per second inside the guest (ring 3, native).
  4. Migration of a 1 GiB guest, 25 % live + 50 % freed with stale data, live,
     slow dirtying: free page hint on, hint off, and a raw loopback sendall of
     the same bytes.
  5. What a shared key and mutual TLS cost on the same migration.
Results also go to bench/out/results.json.  No figure here is asserted by a test.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
GUEST = ROOT / "guest" / "guest.bin"
console = Console(width=132)


def median_range(values):
    return statistics.median(values), min(values), max(values)


# ---- 1. exits ------------------------------------------------------------------

def bench_exits(reps: int) -> dict:
    from kvmlite.config import BootConfig, MachineConfig
    from kvmlite.kvm import ffi
    from kvmlite.machine import Machine
    image = BootConfig(str(OUT / "exitloop.bin"))
    config = MachineConfig(memory=64 << 20)
    cref = ctypes.CDLL(str(OUT / "cref.so"))
    cref.cref_run_loop.restype = ctypes.c_long
    cref.cref_run_loop.argtypes = [ctypes.c_int, ctypes.c_void_p]
    c_us, py_us = [], []
    for _ in range(reps):
        m = Machine(config)
        m.boot(image)

        def c_loop(vcpu):     # on the vCPU's own thread, as the Python loop runs
            t = time.perf_counter()
            n = cref.cref_run_loop(vcpu.fd, int(ffi.cast("uintptr_t", vcpu.run_struct)))
            return n, time.perf_counter() - t
        n, dt = m.call(0, c_loop)
        m.close()
        if n <= 0:
            raise RuntimeError(f"C loop failed: {n}")
        c_us.append(dt / n * 1e6)
        m = Machine(config)
        m.boot(image)
        t = time.perf_counter()
        r = m.run()
        dt = time.perf_counter() - t
        if r.reason != "exit" or r.status != 0:
            raise RuntimeError(f"exit loop guest ended with {r}")
        py_us.append(dt / m.exits * 1e6)
        m.close()
    c, py = statistics.median(c_us), statistics.median(py_us)
    table = Table(title="VM exits: Python run loop against a C loop, same VM and guest")
    for col in ("loop", "µs per exit (median)", "min–max", "exits per second", "ratio to C"):
        table.add_column(col, justify="right")
    table.add_row("C (bench/cref.c)", f"{c:.2f}", f"{min(c_us):.2f}–{max(c_us):.2f}", f"{1e6 / c:,.0f}", "1.00×")
    table.add_row("kvmlite (Python)", f"{py:.2f}", f"{min(py_us):.2f}–{max(py_us):.2f}", f"{1e6 / py:,.0f}",
                  f"{py / c:.2f}×")
    console.print(table)
    console.print(f"goal: ≤ 1.15× C per exit → {'met' if py / c <= 1.15 else 'NOT met'}\n")
    return {"c_us_per_exit": c_us, "py_us_per_exit": py_us, "ratio": py / c}


# ---- 2. start-up -------------------------------------------------------------------

def _time_to_first_byte(cmd: list[str]) -> float:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    p.stdout.read(1)
    dt = time.perf_counter() - t
    p.stdout.read()
    p.wait()
    return dt


def bench_startup(reps: int) -> dict:
    base = [_time_to_first_byte([sys.executable, "-c", "import sys; sys.stdout.write('x')"])
            for _ in range(reps)]
    kv = [_time_to_first_byte([sys.executable, "-m", "kvmlite", "run", str(GUEST),
                               "--cmdline", "workload=hello"]) for _ in range(reps)]
    b, k = statistics.median(base) * 1000, statistics.median(kv) * 1000
    table = Table(title="Start-up: command to first serial byte of the hello guest")
    for col in ("what", "ms (median)", "min–max", "ratio to bare Python"):
        table.add_column(col, justify="right")
    table.add_row("python -c (bare interpreter)", f"{b:.1f}", f"{min(base)*1e3:.1f}–{max(base)*1e3:.1f}", "1.00×")
    table.add_row("kvmlite run guest.bin", f"{k:.1f}", f"{min(kv)*1e3:.1f}–{max(kv)*1e3:.1f}", f"{k / b:.2f}×")
    console.print(table)
    console.print(f"goal: ≤ 150 ms → {'met' if k <= 150 else 'NOT met'}\n")
    return {"python_ms": [x * 1000 for x in base], "kvmlite_ms": [x * 1000 for x in kv]}


# ---- 3. guest speed ------------------------------------------------------------------

def bench_guest(reps: int) -> dict:
    from kvmlite.procs import parse_summary
    rates = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-m", "kvmlite", "run", str(GUEST), "--memory", "256M",
                              "--cmdline", "workload=churn pages=20000 rounds=50"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        line = [l for l in out.stdout.splitlines() if l.startswith("KVMLITE-SUMMARY")]
        if out.returncode != 0 or not line:
            raise RuntimeError(f"churn failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        rates.append(parse_summary(line[-1])["pages_per_sec"])
    # Baseline: the host writing the same pattern size with numpy, same run.
    import numpy as np
    buf = np.zeros((20000, 512), dtype=np.uint64)
    t = time.perf_counter()
    for gen in range(5):
        buf[:] = np.uint64(gen)
    host = 5 * 20000 / (time.perf_counter() - t)
    g = statistics.median(rates)
    table = Table(title="Guest speed: churn page writes per second (pages=20000 rounds=50)")
    for col in ("where", "pages/s (median)", "min–max", "ratio to host"):
        table.add_column(col, justify="right")
    table.add_row("host, numpy fill of 4 KiB pages", f"{host:,.0f}", "", "1.00×")
    table.add_row("guest, ring 3 under kvm_pvm", f"{g:,.0f}", f"{min(rates):,}–{max(rates):,}", f"{g / host:.2f}×")
    console.print(table)
    console.print(f"goal: ≥ 100k pages/s → {'met' if g >= 100_000 else 'NOT met'}\n")
    return {"guest_pages_per_sec": rates, "host_pages_per_sec": host}


# ---- 4. migration ---------------------------------------------------------------------

def migrate_once(memory: str, cmdline: str, *, hint: bool, live: bool, downtime_ms: float = 5.0,
                  src_args=(), dst_args=()) -> dict:
    from kvmlite.procs import VmProcess, free_port, start_destination
    port = free_port()
    dst = start_destination(port, memory, extra=list(dst_args))
    src = VmProcess([str(GUEST), "--memory", memory, "--cmdline", cmdline, *src_args])
    try:
        src.wait_for(r"^fill: ready", timeout=300)
        c = src.client()
        c.execute("migrate", uri=f"tcp:127.0.0.1:{port}", hint=hint, live=live,
                  **{"downtime-ms": downtime_ms})
        while True:
            s = c.execute("query-migrate")
            if s["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        c.close()
        if s["status"] != "completed":
            raise RuntimeError(f"migration {s['status']}: {s.get('error')}\n{src.output()}\n{dst.output()}")
        if src.wait(60) != 0:
            raise RuntimeError(f"source exited {src.proc.returncode}\n{src.output()}")
        dst.execute("guest-finish")
        rc = dst.wait(300)
        summ = dst.summary()
        if rc != 0 or not summ or summ.get("errors") != 0:
            raise RuntimeError(f"guest failed after migration ({rc}): {summ}\n{dst.output()}")
        s["guest_verified"] = summ["verified"]
        return s
    finally:
        src.kill()
        dst.kill()


def loopback_sendall(nbytes: int, tls=None) -> float:
    """Seconds to move `nbytes` over loopback TCP with sendall/recv_into, 32 MiB at a time.
    `tls` = (server context, client context) runs the same over TLS."""
    import mmap
    chunk = 32 << 20
    src = mmap.mmap(-1, chunk)
    src.write(os.urandom(1 << 20) * 32)
    dst = bytearray(chunk)
    # the same socket buffers as kvmlite's migration (the faster setting here)
    from kvmlite.migration.transport import SOCKET_BUFFER
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    done = threading.Event()

    def receiver():
        conn, _ = srv.accept()
        if tls:
            conn = tls[0].wrap_socket(conn, server_side=True)
        view = memoryview(dst)
        left = nbytes
        while left:
            n = conn.recv_into(view, min(left, chunk))
            if not n:
                break
            left -= n
        conn.close()
        done.set()

    th = threading.Thread(target=receiver)
    th.start()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    s.connect(("127.0.0.1", port))
    if tls:
        s = tls[1].wrap_socket(s, server_hostname="127.0.0.1")
    t = time.perf_counter()
    left = nbytes
    while left:
        n = min(left, chunk)
        s.sendall(memoryview(src)[:n])
        left -= n
    done.wait()
    dt = time.perf_counter() - t
    s.close()
    srv.close()
    th.join()
    return dt


def bench_migration(reps: int, memory: str = "1G", dirty: int = 1000) -> dict:
    cmdline = f"workload=fill live=25 stale=50 dirty={dirty}"
    runs = {"hint on": [], "hint off": []}
    for _ in range(reps):
        runs["hint on"].append(migrate_once(memory, cmdline, hint=True, live=True))
        runs["hint off"].append(migrate_once(memory, cmdline, hint=False, live=True))
    on_bytes = statistics.median(r["bytes_wire"] for r in runs["hint on"])
    raw = [loopback_sendall(int(on_bytes)) for _ in range(reps)]
    table = Table(title=f"Live migration, {memory} guest, 25% live + 50% freed (stale), dirty={dirty} pages/s")
    for col in ("case", "total ms", "downtime ms", "MiB on wire", "pages sent", "skipped free",
                "MiB/s", "total vs hint off"):
        table.add_column(col, justify="right")
    off_total = statistics.median(r["total_ms"] for r in runs["hint off"])
    result = {}
    for case, rs in runs.items():
        tot = median_range([r["total_ms"] for r in rs])
        down = median_range([r["downtime_ms"] for r in rs])
        mib = statistics.median(r["bytes_wire"] for r in rs) / (1 << 20)
        sent = statistics.median(r["pages_sent"] for r in rs)
        skipped = statistics.median(r["pages_skipped_free"] for r in rs)
        thr = statistics.median(r["bytes_wire"] / (r["total_ms"] / 1000) / (1 << 20) for r in rs)
        table.add_row(case, f"{tot[0]:.0f} ({tot[1]:.0f}–{tot[2]:.0f})", f"{down[0]:.2f} ({down[1]:.2f}–{down[2]:.2f})",
                      f"{mib:.1f}", f"{sent:,.0f}", f"{skipped:,.0f}", f"{thr:,.0f}", f"{tot[0] / off_total:.2f}×")
        result[case] = rs
    raw_ms = median_range([x * 1000 for x in raw])
    raw_thr = on_bytes / (raw_ms[0] / 1000) / (1 << 20)
    table.add_row("raw loopback sendall, same bytes as hint on", f"{raw_ms[0]:.0f} ({raw_ms[1]:.0f}–{raw_ms[2]:.0f})",
                  "", f"{on_bytes / (1 << 20):.1f}", "", "", f"{raw_thr:,.0f}", "")
    console.print(table)
    on = runs["hint on"]
    on_thr = statistics.median(r["bytes_wire"] / (r["total_ms"] / 1000) / (1 << 20) for r in on)
    # Streaming rate: the first round sends every active page; its pages over its time.
    on_stream = statistics.median(r["round_pages"][0] * 4096 / (r["round_ms"][0] / 1000) / (1 << 20) for r in on)
    on_tot = statistics.median(r["total_ms"] for r in on)
    on_down = statistics.median(r["downtime_ms"] for r in on)
    console.print(f"hint on: active pages stream at {on_stream:,.0f} MiB/s = {on_stream / raw_thr:.2f}× raw loopback "
                  f"(goal ≥ 0.8); end to end, setup and downtime included, {on_thr / raw_thr:.2f}×; "
                  f"downtime {on_down:.2f} ms (goal ≤ 5); total {on_tot:.0f} ms (goal ≤ 200)\n")
    result["raw_ms"] = [x * 1000 for x in raw]
    return result


def bench_security(reps: int, memory: str = "1G", dirty: int = 1000) -> dict:
    """What a shared key and TLS cost: the same hint-on live migration, plain, keyed, over TLS."""
    from kvmlite.pki import make_pki, tls_args
    cmdline = f"workload=fill live=25 stale=50 dirty={dirty}"
    key = OUT / "bench.key"
    key.write_text(os.urandom(32).hex() + "\n")
    pki = make_pki(OUT / "pki")
    cases = {
        "plain TCP": ((), ()),
        "shared key (--auth-key)": (("--auth-key", str(key)),) * 2,
        "mutual TLS (--tls-*)": (tuple(tls_args(pki, "src")), tuple(tls_args(pki, "dst"))),
    }
    runs = {c: [] for c in cases}
    for _ in range(reps):
        for case, (src_args, dst_args) in cases.items():
            runs[case].append(migrate_once(memory, cmdline, hint=True, live=True,
                                           src_args=src_args, dst_args=dst_args))
    # Baseline for TLS: Python's ssl moving the same bytes over loopback, nothing else.
    from kvmlite.config import Credentials
    from kvmlite.migration.transport import tls_context
    creds = Credentials.load(None, *tls_args(pki, "dst")[1::2])
    peer = Credentials.load(None, *tls_args(pki, "src")[1::2])
    tls_bytes = int(statistics.median(r["bytes_wire"] for r in runs["mutual TLS (--tls-*)"]))
    raw_tls = [loopback_sendall(tls_bytes, (tls_context(creds, server=True),
                                            tls_context(peer, server=False)))
               for _ in range(reps)]
    table = Table(title=f"Security cost: live migration, {memory} guest, 25% live + 50% freed, hint on")
    for col in ("case", "total ms", "downtime ms", "MiB on wire", "MiB/s", "total vs plain"):
        table.add_column(col, justify="right")
    plain = statistics.median(r["total_ms"] for r in runs["plain TCP"])
    for case, rs in runs.items():
        tot = median_range([r["total_ms"] for r in rs])
        down = median_range([r["downtime_ms"] for r in rs])
        mib = statistics.median(r["bytes_wire"] for r in rs) / (1 << 20)
        thr = statistics.median(r["bytes_wire"] / (r["total_ms"] / 1000) / (1 << 20) for r in rs)
        table.add_row(case, f"{tot[0]:.0f} ({tot[1]:.0f}–{tot[2]:.0f})",
                      f"{down[0]:.2f} ({down[1]:.2f}–{down[2]:.2f})", f"{mib:.1f}", f"{thr:,.0f}",
                      f"{tot[0] / plain:.2f}×")
    raw = median_range([x * 1000 for x in raw_tls])
    raw_thr = tls_bytes / (raw[0] / 1000) / (1 << 20)
    table.add_row("raw TLS loopback sendall, same bytes as TLS", f"{raw[0]:.0f} ({raw[1]:.0f}–{raw[2]:.0f})",
                  "", f"{tls_bytes / (1 << 20):.1f}", f"{raw_thr:,.0f}", f"{raw[0] / plain:.2f}×")
    console.print(table)
    tls_tot = statistics.median(r["total_ms"] for r in runs["mutual TLS (--tls-*)"])
    console.print(f"TLS migration: {tls_tot / raw[0]:.2f}× the time Python's ssl alone needs to move "
                  "its bytes over loopback\n")
    runs["raw_tls_ms"] = [x * 1000 for x in raw_tls]
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=("exits", "startup", "guest", "migration", "security"),
                    action="append")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    which = args.only or ["exits", "startup", "guest", "migration", "security"]
    console.print(f"[bold]kvmlite bench[/bold] on {os.uname().nodename}, {os.cpu_count()} CPUs, "
                  f"kernel {os.uname().release}\n")
    results = {}
    for name in which:
        fn = {"exits": bench_exits, "startup": lambda r: bench_startup(max(r, 5)),
              "guest": bench_guest, "migration": bench_migration, "security": bench_security}[name]
        results[name] = fn(args.reps)
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
    console.print(f"results written to {OUT / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
