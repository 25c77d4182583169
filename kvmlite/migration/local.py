"""Local migration that copies nothing: `migrate unix:PATH --local`.

Between two VMMs on one host the guest's pages need not travel.  The source
VM keeps its RAM in a memfd (`kvmlite run --memory-backend memfd`); the
source sends the stream's preamble over a unix socket with that descriptor
attached (SCM_RIGHTS, as Cloud Hypervisor's local migration does), waits
until the destination has mapped it and built its VM ("mapped"), then pauses
the vCPUs and sends only STATE and END, and the handover follows as for any
migration (READY, COMMIT, RUNNING).  The destination maps the very same
pages: no page is copied, whatever the guest's size.

The free-page bitmap earns its keep another way here: once COMMIT has come
and before the guest resumes, the destination punches the pages the guest's
bitmap calls free out of the memfd (fallocate PUNCH_HOLE), so the host gets
their memory back and what stays allocated is the guest's active pages.

Claim 2 of US 9552233 in this setting: a page may be discarded only if it is
free while nothing can take it.  The free bits are read with every vCPU of
both VMMs parked: the source's since its pause (before STATE), for good once
it has sent COMMIT; the destination's since they were made.  No dirty log is
involved (no page is copied, so there is no fetch to order the read after):
no vCPU runs between that read and the punch, so no page can change from
free to in use in between, and a free page's contents may be lost
(docs/abi.md, rule 3).  Punching earlier, while the source could still
resume, could zero a page its guest had just taken.

If the destination dies before COMMIT, nothing was punched: the source's
guest memory is whole and it resumes (the memfd was the source's all along).

Pieces, each usable alone: `bit_runs` (runs of set bits, a word at a time),
`allocated_words` (the memfd's allocated pages as bitmap words),
`punch_free_pages`, `LocalMigration` (the source), `receive_local` and
`LocalHandover.give_back` (the destination).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bitmap import ALL_ONES, PAGE_SIZE, expand_runs, list_runs, set_bit_range, words_for
from ..errors import KvmliteError, MigrationError, StreamError
from ..log import log
from ..rt import favoured
from ..vstate.memory import GuestMemory
from . import wire
from .source import Migration
from .state import restore_state, validate_state
from .status import MigrationStatus as S

if TYPE_CHECKING:
    from ..config import MigrationParams
    from ..machine import Machine


# ---- bitmap words ------------------------------------------------------------------

def set_page_runs(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
    """set_bit_range for many runs: long ones a word at a time, the (many) short ones
    of a fragmented RAM all at once."""
    long = lengths >= 128
    for s, n in zip(starts[long].tolist(), lengths[long].tolist()):
        set_bit_range(words, s, s + n)
    if (~long).any():
        pages = expand_runs(starts[~long], lengths[~long])
        np.bitwise_or.at(words, pages >> 6, np.left_shift(np.uint64(1), (pages & 63).astype(np.uint64)))


def bit_runs(words: np.ndarray, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Runs of set bits, (first bit, length), in order and merged where they touch.

    `index`: words[i] is bitmap word index[i] (increasing), for a few words
    gathered from a large bitmap; by default words[i] is word i.
    All-ones words are taken a word at a time and only mixed words are
    unpacked: a 16 GiB guest's free bitmap is mostly long runs, and unpacking
    its 4 M bits one by one would cost tens of milliseconds of downtime.
    """
    if index is None:
        index = np.arange(len(words), dtype=np.int64)
    full = words == ALL_ONES
    fs, fl = list_runs(index[full])
    starts, lengths = [fs * 64], [fl * 64]
    mixed = np.flatnonzero((words != 0) & ~full)
    if len(mixed):
        bits = np.unpackbits(words[mixed].view(np.uint8), bitorder="little").reshape(-1, 64).view(bool)
        ms, ml = list_runs((index[mixed][:, None] * 64 + np.arange(64))[bits])
        starts.append(ms)
        lengths.append(ml)
    s, n = np.concatenate(starts).astype(np.int64), np.concatenate(lengths).astype(np.int64)
    if len(s) < 2:
        return s, n
    order = np.argsort(s, kind="stable")
    s, n = s[order], n[order]
    ends = s + n
    first = np.concatenate(([True], s[1:] != ends[:-1]))     # a run that does not continue the last
    heads = np.flatnonzero(first)
    last = np.concatenate((heads[1:] - 1, [len(s) - 1]))
    return s[heads], ends[last] - s[heads]


