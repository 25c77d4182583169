/*
 * workloads.c - what the guest does once it is up: hello, churn, fill,
 * fault and triple (see the command-line keys in main.c).
 *
 * All of this runs at CPL 3, where kvm_pvm executes natively; only the
 * exception handler (trap.c) runs at CPL 0.
 */
#include "fph.h"
#include "percpu.h"
#include "workload.h"

static u64 pages_for_bytes(u64 bytes) { return PAGE_ALIGN_UP(bytes) >> PAGE_SHIFT; }

/* Verify every live slot of a table; returns the number of bad words. */
static u64 verify_all(const char *who, const struct slot *tab, u64 n)
{
    u64 bad = 0;
    for (u64 i = 0; i < n; i++)
        if (tab[i].pfn)
            bad += page_verify(who, &tab[i]);
    return bad;
}

/* ---------------------------------------------------------------- hello */

void run_hello(void)
{
    print("Hello from the kvmlite guest!\n");
    print("hello: RAM %lu MiB (%lu pages), free-page hints %s\n",
          (unsigned long)(g_bi->ram_size >> 20), (unsigned long)g_fph.npages,
          g_fph.registered ? "registered"
          : g_fph.device_present ? "refused by the device" : "unavailable (no device)");
}

/* ------------------------------------------------- workloads on every CPU */

int workload_on_every_cpu(void)
{
    switch (g_cfg.workload) {
    case WL_HELLO: case WL_CHURN: case WL_FILL: case WL_SLEEP: case WL_IPI:
        return 1;
    default:
        return 0;
    }
}

/* ---------------------------------------------------------------- churn */

/*
 * churn pages=N rounds=R free=PCT seed=S
 *
 * Each CPU has N slots; every round fills each empty slot with a newly
 * allocated page, frees PCT% of the live slots at random, then verifies
 * every live page.  rounds=0 runs until the host sets HOST_EVENTS bit 0 (the
 * migration soak), printing a progress line every 1024 rounds instead of
 * every round.  Freed pages keep their old contents and are handed out again
 * later by the next-fit allocator, so a page's bit flips many times during a
 * run - which is what a migration running alongside has to get right.  With
 * several CPUs they take and free pages in the one bitmap at once, often in
 * the same 64-bit word.
 */
static void prepare_churn(void)
{
    u64 n = g_cfg.pages;
    u64 tab_pages = pages_for_bytes(n * sizeof(struct slot));
    if (n * g_ncpus > g_fph.free_count) {
        print("churn: pages=%lu on %u CPU(s) exceeds the %lu free pages of this guest (use a larger --memory)\n",
              (unsigned long)n, g_ncpus, (unsigned long)g_fph.free_count);
        guest_exit(EXIT_BAD_CMDLINE);
    }
    for (unsigned c = 0; c < g_ncpus; c++) {
        u64 tab_pfn = page_alloc_contig(tab_pages);
        if (tab_pfn == NO_PAGE) {
            print("churn: pages=%lu: no room for the %lu-page slot table\n",
                  (unsigned long)n, (unsigned long)tab_pages);
            guest_exit(EXIT_BAD_CMDLINE);
        }
        struct work *w = &g_percpu[c].work;
        w->tab = pfn_to_ptr(tab_pfn);
        w->n = n;
        memset(w->tab, 0, tab_pages * PAGE_SIZE);   /* the table's pages are active now */
        if (c == 0)
            print("churn: pages=%lu rounds=%lu free=%lu%% seed=%lu, table %lu pages at pfn 0x%lx\n",
                  (unsigned long)n, (unsigned long)g_cfg.rounds, (unsigned long)g_cfg.free_pct,
                  (unsigned long)g_cfg.seed, (unsigned long)tab_pages, (unsigned long)tab_pfn);
    }
}

