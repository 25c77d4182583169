/*
 * hostile.c - workload=hostile mode=M: a guest that misuses the free-page-hint
 * device (docs/abi.md) on purpose.
 *
 *   outside   headers and bitmaps beyond the end of RAM
 *   overlap   bitmaps over the VMM's boot structures and over their own header
 *   huge      sizes and addresses that overflow 64-bit arithmetic
 *   flip      keeps data live and checked while it rewrites its registered
 *             header, unregisters, registers another bitmap and a bad one,
 *             over and over (a migration runs meanwhile)
 *   allfree   keeps data live but marks every heap page free (a lie): a
 *             migration sends none of it and the destination finds it gone
 *
 * Each REGISTER prints one line
 *     hostile: <attempt> header=0x<gpa> status=0x<STATUS> reason=<n>
 * and counts an error if STATUS is not the one docs/abi.md promises, so
 * status=ok in the summary means the VMM refused what it must.  The guest only
 * ever hurts itself: the VMM reads the header once, at REGISTER, and the
 * bitmap only inside RAM.
 */
#include "fph.h"
#include "workload.h"

#define REFUSED(reason) (FPH_STATUS_ERROR | (reason))
#define ALL_ONES        (~0ULL)

static u64 ram_size(void) { return g_fph.npages << PAGE_SHIFT; }
static u64 own_header(void) { return (u64)(uintptr_t)g_fph.hdr; }

/* A fresh page of our own (its bit cleared: we store into it). */
static void *scratch_page(void)
{
    u64 pfn = page_alloc();
    if (pfn == NO_PAGE) {
        print("hostile: ERROR no free page for a scratch header\n");
        g_stats.errors++;
        finish();
    }
    memset(pfn_to_ptr(pfn), 0, PAGE_SIZE);
    return pfn_to_ptr(pfn);
}

/* A header that is right in every field but the ones the caller then spoils. */
static struct fph_header *header_at(void *where, u64 base, u64 npages, u64 bitmap_gpa)
{
    struct fph_header *h = where;
    h->magic = FPH_MAGIC;
    h->version = FPH_VERSION;
    h->header_size = sizeof(struct fph_header);
    h->page_size = PAGE_SIZE;
    h->flags = 0;
    h->base_gpa = base;
    h->npages = npages;
    h->bitmap_gpa = bitmap_gpa;
    h->bitmap_size = (npages + 63) / 64 * 8;
    h->free_pages = 0;
    h->reserved = 0;
    return h;
}

/* REGISTER the header at `gpa`, print what the device said, check it against `want`. */
static u32 attempt(const char *what, u64 gpa, u32 want)
{
    u32 st = fph_register(gpa);
    u32 reason = (st & FPH_STATUS_ERROR) ? st & ~FPH_STATUS_ERROR : 0;
    print("hostile: %s header=0x%lx status=0x%x reason=%u\n", what, (unsigned long)gpa, st, reason);
    if (st != want) {
        print("hostile: ERROR %s: the device answered 0x%x, docs/abi.md says 0x%x\n", what, st, want);
        g_stats.errors++;
    }
    return st;
}

/* Every mode ends registered with its own, honest bitmap again. */
static void register_own(void)
{
    attempt("own-bitmap-again", own_header(), FPH_STATUS_REGISTERED);
}

/* ------------------------------------------------------------- outside */

static void mode_outside(void)
{
    u64 ram = ram_size(), all = g_fph.npages;
    char *page = scratch_page();
    u64 gpa = (u64)(uintptr_t)page;

    attempt("header-past-ram", ram, REFUSED(FPH_E_PLACEMENT));
    attempt("header-straddles-ram-end", ram - 32, REFUSED(FPH_E_PLACEMENT));
    attempt("header-at-top-of-address-space", ALL_ONES - 7, REFUSED(FPH_E_PLACEMENT));
    attempt("header-misaligned", gpa + 4, REFUSED(FPH_E_PLACEMENT));

    header_at(page, 0, all, ram);
    attempt("bitmap-past-ram", gpa, REFUSED(FPH_E_BITMAP));
    header_at(page, 0, all, ram - 8);
    attempt("bitmap-straddles-ram-end", gpa, REFUSED(FPH_E_BITMAP));
    header_at(page, ram, 64, gpa + 64);
    attempt("covered-pages-past-ram", gpa, REFUSED(FPH_E_RANGE));
    header_at(page, ram - PAGE_SIZE, 2, gpa + 64);
    attempt("covered-pages-straddle-ram-end", gpa, REFUSED(FPH_E_RANGE));
    register_own();
}

