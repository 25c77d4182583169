"""What a pagemap picture shows: the kinds of page, and a PageMap (one kind a
page, and the round that sent it) built from the monitor's `x-query-pagemap`.

On a post-copy destination the reply also has `postcopy-state`, one byte a
page saying how the page came since the switch (docs/postcopy.md, "Page
states"); the picture then shows that: by fault, by push, as a local zero
page, ..."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..control.arraycodec import decode_array, words_to_mask
from ..errors import ConfigError, KvmliteError

from ..bitmap import PAGE_SHIFT, PAGE_SIZE  # noqa: F401


@dataclass(frozen=True)
class Kind:
    """One thing a cell can show: its legend text, colour, and letter (no-colour output)."""
    name: str
    rgb: tuple[int, int, int]
    glyph: str
    any_page: bool = False   # a cell shows this if any of its pages has it
    hide_if_none: bool = False   # left out of the legend when no page has it


# Live VM states, in order of importance: a tie in a cell goes to the later one.
UNTOUCHED, FREE, ACTIVE, DIRTY = range(4)
VM_KINDS = (
    Kind("never touched: not in use, and the host never backed it", (44, 46, 60), "."),
    Kind("free (guest's bitmap), stale data", (120, 124, 140), "-"),
    Kind("active (in use, or outside the bitmap)", (64, 178, 96), "#"),
    Kind("dirty, still to be sent by the migration", (222, 56, 48), "D", any_page=True,
         hide_if_none=True),
)
# Pages of a migration stream.
NOT_SENT, ZERO, DATA = range(3)
STREAM_KINDS = (
    Kind("not in the stream", (44, 46, 60), "."),
    Kind("sent as a ZERO record", (236, 220, 150), "0"),
    Kind("sent with its data (PAGES record)", (70, 130, 220), "#"),
)
# A post-copy destination's pages, by how they came since the switch, in order
# of importance (a tie in a cell goes to the later one; the last three are
# shown if any page of a cell has them).
PC_HERE, PC_FREE, PC_ZERO_OTHER, PC_PENDING, PC_PUSHED, PC_ZERO_FREE, PC_REQUESTED, PC_FAULTED = range(8)
POSTCOPY_KINDS = (
    Kind("here before the switch: sent by pre-copy, or never used", (64, 120, 84), "="),
    Kind("free at the switch, not touched since: never sent", (60, 62, 78), "."),
    Kind("zeroed here: never written, and not to come", (150, 150, 120), "o", hide_if_none=True),
    Kind("still to come from the source", (222, 56, 48), "?", hide_if_none=True),
    Kind("pushed: came by the background push", (70, 130, 220), "p"),
    Kind("zero page here: free at the switch, then taken by the guest (no round trip)",
         (240, 210, 0), "z", any_page=True),
    Kind("requested: a fault waits for it", (200, 60, 200), "r", any_page=True, hide_if_none=True),
    Kind("by fault: requested when the guest touched it", (255, 140, 0), "F", any_page=True),
)
# The destination's page state codes (kvmlite._postcopy's KVMLITE_PC_*; a unit
# test holds them to it) -> the kinds above.
POSTCOPY_CODES = {0: PC_HERE, 1: PC_PENDING, 2: PC_REQUESTED, 3: PC_PUSHED, 4: PC_FAULTED,
                  5: PC_FREE, 6: PC_ZERO_FREE, 7: PC_ZERO_OTHER}
ROUND_GLYPHS = "123456789abcdefghijklmnopqrstuvwxyz"
# Rounds are coloured along this ramp, first to last (blue, cyan, green,
# yellow, red): saturated colours, never one of the greys unsent pages get.
ROUND_RAMP = ((40, 80, 230), (0, 190, 220), (40, 200, 70), (240, 210, 0), (230, 40, 30))


def round_colour(r: int, last: int) -> tuple[int, int, int]:
    t = 0.0 if last <= 1 else (r - 1) / (last - 1)
    x = t * (len(ROUND_RAMP) - 1)
    i = min(int(x), len(ROUND_RAMP) - 2)
    f = x - i
    a, b = ROUND_RAMP[i], ROUND_RAMP[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def _grey(rgb) -> tuple[int, int, int]:
    """The same lightness, no colour: unsent pages under a rounds view."""
    y = round(0.3 * rgb[0] + 0.59 * rgb[1] + 0.11 * rgb[2])
    return (y, y, y)


@dataclass
class PageMap:
    """One state per page (an index into `kinds`), and optionally the round
    that last sent each page (0: never; 1-based) and the number of the final
    pass (the vCPU paused), once it has run: it may have sent no page."""
    title: str
    kinds: tuple[Kind, ...]
    states: np.ndarray            # uint8 per page
    rounds: np.ndarray | None = None
    final_round: int = 0
    summary: str = ""             # a line of counts under the title

    @property
    def npages(self) -> int:
        return len(self.states)

    def legend_kinds(self, sent_rounds: bool) -> tuple[list[Kind], np.ndarray]:
        """The kinds a view uses and each page's index into them."""
        if not sent_rounds:
            return list(self.kinds), self.states.astype(np.int16)
        if self.rounds is None:
            raise ConfigError("no sent rounds to show: no migration has run from this VM")
        kinds = [Kind(f"not sent: {k.name}", _grey(k.rgb), k.glyph, hide_if_none=k.hide_if_none)
                 for k in self.kinds]
        # rounds past 255 share the last number (sent_round is one byte a page)
        last = min(max(int(self.rounds.max()) if len(self.rounds) else 0, self.final_round), 255)
        for r in range(1, last + 1):
            note = " (final pass, vCPU paused)" if r == self.final_round else ""
            glyph = ROUND_GLYPHS[r - 1] if r <= len(ROUND_GLYPHS) else "+"
            kinds.append(Kind(f"sent in round {r}{note}", round_colour(r, last), glyph, any_page=True))
        keys = np.where(self.rounds > 0, len(self.kinds) - 1 + self.rounds.astype(np.int16),
                        self.states.astype(np.int16))
        return kinds, keys



