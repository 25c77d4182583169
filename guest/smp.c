/*
 * smp.c - the other CPUs: starting them, their LAPIC, sleeping on its timer,
 * and waking each other with IPIs.
 *
 * Two ways to start a CPU (docs/boot.md, "Starting the other CPUs"):
 *   - the CPU-start device (kvmlite, boot-info flag): one CPU_ON per CPU and
 *     the VMM starts it in long mode at ap_entry, no real mode involved;
 *   - INIT-SIPI-SIPI from this CPU's LAPIC (any PC, QEMU -smp N): the CPU
 *     starts in real mode at the trampoline copied to 0x8000 (entry.S).
 * Either way it reaches ap_main() at CPL 3 with its own stacks, TSS and GS.
 *
 * The LAPIC is used in x2APIC mode: its registers are MSRs, which ring 3
 * reaches through the #GP handler (lib.h, wrmsr_trapped), about 45 us each
 * on kvm_pvm.  (The xAPIC page would need a mapping of 0xFEE00000; MMIO
 * from CPL 3 costs about the same, measured: docs/boot.md.)
 */
#include "fph.h"
#include "percpu.h"

#define MSR_APIC_BASE       0x1b
#define APIC_BASE_EN        (1u << 11)
#define APIC_BASE_EXTD      (1u << 10)     /* x2APIC mode */
#define MSR_TSC_DEADLINE    0x6e0
#define X2APIC_SVR          0x80f
#define X2APIC_ICR          0x830
#define X2APIC_LVTT         0x832
#define SVR_ENABLE          (1u << 8)
#define LVTT_TSC_DEADLINE   (2u << 17)
#define ICR_INIT            0x4500u        /* INIT, level assert */
#define ICR_STARTUP         0x4600u        /* STARTUP; vector = page number of the entry */
#define CPUID1_ECX_X2APIC   (1u << 21)
#define CPUID1_ECX_DEADLINE (1u << 24)
#define CPUID1_EDX_APIC     (1u << 9)

#define TRAMPOLINE          0x8000ul       /* SIPI vector 8 */
#define TRAMP_PML4          0x9000ul       /* the trampoline's page tables: the low 1 GiB */
#define AP_KSTACK           16384
#define AP_USTACK           65536
#define START_TIMEOUT_MS    2000

/* CPU-start device registers (docs/boot.md) */
#define CS_ID           0x00
#define CS_CPU          0x04
#define CS_ENTRY        0x08
#define CS_STACK        0x10
#define CS_ARG          0x18
#define CS_COMMAND      0x20
#define CS_ID_VALUE     0x31504d53u     /* "SMP1" */
#define CS_CPU_ON       1

struct percpu g_percpu[MAX_CPUS];
unsigned g_ncpus = 1;
int g_lapic;

extern char ap_entry[], ap_trampoline[], ap_trampoline_end[], tramp_gdtr[], tramp_cr3[], tramp_target[];
extern char gdt[], kstack_top[], user_stack_top[], tss[];
extern u8 gdt_ptr[];
extern u64 g_boot_cr3;
extern u32 g_cpuid1_ecx, g_cpuid1_edx;

/* The other CPUs' TSSes and stacks; CPU 0's are in entry.S. */
static u8 ap_tss[MAX_CPUS][TSS_SIZE + 15] __attribute__((aligned(16)));
static u8 ap_kstack[MAX_CPUS][AP_KSTACK] __attribute__((aligned(16)));
static u8 ap_ustack[MAX_CPUS][AP_USTACK] __attribute__((aligned(16)));
static volatile u32 g_go;           /* CPU 0 lets the APs run the workload */

struct stats *this_stats(void) { return &this_cpu()->stats; }

const char *cpu_tag(const char *name)
{
    struct percpu *pc = this_cpu();
    if (pc->index == 0)
        return name;
    char *t = pc->tag;
    size_t n = 0;
    while (*name && n < sizeof(pc->tag) - 5)
        t[n++] = *name++;
    t[n++] = '[';
    if (pc->index >= 10)
        t[n++] = (char)('0' + pc->index / 10);
    t[n++] = (char)('0' + pc->index % 10);
    t[n++] = ']';
    t[n] = '\0';
    return t;
}

/* A 64-bit TSS descriptor (16 bytes, SDM Vol. 3A 8.2.3): type 9, present, DPL 0. */
static void set_tss_descriptor(unsigned cpu, u64 base)
{
    u64 *d = (u64 *)(gdt + TSS_SEL0 + 16 * cpu);
    u64 limit = TSS_SIZE - 1;
    d[0] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89ULL << 40
           | ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
    d[1] = base >> 32;
}

