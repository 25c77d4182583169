"""Integrity tags and the structure MAC, without KVM (docs/wire-format.md, "Integrity").

A record whose tag does not match is not a verdict: the guest may have written
the page while it was being sent, and then the page, dirty again, comes in a
later record.  The verdict is at END: every page the guest uses arrived intact.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvmlite.errors import StreamError
from kvmlite.migration import destination, wire
from kvmlite.migration.state import STATE_VERSION
from kvmlite.vstate.memory import GuestMemory

from tests.fakes import FakeMachine, socketpair_source, vcpu_state

PS = wire.PAGE_SIZE
RAM = 64 * PS
KEYS = wire.StreamKeys.derive(b"k" * 32, b"d" * 32, b"s" * 32)


class TaggedStream:
    """A stream with integrity on, written as a source writes it; `corrupt_next`
    makes the next PAGES record's payload differ from what its tag covers (as
    when the guest writes the page while sendmsg reads it)."""

    def __init__(self, keys=KEYS):
        self.integrity = wire.Integrity(keys)
        self.crc = 0
        self.out = bytearray()
        self.pages = self.zeros = 0
        self.corrupt_next = False
        self._struct(wire.encode_preamble({"page_size": PS, "ram": [[0, RAM]], "vcpus": 1,
                                           "integrity": wire.INTEGRITY}))

    def _struct(self, b: bytes) -> "TaggedStream":
        self.crc = wire.crc(b, self.crc)
        self.integrity.structure(b)
        self.out += b
        return self

    def page(self, pfn: int, fill: int) -> "TaggedStream":
        head = wire.pages_header(pfn * PS, 1)
        payload = bytes([fill]) * PS
        tag = self.integrity.tags(head, np.frombuffer(payload, np.uint8).ctypes.data,
                                  np.array([0]), np.array([1]))
        if self.corrupt_next:
            payload = bytes([fill ^ 0xFF]) * PS
            self.corrupt_next = False
        self._struct(head)
        self.out += payload + tag
        self.pages += 1
        return self

    def zero(self, pfn: int) -> "TaggedStream":
        self.zeros += 1
        return self._struct(wire.zero_record(pfn * PS, 1))

    def end(self) -> bytes:
        state = {"version": STATE_VERSION, "vcpus": [vcpu_state()], "devices": _devices(),
                 "irqchip": None, "interrupts": None}
        self._struct(wire.state_record(state))
        self.out += wire.end_record(self.pages, self.zeros, self.crc, self.integrity)
        return bytes(self.out)


def _devices() -> dict:
    m = FakeMachine(GuestMemory(RAM))
    return {name: dev.save_state() for name, dev in m.devices().items()}


def receive(data: bytes, keys=KEYS):
    mem = GuestMemory(RAM)
    machine = FakeMachine(mem)
    got, stats = destination.receive(socketpair_source(data), machine, keys=keys)
    return got, mem


def test_a_tagged_stream_arrives():
    """Pages with good tags land; the structure MAC at END matches."""
    _, mem = receive(TaggedStream().page(3, 7).page(9, 8).end())
    assert mem.read(3 * PS, PS) == bytes([7]) * PS and mem.read(9 * PS, PS) == bytes([8]) * PS


def test_a_page_whose_tag_fails_and_is_never_resent_is_refused():
    """A payload that does not match its tag, and no later record for that page: refused."""
    s = TaggedStream().page(3, 7)
    s.corrupt_next = True
    with pytest.raises(StreamError, match=r"1 page\(s\) the guest uses failed the integrity check "
                                          r"\(the first at GPA 0x5000"):
        receive(s.page(5, 1).page(9, 8).end())


@pytest.mark.parametrize("later", ["a later intact copy", "a later ZERO record"])
def test_a_page_whose_tag_fails_but_arrives_again_intact_passes(later):
    """The honest race: the page's next record (data or zero) supersedes the one that failed."""
    s = TaggedStream()
    s.corrupt_next = True
    s.page(5, 1).page(9, 8)
    s = s.page(5, 2) if later == "a later intact copy" else s.zero(5)
    _, mem = receive(s.end())
    assert mem.read(5 * PS, PS) == (bytes([2]) * PS if later == "a later intact copy" else bytes(PS))


def test_a_record_replayed_in_another_place_fails_its_tag():
    """Tags are numbered: the same record copied to a later place in the stream does not verify."""
    s = TaggedStream().page(3, 7)
    first = bytes(s.out[-(13 + PS + 16):])
    s._struct(first[:13])                      # replay it as the second PAGES record
    s.out += first[13:]
    s.pages += 1
    with pytest.raises(StreamError, match="failed the integrity check"):
        receive(s.end())


def test_the_structure_mac_catches_a_recomputed_checksum():
    """Someone who edits a ZERO record and recomputes END's crc32 is still caught by the MAC."""
    s = TaggedStream().page(3, 7).zero(4)
    data = bytearray(s.end())
    zero_at = data.index(wire.zero_record(4 * PS, 1))
    data[zero_at + 1:zero_at + 9] = (6 * PS).to_bytes(8, "little")       # zero page 6 instead
    end = len(data) - 53
    data[end + 17:end + 21] = wire.crc(bytes(data[end:end + 17]),
                                       _crc_before(bytes(data[:end]))).to_bytes(4, "little")
    with pytest.raises(StreamError, match="structure MAC does not match"):
        receive(bytes(data))


def _crc_before(stream: bytes) -> int:
    """The structure checksum a forger recomputes: everything but payloads and tags."""
    dec = wire.StreamDecoder(_Bytes(stream), keys=KEYS)
    dec.read_preamble()
    try:
        while True:
            dec.next_record(lambda gpa, n: bytearray(n))
    except StreamError:
        pass
    return dec._crc


class _Bytes:
    def __init__(self, data):
        self.data = memoryview(data)

    def recv_into(self, view, n=0):
        n = min(n or len(view), len(self.data))
        view[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


def test_integrity_is_required_both_ways():
    """A destination with keys refuses a stream without tags, and one without keys a stream with them."""
    plain = wire.encode_preamble({"page_size": PS, "ram": [[0, RAM]], "vcpus": 1})
    with pytest.raises(StreamError, match="requires"):
        wire.StreamDecoder(_Bytes(plain), keys=KEYS).read_preamble()
    tagged = wire.encode_preamble({"page_size": PS, "ram": [[0, RAM]], "vcpus": 1, "integrity": wire.INTEGRITY})
    with pytest.raises(StreamError, match="no key"):
        wire.StreamDecoder(_Bytes(tagged)).read_preamble()


def test_keys_differ_per_connection():
    """Fresh nonces, fresh keys: a stream recorded on one connection does not verify on another."""
    a = wire.StreamKeys.derive(b"k" * 32, b"d" * 32, b"s" * 32)
    b = wire.StreamKeys.derive(b"k" * 32, b"d" * 32, b"t" * 32)
    assert a.pages != b.pages and a.structure != b.structure and len(a.pages) == 16
    with pytest.raises(StreamError):
        receive(TaggedStream(a).page(3, 7).end(), keys=b)
