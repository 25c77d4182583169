"""What a pagemap picture shows: the kinds of page, and a PageMap (one kind a
page, and the round that sent it) built from the monitor's `x-query-pagemap`."""

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
