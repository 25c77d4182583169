"""The gdb remote protocol codec and register packing in kvmlite.gdbstub (no /dev/kvm)."""

from __future__ import annotations

import struct

import pytest

from kvmlite.errors import ConfigError
from kvmlite.gdbstub import (GDB_REGS, PacketReader, checksum, encode_packet, escape, gate_offset,
                             pack_registers, parse_endpoint, parse_thread_id, parse_vcont,
                             segment_from_descriptor, unescape, unpack_registers)


def test_checksum_is_byte_sum_mod_256():
    """The checksum of 'OK' is 0x9a, as in every gdb session log; of nothing, 0."""
    assert checksum(b"OK") == 0x9A
    assert checksum(b"") == 0
    assert checksum(b"\xff\x02") == 0x01


def test_encode_packet_frames_and_checksums():
    """A reply goes out as $payload#xx with two lower-case hex digits."""
    assert encode_packet(b"OK") == b"$OK#9a"
    assert encode_packet(b"S05") == b"$S05#b8"


@pytest.mark.parametrize("raw", [b"#", b"$", b"}", b"*", b"a}b#c$d*e", bytes(range(256))])
def test_escape_round_trips_and_hides_framing_bytes(raw):
    """Escaped data has no '#', '$' or '*'; unescape restores it."""
    e = escape(raw)
    assert unescape(e) == raw
    assert not set(e) & set(b"#$*")
    assert escape(b"}") == b"}]" and escape(b"#") == b"}\x03"


def test_unescape_rejects_a_dangling_escape():
    """A packet that ends right after '}' is malformed."""
    with pytest.raises(ValueError):
        unescape(b"abc}")


def test_reader_splits_packets_acks_and_interrupts():
    """Acks, the Ctrl-C byte and packets come out in order; noise between packets is dropped."""
    r = PacketReader()
    events = r.feed(b"+\x03$g#67-junk$m100,4#" + b"%02x" % checksum(b"m100,4"))
    assert events == [("ack",), ("interrupt",), ("packet", b"g"), ("nack",), ("packet", b"m100,4")]


def test_reader_waits_for_a_whole_packet():
    """A packet split across reads comes out once, when its checksum has arrived."""
    r = PacketReader()
    wire = encode_packet(b"qSupported:swbreak+")
    assert r.feed(wire[:5]) == []
    assert r.feed(wire[5:-1]) == []
    assert r.feed(wire[-1:]) == [("packet", b"qSupported:swbreak+")]


def test_reader_reports_bad_checksum():
    """A checksum that does not match is reported, so the stub can answer '-'."""
    assert PacketReader().feed(b"$g#00") == [("bad", b"g")]
    assert PacketReader().feed(b"$g#zz") == [("bad", b"g")]


def test_reader_unescapes_binary_payload():
    """Escaped bytes in a packet arrive as the original bytes."""
    payload = b"X100,2:" + bytes([0x23, 0x7D])
    assert PacketReader().feed(encode_packet(payload)) == [("packet", payload)]


def test_register_packing_follows_gdb_amd64_layout():
    """'g' order is rax rbx rcx rdx rsi rdi rbp rsp r8-r15 rip (8 bytes), eflags and 6 selectors (4)."""
    values = {name: i + 1 for i, (name, _) in enumerate(GDB_REGS)}
    values["rip"] = 0x1122334455667788
    data = pack_registers(values)
    assert len(data) == 17 * 8 + 7 * 4
    assert data[:8] == (1).to_bytes(8, "little")                     # rax
    assert data[6 * 8:7 * 8] == (7).to_bytes(8, "little")            # rbp before rsp, as gdb numbers them
    assert data[16 * 8:17 * 8] == bytes.fromhex("8877665544332211")  # rip, little-endian
    assert data[17 * 8:17 * 8 + 4] == (18).to_bytes(4, "little")     # eflags
    assert unpack_registers(data) == values


def test_unpack_registers_rejects_wrong_length():
    """A 'G' packet of the wrong size is refused, not half applied."""
    with pytest.raises(ValueError):
        unpack_registers(b"\x00" * 10)


