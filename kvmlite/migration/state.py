"""Strict validation of the STATE record before any of it reaches KVM.

The stream is hostile input: a state map is accepted only if it has exactly
the shape `Vcpu.save_state` and the devices' `save_state` produce, with every
integer in range and every blob of the size this host's structs have.
"""

from __future__ import annotations

from .. import msr
from ..errors import StreamError
from ..kvm import ffi, lib
from ..vstate.vcpu import CR_NAMES, REG_NAMES, SEG_FIELDS, SEG_NAMES
from ..vstate.vm import irqchip_ids
from .wire import _show

STATE_VERSION = 2    # 2: interrupt-controller state (irqchip, per-vCPU LAPIC and MP state)
U64 = 1 << 64
BLOBS = {"fpu": "struct kvm_fpu", "xsave": "struct kvm_xsave", "events": "struct kvm_vcpu_events"}
MAX_XCRS = 16


def _fail(path: str, why: str):
    raise StreamError(f"bad state at {path}: {why}")


def _int(value, path: str, limit: int = U64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        _fail(path, f"expected an integer in 0..{limit - 1}")
    return value


def _map(value, path: str, keys) -> dict:
    if not isinstance(value, dict):
        _fail(path, "expected a map")
    missing = [k for k in keys if k not in value]
    if missing:
        _fail(path, f"missing {', '.join(map(str, missing))}")
    extra = [k for k in value if k not in keys]
    if extra:
        _fail(path, f"unknown {', '.join(sorted(map(str, extra)))}")
    return value


def _pairs(value, path: str, limit: int) -> list:
    if not isinstance(value, list) or len(value) > limit:
        _fail(path, f"expected a list of at most {limit} pairs")
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            _fail(f"{path}[{i}]", "expected a pair")
        _int(pair[0], f"{path}[{i}][0]", 1 << 32)
        _int(pair[1], f"{path}[{i}][1]")
    return value


def validate_vcpu(v, path: str) -> dict:
    _map(v, path, ("regs", "sregs", "msrs", "xcrs") + tuple(BLOBS))
    regs = _map(v["regs"], f"{path}.regs", REG_NAMES)
    for n in REG_NAMES:
        _int(regs[n], f"{path}.regs.{n}")
    sregs = _map(v["sregs"], f"{path}.sregs", CR_NAMES + SEG_NAMES + ("gdt", "idt", "interrupt_bitmap"))
    for n in CR_NAMES:
        _int(sregs[n], f"{path}.sregs.{n}")
    for seg in SEG_NAMES:
        s = _map(sregs[seg], f"{path}.sregs.{seg}", SEG_FIELDS)
        for f in SEG_FIELDS:
            limit = {"base": U64, "limit": 1 << 32, "selector": 1 << 16}.get(f, 1 << 8)
            _int(s[f], f"{path}.sregs.{seg}.{f}", limit)
    for t in ("gdt", "idt"):
        d = _map(sregs[t], f"{path}.sregs.{t}", ("base", "limit"))
        _int(d["base"], f"{path}.sregs.{t}.base")
        _int(d["limit"], f"{path}.sregs.{t}.limit", 1 << 16)
    bitmap = sregs["interrupt_bitmap"]
    words = len(ffi.new("struct kvm_sregs *").interrupt_bitmap)
    if not isinstance(bitmap, list) or len(bitmap) != words:
        _fail(f"{path}.sregs.interrupt_bitmap", f"expected {words} words")
    for i, w in enumerate(bitmap):
        _int(w, f"{path}.sregs.interrupt_bitmap[{i}]")
    for name, ctype in BLOBS.items():
        size = ffi.sizeof(ctype)
        if not isinstance(v[name], bytes) or len(v[name]) != size:
            _fail(f"{path}.{name}", f"expected {size} bytes ({ctype} on this host)")
    _pairs(v["xcrs"], f"{path}.xcrs", MAX_XCRS)
    for i, (index, _) in enumerate(_pairs(v["msrs"], f"{path}.msrs", len(msr.MIGRATED))):
        if index not in msr.MIGRATED:
            _fail(f"{path}.msrs[{i}]", f"MSR {index:#x} is not one kvmlite migrates")
    return v


def validate_state(state, vcpus: int, devices: dict, irqchip: bool = False) -> dict:
    """Check `state` against the header's vCPU count and this VMM's devices; with
    `irqchip` (a VM of several vCPUs), the interrupt controllers' state too."""
    _map(state, "state", ("version", "vcpus", "devices", "irqchip", "interrupts"))
    if state["version"] != STATE_VERSION:
        _fail("state.version", f"{_show(state['version'])} is not supported (this kvmlite reads {STATE_VERSION})")
    if not isinstance(state["vcpus"], list) or len(state["vcpus"]) != vcpus:
        _fail("state.vcpus", f"expected {vcpus} vCPU(s) as the header says")
    for i, v in enumerate(state["vcpus"]):
        validate_vcpu(v, f"state.vcpus[{i}]")
    _map(state["devices"], "state.devices", tuple(devices))
    if not irqchip:
        if state["irqchip"] is not None or state["interrupts"] is not None:
            _fail("state.irqchip", "interrupt-controller state for a VM without an irqchip")
        return state
    validate_irqchip(state["irqchip"])
    if not isinstance(state["interrupts"], list) or len(state["interrupts"]) != vcpus:
        _fail("state.interrupts", f"expected one map per vCPU, {vcpus}")
    for i, v in enumerate(state["interrupts"]):
        validate_vcpu_interrupts(v, i, f"state.interrupts[{i}]")
    return state


def restore_devices(state: dict, devices: dict) -> None:
    """Each device restores itself; any malformed field becomes a StreamError."""
    for name, dev in devices.items():
        try:
            dev.restore_state(state["devices"][name])
        except StreamError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError,
                OverflowError) as e:  # OverflowError: int() of a msgpack float infinity
            _fail(f"state.devices.{name}", str(e) or type(e).__name__)


