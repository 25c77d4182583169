"""cffi build script: compiles kvmlite._kvm against the system's <linux/kvm.h>.

Every struct below is declared *partially* (``...;``): cffi asks the C compiler
for the real offsets and sizes, and every constant is declared without a value,
so its value comes from the header.  Nothing about the KVM ABI is pasted here.
Run at install time by setuptools (see setup.py); ``python -m kvmlite._kvm_build``
builds it in place for development.
"""

from cffi import FFI

CDEF = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

/* ---- constants, values filled in from <linux/kvm.h> ---- */
#define KVM_API_VERSION ...

static const unsigned long KVM_GET_API_VERSION;
static const unsigned long KVM_CREATE_VM;
static const unsigned long KVM_CHECK_EXTENSION;
static const unsigned long KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long KVM_GET_SUPPORTED_CPUID;
static const unsigned long KVM_GET_MSR_INDEX_LIST;
static const unsigned long KVM_CREATE_VCPU;
static const unsigned long KVM_SET_USER_MEMORY_REGION;
static const unsigned long KVM_SET_TSS_ADDR;
static const unsigned long KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long KVM_GET_DIRTY_LOG;
static const unsigned long KVM_CLEAR_DIRTY_LOG;
static const unsigned long KVM_ENABLE_CAP;
static const unsigned long KVM_RUN;
static const unsigned long KVM_GET_REGS;
static const unsigned long KVM_SET_REGS;
static const unsigned long KVM_GET_SREGS;
static const unsigned long KVM_SET_SREGS;
static const unsigned long KVM_GET_FPU;
static const unsigned long KVM_SET_FPU;
static const unsigned long KVM_GET_XSAVE;
static const unsigned long KVM_SET_XSAVE;
static const unsigned long KVM_GET_XCRS;
static const unsigned long KVM_SET_XCRS;
static const unsigned long KVM_GET_MSRS;
static const unsigned long KVM_SET_MSRS;
static const unsigned long KVM_SET_CPUID2;
static const unsigned long KVM_GET_VCPU_EVENTS;
static const unsigned long KVM_SET_VCPU_EVENTS;
static const unsigned long KVM_GET_TSC_KHZ;
static const unsigned long KVM_TRANSLATE;
static const unsigned long KVM_SET_GUEST_DEBUG;
/* interrupt controllers, MP state and the dirty ring (SMP) */
static const unsigned long KVM_CREATE_IRQCHIP;
static const unsigned long KVM_IRQ_LINE;
static const unsigned long KVM_IRQ_LINE_STATUS;
static const unsigned long KVM_GET_IRQCHIP;
static const unsigned long KVM_SET_IRQCHIP;
static const unsigned long KVM_CREATE_PIT2;
static const unsigned long KVM_GET_PIT2;
static const unsigned long KVM_SET_PIT2;
static const unsigned long KVM_GET_LAPIC;
static const unsigned long KVM_SET_LAPIC;
static const unsigned long KVM_GET_MP_STATE;
static const unsigned long KVM_SET_MP_STATE;
static const unsigned long KVM_RESET_DIRTY_RINGS;

#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ...
#define KVM_CAP_DIRTY_LOG_RING ...
#define KVM_CAP_SYNC_MMU ...
#define KVM_CAP_SET_GUEST_DEBUG ...
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IRQ_INJECT_STATUS ...
#define KVM_CAP_TSC_DEADLINE_TIMER ...
#define KVM_CAP_SPLIT_IRQCHIP ...
#define KVM_CAP_X2APIC_API ...
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL ...
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_DIRTY_LOG_INITIALLY_SET ...
#define KVM_MEM_LOG_DIRTY_PAGES ...

#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define KVM_GUESTDBG_USE_SW_BP ...
#define KVM_GUESTDBG_USE_HW_BP ...
#define KVM_GUESTDBG_INJECT_DB ...
#define KVM_GUESTDBG_INJECT_BP ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_DIRTY_RING_FULL ...
#define KVM_EXIT_X86_BUS_LOCK ...
#define KVM_EXIT_NOTIFY ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON ...

