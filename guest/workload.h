/*
 * workload.h - configuration, statistics and the workloads' entry points.
 */
#ifndef GUEST_WORKLOAD_H
#define GUEST_WORKLOAD_H

#include "bootinfo.h"
#include "lib.h"

enum workload { WL_HELLO, WL_CHURN, WL_FILL, WL_FAULT, WL_TRIPLE, WL_HOSTILE, WL_SLEEP, WL_IPI };
enum hostile_mode { HOSTILE_OUTSIDE, HOSTILE_OVERLAP, HOSTILE_HUGE, HOSTILE_FLIP, HOSTILE_ALLFREE };

/* Command-line settings (main.c parses "key=value" tokens into these). */
struct config {
    enum workload workload;
    const char *workload_name;
    u64 pages;      /* churn: slots */
    u64 rounds;     /* churn: rounds */
    u64 free_pct;   /* churn: % of live slots freed per round */
    u64 seed;       /* churn: PRNG seed */
    u64 live_pct;   /* fill: % of RAM kept live */
    u64 live_pages; /* fill: pages kept live; overrides live_pct when not 0 */
    u64 stale_pct;  /* fill: % of RAM written then freed */
    u64 dirty;      /* fill: page re-writes per second */
    u64 seconds;    /* fill: run time, 0 = until the host asks to stop */
    u64 idle;       /* fill: 1 = idle through the idle device between paced writes, 0 = spin */
    enum hostile_mode hostile_mode;     /* hostile: what to misuse (hostile.c) */
    u64 cpus;       /* CPUs to use; 0 = what the boot info says (1 under Multiboot) */
    u64 sipi;       /* 1 = start CPUs with INIT-SIPI-SIPI even if the CPU-start device is there */
    u64 lapic;      /* Multiboot: 1 = use the LAPIC timer to sleep (kvmlite's boot info says itself) */
    u64 ms;         /* sleep: milliseconds per sleep */
    u64 count;      /* sleep: sleeps per CPU; ipi: IPIs per AP */
    u64 atomics;    /* 1 = bitmap bits change with LOCK BTS/BTR; 0 = plain read-modify-write (lab 8's race) */
};

/* What the summary line reports; also read by the (ring-0) exception handler. */
struct stats {
    u64 live;           /* pages holding workload data right now */
    u64 verified;       /* pages checked word by word, in total */
    u64 errors;         /* mismatching words + failed self-checks */
    u64 corrupted;      /* churn: live pages found not holding what was written */
    u64 pages_written;  /* whole-page pattern writes */
    u64 write_cycles;   /* TSC cycles spent inside those writes */
    u64 start_tsc;      /* when the workload began */
};

extern struct config g_cfg;
/* Each CPU counts its own (percpu.h); the summary adds them up. */
struct stats *this_stats(void);
#define g_stats (*this_stats())
extern const struct boot_info *g_bi;
extern u64 g_tsc_khz;               /* never 0 (defaults to 2 GHz) */
extern volatile int g_triple_armed; /* read by the exception handler, see trap.c */

/* One workload slot: a page and what was last written into it. */
struct slot {
    u32 pfn;        /* 0 = empty (pfn 0 is never handed out: it is below the heap) */
    u32 gen;        /* generation of the last write */
    u64 csum;       /* sum of the page's 512 words as written */
};

/* A CPU's share of a workload, set up by CPU 0 before the CPUs start on it
 * (contiguous allocations are CPU 0's alone: fph.h). */
struct work {
    struct slot *tab;   /* churn: its slots; fill: its live pages */
    u64 n;              /* entries of tab */
    u32 *stale;         /* fill: pages written then freed */
    u64 nstale;
    u64 stale_pfn, stale_pages;     /* fill: the stale table, freed after use */
    u64 dirty;          /* fill: its share of the page re-writes per second */
    volatile u32 ready; /* fill: its pages are written */
};

/* Fill a freshly allocated (or own) page with the pattern for (pfn, gen); returns its checksum. */
u64 page_write(u64 pfn, u32 gen);
/* Check a live page against its slot; returns the number of bad words (0 = good). */
u64 page_verify(const char *who, const struct slot *s);
/* A fresh generation number (never 0). */
u32 next_gen(void);

u64 tsc_to_ms(u64 cycles);

/* Print the KVMLITE-SUMMARY line (self-checks the bitmap count) and exit. */
NORETURN void finish(void);

void run_hello(void);
void run_fault(void);
void run_triple(void);
void run_hostile(void);

/* Workloads every CPU runs (workloads.c): CPU 0 prepares each CPU's share,
 * then every CPU runs its own, then CPU 0 (the others done) finishes. */
int workload_on_every_cpu(void);
void prepare_workload(void);
void run_workload_cpu(void);
void run_workload_ap(void);     /* what an AP does once released */

#endif
