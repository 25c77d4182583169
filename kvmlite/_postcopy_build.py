"""cffi build script: compiles kvmlite._postcopy, the destination's post-copy fault machinery.

Two parts, as in kvmlite/_kvm_build.py:

* raw bindings for userfaultfd(2): the constants and structs come from
  <linux/userfaultfd.h> (partial struct declarations, constants without
  values), so nothing about the ABI is pasted here;
* the post-copy engine (docs/postcopy.md), in C because it must run without
  the GIL: while pages are missing, any thread of the destination VMM may
  block in a page fault -- the vCPU thread inside KVM_RUN, but also a Python
  thread that reads guest memory while it holds the GIL (a device, the
  monitor).  The threads that resolve faults must therefore never need the
  GIL, or one fault could wait for itself.

The engine has two threads:
  fault thread    reads fault events from the userfaultfd.  A page that was free
                  at the switch (or is known zero) is resolved here and now with
                  UFFDIO_ZEROPAGE; a page still to come is requested from the
                  source with a REQUEST record written straight to the socket.
  receive thread  reads the post-copy stream (PAGES, ZERO, POSTCOPY-END) and
                  places each page with UFFDIO_COPY / UFFDIO_ZEROPAGE, which
                  also wakes the threads waiting for it.
The record types and sizes are arguments (struct kvmlite_pc_wire), filled in
from kvmlite/migration/wire.py, the only module that owns the byte layout.

Run at install time by setuptools (setup.py); ``python -m kvmlite._postcopy_build``
builds it in place for development.
"""

import os

from cffi import FFI

CDEF = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

/* ---- <linux/userfaultfd.h>: values filled in from the header ---- */
#define UFFD_API ...
static const unsigned long UFFDIO_API;
static const unsigned long UFFDIO_REGISTER;
static const unsigned long UFFDIO_UNREGISTER;
static const unsigned long UFFDIO_WAKE;
static const unsigned long UFFDIO_COPY;
static const unsigned long UFFDIO_ZEROPAGE;
static const unsigned long USERFAULTFD_IOC_NEW;
#define _UFFDIO_REGISTER ...
#define _UFFDIO_UNREGISTER ...
#define _UFFDIO_WAKE ...
#define _UFFDIO_COPY ...
#define _UFFDIO_ZEROPAGE ...
#define _UFFDIO_API ...
#define UFFDIO ...
#define UFFD_EVENT_PAGEFAULT ...
#define UFFD_PAGEFAULT_FLAG_WRITE ...
#define UFFDIO_REGISTER_MODE_MISSING ...
#define UFFDIO_COPY_MODE_DONTWAKE ...
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
#define UFFD_USER_MODE_ONLY ...
#define MADV_DONTNEED ...

struct uffdio_api {
    __u64 api;
    __u64 features;
    __u64 ioctls;
    ...;
};
struct uffdio_range {
    __u64 start;
    __u64 len;
    ...;
};
struct uffdio_register {
    struct uffdio_range range;
    __u64 mode;
    __u64 ioctls;
    ...;
};
struct uffdio_copy {
    __u64 dst;
    __u64 src;
    __u64 len;
    __u64 mode;
    int64_t copy;
    ...;
};
struct uffdio_zeropage {
    struct uffdio_range range;
    __u64 mode;
    int64_t zeropage;
    ...;
};
/* Read only by the C fault thread, which uses the header's own declaration;
   declared here so that its size can be checked against the header. */
struct uffd_msg {
    __u8 event;
    ...;
};

/* ---- thin helpers: one syscall each, -errno on failure ---- */
int kvmlite_uffd_open(int user_mode_only);
int kvmlite_uffd_ioctl(int fd, unsigned long request, void *arg);
int kvmlite_uffd_discard(void *ram, const int64_t *starts, const int64_t *lengths, size_t n,
                         size_t page_size);
int kvmlite_touch(const void *addr, size_t len, size_t page_size);

/* ---- the post-copy engine ---- */
#define KVMLITE_PC_OTHER ...
#define KVMLITE_PC_PENDING ...
#define KVMLITE_PC_REQUESTED ...
#define KVMLITE_PC_PUSHED ...
#define KVMLITE_PC_FAULTED ...
#define KVMLITE_PC_FREE ...
#define KVMLITE_PC_ZERO_FREE ...
#define KVMLITE_PC_ZERO_OTHER ...
#define KVMLITE_PC_LINK_NONE ...
#define KVMLITE_PC_LINK_UP ...
#define KVMLITE_PC_LINK_BROKEN ...
#define KVMLITE_PC_LINK_DONE ...

struct kvmlite_pc_wire {
    uint8_t pages_type;         /* PAGES record: type u8, gpa u64, npages u32, payload, tags */
    uint8_t zero_type;          /* ZERO record: type u8, gpa u64, npages u32, a tag */
    uint8_t end_type;           /* POSTCOPY-END: type u8, pages u64, zero_pages u64, crc32 u32 */
    uint8_t request_type;       /* REQUEST (return path): type u8, gpa u64, npages u32 */
    uint8_t done_type;          /* DONE (return path): type u8, pages u64, a tag */
    uint32_t run_head;          /* bytes of a PAGES/ZERO/REQUEST head */
    uint32_t end_head;          /* bytes of POSTCOPY-END before its crc32 */
    uint32_t done_head;         /* bytes of DONE before its tag */
    uint32_t tag_size;          /* bytes of a page tag with integrity on; 0 without */
    uint32_t max_run;           /* pages per PAGES/ZERO record at most */
    uint64_t done_seq;          /* the IV sequence number of DONE's tag */
};

struct kvmlite_pc_stats {
    uint64_t fault_events;      /* fault messages read from the userfaultfd */
    uint64_t remote;            /* faults that sent a REQUEST */
    uint64_t zero_free;         /* faults resolved here with a zero page: free at the switch */
    uint64_t zero_other;        /* faults resolved here with a zero page: not to come, never written */
    uint64_t already;           /* faults on a page that had arrived meanwhile (woken, nothing sent) */
    uint64_t joined;            /* faults on a page already requested (wait for the same answer) */
    uint64_t requests_unsent;   /* requests made while the link was down (sent at recovery) */
    uint64_t stray;             /* fault events outside guest RAM (none expected) */
    uint64_t pages_received;    /* pages placed from PAGES records */
    uint64_t zero_received;     /* pages placed from ZERO records */
    uint64_t duplicates;        /* pages that came again after they had arrived: dropped */
    uint64_t bytes_received;
    uint64_t bytes_sent;
    uint64_t pending_total;     /* pages still to come at the switch */
    uint64_t pending_left;      /* ... not arrived yet */
    uint64_t t_start_ns;        /* CLOCK_MONOTONIC: the engine started (the guest resumes) */
    uint64_t t_last_page_ns;    /* the last page still to come arrived */
    uint64_t latency_samples;
    int64_t link;               /* KVMLITE_PC_LINK_* */
    int64_t error_errno;
};

typedef struct kvmlite_pc kvmlite_pc;
kvmlite_pc *kvmlite_pc_new(int uffd, void *ram, uint64_t ram_gpa, uint64_t npages,
                           uint8_t *state, const struct kvmlite_pc_wire *wire);
int kvmlite_pc_start_faults(kvmlite_pc *pc);
int kvmlite_pc_attach(kvmlite_pc *pc, int sock, int timeout_ms, const uint8_t *key, uint64_t seq0);
int kvmlite_pc_wait(kvmlite_pc *pc, int timeout_ms);
void kvmlite_pc_break(kvmlite_pc *pc, const char *why);
int kvmlite_pc_send(kvmlite_pc *pc, const void *buf, size_t len);
void kvmlite_pc_stats(kvmlite_pc *pc, struct kvmlite_pc_stats *out);
size_t kvmlite_pc_latencies(kvmlite_pc *pc, uint64_t *out, size_t cap);
size_t kvmlite_pc_error(kvmlite_pc *pc, char *out, size_t cap);
size_t kvmlite_pc_requested(kvmlite_pc *pc, uint64_t *out, size_t cap);
void kvmlite_pc_stop(kvmlite_pc *pc);
void kvmlite_pc_free(kvmlite_pc *pc);
uint64_t kvmlite_pc_now_ns(void);

