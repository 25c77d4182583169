"""Types of kvmlite._kvm: the cffi module kvmlite/_kvm_build.py compiles at
install time against this machine's <linux/kvm.h>.

`ffi` knows the kernel's structs (struct kvm_regs, struct kvm_run, ...); `lib`
has the ioctl numbers and constants the build names, and kvmlite's thin C
helpers, each one syscall returning its result or -errno.  The values come from
the headers at build time, so the stub gives only their types.
tests/unit/test_typing.py checks that it names exactly what the compiled module has.
"""

from _cffi_backend import FFI, _CDataBase

ffi: FFI

_Ptr = _CDataBase            # a pointer: ffi.new(...), ffi.from_buffer(...), ffi.cast(...)


class _Lib:
    # ioctl numbers, capabilities, exit reasons and flags from <linux/kvm.h>;
    # MADV_* from <sys/mman.h>
    # the in-kernel irqchip, LAPIC, MP state and the dirty ring (SMP)
    KVM_APIC_REG_SIZE: int
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL: int
    KVM_CAP_HLT: int
    KVM_CAP_IRQCHIP: int
    KVM_CAP_IRQ_INJECT_STATUS: int
    KVM_CAP_MP_STATE: int
    KVM_CAP_PIT2: int
    KVM_CAP_SPLIT_IRQCHIP: int
    KVM_CAP_TSC_DEADLINE_TIMER: int
    KVM_CAP_X2APIC_API: int
    KVM_CREATE_IRQCHIP: int
    KVM_CREATE_PIT2: int
    KVM_DIRTY_GFN_F_DIRTY: int
    KVM_DIRTY_GFN_F_MASK: int
    KVM_DIRTY_GFN_F_RESET: int
    KVM_DIRTY_LOG_PAGE_OFFSET: int
    KVM_GET_IRQCHIP: int
    KVM_GET_LAPIC: int
    KVM_GET_MP_STATE: int
    KVM_GET_PIT2: int
    KVM_IOAPIC_NUM_PINS: int
    KVM_IRQCHIP_IOAPIC: int
    KVM_IRQCHIP_PIC_MASTER: int
    KVM_IRQCHIP_PIC_SLAVE: int
    KVM_IRQ_LINE: int
    KVM_IRQ_LINE_STATUS: int
    KVM_MP_STATE_AP_RESET_HOLD: int
    KVM_MP_STATE_CHECK_STOP: int
    KVM_MP_STATE_HALTED: int
    KVM_MP_STATE_INIT_RECEIVED: int
    KVM_MP_STATE_LOAD: int
    KVM_MP_STATE_OPERATING: int
    KVM_MP_STATE_RUNNABLE: int
    KVM_MP_STATE_SIPI_RECEIVED: int
    KVM_MP_STATE_STOPPED: int
    KVM_MP_STATE_SUSPENDED: int
    KVM_MP_STATE_UNINITIALIZED: int
    KVM_NR_IRQCHIPS: int
    KVM_PIT_SPEAKER_DUMMY: int
    KVM_RESET_DIRTY_RINGS: int
    KVM_SET_IRQCHIP: int
    KVM_SET_LAPIC: int
    KVM_SET_MP_STATE: int
    KVM_SET_PIT2: int
    KVM_API_VERSION: int
    KVM_CAP_DIRTY_LOG_RING: int
    KVM_CAP_EXT_CPUID: int
    KVM_CAP_GET_TSC_KHZ: int
    KVM_CAP_IMMEDIATE_EXIT: int
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: int
    KVM_CAP_MAX_VCPUS: int
    KVM_CAP_NR_MEMSLOTS: int
    KVM_CAP_NR_VCPUS: int
    KVM_CAP_SET_GUEST_DEBUG: int
    KVM_CAP_SET_TSS_ADDR: int
    KVM_CAP_SYNC_MMU: int
    KVM_CAP_USER_MEMORY: int
    KVM_CAP_VCPU_EVENTS: int
    KVM_CAP_XCRS: int
    KVM_CAP_XSAVE: int
    KVM_CHECK_EXTENSION: int
    KVM_CLEAR_DIRTY_LOG: int
    KVM_CREATE_VCPU: int
    KVM_CREATE_VM: int
    KVM_DIRTY_LOG_INITIALLY_SET: int
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: int
    KVM_ENABLE_CAP: int
    KVM_EXIT_DEBUG: int
    KVM_EXIT_DIRTY_RING_FULL: int
    KVM_EXIT_EXCEPTION: int
    KVM_EXIT_FAIL_ENTRY: int
    KVM_EXIT_HLT: int
    KVM_EXIT_HYPERCALL: int
    KVM_EXIT_INTERNAL_ERROR: int
    KVM_EXIT_INTR: int
    KVM_EXIT_IO: int
    KVM_EXIT_IO_IN: int
    KVM_EXIT_IO_OUT: int
    KVM_EXIT_IRQ_WINDOW_OPEN: int
    KVM_EXIT_MMIO: int
    KVM_EXIT_NMI: int
    KVM_EXIT_NOTIFY: int
    KVM_EXIT_SHUTDOWN: int
    KVM_EXIT_SYSTEM_EVENT: int
    KVM_EXIT_UNKNOWN: int
    KVM_EXIT_X86_BUS_LOCK: int
    KVM_EXIT_X86_RDMSR: int
    KVM_EXIT_X86_WRMSR: int
    KVM_GET_API_VERSION: int
    KVM_GET_DIRTY_LOG: int
    KVM_GET_FPU: int
    KVM_GET_MSRS: int
    KVM_GET_MSR_INDEX_LIST: int
    KVM_GET_REGS: int
    KVM_GET_SREGS: int
    KVM_GET_SUPPORTED_CPUID: int
    KVM_GET_TSC_KHZ: int
    KVM_GET_VCPU_EVENTS: int
    KVM_GET_VCPU_MMAP_SIZE: int
    KVM_GET_XCRS: int
    KVM_GET_XSAVE: int
    KVM_GUESTDBG_ENABLE: int
    KVM_GUESTDBG_INJECT_BP: int
    KVM_GUESTDBG_INJECT_DB: int
    KVM_GUESTDBG_SINGLESTEP: int
    KVM_GUESTDBG_USE_HW_BP: int
    KVM_GUESTDBG_USE_SW_BP: int
    KVM_INTERNAL_ERROR_DELIVERY_EV: int
    KVM_INTERNAL_ERROR_EMULATION: int
    KVM_INTERNAL_ERROR_SIMUL_EX: int
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: int
    KVM_MEM_LOG_DIRTY_PAGES: int
    KVM_RUN: int
    KVM_SET_CPUID2: int
    KVM_SET_FPU: int
    KVM_SET_GUEST_DEBUG: int
    KVM_SET_IDENTITY_MAP_ADDR: int
    KVM_SET_MSRS: int
    KVM_SET_REGS: int
    KVM_SET_SREGS: int
    KVM_SET_TSS_ADDR: int
    KVM_SET_USER_MEMORY_REGION: int
    KVM_SET_VCPU_EVENTS: int
    KVM_SET_XCRS: int
    KVM_SET_XSAVE: int
    KVM_TRANSLATE: int
    MADV_HUGEPAGE: int
    MADV_POPULATE_WRITE: int
    # fallocate(2)'s modes, from <linux/falloc.h> (a local migration's punch)
    FALLOC_FL_KEEP_SIZE: int
    FALLOC_FL_PUNCH_HOLE: int

    def kvmlite_ioctl(self, fd: int, request: int, arg: _Ptr, /) -> int: ...
    def kvmlite_ioctl_int(self, fd: int, request: int, arg: int, /) -> int: ...
    def kvmlite_run(self, vcpu_fd: int, /) -> int: ...
    def kvmlite_run_packed(self, vcpu_fd: int, run: _Ptr, /) -> int: ...
    def kvmlite_install_kick_handler(self, signo: int, /) -> int: ...
    def kvmlite_madvise(self, addr: _Ptr, length: int, advice: int, /) -> int: ...
    def kvmlite_fallocate(self, fd: int, mode: int, offset: int, length: int, /) -> int: ...
    def kvmlite_zero_pages(self, base: _Ptr, npages: int, page_size: int, is_zero: _Ptr, /) -> int: ...
    def kvmlite_zero_page_list(self, base: _Ptr, pages: _Ptr, n: int, page_size: int,
                               is_zero: _Ptr, /) -> int: ...


lib: _Lib