def collect_state(machine) -> dict:
    """The VM's state as plain values: every vCPU's, read on its own thread, every
    device's, and with an irqchip the chips' and each vCPU's LAPIC and MP state."""
    msrs = machine.kvm.migratable_msrs()
    irqchip = machine.irqchip

    def save(vcpu):
        return vcpu.save_state(msrs), vcpu.save_interrupt_state() if irqchip else None
    # every vCPU's thread at once: the downtime grows with the slowest, not with N
    saved = machine.call_all(save)
    return {
        "version": STATE_VERSION,
        "vcpus": [regs for regs, _ in saved],
        "devices": {name: dev.save_state() for name, dev in machine.devices().items()},
        "irqchip": machine.vm.save_irqchip() if irqchip else None,
        "interrupts": [irq for _, irq in saved] if irqchip else None,
    }


def restore_state(machine, state: dict) -> None:
    """Inverse of collect_state(), for a state validate_state() accepted: devices
    first (any malformed field is a StreamError), the chips, then each vCPU on its
    own thread: registers, then its LAPIC (whose timer the registers' APIC base
    mode decides; docs/boot.md has the measured order)."""
    restore_devices(state, machine.devices())
    if state["irqchip"] is not None:
        machine.vm.restore_irqchip(state["irqchip"])
    interrupts = state["interrupts"] or [None] * len(state["vcpus"])

    def restore(vcpu):           # on each vCPU's thread, all at once
        vcpu.restore_state(state["vcpus"][vcpu.index])
        irq = interrupts[vcpu.index]
        if irq is not None:
            vcpu.restore_interrupt_state(irq)
    machine.call_all(restore)


# ---- interrupt-controller state (a VM with the in-kernel irqchip) ------------------
# What Vcpu.save_interrupt_state and Vm.save_irqchip produce, checked before
# any of it reaches KVM.

LAPIC_ID_OFFSET = 0x20       # the APIC ID register in the xAPIC page image; ID in bits 31:24
X86_MP_STATES = ("KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_UNINITIALIZED", "KVM_MP_STATE_INIT_RECEIVED",
                 "KVM_MP_STATE_HALTED", "KVM_MP_STATE_SIPI_RECEIVED")


def validate_vcpu_interrupts(v, index: int, path: str) -> dict:
    """{"lapic": 1 KiB, "mp_state": one x86 KVM_MP_STATE_*, "tsc_deadline": u64}.
    The LAPIC's APIC ID must be `index`: vCPU i has APIC ID i (docs/boot.md), and a
    stream that swapped two CPUs' LAPICs would send their interrupts astray."""
    _map(v, path, ("lapic", "mp_state", "tsc_deadline"))
    size = ffi.sizeof("struct kvm_lapic_state")
    if not isinstance(v["lapic"], bytes) or len(v["lapic"]) != size:
        _fail(f"{path}.lapic", f"expected {size} bytes (struct kvm_lapic_state)")
    apic_id = int.from_bytes(v["lapic"][LAPIC_ID_OFFSET:LAPIC_ID_OFFSET + 4], "little") >> 24
    if apic_id != index:
        _fail(f"{path}.lapic", f"APIC ID {apic_id} belongs to another vCPU (this is vCPU {index})")
    allowed = {getattr(lib, name) for name in X86_MP_STATES}
    if _int(v["mp_state"], f"{path}.mp_state", 1 << 32) not in allowed:
        _fail(f"{path}.mp_state", f"{v['mp_state']} is not an x86 MP state")
    _int(v["tsc_deadline"], f"{path}.tsc_deadline")
    return v


def validate_irqchip(chips, path: str = "state.irqchip") -> dict:
    """{"pic_master", "pic_slave", "ioapic"}: each the 512 bytes of its kvm_irqchip union."""
    _map(chips, path, tuple(irqchip_ids()))
    size = ffi.sizeof("struct kvm_irqchip") - ffi.offsetof("struct kvm_irqchip", "chip")
    for name in irqchip_ids():
        if not isinstance(chips[name], bytes) or len(chips[name]) != size:
            _fail(f"{path}.{name}", f"expected {size} bytes (the kvm_irqchip union)")
    return chips
