"""The KVM ABI as kvmlite sees it, checked against <linux/kvm.h> compiled by gcc.

kvmlite pastes no struct layouts or ioctl numbers: cffi takes them from the
header.  These tests compile a separate C program against the same header and
compare every size, offset and constant, so a pasted number, a wrong field
declaration or a build against another header shows up here.  No /dev/kvm.
"""

from __future__ import annotations

import pytest

from kvmlite.kvm import ffi, lib
from tests.unit.cfacts import header_facts

# struct → fields whose offsets kvmlite relies on.  Dotted names go through
# anonymous unions / nested structs (offsetof(struct kvm_run, io.port)).
STRUCTS = {
    "kvm_run": ["request_interrupt_window", "immediate_exit", "exit_reason", "flags", "io",
                "io.direction", "io.size", "io.port", "io.count", "io.data_offset", "mmio",
                "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write", "fail_entry",
                "internal.suberror", "internal.ndata", "internal.data",
                "system_event.type", "hw.hardware_exit_reason", "debug.arch.exception",
                "debug.arch.pc", "debug.arch.dr6", "debug.arch.dr7"],
    "kvm_regs": ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r15", "rip",
                 "rflags"],
    "kvm_sregs": ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt", "gdt", "idt", "cr0", "cr2",
                  "cr3", "cr4", "cr8", "efer", "apic_base", "interrupt_bitmap"],
    "kvm_segment": ["base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
                    "avl", "unusable"],
    "kvm_dtable": ["base", "limit"],
    "kvm_fpu": [],
    "kvm_xsave": [],
    "kvm_vcpu_events": [],
    "kvm_xcr": ["xcr", "value"],
    "kvm_xcrs": ["nr_xcrs", "flags", "xcrs"],
    "kvm_userspace_memory_region": ["slot", "flags", "guest_phys_addr", "memory_size",
                                    "userspace_addr"],
    "kvm_dirty_log": ["slot", "dirty_bitmap"],
    "kvm_clear_dirty_log": ["slot", "num_pages", "first_page", "dirty_bitmap"],
    "kvm_cpuid_entry2": ["function", "index", "flags", "eax", "ebx", "ecx", "edx"],
    "kvm_cpuid2": ["nent", "entries"],
    "kvm_msr_entry": ["index", "data"],
    "kvm_msrs": ["nmsrs", "entries"],
    "kvm_msr_list": ["nmsrs", "indices"],
    "kvm_enable_cap": ["cap", "flags", "args"],
    "kvm_translation": ["linear_address", "physical_address", "valid", "writeable", "usermode"],
    "kvm_guest_debug": ["control", "arch", "arch.debugreg"],
    "kvm_guest_debug_arch": ["debugreg"],
    "kvm_debug_exit_arch": ["exception", "pc", "dr6", "dr7"],
    "kvm_irq_level": ["irq", "status", "level"],
    "kvm_irqchip": ["chip_id", "pad", "chip"],
    "kvm_pit_config": ["flags"],
    "kvm_pit_state2": [],
    "kvm_lapic_state": ["regs"],
    "kvm_mp_state": ["mp_state"],
    "kvm_dirty_gfn": ["flags", "slot", "offset"],
}

