"""Populate before receiving, or let recv_into fault the pages in: the receiver's CPU.

256 MiB received over a socketpair into fresh (not pre-faulted) guest RAM in
runs of one size, with and without MADV_POPULATE_WRITE before each run's
recv_into (what kvmlite's destination does without --memory, POPULATE_MIN to
POPULATE_MAX in kvmlite/migration/destination.py); interleaved pairs.

    python -m bench.populate [PAIRS] [RUN_KIB ...]
"""
import socket
import statistics
import sys
import threading
import time

from kvmlite.vstate.memory import GuestMemory

N = 256 << 20


def once(populate: bool, run: int) -> float:
    """The receiving thread's CPU ms for N bytes in runs of `run` bytes."""
    mem = GuestMemory(1 << 30)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    src = bytes(range(256)) * (run // 256)

    def send():
        for _ in range(N // run):
            a.sendall(src)
        a.close()
    t = threading.Thread(target=send)
    t.start()
    c0 = time.thread_time()
    off = 0
    while off < N:
        if populate:
            mem.populate(off, run)
        view = mem.slice(off, run)
        got = 0
        while got < run:
            got += b.recv_into(view[got:], run - got)
        off += run
    cpu = time.thread_time() - c0
    t.join()
    b.close()
    mem.close()
    return cpu * 1000


def main() -> int:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    for kib in [int(a) for a in sys.argv[2:]] or [64, 256, 512, 1024, 4096]:
        res = {True: [], False: []}
        for _ in range(pairs):
            for p in (False, True):
                res[p].append(once(p, kib << 10))
        med = {p: statistics.median(v) for p, v in res.items()}
        print(f"runs of {kib:5d} KiB: receiver CPU, populate {med[True]:6.1f} ms, faults {med[False]:6.1f} ms "
              f"(medians of {pairs}): {med[True] / med[False]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