static void run_churn(void)
{
    struct percpu *pc = this_cpu();
    const char *who = cpu_tag("churn");
    struct slot *tab = pc->work.tab;
    u64 n = pc->work.n;
    /* xorshift needs != 0; each CPU its own sequence */
    u64 rng = (g_cfg.seed ? g_cfg.seed : 0x2545F4914F6CDD1DULL) + pc->index * 0x9E3779B97F4A7C15ULL;
    if (!rng)
        rng = 1;
    u64 live = 0;

    const int forever = g_cfg.rounds == 0;
    for (u64 r = 1; forever || r <= g_cfg.rounds; r++) {
        /* One port read per round: a round of thousands of page writes dwarfs it. */
        if (forever && (fph_host_events() & FPH_EVENT_FINISH))
            break;
        /* 1. fill every empty slot with a new page */
        for (u64 i = 0; i < n; i++) {
            if (tab[i].pfn)
                continue;
            u64 pfn = page_alloc();         /* bit cleared here, before ... */
            if (pfn == NO_PAGE) {           /* impossible: n * CPUs <= free pages */
                print("%s: ERROR allocator ran dry with %lu live\n", who, (unsigned long)live);
                g_stats.errors++;
                finish();
            }
            u32 gen = next_gen();
            tab[i].pfn = (u32)pfn;
            tab[i].gen = gen;
            tab[i].csum = page_write(pfn, gen);  /* ... the data goes in */
            live++;
        }
        g_stats.live = live;

        /* 2. free PCT% of the live slots, picked pseudo-randomly */
        u64 k = live * g_cfg.free_pct / 100;
        for (u64 j = 0; j < k; j++) {
            u64 idx = xorshift64(&rng) % n;
            while (!tab[idx].pfn)           /* probe to the next live slot */
                idx = (idx + 1 == n) ? 0 : idx + 1;
            if (page_free(tab[idx].pfn) < 0) {
                print("%s: ERROR double free of pfn 0x%x\n", who, tab[idx].pfn);
                g_stats.errors++;
            }
            tab[idx].pfn = 0;               /* stale data stays in the page */
            live--;
        }
        g_stats.live = live;

        /* 3. every page still live must hold exactly what was written; a page
         *    that does not is counted once and dropped (its slot refilled next
         *    round), so `corrupted` counts pages, not re-checks of one page */
        for (u64 i = 0; i < n; i++) {
            if (tab[i].pfn && page_verify(who, &tab[i])) {
                g_stats.corrupted++;
                page_free(tab[i].pfn);
                tab[i].pfn = 0;
                live--;
            }
        }
        g_stats.live = live;
        if (!forever || (r & 1023) == 0)
            print("%s: round %lu/%lu live=%lu free=%lu verified=%lu errors=%lu\n",
                  who, (unsigned long)r, (unsigned long)g_cfg.rounds, (unsigned long)live,
                  (unsigned long)g_fph.free_count, (unsigned long)g_stats.verified,
                  (unsigned long)g_stats.errors);
    }
    verify_all(who, tab, n);
}

/* ----------------------------------------------------------------- fill */

/*
 * fill live=PCT stale=PCT dirty=PAGES_PER_SEC seconds=N
 * (live_pages=N instead of live=PCT keeps N pages live, whatever the RAM size)
 *
 * Builds the state a migration test wants: live% of RAM holds data that
 * must arrive intact, stale% of RAM holds old data in pages marked free
 * (a hint-aware migration skips them), the rest was never touched.  Then
 * keeps re-writing live pages at a steady rate so that pre-copy rounds
 * always find dirty pages, until the host sets HOST_EVENTS bit 0 or the
 * time limit passes, and finally checks every live page.  With several CPUs
 * the live and stale pages and the dirtying rate are shared out among them;
 * each writes and checks its own.
 */