def data_words(memory: GuestMemory) -> np.ndarray:
    """The memfd's pages the host holds memory for, as bitmap words (1 = allocated)."""
    words = np.zeros(words_for(memory.npages), dtype=np.uint64)
    extents = np.array(memory.data_extents(), dtype=np.int64).reshape(-1, 2)
    set_page_runs(words, extents[:, 0], extents[:, 1])
    return words


def allocated_words(memory: GuestMemory) -> tuple[np.ndarray, np.ndarray]:
    """data_words as (word indexes, words), only the non-zero ones: what the
    punch needs, small, so that the downtime allocates nothing RAM-sized."""
    words = data_words(memory)
    index = np.flatnonzero(words)
    return index, words[index]


# A punch asks the view for each run of allocated words, up to this many runs;
# a more fragmented RAM is asked in one call for the whole of it.
MAX_WINDOWS = 64
# Punching is done in pieces of at most this many pages, so a time budget is kept to
# within one piece: freeing a page costs 1.2-2.6 us here (kvm_pvm, one or two mappings).
PUNCH_PIECE_PAGES = 256


def punch_free_pages(memory: GuestMemory, view, *, allocated: tuple | None = None,
                     budget_ms: float | None = None) -> dict:
    """Give the host back the memory of the pages `view` calls free.

    `view.free_words(w0, w1)` (a FreePageView) must describe the guest while
    no vCPU runs (module docstring).  Only pages the memfd holds memory for
    are punched (`allocated`, from allocated_words: read earlier it is a
    subset of what is allocated now, as only a punch makes holes): a hole
    needs nothing, and each punched range costs an invalidation in every
    mapping and VM of the memfd however empty it is (~16 ms per 8 GiB here).
    With `budget_ms`, stops once that long has gone by; what is left stays
    allocated.  Returns what it did.
    """
    t = time.perf_counter()
    nwords = words_for(memory.npages)
    before = memory.allocated_bytes()
    index, words = allocated if allocated is not None else allocated_words(memory)
    ws, wl = list_runs(index)
    if len(ws) <= MAX_WINDOWS:
        free = [view.free_words(s, s + n) for s, n in zip(ws.tolist(), wl.tolist())]
        free = np.concatenate(free) if free else np.zeros(0, dtype=np.uint64)
    else:
        free = view.free_words(0, nwords)[index]
    starts, lengths = bit_runs(free & words, index)
    deadline = None if budget_ms is None else t + budget_ms / 1000
    punched = ranges = 0
    for first, n in zip(starts.tolist(), lengths.tolist()):
        while n:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            k = n if deadline is None else min(n, PUNCH_PIECE_PAGES)
            memory.punch_pages(first, k)
            first, n, punched = first + k, n - k, punched + k
        ranges += 1
        if n:
            break
    return {"pages_punched": punched, "pages_left": int(lengths.sum()) - punched, "ranges": ranges,
            "allocated_before": before, "allocated_after": memory.allocated_bytes(),
            "ms": (time.perf_counter() - t) * 1000}


# ---- the source ------------------------------------------------------------------------

