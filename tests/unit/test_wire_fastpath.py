"""The decoder's C fast path for many small PAGES records (StreamDecoder.scatter_buffered)."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlite.errors import StreamError
from kvmlite.migration import wire
from kvmlite.migration.wire import End, Pages, StreamDecoder, Zero
from kvmlite.vstate.memory import GuestMemory

from .test_wire import PS, Builder, FakeSock, page_data

# The fast path serves the destination's one RAM region.
MEM_SIZE = 2 << 20
INFO = {"page_size": PS, "ram": [[0, MEM_SIZE]], "vcpus": 1}
STATE = {"vcpus": [], "devices": {}}


def decode_fast(data: bytes, *, seed=None, max_chunk=1 << 30, bufsize=1 << 20):
    """Decode as the destination does: the fast path first, next_record for the rest."""
    dec = StreamDecoder(FakeSock(data, seed, max_chunk), bufsize=bufsize)
    dec.read_preamble()
    mem = GuestMemory(MEM_SIZE)
    written = np.zeros(mem.npages, dtype=np.uint8)
    fast = 0
    while True:
        k = dec.scatter_buffered(mem, written)
        if k:
            fast += k
            continue
        r = dec.next_record(mem.slice)
        if isinstance(r, Pages):
            written[r.gpa // PS:r.gpa // PS + r.npages] = 1
        if isinstance(r, Zero):
            mem.zero(r.gpa, r.npages * PS)
        if isinstance(r, End):
            return dec, mem, written, fast


def scattered_stream(seed: int, n: int) -> tuple[Builder, dict[int, bytes]]:
    rng = random.Random(seed)
    pages = sorted(rng.sample(range(MEM_SIZE // PS), n))
    b, content = Builder(INFO), {}
    for p in pages:
        data = page_data(seed * 100000 + p, 1)
        b.pages(p * PS, data)
        content[p] = data
    return b.round(1).state(STATE).end(), content


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 300),
       max_chunk=st.sampled_from([1, 13, 4109, 5000, 1 << 20]))
def test_fast_path_lands_the_same_bytes_as_the_slow_path(seed, n, max_chunk):
    """Pages arrive intact and counted whichever path takes them, at any chunking."""
    b, content = scattered_stream(seed, n)
    dec, mem, written, fast = decode_fast(b.bytes(), seed=seed, max_chunk=max_chunk)
    assert dec.pages == n
    assert np.flatnonzero(written).tolist() == sorted(content)
    for p, data in content.items():
        assert mem.read(p * PS, PS) == data
    mem.close()


def test_fast_path_takes_most_records_of_a_scattered_stream():
    """With the whole stream buffered, nearly every record goes through C."""
    b, _ = scattered_stream(7, 500)
    dec, mem, _, fast = decode_fast(b.bytes(), bufsize=8 << 20)
    assert fast >= 490
    mem.close()


@pytest.mark.parametrize("bad_head,message", [
    (wire.pages_header(0, 1)[:1] + (MEM_SIZE).to_bytes(8, "little") + (1).to_bytes(4, "little"),
     "does not lie inside"),
    (wire.pages_header(0, 1)[:1] + (4097).to_bytes(8, "little") + (1).to_bytes(4, "little"),
     "not page-aligned"),
    (wire.pages_header(0, 1)[:1] + (0).to_bytes(8, "little") + (0).to_bytes(4, "little"),
     "pages is outside"),
])
def test_fast_path_leaves_bad_records_to_be_judged(bad_head, message):
    """A bad record after good ones: the fast path stops before it and next_record refuses it."""
    b, _ = scattered_stream(3, 20)
    good = b"".join(b.parts[:1 + 2 * 20])          # preamble and 20 PAGES records
    with pytest.raises(StreamError, match=message):
        decode_fast(good + bad_head + b"\0" * PS * 2, bufsize=8 << 20)


def test_checksum_still_covers_heads_taken_by_the_fast_path():
    """A flipped bit in a head the fast path copies is caught by END's checksum."""
    b, _ = scattered_stream(5, 50)
    data = bytearray(b.bytes())
    pre = len(wire.encode_preamble(INFO))
    data[pre + 13 + PS + 2] ^= 0x10                  # the 2nd record's GPA, 4 KiB off: still aligned
    with pytest.raises(StreamError, match="checksum|counts"):
        decode_fast(bytes(data), bufsize=8 << 20)