static void prepare_fill(void)
{
    u64 ram_pages = g_fph.npages;
    u64 nlive = g_cfg.live_pages ? g_cfg.live_pages : ram_pages * g_cfg.live_pct / 100;
    u64 nstale = ram_pages * g_cfg.stale_pct / 100;
    /* tables: each CPU's share, rounded up, plus a page each for the rounding */
    u64 overhead = pages_for_bytes(nlive * sizeof(struct slot)) + pages_for_bytes(nstale * sizeof(u32))
                   + 2 * g_ncpus;
    u64 avail = g_fph.free_count > overhead ? g_fph.free_count - overhead : 0;

    /* The image, bitmap and tables take a little RAM: trim stale first, then live. */
    if (nlive + nstale > avail) {
        u64 want_live = nlive, want_stale = nstale;
        if (nlive > avail)
            nlive = avail;
        nstale = avail - nlive;
        print("fill: only %lu pages available: live %lu -> %lu, stale %lu -> %lu\n",
              (unsigned long)avail, (unsigned long)want_live, (unsigned long)nlive,
              (unsigned long)want_stale, (unsigned long)nstale);
    }
    for (unsigned c = 0; c < g_ncpus; c++) {
        struct work *w = &g_percpu[c].work;
        /* CPU 0 takes the remainders */
        w->n = nlive / g_ncpus + (c == 0 ? nlive % g_ncpus : 0);
        w->nstale = nstale / g_ncpus + (c == 0 ? nstale % g_ncpus : 0);
        w->dirty = g_cfg.dirty / g_ncpus + (c == 0 ? g_cfg.dirty % g_ncpus : 0);
        u64 live_tab_pages = pages_for_bytes(w->n * sizeof(struct slot));
        w->stale_pages = pages_for_bytes(w->nstale * sizeof(u32));
        u64 tab_pfn = page_alloc_contig(live_tab_pages);
        w->stale_pfn = page_alloc_contig(w->stale_pages);
        if ((w->n && tab_pfn == NO_PAGE) || (w->nstale && w->stale_pfn == NO_PAGE)) {
            print("fill: no room for the page tables of live=%lu stale=%lu\n",
                  (unsigned long)w->n, (unsigned long)w->nstale);
            guest_exit(EXIT_BAD_CMDLINE);
        }
        w->tab = pfn_to_ptr(tab_pfn);
        w->stale = pfn_to_ptr(w->stale_pfn);
    }
}

