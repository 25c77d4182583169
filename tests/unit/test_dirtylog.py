"""Dirty tracking behind one interface (kvmlite/vstate/dirtylog.py): the rings'
harvest, ring-full exits and the bitmap of pages, without KVM."""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from kvmlite.bitmap import words_for
from kvmlite.kvm import lib
from kvmlite.vstate.dirtylog import BitmapLog, RingLog, set_pages
from kvmlite.vstate.dirtyring import GFN, DirtyRing

from tests.fakes import FakeRingVm, FakeVm


def pages_of(words: np.ndarray) -> set[int]:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


@given(st.lists(st.integers(0, 64 * 40 - 1), max_size=300))
def test_set_pages_sets_exactly_those_bits(pages):
    words = np.zeros(40, np.uint64)
    words[3] = np.uint64(1 << 5)                      # a bit already set stays set
    set_pages(words, np.array(pages, dtype=np.int64))
    assert pages_of(words) == set(pages) | {3 * 64 + 5}


def test_ring_sync_returns_each_page_once_and_re_protects_it():
    """Two vCPUs dirty pages (one page twice, one on both): a sync returns each once;
    a page written again after the sync comes back at the next; an untouched one does not."""
    vm = FakeRingVm(1000, nvcpus=2)
    log = RingLog(vm, vm.rings, 1000)
    log.start()
    vm.dirty([5, 6, 5], cpu=0)
    vm.dirty([6, 700], cpu=1)
    dirty = np.zeros(words_for(1000), np.uint64)
    log.sync(dirty)
    assert pages_of(dirty) == {5, 6, 700}
    vm.dirty([700, 701], cpu=0)
    again = np.zeros_like(dirty)
    log.sync(again)
    assert pages_of(again) == {700, 701}
    log.sync(again)
    assert pages_of(again) == {700, 701}              # nothing new: OR adds nothing
    assert not log.clears_per_chunk and vm.resets == 4   # start's, and one per sync


def test_a_full_ring_is_emptied_on_its_vcpu_and_the_pages_wait_for_the_next_sync():
    """KVM_EXIT_DIRTY_RING_FULL on vCPU 1: its entries move to the next sync and its
    pages are protected again, so the vCPU runs on and loses nothing."""
    vm = FakeRingVm(1000, nvcpus=2)
    log = RingLog(vm, vm.rings, 1000)
    log.start()
    vm.dirty(range(100, 110), cpu=1)
    log.ring_full(1)
    assert vm.rings[1].entries == [] and vm.protected[100:110].all()
    vm.dirty([105], cpu=1)                            # written again after the reset
    dirty = np.zeros(words_for(1000), np.uint64)
    log.sync(dirty)
    assert pages_of(dirty) == set(range(100, 110)) and log.full_exits == 1


def test_ring_entries_outside_ram_are_ignored():
    vm = FakeRingVm(64)
    log = RingLog(vm, vm.rings, 64)
    log.start()
    vm.rings[0].entries += [3, 64, 1 << 40]           # past RAM's end: not ours
    dirty = np.zeros(1, np.uint64)
    log.sync(dirty)
    assert pages_of(dirty) == {3}


def test_bitmap_log_fetches_and_clears_per_chunk():
    vm = FakeVm(256)
    log = BitmapLog(vm)
    log.start()
    vm.dirty([1, 130])
    dirty = np.zeros(4, np.uint64)
    log.sync(dirty)
    assert pages_of(dirty) == {1, 130} and log.clears_per_chunk
    log.clear(2, np.array([1 << 2], np.uint64))       # page 130 = word 2, bit 2
    again = np.zeros(4, np.uint64)
    log.sync(again)
    assert pages_of(again) == {1}
    log.stop()
    assert not log.logging


def _ring(size: int) -> DirtyRing:
    """A DirtyRing over plain memory instead of a vCPU's mapping."""
    ring = object.__new__(DirtyRing)
    ring.entries = np.zeros(size, dtype=GFN)
    ring.size = size
    ring.fetch = 0
    return ring


def _push(ring: DirtyRing, at: int, pages) -> int:
    """KVM's side: entries from index `at` (mod size) marked dirty."""
    for p in pages:
        e = ring.entries[at % ring.size]
        e["slot"], e["offset"], e["flags"] = 0, p, lib.KVM_DIRTY_GFN_F_DIRTY
        at += 1
    return at


def test_harvest_reads_from_its_fetch_index_across_the_wrap_and_marks_reset():
    ring = _ring(8)
    at = _push(ring, 0, [10, 11, 12, 13, 14, 15])
    _, offsets = ring.harvest()
    assert offsets.tolist() == [10, 11, 12, 13, 14, 15] and ring.fetch == 6
    assert (ring.entries["flags"][:6] == lib.KVM_DIRTY_GFN_F_RESET).all()
    ring.entries["flags"][:6] = 0                     # KVM's reset frees them
    _push(ring, at, [20, 21, 22, 23])                 # entries 6, 7, then 0, 1
    _, offsets = ring.harvest()
    assert offsets.tolist() == [20, 21, 22, 23] and ring.fetch == 10
    assert ring.harvest()[1].tolist() == []           # nothing new
