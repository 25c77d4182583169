"""The fuzz target: the destination's real receive path, without /dev/kvm.

`destination.receive(conn, machine, args)` reads a stream from anything with
`recv_into` into `machine.memory`, validates the state, restores the devices
and hands the vCPU state to `machine.vcpu.restore_state`.  Here the machine is
a stand-in whose guest RAM is an mmap with a PROT_NONE page on each side: a
write outside RAM, by Python or by the decoder's C fast path, is a SIGSEGV
that the fuzzer reports as a crash instead of silently corrupting the heap.
The devices are the real ones; only KVM is missing.

Every input must end in `accepted` (a whole, valid stream) or `refused` (a
`KvmliteError`, which the destination turns into a one-line message and a
non-zero exit).  Anything else escapes from `run_one` and is a bug.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import zlib
from types import SimpleNamespace

from tests import fakes
from tests.fakes import vcpu_state

from kvmlite.devices.debugcon import DebugCon
from kvmlite.devices.exitdev import ExitDevice
from kvmlite.devices.fph import FreePageHint
from kvmlite.devices.uart import Uart16550
from kvmlite.errors import KvmliteError
from kvmlite.kvm import ffi
from kvmlite.migration import destination, wire
from kvmlite.migration.state import STATE_VERSION
from kvmlite.vstate.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory

# Small enough to zero per input, big enough for runs, a bitmap and a header.
RAM_SIZE = 64 * PAGE_SIZE
INFO = {"page_size": PAGE_SIZE, "ram": [[0, RAM_SIZE]], "vcpus": 1, "hint": True,
        "source": "fuzz seed"}

PROT_NONE = 0   # <sys/mman.h>; Python's mmap module does not export it
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class GuardedMemory(GuestMemory):
    """GuestMemory (its own range checks, slices and zeroing) over RAM that
    sits between two inaccessible pages."""

    def __init__(self, size: int = RAM_SIZE):
        self.gpa = 0
        self.size = size
        self.npages = size >> PAGE_SHIFT
        self._whole = mmap.mmap(-1, size + 2 * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        self._wholebuf = ffi.from_buffer(self._whole)
        base = int(ffi.cast("uintptr_t", self._wholebuf))
        for guard in (base, base + PAGE_SIZE + size):
            if _libc.mprotect(guard, PAGE_SIZE, PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
        self._map = memoryview(self._whole)[PAGE_SIZE:PAGE_SIZE + size]
        self.view = self._map
        self._cbuf = self._wholebuf
        self.host_addr = base + PAGE_SIZE
        self._ptr = ffi.cast("char *", self.host_addr)
        self._pagemap = None

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(super().read(gpa, length))

    def clear(self) -> None:
        self._map[:] = bytes(self.size)

    def close(self) -> None:
        self._map.release()
        ffi.release(self._wholebuf)
        self._whole.close()


class RecordingVcpu:
    """Takes the migrated vCPU state without KVM: records it, validates nothing
    (migration.state.validate_state already did)."""

    def __init__(self, memory: GuardedMemory, index: int = 0):
        self.memory = memory
        self.index = index              # restore_state() asks each vCPU which it is
        self.restored: list[dict] = []

    def restore_state(self, state: dict) -> None:
        self.restored.append(state)
        if os.environ.get("KVMLITE_FUZZ_SELFTEST") == "write-past-ram":
            # Only for test_fuzz_bounded: prove that a write one byte past RAM
            # is caught as a crash by the guard page and reported by the fuzzer.
            ffi.memmove(self.memory.pointer + self.memory.size, b"!", 1)


class FakeMachine(fakes.FakeMachine):
    """What receive() uses of a Machine, over guarded memory, recording the restored vCPU."""

    def __init__(self, memory: GuardedMemory):
        super().__init__(memory)
        self.vcpu = RecordingVcpu(memory)
        self.vcpus = [self.vcpu]

    def _new_vcpu(self, index: int):
        vcpu = RecordingVcpu(self.memory, index)
        if index == 0:
            self.vcpu = vcpu            # a stream of N vCPUs remakes the machine with N
        return vcpu


class BytesSource:
    """An in-memory connection: at most `chunk` bytes per recv_into, 0 at the end
    (a closed connection), so a truncated stream ends at once and never waits."""

    def __init__(self, data: bytes, chunk: int | None = None):
        self.data = memoryview(bytes(data))
        self.pos = 0
        self.chunk = chunk

    def recv_into(self, buf, nbytes: int = 0) -> int:
        n = min(nbytes or len(buf), len(buf), len(self.data) - self.pos)
        if self.chunk:
            n = min(n, self.chunk)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def receive(data: bytes, memory: GuardedMemory, chunk: int | None = None):
    """Run destination.receive on `data`; returns the machine.  Raises what it raises."""
    machine = FakeMachine(memory)
    got, stats = destination.receive(BytesSource(data, chunk), machine)
    assert got is machine
    return machine, stats


def run_one(data: bytes, memory: GuardedMemory, chunk: int | None = None) -> str:
    """'accepted' or 'refused'; any other exception is a bug and propagates."""
    try:
        machine, _ = receive(data, memory, chunk)
    except KvmliteError:
        return "refused"
    if len(machine.vcpu.restored) != 1:
        raise AssertionError(f"an accepted stream restored the vCPU {len(machine.vcpu.restored)} times")
    return "accepted"


# ---------------------------------------------------------------------------
# Valid streams from the real encoders: the fuzzer's seed corpus.

def machine_state(fph_registration: dict | None = None) -> dict:
    """A whole STATE map: the vCPU and the real devices' save_state."""
    out = fakes._Null()
    devices = {"uart": Uart16550(out), "debugcon": DebugCon(out), "exit": ExitDevice(),
               "fph": FreePageHint(SimpleNamespace(size=RAM_SIZE))}
    state = {"version": STATE_VERSION, "vcpus": [vcpu_state()], "irqchip": None, "interrupts": None,
             "devices": {name: dev.save_state() for name, dev in devices.items()}}
    if fph_registration is not None:
        state["devices"]["fph"].update(status=1, registration=fph_registration)
    return state


