"""Raw KVM bindings: one function per ioctl, named as in <linux/kvm.h>.

This layer decides nothing.  Each function issues exactly one ioctl, takes and
returns cffi structs (``ffi.new("struct kvm_regs *")``) or plain integers, and
raises ``OSError`` with the kernel's errno on failure.  Policy, context and
friendly errors live one layer up (``kvmlite.vstate``).
"""

from __future__ import annotations

import os

from ._kvm import ffi, lib

__all__ = ["ffi", "lib", "ioctl", "ioctl_int"]


def ioctl(fd: int, request: int, arg) -> int:
    """ioctl(fd, request, pointer); returns the result or raises OSError."""
    r = lib.kvmlite_ioctl(fd, request, arg)
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    return r


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """ioctl(fd, request, integer); returns the result or raises OSError."""
    r = lib.kvmlite_ioctl_int(fd, request, arg)
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    return r


# ---- /dev/kvm (system) ioctls ------------------------------------------------

def KVM_GET_API_VERSION(kvm_fd: int) -> int:
    """The KVM API version; 12 for every kernel since 2.6.22."""
    return ioctl_int(kvm_fd, lib.KVM_GET_API_VERSION)


def KVM_CREATE_VM(kvm_fd: int, machine_type: int = 0) -> int:
    """Create a VM; returns its file descriptor."""
    return ioctl_int(kvm_fd, lib.KVM_CREATE_VM, machine_type)


def KVM_CHECK_EXTENSION(fd: int, cap: int) -> int:
    """0 if `cap` is unsupported, else a positive (sometimes meaningful) value."""
    return ioctl_int(fd, lib.KVM_CHECK_EXTENSION, cap)


def KVM_GET_VCPU_MMAP_SIZE(kvm_fd: int) -> int:
    """Size of the shared `struct kvm_run` area to mmap from each vCPU fd."""
    return ioctl_int(kvm_fd, lib.KVM_GET_VCPU_MMAP_SIZE)


def KVM_GET_SUPPORTED_CPUID(kvm_fd: int, cpuid2) -> int:
    """Fill `struct kvm_cpuid2` (nent = capacity on entry) with what KVM can expose."""
    return ioctl(kvm_fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid2)


def KVM_GET_MSR_INDEX_LIST(kvm_fd: int, msr_list) -> int:
    """Fill `struct kvm_msr_list` with the MSRs that KVM_GET_MSRS can save."""
    return ioctl(kvm_fd, lib.KVM_GET_MSR_INDEX_LIST, msr_list)


# ---- VM ioctls -----------------------------------------------------------------

def KVM_CREATE_VCPU(vm_fd: int, vcpu_id: int) -> int:
    """Create vCPU `vcpu_id`; returns its file descriptor."""
    return ioctl_int(vm_fd, lib.KVM_CREATE_VCPU, vcpu_id)


def KVM_SET_USER_MEMORY_REGION(vm_fd: int, region) -> int:
    """Create, move, resize or delete (memory_size = 0) a memslot."""
    return ioctl(vm_fd, lib.KVM_SET_USER_MEMORY_REGION, region)


def KVM_SET_TSS_ADDR(vm_fd: int, addr: int) -> int:
    """Three pages of guest-physical space that Intel VMX needs for real mode."""
    return ioctl_int(vm_fd, lib.KVM_SET_TSS_ADDR, addr)


def KVM_GET_DIRTY_LOG(vm_fd: int, dirty_log) -> int:
    """Copy a memslot's dirty bitmap out (and, without manual protect, reset it)."""
    return ioctl(vm_fd, lib.KVM_GET_DIRTY_LOG, dirty_log)


def KVM_CLEAR_DIRTY_LOG(vm_fd: int, clear_log) -> int:
    """Write-protect again the pages set in a range of a memslot's bitmap."""
    return ioctl(vm_fd, lib.KVM_CLEAR_DIRTY_LOG, clear_log)


def KVM_ENABLE_CAP(fd: int, enable_cap) -> int:
    """Turn on a capability that must be asked for (VM or vCPU fd)."""
    return ioctl(fd, lib.KVM_ENABLE_CAP, enable_cap)


# ---- vCPU ioctls -----------------------------------------------------------------

def KVM_RUN(vcpu_fd: int) -> int:
    """Run the vCPU until it exits; returns 0 or -errno (EINTR when kicked).

    The only function here that returns an errno instead of raising: the run
    loop sees EINTR often and an exception per kick would cost more than the exit.
    """
    return lib.kvmlite_run(vcpu_fd)


def KVM_GET_REGS(vcpu_fd: int, regs) -> int:
    return ioctl(vcpu_fd, lib.KVM_GET_REGS, regs)


def KVM_SET_REGS(vcpu_fd: int, regs) -> int:
    return ioctl(vcpu_fd, lib.KVM_SET_REGS, regs)


def KVM_GET_SREGS(vcpu_fd: int, sregs) -> int:
    return ioctl(vcpu_fd, lib.KVM_GET_SREGS, sregs)


def KVM_SET_SREGS(vcpu_fd: int, sregs) -> int:
    return ioctl(vcpu_fd, lib.KVM_SET_SREGS, sregs)


def KVM_GET_FPU(vcpu_fd: int, fpu) -> int:
    return ioctl(vcpu_fd, lib.KVM_GET_FPU, fpu)


def KVM_SET_FPU(vcpu_fd: int, fpu) -> int:
    return ioctl(vcpu_fd, lib.KVM_SET_FPU, fpu)


