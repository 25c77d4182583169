"""One set of fakes for tests that need no /dev/kvm.

`FakeMachine` has what the monitor, the migration source and the destination's
receive() use of a Machine: RAM (a real GuestMemory, or any object with the
same methods), devices, vCPUs reached through call(), pause_all/resume_all,
and a `FakeVm` whose dirty log is driven by the test (`vm.dirty(pages)` is
the guest writing), or with `dirty_ring=True` a `FakeRingVm` whose vCPUs'
dirty rings are.
"""

from __future__ import annotations

import collections
import socket
import threading

import numpy as np

from kvmlite.bitmap import words_for
from kvmlite.devices import DebugCon, ExitDevice, FreePageHint, Uart16550
from kvmlite.migration.transport import OneStream
from kvmlite.vstate.dirtylog import BitmapLog, RingLog
from kvmlite.vstate.vcpu import CR_NAMES, REG_NAMES, SEG_FIELDS, SEG_NAMES


def vcpu_state(rip: int = 0x100000) -> dict:
    """One vCPU in the shape Vcpu.save_state produces, as right after boot."""
    from kvmlite import msr
    from kvmlite.kvm import ffi
    seg = {f: 0 for f in SEG_FIELDS}
    sregs = {n: 0 for n in CR_NAMES}
    sregs.update({s: dict(seg, selector=0x10 if s != "cs" else 0x08, limit=0xFFFFFFFF, present=1)
                  for s in SEG_NAMES})
    sregs["cr0"], sregs["cr3"], sregs["efer"] = 0x80050033, 0x10000, 0x501
    sregs["gdt"] = {"base": 0x3000, "limit": 23}
    sregs["idt"] = {"base": 0, "limit": 0}
    sregs["interrupt_bitmap"] = [0] * len(ffi.new("struct kvm_sregs *").interrupt_bitmap)
    regs = {n: 0 for n in REG_NAMES}
    regs.update(rip=rip, rsp=0x80000, rflags=2, rdi=0x1000, rsi=0x4B564D4C)
    return {
        "regs": regs, "sregs": sregs,
        "fpu": bytes(ffi.sizeof("struct kvm_fpu")),
        "xsave": bytes(ffi.sizeof("struct kvm_xsave")),
        "events": bytes(ffi.sizeof("struct kvm_vcpu_events")),
        "xcrs": [[0, 7]], "msrs": [[i, 0] for i in msr.MIGRATED],
    }


class FakeVcpu:
    """Registers as the monitor and crash report read them; state saved and restored."""

    def __init__(self, index: int = 0):
        self.index = index
        self.restored: list[dict] = []

    def regs_dict(self):
        return {n: 0 for n in REG_NAMES if n != "rip"} | {"rip": 0x101000}

    def sregs_dict(self):
        seg = {"selector": 0x23, "base": 0, "limit": 0xFFFFFFFF, "dpl": 3, "l": 1, "db": 0}
        return {"cr0": 1, "cr2": 0, "cr3": 0x10000, "cr4": 0x20, "efer": 0x500, "cs": seg, "ss": seg}

    def save_state(self, msrs) -> dict:
        return vcpu_state()

    def restore_state(self, state: dict) -> None:
        self.restored.append(state)