static void percpu_init(unsigned i)
{
    struct percpu *pc = &g_percpu[i];
    pc->self = pc;
    pc->index = i;
    pc->cr3 = g_boot_cr3;
    pc->tss_sel = TSS_SEL0 + 16 * i;
    if (i == 0) {
        pc->kstack_top = (u64)(uintptr_t)kstack_top;
        pc->ustack_top = (u64)(uintptr_t)user_stack_top;
        pc->how = "boot";
        return;
    }
    pc->kstack_top = (u64)(uintptr_t)(ap_kstack[i] + AP_KSTACK);
    pc->ustack_top = (u64)(uintptr_t)(ap_ustack[i] + AP_USTACK);
    u8 *t = (u8 *)(((uintptr_t)ap_tss[i] + 15) & ~(uintptr_t)15);
    memset(t, 0, TSS_SIZE);                         /* I/O bitmap: every port allowed */
    *(u64 *)(t + 4) = pc->kstack_top;               /* RSP0 */
    *(u16 *)(t + 0x66) = 104;                       /* I/O map base */
    t[TSS_SIZE - 1] = 0xff;
    set_tss_descriptor(i, (u64)(uintptr_t)t);
}

/* ---- the LAPIC ------------------------------------------------------------------- */

void lapic_init(void)
{
    u64 base = rdmsr_trapped(MSR_APIC_BASE);
    wrmsr_trapped(MSR_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
    wrmsr_trapped(X2APIC_SVR, SVR_ENABLE | VEC_SPURIOUS);
    wrmsr_trapped(X2APIC_LVTT, LVTT_TSC_DEADLINE | VEC_TIMER);
}

void send_ipi(unsigned cpu)
{
    wrmsr_trapped(X2APIC_ICR, (u64)cpu << 32 | VEC_IPI);    /* fixed, physical destination = APIC ID */
}

/*
 * Sleep until the TSC reaches `tsc`.  With the LAPIC: arm the TSC-deadline
 * timer and HLT (both trapped); KVM keeps the vCPU out of the host CPU until
 * the timer or another interrupt (then it loops).  Without: the idle device,
 * or spin.
 */
void sleep_until(u64 tsc)
{
    if (g_lapic) {
        struct percpu *pc = this_cpu();
        u64 seen = pc->irqs;            /* before arming: the timer may fire at once */
        wrmsr_trapped(MSR_TSC_DEADLINE, tsc);
        while (rdtsc() < tsc) {
            hlt_trapped(seen);          /* returns at once if an interrupt came since */
            seen = pc->irqs;
        }
        return;
    }
    for (u64 now; (now = rdtsc()) < tsc;) {
        u64 us = (tsc - now) * 1000 / g_tsc_khz;
        if (g_ports.idle && us >= 100)
            idle_us((u32)(us > 100000 ? 100000 : us));
        else
            cpu_relax();
    }
}

/* ---- starting the other CPUs --------------------------------------------------------- */

static int cpustart_present(const struct boot_info *bi)
{
    return bi->version >= 2 && bi->size >= BOOT_INFO_V2_SIZE && (bi->flags & BOOT_INFO_FLAG_CPUSTART)
           && bi->cpustart_port && inl(bi->cpustart_port + CS_ID) == CS_ID_VALUE;
}

static void cpustart_on(u16 port, unsigned cpu, u64 entry, u64 stack, u64 arg)
{
    outl(port + CS_CPU, cpu);
    outl(port + CS_ENTRY, (u32)entry);
    outl(port + CS_ENTRY + 4, (u32)(entry >> 32));
    outl(port + CS_STACK, (u32)stack);
    outl(port + CS_STACK + 4, (u32)(stack >> 32));
    outl(port + CS_ARG, (u32)arg);
    outl(port + CS_ARG + 4, (u32)(arg >> 32));
    outl(port + CS_COMMAND, CS_CPU_ON);
    u32 status = inl(port + CS_COMMAND);
    if (status) {
        print("smp: the CPU-start device refused CPU %u: status 0x%x\n", cpu, status);
        g_stats.errors++;
    }
}

/* The trampoline at 0x8000 and its page tables for the low 1 GiB (2 MiB pages). */
static void trampoline_init(void)
{
    memcpy((void *)TRAMPOLINE, ap_trampoline, (size_t)(ap_trampoline_end - ap_trampoline));
    u64 *pml4 = (u64 *)TRAMP_PML4, *pdpt = pml4 + 512, *pd = pml4 + 1024;
    memset(pml4, 0, 3 * PAGE_SIZE);
    pml4[0] = (TRAMP_PML4 + PAGE_SIZE) | 3;          /* P | RW */
    pdpt[0] = (TRAMP_PML4 + 2 * PAGE_SIZE) | 3;
    for (u64 i = 0; i < 512; i++)
        pd[i] = i << 21 | 0x83;                      /* P | RW | PS */
    u8 *base = (u8 *)TRAMPOLINE;
    memcpy(base + (tramp_gdtr - ap_trampoline), gdt_ptr, 2);       /* limit */
    *(u32 *)(base + (tramp_gdtr - ap_trampoline) + 2) = (u32)(uintptr_t)gdt;
    *(u32 *)(base + (tramp_cr3 - ap_trampoline)) = (u32)TRAMP_PML4;
    extern char ap_sipi64[];
    *(u64 *)(base + (tramp_target - ap_trampoline)) = (u64)(uintptr_t)ap_sipi64;
}

static u64 online_count(void)
{
    u64 n = 0;
    for (unsigned i = 0; i < g_ncpus; i++)
        n += g_percpu[i].state != CPU_OFF;
    return n;
}

void smp_start(const struct boot_info *bi, int multiboot)
{
    percpu_init(0);
    g_percpu[0].state = CPU_ONLINE;
    /* A LAPIC we can drive from ring 3: x2APIC and the TSC-deadline timer, seen at CPL 0. */
    int lapic_hw = (g_cpuid1_edx & CPUID1_EDX_APIC) && (g_cpuid1_ecx & CPUID1_ECX_X2APIC)
                   && (g_cpuid1_ecx & CPUID1_ECX_DEADLINE);
    /* kvmlite says whether it has one in the kernel.  A PC (Multiboot) always has
     * one; the guest sleeps on it when asked to (lapic=1) or when it has CPUs to start. */
    if (bi->version >= 2 && bi->size >= BOOT_INFO_V2_SIZE)
        g_lapic = lapic_hw && (bi->flags & BOOT_INFO_FLAG_LAPIC);
    else
        g_lapic = lapic_hw && multiboot && (g_cfg.lapic || g_cfg.cpus > 1);
    if (g_lapic) {
        /* Interrupts come only from the LAPIC here: mask every line of the two
         * 8259 PICs (OCW1 = 0xFF), which a PC BIOS leaves on vectors 8-15 with
         * the PIT ticking (QEMU's does), where they would look like exceptions. */
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
        lapic_init();
    }

    unsigned want = (unsigned)g_cfg.cpus;
    if (!want)
        want = (bi->version >= 2 && bi->size >= BOOT_INFO_V2_SIZE && bi->cpu_count) ? bi->cpu_count : 1;
    if (want > MAX_CPUS) {
        print("smp: %u CPUs, this guest uses %u\n", want, MAX_CPUS);
        want = MAX_CPUS;
    }
    if (want <= 1)
        return;
    int pv = cpustart_present(bi) && !g_cfg.sipi;
    if (!pv && !g_lapic) {
        print("smp: %u CPUs but neither the CPU-start device nor an x2APIC LAPIC: using one\n", want);
        return;
    }
    g_ncpus = want;
    for (unsigned i = 1; i < g_ncpus; i++)
        percpu_init(i);

    u64 t0 = rdtsc();
    if (pv) {
        for (unsigned i = 1; i < g_ncpus; i++) {
            g_percpu[i].how = "cpu-start device";
            cpustart_on(bi->cpustart_port, i, (u64)(uintptr_t)ap_entry, g_percpu[i].kstack_top,
                        (u64)(uintptr_t)&g_percpu[i]);
        }
    } else {
        trampoline_init();
        for (unsigned i = 1; i < g_ncpus; i++) {
            g_percpu[i].how = "INIT-SIPI";
            wrmsr_trapped(X2APIC_ICR, (u64)i << 32 | ICR_INIT);
        }
        for (int round = 0; round < 2; round++)      /* the second SIPI is for CPUs that missed the first */
            for (unsigned i = 1; i < g_ncpus; i++)
                if (g_percpu[i].state == CPU_OFF)
                    wrmsr_trapped(X2APIC_ICR, (u64)i << 32 | ICR_STARTUP | (TRAMPOLINE >> 12));
    }
    u64 deadline = t0 + (u64)START_TIMEOUT_MS * g_tsc_khz;
    while (online_count() < g_ncpus && rdtsc() < deadline)
        cpu_relax();
    u64 up = online_count();
    print("smp: %lu of %u CPUs online in %lu us (%s)\n", (unsigned long)up, g_ncpus,
          (unsigned long)((rdtsc() - t0) * 1000 / g_tsc_khz), pv ? "cpu-start device" : "INIT-SIPI-SIPI");
    if (up < g_ncpus) {
        g_stats.errors++;
        g_ncpus = (unsigned)up;       /* the missing ones are not counted on (they are the last) */
    }
}

NORETURN void ap_main(struct percpu *pc)
{
    if (g_lapic)
        lapic_init();
    __atomic_store_n(&pc->state, CPU_ONLINE, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&g_go, __ATOMIC_ACQUIRE))
        cpu_relax();
    pc->stats.start_tsc = rdtsc();
    run_workload_ap();
    __atomic_store_n(&pc->state, CPU_DONE, __ATOMIC_RELEASE);
    /* Done: wait for interrupts (the ipi workload's), or spin without a LAPIC. */
    for (;;) {
        if (g_lapic)
            hlt_trapped(pc->irqs);
        else
            cpu_relax();
    }
}

void smp_release(void)
{
    __atomic_store_n(&g_go, 1, __ATOMIC_RELEASE);
}

void smp_wait_done(void)
{
    for (unsigned i = 1; i < g_ncpus; i++)
        while (__atomic_load_n(&g_percpu[i].state, __ATOMIC_ACQUIRE) != CPU_DONE) {
            if (g_lapic)
                sleep_until(rdtsc() + g_tsc_khz);       /* 1 ms */
            else
                cpu_relax();
        }
}
