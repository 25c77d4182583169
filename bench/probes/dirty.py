"""Dirty tracking: KVM's per-vCPU dirty ring against the dirty bitmap.

The guest (t_dirty) writes one word into each of LIVE pages per round, then
tells the VMM (OUT), which collects the round's dirty pages and re-protects
them, as a pre-copy round does:
  bitmap: KVM_GET_DIRTY_LOG of the slot (manual protect, initially set), then
          KVM_CLEAR_DIRTY_LOG of the span of words that have dirty pages;
  ring:   read the vCPU's ring entries from its fetch index while they are
          dirty, mark them reset, then KVM_RESET_DIRTY_RINGS.
Timed per round (median of ROUNDS): the VMM's harvest, and the guest's own
write time (every write after a re-protect faults, either way).

    .venv/bin/python -m bench.probes.dirty
"""

from __future__ import annotations

import mmap
import statistics
import time

import numpy as np

from kvmlite import exits as ex, kvm
from kvmlite.kvm import ffi, lib

from .probevm import PORT_ROUND, ProbeVm, cycles_to_us

LIVE = 16384            # 64 MiB of 4 KiB pages
ROUNDS = 12
RING_BYTES = 1 << 20    # the largest ring this host offers (KVM_CAP_DIRTY_LOG_RING)
GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
assert GFN.itemsize == ffi.sizeof("struct kvm_dirty_gfn")


class Ring:
    """One vCPU's dirty ring, mmapped from its fd."""

    def __init__(self, vcpu_fd: int, nbytes: int):
        self.map = mmap.mmap(vcpu_fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=lib.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        self.entries = np.frombuffer(self.map, dtype=GFN)
        self.n = len(self.entries)
        self.index = 0              # the next entry to harvest (KVM's fetch index)

    def harvest(self) -> np.ndarray:
        """Offsets (pages in the slot) of the entries dirtied since the last harvest.

        KVM fills the ring in order, so they are one run from the fetch index,
        in at most two pieces (before and after the wrap)."""
        got = []
        while True:
            start = self.index % self.n
            seg = self.entries[start:]
            dirty = (seg["flags"] & lib.KVM_DIRTY_GFN_F_MASK) == lib.KVM_DIRTY_GFN_F_DIRTY
            count = len(seg) if dirty.all() else int(np.argmin(dirty))
            if count:
                got.append(seg["offset"][:count].copy())
                seg["flags"][:count] = lib.KVM_DIRTY_GFN_F_RESET   # harvested: KVM may reuse them
                self.index += count
            if count < len(seg) or not count:
                break
        return np.concatenate(got) if got else np.zeros(0, np.uint64)

    def close(self):
        del self.entries
        self.map.close()


def run(mem_size: int, use_ring: bool) -> dict:
    vm = ProbeVm(1, mem_size, dirty_ring=RING_BYTES if use_ring else 0,
                 map_gib=max(4, mem_size >> 30))
    k = vm.tsc_khz
    vmo = vm.vm
    ring = Ring(vm.vcpus[0].fd, RING_BYTES) if use_ring else None
    t = time.perf_counter()
    if use_ring:
        vmo._set_slot(0, lib.KVM_MEM_LOG_DIRTY_PAGES)
        vmo.dirty_logging = True
    else:
        vmo.start_dirty_log()
        words = vmo.get_dirty_log(0)               # initially set: the first fetch is everything
        vmo.clear_dirty_log(0, 0, words)
    enable_ms = (time.perf_counter() - t) * 1000
    harvest_us, protect_us, counts = [], [], []

    def on_exit(cpu, e):
        if isinstance(e, ex.IoOut) and e.port == PORT_ROUND:
            t0 = time.perf_counter()
            if use_ring:
                pages = ring.harvest()
                t1 = time.perf_counter()
                kvm.KVM_RESET_DIRTY_RINGS(vmo.fd)
                n = len(pages)
            else:
                words = vmo.get_dirty_log(0)
                t1 = time.perf_counter()
                nz = np.flatnonzero(words)
                if len(nz):      # re-protect only the span that has dirty pages
                    vmo.clear_dirty_log(0, int(nz[0]) * 64, words[nz[0]:nz[-1] + 1])
                n = int(np.unpackbits(words.view(np.uint8)).sum())
            t2 = time.perf_counter()
            harvest_us.append((t2 - t0) * 1e6)
            protect_us.append((t2 - t1) * 1e6)
            counts.append(n)
        elif isinstance(e, ex.Unhandled) and e.reason == lib.KVM_EXIT_DIRTY_RING_FULL:
            return ("ring full",)
        return None

    vm.params(0, LIVE, ROUNDS)
    vm.enter(0, "t_dirty")
    vm.run_all([0], on_exit=on_exit, timeout=300)
    assert vm.results[0] == ("done", 0), vm.results
    write_us = cycles_to_us(vm.result(0, 0x100), k) / ROUNDS
    out = {"ram_gib": mem_size / (1 << 30), "mode": "ring" if use_ring else "bitmap",
           "enable_ms": enable_ms,
           "pages_per_round": statistics.median(counts[1:]),
           "harvest_median_us": statistics.median(harvest_us[1:]),
           "reprotect_median_us": statistics.median(protect_us[1:]),
           "harvest_per_page_ns": statistics.median(harvest_us[1:]) * 1000 / LIVE,
           "guest_write_round_us": write_us}
    if ring:
        ring.close()
    vm.close()
    return out


def main() -> dict:
    from kvmlite.vstate import Kvm
    with Kvm() as k:
        caps = {c: k.check(c) for c in ("KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                                        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")}
    res = {"caps": caps, "runs": []}
    for size in (1 << 30, 16 << 30):
        for use_ring in (False, True):
            res["runs"].append(run(size, use_ring))
    return res


def report(res: dict) -> None:
    print("capabilities:", res["caps"])
    print(f"{LIVE} pages dirtied per round, {ROUNDS} rounds (medians)")
    print(f"{'RAM':>6} {'mode':>7} {'enable ms':>10} {'pages':>7} {'harvest us':>11} {'of it re-protect':>17} "
          f"{'ns/page':>8} {'guest write us':>15}")
    for r in res["runs"]:
        print(f"{r['ram_gib']:5.0f}G {r['mode']:>7} {r['enable_ms']:10.1f} {r['pages_per_round']:7.0f} "
              f"{r['harvest_median_us']:11.0f} {r['reprotect_median_us']:17.0f} "
              f"{r['harvest_per_page_ns']:8.0f} {r['guest_write_round_us']:15.0f}")


if __name__ == "__main__":
    report(main())