/* ---- the source's page server ---- */
#define KVMLITE_PCS_PENDING ...
#define KVMLITE_PCS_FREE ...
#define KVMLITE_PCS_TO_SEND ...
#define KVMLITE_PCS_SENT ...

struct kvmlite_pcs_stats {
    uint64_t pages_pushed;          /* sent by the background push */
    uint64_t pages_on_request;      /* sent because a REQUEST asked for them */
    uint64_t zero_pages;            /* of those, sent as ZERO records */
    uint64_t pages_resent;          /* sent again (after a recovery) */
    uint64_t requests;              /* REQUEST records read */
    uint64_t requests_already_sent; /* for pages already on their way */
    uint64_t requests_for_free;     /* for a page free at the switch: must stay 0 */
    uint64_t requests_not_pending;  /* for a page not still to come: must stay 0 */
    uint64_t bytes_sent;
    uint64_t bytes_received;
    uint64_t to_send_left;
    uint64_t pending_total;
    uint64_t t_start_ns;
    uint64_t t_done_ns;
    int64_t link;
    int64_t error_errno;
};
typedef struct kvmlite_pcs kvmlite_pcs;
kvmlite_pcs *kvmlite_pcs_new(const uint8_t *ram, uint64_t ram_gpa, uint64_t npages, uint8_t *flags,
                             const struct kvmlite_pc_wire *wire);
void kvmlite_pcs_flags(uint8_t *flags, const uint64_t *pending, const uint64_t *free_, uint64_t npages);
int kvmlite_pcs_run(kvmlite_pcs *s, int sock, uint32_t push_batch, uint32_t max_inflight,
                    int push, int timeout_ms, const uint8_t *key, uint64_t seq0,
                    uint64_t bandwidth);
void kvmlite_pcs_cancel(kvmlite_pcs *s);
size_t kvmlite_pcs_leftover(kvmlite_pcs *s, uint8_t *out, size_t cap);
void kvmlite_pcs_stats(kvmlite_pcs *s, struct kvmlite_pcs_stats *out);
size_t kvmlite_pcs_error(kvmlite_pcs *s, char *out, size_t cap);
void kvmlite_pcs_free(kvmlite_pcs *s);
"""

def _gmac_source() -> str:
    """The page tags' C code, from kvmlite/migration/_wire_build.py (one place for it).
    Read from the file, not imported: setuptools runs this script on its own."""
    here = os.path.dirname(os.path.abspath(__file__))
    ns: dict = {"__name__": "kvmlite_wire_build", "__file__": ""}
    with open(os.path.join(here, "migration", "_wire_build.py")) as f:
        exec(compile(f.read(), f.name, "exec"), ns)
    return ns["GMAC_SOURCE"]


SOURCE = _gmac_source() + r"""
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/userfaultfd.h>
#include <zlib.h>

#define PC_PAGE 4096u

/* Page states, one byte a page, shared with Python (a numpy array):
   what the page was at the switch and how it was resolved since. */
enum {
    KVMLITE_PC_OTHER = 0,       /* here before the switch (or never written: zero) */
    KVMLITE_PC_PENDING = 1,     /* still to come from the source */
    KVMLITE_PC_REQUESTED = 2,   /* still to come, a fault asked for it */
    KVMLITE_PC_PUSHED = 3,      /* arrived by the background push before any fault */
    KVMLITE_PC_FAULTED = 4,     /* arrived after a fault asked for it */
    KVMLITE_PC_FREE = 5,        /* free at the switch, not touched since */
    KVMLITE_PC_ZERO_FREE = 6,   /* free at the switch, a fault got a local zero page */
    KVMLITE_PC_ZERO_OTHER = 7,  /* not to come and never written: a local zero page */
};
enum { KVMLITE_PC_LINK_NONE = 0, KVMLITE_PC_LINK_UP = 1, KVMLITE_PC_LINK_BROKEN = 2,
       KVMLITE_PC_LINK_DONE = 3 };

/* userfaultfd(2) for a process that may handle faults KVM takes inside the
   kernel: that needs /dev/userfaultfd (Linux 6.1+) or CAP_SYS_PTRACE when
   vm.unprivileged_userfaultfd is 0.  Non-blocking: the fault thread polls. */
static int kvmlite_uffd_open(int user_mode_only)
{
    int flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        int err = errno;
        close(dev);
        if (fd >= 0)
            return fd;
        errno = err;
    }
    int fd = (int)syscall(SYS_userfaultfd, flags);
    return fd < 0 ? -errno : fd;
}

static int kvmlite_uffd_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* Drop the given page runs (stale copies of pages still to come), so that the
   next access to each faults into the userfaultfd.  process_madvise(2) takes
   up to 1024 runs a call (~0.75 us a run here, against ~1.6 us for one
   madvise(2) each); kernels that refuse MADV_DONTNEED there get madvise(2). */
static int kvmlite_uffd_discard(void *ram, const int64_t *starts, const int64_t *lengths,
                                size_t n, size_t page_size)
{
    size_t i = 0;
    int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    if (pidfd >= 0) {
        struct iovec iov[1024];
        while (i < n) {
            size_t k = 0, bytes = 0;
            for (; k < 1024 && i + k < n; k++) {
                iov[k].iov_base = (char *)ram + (size_t)starts[i + k] * page_size;
                iov[k].iov_len = (size_t)lengths[i + k] * page_size;
                bytes += iov[k].iov_len;
            }
            long r = syscall(SYS_process_madvise, pidfd, iov, k, MADV_DONTNEED, 0);
            if (r < 0 || (size_t)r != bytes)
                break;                        /* not supported here: the rest one by one */
            i += k;
        }
        close(pidfd);
    }
    for (; i < n; i++) {
        if (madvise((char *)ram + (size_t)starts[i] * page_size,
                    (size_t)lengths[i] * page_size, MADV_DONTNEED) < 0)
            return -errno;
    }
    return 0;
}

/* Read one byte of every page in [addr, addr + len), without the GIL: a
   Python reader of guest memory calls this first during post-copy, so that
   a missing page is fetched while the GIL is free, not while it is held. */
static int kvmlite_touch(const void *addr, size_t len, size_t page_size)
{
    uintptr_t a = (uintptr_t)addr & ~(uintptr_t)(page_size - 1);
    for (; a < (uintptr_t)addr + len; a += page_size)
        (void)((const volatile char *)a)[0];
    return 0;
}

static uint64_t kvmlite_pc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct kvmlite_pc_wire {
    uint8_t pages_type, zero_type, end_type, request_type, done_type;
    uint32_t run_head, end_head, done_head, tag_size, max_run;
    uint64_t done_seq;
};

struct kvmlite_pc_stats {
    uint64_t fault_events, remote, zero_free, zero_other, already, joined, requests_unsent;
    uint64_t stray;
    uint64_t pages_received, zero_received, duplicates, bytes_received, bytes_sent;
    uint64_t pending_total, pending_left, t_start_ns, t_last_page_ns, latency_samples;
    int64_t link, error_errno;
};

/* Requests in flight: a vCPU waits on at most a few pages at a time. */
#define PC_OUTSTANDING 1024
/* Holds one whole record of max_run (256) pages with its tags: each is checked
   in full before any of it reaches guest memory. */
#define PC_RECV_BUF (2u << 20)

typedef struct kvmlite_pc {
    int uffd;
    uint8_t *ram;
    uint64_t gpa, npages;
    uint8_t *state;
    struct kvmlite_pc_wire w;

    int stop_pipe[2];            /* readable = the fault thread must exit */
    pthread_t fault_thr, recv_thr;
    int fault_running, recv_running;

    pthread_mutex_t lock;        /* everything below, and the condition */
    pthread_cond_t cond;
    int sock;                    /* -1: no link */
    int timeout_ms;
    struct kvmlite_pc_stats st;
    char error[512];
    struct { uint64_t page, t0; } out[PC_OUTSTANDING];
    size_t nout;
    uint64_t *lat;
    size_t nlat, caplat;

    pthread_mutex_t send_lock;   /* one writer at a time on the socket */
} kvmlite_pc;

