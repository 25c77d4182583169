"""Structure-aware fuzzing of the destination's receive path (no /dev/kvm needed).

tests/unit/test_wire.py fuzzes the decoder on its own.  These tests drive the
whole of `destination.receive` -- decoder, C fast path, state validation,
device restore -- through tests/fuzz/target.py, with guest RAM between guard
pages, on streams whose framing and checksum are valid but whose fields are
hostile.  A model predicts for each stream whether it must be accepted and
what guest memory must then hold.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmlite.errors import StreamError
from kvmlite.migration import wire

from . import target
from .target import PAGE_SIZE, RAM_SIZE, StreamBuilder, machine_state, page

NPAGES = RAM_SIZE // PAGE_SIZE
U64 = 2**64
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def memory():
    mem = target.GuardedMemory()
    yield mem
    mem.close()


def fresh(mem):
    mem.clear()
    return mem


# -- records with valid framing and hostile fields ------------------------------------------

GPAS = st.one_of(
    st.integers(0, NPAGES - 1).map(lambda p: p * PAGE_SIZE),                 # inside RAM
    st.sampled_from([RAM_SIZE, RAM_SIZE - PAGE_SIZE, U64 - PAGE_SIZE, 2**63, 2**52 * PAGE_SIZE]),
    st.integers(0, RAM_SIZE).filter(lambda g: g % PAGE_SIZE),                # unaligned
)
COUNTS = st.one_of(st.integers(1, 4),
                   st.sampled_from([0, 2**32 - 1, wire.MAX_RUN_PAGES, wire.MAX_RUN_PAGES + 1,
                                    NPAGES, NPAGES + 1]))
RECORD = st.one_of(
    st.tuples(st.just("pages"), GPAS, COUNTS, st.integers(1, 2**31)),
    st.tuples(st.just("zero"), GPAS, COUNTS),
    st.tuples(st.just("round"), st.integers(0, 2**32 - 1)),
)
TAILS = ["none", "second END", "PAGES after END", "STATE after END", "garbage after END",
         "no STATE", "two STATEs", "wrong counts", "wrong crc", "no END"]


def legal(gpa: int, n: int) -> bool:
    return 1 <= n <= wire.MAX_RUN_PAGES and gpa % PAGE_SIZE == 0 and gpa + n * PAGE_SIZE <= RAM_SIZE


def build(records, tail: str) -> tuple[bytes, bool, dict[int, bytes]]:
    """The stream, whether it must be accepted, and the pages it leaves (pfn -> bytes)."""
    b = StreamBuilder()
    ok, model = True, {}
    for rec in records:
        if rec[0] == "round":
            b.round(rec[1])
            continue
        kind, gpa, n = rec[:3]
        head = struct.pack("<BQI", wire.REC_PAGES if kind == "pages" else wire.REC_ZERO,
                           gpa % U64, n)
        b.out += b.crc.add(head)
        if not legal(gpa, n):
            ok = False           # refused before its payload is read: none needed
            break
        first = gpa // PAGE_SIZE
        if kind == "pages":
            data = [page(first + i, rec[3]) for i in range(n)]
            b.out += b"".join(data)
            b.pages += n
            model.update({first + i: data[i] for i in range(n)})
        else:
            b.zero_pages += n
            model.update({first + i: bytes(PAGE_SIZE) for i in range(n)})
    state = machine_state()
    if tail != "no STATE":
        b.state(state)
    if tail == "two STATEs":
        b.state(state)
    if tail == "wrong counts":
        b.pages += 1
    if tail == "no END":
        return bytes(b.out), False, model
    end = wire.end_record(b.pages, b.zero_pages, b.crc.value)
    if tail == "wrong crc":
        end = end[:-4] + struct.pack("<I", (b.crc.value + 1) % 2**32)
    extra = {"second END": end, "PAGES after END": wire.pages_header(0, 1) + page(0, 1),
             "STATE after END": wire.state_record(state), "garbage after END": b"\0"}.get(tail, b"")
    return bytes(b.out) + end + extra, ok and tail == "none", model


@SETTINGS
@given(records=st.lists(RECORD, max_size=12), tail=st.sampled_from(TAILS),
       chunk=st.sampled_from([None, 1, 13, 4096, 4109]))
def test_receive_follows_the_model(memory, records, tail, chunk):
    """A stream is accepted exactly when every record is legal and it ends properly; then RAM is what it sent."""
    data, must_accept, model = build(records, tail)
    if "after END" in tail or tail == "second END":
        chunk = None    # trailing bytes are caught when they arrive with END (the source waits for the reply)
    mem = fresh(memory)
    try:
        machine, _ = target.receive(data, mem, chunk)
    except StreamError:
        assert not must_accept, "a valid stream was refused"
        return
    assert must_accept, f"accepted a stream it must refuse ({tail})"
    assert len(machine.vcpu.restored) == 1
    for pfn in range(NPAGES):
        assert mem.read(pfn * PAGE_SIZE, PAGE_SIZE) == model.get(pfn, bytes(PAGE_SIZE)), pfn


def test_refused_stream_never_restores_the_vcpu(memory):
    """Every way of ending a stream wrongly is refused before the vCPU state is used."""
    records = [("pages", 0x4000, 2, 7), ("zero", 0x4000, 1), ("round", 0)]
    for tail in TAILS[1:]:
        data, must_accept, _ = build(records, tail)
        assert not must_accept
        with pytest.raises(StreamError):
            target.receive(data, fresh(memory))


# -- hostile values inside the STATE map, past a valid END ---------------------------------

def paths(node, prefix=()):
    """Every path into a state map, for putting a hostile value anywhere in it."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


