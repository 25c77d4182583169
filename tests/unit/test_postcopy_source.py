"""The source's post-copy decisions against a fake VM, without KVM: when it switches,
what the switch sends, what it refuses.  (The page server itself runs in
test_postcopy_engine.py; whole migrations in tests/integration/test_postcopy.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from kvmlite.bitmap import PAGE_SIZE, words_to_mask
from kvmlite.config import Credentials, MigrationParams
from kvmlite.errors import ConfigError, MigrationError
from kvmlite.migration import wire
from kvmlite.migration.source import Migration
from kvmlite.migration.status import MigrationStatus as S
from kvmlite.vstate.memory import GuestMemory

from tests.fakes import FakeMachine, StreamSink

NPAGES = 4096                   # 16 MiB
FREE = slice(1000, 3000)        # the guest's bitmap calls these free


class FreePages:
    """A FreePageSource with a fixed bitmap."""

    def __init__(self):
        free = np.zeros(NPAGES, dtype=bool)
        free[FREE] = True
        self.words = np.packbits(free, bitorder="little").view(np.uint64)

    def free_view(self):
        return self

    def free_words(self, w0, w1):
        return self.words[w0:w1].copy()


@pytest.fixture
def machine():
    mem = GuestMemory(NPAGES * PAGE_SIZE)
    for p in range(0, NPAGES, 3):
        mem.write(p * PAGE_SIZE, p.to_bytes(4, "little") * (PAGE_SIZE // 4))
    m = FakeMachine(mem)
    m.fph = FreePages()
    yield m
    mem.close()


def sink(answers=("prepared", "ready")) -> StreamSink:
    """A destination that offers post-copy; by default it never answers COMMIT."""
    s = StreamSink(answers=answers)
    s.offers = {"postcopy": 1}
    return s


def start(machine, the_sink, **params) -> Migration:
    params.setdefault("postcopy", True)
    mig = Migration(machine, MigrationParams("tcp:127.0.0.1:9", timeout=0.5, **params), sink=the_sink)
    mig.start()
    return mig


def stream(the_sink: StreamSink) -> list:
    """The records the source sent, decoded (the destination's decoder)."""
    from tests.fakes import socketpair_source
    data = bytes(the_sink.data)
    commit = wire.encode_frame({"status": wire.COMMIT})
    assert data.endswith(commit)                   # the handover's one frame from the source
    dec = wire.StreamDecoder(socketpair_source(data[:-len(commit)]))
    dec.read_preamble()
    mem = memoryview(bytearray(NPAGES * PAGE_SIZE))
    out = []
    while not out or not isinstance(out[-1], wire.End):
        out.append(dec.next_record(lambda g, n: mem[g:g + n]))
    return out


def unresolved(mig) -> None:
    """The switch happened, COMMIT went unanswered: settle it, so the thread ends."""
    deadline = 30
    import time
    t0 = time.monotonic()
    while mig.status is not S.UNRESOLVED:
        assert time.monotonic() - t0 < deadline, mig.status
        time.sleep(0.01)
    assert mig.sender is not None          # a post-copy migration: it could be resumed
    mig.resolve("source")
    assert mig.wait(10)


def test_postcopy_now_switches_before_any_round_and_sends_the_two_sets(machine):
    """No page travels before the switch: the stream is the header, the two sets, the
    state and END.  Pending = every page not free (all were dirty), free = the bitmap."""
    s = sink()
    mig = start(machine, s, postcopy_now=True)
    unresolved(mig)
    recs = stream(s)
    assert not any(isinstance(r, (wire.Pages, wire.Zero)) for r in recs)
    sets = {r.kind: words_to_mask(r.words, NPAGES) for r in recs if isinstance(r, wire.PageSet)}
    free = np.zeros(NPAGES, dtype=bool)
    free[FREE] = True
    assert np.array_equal(sets[wire.PAGESET_FREE], free)
    assert np.array_equal(sets[wire.PAGESET_PENDING], ~free)
    pc = mig.stats.postcopy
    assert pc["switch"].startswith("at once") and pc["pages_pending"] == NPAGES - 2000
    assert pc["pages_free"] == 2000 and mig.stats.pages_skipped_free == 2000
    assert mig.stats.rounds == 0


def test_pages_sent_by_rounds_and_clean_since_are_in_neither_set(machine):
    """After two rounds only what the guest dirtied since (and is not free) is still to come."""
    def guest(vm):
        vm.dirty(range(100, 140))           # a working set re-written before every sync
    machine.vm.on_fetch = guest
    s = sink()
    mig = start(machine, s, postcopy_after=2, downtime_ms=0)
    unresolved(mig)
    sets = {r.kind: words_to_mask(r.words, NPAGES) for r in stream(s) if isinstance(r, wire.PageSet)}
    assert np.flatnonzero(sets[wire.PAGESET_PENDING]).tolist() == list(range(100, 140))
    assert mig.stats.rounds == 2 and mig.stats.postcopy["switch"].startswith("after 2 rounds")


def test_not_converging_switches_instead_of_throttling(machine):
    """The guest re-dirties as much as each round sends: with post-copy the source
    switches after two such rounds and never slows the guest."""
    def guest(vm):
        vm.dirty(range(0, 900))
    machine.vm.on_fetch = guest
    mig = start(machine, sink(), downtime_ms=0)
    unresolved(mig)
    assert mig.stats.postcopy["switch"].startswith("not converging")
    assert not any(c[0] == "throttle" for c in machine.calls if isinstance(c, tuple))
    assert mig.stats.throttle_pct == 0


def test_a_converging_postcopy_migration_completes_as_precopy(machine):
    """Nothing dirtied: pre-copy converges and completes; no switch."""
    s = sink(("prepared", "ready", "running"))
    mig = start(machine, s)
    assert mig.wait(30)
    assert mig.status is S.COMPLETED and mig.sender is None and mig.stats.postcopy == {}
    assert not any(isinstance(r, wire.PageSet) for r in stream(s))


def test_a_destination_that_cannot_take_postcopy_is_refused_before_anything_is_sent(machine):
    s = StreamSink(answers=("prepared",))          # no offers: an older or TLS destination
    mig = start(machine, s)
    assert mig.wait(30)
    assert mig.status is S.FAILED and "cannot take a post-copy migration" in mig.stats.error
    assert not s.data and "pause" not in machine.calls


def test_a_destination_that_refuses_the_header_fails_the_migration_at_setup(machine):
    s = sink(("error",))
    mig = start(machine, s)
    assert mig.wait(30)
    assert mig.status is S.FAILED and "refused" in mig.stats.error
    assert "pause" not in machine.calls


def test_start_postcopy_and_resume_are_refused_when_they_make_no_sense(machine):
    mig = start(machine, StreamSink(answers=("ready", "running")), postcopy=False)
    with pytest.raises(MigrationError, match="may not switch to post-copy"):
        mig.start_postcopy()
    with pytest.raises(MigrationError, match="nothing to resume"):
        mig.resume()
    assert mig.wait(30)
    assert mig.status is S.COMPLETED
    with pytest.raises(MigrationError, match="may not switch"):
        mig.start_postcopy()


@pytest.mark.parametrize("params, why", [
    ({"uri": "file:/tmp/x.snap", "postcopy": True}, "not to a snapshot file"),
    ({"postcopy": True, "live": False}, "choose one"),
    ({"postcopy_now": True}, "need postcopy on"),
    ({"postcopy_after": 3}, "need postcopy on"),
    ({"postcopy": True, "creds": Credentials(tls_cert="c", tls_key="k", tls_ca="a")}, "TLS"),
])
def test_postcopy_params_are_checked(params, why):
    params = {"uri": "tcp:127.0.0.1:9", **params}
    with pytest.raises(ConfigError, match=why):
        MigrationParams(**params)