static void run_fill(void)
{
    struct percpu *pc = this_cpu();
    struct work *w = &pc->work;
    const char *who = cpu_tag("fill");
    struct slot *tab = w->tab;
    u64 nlive = w->n;

    /* live pages: allocated, written, kept */
    for (u64 i = 0; i < nlive; i++) {
        u64 pfn = page_alloc();
        u32 gen = next_gen();
        tab[i].pfn = (u32)pfn;
        tab[i].gen = gen;
        tab[i].csum = page_write(pfn, gen);
    }
    g_stats.live = nlive;
    /* stale pages: allocated, written, then all freed with their data left in them */
    for (u64 i = 0; i < w->nstale; i++) {
        u64 pfn = page_alloc();
        w->stale[i] = (u32)pfn;
        page_write(pfn, next_gen());
    }
    for (u64 i = 0; i < w->nstale; i++)
        page_free(w->stale[i]);
    for (u64 i = 0; i < w->stale_pages && w->stale_pfn != NO_PAGE; i++)
        page_free(w->stale_pfn + i);

    u64 seconds = g_cfg.seconds;
    if (!seconds && !g_fph.device_present) {
        seconds = 5;    /* nobody can ask us to stop: don't run forever */
        if (pc->index == 0)
            print("fill: no free-page-hint device to say when to stop; running %lu s\n",
                  (unsigned long)seconds);
    }
    /* All CPUs have written their pages: CPU 0 says so, for all of them. */
    __atomic_store_n(&w->ready, 1, __ATOMIC_RELEASE);
    if (pc->index == 0) {
        u64 total_live = 0, total_stale = 0;
        for (unsigned c = 0; c < g_ncpus; c++) {
            while (!__atomic_load_n(&g_percpu[c].work.ready, __ATOMIC_ACQUIRE))
                cpu_relax();
            total_live += g_percpu[c].work.n;
            total_stale += g_percpu[c].work.nstale;
        }
        print("fill: ready live=%lu stale=%lu free=%lu dirty=%lu/s seconds=%lu (%lu ms)\n",
              (unsigned long)total_live, (unsigned long)total_stale, (unsigned long)g_fph.free_count,
              (unsigned long)g_cfg.dirty, (unsigned long)seconds,
              (unsigned long)tsc_to_ms(rdtsc() - g_stats.start_tsc));
    }

    /*
     * The dirtying loop.  Pacing: by time t the loop should have re-written
     * dirty * t pages; it catches up in bursts of at most 64 pages so that
     * the host-event poll below still happens about once a millisecond.
     * Each re-write first verifies the page's previous generation.
     * Polling HOST_EVENTS is a port read = a VM exit (~10 us): at 1 kHz it
     * costs ~1% of the CPU, in a tight loop it would cost all of it.
     */
    const u64 dirty = w->dirty;
    const u64 poll_cycles = g_tsc_khz;              /* 1 ms */
    const u64 t0 = rdtsc();
    const u64 deadline = seconds ? t0 + seconds * g_tsc_khz * 1000 : 0;
    u64 next_poll = t0, next_report = t0 + 1000 * g_tsc_khz;
    u64 dirtied = 0, idx = 0, polls = 0;
    const char *why = "time limit";
    for (;;) {
        u64 now = rdtsc();
        u64 us = (now - t0) * 1000 / g_tsc_khz;
        u64 due = us * dirty / 1000000;
        for (int burst = 0; nlive && dirtied < due && burst < 64; burst++) {
            struct slot *s = &tab[idx];
            page_verify(who, s);
            s->gen = next_gen();
            s->csum = page_write(s->pfn, s->gen);
            dirtied++;
            if (++idx == nlive)
                idx = 0;
        }
        if (now >= next_poll) {
            next_poll = now + poll_cycles;
            polls++;
            if (fph_host_events() & FPH_EVENT_FINISH) {
                why = "host asked to finish";
                break;
            }
        }
        if (deadline && now >= deadline)
            break;
        if (now >= next_report) {
            next_report += 1000 * g_tsc_khz;
            print("%s: t=%lus dirtied=%lu verified=%lu errors=%lu\n", who,
                  (unsigned long)((now - t0) / (1000 * g_tsc_khz)), (unsigned long)dirtied,
                  (unsigned long)g_stats.verified, (unsigned long)g_stats.errors);
        }
        /* Nothing to do until the next page is due or the next poll: sleep
         * (LAPIC timer) or idle (idle device) rather than spin, so a paced
         * guest leaves the host's CPUs to the VMM (a live migration runs beside it). */
        u64 next_page = t0 + (dirtied + 1) * 1000000 / (dirty ? dirty : 1) * g_tsc_khz / 1000;
        u64 wake = next_poll < next_page ? next_poll : next_page;
        u64 after = rdtsc();
        if (g_cfg.idle && (g_lapic || g_ports.idle) && nlive && wake > after + g_tsc_khz / 10)  /* > 100 us away */
            sleep_until(wake);
        else
            cpu_relax();
    }
    u64 ms = tsc_to_ms(rdtsc() - t0);
    print("%s: stopping (%s) after %lu ms: dirtied %lu pages (%lu/s, target %lu/s), %lu polls\n",
          who, why, (unsigned long)ms, (unsigned long)dirtied,
          (unsigned long)(ms ? dirtied * 1000 / ms : 0), (unsigned long)dirty,
          (unsigned long)polls);
    verify_all(who, tab, nlive);
}

/* ---------------------------------------------------------------- sleep */

/*
 * sleep ms=M count=K
 *
 * Each CPU sleeps K times for M ms: with the LAPIC, TSC-deadline timer and
 * HLT (sleep_until); without, the idle device.  It never wakes early; how
 * late it wakes, measured with its own TSC, goes in its summary line.
 */