#define ADD(field, n) __atomic_fetch_add(&pc->st.field, (n), __ATOMIC_RELAXED)

static void pc_fail_locked(kvmlite_pc *pc, int err, const char *why)
{
    if (pc->st.link == KVMLITE_PC_LINK_UP || pc->st.link == KVMLITE_PC_LINK_NONE) {
        pc->st.link = KVMLITE_PC_LINK_BROKEN;
        pc->st.error_errno = err;
        snprintf(pc->error, sizeof pc->error, "%s", why);
        if (pc->sock >= 0)
            shutdown(pc->sock, SHUT_RDWR);   /* wakes the receive thread; Python closes */
        pc->sock = -1;
    }
    pthread_cond_broadcast(&pc->cond);
}

static void pc_fail(kvmlite_pc *pc, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void pc_fail(kvmlite_pc *pc, int err, const char *fmt, ...)
{
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&pc->lock);
    pc_fail_locked(pc, err, why);
    pthread_mutex_unlock(&pc->lock);
}

/* Write all of buf to the current link; -errno (and the link marked broken) on failure. */
static int pc_send_all(kvmlite_pc *pc, int sock, const void *buf, size_t len)
{
    const char *p = buf;
    pthread_mutex_lock(&pc->send_lock);
    while (len) {
        ssize_t n = send(sock, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {          /* a Python socket with a timeout is non-blocking */
                struct pollfd pfd = { .fd = sock, .events = POLLOUT };
                poll(&pfd, 1, 100);
                continue;
            }
            int err = errno;
            pthread_mutex_unlock(&pc->send_lock);
            pc_fail(pc, err, "sending on the return path failed: %s", strerror(err));
            return -err;
        }
        p += n;
        len -= (size_t)n;
        ADD(bytes_sent, (uint64_t)n);
    }
    pthread_mutex_unlock(&pc->send_lock);
    return 0;
}

static int kvmlite_pc_send(kvmlite_pc *pc, const void *buf, size_t len)
{
    pthread_mutex_lock(&pc->lock);
    int sock = pc->sock;
    pthread_mutex_unlock(&pc->lock);
    if (sock < 0)
        return -ENOTCONN;
    return pc_send_all(pc, sock, buf, len);
}

static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }   /* x86: little-endian, as the wire */
static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* ---- the fault thread ------------------------------------------------------------- */

/* Map the zero page without waking the waiter: the caller notes the page's new
   state and counts it first, so that the stats already count every fault a
   thread has come back from (then pc_wake). */
static int pc_zeropage(kvmlite_pc *pc, uint64_t addr)
{
    struct uffdio_zeropage z = { .range = { .start = addr, .len = PC_PAGE },
                                 .mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE };
    for (;;) {
        if (ioctl(pc->uffd, UFFDIO_ZEROPAGE, &z) == 0)
            return 0;
        if (errno != EAGAIN)                     /* EAGAIN: interrupted, nothing mapped; again */
            return -errno;
    }
}

static void pc_wake(kvmlite_pc *pc, uint64_t addr)
{
    struct uffdio_range r = { .start = addr, .len = PC_PAGE };
    ioctl(pc->uffd, UFFDIO_WAKE, &r);
}

static void pc_request(kvmlite_pc *pc, uint64_t page)
{
    uint64_t t0 = kvmlite_pc_now_ns();
    pthread_mutex_lock(&pc->lock);
    if (pc->nout < PC_OUTSTANDING) {
        pc->out[pc->nout].page = page;
        pc->out[pc->nout].t0 = t0;
        pc->nout++;
    }
    int sock = pc->sock;
    pthread_mutex_unlock(&pc->lock);
    if (sock < 0) {
        ADD(requests_unsent, 1);     /* the NEED set at recovery lists it first */
        return;
    }
    uint8_t rec[32];
    memset(rec, 0, sizeof rec);
    rec[0] = pc->w.request_type;
    put_u64(rec + 1, pc->gpa + page * PC_PAGE);
    put_u32(rec + 9, 1);
    pc_send_all(pc, sock, rec, pc->w.run_head);
}

static void pc_handle_fault(kvmlite_pc *pc, uint64_t addr)
{
    uint64_t base = (uint64_t)(uintptr_t)pc->ram;
    addr &= ~(uint64_t)(PC_PAGE - 1);
    if (addr < base || addr >= base + pc->npages * PC_PAGE) {
        ADD(stray, 1);                           /* not ours: cannot happen with one range */
        return;
    }
    uint64_t page = (addr - base) / PC_PAGE;
    uint8_t *s = &pc->state[page];
    for (;;) {
        uint8_t cur = __atomic_load_n(s, __ATOMIC_ACQUIRE);
        switch (cur) {
        case KVMLITE_PC_FREE:
        case KVMLITE_PC_OTHER: {
            /* Free at the switch: its contents do not matter to the guest, which
               writes a page after it takes it.  OTHER and missing: never written
               here, and not to come, so zero.  Either way, no round trip. */
            int r = pc_zeropage(pc, addr);
            if (r == 0 || r == -EEXIST) {            /* EEXIST: mapped meanwhile */
                if (cur == KVMLITE_PC_FREE) {
                    __atomic_store_n(s, KVMLITE_PC_ZERO_FREE, __ATOMIC_RELEASE);
                    ADD(zero_free, 1);
                } else {
                    __atomic_store_n(s, KVMLITE_PC_ZERO_OTHER, __ATOMIC_RELEASE);
                    ADD(zero_other, 1);
                }
                pc_wake(pc, addr);
            } else {
                pc_fail(pc, -r, "UFFDIO_ZEROPAGE at page %llu failed: %s",
                        (unsigned long long)page, strerror(-r));
            }
            return;
        }
        case KVMLITE_PC_PENDING:
            if (!__atomic_compare_exchange_n(s, &cur, KVMLITE_PC_REQUESTED, 0,
                                             __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                continue;                        /* the receive thread got there first */
            ADD(remote, 1);
            pc_request(pc, page);
            return;
        case KVMLITE_PC_REQUESTED:
            ADD(joined, 1);                      /* UFFDIO_COPY will wake this one too */
            return;
        default:                                 /* arrived, or zero-filled here already */
            pc_wake(pc, addr);
            ADD(already, 1);
            return;
        }
    }
}

static void *pc_fault_thread(void *arg)
{
    kvmlite_pc *pc = arg;
    struct uffd_msg msgs[64];
    struct pollfd pfd[2] = { { .fd = pc->uffd, .events = POLLIN },
                             { .fd = pc->stop_pipe[0], .events = POLLIN } };
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pfd[1].revents)
            break;
        ssize_t n = read(pc->uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            pc_fail(pc, errno, "reading the userfaultfd failed: %s", strerror(errno));
            break;
        }
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;                        /* no other event was asked for */
            ADD(fault_events, 1);
            pc_handle_fault(pc, msgs[i].arg.pagefault.address);
        }
    }
    return NULL;
}

/* ---- the receive thread ----------------------------------------------------------- */

/* A page that was still to come is here: note it, and time its request.
   Returns whether a fault had asked for it (someone may wait for it). */
