"""Migration helpers and the STATE record's validation.

The state dicts are built by hand in the shapes Vcpu.save_state and the
devices' save_state produce.  No /dev/kvm.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlite import msr
from kvmlite.bitmap import expand_runs, list_runs, page_runs
from kvmlite.devices import DebugCon, ExitDevice, FreePageHint, Uart16550
from kvmlite.errors import ConfigError, StreamError
from kvmlite.kvm import ffi
from kvmlite.endpoints import FileUri, TcpUri, UnixUri, parse_uri
from kvmlite.migration.state import STATE_VERSION, restore_devices, validate_state
from kvmlite.vstate.vcpu import CR_NAMES, REG_NAMES, SEG_FIELDS, SEG_NAMES


# ---- page_runs / list_runs / expand_runs ------------------------------------------------------


def naive_runs(mask):
    runs, start = [], None
    for i, v in enumerate(list(mask) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def unpack_abi_bits(words: np.ndarray) -> list[bool]:
    """Bit i is bit i % 8 of byte i // 8 (docs/abi.md), written out plainly."""
    raw = words.astype("<u8").tobytes()
    return [bool(raw[i // 8] >> (i % 8) & 1) for i in range(8 * len(raw))]


@pytest.mark.parametrize("pages,runs", [
    ([], []), ([7], [(7, 1)]), ([0, 1, 2, 3], [(0, 4)]),
    ([1, 2, 4], [(1, 2), (4, 1)]), ([0, 3, 4], [(0, 1), (3, 2)]),
])
def test_list_runs_examples(pages, runs):
    """list_runs gives (start, length) of each run of consecutive page numbers."""
    starts, lengths = list_runs(np.array(pages, dtype=np.int64))
    assert list(zip(starts.tolist(), lengths.tolist())) == runs


@given(st.lists(st.integers(0, 1000), max_size=200).map(lambda xs: sorted(set(xs))))
@settings(max_examples=200, deadline=None)
def test_expand_runs_inverts_list_runs(pages):
    """expand_runs(list_runs(pages)) gives the pages back."""
    starts, lengths = list_runs(np.array(pages, dtype=np.int64))
    assert expand_runs(starts, lengths).tolist() == pages


@given(st.lists(st.sampled_from([0, 1, 0xFFFFFFFFFFFFFFFF, 1 << 63, 0x8000000000000001])
                | st.integers(0, (1 << 64) - 1), max_size=12))
@settings(max_examples=200, deadline=None)
def test_page_runs_matches_a_plain_scan_of_the_bits(words):
    """page_runs on uint64 words gives the same (first page, length) runs as scanning every
    bit in the ABI's bit order, including runs that cross word boundaries."""
    w = np.array(words, dtype=np.uint64)
    starts, lengths = page_runs(w)
    assert list(zip(starts.tolist(), lengths.tolist())) == naive_runs(unpack_abi_bits(w))


# ---- parse_uri ----------------------------------------------------------------------------

@pytest.mark.parametrize("uri,parsed", [
    ("tcp:127.0.0.1:4444", TcpUri("127.0.0.1", 4444)),
    ("tcp:localhost:1", TcpUri("localhost", 1)),
    ("tcp:[::1]:65535", TcpUri("::1", 65535)),
    ("tcp:dest.example:80", TcpUri("dest.example", 80)),
    ("tcp:4444", TcpUri("127.0.0.1", 4444)),          # no host: loopback
    ("tcp::80", TcpUri("127.0.0.1", 80)),
    ("file:/tmp/vm.snap", FileUri("/tmp/vm.snap")),
    ("file:rel/vm.snap", FileUri("rel/vm.snap")),
    ("unix:/tmp/x", UnixUri("/tmp/x")),
    ("unix:" + "p" * 107, UnixUri("p" * 107)),
])
def test_parse_uri_good(uri, parsed):
    """tcp:HOST:PORT (IPv6 in brackets), tcp:PORT on loopback, unix:PATH, file:PATH."""
    assert parse_uri(uri) == parsed


@pytest.mark.parametrize("uri", [
    "udp:h:1", "h:1", "tcp:", "tcp:host", "tcp:host:", "tcp:host:0", "tcp:host:65536",
    "tcp:host:-1", "tcp:host:http", "tcp:host:8 0", "tcp:host:²", "tcp:host:٣", "unix:",
    "unix:" + "p" * 108, "unix:a\0b", "file:",
])
def test_parse_uri_bad(uri):
    """Anything else raises ConfigError quoting the URI."""
    with pytest.raises(ConfigError) as e:
        parse_uri(uri)
    assert repr(uri) in str(e.value)


@given(st.text(max_size=30))
@settings(max_examples=200, deadline=None)
def test_parse_uri_never_raises_anything_else(uri):
    """On any string parse_uri returns a valid target or raises ConfigError."""
    try:
        t = parse_uri(uri)
    except ConfigError:
        return
    if isinstance(t, TcpUri):
        assert t.host and 0 < t.port < 65536 and uri.startswith("tcp:")
    else:
        assert t.path and uri == str(t)           # unix:PATH or file:PATH


# ---- validate_state ---------------------------------------------------------------------------

class FakeMemory:
    size = 16 << 20
    npages = size >> 12


def make_devices() -> dict:
    class Out:
        def write_byte(self, b):
            pass
    return {"uart": Uart16550(Out()), "debugcon": DebugCon(Out()), "exit": ExitDevice(),
            "fph": FreePageHint(FakeMemory())}


def make_vcpu_state() -> dict:
    """One vCPU as Vcpu.save_state would produce it right after boot."""
    seg = {f: 0 for f in SEG_FIELDS}
    sregs = {n: 0 for n in CR_NAMES}
    sregs.update({s: dict(seg, selector=0x10 if s != "cs" else 0x08, limit=0xFFFFFFFF, present=1)
                  for s in SEG_NAMES})
    sregs["cr0"], sregs["cr3"], sregs["efer"] = 0x80050033, 0x10000, 0x501
    sregs["gdt"] = {"base": 0x3000, "limit": 23}
    sregs["idt"] = {"base": 0, "limit": 0}
    sregs["interrupt_bitmap"] = [0, 0, 0, 0]
    regs = {n: 0 for n in REG_NAMES}
    regs.update(rip=0x100000, rsp=0x80000, rflags=2, rdi=0x1000, rsi=0x4B564D4C)
    return {
        "regs": regs, "sregs": sregs,
        "fpu": bytes(ffi.sizeof("struct kvm_fpu")),
        "xsave": bytes(ffi.sizeof("struct kvm_xsave")),
        "events": bytes(ffi.sizeof("struct kvm_vcpu_events")),
        "xcrs": [[0, 7]],
        "msrs": [[index, 0] for index in msr.MIGRATED],
    }


def make_state() -> dict:
    return {"version": STATE_VERSION, "vcpus": [make_vcpu_state()],
            "devices": {name: dev.save_state() for name, dev in make_devices().items()},
            "irqchip": None, "interrupts": None}


def test_valid_state_accepted_and_restores_devices():
    """A state in exactly the shape save_state produces passes validation and restores into fresh devices."""
    state = make_state()
    assert len(state["vcpus"][0]["regs"]) == 18 and len(state["vcpus"][0]["sregs"]["interrupt_bitmap"]) == 4
    devices = make_devices()
    assert validate_state(copy.deepcopy(state), 1, devices) == state
    restore_devices(state, devices)


def _set(path, value):
    def mutate(s):
        *parents, last = path
        node = s
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _del(path):
    def mutate(s):
        *parents, last = path
        node = s
        for p in parents:
            node = node[p]
        del node[last]
    return mutate


V = ("vcpus", 0)
HOSTILE = [
    ("a newer version", _set(("version",), STATE_VERSION + 1), "state.version"),
    ("version string", _set(("version",), "1"), "state.version"),
    ("missing devices", _del(("devices",)), "state"),
    ("missing vcpus", _del(("vcpus",)), "state"),
    ("vcpus not a list", _set(("vcpus",), {"0": {}}), "state.vcpus"),
    ("two vcpus", lambda s: s["vcpus"].append(copy.deepcopy(s["vcpus"][0])), "state.vcpus"),
    ("no vcpus", _set(("vcpus",), []), "state.vcpus"),
    ("vcpu not a map", _set(V, [1, 2]), "state.vcpus[0]"),
    ("missing regs.rip", _del(V + ("regs", "rip")), "state.vcpus[0].regs"),
    ("negative register", _set(V + ("regs", "rax"), -1), "state.vcpus[0].regs.rax"),
    ("register 2^64", _set(V + ("regs", "rax"), 1 << 64), "state.vcpus[0].regs.rax"),
    ("register bool", _set(V + ("regs", "rip"), True), "state.vcpus[0].regs.rip"),
    ("register float", _set(V + ("regs", "rsp"), 1.0), "state.vcpus[0].regs.rsp"),
    ("register string", _set(V + ("regs", "rflags"), "2"), "state.vcpus[0].regs.rflags"),
    ("unknown register", _set(V + ("regs", "xmm0"), 0), "state.vcpus[0].regs"),
    ("missing cr3", _del(V + ("sregs", "cr3")), "state.vcpus[0].sregs"),
    ("huge cr0", _set(V + ("sregs", "cr0"), 1 << 64), "state.vcpus[0].sregs.cr0"),
    ("segment not a map", _set(V + ("sregs", "cs"), 8), "state.vcpus[0].sregs.cs"),
    ("segment missing field", _del(V + ("sregs", "ss", "dpl")), "state.vcpus[0].sregs.ss"),
    ("unknown segment field", _set(V + ("sregs", "cs", "dirty"), 1), "state.vcpus[0].sregs.cs"),
    ("unknown vcpu key", _set(V + ("lapic",), b""), "state.vcpus[0]"),
    ("selector 2^16", _set(V + ("sregs", "ds", "selector"), 1 << 16), "state.vcpus[0].sregs.ds.selector"),
    ("segment limit 2^32", _set(V + ("sregs", "cs", "limit"), 1 << 32), "state.vcpus[0].sregs.cs.limit"),
    ("segment type 256", _set(V + ("sregs", "tr", "type"), 256), "state.vcpus[0].sregs.tr.type"),
    ("gdt limit 2^16", _set(V + ("sregs", "gdt", "limit"), 1 << 16), "state.vcpus[0].sregs.gdt.limit"),
    ("idt missing base", _del(V + ("sregs", "idt", "base")), "state.vcpus[0].sregs.idt"),
    ("interrupt bitmap 3 words", _set(V + ("sregs", "interrupt_bitmap"), [0, 0, 0]),
     "state.vcpus[0].sregs.interrupt_bitmap"),
    ("interrupt bitmap word negative", _set(V + ("sregs", "interrupt_bitmap"), [0, -1, 0, 0]),
     "state.vcpus[0].sregs.interrupt_bitmap[1]"),
    ("fpu one byte short", lambda s: s["vcpus"][0].update(fpu=s["vcpus"][0]["fpu"][:-1]),
     "state.vcpus[0].fpu"),
    ("xsave one byte long", lambda s: s["vcpus"][0].update(xsave=s["vcpus"][0]["xsave"] + b"\0"),
     "state.vcpus[0].xsave"),
    ("events empty", _set(V + ("events",), b""), "state.vcpus[0].events"),
    ("events as str", lambda s: s["vcpus"][0].update(events="\0" * len(s["vcpus"][0]["events"])),
     "state.vcpus[0].events"),
    ("missing xsave", _del(V + ("xsave",)), "state.vcpus[0]"),
    ("unknown MSR (EFER)", _set(V + ("msrs",), [[0xC0000080, 0]]), "state.vcpus[0].msrs[0]"),
    ("MSR index 2^32", _set(V + ("msrs",), [[1 << 32, 0]]), "state.vcpus[0].msrs[0][0]"),
    ("too many MSRs", lambda s: s["vcpus"][0]["msrs"].append([msr.IA32_TSC, 0]), "state.vcpus[0].msrs"),
    ("MSR triple", _set(V + ("msrs",), [[msr.IA32_PAT, 0, 0]]), "state.vcpus[0].msrs[0]"),
    ("msrs not a list", _set(V + ("msrs",), {msr.IA32_PAT: 0}), "state.vcpus[0].msrs"),
    ("too many xcrs", _set(V + ("xcrs",), [[0, 7]] * 17), "state.vcpus[0].xcrs"),
    ("xcr value negative", _set(V + ("xcrs",), [[0, -7]]), "state.vcpus[0].xcrs[0][1]"),
    ("unknown device", _set(("devices", "virtio-net"), {}), "state.devices"),
    ("missing device", _del(("devices", "fph")), "state.devices"),
    ("devices not a map", _set(("devices",), []), "state.devices"),
]


@pytest.mark.parametrize("case,mutate,where", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_state_refused(case, mutate, where):
    """Each malformed state raises StreamError naming where in the state it is wrong."""
    state = make_state()
    mutate(state)
    with pytest.raises(StreamError) as e:
        validate_state(state, 1, make_devices())
    assert f"bad state at {where}:" in str(e.value)


@pytest.mark.parametrize("state", [None, [], "state", 1, b"\x00"])
def test_non_map_state_refused(state):
    """A STATE that is not a map raises StreamError."""
    with pytest.raises(StreamError, match="expected a map"):
        validate_state(state, 1, make_devices())


def test_header_vcpu_count_must_match():
    """A state with one vCPU is refused when the stream header announced two."""
    with pytest.raises(StreamError, match="2 vCPU"):
        validate_state(make_state(), 2, make_devices())


@pytest.mark.parametrize("device,bad", [
    ("uart", {"ier": 0}),
    ("uart", dict(Uart16550(None).save_state(), rx=5)),
    ("uart", dict(Uart16550(None).save_state(), lcr="x")),
    ("fph", None),
    ("fph", {"region_lo": 0, "region_hi": 0, "status": 1, "host_events": 0,
             "registration": {"region_gpa": 0x1000, "base_gpa": 0, "npages": 1 << 40,
                              "bitmap_gpa": 0x2000}}),
    ("fph", {"region_lo": 0, "region_hi": 0, "status": 1, "host_events": 0,
             "registration": {"region_gpa": 0x1000}}),
])
def test_restore_devices_turns_bad_device_state_into_stream_error(device, bad):
    """A device state that restore_state cannot take (wrong type, missing field, FPH past RAM) is a StreamError."""
    state = make_state()
    state["devices"][device] = bad
    with pytest.raises(StreamError, match=f"state.devices.{device}"):
        restore_devices(state, make_devices())


# ---- the handover: how long the source listens for the answer to COMMIT -----------------------

@pytest.mark.parametrize("ready,timeout,wait", [
    ({"status": "ready", "commit_timeout": 2.0}, 2.0, 4.0),    # longer than the destination waits
    ({"status": "ready", "commit_timeout": 30}, 2.0, 32.0),
    ({"status": "ready", "commit_timeout": 1.0}, 10.0, 11.0),
    ({"status": "ready"}, 5.0, 5.0),                            # a READY that does not say
    ({"status": "ready", "commit_timeout": "30"}, 5.0, 5.0),    # hostile or broken values: ignored
    ({"status": "ready", "commit_timeout": True}, 5.0, 5.0),
    ({"status": "ready", "commit_timeout": float("nan")}, 5.0, 5.0),
    ({"status": "ready", "commit_timeout": float("inf")}, 5.0, 5.0),
    ({"status": "ready", "commit_timeout": -1.0}, 5.0, 5.0),
    ({"status": "ready", "commit_timeout": 1e300}, 5.0, 5.0),
])
def test_source_outwaits_the_destinations_commit_timeout(ready, timeout, wait):
    from kvmlite.migration.source import answer_wait
    assert answer_wait(ready, timeout) == wait
