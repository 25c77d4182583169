"""A vCPU's dirty ring: KVM writes one entry per page the vCPU dirties.

KVM_CAP_DIRTY_LOG_RING gives each vCPU a ring of `struct kvm_dirty_gfn`
(flags, slot, offset) mmapped from its fd at KVM_DIRTY_LOG_PAGE_OFFSET
pages.  KVM fills it in order and sets DIRTY on each entry; userspace
harvests entries from its own fetch index, sets RESET on each, and
KVM_RESET_DIRTY_RINGS (Vm.reset_dirty_rings) write-protects those pages
again and frees the entries.  A vCPU whose ring is full exits with
KVM_EXIT_DIRTY_RING_FULL until entries are harvested and reset.

Claim 2 with a ring: harvest, reset, then read the free bits and the pages
(docs/abi.md).  A page written after the reset faults again and comes back
in a later harvest; one written between harvest and reset was already taken.
"""

from __future__ import annotations

import mmap

import numpy as np

from ..kvm import ffi, lib

GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


class DirtyRing:
    def __init__(self, vcpu, nbytes: int):
        if GFN.itemsize != ffi.sizeof("struct kvm_dirty_gfn"):
            raise AssertionError("struct kvm_dirty_gfn changed size")
        self.vcpu_index = vcpu.index
        self._map = mmap.mmap(vcpu.fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=lib.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        self.entries = np.frombuffer(self._map, dtype=GFN)
        self.size = len(self.entries)
        self.fetch = 0          # the next entry to harvest; counts up for ever, like KVM's

    def harvest(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, offsets) of every entry dirtied since the last harvest, each then
        marked RESET.  They are one run from the fetch index, at most two pieces
        around the wrap.  Call Vm.reset_dirty_rings() afterwards."""
        slots, offsets = [], []
        while True:
            start = self.fetch % self.size
            seg = self.entries[start:]
            dirty = (seg["flags"] & lib.KVM_DIRTY_GFN_F_MASK) == lib.KVM_DIRTY_GFN_F_DIRTY
            count = len(seg) if dirty.all() else int(np.argmin(dirty))
            if count:
                slots.append(seg["slot"][:count].copy())
                offsets.append(seg["offset"][:count].copy())
                seg["flags"][:count] = lib.KVM_DIRTY_GFN_F_RESET   # x86 stores are in order
                self.fetch += count
            if count < len(seg) or not count:
                break
        if not slots:
            return np.zeros(0, np.uint32), np.zeros(0, np.uint64)
        return np.concatenate(slots), np.concatenate(offsets)

    def close(self) -> None:
        del self.entries
        self._map.close()
