/*
 * main.c - the guest's ring-3 main: checks the boot-info block, parses the
 * command line, sets up the free-page bitmap and runs one workload.
 *
 * entry.S gets here at CPL 3 with the boot-info pointer and the RSI value
 * the VMM passed, after zeroing .bss.
 */
#include "fph.h"
#include "percpu.h"
#include "workload.h"

struct config g_cfg = {
    .workload = WL_HELLO,
    .workload_name = "hello",
    .pages = 1000,
    .rounds = 10,
    .free_pct = 50,
    .seed = 1,
    .live_pct = 25,
    .stale_pct = 50,
    .dirty = 1000,
    .seconds = 0,
    .idle = 1,
    .atomics = 1,
};
const struct boot_info *g_bi;
#define DEFAULT_TSC_KHZ 2000000     /* 2 GHz, when the VMM does not know */
u64 g_tsc_khz = DEFAULT_TSC_KHZ;    /* in .data: valid even for an early exception */

u64 tsc_to_ms(u64 cycles) { return cycles / g_tsc_khz; }

/*
 * Measure the TSC against the 8254 PIT (1.193182 MHz), for Multiboot boots
 * where nobody tells us its frequency.  Channel 2 in mode 0 counts down
 * from the value loaded and raises its OUT line, readable as bit 5 of port
 * 0x61, when it reaches 0; bit 0 of port 0x61 is that channel's gate.
 * kvmlite has no PIT (an unclaimed port ends its run), so only Multiboot
 * boots come here.
 */
static u64 pit_calibrate_tsc_khz(void)
{
    const unsigned ms = 10, count = 1193182 * ms / 1000;
    outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));  /* gate on, speaker off */
    outb(0x43, 0xb0);                               /* channel 2, lo/hi byte, mode 0, binary */
    outb(0x42, (u8)(count & 0xff));
    outb(0x42, (u8)(count >> 8));                   /* counting starts here */
    u64 t0 = rdtsc(), t1;
    do {
        t1 = rdtsc();
        if (t1 - t0 > 50000000000ULL)               /* ~10 s even at 5 GHz: no PIT */
            return 0;
    } while (!(inb(0x61) & 0x20));
    return (t1 - t0) / ms;
}

NORETURN static void bad_cmdline(const char *what, const char *tok, size_t n)
{
    print("guest: bad command line: %s '", what);
    console_write(tok, n);
    print("'\n");
    print("guest: usage: workload=hello|churn|fill|fault|triple|hostile|sleep|ipi"
          " [pages=N rounds=R free=PCT seed=S] [live=PCT|live_pages=N stale=PCT dirty=PAGES_PER_SEC seconds=N idle=0|1]"
          " [mode=outside|overlap|huge|flip|allfree] [ms=M count=K] [cpus=N smpboot=pv|sipi lapic=0|1 atomics=0|1]\n");
    guest_exit(EXIT_BAD_CMDLINE);
}

static const struct {
    const char *name;
    enum workload wl;
} workloads[] = {
    { "hello", WL_HELLO }, { "churn", WL_CHURN }, { "fill", WL_FILL },
    { "fault", WL_FAULT }, { "triple", WL_TRIPLE }, { "hostile", WL_HOSTILE },
    { "sleep", WL_SLEEP }, { "ipi", WL_IPI },
};

static const struct {
    const char *name;
    enum hostile_mode mode;
} hostile_modes[] = {
    { "outside", HOSTILE_OUTSIDE }, { "overlap", HOSTILE_OVERLAP }, { "huge", HOSTILE_HUGE },
    { "flip", HOSTILE_FLIP }, { "allfree", HOSTILE_ALLFREE },
};

