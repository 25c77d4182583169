"""A pagemap grid drawn on the terminal with rich."""

from __future__ import annotations

import numpy as np

from .grid import Grid
from .model import PAGE_SIZE

UPPER_HALF = "\u2580"


def _style(fg, bg) -> str:
    s = f"rgb({fg[0]},{fg[1]},{fg[2]})" if fg else "default"
    return s + (f" on rgb({bg[0]},{bg[1]},{bg[2]})" if bg else "")


def render_terminal(g: Grid, console) -> None:
    """Draw `g` on a rich console: two cell rows per line in colour, else one letter a cell."""
    from rich.table import Table
    from rich.text import Text
    console.print(Text(f"kvmlite pagemap: {g.title}", style="bold"))
    if g.summary:
        console.print(g.summary, highlight=False)
    console.print(f"{g.scale}; {g.rule}", highlight=False)
    rows, cols = g.cells.shape
    colour = console.color_system is not None
    if colour:
        for r in range(0, rows, 2):
            top = g.cells[r]
            bottom = g.cells[r + 1] if r + 1 < rows else np.full(cols, -1)
            line = Text()
            for t, b in zip(top.tolist(), bottom.tolist()):
                if t < 0:
                    line.append(" ")
                else:
                    line.append(UPPER_HALF, style=_style(g.kinds[t].rgb, g.kinds[b].rgb if b >= 0 else None))
            console.print(line, no_wrap=True, crop=False)
    else:
        for r in range(rows):
            console.print("".join(g.kinds[c].glyph if c >= 0 else " " for c in g.cells[r].tolist()),
                          highlight=False, no_wrap=True, crop=False)
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("")
    table.add_column("pages", justify="right")
    table.add_column("MiB", justify="right")
    table.add_column("what")
    for k, n in zip(g.kinds, g.page_counts):
        if n == 0 and k.hide_if_none:
            continue
        swatch = Text(UPPER_HALF * 2, style=_style(k.rgb, k.rgb)) if colour else Text(k.glyph)
        table.add_row(swatch, str(n), f"{n * PAGE_SIZE / (1 << 20):.1f}", k.name)
    console.print(table)
