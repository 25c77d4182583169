/*
 * trap.c - the CPU-exception handler.  Runs at CPL 0.
 *
 * entry.S points all 32 exception vectors at small stubs that push the
 * vector number (and a 0 where the CPU pushes no error code), save the
 * general registers and call trap_handler() on the kernel stack the TSS
 * names in RSP0 (an exception from CPL 3 always switches to it).
 *
 * On kvm_pvm every instruction here goes through KVM's emulator (~1.3 us
 * each), which is fine for a path that runs once and ends the guest.
 */
#include "fph.h"
#include "workload.h"

/* Saved state, lowest address first: the reverse of the push order in entry.S. */
struct trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8;
    u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;                  /* pushed by the stub */
    u64 rip, cs, rflags, rsp, ss;       /* pushed by the CPU */
};

volatile int g_triple_armed;

void print_summary(u64 free_pages, int ok);
NORETURN void triple_fault_now(void);   /* entry.S */
NORETURN void trap_handler(struct trap_frame *f);

static const char *const vector_names[32] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow",
    "#BR bound range", "#UD invalid opcode", "#NM device not available",
    "#DF double fault", "coprocessor segment overrun", "#TS invalid TSS",
    "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check",
    "#MC machine check", "#XM SIMD error", "#VE virtualization", "#CP control protection",
};

NORETURN void trap_handler(struct trap_frame *f)
{
    static int depth;
    u64 cr2;

    /* The triple workload asked for this exception to end the machine. */
    if (g_triple_armed)
        triple_fault_now();
    /* An exception while reporting one: don't recurse, stop the CPU for good. */
    if (depth++)
        triple_fault_now();

    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    print("guest: exception %lu error 0x%lx at rip 0x%lx cr2 0x%lx\n",
          (unsigned long)f->vector, (unsigned long)f->error, (unsigned long)f->rip,
          (unsigned long)cr2);
    print("guest: %s, from cs 0x%lx (ring %lu), rsp 0x%lx, rflags 0x%lx\n",
          vector_names[f->vector & 31] ? vector_names[f->vector & 31] : "reserved",
          (unsigned long)f->cs, (unsigned long)(f->cs & 3), (unsigned long)f->rsp,
          (unsigned long)f->rflags);
    g_stats.errors++;
    /* The running count, not a recount: recounting emulated would take ms per MiB of bitmap. */
    print_summary(g_fph.hdr ? g_fph.free_count : 0, 0);
    guest_exit(EXIT_EXCEPTION);
}
