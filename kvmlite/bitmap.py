"""Pages and bitmaps of pages: the page size, and runs of set bits, done a word at a time.

One bit per 4 KiB page, page p in bit p % 64 of uint64 word p // 64: the
layout of KVM's dirty log, of the guest's free bitmap (docs/abi.md) and of
every bitmap kvmlite sends or draws.
"""

from __future__ import annotations

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT       # x86 base pages; the wire format and the ABI use the same
PAGE_MASK = PAGE_SIZE - 1
ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def words_for(npages: int) -> int:
    """How many uint64 words hold one bit per page of `npages` pages."""
    return (npages + 63) // 64


def all_set(npages: int) -> np.ndarray:
    """A bitmap with every one of `npages` pages set (and no bit past the last page)."""
    words = np.full(words_for(npages), ALL_ONES, dtype=np.uint64)
    if npages % 64:
        words[-1] = np.uint64((1 << (npages % 64)) - 1)
    return words


def count(words: np.ndarray) -> int:
    """Set bits in a bitmap."""
    return int(np.bitwise_count(words).sum())


def expand_runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Every page of the runs, in order: ([3, 10], [2, 1]) -> [3, 4, 10]."""
    total = int(lengths.sum())
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - offsets)


def list_runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of consecutive numbers in a sorted page list: (starts, lengths)."""
    if len(pages) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))]
    ends = pages[np.concatenate((breaks - 1, [len(pages) - 1]))] + 1
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def page_runs(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of set bits in a bitmap of uint64 words: (first page, length) arrays.

    Only the non-zero words are unpacked, so a sparse bitmap of a large guest
    costs what its set bits cost, not what its size costs.
    """
    nz = np.flatnonzero(words)
    if len(nz) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 64).view(bool)
    return list_runs((nz[:, None] * 64 + np.arange(64))[bits])


def _edges(start: int, stop: int) -> tuple[int, int, int, int, int]:
    """Bits [start, stop) as (first word, its mask, last word, its mask, whole words between).
    When both ends are in one word, the first mask is the whole range and the last is 0."""
    w0, b0 = divmod(start, 64)
    w1, b1 = divmod(stop, 64)
    if w0 == w1:
        return w0, ((1 << (b1 - b0)) - 1) << b0, w1, 0, 0
    return w0, ((1 << (64 - b0)) - 1) << b0, w1, (1 << b1) - 1, w1 - w0 - 1


def set_bit_range(words: np.ndarray, start: int, stop: int) -> None:
    """Set bits [start, stop) of a bitmap, whole words at a time."""
    if stop <= start:
        return
    w0, m0, w1, m1, between = _edges(start, stop)
    words[w0] |= np.uint64(m0)
    if between:
        words[w0 + 1:w1] = ALL_ONES
    if m1:
        words[w1] |= np.uint64(m1)


def clear_bit_range(words: np.ndarray, start: int, stop: int) -> None:
    """Clear bits [start, stop) (the complement of set_bit_range)."""
    if stop <= start:
        return
    w0, m0, w1, m1, between = _edges(start, stop)
    words[w0] &= ~np.uint64(m0)
    if between:
        words[w0 + 1:w1] = 0
    if m1:
        words[w1] &= ~np.uint64(m1)


def mask_to_words(mask: np.ndarray) -> np.ndarray:
    """A bool per page -> the same as uint64 bitmap words."""
    padded = np.pad(np.asarray(mask, dtype=bool), (0, -len(mask) % 64))
    return np.packbits(padded, bitorder="little").view(np.uint64)


def words_to_mask(words: np.ndarray, npages: int) -> np.ndarray:
    """uint64 bitmap words -> a bool per page, `npages` long."""
    return np.unpackbits(np.ascontiguousarray(words, dtype="<u8").view(np.uint8),
                         bitorder="little")[:npages].view(bool)