static const struct {
    const char *name;
    u64 *val;
    u64 min, max;
} num_keys[] = {
    { "pages",   &g_cfg.pages,     1, 0xffffffffULL },
    { "rounds",  &g_cfg.rounds,    0, 0xffffffffULL },
    { "free",    &g_cfg.free_pct,  0, 100 },
    { "seed",    &g_cfg.seed,      0, ~0ULL },
    { "live",    &g_cfg.live_pct,  0, 100 },
    { "live_pages", &g_cfg.live_pages, 0, 0xffffffffULL },
    { "stale",   &g_cfg.stale_pct, 0, 100 },
    { "dirty",   &g_cfg.dirty,     0, 1000000000ULL },
    { "seconds", &g_cfg.seconds,   0, 100000000ULL },
    { "idle",    &g_cfg.idle,      0, 1 },
    { "cpus",    &g_cfg.cpus,      0, MAX_CPUS },
    { "lapic",   &g_cfg.lapic,     0, 1 },
    { "ms",      &g_cfg.ms,        1, 100000 },
    { "count",   &g_cfg.count,     1, 100000 },
    { "atomics", &g_cfg.atomics,   0, 1 },
};

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Tokens "key=value" separated by spaces; every key is known or it is an error. */
static void parse_cmdline(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n'))
            i++;
        size_t start = i;
        while (i < len && s[i] != ' ' && s[i] != '\t' && s[i] != '\n')
            i++;
        if (i == start)
            break;
        const char *tok = s + start;
        size_t toklen = i - start, klen = 0;
        while (klen < toklen && tok[klen] != '=')
            klen++;
        if (klen == toklen || klen == 0)
            bad_cmdline("expected key=value, got", tok, toklen);
        const char *val = tok + klen + 1;
        size_t vlen = toklen - klen - 1;

        if (str_eq_n(tok, klen, "workload")) {
            size_t w;
            for (w = 0; w < ARRAY_SIZE(workloads); w++)
                if (str_eq_n(val, vlen, workloads[w].name))
                    break;
            if (w == ARRAY_SIZE(workloads))
                bad_cmdline("unknown workload (hello, churn, fill, fault, triple, hostile, sleep, ipi)", tok, toklen);
            g_cfg.workload = workloads[w].wl;
            g_cfg.workload_name = workloads[w].name;
            continue;
        }
        if (str_eq_n(tok, klen, "smpboot")) {
            if (str_eq_n(val, vlen, "sipi"))
                g_cfg.sipi = 1;
            else if (str_eq_n(val, vlen, "pv"))
                g_cfg.sipi = 0;
            else
                bad_cmdline("smpboot is pv (the CPU-start device) or sipi (INIT-SIPI-SIPI), not", tok, toklen);
            continue;
        }
        if (str_eq_n(tok, klen, "mode")) {
            size_t m;
            for (m = 0; m < ARRAY_SIZE(hostile_modes); m++)
                if (str_eq_n(val, vlen, hostile_modes[m].name))
                    break;
            if (m == ARRAY_SIZE(hostile_modes))
                bad_cmdline("unknown hostile mode (outside, overlap, huge, flip, allfree)", tok, toklen);
            g_cfg.hostile_mode = hostile_modes[m].mode;
            continue;
        }
        size_t k;
        for (k = 0; k < ARRAY_SIZE(num_keys); k++)
            if (str_eq_n(tok, klen, num_keys[k].name))
                break;
        if (k == ARRAY_SIZE(num_keys))
            bad_cmdline("unknown key in", tok, toklen);
        u64 v;
        if (parse_u64(val, vlen, &v) != 0)
            bad_cmdline("not a number (decimal or 0x-hex) in", tok, toklen);
        if (v < num_keys[k].min || v > num_keys[k].max) {
            print("guest: bad command line: %s must be %lu..%lu\n", num_keys[k].name,
                  (unsigned long)num_keys[k].min, (unsigned long)num_keys[k].max);
            guest_exit(EXIT_BAD_CMDLINE);
        }
        *num_keys[k].val = v;
    }
    if (!g_cfg.live_pages && g_cfg.live_pct + g_cfg.stale_pct > 100) {
        print("guest: bad command line: live=%lu + stale=%lu exceeds 100%%\n",
              (unsigned long)g_cfg.live_pct, (unsigned long)g_cfg.stale_pct);
        guest_exit(EXIT_BAD_CMDLINE);
    }
}