def KVM_GET_XSAVE(vcpu_fd: int, xsave) -> int:
    return ioctl(vcpu_fd, lib.KVM_GET_XSAVE, xsave)


def KVM_SET_XSAVE(vcpu_fd: int, xsave) -> int:
    return ioctl(vcpu_fd, lib.KVM_SET_XSAVE, xsave)


def KVM_GET_XCRS(vcpu_fd: int, xcrs) -> int:
    return ioctl(vcpu_fd, lib.KVM_GET_XCRS, xcrs)


def KVM_SET_XCRS(vcpu_fd: int, xcrs) -> int:
    return ioctl(vcpu_fd, lib.KVM_SET_XCRS, xcrs)


def KVM_GET_MSRS(vcpu_fd: int, msrs) -> int:
    """Read `msrs.nmsrs` MSRs; returns how many were read."""
    return ioctl(vcpu_fd, lib.KVM_GET_MSRS, msrs)


def KVM_SET_MSRS(vcpu_fd: int, msrs) -> int:
    """Write `msrs.nmsrs` MSRs; returns how many were written."""
    return ioctl(vcpu_fd, lib.KVM_SET_MSRS, msrs)


def KVM_SET_CPUID2(vcpu_fd: int, cpuid2) -> int:
    return ioctl(vcpu_fd, lib.KVM_SET_CPUID2, cpuid2)


def KVM_GET_VCPU_EVENTS(vcpu_fd: int, events) -> int:
    return ioctl(vcpu_fd, lib.KVM_GET_VCPU_EVENTS, events)


def KVM_SET_VCPU_EVENTS(vcpu_fd: int, events) -> int:
    return ioctl(vcpu_fd, lib.KVM_SET_VCPU_EVENTS, events)


def KVM_GET_TSC_KHZ(vcpu_fd: int) -> int:
    return ioctl_int(vcpu_fd, lib.KVM_GET_TSC_KHZ)


def KVM_TRANSLATE(vcpu_fd: int, translation) -> int:
    """Walk the guest's page tables for one linear address."""
    return ioctl(vcpu_fd, lib.KVM_TRANSLATE, translation)


def KVM_SET_GUEST_DEBUG(vcpu_fd: int, debug) -> int:
    """Arm single-step and breakpoint exits (KVM_EXIT_DEBUG) for this vCPU."""
    return ioctl(vcpu_fd, lib.KVM_SET_GUEST_DEBUG, debug)


# ---- interrupt controllers, MP state, dirty ring (VM and vCPU ioctls) ----------

def KVM_CREATE_IRQCHIP(vm_fd: int) -> int:
    """Create the in-kernel PIC pair, IOAPIC and a LAPIC per vCPU (before any vCPU)."""
    return ioctl_int(vm_fd, lib.KVM_CREATE_IRQCHIP)


def KVM_IRQ_LINE(vm_fd: int, irq_level) -> int:
    """Set a GSI's level (`struct kvm_irq_level`): PIC pins 0-15, IOAPIC pins 0-23."""
    return ioctl(vm_fd, lib.KVM_IRQ_LINE, irq_level)


def KVM_IRQ_LINE_STATUS(vm_fd: int, irq_level) -> int:
    """KVM_IRQ_LINE that also reports, in `status`, whether the interrupt was delivered."""
    return ioctl(vm_fd, lib.KVM_IRQ_LINE_STATUS, irq_level)


def KVM_GET_IRQCHIP(vm_fd: int, irqchip) -> int:
    """Read the state of the chip named by `irqchip.chip_id` (KVM_IRQCHIP_*)."""
    return ioctl(vm_fd, lib.KVM_GET_IRQCHIP, irqchip)


def KVM_SET_IRQCHIP(vm_fd: int, irqchip) -> int:
    return ioctl(vm_fd, lib.KVM_SET_IRQCHIP, irqchip)


def KVM_CREATE_PIT2(vm_fd: int, pit_config) -> int:
    """Create the in-kernel 8254 PIT (needs KVM_CREATE_IRQCHIP first)."""
    return ioctl(vm_fd, lib.KVM_CREATE_PIT2, pit_config)


def KVM_GET_PIT2(vm_fd: int, pit_state2) -> int:
    return ioctl(vm_fd, lib.KVM_GET_PIT2, pit_state2)


def KVM_SET_PIT2(vm_fd: int, pit_state2) -> int:
    return ioctl(vm_fd, lib.KVM_SET_PIT2, pit_state2)


def KVM_RESET_DIRTY_RINGS(vm_fd: int) -> int:
    """Re-protect every page whose ring entry userspace marked reset; returns how many."""
    return ioctl_int(vm_fd, lib.KVM_RESET_DIRTY_RINGS)


def KVM_GET_LAPIC(vcpu_fd: int, lapic_state) -> int:
    """The vCPU's local APIC registers, a 1 KiB image of the xAPIC page."""
    return ioctl(vcpu_fd, lib.KVM_GET_LAPIC, lapic_state)


def KVM_SET_LAPIC(vcpu_fd: int, lapic_state) -> int:
    return ioctl(vcpu_fd, lib.KVM_SET_LAPIC, lapic_state)


def KVM_GET_MP_STATE(vcpu_fd: int, mp_state) -> int:
    """KVM_MP_STATE_*: runnable, halted, waiting for INIT/SIPI..."""
    return ioctl(vcpu_fd, lib.KVM_GET_MP_STATE, mp_state)


def KVM_SET_MP_STATE(vcpu_fd: int, mp_state) -> int:
    return ioctl(vcpu_fd, lib.KVM_SET_MP_STATE, mp_state)