static int pc_arrived(kvmlite_pc *pc, uint64_t page, uint64_t now)
{
    uint8_t *s = &pc->state[page];
    uint8_t cur = __atomic_load_n(s, __ATOMIC_ACQUIRE);
    for (;;) {
        uint8_t next = cur == KVMLITE_PC_REQUESTED ? KVMLITE_PC_FAULTED : KVMLITE_PC_PUSHED;
        if (__atomic_compare_exchange_n(s, &cur, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            break;
    }
    uint64_t left = __atomic_sub_fetch(&pc->st.pending_left, 1, __ATOMIC_RELAXED);
    if (left == 0)
        pc->st.t_last_page_ns = now;
    if (cur != KVMLITE_PC_REQUESTED)
        return 0;
    pthread_mutex_lock(&pc->lock);
    for (size_t i = 0; i < pc->nout; i++) {
        if (pc->out[i].page != page)
            continue;
        if (pc->nlat == pc->caplat) {
            size_t cap = pc->caplat ? pc->caplat * 2 : 4096;
            uint64_t *lat = realloc(pc->lat, cap * sizeof *lat);
            if (lat) {
                pc->lat = lat;
                pc->caplat = cap;
            }
        }
        if (pc->nlat < pc->caplat) {
            pc->lat[pc->nlat++] = now - pc->out[i].t0;
            pc->st.latency_samples = pc->nlat;
        }
        pc->out[i] = pc->out[--pc->nout];
        break;
    }
    pthread_mutex_unlock(&pc->lock);
    return 1;
}

static int pc_still_to_come(uint8_t s)
{
    return s == KVMLITE_PC_PENDING || s == KVMLITE_PC_REQUESTED;
}

/* Place `n` pages at `page` from `src` (PAGES) or as zero (src == NULL, ZERO).
   Only pages still to come are placed; the others already arrived (a page may
   come twice, e.g. pushed and then re-sent after a recovery) and are dropped. */
static int pc_place(kvmlite_pc *pc, uint64_t page, uint64_t n, const uint8_t *src)
{
    uint64_t base = (uint64_t)(uintptr_t)pc->ram;
    uint64_t i = 0;
    while (i < n) {
        if (!pc_still_to_come(__atomic_load_n(&pc->state[page + i], __ATOMIC_ACQUIRE))) {
            ADD(duplicates, 1);
            i++;
            continue;
        }
        uint64_t j = i + 1;                      /* a run of pages still to come: one ioctl */
        while (j < n && pc_still_to_come(__atomic_load_n(&pc->state[page + j], __ATOMIC_ACQUIRE)))
            j++;
        uint64_t dst = base + (page + i) * PC_PAGE, len = (j - i) * PC_PAGE;
        int64_t done;
        int r;
        if (src) {
            struct uffdio_copy c = { .dst = dst, .src = (uint64_t)(uintptr_t)(src + i * PC_PAGE),
                                     .len = len, .mode = UFFDIO_COPY_MODE_DONTWAKE };
            r = ioctl(pc->uffd, UFFDIO_COPY, &c) < 0 ? -errno : 0;
            done = c.copy;
        } else {
            struct uffdio_zeropage z = { .range = { .start = dst, .len = len },
                                         .mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE };
            r = ioctl(pc->uffd, UFFDIO_ZEROPAGE, &z) < 0 ? -errno : 0;
            done = z.zeropage;
        }
        uint64_t placed = r == 0 ? (j - i) : (done > 0 ? (uint64_t)done / PC_PAGE : 0);
        uint64_t now = kvmlite_pc_now_ns();
        /* Placed without waking anyone: note the pages first, so that the stats count
           every fault a thread has come back from; then wake the waiters.  Only a
           requested page can have one: a fault the fault thread has not read yet
           will find the page arrived and wake its thread itself. */
        int asked = 0;
        for (uint64_t k = i; k < i + placed; k++)
            asked |= pc_arrived(pc, page + k, now);
        if (asked) {
            struct uffdio_range wr = { .start = dst, .len = placed * PC_PAGE };
            ioctl(pc->uffd, UFFDIO_WAKE, &wr);
        }
        if (src)
            ADD(pages_received, placed);
        else
            ADD(zero_received, placed);
        i += placed;
        if (r == 0)
            continue;
        if (r == -EAGAIN)
            continue;                            /* interrupted part way: go on from `done` */
        if (r == -EEXIST) {
            /* Mapped although still to come: nothing here maps such a page, so
               this is a bug, not a race.  Refuse rather than guess. */
            pc_fail(pc, EEXIST, "page %llu is still to come but already mapped",
                    (unsigned long long)(page + i));
            return -EEXIST;
        }
        pc_fail(pc, -r, "placing page %llu failed: %s", (unsigned long long)(page + i),
                strerror(-r));
        return r;
    }
    return 0;
}

struct pc_rx {
    kvmlite_pc *pc;
    int sock;
    uint8_t *buf;
    size_t pos, end;
    uLong crc;
    uint64_t pages, zero_pages, offset;
    void *gmac;                  /* integrity on: this connection's page-tag key */
    uint64_t seq;                /* the next record's tag sequence number */
};

/* Make `n` bytes available at rx->buf + rx->pos; 0, or -1 with the link failed. */
static int rx_fill(struct pc_rx *rx, size_t n)
{
    kvmlite_pc *pc = rx->pc;
    if (rx->end - rx->pos >= n)
        return 0;
    if (rx->pos + n > PC_RECV_BUF) {
        memmove(rx->buf, rx->buf + rx->pos, rx->end - rx->pos);
        rx->end -= rx->pos;
        rx->pos = 0;
    }
    while (rx->end - rx->pos < n) {
        struct pollfd pfd = { .fd = rx->sock, .events = POLLIN };
        int pr = poll(&pfd, 1, pc->timeout_ms);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr == 0) {
            pc_fail(pc, ETIMEDOUT, "the source sent nothing for %d ms with %llu pages still to come",
                    pc->timeout_ms, (unsigned long long)__atomic_load_n(&pc->st.pending_left,
                                                                        __ATOMIC_RELAXED));
            return -1;
        }
        ssize_t got = recv(rx->sock, rx->buf + rx->end, PC_RECV_BUF - rx->end, 0);
        if (got < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (got <= 0) {
            int err = got < 0 ? errno : ECONNRESET;
            pc_fail(pc, err, "post-copy stream: %s after %llu bytes",
                    got < 0 ? strerror(err) : "the source closed the connection",
                    (unsigned long long)rx->offset);
            return -1;
        }
        rx->end += (size_t)got;
        ADD(bytes_received, (uint64_t)got);
    }
    return 0;
}

static void rx_consume_head(struct pc_rx *rx, size_t n)
{
    rx->crc = crc32(rx->crc, rx->buf + rx->pos, (uInt)n);
    rx->pos += n;
    rx->offset += n;
}

/* Check a run's range: inside RAM, aligned, 1..max_run pages.  Every page must be one
   the source said was still to come (or already came): anything else is refused. */
static int rx_check_run(struct pc_rx *rx, const char *name, uint64_t gpa, uint32_t n,
                        uint64_t *first)
{
    kvmlite_pc *pc = rx->pc;
    if (n < 1 || n > pc->w.max_run || (gpa & (PC_PAGE - 1)) || gpa < pc->gpa
            || (gpa - pc->gpa) / PC_PAGE > pc->npages
            || n > pc->npages - (gpa - pc->gpa) / PC_PAGE) {
        pc_fail(pc, EPROTO, "post-copy stream: %s record at byte %llu: %#llx x %u pages is "
                "not a run inside RAM", name, (unsigned long long)rx->offset,
                (unsigned long long)gpa, n);
        return -1;
    }
    *first = (gpa - pc->gpa) / PC_PAGE;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t s = __atomic_load_n(&pc->state[*first + i], __ATOMIC_ACQUIRE);
        if (!(s == KVMLITE_PC_PENDING || s == KVMLITE_PC_REQUESTED || s == KVMLITE_PC_PUSHED
              || s == KVMLITE_PC_FAULTED)) {
            pc_fail(pc, EPROTO, "post-copy stream: %s record at byte %llu carries page %#llx, "
                    "which was not still to come at the switch", name,
                    (unsigned long long)rx->offset,
                    (unsigned long long)(gpa + (uint64_t)i * PC_PAGE));
            return -1;
        }
    }
    return 0;
}

/* With integrity on, check a record's tags in the buffer before any of it is
   placed: PAGES has one per page (GMAC over the head, then the page), ZERO one
   over its head alone.  The IV is the record's sequence number on this
   connection and the page's index, as in the pre-copy stream. */
static int rx_check_tags(struct pc_rx *rx, const char *name, const uint8_t *rec, uint32_t n,
                         int pages, uint64_t gpa)
{
    kvmlite_pc *pc = rx->pc;
    const struct kvmlite_pc_wire *w = &pc->w;
    const uint8_t *payload = rec + w->run_head;
    const uint8_t *tags = payload + (pages ? (size_t)n * PC_PAGE : 0);
    uint8_t mine[TAG_LEN];
    uint32_t ntags = pages ? n : 1;
    for (uint32_t j = 0; j < ntags; j++) {
        if (gmac_tag(rx->gmac, rx->seq, j, rec, w->run_head, pages ? payload + (size_t)j * PC_PAGE
                     : NULL, pages ? PC_PAGE : 0, mine) != 0) {
            pc_fail(pc, EIO, "post-copy stream: libcrypto failed to check a tag");
            return -1;
        }
        if (CRYPTO_memcmp(mine, tags + (size_t)j * w->tag_size, TAG_LEN) != 0) {
            pc_fail(pc, EBADMSG, "post-copy stream: %s record at byte %llu: the tag of page %#llx "
                    "does not match (changed on the way); nothing of it was placed", name,
                    (unsigned long long)rx->offset,
                    (unsigned long long)(gpa + (uint64_t)(pages ? j : 0) * PC_PAGE));
            return -1;
        }
    }
    rx->seq++;
    return 0;
}

static void *pc_recv_thread(void *arg)
{
    struct pc_rx *rx = arg;
    kvmlite_pc *pc = rx->pc;
    const struct kvmlite_pc_wire *w = &pc->w;
    for (;;) {
        if (rx_fill(rx, 1) < 0)
            break;
        uint8_t type = rx->buf[rx->pos];
        if (type == w->pages_type || type == w->zero_type) {
            int pages = type == w->pages_type;
            const char *name = pages ? "PAGES" : "ZERO";
            if (rx_fill(rx, w->run_head) < 0)
                break;
            uint64_t gpa, first;
            uint32_t n;
            memcpy(&gpa, rx->buf + rx->pos + 1, 8);
            memcpy(&n, rx->buf + rx->pos + 9, 4);
            if (rx_check_run(rx, name, gpa, n, &first) < 0)
                break;
            /* The whole record (at most max_run pages, and its tags) is in the
               buffer before anything of it is placed. */
            size_t payload = pages ? (size_t)n * PC_PAGE : 0;
            size_t tags = rx->gmac ? (size_t)(pages ? n : 1) * w->tag_size : 0;
            if (rx_fill(rx, w->run_head + payload + tags) < 0)
                break;
            if (rx->gmac && rx_check_tags(rx, name, rx->buf + rx->pos, n, pages, gpa) < 0)
                break;
            rx_consume_head(rx, w->run_head);
            if (pages)
                rx->pages += n;
            else
                rx->zero_pages += n;
            if (pc_place(pc, first, n, pages ? rx->buf + rx->pos : NULL) < 0)
                break;
            rx->pos += payload + tags;
            rx->offset += payload + tags;
            continue;
        }
        if (type == w->end_type) {
            if (rx_fill(rx, w->end_head + 4) < 0)
                break;
            uint64_t pages, zero_pages;
            uint32_t crc;
            memcpy(&pages, rx->buf + rx->pos + 1, 8);
            memcpy(&zero_pages, rx->buf + rx->pos + 9, 8);
            memcpy(&crc, rx->buf + rx->pos + w->end_head, 4);
            uLong mine = crc32(rx->crc, rx->buf + rx->pos, w->end_head);
            uint64_t left = __atomic_load_n(&pc->st.pending_left, __ATOMIC_RELAXED);
            if (mine != crc) {
                pc_fail(pc, EPROTO, "post-copy stream: checksum mismatch: POSTCOPY-END says %#010x, "
                        "the stream checksums to %#010lx", crc, mine);
                break;
            }
            if (pages != rx->pages || zero_pages != rx->zero_pages) {
                pc_fail(pc, EPROTO, "post-copy stream: POSTCOPY-END counts %llu pages and %llu "
                        "zero pages, but the stream carried %llu and %llu",
                        (unsigned long long)pages, (unsigned long long)zero_pages,
                        (unsigned long long)rx->pages, (unsigned long long)rx->zero_pages);
                break;
            }
            if (left) {
                pc_fail(pc, EPROTO, "post-copy stream ended with %llu pages still to come",
                        (unsigned long long)left);
                break;
            }
            rx->pos += w->end_head + 4;
            if (rx->end != rx->pos) {
                pc_fail(pc, EPROTO, "post-copy stream: %zu unexpected bytes after POSTCOPY-END",
                        rx->end - rx->pos);
                break;
            }
            /* DONE, and with integrity its tag: a forged DONE would make the
               source stop serving pages this side still needs. */
            uint8_t done[64];
            memset(done, 0, sizeof done);
            done[0] = w->done_type;
            put_u64(done + 1, pc->st.pending_total);
            if (rx->gmac && gmac_tag(rx->gmac, w->done_seq, 0, done, w->done_head, NULL, 0,
                                     done + w->done_head) != 0) {
                pc_fail(pc, EIO, "libcrypto failed to tag DONE");
                break;
            }
            if (pc_send_all(pc, rx->sock, done, w->done_head + (rx->gmac ? w->tag_size : 0)) < 0)
                break;
            pthread_mutex_lock(&pc->lock);
            if (pc->st.link == KVMLITE_PC_LINK_UP)
                pc->st.link = KVMLITE_PC_LINK_DONE;
            pc->sock = -1;
            pthread_cond_broadcast(&pc->cond);
            pthread_mutex_unlock(&pc->lock);
            break;
        }
        pc_fail(pc, EPROTO, "post-copy stream: unknown record type %#04x at byte %llu", type,
                (unsigned long long)rx->offset);
        break;
    }
    if (rx->gmac)
        kvmlite_gmac_free(rx->gmac);
    free(rx->buf);
    free(rx);
    return NULL;
}

/* ---- control, from Python ---------------------------------------------------------- */

static kvmlite_pc *kvmlite_pc_new(int uffd, void *ram, uint64_t ram_gpa, uint64_t npages,
                                  uint8_t *state, const struct kvmlite_pc_wire *wire)
{
    kvmlite_pc *pc = calloc(1, sizeof *pc);
    if (!pc)
        return NULL;
    if (pipe2(pc->stop_pipe, O_CLOEXEC) < 0) {
        free(pc);
        return NULL;
    }
    pc->uffd = uffd;
    pc->ram = ram;
    pc->gpa = ram_gpa;
    pc->npages = npages;
    pc->state = state;
    pc->w = *wire;
    pc->sock = -1;
    pthread_mutex_init(&pc->lock, NULL);
    pthread_mutex_init(&pc->send_lock, NULL);
    pthread_cond_init(&pc->cond, NULL);
    uint64_t pending = 0;
    for (uint64_t i = 0; i < npages; i++)
        pending += pc_still_to_come(state[i]);
    pc->st.pending_total = pc->st.pending_left = pending;
    pc->st.t_last_page_ns = 0;
    return pc;
}

/* Start resolving faults (before the guest resumes; free pages need no link). */
static int kvmlite_pc_start_faults(kvmlite_pc *pc)
{
    if (pc->fault_running)
        return -EALREADY;
    pc->st.t_start_ns = kvmlite_pc_now_ns();
    if (pc->st.pending_left == 0)
        pc->st.t_last_page_ns = pc->st.t_start_ns;
    int r = pthread_create(&pc->fault_thr, NULL, pc_fault_thread, pc);
    if (r)
        return -r;
    pc->fault_running = 1;
    return 0;
}

/* Use `sock` as the link: a receive thread reads the post-copy stream from it, and
   requests go out on it.  Called once after the switch, again after each recovery. */
static int kvmlite_pc_attach(kvmlite_pc *pc, int sock, int timeout_ms, const uint8_t *key,
                             uint64_t seq0)
{
    if (pc->recv_running) {
        pthread_join(pc->recv_thr, NULL);
        pc->recv_running = 0;
    }
    struct pc_rx *rx = calloc(1, sizeof *rx);
    if (!rx)
        return -ENOMEM;
    rx->buf = malloc(PC_RECV_BUF);
    if (!rx->buf) {
        free(rx);
        return -ENOMEM;
    }
    rx->pc = pc;
    rx->sock = sock;
    rx->seq = seq0;
    if (key != NULL && pc->w.tag_size) {
        rx->gmac = kvmlite_gmac_new(key);
        if (rx->gmac == NULL) {
            free(rx->buf);
            free(rx);
            return -ENOMEM;
        }
    }
    pthread_mutex_lock(&pc->lock);
    if (pc->st.link == KVMLITE_PC_LINK_DONE) {
        pthread_mutex_unlock(&pc->lock);
        if (rx->gmac)
            kvmlite_gmac_free(rx->gmac);
        free(rx->buf);
        free(rx);
        return -EALREADY;
    }
    pc->sock = sock;
    pc->timeout_ms = timeout_ms > 0 ? timeout_ms : -1;
    pc->st.link = KVMLITE_PC_LINK_UP;
    pc->st.error_errno = 0;
    pc->error[0] = 0;
    pthread_mutex_unlock(&pc->lock);
    int r = pthread_create(&pc->recv_thr, NULL, pc_recv_thread, rx);
    if (r) {
        if (rx->gmac)
            kvmlite_gmac_free(rx->gmac);
        free(rx->buf);
        free(rx);
        pc_fail(pc, r, "cannot start the post-copy receive thread");
        return -r;
    }
    pc->recv_running = 1;
    return 0;
}

/* Wait until the link is no longer up: KVMLITE_PC_LINK_DONE (every page is here)
   or KVMLITE_PC_LINK_BROKEN; KVMLITE_PC_LINK_UP if timeout_ms passed first. */
static int kvmlite_pc_wait(kvmlite_pc *pc, int timeout_ms)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&pc->lock);
    while (pc->st.link == KVMLITE_PC_LINK_UP) {
        if (timeout_ms < 0)
            pthread_cond_wait(&pc->cond, &pc->lock);
        else if (pthread_cond_timedwait(&pc->cond, &pc->lock, &until) == ETIMEDOUT)
            break;
    }
    int link = (int)pc->st.link;
    pthread_mutex_unlock(&pc->lock);
    if (link != KVMLITE_PC_LINK_UP && pc->recv_running) {
        pthread_join(pc->recv_thr, NULL);
        pc->recv_running = 0;
    }
    return link;
}

