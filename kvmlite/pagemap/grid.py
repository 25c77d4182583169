"""A PageMap laid out as a grid of cells, several pages a cell when it is large."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..units import human_bytes
from .model import PAGE_SIZE, Kind, PageMap


@dataclass
class Grid:
    """A view laid out as cells: `cells[row, col]` indexes `kinds` (-1: past the end)."""
    title: str
    kinds: list[Kind]
    cells: np.ndarray
    pages_per_cell: int
    npages: int
    page_counts: list[int]      # pages of each kind (not cells)
    rule: str
    summary: str = ""

    @property
    def scale(self) -> str:
        rows, cols = self.cells.shape
        per = "1 page" if self.pages_per_cell == 1 else f"{self.pages_per_cell} pages"
        return (f"{self.npages} pages ({human_bytes(self.npages * PAGE_SIZE)}), "
                f"{per} ({human_bytes(self.pages_per_cell * PAGE_SIZE)}) per cell, "
                f"{cols} x {rows} cells")


def layout(npages: int, columns: int, max_rows: int) -> tuple[int, int]:
    """(pages per cell, rows) so that `npages` fit in `columns` x at most `max_rows` cells."""
    per = max(1, math.ceil(npages / (columns * max_rows)))
    return per, max(1, math.ceil(math.ceil(npages / per) / columns))


def grid(pm: PageMap, columns: int, max_rows: int, sent_rounds: bool = False) -> Grid:
    """Lay `pm` out in cells.  A cell of several pages shows the most important
    any-page kind any of them has (dirty; the latest round), else the kind most
    of its pages have, a tie going to the more important kind."""
    if columns < 1:
        raise ConfigError(f"--width {columns}: at least 1 column is needed")
    kinds, keys = pm.legend_kinds(sent_rounds)
    columns = min(columns, max(pm.npages, 1))
    per, rows = layout(pm.npages, columns, max_rows)
    ncells = rows * columns
    padded = np.full(ncells * per, -1, dtype=np.int16)
    padded[:pm.npages] = keys
    padded = padded.reshape(ncells, per)
    any_kinds = np.array([k.any_page for k in kinds])
    is_any = (padded >= 0) & any_kinds[np.maximum(padded, 0)]
    top_any = np.where(is_any, padded, -1).max(axis=1)
    plain = np.flatnonzero(~any_kinds)
    counts = np.stack([(padded == k).sum(axis=1) for k in plain], axis=1)
    # argmax picks the first maximum: search from the most important end
    majority = plain[::-1][np.argmax(counts[:, ::-1], axis=1)]
    cells = np.where(top_any >= 0, top_any, majority)
    cells[(padded < 0).all(axis=1)] = -1
    page_counts = np.bincount(keys, minlength=len(kinds)).tolist() if len(keys) else [0] * len(kinds)
    if per == 1:
        rule = "one page per cell"
    else:
        anys = [re.split("[,:]", k.name)[0] for k in kinds if k.any_page]
        if sent_rounds:
            lead = "a cell shows the latest round that sent any of its pages; else "
        elif len(anys) > 1:
            # the later kind wins: name them in that order
            lead = ("a cell shows the first of " + ", ".join(f"'{a}'" for a in reversed(anys))
                    + " that any of its pages is; else ")
        elif anys:
            lead = f"a cell shows '{anys[0]}' if any of its pages is; else "
        else:
            lead = "a cell shows "
        rule = lead + "the state most of its pages have"
    return Grid(pm.title, kinds, cells.reshape(rows, columns), per, pm.npages, page_counts, rule,
                pm.summary)