/* The summary line; also used by the exception handler with its own free count.
 * With several CPUs, a KVMLITE-CPU line per CPU comes first and the summary
 * has their totals (pages_per_sec: the sum of each CPU's own rate) and cpus=N;
 * with one CPU the line is as it always was. */
void print_summary(u64 free_pages, int ok)
{
    u64 elapsed = rdtsc() - g_percpu[0].stats.start_tsc;
    struct stats t = {0};
    u64 pps = 0;
    for (unsigned c = 0; c < g_ncpus; c++) {
        struct stats *s = &g_percpu[c].stats;
        /* Page-write throughput over the cycles spent writing pages: the native speed. */
        u64 cpu_pps = s->write_cycles ? s->pages_written * (g_tsc_khz * 1000) / s->write_cycles : 0;
        t.live += s->live;
        t.verified += s->verified;
        t.errors += s->errors;
        t.corrupted += s->corrupted;
        t.pages_written += s->pages_written;
        pps += cpu_pps;
        if (g_ncpus > 1)
            print("KVMLITE-CPU cpu=%u started_by=%s live=%lu verified=%lu errors=%lu corrupted=%lu"
                  " pages_written=%lu pages_per_sec=%lu lapic_irqs=%lu\n",
                  c, c ? (g_percpu[c].how[0] == 'I' ? "sipi" : "cpustart") : "boot",
                  (unsigned long)s->live, (unsigned long)s->verified, (unsigned long)s->errors,
                  (unsigned long)s->corrupted, (unsigned long)s->pages_written,
                  (unsigned long)cpu_pps, (unsigned long)g_percpu[c].irqs);
    }
    char cpus[24] = "";
    if (g_ncpus > 1) {
        cpus[0] = ' ';
        memcpy(cpus + 1, "cpus=", 5);
        cpus[6] = (char)('0' + g_ncpus / 10);
        cpus[7] = (char)('0' + g_ncpus % 10);
        if (cpus[6] == '0')
            cpus[6] = cpus[7], cpus[7] = '\0';
        else
            cpus[8] = '\0';
    }
    print("KVMLITE-SUMMARY workload=%s%s live=%lu free=%lu verified=%lu errors=%lu corrupted=%lu"
          " pages_written=%lu elapsed_ms=%lu pages_per_sec=%lu status=%s\n",
          g_cfg.workload_name, cpus, (unsigned long)t.live, (unsigned long)free_pages,
          (unsigned long)t.verified, (unsigned long)t.errors,
          (unsigned long)t.corrupted,
          (unsigned long)t.pages_written, (unsigned long)tsc_to_ms(elapsed),
          (unsigned long)pps, ok ? "ok" : "fail");
}

static u64 total_errors(void)
{
    u64 e = 0;
    for (unsigned c = 0; c < g_ncpus; c++)
        e += g_percpu[c].stats.errors;
    return e;
}

/* CPU 0, when every CPU is done with the bitmap. */
NORETURN void finish(void)
{
    /* Self-check: the running count must equal the bits actually set. */
    fph_sync_header();
    u64 free_pages = fph_count_free();
    if (free_pages != g_fph.free_count || g_fph.hdr->free_pages != free_pages) {
        print("guest: ERROR bitmap has %lu free bits, allocator counted %lu, header says %lu\n",
              (unsigned long)free_pages, (unsigned long)g_fph.free_count,
              (unsigned long)g_fph.hdr->free_pages);
        g_stats.errors++;
    }
    int ok = total_errors() == 0;
    print_summary(free_pages, ok);
    guest_exit(ok ? EXIT_OK : EXIT_CHECK_FAILED);
}

NORETURN void guest_main(const struct boot_info *bi, u64 rsi);
/* `main` for debuggers: `break main` in gdb stops where the C code starts. */
extern __typeof__(guest_main) main __attribute__((alias("guest_main"), noreturn));

