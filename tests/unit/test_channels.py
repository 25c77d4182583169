"""Several connections (--channels N) without KVM: asking for them in the handshake,
joining them, the channel stream, keeping the rounds in step, and a whole
migration through the one sender spread over them."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from kvmlite.bitmap import PAGE_SIZE
from kvmlite.config import Credentials, MigrationParams
from kvmlite.endpoints import TcpUri
from kvmlite.errors import StreamError
from kvmlite.migration import channels, destination, transport, wire
from kvmlite.migration.channels import ChannelSink, RoundSync
from kvmlite.migration.source import Migration, split_runs
from kvmlite.migration.status import MigrationStatus as S
from kvmlite.migration.wire import StreamDecoder
from kvmlite.vstate.memory import GuestMemory

from tests.fakes import FakeMachine

INFO = {"page_size": 4096, "ram": [[0, 1 << 20]], "vcpus": 1}
KEY = b"k" * 32


def handshake(server_kw: dict, ask):
    """server_handshake and client_handshake over a socketpair:
    (what the server returned or raised, what it heard asked, the client's outcome)."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(5)
    out, asked = {}, {}

    def serve():
        try:
            out["server"] = transport.server_handshake(a, Credentials(), asked=asked, **server_kw)
        except Exception as e:          # the outcome is what the test looks at
            out["server"] = e
    t = threading.Thread(target=serve)
    t.start()
    try:
        out["client"] = transport.client_handshake(b, Credentials(), ask)
    except Exception as e:
        out["client"] = e
    t.join(5)
    a.close()
    b.close()
    return out["server"], asked, out["client"]


def test_connections_are_offered_asked_for_and_granted():
    """HELLO offers M connections; a source asking for N <= M is heard, with the session."""
    hello = {}
    server, asked, _ = handshake({"channels": 8}, lambda h: (hello.update(h), {"channels": 3})[1])
    assert server is None and hello["channels"] == 8
    assert asked == {"channels": 3, "session": hello["nonce"]}


def test_a_source_asking_for_more_than_offered_is_refused():
    server, _, _ = handshake({"channels": 2}, lambda h: {"channels": 3})
    assert isinstance(server, StreamError) and "takes 1 to 2" in str(server)
    server, _, _ = handshake({}, lambda h: {"channels": 2})        # a destination that offers none
    assert isinstance(server, StreamError)


@pytest.mark.parametrize("request_", [{"join": b"short", "channel": 1}, {"join": b"x" * 32, "channel": 0},
                                      {"join": b"x" * 32, "channel": 8}, {"join": b"x" * 32},
                                      {"join": "x" * 32, "channel": 1}])
def test_malformed_join_requests_are_refused(request_):
    server, _, _ = handshake({"channels": 8}, lambda h: request_)
    assert isinstance(server, StreamError) and "malformed request to join" in str(server)


def connect_raw(port: int, ask) -> socket.socket:
    deadline = time.monotonic() + 5
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    transport.client_handshake(s, Credentials(), ask)
    return s


def test_the_listener_takes_only_channels_of_its_session_in_their_order():
    """A channel may finish its handshake before its main connection has won; one
    quoting another session is not taken; the real channels come back by number."""
    from kvmlite.procs import free_port
    port = free_port()
    lst = transport.Listener(TcpUri("127.0.0.1", port), Credentials())
    got = {}
    t = threading.Thread(target=lambda: got.update(main=lst.accept(), chans=lst.accept_channels(5)))
    t.start()
    hello = {}
    main = connect_raw(port, lambda h: (hello.update(h), {"channels": 3})[1])
    intruder = connect_raw(port, lambda h: {"join": b"\0" * 32, "channel": 1})
    c2 = connect_raw(port, lambda h: {"join": hello["nonce"], "channel": 2})
    c1 = connect_raw(port, lambda h: {"join": hello["nonce"], "channel": 1})
    t.join(10)
    lst.close()
    assert lst.asked == 3 and len(got["chans"]) == 2
    c1.sendall(b"one")
    assert got["chans"][0][0].recv(3) == b"one"       # the destination's channel 1 is c1
    intruder.settimeout(5)
    assert intruder.recv(1) == b""                     # not taken: closed with the listener
    for s in (main, intruder, c1, c2, got["main"][0], *(c for c, _ in got["chans"])):
        s.close()


def test_channels_that_do_not_come_fail_the_migration_in_time():
    from kvmlite.procs import free_port
    port = free_port()
    lst = transport.Listener(TcpUri("127.0.0.1", port), Credentials())
    got = {}
    t = threading.Thread(target=lambda: got.update(main=lst.accept()))
    t.start()
    main = connect_raw(port, lambda h: {"channels": 2})
    t.join(10)
    t0 = time.monotonic()
    with pytest.raises(StreamError, match="0 of the 1 secondary channels"):
        lst.accept_channels(0.3)
    assert time.monotonic() - t0 < 2
    lst.close()
    main.close()
    got["main"][0].close()


class _Sock:
    def __init__(self, data: bytes):
        self.data = memoryview(data)

    def recv_into(self, view, n):
        k = min(n, len(self.data))
        view[:k] = self.data[:k]
        self.data = self.data[k:]
        return k


def _channel_stream(*records: bytes) -> bytes:
    return wire.encode_preamble(INFO, flags=wire.FLAG_CHANNEL) + b"".join(records)


def test_a_channel_stream_has_pages_and_rounds_then_an_end_of_its_own():
    pre = wire.encode_preamble(INFO, flags=wire.FLAG_CHANNEL)
    head = wire.pages_header(0x1000, 1)
    rnd = wire.round_record(1)
    end = wire.end_record(1, 0, wire.crc(rnd, wire.crc(head, wire.crc(pre))))
    dec = StreamDecoder(_Sock(pre + head + b"p" * 4096 + rnd + end), channel=True)
    assert dec.read_preamble().channel
    ram = bytearray(1 << 20)
    kinds = [type(dec.next_record(lambda g, n: memoryview(ram)[g:g + n])).__name__ for _ in range(3)]
    assert kinds == ["Pages", "Round", "End"] and ram[0x1000:0x1004] == b"pppp"


@pytest.mark.parametrize("record,what", [(wire.zero_record(0, 1), "ZERO"),
                                         (wire.state_record({"version": 1}), "STATE")])
def test_zero_and_state_are_refused_on_a_channel(record, what):
    dec = StreamDecoder(_Sock(_channel_stream(record)), channel=True)
    dec.read_preamble()
    with pytest.raises(StreamError, match=f"a {what} record .* secondary channel"):
        dec.next_record(lambda g, n: bytearray(n))


def test_the_channel_flag_belongs_on_channels_only():
    with pytest.raises(StreamError, match="on the main connection"):
        StreamDecoder(_Sock(_channel_stream())).read_preamble()
    with pytest.raises(StreamError, match="lacks the flag CHANNEL"):
        StreamDecoder(_Sock(wire.encode_preamble(INFO)), channel=True).read_preamble()


def test_round_sync_holds_everyone_at_a_round_until_all_arrive():
    """No party passes round k before all still open reached it; a failure reaches everyone."""
    sync = RoundSync(3, timeout=5)
    passed = []

    def party(i, delay):
        time.sleep(delay)
        sync.arrive(i, 1)
        passed.append((i, time.monotonic()))
    ts = [threading.Thread(target=party, args=(i, d)) for i, d in ((0, 0), (1, 0.05), (2, 0.2))]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join(5)
    assert len(passed) == 3 and min(at for _, at in passed) - t0 >= 0.2

    sync = RoundSync(3, timeout=5)
    sync.end(1)                       # channel 1 ended after round 0: later rounds go on without it
    t = threading.Thread(target=lambda: (time.sleep(0.1), sync.arrive(2, 1)))
    t.start()
    sync.arrive(0, 1)                 # waits for channel 2 only
    t.join(5)
    sync.fail("channel 2: a bad record")
    with pytest.raises(StreamError, match="a bad record"):
        sync.arrive(0, 2)


@pytest.mark.parametrize("runs,most,want", [
    (([0], [5]), 2, ([0, 2, 4], [2, 2, 1])),
    (([0, 10], [1, 4]), 4, ([0, 10], [1, 4])),
    (([3, 100], [9, 2]), 4, ([3, 7, 11, 100], [4, 4, 1, 2])),
    (([], []), 4, ([], [])),
])
def test_split_runs_cuts_runs_to_batches(runs, most, want):
    s, n = split_runs(np.array(runs[0], dtype=np.int64), np.array(runs[1], dtype=np.int64), most)
    assert (s.tolist(), n.tolist()) == want


# ---- one sender, several connections, against a destination's receive() -------------------

NPAGES = 4096                   # 16 MiB


def _keys(i: int):
    return wire.StreamKeys.derive(KEY, bytes([i]) * 32, bytes([i]) * 32)


def migrate_over(machine, n: int, keyed: bool, **params):
    """Migration -> ChannelSink over n socketpairs -> destination.receive and the
    handover; returns (migration, the destination's machine, its ReceiveStats)."""
    pairs = [socket.socketpair() for _ in range(n)]
    for a, b in pairs:
        a.settimeout(10)
        b.settimeout(10)
    keys = [_keys(i) if keyed else None for i in range(n)]
    sink = ChannelSink(pairs[0][0], keys[0], [(a, k) for (a, _), k in zip(pairs[1:], keys[1:])], 10)
    dst = FakeMachine(GuestMemory(machine.memory.size))
    out = {}

    def destination_side():
        try:
            conn = pairs[0][1]
            out["got"] = destination.receive(conn, dst, keys=keys[0],
                                             channels=[(b, k) for (_, b), k in zip(pairs[1:], keys[1:])])
            conn.sendall(wire.encode_frame({"status": wire.READY}))
            wire.read_frame(conn, "COMMIT", wire.SOURCE_ANSWERS_TO_READY)
            conn.sendall(wire.encode_frame({"status": wire.RUNNING}))
        except Exception as e:          # the test reports it
            out["error"] = e
    t = threading.Thread(target=destination_side)
    t.start()
    mig = Migration(machine, MigrationParams("tcp:127.0.0.1:9", **params), sink=sink)
    mig.start()
    assert mig.wait(30)
    t.join(30)
    for _a, b in pairs:
        b.close()
    assert "error" not in out, out.get("error")
    return mig, *out["got"]


@pytest.fixture
def machine():
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    for p in range(0, NPAGES, 3):                 # every third page holds data
        mem.write(p * PAGE_SIZE, p.to_bytes(4, "little") * (PAGE_SIZE // 4))
    m = FakeMachine(mem)
    yield m
    mem.close()


@pytest.mark.parametrize("keyed", [False, True])
def test_pages_rewritten_between_rounds_arrive_as_last_written_whichever_connection(machine, keyed):
    """The guest rewrites pages before each of the first syncs (and so they go again, on
    whichever connection is next); the destination's memory ends as the source's."""
    rng = np.random.default_rng(7)
    syncs = []

    def guest(vm):
        syncs.append(1)
        if len(syncs) <= 4:
            pages = rng.choice(NPAGES, 600, replace=False)
            for p in pages.tolist():
                machine.memory.write(p * PAGE_SIZE, bytes([len(syncs)]) * 64)
            vm.dirty(pages.tolist())
    machine.vm.on_fetch = guest
    mig, got, stats = migrate_over(machine, 3, keyed, downtime_ms=0.001, max_rounds=10)
    assert mig.status is S.COMPLETED, mig.stats.error
    assert mig.stats.rounds >= 4 and stats.connections == 3
    assert bytes(got.memory.view) == bytes(machine.memory.view)


def test_stop_copy_keeps_the_channels_for_its_one_pass(machine):
    mig, got, stats = migrate_over(machine, 2, False, live=False, hint=False)
    assert mig.status is S.COMPLETED and mig.stats.rounds == 1
    assert stats.pages + stats.zero_pages == NPAGES
    assert bytes(got.memory.view) == bytes(machine.memory.view)


def test_a_channel_stream_does_not_verify_under_another_channels_keys():
    """Each connection's tags are its own: channel 1's stream read with channel 2's
    keys fails its structure MAC (and marks its pages unverified)."""
    a, b = socket.socketpair()
    ch = channels._Channel(a, _keys(1), 1)
    mem = GuestMemory(1 << 20)
    mem.write(0x3000, b"x" * 4096)
    info = dict(INFO, integrity=wire.INTEGRITY)
    ch.send_structure(wire.encode_preamble(info, flags=wire.FLAG_CHANNEL))
    ch.send_pages(memoryview(wire.pages_header(0x3000, 1)), mem, np.array([0x3000]), np.array([1]))
    ch.end(5)
    a.close()
    dec = StreamDecoder(b, keys=_keys(2), channel=True)
    dec.read_preamble()
    rec = dec.next_record(lambda g, n: bytearray(n))
    assert rec.failed.all()
    with pytest.raises(StreamError, match="structure MAC"):
        dec.next_record(lambda g, n: bytearray(n))
    b.close()
    mem.close()
