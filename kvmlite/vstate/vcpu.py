"""A virtual CPU: its shared run page, registers, and the KVM_RUN call."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import threading

from .. import kvm
from .. import exits as ex
from ..errors import KvmError
from ..kvm import ffi, lib
from ..msr import IA32_TSC_DEADLINE
from .system import kvm_call

KICK_SIGNAL = signal.SIGUSR1

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SEG_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
              "avl", "unusable")
CR_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")

_EXIT_IO = lib.KVM_EXIT_IO
_EXIT_IO_OUT = lib.KVM_EXIT_IO_OUT
_EXIT_HLT = lib.KVM_EXIT_HLT
_EXIT_MMIO = lib.KVM_EXIT_MMIO
_EXIT_SHUTDOWN = lib.KVM_EXIT_SHUTDOWN
_EXIT_FAIL_ENTRY = lib.KVM_EXIT_FAIL_ENTRY
_EXIT_INTERNAL_ERROR = lib.KVM_EXIT_INTERNAL_ERROR
_EXIT_SYSTEM_EVENT = lib.KVM_EXIT_SYSTEM_EVENT
_EXIT_DEBUG = lib.KVM_EXIT_DEBUG
_EXIT_UNKNOWN = lib.KVM_EXIT_UNKNOWN
_EXIT_INTR = lib.KVM_EXIT_INTR
_EXIT_DIRTY_RING_FULL = lib.KVM_EXIT_DIRTY_RING_FULL
_run_packed = lib.kvmlite_run_packed
# Layout of kvmlite_run_packed()'s result (see _kvm_build.py)
_RUN_FAILED = 0xFF
_IO_OUT = 1 << 8
_IO_SIMPLE = 1 << 12


class Vcpu:
    """One vCPU of a Vm.  `run()` enters the guest and returns a typed exit."""

    def __init__(self, vm, index: int):
        self.vm = vm
        self.index = index
        self.fd = kvm_call("KVM_CREATE_VCPU", kvm.KVM_CREATE_VCPU, vm.fd, index,
                           context=f"vCPU {index}")
        size = vm.kvm.vcpu_mmap_size
        self._runmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        self._runbuf = ffi.from_buffer(self._runmap)
        self.run_struct = ffi.cast("struct kvm_run *", self._runbuf)
        self._io = self.run_struct.io
        self._thread_id: int | None = None
        self._kick_lock = threading.Lock()
        lib.kvmlite_install_kick_handler(KICK_SIGNAL)

    # ---- running -----------------------------------------------------------

    def run(self) -> ex.Exit:
        """KVM_RUN once and decode why it came back."""
        r = _run_packed(self.fd, self.run_struct)
        reason = r & 0xFF
        if reason == _EXIT_IO:
            if r & _IO_SIMPLE:
                if r & _IO_OUT:
                    return ex.IoOut((r >> 16) & 0xFFFF, (r >> 9) & 7, r >> 32)
                return ex.IoIn((r >> 16) & 0xFFFF, (r >> 9) & 7, 1)
            io = self._io
            if io.direction == _EXIT_IO_OUT:
                off = io.data_offset
                return ex.IoOutString(io.port, io.size, self._runmap[off:off + io.size * io.count])
            return ex.IoIn(io.port, io.size, io.count)
        if reason == _RUN_FAILED:
            err = r >> 8
            if err == errno.EINTR or err == errno.EAGAIN:
                self.run_struct.immediate_exit = 0
                return ex.INTERRUPTED
            raise KvmError("KVM_RUN", err, f"vCPU {self.index}")
        return self._decode_rare(reason)

    def _decode_rare(self, reason: int) -> ex.Exit:
        run = self.run_struct
        if reason == _EXIT_HLT:
            return ex.HLT
        if reason == _EXIT_MMIO:
            m = run.mmio
            if m.is_write:
                return ex.MmioWrite(m.phys_addr, bytes(ffi.buffer(m.data, m.len)))
            return ex.MmioRead(m.phys_addr, m.len)
        if reason == _EXIT_SHUTDOWN:
            return ex.SHUTDOWN
        if reason == _EXIT_FAIL_ENTRY:
            return ex.FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
        if reason == _EXIT_INTERNAL_ERROR:
            n = min(run.internal.ndata, 16)
            return ex.InternalError(run.internal.suberror, tuple(run.internal.data[0:n]))
        if reason == _EXIT_SYSTEM_EVENT:
            return ex.SystemEvent(run.system_event.type)
        if reason == _EXIT_DEBUG:
            d = run.debug.arch
            return ex.Debug(d.exception, d.pc, d.dr6, d.dr7)
        if reason == _EXIT_INTR:
            return ex.INTERRUPTED
        if reason == _EXIT_DIRTY_RING_FULL:
            return ex.DIRTY_RING_FULL
        if reason == _EXIT_UNKNOWN:
            return ex.Unhandled(reason, run.hw.hardware_exit_reason)
        return ex.Unhandled(reason)

    def complete_io_in(self, data: bytes) -> None:
        """Hand the guest the bytes of an IoIn exit; KVM delivers them on the next run()."""
        off = self.run_struct.io.data_offset
        self._runmap[off:off + len(data)] = data

    def complete_mmio_read(self, data: bytes) -> None:
        ffi.memmove(self.run_struct.mmio.data, data, len(data))

    def bind_thread(self) -> None:
        """Record the calling thread as the one that runs this vCPU (for kick())."""
        self._thread_id = threading.get_ident()

    def kick(self) -> None:
        """Make a KVM_RUN in progress, or the next one, return Interrupted."""
        # immediate_exit covers the window where the vCPU thread is between
        # runs: the signal would be lost there, the flag is not.
        with self._kick_lock:            # never into a run area close() has unmapped
            if self.fd < 0:
                return
            self.run_struct.immediate_exit = 1
            if self._thread_id is not None:
                try:
                    signal.pthread_kill(self._thread_id, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    # ---- registers -----------------------------------------------------------

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        kvm_call("KVM_GET_REGS", kvm.KVM_GET_REGS, self.fd, regs)
        return regs

    def set_regs(self, regs) -> None:
        kvm_call("KVM_SET_REGS", kvm.KVM_SET_REGS, self.fd, regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        kvm_call("KVM_GET_SREGS", kvm.KVM_GET_SREGS, self.fd, sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        kvm_call("KVM_SET_SREGS", kvm.KVM_SET_SREGS, self.fd, sregs)

    def set_cpuid(self, cpuid2) -> None:
        kvm_call("KVM_SET_CPUID2", kvm.KVM_SET_CPUID2, self.fd, cpuid2)

    def get_msrs(self, indices) -> dict[int, int]:
        n = len(indices)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        got = kvm_call("KVM_GET_MSRS", kvm.KVM_GET_MSRS, self.fd, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(got)}

    def set_msrs(self, values: dict[int, int]) -> None:
        n = len(values)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        done = kvm_call("KVM_SET_MSRS", kvm.KVM_SET_MSRS, self.fd, msrs)
        if done != n:
            bad = msrs.entries[done].index
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} refused")

    def tsc_khz(self) -> int:
        try:
            return kvm.KVM_GET_TSC_KHZ(self.fd)
        except OSError:
            return 0

    def set_guest_debug(self, control: int, debugreg=(0,) * 8) -> None:
        """KVM_SET_GUEST_DEBUG: `control` is KVM_GUESTDBG_* flags (0 turns debugging
        off); `debugreg` DR0-DR7 for KVM_GUESTDBG_USE_HW_BP."""
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = control
        for i, value in enumerate(debugreg):
            dbg.arch.debugreg[i] = value
        kvm_call("KVM_SET_GUEST_DEBUG", kvm.KVM_SET_GUEST_DEBUG, self.fd, dbg,
                 context=f"vCPU {self.index}")

    def translate(self, linear: int) -> int | None:
        """Guest-virtual to guest-physical through the vCPU's page tables, or None."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear})
        try:
            kvm.KVM_TRANSLATE(self.fd, tr)
        except OSError:
            return None
        return tr.physical_address if tr.valid else None

    # ---- state as plain values (for crash reports and migration) ----------------

    def regs_dict(self) -> dict[str, int]:
        regs = self.get_regs()
        return {n: getattr(regs, n) for n in REG_NAMES}

    def sregs_dict(self) -> dict:
        s = self.get_sregs()
        out = {n: getattr(s, n) for n in CR_NAMES}
        for seg in SEG_NAMES:
            out[seg] = {f: getattr(getattr(s, seg), f) for f in SEG_FIELDS}
        out["gdt"] = {"base": s.gdt.base, "limit": s.gdt.limit}
        out["idt"] = {"base": s.idt.base, "limit": s.idt.limit}
        out["interrupt_bitmap"] = list(s.interrupt_bitmap)
        return out

    def save_state(self, msr_indices) -> dict:
        """Everything a destination needs to resume this vCPU, as plain values."""
        state = {"regs": self.regs_dict(), "sregs": self.sregs_dict()}
        for what, ctype, get in (("fpu", "struct kvm_fpu *", kvm.KVM_GET_FPU),
                                 ("xsave", "struct kvm_xsave *", kvm.KVM_GET_XSAVE),
                                 ("events", "struct kvm_vcpu_events *", kvm.KVM_GET_VCPU_EVENTS)):
            obj = ffi.new(ctype)
            kvm_call(get.__name__, get, self.fd, obj)
            state[what] = bytes(ffi.buffer(obj))
        xcrs = ffi.new("struct kvm_xcrs *")
        try:
            kvm.KVM_GET_XCRS(self.fd, xcrs)
            state["xcrs"] = [[xcrs.xcrs[i].xcr, xcrs.xcrs[i].value] for i in range(xcrs.nr_xcrs)]
        except OSError:
            state["xcrs"] = []
        state["msrs"] = [[k, v] for k, v in self.get_msrs(msr_indices).items()]
        return state

    def restore_state(self, state: dict) -> None:
        """Inverse of save_state(); `state` must already be validated (see migration.state)."""
        s = self.get_sregs()
        sr = state["sregs"]
        for n in CR_NAMES:
            setattr(s, n, sr[n])
        for seg in SEG_NAMES:
            dst = getattr(s, seg)
            for f in SEG_FIELDS:
                setattr(dst, f, sr[seg][f])
        s.gdt.base, s.gdt.limit = sr["gdt"]["base"], sr["gdt"]["limit"]
        s.idt.base, s.idt.limit = sr["idt"]["base"], sr["idt"]["limit"]
        for i, w in enumerate(sr["interrupt_bitmap"]):
            s.interrupt_bitmap[i] = w
        self.set_sregs(s)
        regs = ffi.new("struct kvm_regs *", state["regs"])
        self.set_regs(regs)
        for what, ctype, put in (("fpu", "struct kvm_fpu *", kvm.KVM_SET_FPU),
                                 ("xsave", "struct kvm_xsave *", kvm.KVM_SET_XSAVE)):
            obj = ffi.new(ctype)
            ffi.buffer(obj)[:] = state[what]
            kvm_call(put.__name__, put, self.fd, obj)
        if state["xcrs"]:
            xcrs = ffi.new("struct kvm_xcrs *")
            xcrs.nr_xcrs = len(state["xcrs"])
            for i, (xcr, value) in enumerate(state["xcrs"]):
                xcrs.xcrs[i].xcr, xcrs.xcrs[i].value = xcr, value
            kvm_call("KVM_SET_XCRS", kvm.KVM_SET_XCRS, self.fd, xcrs)
        if state["msrs"]:
            self.set_msrs(dict((k, v) for k, v in state["msrs"]))
        events = ffi.new("struct kvm_vcpu_events *")
        ffi.buffer(events)[:] = state["events"]
        kvm_call("KVM_SET_VCPU_EVENTS", kvm.KVM_SET_VCPU_EVENTS, self.fd, events)

    # ---- the local APIC and the MP state (SMP) -------------------------------------
    # Appended for SMP; need Vm.create_irqchip() before the vCPU was created.

    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the LAPIC registers as a 1 KiB image of the xAPIC page."""
        state = ffi.new("struct kvm_lapic_state *")
        kvm_call("KVM_GET_LAPIC", kvm.KVM_GET_LAPIC, self.fd, state, context=f"vCPU {self.index}")
        return bytes(ffi.buffer(state))

    def set_lapic(self, regs: bytes) -> None:
        state = ffi.new("struct kvm_lapic_state *")
        if len(regs) != ffi.sizeof(state[0]):
            raise KvmError("KVM_SET_LAPIC", errno.EINVAL,
                           f"vCPU {self.index}: {len(regs)} bytes, not {ffi.sizeof(state[0])}")
        ffi.buffer(state)[:] = regs
        kvm_call("KVM_SET_LAPIC", kvm.KVM_SET_LAPIC, self.fd, state, context=f"vCPU {self.index}")

    def get_mp_state(self) -> int:
        """KVM_MP_STATE_*: RUNNABLE, HALTED (in HLT, waiting for an interrupt),
        UNINITIALIZED (an AP waiting for INIT), INIT_RECEIVED, SIPI_RECEIVED."""
        mp = ffi.new("struct kvm_mp_state *")
        kvm_call("KVM_GET_MP_STATE", kvm.KVM_GET_MP_STATE, self.fd, mp, context=f"vCPU {self.index}")
        return mp.mp_state

    def set_mp_state(self, state: int) -> None:
        mp = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        kvm_call("KVM_SET_MP_STATE", kvm.KVM_SET_MP_STATE, self.fd, mp,
                 context=f"vCPU {self.index}, state {state}")

    def save_interrupt_state(self) -> dict:
        """LAPIC, MP state and the TSC deadline as plain values, for a vCPU of a VM
        with an irqchip (migration/state.py validate_vcpu_interrupts checks them).
        The deadline is an MSR, not a LAPIC register, so it travels beside it."""
        return {"lapic": self.get_lapic(), "mp_state": self.get_mp_state(),
                "tsc_deadline": self.get_msrs([IA32_TSC_DEADLINE]).get(IA32_TSC_DEADLINE, 0)}

    def restore_interrupt_state(self, state: dict) -> None:
        """Inverse of save_interrupt_state(), after restore_state() (whose APIC base
        picks xAPIC or x2APIC mode).  The order is KVM's: KVM_SET_LAPIC re-arms the
        timer from LVTT and drops a TSC deadline written before it (measured: a
        guest sleeping in TSC-deadline mode never wakes), so the deadline MSR
        comes after the LAPIC; the MP state last, so a vCPU saved in HLT halts
        again instead of returning from HLT at once."""
        self.set_lapic(state["lapic"])
        if state["tsc_deadline"]:
            self.set_msrs({IA32_TSC_DEADLINE: state["tsc_deadline"]})
        self.set_mp_state(state["mp_state"])

    def dirty_ring(self):
        """This vCPU's dirty ring (the VM must have enable_dirty_ring()): a DirtyRing."""
        from .dirtyring import DirtyRing
        if not self.vm.dirty_ring_bytes:
            raise KvmError("mmap dirty ring", errno.ENODEV, f"vCPU {self.index}: no dirty ring enabled")
        return DirtyRing(self, self.vm.dirty_ring_bytes)

    def close(self) -> None:
        """Unmap the run area and close the fd (a second call does nothing)."""
        with self._kick_lock:
            if self.fd < 0:
                return
            self.run_struct = self._io = None
            ffi.release(self._runbuf)
            self._runmap.close()
            os.close(self.fd)
            self.fd = -1


def cpuid_with_apic_id(cpuid2, apic_id: int):
    """A copy of `cpuid2` (KVM_GET_SUPPORTED_CPUID) for the vCPU with `apic_id`:
    CPUID.1:EBX[31:24] (initial APIC ID) and the x2APIC ID of leaves 0xB and
    0x1F (EDX).  KVM passes CPUID through as given; the VMM sets these."""
    n = cpuid2.nent
    out = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
    ffi.memmove(out.entries, cpuid2.entries, n * ffi.sizeof("struct kvm_cpuid_entry2"))
    for i in range(n):
        e = out.entries[i]
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (apic_id & 0xFF) << 24
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id
    return out
