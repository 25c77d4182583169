"""The sender's decisions against a fake VM, without KVM: claim 2's order,
convergence, auto-converge, cancel, and the handover's outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from kvmlite.bitmap import PAGE_SIZE
from kvmlite.config import MigrationParams
from kvmlite.migration import destination
from kvmlite.migration.source import Migration
from kvmlite.migration.status import MigrationStatus as S
from kvmlite.vstate.memory import GuestMemory

from tests.fakes import FakeMachine, StreamSink, socketpair_source

NPAGES = 4096                   # 16 MiB


@pytest.fixture(params=["bitmap", "ring"])
def machine(request):
    """A fake VM whose dirty pages are tracked by the bitmap log or by the vCPUs' dirty rings."""
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    for p in range(0, NPAGES, 3):                 # every third page holds data
        mem.write(p * PAGE_SIZE, p.to_bytes(4, "little") * (PAGE_SIZE // 4))
    m = FakeMachine(mem, dirty_ring=request.param == "ring")
    yield m
    mem.close()


def run(machine, sink=None, migration_class=Migration, **params) -> Migration:
    """A migration to a fake sink, run to its end on this thread."""
    mig = migration_class(machine, MigrationParams("tcp:127.0.0.1:9", **params), sink=sink or StreamSink())
    mig.start()
    assert mig.wait(30)
    return mig


def arrived(machine, sink: StreamSink) -> GuestMemory:
    """What a destination makes of the stream the sender wrote."""
    dst = FakeMachine(GuestMemory(machine.memory.size))
    got, _ = destination.receive(socketpair_source(bytes(sink.data[:sink.stream_end])), dst)
    return got.memory


def test_a_migration_completes_and_the_memory_arrives(machine):
    """Live, the guest dirtying nothing: one round, the final pass, every page as it was."""
    sink = StreamSink()
    mig = run(machine, sink)
    assert mig.status is S.COMPLETED and mig.stats.rounds == 2
    assert ("quit", "migrated", 0) in machine.calls and "pause" in machine.calls
    assert bytes(arrived(machine, sink).view) == bytes(machine.memory.view)


def test_rounds_continue_until_what_is_left_fits_the_downtime(machine):
    """The guest dirties 200 pages before each of the first three syncs, then none:
    pre-copy goes on while pages are left, and stops once nothing is."""
    fetches = []

    def guest(vm):
        fetches.append(1)
        if len(fetches) <= 3:
            vm.dirty(range(len(fetches) * 200, len(fetches) * 200 + 200))
    machine.vm.on_fetch = guest
    mig = run(machine, downtime_ms=0)
    assert mig.status is S.COMPLETED
    assert mig.stats.round_pages[:4] == [NPAGES, 200, 200, 0]
    assert mig.stats.pages_resent == 400        # the first 200 were dirty before round 1 anyway


def test_max_rounds_forces_completion(machine):
    """A guest that never stops dirtying: max-rounds pre-copy rounds, then the final pass."""
    machine.vm.on_fetch = lambda vm: vm.dirty(range(0, 1000))
    mig = run(machine, downtime_ms=0, max_rounds=5)
    assert mig.status is S.COMPLETED and mig.stats.rounds == 6


def test_auto_converge_slows_a_guest_that_dirties_as_fast_as_rounds_send(machine):
    """Each round finds as much dirty as the last sent: the vCPUs are throttled, 20 % then more,
    and back to full speed at the end."""
    machine.vm.on_fetch = lambda vm: vm.dirty(range(0, 1000))
    mig = run(machine, downtime_ms=0, max_rounds=8)
    throttles = [c[1] for c in machine.calls if isinstance(c, tuple) and c[0] == "throttle"]
    assert throttles[0] == 0.2 and throttles[1] == 0.3 and throttles[-1] == 0
    assert mig.stats.throttle_pct >= 30


def test_cancel_mid_precopy_resumes_nothing_it_did_not_pause(machine):
    """Cancelled during round 2: cancelled, dirty logging off, the guest never paused, no quit."""
    def guest(vm):
        vm.dirty(range(0, 500))
        if vm.fetches == 2:
            assert mig.cancel()
    machine.vm.on_fetch = guest
    mig = Migration(machine, MigrationParams("tcp:127.0.0.1:9", downtime_ms=0), sink=StreamSink())
    mig.start()
    assert mig.wait(30)
    assert mig.status is S.CANCELLED and mig.stats.error == "cancelled by the user"
    assert not machine.vm.dirty_logging
    assert "pause" not in machine.calls and not any(c[0] == "quit" for c in machine.calls if isinstance(c, tuple))


class RacingGuest:
    """A FreePageSource whose guest takes a free page right after the sender
    reads the free bits in its first round: clears the page's free bit, writes
    its data, and so dirties it (claim 3: active before it is stored to)."""

    TAKEN = 1500

    def __init__(self, machine, take_at: int = 2):
        self.machine = machine
        self.take_at = take_at       # the guest takes the page right after this read of the free bits
        free = np.zeros(NPAGES, dtype=bool)
        free[1000:2000] = True
        self.words = np.packbits(free, bitorder="little").view(np.uint64)
        self.reads = 0
        self.taken = False

    def free_view(self):
        return self

    def free_words(self, w0, w1):
        out = self.words[w0:w1].copy()
        self.reads += 1
        # 2: the first read while round 1 sends (the 1st counts what is left).
        # A paused guest takes nothing: then it takes at its next read while running.
        if self.reads >= self.take_at and not self.taken and not self.machine.paused:
            self.taken = True
            p = self.TAKEN
            self.words[p // 64] &= ~np.uint64(1 << (p % 64))
            self.machine.memory.write(p * PAGE_SIZE, b"taken!" * 600)
            self.machine.vm.dirty([p])
        return out


def test_claim_2_a_page_taken_while_the_sender_looks_still_arrives(machine):
    """The guest takes a free page just after the sender read the free bits:
    because the dirty log of what is sent was cleared first, the page is dirty
    again and arrives with its data (the broken order loses it)."""
    machine.fph = RacingGuest(machine)
    sink = StreamSink()
    mig = run(machine, sink)
    assert mig.status is S.COMPLETED
    p = RacingGuest.TAKEN * PAGE_SIZE
    assert arrived(machine, sink).read(p, PAGE_SIZE) == machine.memory.read(p, PAGE_SIZE)
    assert mig.stats.pages_skipped_free == 999
    if machine.dirty_log.kind == "ring":
        assert machine.vm.resets >= mig.stats.rounds      # each sync reset the rings


def _race(machine, take_at: int, migration_class=Migration) -> bool:
    """Migrate with the guest taking page TAKEN after the take_at-th read of the free
    bits; True if the page arrived with its data."""
    machine.fph = guest = RacingGuest(machine, take_at)
    sink = StreamSink()
    mig = run(machine, sink, migration_class=migration_class)
    assert mig.status is S.COMPLETED, mig.stats.error
    assert guest.taken, "the guest never got to take its page"
    p = RacingGuest.TAKEN * PAGE_SIZE
    return arrived(machine, sink).read(p, PAGE_SIZE) == machine.memory.read(p, PAGE_SIZE)


@pytest.mark.parametrize("take_at", [1, 2, 3])     # reads while the guest runs, both logs
def test_claim_2_a_page_taken_at_any_moment_arrives(machine, take_at):
    """Whenever in the rounds the guest takes the free page, it arrives: with the bitmap
    (per-chunk clear before the read) and with the rings (harvest and reset at each sync)."""
    assert _race(machine, take_at)


def test_the_broken_order_loses_a_page_at_some_moment(machine):
    """The harness's sender reads the free bits before it clears the log (with the rings:
    before the sync's harvest and reset); taken at the wrong moment, the page is lost.
    So the test above can fail."""
    from tests.harness import BrokenOrderMigration
    lost = []
    for take_at in (1, 2, 3):
        mem = machine.memory
        m = FakeMachine(mem, dirty_ring=machine.dirty_log.kind == "ring")
        mem.write(RacingGuest.TAKEN * PAGE_SIZE, bytes(PAGE_SIZE))
        if not _race(m, take_at, BrokenOrderMigration):
            lost.append(take_at)
    assert lost, "the broken order lost nothing"


@pytest.mark.parametrize("answers,status,resumed,quit", [
    (("ready", "running"), S.COMPLETED, False, True),        # the usual
    (("error",), S.FAILED, True, False),                     # the destination refused the stream
    ((), S.FAILED, True, False),                             # no READY: COMMIT never sent
    (("ready", "aborted"), S.FAILED, True, False),           # COMMIT too late: it promised not to run
    (("ready",), S.UNRESOLVED, False, False),                # no answer to COMMIT: paused, waiting
])
def test_handover_outcomes(machine, answers, status, resumed, quit):
    """After END: the source resumes only if COMMIT was never sent or the destination aborted;
    an unanswered COMMIT leaves it paused and unresolved."""
    mig = run(machine, StreamSink(answers=answers), timeout=0.5)
    assert mig.status is status, mig.stats.error
    assert ("resume" in machine.calls) == resumed
    assert any(c[0] == "quit" for c in machine.calls if isinstance(c, tuple)) == quit
    assert machine.paused == (not resumed)


@pytest.mark.parametrize("owner,status,resumed", [("source", S.FAILED, True),
                                                 ("destination", S.COMPLETED, False)])
def test_an_operator_resolves_an_unresolved_migration(machine, owner, status, resumed):
    """resolve('source') resumes the guest here; resolve('destination') stops this VMM."""
    mig = run(machine, StreamSink(answers=("ready",)), timeout=0.5)
    assert mig.status is S.UNRESOLVED
    assert not mig.cancel(), "cancel cannot undo a COMMIT"
    mig.resolve(owner)
    assert mig.status is status
    assert ("resume" in machine.calls) == resumed
    assert any(c[:2] == ("quit", "migrated") for c in machine.calls if isinstance(c, tuple)) == (not resumed)
    with pytest.raises(Exception, match="nothing to resolve"):
        mig.resolve(owner)


def test_a_guest_that_ends_mid_migration_is_not_shipped(machine):
    """The guest exits during pre-copy: the migration fails at the pause instead of sending
    a vCPU that has finished; nothing is resumed."""
    def guest(vm):
        vm.dirty(range(0, 100))
        if vm.fetches == 2:
            machine.running = False           # the guest wrote its exit status
    machine.vm.on_fetch = guest
    mig = run(machine)
    assert mig.status is S.FAILED and "guest ended" in mig.stats.error
    assert not any(c[0] == "quit" for c in machine.calls if isinstance(c, tuple))