def from_monitor(resp: dict) -> PageMap:
    """A PageMap from an `x-query-pagemap` reply."""
    try:
        npages = int(resp["pages"])
        arrays = {k: resp.get(k) for k in ("free", "backed", "dirty", "sent-round")}
    except (KeyError, TypeError, ValueError) as e:
        raise KvmliteError(f"x-query-pagemap: malformed reply ({e})") from None
    states = np.full(npages, ACTIVE, dtype=np.uint8)
    free = None
    if arrays["free"] is not None:
        free = words_to_mask(decode_array(arrays["free"], "free bitmap"), npages)
        states[free] = FREE
    if arrays["backed"] is not None:
        backed = words_to_mask(decode_array(arrays["backed"], "backed bitmap"), npages)
        # a page the guest uses but never wrote stays active: the bitmap has the last word
        states[~backed & (free if free is not None else True)] = UNTOUCHED
    mig = resp.get("migration") or {}
    if arrays["dirty"] is not None:
        dirty = words_to_mask(decode_array(arrays["dirty"], "dirty bitmap"), npages)
        if free is not None and mig.get("x-free-page-hint", True):
            dirty = dirty & ~free      # dirty free pages are skipped, not sent
        states[dirty] = DIRTY
    if resp.get("postcopy-state") is not None:
        return _postcopy_map(decode_array(resp["postcopy-state"], "postcopy-state"), npages, resp)
    rounds = None
    if arrays["sent-round"] is not None:
        rounds = decode_array(arrays["sent-round"], "sent-round")
        if len(rounds) != npages:
            raise KvmliteError(f"x-query-pagemap: sent-round has {len(rounds)} entries for {npages} pages")
    title = "guest memory"
    summary = ""
    if free is not None:
        nfree = int(np.count_nonzero(free))
        summary = (f"the guest's bitmap: {nfree} pages free (never touched or stale), "
                   f"{npages - nfree} active")
    final = 0
    if mig:
        title += f", migration {mig.get('status')} after {mig.get('rounds', 0)} rounds"
        if mig.get("status") == "completed":
            final = int(mig.get("rounds", 0))
    return PageMap(title, VM_KINDS, states, rounds, final, summary)


def _postcopy_map(codes: np.ndarray, npages: int, resp: dict) -> PageMap:
    """A post-copy destination's pages by how they came since the switch."""
    if len(codes) != npages:
        raise KvmliteError(f"x-query-pagemap: postcopy-state has {len(codes)} entries for {npages} pages")
    table = np.full(256, -1, dtype=np.int16)
    for code, kind in POSTCOPY_CODES.items():
        table[code] = kind
    states = table[codes]
    if (states < 0).any():
        raise KvmliteError(f"x-query-pagemap: unknown post-copy page state {int(codes[states < 0][0])}")
    n = np.bincount(states, minlength=len(POSTCOPY_KINDS))
    summary = (f"since the switch: {n[PC_FAULTED]} pages came by fault, {n[PC_PUSHED]} by the push, "
               f"{n[PC_ZERO_FREE]} free pages got a zero page here; {n[PC_PENDING] + n[PC_REQUESTED]} "
               "still to come")
    return PageMap("guest memory after the switch to post-copy", POSTCOPY_KINDS,
                   states.astype(np.uint8), None, 0, summary)
