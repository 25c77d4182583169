"""A thread's moment at the front of the run queue: the downtime of a migration.

While the guest is paused, every millisecond a migration thread waits for a
CPU is downtime.  On a host whose CPUs are busy (other VMs, other jobs) the
normal scheduler makes a woken thread wait for its turn, milliseconds at a
time.  Each helper runs a block with threads favoured and puts them back
afterwards, if the process may (CAP_SYS_NICE, or RLIMIT_RTPRIO / RLIMIT_NICE);
otherwise it changes nothing:

* `realtime()`: the calling thread in SCHED_FIFO at the lowest real-time
  priority.  Only for blocks that wait on I/O most of the time and end by
  themselves (the source's downtime, its guest paused): nothing but the
  kernel's real-time throttling bounds it.
* `favoured(tids)`: threads at nice -10: first after a wake-up, yet others
  keep a share.  For the destination's receiving thread from the first round
  on (real time there starved a source guest on the same host of its CPU:
  rounds found nothing dirty) and for the source's vCPU threads from the
  pause until their state is saved (each must get a CPU to park, and again
  to save its registers on its own thread).

Measured on the old core (1 GiB guest, 25 % live + 50 % stale, idle=0, live,
hint on, 12 interleaved pairs on a 2-CPU host shared with other jobs):
downtime median 2.70 ms, max 3.69 ms, 0 runs over 5 ms, against 4.54 ms,
15.18 ms and 5 of 12 without; bench/local.py and `make bench-qemu` measure it
on this one.  New threads inherit a real-time policy: none is started inside.
"""

from __future__ import annotations

import contextlib
import os
import threading

FAVOURED_NICE = -10


@contextlib.contextmanager
def realtime():
    """The calling thread in SCHED_FIFO (lowest priority) while the block runs, if allowed.
    Yields whether it is."""
    try:
        old = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))   # 0: the calling thread
    except OSError:           # EPERM: not allowed here; run at the normal priority
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, old[0], old[1])


@contextlib.contextmanager
def favoured(tids=None, nice: int = FAVOURED_NICE):
    """Threads of this process (native ids; default: the calling thread) at a
    lower nice value (more CPU share, sooner after a wake-up) while the block
    runs, if the process may; unlike real time, other threads still get their
    share.  Yields the ids it changed."""
    if tids is None:
        tids = [threading.get_native_id()]
    changed = []
    try:
        for tid in tids:
            try:
                old = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, nice)   # PRIO_PROCESS with a tid: that thread only
            except OSError:     # not allowed, or the thread has ended
                continue
            changed.append((tid, old))
        yield [tid for tid, _ in changed]
    finally:
        for tid, old in changed:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, old)
            except OSError:
                pass
