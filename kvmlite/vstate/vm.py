"""A KVM virtual machine: memslots, dirty logging, vCPU creation."""

from __future__ import annotations

import os

import numpy as np

from .. import kvm
from ..errors import KvmliteError
from ..kvm import ffi, lib
from .memory import PAGE_SHIFT, GuestMemory
from .system import Kvm, kvm_call

# KVM_CLEAR_DIRTY_LOG works in multiples of 64 pages (one bitmap word).
CLEAR_GRANULE = 64


class Vm:
    """A VM: owns its fd, its memory regions (one memslot each) and its vCPUs."""

    def __init__(self, system: Kvm):
        self.kvm = system
        self.fd = kvm_call("KVM_CREATE_VM", kvm.KVM_CREATE_VM, system.fd)
        self.regions: list[GuestMemory] = []
        self.vcpus = []
        self.manual_protect = False
        self.dirty_logging = False
        self.irqchip = False          # create_irqchip() was called
        self.dirty_ring_bytes = 0     # enable_dirty_ring() was called
        # Intel VMX needs three pages for real-mode emulation; harmless elsewhere.
        # Placed just below 4 GiB, where PCs keep a hole RAM never occupies.
        try:
            kvm.KVM_SET_TSS_ADDR(self.fd, 0xFFFBD000)
        except OSError:
            pass

    @property
    def memory(self) -> GuestMemory:
        """The first (and, today, only) RAM region."""
        return self.regions[0]

    def add_memory(self, mem: GuestMemory) -> int:
        """Register `mem` as a new memslot; returns the slot number."""
        slot = len(self.regions)
        self.regions.append(mem)
        self._set_slot(slot, 0)
        return slot

    def _set_slot(self, slot: int, flags: int) -> None:
        mem = self.regions[slot]
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": mem.gpa,
            "memory_size": mem.size, "userspace_addr": mem.host_addr})
        kvm_call("KVM_SET_USER_MEMORY_REGION", kvm.KVM_SET_USER_MEMORY_REGION, self.fd, region,
                 context=f"slot {slot} at GPA {mem.gpa:#x}, {mem.size:#x} bytes")

    def create_vcpu(self, index: int | None = None):
        """KVM_CREATE_VCPU; `index` (the vCPU id) defaults to the next one."""
        from .vcpu import Vcpu
        vcpu = Vcpu(self, len(self.vcpus) if index is None else index)
        self.vcpus.append(vcpu)
        return vcpu

    # ---- dirty logging ----------------------------------------------------

    def start_dirty_log(self) -> None:
        """Turn on dirty logging on every memslot.  Afterwards every page counts as dirty.
        (With a dirty ring, KVM write-protects the slot now and each first write
        leaves a ring entry; vstate/dirtylog.py puts both behind one interface.)

        With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_GET_DIRTY_LOG only fetches
        and KVM_CLEAR_DIRTY_LOG re-protects a range: that lets migration clear
        a chunk's log right before it reads the chunk (claim 2), and with
        INITIALLY_SET KVM need not write-protect all of RAM up front.
        """
        caps = self.kvm.check("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        want = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | lib.KVM_DIRTY_LOG_INITIALLY_SET
        # Not with a dirty ring: INITIALLY_SET would leave RAM writable, and a
        # page written without a fault leaves no ring entry.
        if caps & want == want and not self.manual_protect and not self.dirty_ring_bytes:
            cap = ffi.new("struct kvm_enable_cap *", {
                "cap": lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, "args": [want, 0, 0, 0]})
            kvm_call("KVM_ENABLE_CAP", kvm.KVM_ENABLE_CAP, self.fd, cap,
                     context="KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
            self.manual_protect = True
        for slot in range(len(self.regions)):
            self._set_slot(slot, lib.KVM_MEM_LOG_DIRTY_PAGES)
        self.dirty_logging = True

    def stop_dirty_log(self) -> None:
        for slot in range(len(self.regions)):
            self._set_slot(slot, 0)
        self.dirty_logging = False

    def get_dirty_log(self, slot: int = 0) -> np.ndarray:
        """Fetch slot's dirty bitmap as uint64 words (bit i = page i, LSB first).

        Without manual protect this also clears the log and re-protects the
        pages, atomically; with it, call :meth:`clear_dirty_log` per range.
        """
        mem = self.regions[slot]
        words = np.zeros((mem.npages + 63) // 64, dtype=np.uint64)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot})
        log.dirty_bitmap = ffi.from_buffer(words)
        kvm_call("KVM_GET_DIRTY_LOG", kvm.KVM_GET_DIRTY_LOG, self.fd, log, context=f"slot {slot}")
        return words

    def clear_dirty_log(self, slot: int, first_page: int, words: np.ndarray) -> None:
        """Re-protect the pages whose bits are set in `words`, starting at `first_page`.

        `first_page` must be a multiple of 64; `words` covers len(words)*64 pages
        (the kernel accepts a shorter last range that ends at the slot's end).
        """
        mem = self.regions[slot]
        num = min(len(words) * 64, mem.npages - first_page)
        clear = ffi.new("struct kvm_clear_dirty_log *", {
            "slot": slot, "first_page": first_page, "num_pages": num})
        clear.dirty_bitmap = ffi.from_buffer(words)
        kvm_call("KVM_CLEAR_DIRTY_LOG", kvm.KVM_CLEAR_DIRTY_LOG, self.fd, clear,
                 context=f"slot {slot}, pages {first_page}+{num}")

    # ---- the in-kernel interrupt controller (SMP, timers, IPIs) -------------------
    # Appended for SMP; docs/boot.md ("Measured on kvm_pvm") has what works here.

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: a PIC pair and an IOAPIC for the VM, and a LAPIC for
        every vCPU created afterwards (so call it before create_vcpu).  With it, KVM
        handles HLT itself (the vCPU waits for an interrupt; no KVM_EXIT_HLT) and
        APs other than vCPU 0 start in KVM_MP_STATE_UNINITIALIZED, waiting for
        INIT-SIPI-SIPI or KVM_SET_MP_STATE."""
        if self.vcpus:
            raise KvmliteError(f"the irqchip must be created before the vCPUs ({len(self.vcpus)} exist)")
        kvm_call("KVM_CREATE_IRQCHIP", kvm.KVM_CREATE_IRQCHIP, self.fd)
        self.irqchip = True

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: the state of one chip (KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE,
        _IOAPIC) as the bytes of the header's 512-byte union."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        kvm_call("KVM_GET_IRQCHIP", kvm.KVM_GET_IRQCHIP, self.fd, chip, context=f"chip {chip_id}")
        return bytes(ffi.buffer(ffi.addressof(chip, "chip")))

    def set_irqchip(self, chip_id: int, state: bytes) -> None:
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        union = ffi.buffer(ffi.addressof(chip, "chip"))
        if len(state) != len(union):
            raise KvmliteError(f"irqchip {chip_id} state is {len(state)} bytes, not {len(union)}")
        union[:] = state
        kvm_call("KVM_SET_IRQCHIP", kvm.KVM_SET_IRQCHIP, self.fd, chip, context=f"chip {chip_id}")

    def save_irqchip(self) -> dict:
        """The three chips as plain values (migration/state.py validates them)."""
        return {name: self.get_irqchip(chip_id) for name, chip_id in irqchip_ids().items()}

    def restore_irqchip(self, state: dict) -> None:
        """Inverse of save_irqchip(); `state` must already be validated."""
        for name, chip_id in irqchip_ids().items():
            self.set_irqchip(chip_id, state[name])

    def irq_line(self, irq: int, level: int) -> bool:
        """KVM_IRQ_LINE_STATUS: drive GSI `irq` to `level`; True if an interrupt was delivered."""
        line = ffi.new("struct kvm_irq_level *")
        line.irq, line.level = irq, level
        kvm_call("KVM_IRQ_LINE_STATUS", kvm.KVM_IRQ_LINE_STATUS, self.fd, line,
                 context=f"GSI {irq} level {level}")
        return line.status > 0

    # ---- the dirty ring (an alternative to the bitmap log) --------------------------

    def enable_dirty_ring(self, nbytes: int) -> None:
        """Give every vCPU a dirty ring of `nbytes` (a power of two, at most what
        KVM_CAP_DIRTY_LOG_RING reports); must come before the first vCPU.  Then
        KVM_GET_DIRTY_LOG is refused: each vCPU's ring (Vcpu.dirty_ring) and
        reset_dirty_rings() replace it."""
        if self.vcpus:
            raise KvmliteError("the dirty ring must be enabled before the vCPUs are created")
        cap_name, limit = self.dirty_ring_cap()
        if not limit:
            raise KvmliteError("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
        if nbytes <= 0 or nbytes & (nbytes - 1) or nbytes > limit:
            raise KvmliteError(f"dirty ring of {nbytes} bytes: must be a power of two up to {limit}")
        cap = ffi.new("struct kvm_enable_cap *", {"cap": getattr(lib, cap_name), "args": [nbytes, 0, 0, 0]})
        kvm_call("KVM_ENABLE_CAP", kvm.KVM_ENABLE_CAP, self.fd, cap, context=f"{cap_name}, {nbytes} bytes")
        self.dirty_ring_bytes = nbytes

    def dirty_ring_cap(self) -> tuple[str, int]:
        """(capability, the largest ring in bytes; 0 without one).  The _ACQ_REL
        flavour, where this KVM has it, asks userspace for acquire/release order
        on the entries' flags, which x86's stores and loads give."""
        for cap_name in ("KVM_CAP_DIRTY_LOG_RING_ACQ_REL", "KVM_CAP_DIRTY_LOG_RING"):
            limit = self.kvm.check(cap_name)
            if limit:
                return cap_name, limit
        return "KVM_CAP_DIRTY_LOG_RING", 0

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: write-protect again every page whose ring entry was
        harvested (marked reset); returns how many entries KVM reset."""
        return kvm_call("KVM_RESET_DIRTY_RINGS", kvm.KVM_RESET_DIRTY_RINGS, self.fd)

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for mem in self.regions:
            mem.close()
        self.regions.clear()


def irqchip_ids() -> dict[str, int]:
    """The in-kernel chips by the names their saved state has."""
    return {"pic_master": lib.KVM_IRQCHIP_PIC_MASTER, "pic_slave": lib.KVM_IRQCHIP_PIC_SLAVE,
            "ioapic": lib.KVM_IRQCHIP_IOAPIC}


__all__ = ["Vm", "PAGE_SHIFT", "CLEAR_GRANULE", "irqchip_ids"]
