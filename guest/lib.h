/*
 * lib.h - the guest's tiny freestanding runtime: integer types, port I/O,
 * the TSC, compiler barriers, console output and string helpers.
 *
 * Everything here runs at CPL 3 except where the exception handler (ring 0)
 * reuses the console functions.  Port I/O at CPL 3 is allowed because the
 * TSS I/O permission bitmap set up in entry.S clears the bit of every port.
 */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include <stdarg.h>     /* freestanding header provided by the compiler */
#include <stddef.h>
#include <stdint.h>

typedef uint8_t  u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t  i64;

#define PAGE_SIZE   4096UL
#define PAGE_SHIFT  12
#define PAGE_ALIGN_UP(x) (((x) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))

#define NORETURN __attribute__((noreturn))
#define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))

/* Exit statuses written to the exit device (see docs/boot.md). */
enum {
    EXIT_OK = 0,          /* every self-check passed */
    EXIT_CHECK_FAILED = 1,
    EXIT_BAD_CMDLINE = 2, /* also: unusable boot-info block */
    EXIT_EXCEPTION = 3,   /* the guest took an unexpected CPU exception */
};

/*
 * A compiler barrier: the compiler may not move memory accesses across it.
 * The CPU needs no fence for our purposes, because x86 (TSO) makes stores
 * visible to other CPUs - here, the VMM thread reading guest RAM - in
 * program order.  This is what orders "clear the page's free bit" before
 * "store data into the page" (docs/abi.md, rule 2).
 */
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* ---- port I/O: each access is a VM exit (~10 us), use sparingly ---- */
static inline void outb(u16 port, u8 v)  { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)  { u8 v;  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* RDTSC is allowed at CPL 3 unless CR4.TSD is set, which nobody sets here. */
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static inline void cpu_relax(void) { __asm__ volatile("pause"); }

/*
 * Atomic read-modify-writes on memory other CPUs share.  LOCK-prefixed
 * instructions run natively at CPL 3 and are full barriers on x86: no load
 * or store moves across them, on this CPU or as other CPUs see it.
 */
/* Clear bit b of *w; returns the bit's old value (1 = this CPU cleared it). */
static inline int atomic_test_and_clear_bit(volatile u64 *w, unsigned b)
{
    unsigned char old;
    __asm__ volatile("lock btrq %2, %0; setc %1" : "+m"(*w), "=qm"(old) : "r"((u64)b) : "memory", "cc");
    return old;
}

/* Set bit b of *w; returns the bit's old value (1 = it was set already). */
static inline int atomic_test_and_set_bit(volatile u64 *w, unsigned b)
{
    unsigned char old;
    __asm__ volatile("lock btsq %2, %0; setc %1" : "+m"(*w), "=qm"(old) : "r"((u64)b) : "memory", "cc");
    return old;
}

static inline u64 atomic_add(volatile u64 *p, i64 v)     /* returns the new value */
{
    return __atomic_add_fetch(p, (u64)v, __ATOMIC_SEQ_CST);
}

/* A spinlock: XCHG with memory is locked by definition. */
static inline void spin_lock(volatile u32 *l)
{
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
        while (*l)
            cpu_relax();
}

static inline void spin_unlock(volatile u32 *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

/*
 * Privileged instructions from CPL 3.  Each raises #GP; the guest's #GP
 * handler (entry.S, gp_entry) does it at CPL 0 and returns past it: HLT with
 * interrupts on (unless one came already), RDMSR/WRMSR of the LAPIC's MSRs only.  About 45 us each on
 * kvm_pvm, where the handler's instructions are emulated (docs/boot.md).
 */
static inline void wrmsr_trapped(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static inline u64 rdmsr_trapped(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
    return (u64)hi << 32 | lo;
}

/* HLT until an interrupt, unless one came since the CPU's interrupt count
 * (percpu.h, irqs) read `seen`: then it returns at once (see gp_entry). */
static inline void hlt_trapped(u64 seen) { __asm__ volatile("hlt" :: "a"(seen) : "memory"); }


/* ---- ports, filled in from the boot-info block by main.c ---- */
struct ports {
    u16 uart;       /* 16550 COM1 */
    u16 debugcon;   /* Bochs/QEMU 0xe9 console */
    u16 exit;       /* exit device: one byte ends the run */
    u16 fph;        /* free-page-hint device base */
    u16 idle;       /* idle device, 0 if the VMM has none (then the guest spins) */
};
extern struct ports g_ports;

/* Give the CPU back to the host for up to `us` microseconds (docs/boot.md,
 * idle device): the guest has no timer interrupt to HLT for, so this is its
 * HLT-with-a-deadline.  Without the device it returns at once. */
static inline void idle_us(u32 us) { if (g_ports.idle) outl(g_ports.idle, us); }

/* ---- console (serial) ---- */
void console_putc(char c);
void console_write(const char *s, size_t n);
void print(const char *fmt, ...) PRINTF_LIKE(1, 2);
void vprint(const char *fmt, va_list ap);

/* Write the status to the exit device; never returns. */
NORETURN void guest_exit(int status);

/* ---- memory and strings (gcc may emit calls to the first four) ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int str_eq_n(const char *a, size_t alen, const char *b);   /* a[0..alen) == b */

/* Parse an unsigned decimal or 0x-hex number from s[0..n); 0 on success. */
int parse_u64(const char *s, size_t n, u64 *out);

/* Count set bits (no POPCNT assumption, no libgcc). */
static inline unsigned popcount64(u64 x)
{
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (unsigned)((x * 0x0101010101010101ULL) >> 56);
}

/* xorshift64: a tiny deterministic PRNG; state must be nonzero. */
static inline u64 xorshift64(u64 *s)
{
    u64 x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

#endif