NORETURN void guest_main(const struct boot_info *bi, u64 rsi)
{
    g_percpu[0].stats.start_tsc = rdtsc();
    if (bi->magic != BOOT_INFO_MAGIC || bi->version < 1 || bi->size < BOOT_INFO_V1_SIZE) {
        print("guest: bad boot-info block at %p: magic 0x%x version %u size %u (rsi 0x%lx)\n",
              (const void *)bi, bi->magic, bi->version, bi->size, (unsigned long)rsi);
        guest_exit(EXIT_BAD_CMDLINE);
    }
    g_bi = bi;
    if (bi->uart_port)
        g_ports.uart = bi->uart_port;
    if (bi->debugcon_port)
        g_ports.debugcon = bi->debugcon_port;
    if (bi->exit_port)
        g_ports.exit = bi->exit_port;
    if (bi->fph_port)
        g_ports.fph = bi->fph_port;
    if (bi->size >= BOOT_INFO_IDLE_SIZE)
        g_ports.idle = bi->idle_port;
    g_tsc_khz = bi->tsc_khz;
    if (!g_tsc_khz && rsi == MULTIBOOT_BOOT_MAGIC)
        g_tsc_khz = pit_calibrate_tsc_khz();     /* PC hardware is there; not on kvmlite */
    const char *tsc_source = "";
    if (!bi->tsc_khz)
        tsc_source = g_tsc_khz ? " (measured with the PIT)" : " (assumed)";
    if (!g_tsc_khz)
        g_tsc_khz = DEFAULT_TSC_KHZ;

    const char *cmdline = (const char *)(uintptr_t)bi->cmdline_gpa;
    size_t len = cmdline ? bi->cmdline_len : 0;
    for (size_t i = 0; i < len; i++)
        if (cmdline[i] == '\0') {       /* trust the NUL over a too-long length */
            len = i;
            break;
        }
    /* A Multiboot loader puts the kernel's file name first: skip it. */
    if (rsi == MULTIBOOT_BOOT_MAGIC) {
        size_t i = 0;
        while (i < len && cmdline[i] == ' ')
            i++;
        size_t w = i;
        while (w < len && cmdline[w] != ' ' && cmdline[w] != '=')
            w++;
        if (w > i && (w == len || cmdline[w] == ' ')) {
            while (w < len && cmdline[w] == ' ')
                w++;
            cmdline += w;
            len -= w;
        }
    }
    print("guest: up in ring 3 (%s boot), RAM %lu MiB, TSC %lu kHz%s, command line \"",
          rsi == KVMLITE_RSI_MAGIC ? "kvmlite" : rsi == MULTIBOOT_BOOT_MAGIC ? "multiboot" : "unknown",
          (unsigned long)(bi->ram_size >> 20),
          (unsigned long)g_tsc_khz, tsc_source);
    console_write(cmdline, len);
    print("\"\n");
    parse_cmdline(cmdline, len);

    /* Version 1 kept the boot area below the image; version 2 says where it is. */
    u64 boot_area = 0, boot_area_end = 0;
    if (bi->version >= 2 && bi->size >= BOOT_INFO_V2_SIZE) {
        boot_area = bi->boot_area_gpa;
        boot_area_end = bi->reserved_end;
    }
    fph_init(bi->ram_size, (u64)(uintptr_t)__image_end, boot_area, boot_area_end,
             bi->flags & BOOT_INFO_FLAG_FPH);
    if (g_fph.device_present && !g_fph.registered)
        g_stats.errors++;       /* the device refused our header: a bug in this guest */

    smp_start(bi, rsi == MULTIBOOT_BOOT_MAGIC);
    if (workload_on_every_cpu()) {
        prepare_workload();             /* CPU 0 shares the work out ... */
        smp_release();                  /* ... the others start on theirs ... */
        run_workload_cpu();             /* ... and so does CPU 0 */
        smp_wait_done();
    } else {
        smp_release();                  /* the others have nothing to do: they halt */
        switch (g_cfg.workload) {
        case WL_FAULT:  run_fault();  break;
        case WL_TRIPLE: run_triple(); break;
        case WL_HOSTILE: run_hostile(); break;
        default: break;
        }
    }
    finish();
}