/* ------------------------------------------------------------- overlap */

static void mode_overlap(void)
{
    u64 all = g_fph.npages;
    char *page = scratch_page();
    u64 gpa = (u64)(uintptr_t)page;

    /*
     * Bitmaps over the VMM's boot area (docs/boot.md): after boot that RAM is
     * the guest's, and the VMM only ever reads a bitmap, so these are taken.
     * A guest that does this tells the VMM its page tables are free pages:
     * only it can lose by that, and the bitmap's own pages are always sent.
     */
    header_at(page, 0, all, g_bi->pagetable_gpa);
    attempt("bitmap-over-boot-page-tables", gpa, FPH_STATUS_REGISTERED);
    header_at(page, 0, all, g_bi->cmdline_gpa - PAGE_SIZE);   /* boot info, then the command line */
    attempt("bitmap-over-boot-info", gpa, FPH_STATUS_REGISTERED);
    fph_unregister();

    /* Bitmaps over their own header: refused. */
    header_at(page, 0, all, gpa);
    attempt("bitmap-starts-at-header", gpa, REFUSED(FPH_E_BITMAP));
    header_at(page, 0, all, gpa + 32);
    attempt("bitmap-inside-header", gpa, REFUSED(FPH_E_BITMAP));
    header_at(page + 64, 0, 1024, gpa);     /* 128 bytes of bitmap, header at +64 */
    attempt("bitmap-runs-into-header", gpa + 64, REFUSED(FPH_E_BITMAP));
    header_at(page + 64, 0, 512, gpa);      /* 64 bytes of bitmap, right below: fine */
    attempt("bitmap-just-below-header", gpa + 64, FPH_STATUS_REGISTERED);
    register_own();
}

/* ---------------------------------------------------------------- huge */

static void mode_huge(void)
{
    char *page = scratch_page();
    u64 gpa = (u64)(uintptr_t)page;
    struct fph_header *h;

    /* npages = 2^64 - 1: bitmap_size computed in 64 bits wraps to 0 ... */
    h = header_at(page, 0, ALL_ONES, gpa + 64);
    attempt("npages-2^64-1-bitmap-size-wrapped", gpa, REFUSED(FPH_E_BITMAP));
    /* ... and with the exact size, 2^61 bytes, the pages leave RAM */
    h->bitmap_size = 1ULL << 61;
    attempt("npages-2^64-1", gpa, REFUSED(FPH_E_RANGE));
    header_at(page, 0, 1ULL << 52, gpa + 64);     /* npages * 4096 = 2^64 = 0 in 64 bits */
    attempt("npages-times-page-size-wraps", gpa, REFUSED(FPH_E_RANGE));
    header_at(page, ALL_ONES - PAGE_SIZE + 1, 2, gpa + 64);   /* base + 2 pages wraps to 0x1000 */
    attempt("base-plus-pages-wraps", gpa, REFUSED(FPH_E_RANGE));
    header_at(page, 0, 0, gpa + 64);
    attempt("npages-zero", gpa, REFUSED(FPH_E_RANGE));
    header_at(page, 0, 64, ALL_ONES - 7);         /* 8 bytes of bitmap at 2^64 - 8 */
    attempt("bitmap-gpa-wraps", gpa, REFUSED(FPH_E_BITMAP));
    h = header_at(page, 0, 64, gpa + 64);
    h->bitmap_size = ALL_ONES - 7;
    attempt("bitmap-size-2^64-8", gpa, REFUSED(FPH_E_BITMAP));
    /* header_size is "at least 64": the VMM reads its 64 bytes and ignores the rest */
    h = header_at(page, 0, 64, gpa + 64);
    h->header_size = 0xffff;
    attempt("header-size-65535", gpa, FPH_STATUS_REGISTERED);
    register_own();
}

/* ------------------------------------------------ live pages for flip, allfree */

