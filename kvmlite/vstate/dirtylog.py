"""Dirty tracking for a migration, behind the one small interface the sender calls.

Two kinds, chosen when the VM is made (a dirty ring must exist before the vCPUs):

* `BitmapLog`: the memslot's dirty bitmap, KVM_GET_DIRTY_LOG.  With
  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 a fetch does not clear; the sender
  clears, chunk by chunk, the pages it is about to send, just before it
  reads their free bits (claim 2).  Its cost follows the size of RAM.
* `RingLog`: every vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING), one entry per
  page a vCPU dirtied.  A sync harvests every ring and then resets them
  (KVM_RESET_DIRTY_RINGS write-protects the harvested pages again): fetch
  and clear in one step, before the sender reads any free bit of the
  round, so claim 2 holds for the whole round at once.  Its cost follows
  the pages dirtied.

What the sender does with either:

    log.start()                  # logging on (the sender counts every page dirty to begin with)
    log.sync(dirty)              # dirty |= the pages written since the last sync
    if log.clears_per_chunk:
        log.clear(w0, words)     # per chunk, the pages it will send, before it reads free bits
    log.stop()

A vCPU whose ring fills exits with KVM_EXIT_DIRTY_RING_FULL; its own thread
then calls `ring_full(i)`, which harvests that ring into what the next sync
returns and resets it, and the vCPU runs on.  Measured (docs/boot.md): the
bitmap costs 0.8 ms a sync at 1 GiB and 2.1 ms at 16 GiB, the ring 0.9 ms
at either size for 64 MiB dirtied.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

# The largest ring KVM allows on x86 (KVM_DIRTY_RING_MAX_ENTRIES, 65536
# entries of 16 bytes): a vCPU that dirties more between two syncs exits
# to have its ring emptied, and each such exit costs a harvest and a reset.
DEFAULT_RING_BYTES = 1 << 20

if TYPE_CHECKING:
    from .vm import Vm


class DirtyLog(Protocol):
    kind: str                   # "bitmap" or "ring"

    @property
    def logging(self) -> bool: ...

    @property
    def clears_per_chunk(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def sync(self, dirty: np.ndarray) -> None: ...

    def clear(self, first_word: int, words: np.ndarray) -> None: ...


class BitmapLog:
    """The memslot's dirty bitmap (slot 0, all of RAM)."""

    kind = "bitmap"

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    @property
    def logging(self) -> bool:
        return self.vm.dirty_logging

    @property
    def clears_per_chunk(self) -> bool:
        """With manual protect a fetch does not clear: the sender clears per chunk.
        Without it (an older KVM) KVM_GET_DIRTY_LOG fetched and cleared at once."""
        return self.vm.manual_protect

    def start(self) -> None:
        self.vm.start_dirty_log()

    def stop(self) -> None:
        if self.vm.dirty_logging:
            self.vm.stop_dirty_log()

    def sync(self, dirty: np.ndarray) -> None:
        dirty |= self.vm.get_dirty_log(0)

    def clear(self, first_word: int, words: np.ndarray) -> None:
        """Re-protect the pages set in `words`, RAM words from `first_word` on."""
        self.vm.clear_dirty_log(0, first_word * 64, words)


class RingLog:
    """The vCPUs' dirty rings.  `rings[i]` is vCPU i's (a DirtyRing: `harvest()`
    returns (slots, offsets) and marks the entries reset); `vm.reset_dirty_rings()`
    re-protects every page harvested since the last reset."""

    kind = "ring"
    clears_per_chunk = False     # a sync has cleared everything it returned

    def __init__(self, vm: Vm, rings: list[Any], npages: int) -> None:
        self.vm = vm
        self.rings = list(rings)
        self.npages = npages
        self._lock = threading.Lock()   # the sender's sync and a vCPU's ring_full share the rings
        self._pending: list[np.ndarray] = []   # pages harvested by ring_full, for the next sync
        self.full_exits = 0

    @property
    def logging(self) -> bool:
        return self.vm.dirty_logging

    def start(self) -> None:
        with self._lock:
            self._harvest_all()          # what a previous migration left: every page counts dirty anyway
            self._pending.clear()
        self.vm.start_dirty_log()       # write-protects the slot: each first write leaves an entry

    def stop(self) -> None:
        if self.vm.dirty_logging:
            self.vm.stop_dirty_log()

    def sync(self, dirty: np.ndarray) -> None:
        """Harvest every ring, reset them (the pages are write-protected again), and
        mark what they held in `dirty`.  After this returns, a write to any page
        leaves a new entry, so reading the free bits and the pages now is claim 2's order."""
        with self._lock:
            pages = self._harvest_all()
            pages += self._pending
            self._pending = []
        if pages:
            set_pages(dirty, np.concatenate(pages))

    def clear(self, first_word: int, words: np.ndarray) -> None:
        """Nothing: the sync that found these pages has already re-protected them."""

    def ring_full(self, index: int) -> None:
        """On vCPU `index`'s thread, after KVM_EXIT_DIRTY_RING_FULL: empty its ring
        into the next sync's pages, so it can run on."""
        with self._lock:
            self.full_exits += 1
            self._pending.append(self._harvest(self.rings[index]))
            self.vm.reset_dirty_rings()

    def _harvest_all(self) -> list[np.ndarray]:
        """Every ring's entries, then one reset (called with the lock held)."""
        pages = [self._harvest(r) for r in self.rings]
        self.vm.reset_dirty_rings()
        return [p for p in pages if len(p)]

    def _harvest(self, ring) -> np.ndarray:
        slots, offsets = ring.harvest()
        # One memslot (0) covers RAM: an entry for another, or past its end, is none of ours.
        keep = (slots == 0) & (offsets < self.npages)
        return offsets[keep].astype(np.int64)


def set_pages(words: np.ndarray, pages: np.ndarray) -> None:
    """Set the bits of `pages` (page numbers, repeats allowed) in the uint64 bitmap
    `words`.  ufunc.at ORs repeated indices one after another (measured: 0.5 ms
    for 80,000 pages; sorting them first with np.unique costs 50 times that)."""
    np.bitwise_or.at(words, pages >> 6, np.left_shift(np.uint64(1), (pages & 63).astype(np.uint64)))


__all__ = ["DirtyLog", "BitmapLog", "RingLog", "DEFAULT_RING_BYTES", "set_pages"]
