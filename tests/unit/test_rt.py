"""kvmlite.rt: a thread favoured for a block, that thread alone, and put back afterwards."""

from __future__ import annotations

import os
import threading

import pytest

from kvmlite.rt import favoured, realtime


def test_realtime_is_the_calling_threads_and_ends_with_the_block():
    """Inside, this thread is SCHED_FIFO (when allowed) and another thread is not; after, as before."""
    before = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
    seen, go = {}, threading.Event()
    t = threading.Thread(target=lambda: (go.wait(5), seen.update(other=os.sched_getscheduler(0))))
    t.start()                           # before the block: a new thread would inherit the policy
    with realtime() as on:
        inside = os.sched_getscheduler(0)
        go.set()
        t.join()
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before
    assert seen["other"] == before[0]
    assert inside == (os.SCHED_FIFO if on else before[0])


def test_realtime_without_the_right_changes_nothing():
    """A process that may not use real-time priorities runs the block as it is."""
    import resource
    if os.geteuid() == 0:
        pytest.skip("root may always: the refusal path needs an unprivileged process")
    soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
    if soft > 0:
        pytest.skip("RLIMIT_RTPRIO allows real-time priorities here")
    with realtime() as on:
        assert not on and os.sched_getscheduler(0) != os.SCHED_FIFO


def test_favoured_lowers_the_given_threads_nice_values_and_restores_them():
    """favoured([tids]) changes those threads only, for the block only."""
    ready, go = threading.Event(), threading.Event()
    box = {}

    def other():
        box["tid"] = threading.get_native_id()
        ready.set()
        go.wait(5)
    t = threading.Thread(target=other)
    t.start()
    ready.wait(5)
    me = threading.get_native_id()
    mine, theirs = os.getpriority(os.PRIO_PROCESS, me), os.getpriority(os.PRIO_PROCESS, box["tid"])
    with favoured([box["tid"]], nice=-5) as changed:
        during = os.getpriority(os.PRIO_PROCESS, box["tid"])
        assert os.getpriority(os.PRIO_PROCESS, me) == mine
    assert os.getpriority(os.PRIO_PROCESS, box["tid"]) == theirs
    go.set()
    t.join(5)
    assert during == (-5 if changed else theirs)
