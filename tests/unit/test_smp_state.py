"""SMP state without /dev/kvm: the checks on interrupt-controller state from a
migration stream (migration/state.py), and the dirty ring's harvest order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlite.errors import StreamError
from kvmlite.kvm import ffi, lib
from kvmlite.migration.state import validate_irqchip, validate_vcpu_interrupts
from kvmlite.vstate.dirtyring import GFN, DirtyRing

LAPIC_SIZE = 1024               # KVM_APIC_REG_SIZE, checked against the header in test_abi_header


def lapic_with_id(apic_id: int) -> bytes:
    regs = bytearray(LAPIC_SIZE)
    regs[0x20:0x24] = (apic_id << 24).to_bytes(4, "little")     # the APIC ID register, ID in 31:24
    return bytes(regs)


def interrupts(index: int = 1, **changes) -> dict:
    v = {"lapic": lapic_with_id(index), "mp_state": lib.KVM_MP_STATE_HALTED, "tsc_deadline": 123456789}
    v.update(changes)
    return v


def test_vcpu_interrupt_state_as_saved_is_accepted():
    """A LAPIC image whose APIC ID is the vCPU's index, an x86 MP state and a deadline pass unchanged."""
    v = interrupts(3, lapic=lapic_with_id(3))
    assert validate_vcpu_interrupts(v, 3, "state.vcpus[3].interrupts") is v
    for name in ("KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_UNINITIALIZED", "KVM_MP_STATE_INIT_RECEIVED",
                 "KVM_MP_STATE_SIPI_RECEIVED"):
        validate_vcpu_interrupts(interrupts(mp_state=getattr(lib, name)), 1, "p")


@pytest.mark.parametrize("bad,why", [
    (interrupts(lapic=lapic_with_id(1)[:-1]), "1024 bytes"),
    (interrupts(lapic="x" * LAPIC_SIZE), "1024 bytes"),
    (interrupts(lapic=lapic_with_id(0)), "APIC ID 0 belongs to another vCPU"),
    (interrupts(mp_state=lib.KVM_MP_STATE_STOPPED), "not an x86 MP state"),      # s390's
    (interrupts(mp_state=-1), "integer"),
    (interrupts(tsc_deadline=1 << 64), "integer"),
    (interrupts(tsc_deadline=True), "integer"),
    ({"lapic": lapic_with_id(1), "mp_state": 0}, "missing tsc_deadline"),
    (dict(interrupts(), pit=b""), "unknown pit"),
    ([], "expected a map"),
], ids=["short-lapic", "str-lapic", "swapped-lapic", "s390-state", "negative", "deadline-2^64",
        "bool", "missing", "extra", "not-a-map"])
def test_bad_vcpu_interrupt_state_is_refused_with_its_path(bad, why):
    """Each malformed field is a StreamError naming the field and what was expected."""
    with pytest.raises(StreamError, match=why) as e:
        validate_vcpu_interrupts(bad, 1, "state.vcpus[1].interrupts")
    assert "state.vcpus[1].interrupts" in str(e.value)


def test_irqchip_state_is_three_named_512_byte_chips():
    """pic_master, pic_slave and ioapic of the union's size pass; a short or missing chip is refused."""
    union = ffi.sizeof("struct kvm_irqchip") - ffi.offsetof("struct kvm_irqchip", "chip")
    assert union == 512
    good = {"pic_master": bytes(512), "pic_slave": bytes(512), "ioapic": bytes(512)}
    assert validate_irqchip(good) is good
    with pytest.raises(StreamError, match="state.irqchip.ioapic: expected 512 bytes"):
        validate_irqchip(dict(good, ioapic=bytes(511)))
    with pytest.raises(StreamError, match="missing pic_slave"):
        validate_irqchip({"pic_master": bytes(512), "ioapic": bytes(512)})


anything = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.binary(max_size=1100)
                        | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                        | st.dictionaries(st.text(max_size=12), c, max_size=4), max_leaves=8)


@given(st.dictionaries(st.sampled_from(["lapic", "mp_state", "tsc_deadline", "x"]), anything),
       st.dictionaries(st.sampled_from(["pic_master", "pic_slave", "ioapic", "pit"]), anything))
@settings(max_examples=300, deadline=None)
def test_hostile_interrupt_state_only_ever_raises_stream_error(v, chips):
    """Whatever a stream holds, the checks accept it or raise StreamError, nothing else."""
    for check in (lambda: validate_vcpu_interrupts(v, 0, "p"), lambda: validate_irqchip(chips)):
        try:
            check()
        except StreamError:
            pass


# ---- the dirty ring's harvest, on a ring in plain memory ------------------------------

def ring_of(n: int) -> DirtyRing:
    r = DirtyRing.__new__(DirtyRing)
    r.entries = np.zeros(n, dtype=GFN)
    r.size, r.fetch, r.vcpu_index = n, 0, 0
    return r


def push(r: DirtyRing, kvm_index: int, offsets) -> int:
    """What KVM does: fill entries in order from its own index, DIRTY set."""
    for off in offsets:
        e = r.entries[kvm_index % r.size]
        e["slot"], e["offset"], e["flags"] = 0, off, lib.KVM_DIRTY_GFN_F_DIRTY
        kvm_index += 1
    return kvm_index


def test_ring_harvest_takes_dirty_entries_in_order_and_marks_them_reset():
    """Entries come back in the order KVM wrote them, across the wrap, each then flagged RESET and not taken twice."""
    r = ring_of(8)
    k = push(r, 0, [10, 11, 12, 13, 14])
    slots, offs = r.harvest()
    assert list(offs) == [10, 11, 12, 13, 14] and list(slots) == [0] * 5
    assert all(r.entries["flags"][:5] == lib.KVM_DIRTY_GFN_F_RESET)
    assert len(r.harvest()[1]) == 0, "nothing new: nothing harvested"
    r.entries["flags"][:5] = 0                   # KVM_RESET_DIRTY_RINGS recycles them
    k = push(r, k, [20, 21, 22, 23, 24, 25])     # wraps after 3
    assert list(r.harvest()[1]) == [20, 21, 22, 23, 24, 25]
    assert r.fetch == 11


def test_ring_harvest_of_a_full_ring_takes_every_entry():
    """A ring with every entry dirty (KVM exits with KVM_EXIT_DIRTY_RING_FULL before that) is harvested whole."""
    r = ring_of(4)
    push(r, 0, [1, 2, 3, 4])
    assert list(r.harvest()[1]) == [1, 2, 3, 4]
