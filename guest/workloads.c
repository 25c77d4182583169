/*
 * workloads.c - what the guest does once it is up: hello, churn, fill,
 * fault and triple (see the command-line keys in main.c).
 *
 * All of this runs at CPL 3, where kvm_pvm executes natively; only the
 * exception handler (trap.c) runs at CPL 0.
 */
#include "fph.h"
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
    finish();
}

/* ---------------------------------------------------------------- churn */

/*
 * churn pages=N rounds=R free=PCT seed=S
 *
 * N slots; every round fills each empty slot with a newly allocated page,
 * frees PCT% of the live slots at random, then verifies every live page.
 * rounds=0 runs until the host sets HOST_EVENTS bit 0 (the migration soak),
 * printing a progress line every 1024 rounds instead of every round.
 * Freed pages keep their old contents and are handed out again later by
 * the next-fit allocator, so a page's bit flips many times during a run -
 * which is what a migration running alongside has to get right.
 */
void run_churn(void)
{
    u64 n = g_cfg.pages;
    u64 tab_pages = pages_for_bytes(n * sizeof(struct slot));
    u64 tab_pfn = page_alloc_contig(tab_pages);
    if (tab_pfn == NO_PAGE) {
        print("churn: pages=%lu: no room for the %lu-page slot table\n",
              (unsigned long)n, (unsigned long)tab_pages);
        guest_exit(EXIT_BAD_CMDLINE);
    }
    if (n > g_fph.free_count) {
        print("churn: pages=%lu exceeds the %lu free pages of this guest (use a larger --memory)\n",
              (unsigned long)n, (unsigned long)g_fph.free_count);
        guest_exit(EXIT_BAD_CMDLINE);
    }
    struct slot *tab = pfn_to_ptr(tab_pfn);
    memset(tab, 0, tab_pages * PAGE_SIZE);      /* the table's pages are active now */

    u64 rng = g_cfg.seed ? g_cfg.seed : 0x2545F4914F6CDD1DULL;  /* xorshift needs != 0 */
    u64 live = 0;
    print("churn: pages=%lu rounds=%lu free=%lu%% seed=%lu, table %lu pages at pfn 0x%lx\n",
          (unsigned long)n, (unsigned long)g_cfg.rounds, (unsigned long)g_cfg.free_pct,
          (unsigned long)g_cfg.seed, (unsigned long)tab_pages, (unsigned long)tab_pfn);

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
            if (pfn == NO_PAGE) {           /* impossible: n <= free pages */
                print("churn: ERROR allocator ran dry with %lu live\n", (unsigned long)live);
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
                print("churn: ERROR double free of pfn 0x%x\n", tab[idx].pfn);
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
            if (tab[i].pfn && page_verify("churn", &tab[i])) {
                g_stats.corrupted++;
                page_free(tab[i].pfn);
                tab[i].pfn = 0;
                live--;
            }
        }
        g_stats.live = live;
        if (!forever || (r & 1023) == 0)
            print("churn: round %lu/%lu live=%lu free=%lu verified=%lu errors=%lu\n",
                  (unsigned long)r, (unsigned long)g_cfg.rounds, (unsigned long)live,
                  (unsigned long)g_fph.free_count, (unsigned long)g_stats.verified,
                  (unsigned long)g_stats.errors);
    }
    verify_all("churn", tab, n);
    finish();
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
 * time limit passes, and finally checks every live page.
 */