STATE_PATHS = [p for p in paths(machine_state()) if p]
MSGPACK_INTS = st.integers(-2**63, U64 - 1)
HOSTILE_VALUES = st.one_of(
    MSGPACK_INTS, st.sampled_from([0, -1, U64 - 1, 2**32, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=8), st.binary(max_size=8),
    st.lists(MSGPACK_INTS, max_size=4), st.dictionaries(st.text(max_size=4), MSGPACK_INTS, max_size=3),
)


def state_stream(state) -> bytes:
    b = StreamBuilder()
    b.page_run(0x5000, page(5, 1))
    return b.state(state).end()


def check_accepted(machine, state):
    """What a destination may resume: the state it was sent, and a free-page
    registration that lies inside its own RAM."""
    assert machine.vcpu.restored == [state["vcpus"][0]]
    reg = machine.devices()["fph"].registration
    if reg is not None:
        assert reg.region_gpa + 64 <= RAM_SIZE
        assert reg.base_gpa + reg.npages * PAGE_SIZE <= RAM_SIZE
        assert reg.bitmap_gpa + reg.bitmap_size <= RAM_SIZE
        machine.devices()["fph"].free_mask()     # reads the bitmap: inside the guard pages


@SETTINGS
@given(edits=st.lists(st.tuples(st.sampled_from(STATE_PATHS), st.one_of(st.just("delete"), HOSTILE_VALUES)),
                      min_size=1, max_size=3))
def test_hostile_state_values_are_refused_or_harmless(memory, edits):
    """Any value anywhere in the state map ends in a StreamError or in a state that is safe to resume."""
    state = machine_state()
    for path, value in edits:
        node = state
        try:
            for key in path[:-1]:
                node = node[key]
            if value == "delete":
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass        # an earlier edit replaced this branch
    try:
        machine, _ = target.receive(state_stream(state), fresh(memory))
    except StreamError:
        return
    check_accepted(machine, state)


REGISTRATION_NUMBERS = st.one_of(
    st.integers(0, RAM_SIZE + PAGE_SIZE),
    st.sampled_from([U64 - 1, U64 - 8, U64 - PAGE_SIZE, 2**63, 2**58, (U64 - 1) // 64 * 8]),
    MSGPACK_INTS, st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none())


@SETTINGS
@given(reg=st.fixed_dictionaries({k: REGISTRATION_NUMBERS for k in
                                  ("region_gpa", "base_gpa", "npages", "bitmap_gpa")}))
def test_migrated_fph_registration_stays_inside_ram(memory, reg):
    """A free-page registration in the state is taken only if header, bitmap and covered pages lie in RAM."""
    try:
        machine, _ = target.receive(state_stream(machine_state(reg)), fresh(memory))
    except StreamError as e:
        assert "state.devices.fph" in str(e)
        return
    check_accepted(machine, machine_state(reg))


# -- regressions: inputs that once escaped as something other than a StreamError ------------

@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "9" * 5000])
def test_uart_register_that_is_not_a_number(memory, value):
    """A UART register of inf (OverflowError in int()) or nan is a StreamError naming the device."""
    state = machine_state()
    state["devices"]["uart"]["lcr"] = value
    with pytest.raises(StreamError, match="state.devices.uart"):
        target.receive(state_stream(state), fresh(memory))


def deep(levels: int):
    value = 0
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("where", ["page_size", "ram", "vcpus", "hint", "source"])
def test_deeply_nested_header_value(memory, where):
    """A header value nested ~1000 deep (repr() hits the recursion limit) is a StreamError."""
    info = dict(target.INFO, **{where: deep(1000)} if where != "ram" else {"ram": [deep(1000)]})
    body = msgpack.packb(info, use_bin_type=True)
    data = struct.pack("<8sHHI", wire.MAGIC, wire.VERSION, 0, len(body)) + body
    with pytest.raises(StreamError, match="stream header"):
        target.receive(data, fresh(memory))


def test_deeply_nested_state_version(memory):
    """A STATE whose version is nested ~1000 deep is a StreamError."""
    state = machine_state()
    state["version"] = deep(1000)
    with pytest.raises(StreamError, match="state.version"):
        target.receive(state_stream(state), fresh(memory))


# -- the harness itself ----------------------------------------------------------------------

def test_seed_streams_are_accepted_and_land_their_pages(memory):
    """Every seed of the fuzz corpus is a whole valid stream, at any chunking."""
    for name, data in target.seed_streams().items():
        for chunk in (None, 1000):
            machine, stats = target.receive(data, fresh(memory), chunk)
            assert len(machine.vcpu.restored) == 1, name
            assert stats.pages > 0, name
            assert target.fix_checksum(data) == data, name


def test_guard_pages_turn_a_write_past_ram_into_sigsegv():
    """A C write one byte past guest RAM kills the process with SIGSEGV (so the fuzzer sees it)."""
    code = ("from tests.fuzz.target import GuardedMemory\n"
            "from kvmlite.kvm import ffi\n"
            "m = GuardedMemory()\n"
            "ffi.memmove(m.pointer + m.size - 1, b'x', 1)\n"          # the last byte of RAM: fine
            "print('inside ok', flush=True)\n"
            "ffi.memmove(m.pointer + m.size, b'x', 1)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=target.__file__.rsplit("/tests/", 1)[0], timeout=60)
    assert r.stdout == "inside ok\n"
    assert r.returncode == -11, (r.returncode, r.stderr)
