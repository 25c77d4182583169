/*
 * fph.c - free-page bitmap and page allocator (docs/abi.md).
 *
 * Memory layout the guest builds at boot (all GPAs, identity-mapped):
 *
 *   0 .. image end            image, bss, stacks                 bits 0
 *   image end (page aligned)  struct fph_header (64 bytes)        bits 0
 *   header + 64               bitmap, ceil(npages/64) words       bits 0
 *   heap start .. RAM end     pages the allocator hands out       bits 1 when free
 *   the VMM's boot area       page tables, boot info (top of RAM) bits 0
 *
 * The correctness rule this file exists for (US patent 9552233, claim 1):
 * a page's bit is cleared - the page is marked active - BEFORE any data is
 * stored into it.  page_alloc() clears the bit with a locked instruction,
 * which neither the compiler (it is an asm with a "memory" clobber) nor the
 * CPU (locked instructions are full barriers) lets the caller's first store
 * overtake; so the VMM thread that reads RAM concurrently can never see data
 * in a page whose bit still says "free".  Symmetrically, page_free() sets the
 * bit with a locked instruction after the caller's last store.
 */
#include "fph.h"
#include "percpu.h"

struct fph_state g_fph;

static inline u16 fph_reg(unsigned off) { return (u16)(g_ports.fph + off); }

/* The header's count is informational: with several CPUs the last writer may
 * store an older count; fph_sync_header() at a quiet moment makes it exact. */
static void header_sync(void)
{
    g_fph.hdr->free_pages = g_fph.free_count;
}

void fph_sync_header(void)
{
    header_sync();
}

void fph_init(u64 ram_size, u64 image_end, u64 reserved_start, u64 reserved_end, int device_flag)
{
    struct fph_state *s = &g_fph;
    u64 npages = ram_size >> PAGE_SHIFT;        /* a partial last page is not RAM we use */
    u64 nwords = (npages + 63) / 64;
    u64 hdr_gpa = PAGE_ALIGN_UP(image_end);
    u64 bitmap_gpa = hdr_gpa + sizeof(struct fph_header);   /* 8-byte aligned, no overlap */
    u64 heap_start = PAGE_ALIGN_UP(bitmap_gpa + nwords * 8);

    s->hdr = (struct fph_header *)(uintptr_t)hdr_gpa;
    s->bitmap = (u64 *)(uintptr_t)bitmap_gpa;
    s->npages = npages;
    s->nwords = nwords;
    s->heap_start_pfn = heap_start >> PAGE_SHIFT;
    this_cpu()->cursor = s->heap_start_pfn / 64;

    if (s->heap_start_pfn >= npages) {
        print("guest: RAM (%lu bytes) too small for image + bitmap\n", (unsigned long)ram_size);
        guest_exit(EXIT_BAD_CMDLINE);
    }

    /*
     * Bits: 0 below the heap, 1 from the heap start to the last RAM page,
     * 0 for the padding bits past npages (so they are never allocated).
     * Fill whole words, then patch the two partial words at the edges.
     */
    u64 first = s->heap_start_pfn, end = npages;
    u64 fw = first / 64, ew = end / 64;
    for (u64 w = 0; w < nwords; w++)
        s->bitmap[w] = (w < fw) ? 0 : ~0ULL;
    s->bitmap[fw] &= ~0ULL << (first & 63);         /* clear bits below the heap start */
    if (end & 63)
        s->bitmap[ew] &= (1ULL << (end & 63)) - 1;  /* clear padding bits past RAM */
    s->free_count = end - first;
    /* The boot area (above the image since boot protocol 2) is not ours to hand out. */
    s->reserved_start_pfn = reserved_start >> PAGE_SHIFT;
    s->reserved_end_pfn = PAGE_ALIGN_UP(reserved_end) >> PAGE_SHIFT;
    for (u64 pfn = s->reserved_start_pfn; pfn < s->reserved_end_pfn && pfn < end; pfn++) {
        if (pfn >= first && page_is_free(pfn)) {
            s->bitmap[pfn >> 6] &= ~(1ULL << (pfn & 63));
            s->free_count--;
        }
    }

    struct fph_header *h = s->hdr;
    h->magic = FPH_MAGIC;
    h->version = FPH_VERSION;
    h->header_size = sizeof(struct fph_header);
    h->page_size = PAGE_SIZE;
    h->flags = 0;
    h->base_gpa = 0;
    h->npages = npages;
    h->bitmap_gpa = bitmap_gpa;
    h->bitmap_size = nwords * 8;
    h->free_pages = s->free_count;
    h->reserved = 0;

    /* Rule 1: header and bitmap are complete before the VMM is told where they are. */
    barrier();
    s->device_present = device_flag && inl(fph_reg(FPH_REG_ID)) == FPH_ID;
    if (!s->device_present) {
        print("guest: no free-page-hint device\n");
        return;
    }
    outl(fph_reg(FPH_REG_REGION_LO), (u32)hdr_gpa);
    outl(fph_reg(FPH_REG_REGION_HI), (u32)(hdr_gpa >> 32));
    outl(fph_reg(FPH_REG_STATUS), FPH_CMD_REGISTER);
    s->status = inl(fph_reg(FPH_REG_STATUS));
    s->registered = s->status == 1;
    if (s->registered)
        print("guest: free-page bitmap registered: header 0x%lx, %lu pages, heap from pfn 0x%lx, %lu free\n",
              (unsigned long)hdr_gpa, (unsigned long)npages, (unsigned long)first,
              (unsigned long)s->free_count);
    else
        print("guest: free-page-hint device refused the region: status 0x%x\n", s->status);
}