class FakeVm:
    """A dirty log the test drives: `dirty(pages)` marks pages written by the guest.

    With manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), a fetch does not
    clear; clear_dirty_log() does, for the pages it names, as KVM does.
    """

    def __init__(self, npages: int):
        self.npages = npages
        self.log = np.zeros(words_for(npages), dtype=np.uint64)
        self.manual_protect = True
        self.dirty_logging = False
        self.fetches = 0
        self.on_fetch = None           # called before each fetch: the guest runs between rounds

    def dirty(self, pages) -> None:
        for p in pages:
            self.log[p // 64] |= np.uint64(1 << (p % 64))

    def start_dirty_log(self) -> None:
        self.dirty_logging = True
        self.log[:] = 0

    def stop_dirty_log(self) -> None:
        self.dirty_logging = False

    def get_dirty_log(self, slot: int = 0) -> np.ndarray:
        self.fetches += 1
        if self.on_fetch:
            self.on_fetch(self)
        out = self.log.copy()
        if not self.manual_protect:
            self.log[:] = 0
        return out

    def clear_dirty_log(self, slot: int, first_page: int, words: np.ndarray) -> None:
        w0 = first_page // 64
        self.log[w0:w0 + len(words)] &= ~words


class FakeRing:
    """One vCPU's dirty ring as KVM keeps it: an entry per first write to a
    write-protected page, harvested in order, re-protected at reset."""

    def __init__(self, vm: "FakeRingVm", index: int):
        self.vm = vm
        self.index = index
        self.entries: list[int] = []     # pages, in the order they were dirtied
        self.harvested = 0               # entries [0, harvested) are marked reset

    def harvest(self):
        vm = self.vm
        if self.index == 0 and vm.dirty_logging:
            vm.fetches += 1
            if vm.on_fetch:
                vm.on_fetch(vm)          # the guest ran since the last sync
        new = self.entries[self.harvested:]
        self.harvested = len(self.entries)
        return np.zeros(len(new), np.uint32), np.array(new, dtype=np.uint64)


class FakeRingVm:
    """A VM whose dirty pages are tracked by per-vCPU rings (KVM_CAP_DIRTY_LOG_RING):
    logging write-protects every page; the guest's first write to a protected
    page leaves an entry in its vCPU's ring; KVM_RESET_DIRTY_RINGS protects
    the harvested pages again.  `dirty(pages, cpu)` is the guest writing."""

    def __init__(self, npages: int, nvcpus: int = 1):
        self.npages = npages
        self.protected = np.zeros(npages, dtype=bool)
        self.rings = [FakeRing(self, i) for i in range(nvcpus)]
        self.manual_protect = False
        self.dirty_logging = False
        self.fetches = 0
        self.resets = 0
        self.on_fetch = None

    def dirty(self, pages, cpu: int = 0) -> None:
        if not self.dirty_logging:
            return
        for p in pages:
            if self.protected[p]:
                self.protected[p] = False
                self.rings[cpu].entries.append(p)

    def start_dirty_log(self) -> None:
        self.dirty_logging = True
        self.protected[:] = True

    def stop_dirty_log(self) -> None:
        self.dirty_logging = False
        self.protected[:] = False

    def reset_dirty_rings(self) -> int:
        self.resets += 1
        n = 0
        for r in self.rings:
            done = [p for p in r.entries[:r.harvested] if p < self.npages]
            self.protected[done] = True
            del r.entries[:r.harvested]
            r.harvested = 0
            n += len(done)
        return n


class FakeKvm:
    def migratable_msrs(self):
        return []


class _Null:
    def write_byte(self, b: int) -> None:
        pass

    def flush(self) -> None:
        pass


class FakeVcpuThread:
    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.exits = 5
        self.parked = False
        self.thread = threading.current_thread()     # a thread's native_id for kvmlite.rt


class FakeMachine:
    """What the monitor, a Migration and receive() use of a Machine.

    `calls` records control: "pause", "resume", ("throttle", share), ("quit", reason, status).
    """

    def __init__(self, memory=None, *, paused: bool = False, running: bool = True, nvcpus: int = 1,
                 dirty_ring: bool = False):
        self.memory = memory
        self.running = running
        self.paused = paused
        self.calls: list = []
        self.image = None
        self.kvm = FakeKvm()
        self.vcpus = [FakeVcpu(i) for i in range(nvcpus)]
        self.vcpu_threads = [FakeVcpuThread(v) for v in self.vcpus]
        npages = memory.npages if memory is not None else 4096
        if dirty_ring:
            self.vm = FakeRingVm(npages, nvcpus)
            self.dirty_log = RingLog(self.vm, self.vm.rings, npages)
        else:
            self.vm = FakeVm(npages)
            self.dirty_log = BitmapLog(self.vm)
        out = _Null()
        self.output = out
        self.fph = FreePageHint(memory) if memory is not None else None
        self._devices = {"uart": Uart16550(out), "debugcon": DebugCon(out), "exit": ExitDevice(),
                         "fph": self.fph if self.fph is not None else FreePageHint(_NoMemory())}
        self.result = None
        self.quit_event = threading.Event()
        self.exits = 5
        self.irqchip = False

    # -- what the Machine offers
    @property
    def nvcpus(self) -> int:
        return len(self.vcpus)

    @property
    def free_pages(self):
        return self.fph

    def devices(self) -> dict:
        return self._devices

    def call(self, index: int, fn, timeout=None):
        return fn(self.vcpus[index])

    def remade(self, **changes) -> "FakeMachine":
        """Machine.remade: the same RAM, another vCPU count (with N > 1 an irqchip);
        the fake changes in place."""
        n = changes.pop("vcpus", len(self.vcpus))
        self.vcpus = [self._new_vcpu(i) for i in range(n)]
        self.vcpu_threads = [FakeVcpuThread(v) for v in self.vcpus]
        self.irqchip = n > 1
        return self

    def _new_vcpu(self, index: int):
        return FakeVcpu(index)

    def call_all(self, fn, timeout=None) -> list:
        return [fn(v) for v in self.vcpus]

    def vcpu_proxy(self, index: int = 0):
        return self.vcpus[index]

    def exits_by_kind(self, index=None):
        return {"IoOut": 4, "IoIn": 1}

    def pause_all(self, timeout: float = 5.0) -> float:
        self.calls.append("pause")
        self.paused = True
        return 0.0

    def resume_all(self) -> None:
        self.calls.append("resume")
        self.paused = False

    def set_throttle(self, share: float) -> None:
        if share or any(c[0] == "throttle" for c in self.calls if isinstance(c, tuple)):
            self.calls.append(("throttle", round(share, 2)))

    def quit(self, result) -> None:
        self.calls.append(("quit", result.reason, result.status))
        self.result = result
        self.running = False
        self.quit_event.set()


class _NoMemory:
    size = 16 << 20
    npages = size >> 12


class StreamSink(OneStream):
    """A sink (transport's interface) that keeps every byte, and answers the
    handover as a destination would: READY after END, RUNNING after COMMIT."""
    kind = "test"
    keys = None                 # no integrity tags (a plain link)

    def __init__(self, *, expects_reply: bool = True, answers=("ready", "running")):
        self.data = bytearray()
        self.expects_reply = expects_reply
        self.answers = collections.deque(answers)
        self.aborted = False
        self.sends = 0
        self._pending = bytearray()
        self.timeout = None
        self.finished = False
        self.stream_end: int | None = None    # where the stream ended and the handover began

    def send(self, bufs) -> None:
        if self.aborted:
            raise BrokenPipeError("aborted")
        self.sends += 1
        for b in bufs:
            self.data += b

    def unacked(self) -> int:
        return 0

    def settimeout(self, t) -> None:
        self.timeout = t

    def recv_into(self, view, n: int = 0) -> int:
        if self.stream_end is None:
            self.stream_end = len(self.data)
        if not self._pending:
            if not self.answers:
                raise TimeoutError("no answer")
            from kvmlite.migration import wire
            status = self.answers.popleft()
            frame = {"status": status}
            if status in ("error", "aborted"):
                frame["error"] = "test"
            self._pending += wire.encode_frame(frame)
        n = min(n or len(view), len(self._pending))
        view[:n] = self._pending[:n]
        del self._pending[:n]
        return n

    def abort(self) -> None:
        self.aborted = True

    def finish(self) -> None:
        self.finished = True

    def close(self) -> None:
        pass


def socketpair_source(data: bytes) -> socket.socket:
    """A connected socket that delivers `data` then end of stream (for receive())."""
    a, b = socket.socketpair()

    def feed():
        try:
            b.sendall(data)
        finally:
            b.close()
    threading.Thread(target=feed, daemon=True).start()
    return a


def new_migration_for(machine, sink=None, hooks=None):
    """The monitor's migration factory, as runner.py builds it, for a fake
    machine: `sink()` makes each migration's transport (a StreamSink by default)."""
    from kvmlite.hooks import NO_HOOKS
    from kvmlite.migration.source import Migration

    def new_migration(params):
        return Migration(machine, params, hooks=hooks or NO_HOOKS,
                         sink=sink() if sink is not None else StreamSink())
    return new_migration
