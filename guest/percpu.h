/*
 * percpu.h - what each CPU of the guest has of its own, and how it finds it.
 *
 * Each CPU's GS base (IA32_GS_BASE, written at CPL 0 when the CPU starts)
 * points at its struct percpu, whose first word points at itself: C code at
 * CPL 3 reads %gs:0 to find its CPU (measured: kvm_pvm honours the GS base at
 * CPL 3).  CPUID is no use for that at CPL 3 there: it is not virtualised at
 * CPL 3 and reports the host's CPU.  entry.S uses the PC_* offsets, checked
 * below against the struct.
 */
#ifndef GUEST_PERCPU_H
#define GUEST_PERCPU_H

#define MAX_CPUS        16

/* Offsets entry.S uses (assembly cannot see the struct). */
#define PC_SELF         0x00
#define PC_INDEX        0x08
#define PC_KSTACK       0x10    /* top of its ring-0 stack (TSS.RSP0 too) */
#define PC_USTACK       0x18    /* top of its ring-3 stack */
#define PC_CR3          0x20    /* page tables an AP switches to (the boot CPU's) */
#define PC_TSS_SEL      0x28    /* its TSS selector in the shared GDT */
#define PC_IRQS         0x30    /* LAPIC interrupts taken (timer, IPI), counted at CPL 0 */
#define PC_SIZE         0x400

#define TSS_SEL0        0x30    /* TSS i at TSS_SEL0 + 16 * i (a 64-bit TSS descriptor is 16 bytes) */
#define TSS_SIZE        (104 + 8192 + 1)   /* 104-byte TSS, 8 KiB I/O bitmap, the 0xFF byte */

#define VEC_TIMER       0xf0    /* LAPIC timer (TSC-deadline mode) */
#define VEC_IPI         0xf1    /* wake-up IPI */
#define VEC_SPURIOUS    0xff

#ifndef __ASSEMBLER__
#include "lib.h"
#include "workload.h"

struct percpu {
    struct percpu *self;        /* 0x00 */
    u64 index;                  /* 0x08 */
    u64 kstack_top;             /* 0x10 */
    u64 ustack_top;             /* 0x18 */
    u64 cr3;                    /* 0x20 */
    u64 tss_sel;                /* 0x28 */
    volatile u64 irqs;          /* 0x30 */
    /* C only from here */
    u64 cursor;                 /* the allocator's next-fit word for this CPU */
    struct stats stats;         /* this CPU's share of the summary */
    struct work work;           /* its share of the workload (workload.h) */
    volatile u32 state;         /* CPU_* below, written by the CPU itself */
    volatile u64 wake;          /* the ipi workload: the wake-up asked for */
    const char *how;            /* how it was started: "boot", "cpu-start device", "INIT-SIPI" */
    char tag[16];               /* "churn" on CPU 0, "churn[i]" on the others */
    volatile u64 ipi_woken;     /* the ipi workload: the last wake-up it saw */
    volatile u64 woke_tsc;      /* ... and when it saw it */
} __attribute__((aligned(PC_SIZE)));     /* entry.S indexes g_percpu by PC_SIZE */

enum { CPU_OFF, CPU_ONLINE, CPU_DONE };

_Static_assert(__builtin_offsetof(struct percpu, self) == PC_SELF, "PC_SELF");
_Static_assert(__builtin_offsetof(struct percpu, index) == PC_INDEX, "PC_INDEX");
_Static_assert(__builtin_offsetof(struct percpu, kstack_top) == PC_KSTACK, "PC_KSTACK");
_Static_assert(__builtin_offsetof(struct percpu, ustack_top) == PC_USTACK, "PC_USTACK");
_Static_assert(__builtin_offsetof(struct percpu, cr3) == PC_CR3, "PC_CR3");
_Static_assert(__builtin_offsetof(struct percpu, tss_sel) == PC_TSS_SEL, "PC_TSS_SEL");
_Static_assert(__builtin_offsetof(struct percpu, irqs) == PC_IRQS, "PC_IRQS");
_Static_assert(sizeof(struct percpu) == PC_SIZE, "PC_SIZE");

extern struct percpu g_percpu[MAX_CPUS];
extern unsigned g_ncpus;        /* CPUs this guest uses (1 until smp_start) */
extern int g_lapic;             /* a LAPIC in x2APIC mode is usable: timer sleep, IPIs */

static inline struct percpu *this_cpu(void)
{
    struct percpu *p;
    __asm__ volatile("mov %%gs:0, %0" : "=r"(p));
    return p;
}

/* The workload's name for messages: "churn" on CPU 0 (as with one CPU), "churn[1]" on CPU 1. */
const char *cpu_tag(const char *name);

/* smp.c */
void smp_start(const struct boot_info *bi, int multiboot);  /* start the other CPUs; returns when online */
void smp_release(void);                         /* let the APs run the workload */
void smp_wait_done(void);                       /* CPU 0: until every AP finished its part */
NORETURN void ap_main(struct percpu *pc);       /* an AP at CPL 3 (entry.S calls it) */
void lapic_init(void);                          /* this CPU: x2APIC on, timer in TSC-deadline mode */
void sleep_until(u64 tsc);                      /* HLT until the TSC reaches tsc (or idle device, or spin) */
void send_ipi(unsigned cpu);                    /* a VEC_IPI to CPU cpu (x2APIC ICR) */
#endif

#endif
