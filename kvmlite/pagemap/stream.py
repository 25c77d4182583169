"""A PageMap of a migration stream saved to a file, read with the wire format's own decoder."""

from __future__ import annotations

import mmap

import numpy as np

from ..errors import StreamError
from ..migration import wire
from ..migration.transport import FileSource
from .model import DATA, PAGE_SHIFT, STREAM_KINDS, ZERO, PageMap


class _Scratch:
    """Where page payloads land: the picture needs where they go, not their bytes.
    One anonymous mapping, its pages handed back to the kernel before each reuse,
    so a stream of a large guest costs its largest record, briefly."""

    def __init__(self):
        self.map: mmap.mmap | None = None

    def __call__(self, gpa: int, nbytes: int):
        if self.map is None or len(self.map) < nbytes:
            self.map = mmap.mmap(-1, nbytes)
        else:
            self.map.madvise(mmap.MADV_DONTNEED)
        return memoryview(self.map)[:nbytes]


def from_stream(path: str) -> PageMap:
    """A PageMap of a migration stream saved to a file: for each page, the kind
    of the last record that carried it and the round it came in."""
    f = FileSource(path)        # the reader `run --incoming file:PATH` uses
    try:
        # a viewer: it reads a snapshot's integrity tags, and streams saved without them
        dec = wire.StreamDecoder(f, keys=f.keys, require_integrity=False)
        try:
            header = dec.read_preamble()
            # Pages are numbered through the header's RAM regions in order.
            bases, first = [], 0
            for gpa, size in header.ram:
                bases.append((gpa, gpa + size, first))
                first += size >> PAGE_SHIFT
            states = np.zeros(first, dtype=np.uint8)
            rounds = np.zeros(first, dtype=np.uint8)
            scratch = _Scratch()
            while True:
                rec = dec.next_record(scratch)
                if isinstance(rec, (wire.Pages, wire.Zero)):
                    # the decoder checked that the run lies inside one region
                    for lo, hi, base in bases:
                        if lo <= rec.gpa < hi:
                            p = base + ((rec.gpa - lo) >> PAGE_SHIFT)
                            break
                    states[p:p + rec.npages] = DATA if isinstance(rec, wire.Pages) else ZERO
                    # ROUND n closes round n: what follows belongs to the next one
                    rounds[p:p + rec.npages] = min(dec.rounds + 1, 255)
                elif isinstance(rec, wire.End):
                    break
        except StreamError as e:
            raise StreamError(f"{path}: {e}") from None
    finally:
        f.close()
    mode = ("live" if header.live else "stop-copy") + (", hint on" if header.hint else ", hint off")
    return PageMap(f"migration stream {path} ({mode}, {dec.rounds} rounds)", STREAM_KINDS,
                   states, rounds, dec.rounds)