static struct slot *make_live(u64 n, u64 *tab_pages_out)
{
    u64 tab_pages = PAGE_ALIGN_UP(n * sizeof(struct slot)) >> PAGE_SHIFT;
    u64 tab_pfn = n + tab_pages + 16 <= g_fph.free_count ? page_alloc_contig(tab_pages) : NO_PAGE;
    if (tab_pfn == NO_PAGE) {
        print("hostile: pages=%lu does not fit in this guest's free pages (%lu)\n",
              (unsigned long)n, (unsigned long)g_fph.free_count);
        guest_exit(EXIT_BAD_CMDLINE);
    }
    struct slot *tab = pfn_to_ptr(tab_pfn);
    memset(tab, 0, tab_pages * PAGE_SIZE);
    for (u64 i = 0; i < n; i++) {
        u64 pfn = page_alloc();
        tab[i].pfn = (u32)pfn;
        tab[i].gen = next_gen();
        tab[i].csum = page_write(pfn, tab[i].gen);
    }
    g_stats.live = n;
    *tab_pages_out = tab_pages;
    return tab;
}

static u64 verify_live(const char *who, const struct slot *tab, u64 n)
{
    u64 bad = 0;
    for (u64 i = 0; i < n; i++)
        bad += page_verify(who, &tab[i]);
    return bad;
}

/* Until the host sets HOST_EVENTS bit 0 (or `seconds` pass): call step() about
 * once a millisecond, idling in between. */
static void until_finish(void (*step)(u64 tick))
{
    const u64 t0 = rdtsc();
    const u64 deadline = g_cfg.seconds ? t0 + g_cfg.seconds * g_tsc_khz * 1000 : 0;
    for (u64 tick = 0;; tick++) {
        if (fph_host_events() & FPH_EVENT_FINISH)
            break;
        if (deadline && rdtsc() >= deadline)
            break;
        step(tick);
        if (g_ports.idle)
            idle_us(1000);
        else
            for (u64 until = rdtsc() + g_tsc_khz; rdtsc() < until;)
                cpu_relax();
    }
}

/* ---------------------------------------------------------------- flip */

static struct {
    struct slot *tab;
    u64 n, next;            /* live slots; the next to re-write */
    u64 other_hdr;          /* a second, honest header + bitmap (all pages active) */
    u64 bad_hdr;            /* a header with the wrong magic */
    u64 cycles;
} flip;

static void flip_expect(u64 tick, const char *what, u32 st, u32 want)
{
    if (tick < 6)       /* the first cycle shows every step; later ones only mismatches */
        print("hostile: flip %s status=0x%x reason=%u\n", what, st,
              (st & FPH_STATUS_ERROR) ? st & ~FPH_STATUS_ERROR : 0);
    if (st != want) {
        print("hostile: ERROR flip %s: status 0x%x, want 0x%x\n", what, st, want);
        g_stats.errors++;
    }
}

/* The registered header as fph_init wrote it. */
static void restore_own_header(void)
{
    g_fph.hdr->base_gpa = 0;
    g_fph.hdr->npages = g_fph.npages;
    g_fph.hdr->bitmap_gpa = (u64)(uintptr_t)g_fph.bitmap;
}

static void flip_step(u64 tick)
{
    struct fph_header *own = g_fph.hdr;

    /* Keep data moving: re-write a few live pages, checking what they held. */
    for (int k = 0; k < 4 && flip.n; k++) {
        struct slot *s = &flip.tab[flip.next];
        page_verify("flip", s);
        s->gen = next_gen();
        s->csum = page_write(s->pfn, s->gen);
        flip.next = (flip.next + 1) % flip.n;
    }
    switch (tick % 6) {
    case 0:     /* rewrite the registered header: the VMM must not re-read it */
        own->base_gpa = ram_size();
        own->npages = ALL_ONES;
        own->bitmap_gpa = ALL_ONES - 7;
        flip_expect(tick, "header-rewritten-to-point-outside-ram", fph_read_status(),
                    FPH_STATUS_REGISTERED);
        break;
    case 1:
        restore_own_header();
        flip_expect(tick, "header-restored", fph_read_status(), FPH_STATUS_REGISTERED);
        break;
    case 2:
        flip_expect(tick, "unregister", fph_unregister(), FPH_STATUS_NONE);
        break;
    case 3:
        flip_expect(tick, "register-another-bitmap", fph_register(flip.other_hdr),
                    FPH_STATUS_REGISTERED);
        break;
    case 4:
        flip_expect(tick, "register-bad-magic", fph_register(flip.bad_hdr), REFUSED(FPH_E_MAGIC));
        break;
    case 5:
        flip_expect(tick, "register-own-bitmap", fph_register(own_header()), FPH_STATUS_REGISTERED);
        flip.cycles++;
        break;
    }
}

