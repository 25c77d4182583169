/*
 * lib.c - console output, number formatting, memory and string helpers.
 *
 * No libc exists in the guest, so this file provides the handful of
 * functions the rest needs.  The compiler may also emit calls to memset,
 * memcpy, memmove and memcmp on its own (struct copies, zeroing loops), so
 * those four must exist under exactly those names.
 */
#include "lib.h"

/* Defaults until main.c has read the boot-info block (docs/boot.md). */
struct ports g_ports = { .uart = 0x3f8, .debugcon = 0xe9, .exit = 0x501, .fph = 0x520 };

/* ---- serial console ---- */

#define UART_THR 0          /* transmit holding register (write) */
#define UART_LSR 5          /* line status register */
#define UART_LSR_THRE 0x20  /* THR empty: the UART can take another byte */

void console_putc(char c)
{
    /*
     * A real 16550 accepts a byte only when THR is empty.  The VMM's UART
     * always says it is, so this loop runs once - but it is one VM exit per
     * byte more, the price of also working on real (or QEMU's) hardware.
     */
    while (!(inb(g_ports.uart + UART_LSR) & UART_LSR_THRE))
        cpu_relax();
    outb(g_ports.uart + UART_THR, (u8)c);
}

void console_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        console_putc(s[i]);
}

NORETURN void guest_exit(int status)
{
    outb(g_ports.exit, (u8)status);
    /*
     * Without an exit device (or if it did not stop us) there is nothing
     * sensible left to do.  HLT would need CPL 0 and would end a kvmlite run
     * with status 0, which is a lie, so spin.
     */
    for (;;)
        cpu_relax();
}

/* ---- printf subset: %s %c %d %u %x %p %%, flags '0', width, 'l'/'ll'/'z' ---- */

static void vprint_locked(const char *fmt, va_list ap);

struct out {
    char buf[128];      /* batch the bytes: one call per chunk, not per %-directive */
    size_t n;
};

static void out_flush(struct out *o)
{
    console_write(o->buf, o->n);
    o->n = 0;
}

static void out_char(struct out *o, char c)
{
    if (o->n == sizeof(o->buf))
        out_flush(o);
    o->buf[o->n++] = c;
}

static void out_num(struct out *o, u64 v, unsigned base, int neg, int width, char pad)
{
    char tmp[24];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    for (int i = n; i < width; i++)
        out_char(o, pad);
    while (n)
        out_char(o, tmp[--n]);
}

/*
 * One CPU prints at a time, so lines from different CPUs stay whole.  The
 * owner is recorded so that a CPU that takes an exception while it prints
 * (trap.c prints too) does not wait for itself.
 */
static volatile u32 console_lock;
static volatile u64 console_owner = ~0ULL;

static u64 my_cpu_id(void)
{
    u64 p;
    __asm__ volatile("mov %%gs:0, %0" : "=r"(p));  /* the CPU's struct percpu (percpu.h) */
    return p;
}

void vprint(const char *fmt, va_list ap)
{
    u64 me = my_cpu_id();
    int nested = console_owner == me;
    if (!nested) {
        spin_lock(&console_lock);
        console_owner = me;
    }
    vprint_locked(fmt, ap);
    if (!nested) {
        console_owner = ~0ULL;
        spin_unlock(&console_lock);
    }
}

static void vprint_locked(const char *fmt, va_list ap)
{
    struct out o;
    o.n = 0;
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            out_char(&o, *p);
            continue;
        }
        p++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*p == '0') {
            pad = '0';
            p++;
        }
        while (*p >= '0' && *p <= '9')
            width = width * 10 + (*p++ - '0');
        while (*p == 'l' || *p == 'z') {
            lng = 1;
            p++;
        }
        switch (*p) {
        case 'd': {
            i64 v = lng ? va_arg(ap, long) : va_arg(ap, int);
            out_num(&o, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, pad);
            break;
        }
        case 'u':
            out_num(&o, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 10, 0, width, pad);
            break;
        case 'x':
            out_num(&o, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 16, 0, width, pad);
            break;
        case 'p':
            out_char(&o, '0');
            out_char(&o, 'x');
            out_num(&o, (u64)(uintptr_t)va_arg(ap, void *), 16, 0, width, pad);
            break;
        case 'c':
            out_char(&o, (char)va_arg(ap, int));
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            while (*s)
                out_char(&o, *s++);
            break;
        }
        case '%':
            out_char(&o, '%');
            break;
        case '\0':
            p--;        /* a lone '%' at the end: stop at the NUL */
            break;
        default:
            out_char(&o, '%');
            out_char(&o, *p);
            break;
        }
    }
    out_flush(&o);
}

void print(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprint(fmt, ap);
    va_end(ap);
}

/* ---- memory: string instructions run at native speed at CPL 3 ---- */

void *memset(void *d, int c, size_t n)
{
    void *ret = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return ret;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *ret = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return ret;
}

void *memmove(void *d, const void *s, size_t n)
{
    unsigned char *dp = d;
    const unsigned char *sp = s;
    if (dp <= sp || dp >= sp + n)
        return memcpy(d, s, n);
    while (n--)                     /* overlapping, destination above: copy backwards */
        dp[n] = sp[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int str_eq_n(const char *a, size_t alen, const char *b)
{
    size_t blen = strlen(b);
    return alen == blen && memcmp(a, b, alen) == 0;
}

int parse_u64(const char *s, size_t n, u64 *out)
{
    unsigned base = 10;
    u64 v = 0;
    if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
        n -= 2;
    }
    if (n == 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            return -1;
        if (v > (~0ULL - d) / base)
            return -1;          /* would overflow 64 bits */
        v = v * base + d;
    }
    *out = v;
    return 0;
}