# Every integer constant the extension exports (ioctls, KVM_EXIT_*, caps, MADV_*, FALLOC_FL_*).
CONSTANTS = sorted(n for n in dir(lib) if isinstance(getattr(lib, n), int))

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr."""
    return direction << 30 | size << 16 | type_ << 8 | nr


def _IO(type_, nr):
    return _ioc(_IOC_NONE, type_, nr, 0)


def _IOR(type_, nr, ctype):
    return _ioc(_IOC_READ, type_, nr, ffi.sizeof(ctype))


def _IOW(type_, nr, ctype):
    return _ioc(_IOC_WRITE, type_, nr, ffi.sizeof(ctype))


def _IOWR(type_, nr, ctype):
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, ffi.sizeof(ctype))


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <sys/mman.h>",
             "#include <linux/falloc.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for struct, fields in STRUCTS.items():
        lines.append(f'printf("size {struct} %zu\\n", sizeof(struct {struct}));')
        for f in fields:
            lines.append(f'printf("offset {struct} {f} %zu\\n", offsetof(struct {struct}, {f}));')
    for name in CONSTANTS:
        lines.append(f'printf("const {name} %llu\\n", (unsigned long long)({name}));')
    lines.append('printf("words kvm_sregs.interrupt_bitmap %zu\\n", '
                 'sizeof(((struct kvm_sregs *)0)->interrupt_bitmap) / sizeof(__u64));')
    lines.append('printf("const KVM_NR_INTERRUPTS %llu\\n", (unsigned long long)KVM_NR_INTERRUPTS);')
    lines.append('printf("const KVM_MAX_XCRS %llu\\n", (unsigned long long)KVM_MAX_XCRS);')
    lines.append("return 0; }")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header(tmp_path_factory):
    """What gcc says about <linux/kvm.h>: {("size", struct): n, ("offset", struct, f): n, ...}."""
    return header_facts(tmp_path_factory, "abi", _c_program())


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_struct_layout_matches_header(header, struct):
    """ffi.sizeof and ffi.offsetof of each field kvmlite uses equal the header's sizeof/offsetof."""
    ours = {"sizeof": ffi.sizeof(f"struct {struct}")}
    theirs = {"sizeof": header[("size", struct)]}
    for field in STRUCTS[struct]:
        ours[field] = ffi.offsetof(f"struct {struct}", *field.split("."))
        theirs[field] = header[("offset", struct, field)]
    assert ours == theirs


def test_constants_match_header(header):
    """Every constant kvmlite.kvm.lib exports (ioctls, exits, caps, MADV_*, FALLOC_FL_*) equals the header's value."""
    assert len(CONSTANTS) > 50
    ours = {name: getattr(lib, name) for name in CONSTANTS}
    theirs = {name: header[("const", name)] for name in CONSTANTS}
    assert ours == theirs


def test_well_known_values(header):
    """A few values fixed by the KVM ABI for good: API 12, KVM_EXIT_IO 2, KVM_EXIT_SHUTDOWN 8."""
    assert lib.KVM_API_VERSION == header[("const", "KVM_API_VERSION")] == 12
    assert lib.KVM_EXIT_IO == 2 and lib.KVM_EXIT_HLT == 5 and lib.KVM_EXIT_SHUTDOWN == 8
    assert (lib.KVM_EXIT_IO_IN, lib.KVM_EXIT_IO_OUT) == (0, 1)
    assert ffi.offsetof("struct kvm_run", "exit_reason") == 8