def test_segment_from_descriptor_decodes_user_code_and_data():
    """The flat 64-bit user code (0x00af_fb00_0000_ffff) and data descriptors decode to their fields."""
    code = segment_from_descriptor(0x23, 0x00AFFB000000FFFF)
    assert (code["selector"], code["base"], code["limit"], code["type"], code["s"], code["dpl"],
            code["present"], code["l"], code["db"], code["g"]) == (0x23, 0, 0xFFFFFFFF, 0xB, 1, 3, 1, 1, 0, 1)
    data = segment_from_descriptor(0x1B, 0x00CFF3000000FFFF)
    assert (data["type"], data["dpl"], data["db"], data["l"]) == (0x3, 3, 1, 0)


def test_segment_from_descriptor_assembles_scattered_base_and_limit():
    """Base bits 0-23 and 24-31, limit bits 0-15 and 16-19 come from their separate fields."""
    d = 0x12 << 56 | 0x5 << 48 | 0x89 << 40 | 0x345678 << 16 | 0xABCD
    seg = segment_from_descriptor(0x28, d)
    assert seg["base"] == 0x12345678 and seg["limit"] == 0x5ABCD and seg["g"] == 0


def test_gate_offset_reassembles_handler_address():
    """A 64-bit IDT gate keeps its handler's bits 0-15, 16-31 and 32-63 apart."""
    handler = 0x0000_7FFF_1234_5678
    gate = struct.pack("<HHBBHII", handler & 0xFFFF, 0x08, 0, 0x8E, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)
    assert gate_offset(gate) == handler


@pytest.mark.parametrize("good,expected", [("tcp:127.0.0.1:1234", ("127.0.0.1", 1234)),
                                           ("tcp:[::1]:9", ("::1", 9)),
                                           ("tcp::1234", ("127.0.0.1", 1234)),     # QEMU's -gdb tcp::1234
                                           ("tcp:1234", ("127.0.0.1", 1234))])
def test_parse_endpoint_accepts_tcp_host_port(good, expected):
    """tcp:HOST:PORT, with IPv6 hosts in brackets; QEMU's tcp::PORT and tcp:PORT on loopback."""
    assert parse_endpoint(good) == expected


@pytest.mark.parametrize("bad", ["1234", "tcp:host:0", "tcp:host:99999", "udp:h:1", "tcp:h:x",
                                 "unix:/tmp/gdb.sock", "tcp:[::1:9"])
def test_parse_endpoint_rejects_bad_values_with_one_line(bad):
    """A bad --gdb value is a ConfigError naming the option."""
    with pytest.raises(ConfigError, match="--gdb"):
        parse_endpoint(bad)


def test_thread_ids_name_vcpus_from_one():
    """gdb's thread i + 1 is vCPU i; -1 (all) and 0 (any) name none; others are refused."""
    assert parse_thread_id(b"1", 2) == 0 and parse_thread_id(b"2", 2) == 1
    assert parse_thread_id(b"a", 16) == 9
    assert parse_thread_id(b"-1", 2) is None and parse_thread_id(b"0", 2) is None
    for bad in (b"3", b"", b"x", b"-2"):
        with pytest.raises(ValueError):
            parse_thread_id(bad, 2)


@pytest.mark.parametrize("packet,expected", [
    (b";c", {0: "c", 1: "c", 2: "c"}),                   # continue all
    (b";s:2;c", {1: "s", 0: "c", 2: "c"}),               # step thread 2, the rest continue
    (b";s:2", {1: "s"}),                                 # step thread 2 alone: the others stay parked
    (b";c:1;s:1", {0: "c"}),                             # the leftmost action for a thread wins
    (b";S05:3;C02", {2: "s", 0: "c", 1: "c"}),           # signals are accepted, not delivered
])
def test_vcont_actions_per_vcpu(packet, expected):
    assert parse_vcont(packet, 3) == expected


@pytest.mark.parametrize("packet", [b"", b";", b";t", b";r1,2", b";c:4", b";Cxx", b"c"])
def test_vcont_refuses_what_it_does_not_do(packet):
    with pytest.raises(ValueError):
        parse_vcont(packet, 3)