#define SLEEP_SAMPLES 256
static u64 g_late_us[MAX_CPUS][SLEEP_SAMPLES];

/* The median of a[0..n), which it sorts: an insertion sort (n is at most a few hundred). */
static u64 median_of(u64 *a, u64 n)
{
    for (u64 i = 1; i < n; i++)
        for (u64 j = i; j > 0 && a[j - 1] > a[j]; j--) {
            u64 t = a[j];
            a[j] = a[j - 1];
            a[j - 1] = t;
        }
    return n ? a[n / 2] : 0;
}

static void run_sleep(void)
{
    struct percpu *pc = this_cpu();
    const char *who = cpu_tag("sleep");
    u64 n = g_cfg.count, cycles = g_cfg.ms * g_tsc_khz, early = 0, sum = 0, max = 0;
    u64 irqs0 = pc->irqs;
    for (u64 i = 0; i < n; i++) {
        u64 t0 = rdtsc();
        sleep_until(t0 + cycles);
        u64 late = rdtsc() - (t0 + cycles);
        if ((i64)late < 0) {
            early++;
            late = 0;
        }
        u64 us = late * 1000 / g_tsc_khz;
        g_late_us[pc->index][i % SLEEP_SAMPLES] = us;
        sum += us;
        if (us > max)
            max = us;
    }
    u64 median = median_of(g_late_us[pc->index], n < SLEEP_SAMPLES ? n : SLEEP_SAMPLES);
    print("%s: %lu sleeps of %lu ms with %s: late median %lu us, mean %lu us, max %lu us, early %lu, timer interrupts %lu\n",
          who, (unsigned long)n, (unsigned long)g_cfg.ms,
          g_lapic ? "the LAPIC timer" : g_ports.idle ? "the idle device" : "a spin",
          (unsigned long)median, (unsigned long)(n ? sum / n : 0), (unsigned long)max,
          (unsigned long)early, (unsigned long)(pc->irqs - irqs0));
    if (early) {
        print("%s: ERROR woke %lu times before the deadline\n", who, (unsigned long)early);
        g_stats.errors++;
    }
}

/* ------------------------------------------------------------------ ipi */

/*
 * ipi count=K
 *
 * CPU 0 wakes each other CPU K times with an IPI.  The other CPU halts with
 * no timer armed, so only an interrupt can wake it; it records when, and
 * CPU 0 waits for that before the next one.  Latency = its wake-up TSC - CPU
 * 0's TSC before the send (KVM keeps the vCPUs' TSCs in step).
 */
#define IPI_TIMEOUT_MS 1000

static void ipi_target(void)
{
    struct percpu *pc = this_cpu();
    u64 seen = 0;
    while (seen < g_cfg.count) {
        u64 irqs = pc->irqs;
        u64 want = __atomic_load_n(&pc->wake, __ATOMIC_ACQUIRE);
        if (want == seen) {
            hlt_trapped(irqs);              /* nothing armed: only an IPI wakes it */
            continue;
        }
        pc->woke_tsc = rdtsc();
        seen = want;
        __atomic_store_n(&pc->ipi_woken, seen, __ATOMIC_RELEASE);
    }
}

static u64 g_ipi_us[SLEEP_SAMPLES];

