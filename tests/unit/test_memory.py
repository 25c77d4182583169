"""GuestMemory: bounds checks, zero-page detection, and which pages the host backed."""

import numpy as np
import pytest

from kvmlite.errors import GuestMemoryError
from kvmlite.vstate.memory import PAGE_SIZE, GuestMemory


def test_backed_pages_are_exactly_the_written_ones():
    """Pages never written are unbacked (zero without reading); written pages are backed."""
    mem = GuestMemory(16 << 20)
    written = [3, 4, 100, 4095]
    for p in written:
        mem.write(p * PAGE_SIZE, b"\x01")
    backed = mem.backed_pages(0, mem.npages)
    assert backed is not None
    assert np.flatnonzero(backed).tolist() == written
    assert mem.backed_pages(100, 2).tolist() == [True, False]
    mem.close()


def test_zero_pages_finds_data_anywhere_in_a_page():
    """A page is zero only if every byte is: data in its last byte counts."""
    mem = GuestMemory(4 << 20)
    mem.write(1 * PAGE_SIZE + PAGE_SIZE - 1, b"\x80")
    mem.write(2 * PAGE_SIZE, b"\x01")
    assert mem.zero_pages(0, 4).tolist() == [True, False, False, True]
    mem.close()


def test_accesses_outside_ram_are_refused():
    """Every accessor checks its GPA range against RAM."""
    mem = GuestMemory(4 << 20)
    for call in (lambda: mem.read((4 << 20) - 2, 4), lambda: mem.write(-1, b"x"),
                 lambda: mem.slice(4 << 20, 1), lambda: mem.zero_pages(1023, 2),
                 lambda: mem.backed_pages(1020, 8)):
        with pytest.raises(GuestMemoryError):
            call()
    mem.close()
