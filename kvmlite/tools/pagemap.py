"""`kvmlite pagemap`: a running VM's memory, or a saved migration stream, drawn
on the terminal or into a PNG (the pictures: kvmlite/pagemap/)."""

from __future__ import annotations

from ..control.client import QmpClient
from ..errors import ConfigError
from ..pagemap.grid import Grid, grid
from ..pagemap.model import PageMap, from_monitor
from ..pagemap.png import write_png
from ..pagemap.terminal import render_terminal

TERMINAL_COLUMNS = 64
TERMINAL_MAX_ROWS = 64     # 32 lines of half blocks
PNG_COLUMNS = 256


def fetch(monitor: str) -> PageMap:
    """The page map of the VM whose monitor is at `monitor` (x-query-pagemap)."""
    with QmpClient(monitor) as client:
        return from_monitor(client.execute("x-query-pagemap", timeout=60))


def pagemap_command(*, source: str | None = None, monitor: str | None = None,
                    png: str | None = None, width: int | None = None,
                    sent_rounds: bool = False) -> int:
    """Draw a running VM's pages (`monitor`: its socket) or a saved stream's
    (`source`: file:PATH) on the terminal, or into the PNG `png`; `width`
    cells a row; `sent_rounds`: colour pages by the round that sent them."""
    if bool(source) == bool(monitor):
        raise ConfigError("give either --monitor PATH (a running VM) or file:PATH (a saved "
                          "migration stream)")
    if source:
        if not source.startswith("file:") or len(source) == 5:
            raise ConfigError(f"{source!r}: expected file:PATH, a migration stream saved "
                              "with kvmlite migrate ... file:PATH")
        # imported only here: the stream reader brings the wire format and ssl
        from ..pagemap.stream import from_stream
        pm = from_stream(source[5:])
    else:
        pm = fetch(monitor)
    from rich.console import Console
    console = Console()
    if png:
        cols = width or PNG_COLUMNS
        g = grid(pm, cols, cols, sent_rounds)
        write_png(g, png)
        print(f"kvmlite: wrote {png}: {g.scale}")
        return 0
    cols = width or min(TERMINAL_COLUMNS, max(console.width - 1, 8))
    render_terminal(grid(pm, cols, TERMINAL_MAX_ROWS, sent_rounds), console)
    return 0


def write_monitor_png(resp: dict, path: str, columns: int = PNG_COLUMNS) -> Grid:
    """The sent-rounds picture of an `x-query-pagemap` reply, as `kvmlite migrate --pagemap` writes it."""
    pm = from_monitor(resp)
    g = grid(pm, columns, columns, sent_rounds=pm.rounds is not None)
    write_png(g, path)
    return g