#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_SIPI_RECEIVED ...
#define KVM_MP_STATE_STOPPED ...
#define KVM_MP_STATE_CHECK_STOP ...
#define KVM_MP_STATE_OPERATING ...
#define KVM_MP_STATE_LOAD ...
#define KVM_MP_STATE_AP_RESET_HOLD ...
#define KVM_MP_STATE_SUSPENDED ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_NR_IRQCHIPS ...
#define KVM_IOAPIC_NUM_PINS ...
#define KVM_APIC_REG_SIZE ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_DIRTY_LOG_PAGE_OFFSET ...
#define KVM_DIRTY_GFN_F_DIRTY ...
#define KVM_DIRTY_GFN_F_RESET ...
#define KVM_DIRTY_GFN_F_MASK ...

#define MADV_POPULATE_WRITE ...
#define MADV_HUGEPAGE ...
#define FALLOC_FL_KEEP_SIZE ...
#define FALLOC_FL_PUNCH_HOLE ...

/* ---- structures, layouts checked against the header by the compiler ---- */
struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
    ...;
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8,  r9,  r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
    ...;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8  type;
    __u8  present, dpl, db, s, l, g, avl;
    __u8  unusable;
    ...;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[...];
    ...;
};

struct kvm_fpu { ...; };
struct kvm_xsave { ...; };
struct kvm_vcpu_events { ...; };

struct kvm_xcr {
    __u32 xcr;
    __u64 value;
    ...;
};
struct kvm_xcrs {
    __u32 nr_xcrs;
    __u32 flags;
    struct kvm_xcr xcrs[...];
    ...;
};

struct kvm_msr_entry {
    __u32 index;
    __u64 data;
    ...;
};
struct kvm_msrs {
    __u32 nmsrs;
    struct kvm_msr_entry entries[];
    ...;
};
struct kvm_msr_list {
    __u32 nmsrs;
    __u32 indices[];
    ...;
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax, ebx, ecx, edx;
    ...;
};
struct kvm_cpuid2 {
    __u32 nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};

struct kvm_dirty_log {
    __u32 slot;
    void *dirty_bitmap;
    ...;
};
struct kvm_clear_dirty_log {
    __u32 slot;
    __u32 num_pages;
    __u64 first_page;
    void *dirty_bitmap;
    ...;
};

struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    ...;
};

struct kvm_translation {
    __u64 linear_address;
    __u64 physical_address;
    __u8  valid;
    __u8  writeable;
    __u8  usermode;
    ...;
};

struct kvm_guest_debug_arch {
    __u64 debugreg[8];
    ...;
};
struct kvm_guest_debug {
    __u32 control;
    struct kvm_guest_debug_arch arch;
    ...;
};
/* KVM_IRQ_LINE: `irq` and `status` share the first word (a union in the header). */
struct kvm_irq_level {
    union { __u32 irq; int status; };
    __u32 level;
};
/* One of the three in-kernel chips (PIC master, PIC slave, IOAPIC); `chip` is a
   512-byte union in the header, handled here as bytes. */
struct kvm_irqchip {
    __u32 chip_id;
    __u32 pad;
    union { char dummy[512]; } chip;
    ...;
};
struct kvm_pit_config {
    __u32 flags;
    ...;
};
struct kvm_pit_state2 { ...; };
struct kvm_lapic_state {
    char regs[...];
    ...;
};
struct kvm_mp_state {
    __u32 mp_state;
    ...;
};
/* One entry of a vCPU's dirty ring, mmapped from the vCPU fd. */
struct kvm_dirty_gfn {
    __u32 flags;
    __u32 slot;
    __u64 offset;
    ...;
};

/* Declared whole, not partial: it sits in kvm_run's anonymous union, where
   cffi cannot complete a partial struct; the compiler still checks it. */
struct kvm_debug_exit_arch {
    __u32 exception;
    __u32 pad;
    __u64 pc;
    __u64 dr6;
    __u64 dr7;
};

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u16 flags;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        ...;
    };
    ...;
};

/* ---- thin C helpers: each is one syscall, no policy ---- */
int kvmlite_ioctl(int fd, unsigned long request, void *arg);
int kvmlite_ioctl_int(int fd, unsigned long request, unsigned long arg);
int kvmlite_run(int vcpu_fd);
uint64_t kvmlite_run_packed(int vcpu_fd, struct kvm_run *run);
int kvmlite_install_kick_handler(int signo);
int kvmlite_madvise(void *addr, size_t length, int advice);
int kvmlite_fallocate(int fd, int mode, int64_t offset, int64_t length);
size_t kvmlite_zero_pages(const void *base, size_t npages, size_t page_size, unsigned char *is_zero);
size_t kvmlite_zero_page_list(const void *base, const int64_t *pages, size_t n, size_t page_size,
                              unsigned char *is_zero);