class LocalMigration(Migration):
    """The source of a local migration: the RAM's descriptor, then STATE and END.

    The same setup → iterate → complete → handover as Migration; no dirty log,
    no pre-copy rounds and no final pass: the pages are shared, not sent.
    """

    def __init__(self, machine: Machine, params: MigrationParams, **kw: Any) -> None:
        super().__init__(machine, params, **kw)
        if machine.memory.fd is None:
            raise MigrationError("a local migration hands the guest's RAM over as a memfd: "
                                 "start the VM with --memory-backend memfd")
        self.stats.dirty_log = ""       # no dirty log: no page is copied

    def _setup(self) -> np.ndarray:
        mem = self.machine.memory
        self._connect()
        self.hooks.point("src:connected")
        # downtime_ms: the destination keeps its punching of free pages within it
        info = {"page_size": PAGE_SIZE, "ram": [[mem.gpa, mem.size]], "vcpus": self.machine.nvcpus,
                "hint": self.params.hint, "live": self.params.live, "source": "kvmlite",
                "downtime_ms": self.params.downtime_ms}
        sink = self._sink()
        if sink.keys is not None:
            # A keyed link: no page record to tag, but END carries the structure MAC.
            self._integrity = wire.Integrity(sink.keys)
            info["integrity"] = wire.INTEGRITY
        preamble = wire.encode_preamble(info, flags=wire.FLAG_RAM_FD)
        self._structure(preamble)
        self.stats.bytes_wire += len(preamble)
        sink.send_fd(preamble, mem.fd)
        # The destination answers once it has mapped the RAM and built its VM:
        # pausing before that would put its set-up inside the downtime.
        sink.settimeout(self.params.timeout)
        reply = wire.read_frame(sink, "the destination's answer to the RAM",
                                wire.DEST_ANSWERS_TO_RAM_FD)
        if reply["status"] != wire.MAPPED:
            raise MigrationError(f"destination refused the VM: {reply['error']}")
        self.stats.setup_ms = (time.perf_counter() - self._t0) * 1000
        self._check_cancel()
        self.state.advance(S.ACTIVE if self.params.live else S.DEVICE, only_from=(S.SETUP,))
        dirty = np.zeros(words_for(mem.npages), dtype=np.uint64)   # nothing to send: shared
        self.dirty_words = dirty
        return dirty

    def _iterate(self, dirty) -> None:
        """Nothing to pre-copy: the destination maps the pages the guest is writing."""

    def _final_pass(self, dirty) -> None:
        """No pages to send with the vCPUs parked either."""


# ---- the destination -------------------------------------------------------------------

@dataclass
class LocalHandover:
    """What the destination keeps from a local migration's receive for after COMMIT."""
    allocated: tuple | None         # allocated_words, read before the source paused
    hint: bool                      # the source asked for the free pages to be skipped
    downtime_ms: float | None       # the source's downtime limit (the punch's budget)
    mapped_at: float = 0.0          # perf_counter() when "mapped" went: the source pauses on it
    punch: dict | None = None

    # Of the downtime left when the punch starts, what RUNNING takes to reach
    # the source (its downtime ends there).
    ANSWER_MS = 0.5

    def give_back(self, machine) -> str:
        """COMMIT has come and no vCPU has run since the source's pause: punch
        the free pages (if the source asked for the hint), within what is left
        of the source's downtime limit (counted from "mapped", which the source
        pauses on: an upper bound of the downtime so far).  Returns a line for the log."""
        mem = machine.memory
        view = machine.free_pages.free_view()
        if not self.hint or view is None:
            why = "without the free-page hint" if not self.hint else "no free-page bitmap registered"
            return (f"RAM handed over ({mem.size >> 20} MiB, {mem.allocated_bytes() >> 20} MiB "
                    f"allocated; {why}, nothing given back)")
        limit = self.downtime_ms
        budget = None
        if limit is not None:
            spent = (time.perf_counter() - self.mapped_at) * 1000
            budget = max(limit - spent - self.ANSWER_MS, 0.0)
        p = self.punch = punch_free_pages(mem, view, allocated=self.allocated, budget_ms=budget)
        left = (f"; {p['pages_left']} more stay allocated: the downtime limit ({limit:g} ms) left "
                "no time to give them back") if p["pages_left"] else ""
        return (f"RAM handed over ({mem.size >> 20} MiB); {p['pages_punched']} free pages punched "
                f"out in {p['ranges']} ranges ({p['ms']:.2f} ms): {p['allocated_before'] >> 20} -> "
                f"{p['allocated_after'] >> 20} MiB allocated{left}")