static void kvmlite_pc_break(kvmlite_pc *pc, const char *why)
{
    pc_fail(pc, ECONNABORTED, "%s", why);
}

static void kvmlite_pc_stats(kvmlite_pc *pc, struct kvmlite_pc_stats *out)
{
    pthread_mutex_lock(&pc->lock);
    *out = pc->st;
    out->pending_left = __atomic_load_n(&pc->st.pending_left, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&pc->lock);
}

static size_t kvmlite_pc_latencies(kvmlite_pc *pc, uint64_t *out, size_t cap)
{
    pthread_mutex_lock(&pc->lock);
    size_t n = pc->nlat < cap ? pc->nlat : cap;
    memcpy(out, pc->lat, n * sizeof *out);
    pthread_mutex_unlock(&pc->lock);
    return n;
}

static size_t kvmlite_pc_error(kvmlite_pc *pc, char *out, size_t cap)
{
    pthread_mutex_lock(&pc->lock);
    size_t n = strlen(pc->error);
    if (n > cap)
        n = cap;
    memcpy(out, pc->error, n);
    pthread_mutex_unlock(&pc->lock);
    return n;
}

/* The pages requested and not yet here, oldest first: recovery asks for these first. */
static size_t kvmlite_pc_requested(kvmlite_pc *pc, uint64_t *out, size_t cap)
{
    pthread_mutex_lock(&pc->lock);
    size_t n = pc->nout < cap ? pc->nout : cap;
    for (size_t i = 0; i < n; i++)
        out[i] = pc->out[i].page;
    pthread_mutex_unlock(&pc->lock);
    return n;
}