"""

SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <linux/falloc.h>
#include <linux/kvm.h>

/* Return the ioctl's result, or -errno: errno does not survive the trip back
   into Python once the GIL is re-taken, so it is captured here. */
static int kvmlite_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int kvmlite_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int kvmlite_run(int vcpu_fd)
{
    int r = ioctl(vcpu_fd, KVM_RUN, 0);
    return r < 0 ? -errno : r;
}

/* KVM_RUN plus the decoding the run loop needs for the commonest exit, in one
   call: crossing from Python into C costs about as much as reading three
   struct fields from Python, and a port-I/O exit needs six.
     bits  0-7   exit_reason, or 0xFF when KVM_RUN failed (errno in bits 8-31)
     for KVM_EXIT_IO:
     bit   8     direction (KVM_EXIT_IO_OUT = 1)
     bits  9-11  size in bytes (1, 2 or 4)
     bit   12    count == 1 (otherwise read the run struct)
     bits 16-31  port
     bits 32-63  the value written, for a single OUT */
static uint64_t kvmlite_run_packed(int vcpu_fd, struct kvm_run *run)
{
    if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
        return 0xFF | ((uint64_t)errno << 8);
    if (run->exit_reason != KVM_EXIT_IO)
        return run->exit_reason;
    uint64_t r = KVM_EXIT_IO | ((uint64_t)run->io.direction << 8)
               | ((uint64_t)(run->io.size & 7) << 9) | ((uint64_t)run->io.port << 16);
    if (run->io.count == 1) {
        r |= 1u << 12;
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            const uint8_t *p = (const uint8_t *)run + run->io.data_offset;
            uint32_t v = 0;
            memcpy(&v, p, run->io.size <= 4 ? run->io.size : 4);
            r |= (uint64_t)v << 32;
        }
    }
    return r;
}

/* A signal whose handler does nothing and is installed without SA_RESTART:
   delivering it to the vCPU thread makes KVM_RUN return -EINTR, which is how a
   VMM takes the vCPU back from a guest that never exits on its own. */
static void kvmlite_kick_handler(int signo) { (void)signo; }

static int kvmlite_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kvmlite_kick_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

/* Called without the GIL: MADV_POPULATE_WRITE on gigabytes takes a while. */
static int kvmlite_madvise(void *addr, size_t length, int advice)
{
    return madvise(addr, length, advice) < 0 ? -errno : 0;
}

/* fallocate(2) with a mode (Python's os module only has posix_fallocate): a
   memfd-backed guest gives free pages back to the host with PUNCH_HOLE. */
static int kvmlite_fallocate(int fd, int mode, int64_t offset, int64_t length)
{
    return fallocate(fd, mode, offset, length) < 0 ? -errno : 0;
}

/* is_zero[i] = 1 when page i holds only zero bytes.  A page with data almost
   always differs in its first word, so this reads one word of most pages. */
static size_t kvmlite_zero_pages(const void *base, size_t npages, size_t page_size,
                                 unsigned char *is_zero)
{
    size_t zeros = 0, words = page_size / sizeof(uint64_t);
    const uint64_t *p = base;
    for (size_t i = 0; i < npages; i++, p += words) {
        size_t w = 0;
        while (w < words && p[w] == 0)
            w++;
        is_zero[i] = (w == words);
        zeros += is_zero[i];
    }
    return zeros;
}

/* The same for n scattered pages: is_zero[i] for page pages[i] from base. */
static size_t kvmlite_zero_page_list(const void *base, const int64_t *pages, size_t n,
                                     size_t page_size, unsigned char *is_zero)
{
    size_t zeros = 0;
    for (size_t i = 0; i < n; i++) {
        zeros += kvmlite_zero_pages((const char *)base + (size_t)pages[i] * page_size, 1,
                                    page_size, &is_zero[i]);
    }
    return zeros;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmlite._kvm", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    import os
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ffibuilder.compile(verbose=False)