/*
 * Several CPUs take and free pages in the one bitmap at once (docs/abi.md,
 * "Several CPUs").  Two of them may work on the same 64-bit word, so a bit
 * is only ever changed with a locked read-modify-write of its word (LOCK
 * BTR / BTS): a plain `word &= ~bit` by one CPU could write back a stale
 * word and undo another CPU's change to a neighbouring bit.  The locked
 * instruction also says whether this CPU was the one to flip the bit, which
 * is how two CPUs never get the same page.
 */
/*
 * atomics=0 (lab 8): the same bit changes done the way `word &= ~bit` and
 * `word |= bit` compile, a load and later a store of the whole word.  A change
 * another CPU makes to the word in between is overwritten, and two CPUs can
 * both see a free bit and both take the page.  The spin between the load and
 * the store stands for what makes that window wide on a real machine (an
 * interrupt, a cache miss, the vCPU's thread descheduled by the host), so the
 * race shows within a second instead of an hour.
 */
#define RACE_SPIN 64

static int plain_test_and_clear_bit(volatile u64 *w, unsigned b)
{
    u64 v = *w;
    for (int i = 0; i < RACE_SPIN; i++)
        cpu_relax();
    *w = v & ~(1ULL << b);
    return (int)((v >> b) & 1);
}

static int plain_test_and_set_bit(volatile u64 *w, unsigned b)
{
    u64 v = *w;
    for (int i = 0; i < RACE_SPIN; i++)
        cpu_relax();
    *w = v | 1ULL << b;
    return (int)((v >> b) & 1);
}

u64 page_alloc(void)
{
    struct fph_state *s = &g_fph;
    struct percpu *pc = this_cpu();
    u64 w = pc->cursor;
    /* Next-fit from this CPU's own cursor (CPUs start apart): whole words, wrapping once. */
    for (u64 n = 0; n < s->nwords; n++) {
        u64 v = s->bitmap[w];               /* a snapshot: other CPUs may change it */
        while (v) {
            unsigned b = (unsigned)__builtin_ctzll(v);
            /* Page is active now, and the locked instruction orders it before the
             * caller's first store into the page (rule 2: no barrier() needed). */
            if (g_cfg.atomics ? atomic_test_and_clear_bit(&s->bitmap[w], b)
                              : plain_test_and_clear_bit(&s->bitmap[w], b)) {
                pc->cursor = w;
                atomic_add(&s->free_count, -1);
                header_sync();
                return w * 64 + b;
            }
            v &= ~(1ULL << b);              /* another CPU took it first */
        }
        if (++w == s->nwords)
            w = 0;
    }
    return NO_PAGE;
}

/* First fit, skipping all-active words.  For start-up on one CPU (the others
 * wait then): the run is found with plain reads and taken bit by bit. */
u64 page_alloc_contig(u64 n)
{
    struct fph_state *s = &g_fph;
    u64 run = 0;
    if (n == 0)
        return NO_PAGE;
    for (u64 pfn = s->heap_start_pfn; pfn < s->npages; pfn++) {
        if ((pfn & 63) == 0 && s->bitmap[pfn >> 6] == 0) {
            run = 0;
            pfn += 63;
            continue;
        }
        run = page_is_free(pfn) ? run + 1 : 0;
        if (run == n) {
            u64 start = pfn + 1 - n;
            for (u64 p = start; p <= pfn; p++)
                atomic_test_and_clear_bit(&s->bitmap[p >> 6], p & 63);
            atomic_add(&s->free_count, -(i64)n);
            header_sync();
            return start;
        }
    }
    return NO_PAGE;
}

int page_free(u64 pfn)
{
    struct fph_state *s = &g_fph;
    if (pfn < s->heap_start_pfn || pfn >= s->npages || fph_reserved(pfn))
        return -1;                          /* not ours */
    /* The locked BTS comes after the caller's last store into the page (rule 3)
     * and tells a double free: the bit was set already. */
    if (g_cfg.atomics ? atomic_test_and_set_bit(&s->bitmap[pfn >> 6], pfn & 63)
                      : plain_test_and_set_bit(&s->bitmap[pfn >> 6], pfn & 63))
        return -1;
    atomic_add(&s->free_count, 1);
    header_sync();
    return 0;
}

u64 fph_count_free(void)
{
    u64 n = 0;
    for (u64 w = 0; w < g_fph.nwords; w++)
        n += popcount64(g_fph.bitmap[w]);
    return n;
}

u32 fph_host_events(void)
{
    if (!g_fph.device_present)
        return 0;
    return inl(fph_reg(FPH_REG_HOST_EVENTS));
}

u32 fph_register(u64 hdr_gpa)
{
    outl(fph_reg(FPH_REG_REGION_LO), (u32)hdr_gpa);
    outl(fph_reg(FPH_REG_REGION_HI), (u32)(hdr_gpa >> 32));
    outl(fph_reg(FPH_REG_STATUS), FPH_CMD_REGISTER);
    return fph_read_status();
}

u32 fph_unregister(void)
{
    outl(fph_reg(FPH_REG_STATUS), FPH_CMD_UNREGISTER);
    return fph_read_status();
}

u32 fph_read_status(void)
{
    return inl(fph_reg(FPH_REG_STATUS));
}