/* Stop both threads.  The caller has unregistered the range first (or tears the
   VM down): a fault that came after this would wait for nobody. */
static void kvmlite_pc_stop(kvmlite_pc *pc)
{
    pc_fail(pc, ECANCELED, "post-copy stopped");
    if (pc->fault_running) {
        char c = 1;
        while (write(pc->stop_pipe[1], &c, 1) < 0 && errno == EINTR)
            ;
        pthread_join(pc->fault_thr, NULL);
        pc->fault_running = 0;
    }
    if (pc->recv_running) {
        pthread_join(pc->recv_thr, NULL);
        pc->recv_running = 0;
    }
}

static void kvmlite_pc_free(kvmlite_pc *pc)
{
    if (!pc)
        return;
    kvmlite_pc_stop(pc);
    close(pc->stop_pipe[0]);
    close(pc->stop_pipe[1]);
    pthread_mutex_destroy(&pc->lock);
    pthread_mutex_destroy(&pc->send_lock);
    pthread_cond_destroy(&pc->cond);
    free(pc->lat);
    free(pc);
}

/* ==== the source's page server ========================================================
   After the switch the source VMM has one job: get every page still to come to the
   destination, the ones a fault waits for first.  One loop, on the migration thread
   (called without the GIL): read the return path and serve each REQUEST at once,
   then push the next batch of pages in the background, keeping at most
   max_inflight bytes queued on the socket so that a requested page never waits
   behind much; then POSTCOPY-END, then wait for DONE. */

#include <linux/sockios.h>
#include <sys/uio.h>

enum { KVMLITE_PCS_PENDING = 1, KVMLITE_PCS_FREE = 2, KVMLITE_PCS_TO_SEND = 4,
       KVMLITE_PCS_SENT = 8 };

struct kvmlite_pcs_stats {
    uint64_t pages_pushed, pages_on_request, zero_pages, pages_resent;
    uint64_t requests, requests_already_sent, requests_for_free, requests_not_pending;
    uint64_t bytes_sent, bytes_received, to_send_left, pending_total, t_start_ns, t_done_ns;
    int64_t link, error_errno;
};

#define PCS_MAX_BATCH 256            /* pages per sendmsg at most */
#define PCS_RBUF 65536

typedef struct kvmlite_pcs {
    const uint8_t *ram;
    uint64_t gpa, npages;
    uint8_t *flags;
    struct kvmlite_pc_wire w;
    struct kvmlite_pcs_stats st;
    volatile int cancel;
    int sock;
    char error[512];
    /* per connection */
    void *gmac;                     /* integrity on: this connection's page-tag key */
    uint64_t seq;                   /* the next record's tag sequence number */
    uint64_t cursor, crc, pages, zero;
    int end_sent;
    uint8_t rbuf[PCS_RBUF];
    size_t rlen, left_pos;
    uint64_t last_progress_ns;
    int timeout_ms;
} kvmlite_pcs;

static int pcs_fail(kvmlite_pcs *s, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int pcs_fail(kvmlite_pcs *s, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->error, sizeof s->error, fmt, ap);
    va_end(ap);
    s->st.error_errno = err;
    s->st.link = KVMLITE_PC_LINK_BROKEN;
    return -1;
}

static kvmlite_pcs *kvmlite_pcs_new(const uint8_t *ram, uint64_t ram_gpa, uint64_t npages,
                                    uint8_t *flags, const struct kvmlite_pc_wire *wire)
{
    kvmlite_pcs *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->ram = ram;
    s->gpa = ram_gpa;
    s->npages = npages;
    s->flags = flags;
    s->w = *wire;
    s->sock = -1;
    for (uint64_t i = 0; i < npages; i++)
        s->st.pending_total += (flags[i] & KVMLITE_PCS_PENDING) != 0;
    return s;
}

/* The page server's flags from the switch's two sets (uint64 words, bit i = page i),
   in one pass: this runs in the switch's downtime (~0.3 ms for 1 GiB, against ~2 ms
   with numpy). */
static void kvmlite_pcs_flags(uint8_t *flags, const uint64_t *pending, const uint64_t *free_,
                              uint64_t npages)
{
    memset(flags, 0, npages);
    for (uint64_t w = 0; w < (npages + 63) / 64; w++) {
        uint64_t p = pending[w], f = free_[w];
        while (p) {
            uint64_t i = w * 64 + (uint64_t)__builtin_ctzll(p);
            flags[i] = KVMLITE_PCS_PENDING | KVMLITE_PCS_TO_SEND;
            p &= p - 1;
        }
        while (f) {
            uint64_t i = w * 64 + (uint64_t)__builtin_ctzll(f);
            flags[i] |= KVMLITE_PCS_FREE;
            f &= f - 1;
        }
    }
}

