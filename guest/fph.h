/*
 * fph.h - the free-page bitmap (docs/abi.md) and the page allocator that
 * keeps its state in that bitmap.
 *
 * One bit per 4 KiB page of all RAM: 1 = free, 0 = active.  The allocator
 * has no other record of which pages are free, so what the VMM reads during
 * migration is exactly the allocator's own state, never a stale copy.
 */
#ifndef GUEST_FPH_H
#define GUEST_FPH_H

#include "lib.h"

#define FPH_MAGIC       0x48505246u     /* "FRPH" */
#define FPH_VERSION     1
#define FPH_ID          0x31485046u     /* "FPH1", read from the ID register */

/* Device registers, offsets from the fph port base (4-byte accesses only). */
#define FPH_REG_ID          0x00
#define FPH_REG_REGION_LO   0x04
#define FPH_REG_REGION_HI   0x08
#define FPH_REG_STATUS      0x0c    /* read: STATUS, write: COMMAND */
#define FPH_REG_HOST_EVENTS 0x10
#define FPH_CMD_REGISTER    1
#define FPH_CMD_UNREGISTER  2
#define FPH_EVENT_FINISH    (1u << 0)

/* STATUS values, and the reasons a REGISTER is refused (docs/abi.md). */
#define FPH_STATUS_NONE         0u
#define FPH_STATUS_REGISTERED   1u
#define FPH_STATUS_ERROR        0x80000000u
enum fph_reason {
    FPH_E_PLACEMENT = 1,    /* header misaligned or not inside RAM */
    FPH_E_MAGIC,
    FPH_E_VERSION,
    FPH_E_FORMAT,           /* header_size, page_size or flags */
    FPH_E_RANGE,            /* base_gpa, npages: the covered pages leave RAM */
    FPH_E_BITMAP,           /* bitmap misplaced, wrong size, or over the header */
};

struct fph_header {
    u32 magic;
    u16 version;
    u16 header_size;
    u32 page_size;
    u32 flags;
    u64 base_gpa;
    u64 npages;
    u64 bitmap_gpa;
    u64 bitmap_size;
    u64 free_pages;     /* informational; kept equal to the number of set bits */
    u64 reserved;
};
_Static_assert(sizeof(struct fph_header) == 64, "fph header is 64 bytes");

#define NO_PAGE (~0UL)

/* State of the bitmap and allocator; read-only outside fph.c. */
struct fph_state {
    struct fph_header *hdr;
    u64 *bitmap;
    u64 npages;         /* RAM pages = bits that mean something */
    u64 nwords;         /* 64-bit words in the bitmap */
    u64 heap_start_pfn; /* first page the allocator may hand out */
    u64 reserved_start_pfn, reserved_end_pfn;   /* the VMM's boot area: never handed out */
    volatile u64 free_count;    /* running count of set bits (changed atomically) */
    int device_present;
    int registered;
    u32 status;         /* last STATUS read from the device */
};
extern struct fph_state g_fph;

/* Build header + bitmap after the image and register them if the device exists.
 * The pages of [reserved_start, reserved_end) (the VMM's boot area: page
 * tables, boot info) stay active too. */
void fph_init(u64 ram_size, u64 image_end, u64 reserved_start, u64 reserved_end, int device_flag);

/* One page: clears its bit (page becomes active) before returning it.  Any CPU. */
u64 page_alloc(void);
/* n physically contiguous pages (first pfn), or NO_PAGE.  One CPU, at start-up. */
u64 page_alloc_contig(u64 n);
/* Sets the page's bit after the caller's last store.  Returns -1 on double free.  Any CPU. */
int page_free(u64 pfn);

static inline int page_is_free(u64 pfn)
{
    return (g_fph.bitmap[pfn >> 6] >> (pfn & 63)) & 1;
}

static inline int fph_reserved(u64 pfn)
{
    return pfn >= g_fph.reserved_start_pfn && pfn < g_fph.reserved_end_pfn;
}

static inline void *pfn_to_ptr(u64 pfn) { return (void *)(uintptr_t)(pfn << PAGE_SHIFT); }

/* Count the set bits in the whole bitmap (the honest number). */
u64 fph_count_free(void);
/* Write the running count into the header (exact when no CPU is allocating). */
void fph_sync_header(void);

/* Read HOST_EVENTS (a VM exit); 0 if there is no device. */
u32 fph_host_events(void);

/* The device's commands, unchecked, for the hostile workload: each returns
 * the STATUS read right after the command. */
u32 fph_register(u64 hdr_gpa);
u32 fph_unregister(void);
u32 fph_read_status(void);

#endif