class StreamBuilder:
    """Encodes a stream with kvmlite.migration.wire, chaining the checksum as a source does."""

    def __init__(self, info: dict = INFO):
        self.crc = wire.Crc()
        self.out = bytearray(self.crc.add(wire.encode_preamble(info)))
        self.pages = self.zero_pages = 0

    def page_run(self, gpa: int, payload: bytes) -> "StreamBuilder":
        n = len(payload) // PAGE_SIZE
        self.out += self.crc.add(wire.pages_header(gpa, n)) + payload   # payloads: no crc
        self.pages += n
        return self

    def zero(self, gpa: int, npages: int) -> "StreamBuilder":
        self.out += self.crc.add(wire.zero_record(gpa, npages))
        self.zero_pages += npages
        return self

    def round(self, n: int) -> "StreamBuilder":
        self.out += self.crc.add(wire.round_record(n))
        return self

    def state(self, state: dict) -> "StreamBuilder":
        self.out += self.crc.add(wire.state_record(state))
        return self

    def end(self) -> bytes:
        self.out += wire.end_record(self.pages, self.zero_pages, self.crc.value)
        return bytes(self.out)


def page(pfn: int, gen: int) -> bytes:
    """A page whose every word names its frame and generation (as the guest's pattern)."""
    return struct.pack("<Q", pfn << 32 | gen) * (PAGE_SIZE // 8)


def seed_streams() -> dict[str, bytes]:
    """Small valid streams covering every record type and both receive paths."""
    seeds = {}
    b = StreamBuilder(dict(INFO, live=False))
    b.page_run(0x10000, page(0x10, 1) + page(0x11, 1)).page_run(0x3F000, page(0x3F, 1))
    seeds["stop-copy"] = b.state(machine_state()).end()

    b = StreamBuilder(dict(INFO, live=True))
    for r in range(3):                               # pages re-sent with newer data each round
        b.page_run(0x20000, page(0x20, r)).page_run(0x22000, page(0x22, r) + page(0x23, r))
        b.round(r)
    seeds["live-rounds"] = b.state(machine_state()).end()

    b = StreamBuilder()
    b.page_run(0x30000, page(0x30, 1) + page(0x31, 1) + page(0x32, 1)).round(0)
    b.zero(0x30000, 2).zero(0x8000, 4).round(1)    # pages sent with data, then zeroed
    seeds["zero-records"] = b.state(machine_state()).end()

    b = StreamBuilder()
    for pfn in range(8, 64, 5):                       # one-page runs: the C fast path
        b.page_run(pfn << PAGE_SHIFT, page(pfn, 2))
    seeds["scattered"] = b.round(0).state(machine_state()).end()

    b = StreamBuilder()
    b.page_run(0x1000, page(1, 1))
    seeds["fph-registered"] = b.state(machine_state(
        {"region_gpa": 0x2000, "base_gpa": 0, "npages": RAM_SIZE >> PAGE_SHIFT,
         "bitmap_gpa": 0x2040})).end()
    return seeds


# ---------------------------------------------------------------------------
# Checksum repair, so mutated streams get past END and reach restore_devices.

_RUN = struct.Struct("<BQI")
_U32 = struct.Struct("<I")


def fix_checksum(data: bytes) -> bytes:
    """Rewrite END's counts and crc32 to match what precedes it, as an honest
    source would have.  Walks the records leniently and stops at anything it
    cannot frame; bytes it does not understand are left as they are."""
    out = bytearray(data)
    if len(out) < 16:
        return bytes(out)
    (hlen,) = _U32.unpack_from(out, 12)
    pos = 16 + hlen
    if pos > len(out):
        return bytes(out)
    crc = zlib.crc32(out[:pos])
    pages = zero_pages = 0
    while pos < len(out):
        rtype = out[pos]
        if rtype in (wire.REC_PAGES, wire.REC_ZERO) and pos + _RUN.size <= len(out):
            _, _, n = _RUN.unpack_from(out, pos)
            crc = zlib.crc32(out[pos:pos + _RUN.size], crc)
            pos += _RUN.size
            if rtype == wire.REC_PAGES:
                pages += n
                pos += n * PAGE_SIZE
            else:
                zero_pages += n
        elif rtype in (wire.REC_ROUND, wire.REC_STATE) and pos + 5 <= len(out):
            (n,) = _U32.unpack_from(out, pos + 1)
            length = 5 + (n if rtype == wire.REC_STATE else 0)
            crc = zlib.crc32(out[pos:pos + length], crc)
            pos += length
        elif rtype == wire.REC_END and pos + wire._END.size <= len(out):
            struct.pack_into("<QQ", out, pos + 1, pages & (2**64 - 1), zero_pages & (2**64 - 1))
            crc = zlib.crc32(out[pos:pos + 17], crc)
            struct.pack_into("<I", out, pos + 17, crc)
            out[pos + 21:pos + wire._END.size] = bytes(wire.MAC_SIZE)    # no integrity: zeros
            pos += wire._END.size
        else:
            break
    return bytes(out)