static int pcs_page_is_zero(const uint8_t *page)
{
    const uint64_t *p = (const uint64_t *)page;
    for (size_t i = 0; i < PC_PAGE / 8; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Write the whole iovec, waiting (poll) while the socket is full; -1 on failure. */
static int pcs_writev(kvmlite_pcs *s, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t k = sendmsg(s->sock, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                struct pollfd pfd = { .fd = s->sock, .events = POLLOUT };
                int r = poll(&pfd, 1, s->timeout_ms);

                if (r == 0)
                    return pcs_fail(s, ETIMEDOUT, "the destination took nothing in for %d ms",
                                    s->timeout_ms);
                if (s->cancel)
                    return pcs_fail(s, ECANCELED, "post-copy link cut by this VMM");
                continue;
            }
            if (s->cancel)
                return pcs_fail(s, ECANCELED, "post-copy link cut by this VMM");
            return pcs_fail(s, errno, "post-copy link broken: %s", strerror(errno));
        }
        s->st.bytes_sent += (uint64_t)k;
        s->last_progress_ns = kvmlite_pc_now_ns();
        while (n > 0 && (size_t)k >= iov->iov_len) {
            k -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + k;
            iov->iov_len -= (size_t)k;
        }
    }
    return 0;
}

/* Send `n` pages (ascending page numbers, n <= PCS_MAX_BATCH): runs of
   consecutive pages as PAGES records straight from guest RAM, all-zero pages
   as ZERO records; with integrity, each record followed by its tags (the
   source's guest is paused for good, so a tag always matches its page). */
static int pcs_send_pages(kvmlite_pcs *s, const uint64_t *pages, size_t n, int requested)
{
    uint8_t heads[PCS_MAX_BATCH][16];
    uint8_t tags[PCS_MAX_BATCH * 2][TAG_LEN];
    struct iovec iov[3 * PCS_MAX_BATCH];
    int niov = 0;
    size_t nh = 0, nt = 0, i = 0;
    while (i < n) {
        uint64_t first = pages[i];
        int zero = pcs_page_is_zero(s->ram + first * PC_PAGE);
        size_t j = i + 1;
        while (j < n && j - i < s->w.max_run && pages[j] == pages[j - 1] + 1
               && pcs_page_is_zero(s->ram + pages[j] * PC_PAGE) == zero)
            j++;
        uint32_t count = (uint32_t)(j - i);
        uint8_t *h = heads[nh++];
        const uint8_t *data = s->ram + first * PC_PAGE;
        h[0] = zero ? s->w.zero_type : s->w.pages_type;
        put_u64(h + 1, s->gpa + first * PC_PAGE);
        put_u32(h + 9, count);
        s->crc = crc32((uLong)s->crc, h, s->w.run_head);
        iov[niov].iov_base = h;
        iov[niov++].iov_len = s->w.run_head;
        if (zero) {
            s->zero += count;
            s->st.zero_pages += count;
        } else {
            iov[niov].iov_base = (void *)data;
            iov[niov++].iov_len = (size_t)count * PC_PAGE;
            s->pages += count;
        }
        if (s->gmac) {
            uint32_t ntags = zero ? 1 : count;
            for (uint32_t k = 0; k < ntags; k++)
                if (gmac_tag(s->gmac, s->seq, k, h, s->w.run_head, zero ? NULL : data + (size_t)k * PC_PAGE,
                             zero ? 0 : PC_PAGE, tags[nt + k]) != 0)
                    return pcs_fail(s, EIO, "libcrypto failed to tag a post-copy record");
            iov[niov].iov_base = tags[nt];
            iov[niov++].iov_len = (size_t)ntags * TAG_LEN;
            nt += ntags;
            s->seq++;
        }
        for (size_t k = i; k < j; k++) {
            uint8_t *f = &s->flags[pages[k]];
            if (*f & KVMLITE_PCS_SENT)
                s->st.pages_resent++;
            *f = (uint8_t)((*f & ~KVMLITE_PCS_TO_SEND) | KVMLITE_PCS_SENT);
        }
        if (requested)
            s->st.pages_on_request += count;
        else
            s->st.pages_pushed += count;
        s->st.to_send_left -= count;
        i = j;
    }
    return pcs_writev(s, iov, niov);
}

static int pcs_serve_request(kvmlite_pcs *s, uint64_t gpa, uint32_t n)
{
    s->st.requests++;
    if (n < 1 || n > s->w.max_run || (gpa & (PC_PAGE - 1)) || gpa < s->gpa
            || (gpa - s->gpa) / PC_PAGE >= s->npages || n > s->npages - (gpa - s->gpa) / PC_PAGE)
        return pcs_fail(s, EPROTO, "return path: REQUEST for %#llx x %u pages is not a run "
                        "inside RAM", (unsigned long long)gpa, n);
    uint64_t first = (gpa - s->gpa) / PC_PAGE;
    uint64_t want[PCS_MAX_BATCH];
    size_t nw = 0;
    int free_hit = 0, stray = 0;
    for (uint64_t p = first; p < first + n; p++) {
        uint8_t f = s->flags[p];
        free_hit |= (f & KVMLITE_PCS_FREE) != 0;
        stray |= !(f & KVMLITE_PCS_PENDING);
        if (f & KVMLITE_PCS_TO_SEND) {
            want[nw++] = p;
            if (nw == PCS_MAX_BATCH) {
                if (pcs_send_pages(s, want, nw, 1) < 0)
                    return -1;
                nw = 0;
            }
        }
    }
    s->st.requests_for_free += free_hit;
    s->st.requests_not_pending += stray;
    if (nw == 0) {
        s->st.requests_already_sent++;     /* on its way: TCP keeps the order */
        return 0;
    }
    if (pcs_send_pages(s, want, nw, 1) < 0)
        return -1;
    /* Go on pushing right after it: a guest that faults on one page tends to want
       its neighbours next (QEMU does the same). */
    s->cursor = want[nw - 1] + 1;
    return 0;
}

/* Read and serve what the destination sent.  0: nothing more now; 1: DONE; -1: failed. */
static int pcs_read_returns(kvmlite_pcs *s)
{
    for (;;) {
        ssize_t k = recv(s->sock, s->rbuf + s->rlen, PCS_RBUF - s->rlen, MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            if (s->cancel)
                return pcs_fail(s, ECANCELED, "post-copy link cut by this VMM");
            return pcs_fail(s, errno, "post-copy link broken: %s", strerror(errno));
        }
        if (k == 0) {
            if (s->cancel)
                return pcs_fail(s, ECANCELED, "post-copy link cut by this VMM");
            return pcs_fail(s, ECONNRESET, "the destination closed the connection");
        }
        s->st.bytes_received += (uint64_t)k;
        s->last_progress_ns = kvmlite_pc_now_ns();
        s->rlen += (size_t)k;
        size_t pos = 0;
        while (pos < s->rlen) {
            uint8_t type = s->rbuf[pos];
            if (type == s->w.request_type) {
                if (s->rlen - pos < s->w.run_head)
                    break;
                uint64_t gpa;
                uint32_t n;
                memcpy(&gpa, s->rbuf + pos + 1, 8);
                memcpy(&n, s->rbuf + pos + 9, 4);
                pos += s->w.run_head;
                if (pcs_serve_request(s, gpa, n) < 0)
                    return -1;
            } else if (type == s->w.done_type) {
                size_t done_size = s->w.done_head + (s->gmac ? s->w.tag_size : 0);
                if (s->rlen - pos < done_size)
                    break;
                uint64_t pages;
                memcpy(&pages, s->rbuf + pos + 1, 8);
                if (s->gmac) {
                    uint8_t mine[TAG_LEN];
                    if (gmac_tag(s->gmac, s->w.done_seq, 0, s->rbuf + pos, s->w.done_head, NULL, 0,
                                 mine) != 0)
                        return pcs_fail(s, EIO, "libcrypto failed to check DONE's tag");
                    if (CRYPTO_memcmp(mine, s->rbuf + pos + s->w.done_head, TAG_LEN) != 0)
                        return pcs_fail(s, EBADMSG, "return path: DONE's tag does not match "
                                        "(changed on the way)");
                }
                if (!s->end_sent || s->st.to_send_left)
                    return pcs_fail(s, EPROTO, "the destination said DONE with %llu pages not "
                                    "yet sent", (unsigned long long)s->st.to_send_left);
                if (pages != s->st.pending_total)
                    return pcs_fail(s, EPROTO, "the destination says DONE for %llu pages; %llu "
                                    "were still to come", (unsigned long long)pages,
                                    (unsigned long long)s->st.pending_total);
                /* What follows DONE (the destination's stats frame) is Python's
                   to read: kvmlite_pcs_leftover hands over what came with it. */
                s->left_pos = pos + done_size;
                return 1;
            } else {
                return pcs_fail(s, EPROTO, "return path: unknown record type %#04x", type);
            }
        }
        memmove(s->rbuf, s->rbuf + pos, s->rlen - pos);
        s->rlen -= pos;
    }
}