static void ipi_sender(void)
{
    u64 lat_sum = 0, lat_max = 0, woken = 0, sent = 0;
    for (unsigned c = 1; c < g_ncpus; c++) {
        struct percpu *t = &g_percpu[c];
        for (u64 k = 1; k <= g_cfg.count; k++) {
            sleep_until(rdtsc() + g_tsc_khz);   /* 1 ms: let it get back into HLT */
            __atomic_store_n(&t->wake, k, __ATOMIC_RELEASE);
            u64 t0 = rdtsc();
            send_ipi(c);
            sent++;
            u64 deadline = t0 + IPI_TIMEOUT_MS * g_tsc_khz;
            while (__atomic_load_n(&t->ipi_woken, __ATOMIC_ACQUIRE) != k && rdtsc() < deadline)
                cpu_relax();
            if (t->ipi_woken != k) {
                print("ipi: ERROR CPU %u did not wake within %u ms of IPI %lu\n", c, IPI_TIMEOUT_MS,
                      (unsigned long)k);
                g_stats.errors++;
                return;
            }
            u64 us = (t->woke_tsc - t0) * 1000 / g_tsc_khz;
            g_ipi_us[woken % SLEEP_SAMPLES] = us;
            woken++;
            lat_sum += us;
            if (us > lat_max)
                lat_max = us;
        }
    }
    u64 median = median_of(g_ipi_us, woken < SLEEP_SAMPLES ? woken : SLEEP_SAMPLES);
    print("ipi: %lu IPIs sent, %lu woke their CPU: latency median %lu us, mean %lu us, max %lu us\n",
          (unsigned long)sent, (unsigned long)woken, (unsigned long)median,
          (unsigned long)(woken ? lat_sum / woken : 0), (unsigned long)lat_max);
}

/* ---------------------------------------------------------- dispatch */

void prepare_workload(void)
{
    switch (g_cfg.workload) {
    case WL_CHURN: prepare_churn(); break;
    case WL_FILL: prepare_fill(); break;
    case WL_SLEEP:
        if (!g_cfg.count)
            g_cfg.count = 10;
        if (!g_cfg.ms)
            g_cfg.ms = 10;
        break;
    case WL_IPI:
        if (g_ncpus < 2 || !g_lapic) {
            print("ipi: needs 2 or more CPUs with a LAPIC (kvmlite run --smp 2)\n");
            guest_exit(EXIT_BAD_CMDLINE);
        }
        if (!g_cfg.count)
            g_cfg.count = 100;
        break;
    default: break;
    }
}

/* The calling CPU's share (CPU 0 and every AP). */
void run_workload_cpu(void)
{
    struct percpu *pc = this_cpu();
    switch (g_cfg.workload) {
    case WL_HELLO:
        if (pc->index)
            print("hello: CPU %lu up at CPL 3 (started by %s)\n", (unsigned long)pc->index, pc->how);
        else
            run_hello();
        break;
    case WL_CHURN: run_churn(); break;
    case WL_FILL: run_fill(); break;
    case WL_SLEEP: run_sleep(); break;
    case WL_IPI:
        if (pc->index)
            ipi_target();
        else
            ipi_sender();
        break;
    default: break;
    }
}

void run_workload_ap(void)
{
    if (workload_on_every_cpu())
        run_workload_cpu();
}

/* ---------------------------------------------------------------- fault */

void run_fault(void)
{
    /* The VMM's page tables map RAM only; 1 GiB past its end is not present. */
    volatile u64 *p = (volatile u64 *)(uintptr_t)(g_bi->ram_size + (1ULL << 30));
    print("fault: writing unmapped address %p from ring 3; expect #PF (exception 14)\n", (void *)p);
    *p = 0xdead;
    print("fault: ERROR the write did not fault\n");
    g_stats.errors++;
    finish();
}

/* --------------------------------------------------------------- triple */

void run_triple(void)
{
    /*
     * With g_triple_armed set, the exception handler loads an IDT of limit 0
     * and executes UD2 at CPL 0: the #UD cannot be delivered -> #GP cannot
     * -> #DF cannot -> the CPU shuts down (triple fault), which KVM reports
     * as KVM_EXIT_SHUTDOWN.  The first exception is a UD2 here in ring 3.
     * (INT 0x40 - outside the IDT, so #GP - would do on hardware, but
     * kvm_pvm answers INT n at CPL 3 with #UD; UD2 means the same everywhere.)
     */
    print("triple: UD2 with the exception handler armed to load an empty IDT; expect a shutdown\n");
    g_triple_armed = 1;
    __asm__ volatile("ud2" ::: "memory");
    print("triple: ERROR still running\n");
    g_stats.errors++;
    finish();
}
