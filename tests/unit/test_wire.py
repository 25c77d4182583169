"""The migration wire format: round trips and a hostile source.  No /dev/kvm needed."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmlite.errors import MigrationError, StreamError
from kvmlite.migration import wire
from kvmlite.migration.wire import End, Pages, Round, State, StreamDecoder, Zero

PS = wire.PAGE_SIZE
RAM = [[0, 64 * PS], [0x100000, 32 * PS]]
MEM_SIZE = 0x100000 + 32 * PS
INFO = {"page_size": PS, "ram": RAM, "vcpus": 2, "hint": True, "live": True, "source": "src:1"}
STATE = {"vcpus": [{"regs": {"rip": 0xFFF0, "rflags": 2}, "xsave": b"\x00\x01\xff" * 100}],
         "devices": {1: [1, 2, 3], "uart": {"ier": 0}}, "empty": b""}

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers

class FakeSock:
    """recv_into hands out the stream in random small pieces."""

    def __init__(self, data: bytes, seed: int | None = None, max_chunk: int = 1 << 30):
        self.data = memoryview(bytes(data))
        self.pos = 0
        self.rng = random.Random(seed) if seed is not None else None
        self.max_chunk = max_chunk

    def recv_into(self, buf, nbytes=0):
        n = min(nbytes or len(buf), len(buf), len(self.data) - self.pos)
        if self.rng is not None:  # mostly pieces of up to max_chunk, some larger ones
            rng = self.rng
            n = min(n, rng.randint(1, self.max_chunk if rng.random() < 0.7 else 20000))
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


class RaisingSock:
    def __init__(self, data: bytes, exc: Exception):
        self.inner = FakeSock(data)
        self.exc = exc

    def recv_into(self, buf, nbytes=0):
        if self.inner.pos >= len(self.inner.data):
            raise self.exc
        return self.inner.recv_into(buf, nbytes)


class Builder:
    """Builds a stream with the encoder, remembering where the page payloads are."""

    def __init__(self, info=INFO):
        self.crc = wire.Crc()
        self.parts: list[bytes] = []
        self.size = 0
        self.payloads: list[tuple[int, int]] = []
        self.npages = 0
        self.nzero = 0
        self.struct(wire.encode_preamble(info))

    def _put(self, b: bytes):
        self.parts.append(b)
        self.size += len(b)
        return self

    def struct(self, b: bytes):
        return self._put(self.crc.add(b))

    def pages(self, gpa: int, data: bytes):
        n = len(data) // PS
        self.struct(wire.pages_header(gpa, n))
        self.payloads.append((self.size, self.size + len(data)))
        self.npages += n
        return self._put(data)

    def zero(self, gpa: int, n: int):
        self.nzero += n
        return self.struct(wire.zero_record(gpa, n))

    def round(self, n: int):
        return self.struct(wire.round_record(n))

    def state(self, s=STATE):
        return self.struct(wire.state_record(s))

    def end(self, pages=None, zeros=None, crc=None):
        return self._put(wire.end_record(self.npages if pages is None else pages,
                                         self.nzero if zeros is None else zeros,
                                         self.crc.value if crc is None else crc))

    def bytes(self) -> bytes:
        return b"".join(self.parts)

    def structural_positions(self) -> list[int]:
        out, prev = [], 0
        for start, stop in self.payloads:
            out.extend(range(prev, start))
            prev = stop
        out.extend(range(prev, self.size))
        return out


def decode(data: bytes, *, seed=None, max_chunk=1 << 30, bufsize=256 * 1024):
    """Decode a whole stream; return (decoder, header, records, guest memory)."""
    dec = StreamDecoder(FakeSock(data, seed, max_chunk), bufsize=bufsize)
    header = dec.read_preamble()
    mem = bytearray(MEM_SIZE)
    mv = memoryview(mem)
    records = []
    while True:
        r = dec.next_record(lambda gpa, n: mv[gpa:gpa + n])
        records.append(r)
        if isinstance(r, Zero):
            mv[r.gpa:r.gpa + r.npages * PS] = bytes(r.npages * PS)
        if isinstance(r, End):
            return dec, header, records, mem


def page_data(seed: int, npages: int) -> bytes:
    return random.Random(seed).randbytes(npages * PS)


def small_stream() -> Builder:
    b = Builder()
    b.pages(0, page_data(1, 2)).zero(0x100000, 3).round(0)
    b.pages(0x100000 + 5 * PS, page_data(2, 1)).round(1)
    return b.state().end()


def raw_preamble(body: bytes, *, magic=wire.MAGIC, version=wire.VERSION, flags=0, hlen=None) -> bytes:
    return struct.pack("<8sHHI", magic, version, flags, len(body) if hlen is None else hlen) + body


def header_error(info) -> str:
    data = raw_preamble(msgpack.packb(info, use_bin_type=True))
    with pytest.raises(StreamError) as ei:
        StreamDecoder(FakeSock(data)).read_preamble()
    return str(ei.value)


def after_preamble(body: bytes, info=INFO) -> StreamDecoder:
    """A decoder that has read a valid preamble followed by `body`."""
    dec = StreamDecoder(FakeSock(wire.encode_preamble(info) + body))
    dec.read_preamble()
    return dec


def no_target(gpa, n):
    raise AssertionError(f"target called for {gpa:#x}+{n}")


def record_error(body: bytes) -> str:
    dec = after_preamble(body)
    with pytest.raises(StreamError) as ei:
        while not isinstance(dec.next_record(no_target), End):
            pass
    return str(ei.value)


# -- encoder

def test_encoder_sizes_and_layout():
    assert wire.pages_header(0x2000, 3) == b"P" + (0x2000).to_bytes(8, "little") + (3).to_bytes(4, "little")
    assert len(wire.pages_header(0, 1)) == wire.PAGES_HEADER_SIZE == 13
    assert wire.zero_record(0x1000, 2)[:1] == b"Z" and len(wire.zero_record(0x1000, 2)) == 13
    assert wire.round_record(7) == b"R" + (7).to_bytes(4, "little")
    pre = wire.encode_preamble(INFO)
    assert pre[:8] == b"KVMLMIG\x00"
    assert struct.unpack_from("<HHI", pre, 8) == (wire.VERSION, 0, len(pre) - 16)
    s = wire.state_record(STATE)
    assert s[:1] == b"S" and struct.unpack_from("<I", s, 1)[0] == len(s) - 5
    e = wire.end_record(5, 6, 0x1234)
    assert len(e) == 53 and e[:1] == b"E" and struct.unpack_from("<QQ", e, 1) == (5, 6)
    assert e[21:] == bytes(32)          # no integrity: the MAC field is zeros
    import zlib
    assert struct.unpack_from("<I", e, 17)[0] == zlib.crc32(e[:17], 0x1234)


def test_encoder_refuses_bad_input():
    for bad in ({}, {**INFO, "page_size": 8192}, {**INFO, "ram": []}, {**INFO, "vcpus": 0}):
        with pytest.raises(ValueError):
            wire.encode_preamble(bad)
    for gpa, n in ((1, 1), (0, 0), (0, wire.MAX_RUN_PAGES + 1)):
        with pytest.raises(ValueError):
            wire.pages_header(gpa, n)
        with pytest.raises(ValueError):
            wire.zero_record(gpa, n)
    with pytest.raises(TypeError):
        wire.state_record([1, 2])


def test_crc_helper_returns_data():
    import zlib
    c = wire.Crc()
    assert c.add(b"abc") == b"abc"
    c.add(b"def")
    assert c.value == zlib.crc32(b"abcdef")


# -- round trips

def test_round_trip_small_stream():
    b = small_stream()
    dec, header, records, mem = decode(b.bytes())
    assert header.version == wire.VERSION and header.page_size == PS and header.vcpus == 2
    assert header.ram == [(0, 64 * PS), (0x100000, 32 * PS)]
    assert header.hint is True and header.live is True and header.source == "src:1"
    assert records == [Pages(0, 2), Zero(0x100000, 3), Round(0), Pages(0x100000 + 5 * PS, 1),
                       Round(1), State(STATE), End(3, 3, records[-1].crc)]
    assert records[-2].state["vcpus"][0]["xsave"] == STATE["vcpus"][0]["xsave"]
    assert records[-2].state["devices"][1] == [1, 2, 3]
    assert mem[0:2 * PS] == page_data(1, 2)
    assert mem[0x100000 + 5 * PS:0x100000 + 6 * PS] == page_data(2, 1)
    assert dec.pages == 3 and dec.zero_pages == 3 and dec.rounds == 2
    assert dec.bytes_received == dec.offset == len(b.bytes())
    assert dec.ended


def test_extra_header_keys_ignored_and_optional_keys_default():
    info = {"page_size": PS, "ram": [[0, PS]], "vcpus": 1, "future": {"x": [1]}}
    dec = StreamDecoder(FakeSock(wire.encode_preamble(info)))
    h = dec.read_preamble()
    assert (h.hint, h.live, h.source) == (False, False, "")
    assert h.info["future"] == {"x": [1]}


def test_target_called_only_for_pages_with_exact_range():
    b = Builder().pages(3 * PS, page_data(3, 4)).zero(0, 1).state().end()
    calls = []
    mem = bytearray(MEM_SIZE)

    def target(gpa, n):
        calls.append((gpa, n))
        return memoryview(mem)[gpa:gpa + n]

    dec = StreamDecoder(FakeSock(b.bytes()))
    dec.read_preamble()
    while not isinstance(dec.next_record(target), End):
        pass
    assert calls == [(3 * PS, 4 * PS)]


def test_target_returning_wrong_size_is_a_bug_not_a_stream_error():
    dec = after_preamble(wire.pages_header(0, 2) + bytes(2 * PS))
    with pytest.raises(ValueError):
        dec.next_record(lambda gpa, n: bytearray(n - 1))


ops = st.lists(st.one_of(
    st.tuples(st.just("P"), st.integers(0, 1), st.integers(0, 31), st.integers(1, 4), st.integers(0, 99)),
    st.tuples(st.just("Z"), st.integers(0, 1), st.integers(0, 31), st.integers(1, 8)),
    st.tuples(st.just("R")),
), max_size=12)


@FAST
@given(ops=ops, seed=st.integers(0, 2**32), max_chunk=st.sampled_from([1, 7, 64, 5000, 1 << 20]),
       bufsize=st.sampled_from([64, 100, 4096, 256 * 1024]))
def test_round_trip_any_chunking(ops, seed, max_chunk, bufsize):
    b = Builder()
    expect = bytearray(MEM_SIZE)
    expected_records = []
    rounds = 0
    for op in ops:
        if op[0] == "R":
            b.round(rounds)
            expected_records.append(Round(rounds))
            rounds += 1
            continue
        base, size = RAM[op[1]]
        gpa = base + min(op[2], size // PS - op[3]) * PS
        if op[0] == "P":
            data = page_data(op[4], op[3])
            b.pages(gpa, data)
            expect[gpa:gpa + len(data)] = data
            expected_records.append(Pages(gpa, op[3]))
        else:
            b.zero(gpa, op[3])
            expect[gpa:gpa + op[3] * PS] = bytes(op[3] * PS)
            expected_records.append(Zero(gpa, op[3]))
    b.state().end()
    dec, _, records, mem = decode(b.bytes(), seed=seed, max_chunk=max_chunk, bufsize=bufsize)
    assert records[:-2] == expected_records
    assert records[-2] == State(STATE)
    assert records[-1].pages == b.npages and records[-1].zero_pages == b.nzero
    assert mem == expect
    assert dec.bytes_received == len(b.bytes())
    assert dec.rounds == rounds


# -- hostile preamble and header

def test_bad_magic():
    with pytest.raises(StreamError, match="not a kvmlite migration stream"):
        StreamDecoder(FakeSock(b"GET / HTTP/1.1\r\n\r\n")).read_preamble()


@pytest.mark.parametrize("version", [1, wire.VERSION + 1])
def test_other_versions_refused_clearly(version):
    """A stream of version 1 (no handover) or of a newer kvmlite is refused, saying which versions."""
    data = raw_preamble(msgpack.packb(INFO), version=version)
    with pytest.raises(StreamError, match=rf"stream version {version} is not supported "
                                          rf"\(this kvmlite reads version {wire.VERSION}\)"):
        StreamDecoder(FakeSock(data)).read_preamble()


@pytest.mark.parametrize("flags", [0x0004, 0x8000, 0xFFFF])
def test_unknown_flags_refused(flags):
    """A flag version 2 does not define is refused, saying which it defines."""
    with pytest.raises(StreamError, match=f"stream flags {flags:#06x} are not supported "
                                          r"\(version 2 defines 0x0003\)"):
        StreamDecoder(FakeSock(raw_preamble(msgpack.packb(INFO), flags=flags))).read_preamble()


def test_ram_fd_only_where_a_descriptor_can_come():
    """RAM_FD on a TCP stream (or a file) is refused; a unix socket's decoder takes it,
    and then refuses any PAGES or ZERO record: the RAM is the descriptor."""
    data = raw_preamble(msgpack.packb(INFO), flags=wire.FLAG_RAM_FD)
    with pytest.raises(StreamError, match="only a unix: socket can carry"):
        StreamDecoder(FakeSock(data)).read_preamble()
    for rec in (wire.pages_header(0, 1) + bytes(4096), wire.zero_record(0, 1)):
        dec = StreamDecoder(FakeSock(data + rec), ram_fd_allowed=True)
        assert dec.read_preamble().ram_fd
        with pytest.raises(StreamError, match="whose RAM came as a file descriptor"):
            dec.next_record(lambda g, n: bytearray(n))


def test_ram_fd_and_channel_exclude_each_other():
    with pytest.raises(ValueError):
        wire.encode_preamble(INFO, flags=wire.FLAG_RAM_FD | wire.FLAG_CHANNEL)


@pytest.mark.parametrize("hlen", [0, wire.MAX_HEADER_LEN + 1, 0xFFFFFFFF])
def test_header_len_out_of_range(hlen):
    data = raw_preamble(msgpack.packb(INFO), hlen=hlen)
    with pytest.raises(StreamError, match="header length"):
        StreamDecoder(FakeSock(data)).read_preamble()


@pytest.mark.parametrize("body", [b"\xc1", b"\x81\xa1", b"\xff" * 10, msgpack.packb(INFO) + b"\x00",
                                  b"\x81\xc4\x01a\x01" + b"\x00", b"\xdd\xff\xff\xff\xff",
                                  b"\xdf\xff\xff\xff\xff", b"\x91" * 60000 + b"\x00",
                                  b"\x81\x91\x01\x01", b"\x81\xa2\xff\xfe\x01"])
def test_header_msgpack_garbage(body):
    with pytest.raises(StreamError, match="stream header"):
        StreamDecoder(FakeSock(raw_preamble(body))).read_preamble()


@pytest.mark.parametrize("info", [[1, 2], "x", 5, None])
def test_header_not_a_map(info):
    assert "not a map" in header_error(info)


@pytest.mark.parametrize("change, message", [
    ({"page_size": 8192}, "page_size"),
    ({"page_size": "4096"}, "page_size"),
    ({"page_size": None}, "page_size"),
    ({"ram": []}, "ram"),
    ({"ram": "lots"}, "ram"),
    ({"ram": [[i * PS, PS] for i in range(17)]}, "ram"),
    ({"ram": [[0, PS, 0]]}, r"ram\[0\]"),
    ({"ram": [[0, "4096"]]}, r"ram\[0\]"),
    ({"ram": [[0, True]]}, r"ram\[0\]"),
    ({"ram": [5]}, r"ram\[0\]"),
    ({"ram": [[0, PS], [1, PS]]}, r"ram\[1\]"),
    ({"ram": [[0, PS + 1]]}, r"ram\[0\]"),
    ({"ram": [[0, 0]]}, r"ram\[0\]"),
    ({"ram": [[-PS, PS]]}, r"ram\[0\]"),
    ({"ram": [[2**64 - PS, 2 * PS]]}, r"ram\[0\]"),
    ({"ram": [[0, 2**40], [2**41, PS]]}, "TiB"),
    ({"ram": [[0, 4 * PS], [3 * PS, PS]]}, "overlap"),
    ({"ram": [[8 * PS, 4 * PS], [0, 9 * PS]]}, "overlap"),
    ({"vcpus": 0}, "vcpus"),
    ({"vcpus": 257}, "vcpus"),
    ({"vcpus": True}, "vcpus"),
    ({"vcpus": 1.0}, "vcpus"),
    ({"hint": 1}, "hint"),
    ({"live": "yes"}, "live"),
    ({"source": 7}, "source"),
])
def test_bad_header_values(change, message):
    import re
    err = header_error({**INFO, **change})
    assert re.search(message, err), err


def test_header_limits_accepted():
    info = {**INFO, "vcpus": 256, "ram": [[i * 2**36, 2**36] for i in range(16)]}
    h = StreamDecoder(FakeSock(wire.encode_preamble(info))).read_preamble()
    assert len(h.ram) == 16 and sum(s for _, s in h.ram) == 2**40


# -- hostile records

def run(gpa, npages, rtype=b"P"):
    return rtype + struct.pack("<QI", gpa, npages)


@pytest.mark.parametrize("rtype", [b"P", b"Z"])
@pytest.mark.parametrize("gpa, npages, message", [
    (64 * PS, 1, "RAM region"),                 # the hole between the regions
    (0x100000 - PS, 2, "RAM region"),           # starts in the hole
    (60 * PS, 8, "RAM region"),                 # crosses the end of ram[0]
    (0x100000 + 31 * PS, 2, "RAM region"),      # crosses the end of ram[1]
    (2**64 - PS, 1, "RAM region"),
    (0, 0, "pages is outside"),
    (0, wire.MAX_RUN_PAGES + 1, "pages is outside"),
    (0, 0xFFFFFFFF, "pages is outside"),
    (0x10, 1, "page-aligned"),
])
def test_bad_runs(rtype, gpa, npages, message):
    assert message in record_error(run(gpa, npages, rtype))


def test_unknown_record_type():
    assert "unknown record type 0x00" in record_error(b"\x00" + bytes(20))
    assert "unknown record type 0x70" in record_error(b"p")


@pytest.mark.parametrize("length", [0, wire.MAX_STATE_LEN + 1, 0xFFFFFFFF])
def test_state_length_out_of_range(length):
    assert "STATE record" in record_error(b"S" + struct.pack("<I", length))


@pytest.mark.parametrize("body", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb(3), b"\x82\xa1a\x01"])
def test_state_not_a_msgpack_map(body):
    assert "STATE record" in record_error(b"S" + struct.pack("<I", len(body)) + body)


def test_two_state_records():
    b = Builder().state().state().end()
    with pytest.raises(StreamError, match="second STATE"):
        decode(b.bytes())


@pytest.mark.parametrize("after", ["pages", "zero", "round"])
def test_only_end_after_state(after):
    b = Builder().state()
    {"pages": lambda: b.pages(0, bytes(PS)), "zero": lambda: b.zero(0, 1),
     "round": lambda: b.round(0)}[after]()
    b.end()
    with pytest.raises(StreamError, match="follows the STATE record"):
        decode(b.bytes())


def test_end_without_state():
    b = Builder().pages(0, bytes(PS)).end()
    with pytest.raises(StreamError, match="without a STATE record"):
        decode(b.bytes())


@pytest.mark.parametrize("pages, zeros", [(3, 2), (2, 3), (0, 0), (2**64 - 1, 2)])
def test_end_with_wrong_counts(pages, zeros):
    b = Builder().pages(0, bytes(2 * PS)).zero(PS * 8, 2).state().end(pages=pages, zeros=zeros)
    with pytest.raises(StreamError, match="END record counts"):
        decode(b.bytes())


def test_end_with_wrong_crc():
    b = Builder().pages(0, bytes(PS)).state()
    b.end(crc=b.crc.value ^ 1)
    with pytest.raises(StreamError, match="checksum mismatch"):
        decode(b.bytes())


def test_bytes_after_end():
    data = small_stream().bytes() + b"E"
    with pytest.raises(StreamError, match="unexpected bytes after the END"):
        decode(data)


def test_payload_bytes_are_not_checksummed():
    b = small_stream()
    data = bytearray(b.bytes())
    start, _ = b.payloads[0]
    data[start] ^= 0xFF
    _, _, records, mem = decode(bytes(data))
    assert isinstance(records[-1], End)
    assert mem[0] == page_data(1, 2)[0] ^ 0xFF


def test_connection_reset_and_timeout():
    data = small_stream().bytes()[:5000]
    for exc, message in ((ConnectionResetError(104, "Connection reset by peer"), "connection lost"),
                         (TimeoutError("timed out"), "timed out")):
        dec = StreamDecoder(RaisingSock(data, exc))
        dec.read_preamble()
        with pytest.raises(StreamError, match=message) as ei:
            while True:
                dec.next_record(lambda gpa, n: bytearray(n))
        assert isinstance(ei.value, MigrationError)
        assert "after 5000 bytes" in str(ei.value)


def test_misuse_is_a_runtime_error():
    dec = StreamDecoder(FakeSock(small_stream().bytes()))
    with pytest.raises(RuntimeError):
        dec.next_record(no_target)
    decode_all = decode(small_stream().bytes())[0]
    with pytest.raises(RuntimeError):
        decode_all.next_record(no_target)


# -- truncation and corruption

def test_truncation_at_every_byte():
    data = small_stream().bytes()
    for cut in range(len(data)):
        with pytest.raises(StreamError, match="stream truncated") as ei:
            decode(data[:cut], bufsize=64)
        assert f"after {cut} bytes" in str(ei.value)


@FAST
@given(st.data())
def test_flipped_structural_byte_is_detected(data):
    b = small_stream()
    stream = bytearray(b.bytes())
    pos = data.draw(st.sampled_from(b.structural_positions()), label="pos")
    stream[pos] ^= data.draw(st.integers(1, 255), label="xor")
    seed = data.draw(st.integers(0, 1000), label="seed")
    with pytest.raises(StreamError):
        decode(bytes(stream), seed=seed, max_chunk=300, bufsize=128)


def test_every_single_structural_flip_is_detected():
    b = small_stream()
    base = b.bytes()
    for pos in b.structural_positions():
        stream = bytearray(base)
        stream[pos] ^= 0x01
        with pytest.raises(StreamError):
            decode(bytes(stream))


def decode_any(data: bytes, **kw):
    """Decode; the only acceptable outcomes are End or StreamError."""
    try:
        return decode(data, **kw)[2][-1]
    except StreamError as e:
        assert str(e)
        return None


@FAST
@given(st.binary(max_size=400))
def test_random_bytes(blob):
    assert decode_any(blob) is None
    assert decode_any(wire.MAGIC + blob) is None


@FAST
@given(st.binary(max_size=600), st.integers(0, 1000))
def test_random_records_after_valid_preamble(blob, seed):
    assert decode_any(wire.encode_preamble(INFO) + blob, seed=seed, max_chunk=50, bufsize=64) is None


@FAST
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       st.sampled_from(["flip", "insert", "delete", "cut"]))
def test_mutated_streams(edits, kind):
    b = small_stream()
    stream = bytearray(b.bytes())
    payload = set().union(*(range(s, e) for s, e in b.payloads))
    for where, value in edits:
        pos = where % len(stream)
        if kind == "flip":
            stream[pos] ^= value or 1
        elif kind == "insert":
            stream.insert(pos, value)
        elif kind == "delete":
            del stream[pos]
        else:
            del stream[pos:]
            break
    original = b.bytes()
    touched_structure = len(stream) != len(original) or any(
        x != y and i not in payload for i, (x, y) in enumerate(zip(stream, original)))
    result = decode_any(bytes(stream), bufsize=100)
    if touched_structure:
        assert result is None
    else:
        assert isinstance(result, End)


# -- frames: the handover after END (and the handshake) are u32 + msgpack maps

ANSWERS = wire.DEST_ANSWERS_TO_END + wire.DEST_ANSWERS_TO_COMMIT


@pytest.mark.parametrize("frame", [{"status": "ready"}, {"status": "error", "error": "no memory"},
                                   {"status": "commit"}, {"status": "running"},
                                   {"status": "aborted", "error": "no COMMIT within 30 s"}])
def test_handover_frame_round_trip(frame):
    """Every handover message survives encoding and a peer that delivers 2 bytes at a time."""
    data = wire.encode_frame(frame)
    assert wire.read_frame(FakeSock(data, seed=3, max_chunk=2), "a frame",
                           ANSWERS + wire.SOURCE_ANSWERS_TO_READY) == frame


def test_long_error_frame_is_shortened():
    """An error message too long for a frame is cut, not refused: the peer still learns why."""
    got = wire.read_frame(FakeSock(wire.encode_frame({"status": "error", "error": "x" * 100000})),
                          "a frame", ANSWERS)
    assert got["status"] == "error" and len(got["error"]) == wire.MAX_FRAME_ERROR


def test_encode_frame_refuses_what_cannot_fit():
    with pytest.raises(ValueError):
        wire.encode_frame({"blob": b"x" * (wire.MAX_FRAME + 1)})
    with pytest.raises(ValueError):
        wire.encode_frame([1, 2])


def framed(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("data, message", [
    (b"", "truncated"),
    (b"\x05\x00", "truncated"),
    (struct.pack("<I", 0), "length"),
    (struct.pack("<I", wire.MAX_FRAME + 1), "length"),
    (struct.pack("<I", 10) + b"\x81", "truncated"),
    (struct.pack("<I", 1) + b"\xc1", "not valid msgpack"),
    (struct.pack("<I", 1) + b"\x90", "not a map"),
    (framed({"s": 1}), "status"),
    (framed({"status": "error"}), "error message"),
    (framed({"status": "error", "error": b"bytes"}), "error message"),
    (framed({"status": "hello"}), "status 'hello'"),
    (framed({"status": "commit"}), "expected ready or error"),
])
def test_hostile_answers_to_end(data, message):
    """A source reading the destination's answer to END refuses anything but READY or ERROR."""
    with pytest.raises(StreamError, match=message):
        wire.read_frame(FakeSock(data), "the answer", wire.DEST_ANSWERS_TO_END)


@FAST
@given(st.binary(max_size=100))
def test_random_frames(blob):
    try:
        wire.read_frame(FakeSock(blob), "a frame", ANSWERS)
    except StreamError:
        pass
