/*
 * pages.c - the data pattern the workloads store in pages, and its check.
 *
 * Word i of a page written with generation g holds
 *
 *     (pfn << 32 | g) ^ (i * 0x9E3779B97F4A7C15)
 *
 * (the constant is 2^64 / golden ratio: consecutive words differ in many
 * bits).  The pfn makes a page copied to the wrong frame visible, the
 * generation makes a stale copy of the right frame visible, and the word
 * index makes a shifted or torn copy visible.  Computing it costs one
 * add and one xor per word, so writes run at memory speed.
 */
#include "fph.h"
#include "workload.h"

#define PATTERN_K 0x9E3779B97F4A7C15ULL
#define WORDS_PER_PAGE (PAGE_SIZE / 8)
#define MAX_REPORTED_ERRORS 16

static u32 g_gen;

u32 next_gen(void)
{
    if (++g_gen == 0)
        g_gen = 1;
    return g_gen;
}

u64 page_write(u64 pfn, u32 gen)
{
    u64 *p = pfn_to_ptr(pfn);     /* page_alloc() already marked it active */
    u64 base = pfn << 32 | gen, step = 0, sum = 0;
    u64 t0 = rdtsc();
    for (unsigned i = 0; i < WORDS_PER_PAGE; i++) {
        u64 v = base ^ step;
        p[i] = v;
        sum += v;
        step += PATTERN_K;      /* i * K without a multiply */
    }
    g_stats.write_cycles += rdtsc() - t0;
    g_stats.pages_written++;
    return sum;
}

u64 page_verify(const char *who, const struct slot *s)
{
    static u64 reported;
    const volatile u64 *p = pfn_to_ptr(s->pfn);
    u64 base = (u64)s->pfn << 32 | s->gen, step = 0, sum = 0, bad = 0;
    for (unsigned i = 0; i < WORDS_PER_PAGE; i++) {
        u64 want = base ^ step, got = p[i];
        sum += got;
        if (got != want) {
            bad++;
            if (reported < MAX_REPORTED_ERRORS) {
                reported++;
                print("%s: ERROR pfn 0x%x word %u: got 0x%016lx want 0x%016lx\n",
                      who, s->pfn, i, (unsigned long)got, (unsigned long)want);
            }
        }
        step += PATTERN_K;
    }
    if (!bad && sum != s->csum) {
        bad = 1;        /* cannot happen if every word matched; checks the bookkeeping */
        print("%s: ERROR pfn 0x%x checksum mismatch\n", who, s->pfn);
    }
    /* A page that holds live data must be marked active in the bitmap (abi.md rule 2). */
    if (page_is_free(s->pfn)) {
        bad++;
        print("%s: ERROR live pfn 0x%x is marked free in the bitmap\n", who, s->pfn);
    }
    g_stats.verified++;
    g_stats.errors += bad;
    return bad;
}