@pytest.mark.parametrize("name,computed", [
    ("KVM_GET_API_VERSION", lambda: _IO(KVMIO, 0x00)),
    ("KVM_CREATE_VM", lambda: _IO(KVMIO, 0x01)),
    ("KVM_CHECK_EXTENSION", lambda: _IO(KVMIO, 0x03)),
    ("KVM_CREATE_VCPU", lambda: _IO(KVMIO, 0x41)),
    ("KVM_GET_DIRTY_LOG", lambda: _IOW(KVMIO, 0x42, "struct kvm_dirty_log")),
    ("KVM_SET_USER_MEMORY_REGION", lambda: _IOW(KVMIO, 0x46, "struct kvm_userspace_memory_region")),
    ("KVM_RUN", lambda: _IO(KVMIO, 0x80)),
    ("KVM_GET_REGS", lambda: _IOR(KVMIO, 0x81, "struct kvm_regs")),
    ("KVM_SET_REGS", lambda: _IOW(KVMIO, 0x82, "struct kvm_regs")),
    ("KVM_GET_SREGS", lambda: _IOR(KVMIO, 0x83, "struct kvm_sregs")),
    ("KVM_SET_SREGS", lambda: _IOW(KVMIO, 0x84, "struct kvm_sregs")),
    ("KVM_TRANSLATE", lambda: _IOWR(KVMIO, 0x85, "struct kvm_translation")),
    ("KVM_GET_FPU", lambda: _IOR(KVMIO, 0x8C, "struct kvm_fpu")),
    ("KVM_SET_CPUID2", lambda: _IOW(KVMIO, 0x90, "struct kvm_cpuid2")),
    ("KVM_GET_XSAVE", lambda: _IOR(KVMIO, 0xA4, "struct kvm_xsave")),
    ("KVM_CLEAR_DIRTY_LOG", lambda: _IOWR(KVMIO, 0xC0, "struct kvm_clear_dirty_log")),
    ("KVM_SET_GUEST_DEBUG", lambda: _IOW(KVMIO, 0x9B, "struct kvm_guest_debug")),
    ("KVM_CREATE_IRQCHIP", lambda: _IO(KVMIO, 0x60)),
    ("KVM_IRQ_LINE", lambda: _IOW(KVMIO, 0x61, "struct kvm_irq_level")),
    ("KVM_GET_IRQCHIP", lambda: _IOWR(KVMIO, 0x62, "struct kvm_irqchip")),
    ("KVM_SET_IRQCHIP", lambda: _IOR(KVMIO, 0x63, "struct kvm_irqchip")),   # sic: _IOR in the header
    ("KVM_CREATE_PIT2", lambda: _IOW(KVMIO, 0x77, "struct kvm_pit_config")),
    ("KVM_GET_LAPIC", lambda: _IOR(KVMIO, 0x8E, "struct kvm_lapic_state")),
    ("KVM_SET_LAPIC", lambda: _IOW(KVMIO, 0x8F, "struct kvm_lapic_state")),
    ("KVM_GET_MP_STATE", lambda: _IOR(KVMIO, 0x98, "struct kvm_mp_state")),
    ("KVM_SET_MP_STATE", lambda: _IOW(KVMIO, 0x99, "struct kvm_mp_state")),
    ("KVM_RESET_DIRTY_RINGS", lambda: _IO(KVMIO, 0xC7)),
])
def test_ioctl_number_computed_from_struct_size(header, name, computed):
    """An ioctl number rebuilt from dir/size/type/nr and ffi.sizeof equals the header's."""
    assert computed() == header[("const", name)] == getattr(lib, name)


def test_ioctl_encoding_fields_decode():
    """KVM_GET_REGS decodes to dir=READ, type 0xAE, nr 0x81, size = sizeof(struct kvm_regs)."""
    n = lib.KVM_GET_REGS
    assert (n >> 30, (n >> 16) & 0x3FFF, (n >> 8) & 0xFF, n & 0xFF) == (
        _IOC_READ, ffi.sizeof("struct kvm_regs"), KVMIO, 0x81)
    assert lib.KVM_RUN == KVMIO << 8 | 0x80   # _IO: no direction, no size


def test_exit_reasons_fit_the_packed_run_result():
    """Every KVM_EXIT_* is below 0xFF, the 'KVM_RUN failed' marker of kvmlite_run_packed."""
    exits = [getattr(lib, n) for n in CONSTANTS
             if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")]
    assert exits and max(exits) < 0xFF
    assert len(set(exits)) == len(exits)


def test_state_array_lengths_match_header(header):
    """kvm_sregs.interrupt_bitmap and kvm_xcrs.xcrs have the header's lengths (migration relies on them)."""
    from kvmlite.migration.state import MAX_XCRS
    words = len(ffi.new("struct kvm_sregs *").interrupt_bitmap)
    assert words == header[("words", "kvm_sregs.interrupt_bitmap")]
    assert words * 64 >= header[("const", "KVM_NR_INTERRUPTS")]
    assert len(ffi.new("struct kvm_xcrs *").xcrs) == header[("const", "KVM_MAX_XCRS")] == MAX_XCRS


def test_interrupt_state_sizes_match_header(header):
    """The LAPIC image is KVM_APIC_REG_SIZE bytes and a chip's state fits the
    kvm_irqchip union: the blob sizes migration checks (migration/state.py)."""
    assert ffi.sizeof("struct kvm_lapic_state") == header[("const", "KVM_APIC_REG_SIZE")] == 0x400
    assert ffi.sizeof("struct kvm_irqchip") - ffi.offsetof("struct kvm_irqchip", "chip") == 512
    assert header[("const", "KVM_NR_IRQCHIPS")] == 3
    assert lib.KVM_DIRTY_LOG_PAGE_OFFSET == header[("const", "KVM_DIRTY_LOG_PAGE_OFFSET")] > 0