void run_fill(void)
{
    u64 ram_pages = g_fph.npages;
    u64 nlive = g_cfg.live_pages ? g_cfg.live_pages : ram_pages * g_cfg.live_pct / 100;
    u64 nstale = ram_pages * g_cfg.stale_pct / 100;
    u64 live_tab_pages = pages_for_bytes(nlive * sizeof(struct slot));
    u64 stale_tab_pages = pages_for_bytes(nstale * sizeof(u32));
    u64 overhead = live_tab_pages + stale_tab_pages;
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
    u64 tab_pfn = page_alloc_contig(live_tab_pages);
    u64 stale_pfn = page_alloc_contig(stale_tab_pages);
    if ((nlive && tab_pfn == NO_PAGE) || (nstale && stale_pfn == NO_PAGE)) {
        print("fill: no room for the page tables of live=%lu stale=%lu\n",
              (unsigned long)nlive, (unsigned long)nstale);
        guest_exit(EXIT_BAD_CMDLINE);
    }
    struct slot *tab = pfn_to_ptr(tab_pfn);
    u32 *stale = pfn_to_ptr(stale_pfn);

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
    for (u64 i = 0; i < nstale; i++) {
        u64 pfn = page_alloc();
        stale[i] = (u32)pfn;
        page_write(pfn, next_gen());
    }
    for (u64 i = 0; i < nstale; i++)
        page_free(stale[i]);
    for (u64 i = 0; i < stale_tab_pages && stale_pfn != NO_PAGE; i++)
        page_free(stale_pfn + i);

    u64 seconds = g_cfg.seconds;
    if (!seconds && !g_fph.device_present) {
        seconds = 5;    /* nobody can ask us to stop: don't run forever */
        print("fill: no free-page-hint device to say when to stop; running %lu s\n",
              (unsigned long)seconds);
    }
    print("fill: ready live=%lu stale=%lu free=%lu dirty=%lu/s seconds=%lu (%lu ms)\n",
          (unsigned long)nlive, (unsigned long)nstale, (unsigned long)g_fph.free_count,
          (unsigned long)g_cfg.dirty, (unsigned long)seconds,
          (unsigned long)tsc_to_ms(rdtsc() - g_stats.start_tsc));

    /*
     * The dirtying loop.  Pacing: by time t the loop should have re-written
     * dirty * t pages; it catches up in bursts of at most 64 pages so that
     * the host-event poll below still happens about once a millisecond.
     * Each re-write first verifies the page's previous generation.
     * Polling HOST_EVENTS is a port read = a VM exit (~10 us): at 1 kHz it
     * costs ~1% of the CPU, in a tight loop it would cost all of it.
     */
    const u64 poll_cycles = g_tsc_khz;              /* 1 ms */
    const u64 t0 = rdtsc();
    const u64 deadline = seconds ? t0 + seconds * g_tsc_khz * 1000 : 0;
    u64 next_poll = t0, next_report = t0 + 1000 * g_tsc_khz;
    u64 dirtied = 0, idx = 0, polls = 0;
    const char *why = "time limit";
    for (;;) {
        u64 now = rdtsc();
        u64 us = (now - t0) * 1000 / g_tsc_khz;
        u64 due = us * g_cfg.dirty / 1000000;
        for (int burst = 0; nlive && dirtied < due && burst < 64; burst++) {
            struct slot *s = &tab[idx];
            page_verify("fill", s);
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
            print("fill: t=%lus dirtied=%lu verified=%lu errors=%lu\n",
                  (unsigned long)((now - t0) / (1000 * g_tsc_khz)), (unsigned long)dirtied,
                  (unsigned long)g_stats.verified, (unsigned long)g_stats.errors);
        }
        /* Nothing to do until the next page is due or the next poll: idle
         * rather than spin, so a paced guest leaves the host's CPUs to the
         * VMM (a live migration runs beside it). */
        u64 next_page = t0 + (dirtied + 1) * 1000000 / (g_cfg.dirty ? g_cfg.dirty : 1)
                        * g_tsc_khz / 1000;
        u64 wake = next_poll < next_page ? next_poll : next_page;
        u64 after = rdtsc();
        if (g_cfg.idle && g_ports.idle && nlive && wake > after + g_tsc_khz / 10)  /* > 100 us away */
            idle_us((u32)((wake - after) * 1000 / g_tsc_khz));
        else
            cpu_relax();
    }
    u64 ms = tsc_to_ms(rdtsc() - t0);
    print("fill: stopping (%s) after %lu ms: dirtied %lu pages (%lu/s, target %lu/s), %lu polls\n",
          why, (unsigned long)ms, (unsigned long)dirtied,
          (unsigned long)(ms ? dirtied * 1000 / ms : 0), (unsigned long)g_cfg.dirty,
          (unsigned long)polls);
    verify_all("fill", tab, nlive);
    finish();
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