static void mode_flip(void)
{
    u64 tab_pages;
    flip.n = g_cfg.pages;
    flip.tab = make_live(flip.n, &tab_pages);

    /* The other bitmap says every page is active: honest, so no data may be lost. */
    u64 bm_pages = PAGE_ALIGN_UP(g_fph.nwords * 8) >> PAGE_SHIFT;
    u64 bm_pfn = page_alloc_contig(bm_pages);
    if (bm_pfn == NO_PAGE) {
        print("hostile: no room for a second bitmap\n");
        guest_exit(EXIT_BAD_CMDLINE);
    }
    memset(pfn_to_ptr(bm_pfn), 0, bm_pages * PAGE_SIZE);
    char *page = scratch_page();
    flip.other_hdr = (u64)(uintptr_t)page;
    flip.bad_hdr = flip.other_hdr + 128;
    header_at(page, 0, g_fph.npages, bm_pfn << PAGE_SHIFT);
    header_at(page + 128, 0, g_fph.npages, bm_pfn << PAGE_SHIFT)->magic = ~FPH_MAGIC;

    print("hostile: flip ready live=%lu\n", (unsigned long)flip.n);
    until_finish(flip_step);
    print("hostile: flip stopped after %lu cycles\n", (unsigned long)flip.cycles);
    restore_own_header();       /* whatever step it stopped at */
    register_own();
    verify_live("flip", flip.tab, flip.n);
}

/* ------------------------------------------------------------- allfree */

static void no_step(u64 tick) { (void)tick; }

static void mode_allfree(void)
{
    u64 tab_pages, n = g_cfg.pages;
    struct slot *tab = make_live(n, &tab_pages);
    u64 tab_pfn = (u64)(uintptr_t)tab >> PAGE_SHIFT;

    /* An honest copy of the bitmap, to put back before the final check. */
    u64 bytes = g_fph.nwords * 8;
    u64 copy_pages = PAGE_ALIGN_UP(bytes) >> PAGE_SHIFT;
    u64 copy_pfn = page_alloc_contig(copy_pages);
    if (copy_pfn == NO_PAGE) {
        print("hostile: no room for a copy of the bitmap\n");
        guest_exit(EXIT_BAD_CMDLINE);
    }
    u64 *copy = pfn_to_ptr(copy_pfn);
    memcpy(copy, g_fph.bitmap, bytes);

    /*
     * The lie: every heap page is free, the live ones included.  Only the
     * pages that record what the guest should find (the slot table and the
     * copy) stay active, so that it can tell afterwards what it lost.
     */
    u64 lied = 0;
    for (u64 pfn = g_fph.heap_start_pfn; pfn < g_fph.npages; pfn++) {
        if ((pfn >= tab_pfn && pfn < tab_pfn + tab_pages)
            || (pfn >= copy_pfn && pfn < copy_pfn + copy_pages)
            || fph_reserved(pfn))           /* the boot area: the page tables in use */
            continue;
        if (!page_is_free(pfn))
            lied++;
        g_fph.bitmap[pfn >> 6] |= 1ULL << (pfn & 63);
    }
    print("hostile: allfree ready live=%lu: every heap page marked free, %lu of them in use\n",
          (unsigned long)n, (unsigned long)lied);
    until_finish(no_step);

    memcpy(g_fph.bitmap, copy, bytes);      /* the truth again, for the checks below */
    u64 bad = verify_live("allfree", tab, n);
    print("hostile: allfree checked %lu live pages: %lu bad words\n", (unsigned long)n,
          (unsigned long)bad);
}

/* -------------------------------------------------------------------------- */

void run_hostile(void)
{
    if (!g_fph.registered) {
        print("hostile: needs the free-page-hint device (this VMM has none or refused the bitmap)\n");
        finish();
    }
    switch (g_cfg.hostile_mode) {
    case HOSTILE_OUTSIDE: mode_outside(); break;
    case HOSTILE_OVERLAP: mode_overlap(); break;
    case HOSTILE_HUGE:    mode_huge();    break;
    case HOSTILE_FLIP:    mode_flip();    break;
    case HOSTILE_ALLFREE: mode_allfree(); break;
    }
    finish();
}