static int pcs_push(kvmlite_pcs *s, uint32_t batch)
{
    uint64_t pages[PCS_MAX_BATCH];
    size_t n = 0;
    uint64_t scanned = 0;
    if (batch > PCS_MAX_BATCH)
        batch = PCS_MAX_BATCH;
    while (n < batch && scanned < s->npages) {
        if (s->cursor >= s->npages)
            s->cursor = 0;
        if (s->flags[s->cursor] & KVMLITE_PCS_TO_SEND)
            pages[n++] = s->cursor;
        else if (n)
            break;                      /* send the run so far; the next batch finds the rest */
        s->cursor++;
        scanned++;
    }
    return n ? pcs_send_pages(s, pages, n, 0) : 0;
}

static void pcs_wait_readable(kvmlite_pcs *s, long ns)
{
    struct pollfd pfd = { .fd = s->sock, .events = POLLIN };
    struct timespec t = { .tv_sec = ns / 1000000000L, .tv_nsec = ns % 1000000000L };
    ppoll(&pfd, 1, &t, NULL);
}

/* Serve the destination over `sock` until DONE (returns KVMLITE_PC_LINK_DONE) or a
   failure (KVMLITE_PC_LINK_BROKEN, error in kvmlite_pcs_error).  Pages flagged
   TO_SEND are sent; after a broken link Python sets them from the NEED record and
   calls this again with the new connection. */
static int kvmlite_pcs_run(kvmlite_pcs *s, int sock, uint32_t push_batch, uint32_t max_inflight,
                           int push, int timeout_ms, const uint8_t *key, uint64_t seq0,
                           uint64_t bandwidth)
{
    if (s->gmac) {
        kvmlite_gmac_free(s->gmac);
        s->gmac = NULL;
    }
    if (key != NULL && s->w.tag_size) {
        s->gmac = kvmlite_gmac_new(key);
        if (s->gmac == NULL)
            return (pcs_fail(s, ENOMEM, "libcrypto could not set up AES-128-GCM"),
                    KVMLITE_PC_LINK_BROKEN);
    }
    s->seq = seq0;
    s->sock = sock;
    s->timeout_ms = timeout_ms > 0 ? timeout_ms : 30000;
    s->cursor = 0;
    s->crc = 0;
    s->pages = s->zero = 0;
    s->end_sent = 0;
    s->rlen = s->left_pos = 0;
    s->cancel = 0;
    s->error[0] = 0;
    s->st.link = KVMLITE_PC_LINK_UP;
    s->st.error_errno = 0;
    s->st.to_send_left = 0;
    for (uint64_t i = 0; i < s->npages; i++)
        s->st.to_send_left += (s->flags[i] & KVMLITE_PCS_TO_SEND) != 0;
    if (!s->st.t_start_ns)
        s->st.t_start_ns = kvmlite_pc_now_ns();
    s->last_progress_ns = kvmlite_pc_now_ns();
    /* bandwidth (bytes/s, 0: none): the push waits while this connection has sent
       more than that allows; requested pages go at once and count against it. */
    uint64_t bw_t0 = kvmlite_pc_now_ns(), bw_bytes0 = s->st.bytes_sent;
    int last_outq = -1;
    for (;;) {
        if (s->cancel)
            return (pcs_fail(s, ECANCELED, "post-copy link cut by this VMM"), KVMLITE_PC_LINK_BROKEN);
        int r = pcs_read_returns(s);
        if (r < 0)
            return KVMLITE_PC_LINK_BROKEN;
        if (r == 1) {
            s->st.t_done_ns = kvmlite_pc_now_ns();
            s->st.link = KVMLITE_PC_LINK_DONE;
            return KVMLITE_PC_LINK_DONE;
        }
        int outq = 0;
        if (ioctl(sock, SIOCOUTQ, &outq) < 0)
            outq = 0;
        if (outq < last_outq)
            s->last_progress_ns = kvmlite_pc_now_ns();

        last_outq = outq;
        uint64_t ahead_ns = 0;
        if (bandwidth) {
            uint64_t sent = s->st.bytes_sent - bw_bytes0;
            uint64_t due = (uint64_t)((double)sent * 1e9 / (double)bandwidth);
            uint64_t spent = kvmlite_pc_now_ns() - bw_t0;
            ahead_ns = due > spent ? due - spent : 0;
        }
        if (s->st.to_send_left && push) {
            if ((uint32_t)outq > max_inflight || ahead_ns) {
                /* 100 us (or until the bandwidth allows more), or at once on a request */
                pcs_wait_readable(s, ahead_ns && ahead_ns < 100000 ? (long)ahead_ns : 100000);
            } else if (pcs_push(s, push_batch) < 0) {
                return KVMLITE_PC_LINK_BROKEN;
            }
        } else if (!s->st.to_send_left && !s->end_sent) {
            uint8_t end[32];
            end[0] = s->w.end_type;
            put_u64(end + 1, s->pages);
            put_u64(end + 9, s->zero);
            uint32_t crc = (uint32_t)crc32((uLong)s->crc, end, s->w.end_head);
            put_u32(end + s->w.end_head, crc);
            struct iovec iov = { .iov_base = end, .iov_len = s->w.end_head + 4 };
            if (pcs_writev(s, &iov, 1) < 0)
                return KVMLITE_PC_LINK_BROKEN;
            s->end_sent = 1;
        } else {
            pcs_wait_readable(s, 20000000);              /* requests only, or waiting for DONE */
        }
        /* Nothing taken in (bytes queued, none acknowledged) or no DONE after the
           last page, for timeout_ms: the link is gone even if TCP has not said so. */
        int64_t idle = (int64_t)(kvmlite_pc_now_ns() - s->last_progress_ns);
        if ((outq > 0 || s->end_sent) && idle > (int64_t)s->timeout_ms * 1000000)
            return (pcs_fail(s, ETIMEDOUT, outq > 0 ? "the destination took nothing in for %d ms"
                             : "no DONE from the destination %d ms after the last page",
                             s->timeout_ms), KVMLITE_PC_LINK_BROKEN);
    }
}

/* The bytes that came after DONE in the same read (the start of the stats frame). */
static size_t kvmlite_pcs_leftover(kvmlite_pcs *s, uint8_t *out, size_t cap)
{
    size_t n = s->rlen > s->left_pos ? s->rlen - s->left_pos : 0;
    if (n > cap)
        n = cap;
    memcpy(out, s->rbuf + s->left_pos, n);
    return n;
}

/* From another thread: make kvmlite_pcs_run return (the caller also shuts the socket down). */
static void kvmlite_pcs_cancel(kvmlite_pcs *s)
{
    s->cancel = 1;
}

static void kvmlite_pcs_stats(kvmlite_pcs *s, struct kvmlite_pcs_stats *out)
{
    *out = s->st;
}

static size_t kvmlite_pcs_error(kvmlite_pcs *s, char *out, size_t cap)
{
    size_t n = strnlen(s->error, sizeof s->error);
    if (n > cap)
        n = cap;
    memcpy(out, s->error, n);
    return n;
}

static void kvmlite_pcs_free(kvmlite_pcs *s)
{
    if (s && s->gmac)
        kvmlite_gmac_free(s->gmac);
    free(s);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmlite._postcopy", SOURCE, extra_compile_args=["-O2", "-pthread"],
                      libraries=["z", "pthread", "crypto"])

if __name__ == "__main__":
    import os
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ffibuilder.compile(verbose=False)