def receive_local(dec: wire.StreamDecoder, conn, header: wire.Header, machine_config, *,
                  max_memory: int | None, hooks, make_machine=None, downtime=None):
    """After a RAM_FD preamble: adopt the memfd, build the VM, say "mapped", read
    STATE and END, restore the vCPUs (parked) and devices.  Returns (machine,
    LocalHandover); `give_back` must wait for COMMIT.  `downtime`: an ExitStack
    where this thread's priority for the downtime is entered (kvmlite/rt.py),
    for the caller to leave before the guest runs."""
    if len(header.ram) != 1 or header.ram[0][0] != 0:
        raise StreamError(f"RAM layout {header.ram} is not supported (one region at GPA 0)")
    ram_size = header.ram[0][1]
    fd = conn.take_fd()
    if fd is None:
        raise StreamError("the stream says its RAM comes as a file descriptor, but none came")
    try:
        if max_memory is not None and ram_size > max_memory:
            raise StreamError(f"the stream's RAM ({ram_size >> 20} MiB) exceeds this destination's "
                              f"limit of {max_memory >> 20} MiB (--max-memory)")
        if machine_config.memory is not None and machine_config.memory != ram_size:
            raise StreamError(f"the source has {ram_size >> 20} MiB of RAM, this destination "
                              f"{machine_config.memory >> 20} MiB (--memory must match)")
    except StreamError:
        os.close(fd)
        raise
    try:
        memory = GuestMemory.from_fd(fd, ram_size)
    except KvmliteError as e:
        raise StreamError(str(e)) from None
    cfg = replace(machine_config, memory=ram_size, prefault=False, vcpus=header.vcpus,
                  memory_backend="memfd")
    machine = (make_machine or _machine)(cfg, memory)
    try:
        # Which pages the memfd holds, read now while the source's guest still runs
        # (lseek per extent: tens of ms for a fragmented RAM, kept out of the downtime).
        allocated = allocated_words(memory) if header.hint else None
        if downtime is not None:
            # the source pauses its guest on "mapped": from here on a wait for a CPU is downtime
            downtime.enter_context(favoured())
        conn.sendall(wire.encode_frame({"status": wire.MAPPED}))
        mapped_at = time.perf_counter()
        hooks.point("dst:local:mapped")
        state = None
        while True:
            rec = dec.next_record(_no_pages)
            match rec:
                case wire.State(st):
                    state = validate_state(st, header.vcpus, machine.devices(), machine.irqchip)
                    hooks.point("dst:state")
                case wire.End():
                    hooks.point("dst:end")
                    break
        try:
            restore_state(machine, state)
        except KvmliteError as e:
            raise StreamError(f"the migrated state was refused: {e}") from None
    except BaseException:
        machine.close()
        raise
    limit = header.info.get("downtime_ms")
    downtime = float(limit) if type(limit) in (int, float) and 0 <= limit <= 60_000 else None
    return machine, LocalHandover(allocated, header.hint, downtime, mapped_at)


def _no_pages(gpa: int, nbytes: int):
    raise AssertionError("the decoder refuses page records in a stream whose RAM came as a descriptor")


def _machine(cfg, memory):
    from ..machine import Machine
    return Machine(cfg, memory=memory)


def log_give_back(machine, handover: LocalHandover) -> None:
    try:
        log.info(handover.give_back(machine))
    except KvmliteError as e:
        log.warning(f"free pages not given back to the host: {e}")
