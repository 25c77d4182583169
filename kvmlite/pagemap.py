"""`kvmlite pagemap`: guest memory drawn as a grid, one cell per page.

A picture answers at a glance what the page counts only summarise: where the
guest's live pages are, which pages the host never backed, what a running
migration still has to send, and after one, which round sent each page.

Sources:

* a running VM, through the monitor's `query-pagemap` (live states: never
  touched, free, active, dirty; and the round that sent each page once a
  migration has run);
* a migration stream saved to a file (`kvmlite migrate ... file:PATH`), read
  with the wire format's own decoder: which round's records carried each page
  and which pages came as ZERO records.

Outputs: the terminal (rich; two cells per character with the upper half
block, or one letter per cell when the output has no colour) and PNG, written
here with zlib and struct only.  A large guest gets several pages per cell;
the header says how many, and the legend states the rule a cell follows.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .control.arraycodec import decode_array, words_to_mask
from .errors import ConfigError, KvmliteError, StreamError
from .units import human_bytes

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


# ---- what a picture shows ----------------------------------------------------------


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
        anys = [k.name.split(",")[0] for k in kinds if k.any_page]
        if sent_rounds:
            lead = "a cell shows the latest round that sent any of its pages; else "
        elif anys:
            lead = f"a cell shows '{anys[0]}' if any of its pages is; else "
        else:
            lead = "a cell shows "
        rule = lead + "the state most of its pages have"
    return Grid(pm.title, kinds, cells.reshape(rows, columns), per, pm.npages, page_counts, rule,
                pm.summary)


# ---- sources -------------------------------------------------------------------------


def from_monitor(resp: dict) -> PageMap:
    """A PageMap from a `query-pagemap` reply."""
    try:
        npages = int(resp["pages"])
        arrays = {k: resp.get(k) for k in ("free", "backed", "dirty", "sent_round")}
    except (KeyError, TypeError, ValueError) as e:
        raise KvmliteError(f"query-pagemap: malformed reply ({e})") from None
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
        if free is not None and mig.get("hint", True):
            dirty = dirty & ~free      # dirty free pages are skipped, not sent
        states[dirty] = DIRTY
    rounds = None
    if arrays["sent_round"] is not None:
        rounds = decode_array(arrays["sent_round"], "sent_round")
        if len(rounds) != npages:
            raise KvmliteError(f"query-pagemap: sent_round has {len(rounds)} entries for {npages} pages")
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


class _Scratch:
    """Where page payloads land: the picture needs where they go, not their bytes.
    One anonymous mapping, its pages handed back to the kernel before each reuse,
    so a stream of a large guest costs its largest record, briefly."""

    def __init__(self):
        self.map: mmap.mmap | None = None

    def __call__(self, gpa: int, nbytes: int):
        if self.map is None or len(self.map) < nbytes:
            self.map = mmap.mmap(-1, nbytes)
        else:
            self.map.madvise(mmap.MADV_DONTNEED)
        return memoryview(self.map)[:nbytes]


def from_stream(path: str) -> PageMap:
    """A PageMap of a migration stream saved to a file: for each page, the kind
    of the last record that carried it and the round it came in."""
    from .migration import wire
    from .migration.transport import FileSource
    f = FileSource(path)        # the reader `run --incoming file:PATH` uses
    try:
        dec = wire.StreamDecoder(f)
        try:
            header = dec.read_preamble()
            # Pages are numbered through the header's RAM regions in order.
            bases, first = [], 0
            for gpa, size in header.ram:
                bases.append((gpa, gpa + size, first))
                first += size >> PAGE_SHIFT
            states = np.zeros(first, dtype=np.uint8)
            rounds = np.zeros(first, dtype=np.uint8)
            scratch = _Scratch()
            while True:
                rec = dec.next_record(scratch)
                if isinstance(rec, (wire.Pages, wire.Zero)):
                    # the decoder checked that the run lies inside one region
                    for lo, hi, base in bases:
                        if lo <= rec.gpa < hi:
                            p = base + ((rec.gpa - lo) >> PAGE_SHIFT)
                            break
                    states[p:p + rec.npages] = DATA if isinstance(rec, wire.Pages) else ZERO
                    # ROUND n closes round n: what follows belongs to the next one
                    rounds[p:p + rec.npages] = min(dec.rounds + 1, 255)
                elif isinstance(rec, wire.End):
                    break
        except StreamError as e:
            raise StreamError(f"{path}: {e}") from None
    finally:
        f.close()
    mode = ("live" if header.live else "stop-copy") + (", hint on" if header.hint else ", hint off")
    return PageMap(f"migration stream {path} ({mode}, {dec.rounds} rounds)", STREAM_KINDS,
                   states, rounds, dec.rounds)


# ---- terminal ------------------------------------------------------------------------

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


# ---- PNG ----------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_META_KEY = "kvmlite-pagemap"   # tEXt keyword: the layout, as JSON, to read cells back


def _chunk(kind: bytes, data: bytes) -> bytes:
    # length, type, data, CRC-32 of type and data (PNG spec, section 5.3)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """An 8-bit RGB PNG of `pixels` (height x width x 3, uint8).

    Every scanline uses filter 0 (none): the picture is flat colour, which
    zlib compresses well without the filters' help.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or not pixels.shape[0] or not pixels.shape[1]:
        raise ValueError(f"pixels must be height x width x 3, not {pixels.shape}")
    h, w, _ = pixels.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)    # each row: filter byte, then RGB
    raw[:, 1:] = pixels.reshape(h, 3 * w)
    # IHDR: width, height, bit depth 8, colour type 2 (RGB), compression, filter, interlace 0
    out = [PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
    out.append(_chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def decode_png(data: bytes) -> tuple[np.ndarray, dict[str, str]]:
    """Read back what encode_png writes (8-bit RGB, filter 0): (pixels, tEXt entries).
    Not a general PNG reader: anything else raises KvmliteError."""
    if not data.startswith(PNG_SIGNATURE):
        raise KvmliteError("not a PNG file")
    pos, idat, text, ihdr = len(PNG_SIGNATURE), [], {}, None
    while pos + 12 <= len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + n)
        if len(body) != n or zlib.crc32(kind + body) != crc:
            raise KvmliteError(f"PNG chunk {kind!r} at byte {pos} is damaged")
        pos += 12 + n
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if ihdr is None or ihdr[2:] != (8, 2, 0, 0, 0):
        raise KvmliteError(f"not an 8-bit RGB PNG this module wrote (IHDR {ihdr})")
    w, h = ihdr[0], ihdr[1]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    if len(raw) != h * (1 + 3 * w):
        raise KvmliteError(f"PNG image data is {len(raw)} bytes, not {h * (1 + 3 * w)}")
    raw = raw.reshape(h, 1 + 3 * w)
    if raw[:, 0].any():
        raise KvmliteError("PNG uses scanline filters this reader does not undo")
    return raw[:, 1:].reshape(h, w, 3).copy(), text


# A 3x5 pixel font for the PNG's header and legend (letters are drawn upper case).
_FONT_ROWS = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "0": "111101101101111", "1": "010110010010111",
    "2": "110001010100111", "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100111101111", "7": "111001010010010", "8": "111101111101111", "9": "111101111001110",
    " ": "000000000000000", ".": "000000000000010", ",": "000000000010100", ":": "000010000010000",
    "(": "001010010010001", ")": "100010010010100", "-": "000000111000000", "/": "001001010100100",
    "%": "101001010100101", "+": "000010111010000", "=": "000111000111000", "'": "010010000000000",
    ";": "000010000010100", "?": "110001010000010",
}
_FONT = {c: np.array([int(b) for b in bits], dtype=bool).reshape(5, 3) for c, bits in _FONT_ROWS.items()}
TEXT_SCALE = 2
CHAR_W = 4 * TEXT_SCALE          # 3 pixels and a gap
LINE_H = 7 * TEXT_SCALE
TEXT_COLOUR = (230, 230, 230)
BACKGROUND = (12, 12, 16)


def _draw_text(img: np.ndarray, x: int, y: int, s: str, rgb=TEXT_COLOUR) -> None:
    for i, c in enumerate(s.upper()):
        glyph = np.kron(_FONT.get(c, _FONT["?"]), np.ones((TEXT_SCALE, TEXT_SCALE), dtype=bool))
        x0 = x + i * CHAR_W
        region = img[y:y + glyph.shape[0], x0:x0 + glyph.shape[1]]
        region[glyph[:region.shape[0], :region.shape[1]]] = rgb


def png_image(g: Grid, cell_px: int) -> tuple[np.ndarray, dict]:
    """The picture as pixels, and the layout a reader needs to find the cells again."""
    margin = 8
    rows, cols = g.cells.shape
    header = [f"kvmlite pagemap: {g.title}"] + ([g.summary] if g.summary else []) + [g.scale, g.rule]
    legend = [(k, n) for k, n in zip(g.kinds, g.page_counts) if n or not k.hide_if_none]
    legend_lines = [f"{n} pages ({n * PAGE_SIZE / (1 << 20):.1f} MiB): {k.name}" for k, n in legend]
    text_w = max(len(s) for s in header) * CHAR_W
    legend_w = LINE_H + CHAR_W + max(len(s) for s in legend_lines) * CHAR_W
    grid_w, grid_h = cols * cell_px, rows * cell_px
    width = 2 * margin + max(grid_w, text_w, legend_w)
    top = margin + len(header) * LINE_H + margin
    height = top + grid_h + margin + len(legend) * LINE_H + margin
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for i, s in enumerate(header):
        _draw_text(img, margin, margin + i * LINE_H, s)
    palette = np.array([k.rgb for k in g.kinds] + [BACKGROUND], dtype=np.uint8)
    cells = palette[np.where(g.cells >= 0, g.cells, len(g.kinds))]
    img[top:top + grid_h, margin:margin + grid_w] = np.repeat(np.repeat(cells, cell_px, 0), cell_px, 1)
    y = top + grid_h + margin
    swatch = 5 * TEXT_SCALE
    for (k, _), s in zip(legend, legend_lines):
        img[y:y + swatch, margin:margin + swatch] = k.rgb
        _draw_text(img, margin + LINE_H + CHAR_W // 2, y, s)
        y += LINE_H
    meta = {"pages": g.npages, "pages_per_cell": g.pages_per_cell, "columns": cols, "rows": rows,
            "cell_px": cell_px, "grid_x": margin, "grid_y": top, "rule": g.rule,
            "legend": [{"name": k.name, "rgb": list(k.rgb), "pages": n} for k, n in legend]}
    return img, meta


def write_png(g: Grid, path: str, cell_px: int | None = None) -> None:
    cols = g.cells.shape[1]
    cell_px = cell_px or max(1, min(8, 1024 // cols))
    img, meta = png_image(g, cell_px)
    data = encode_png(img, {"Title": f"kvmlite pagemap: {g.title}", PNG_META_KEY: json.dumps(meta)})
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise KvmliteError(f"cannot write {path}: {e.strerror}") from None


def read_png_cells(path: str) -> tuple[dict, np.ndarray]:
    """A pagemap PNG's layout and the colour of each cell (rows x columns x 3),
    read from its pixels: what a test or script checks a picture with."""
    with open(path, "rb") as f:
        pixels, text = decode_png(f.read())
    if PNG_META_KEY not in text:
        raise KvmliteError(f"{path}: not a kvmlite pagemap picture (no {PNG_META_KEY} text)")
    meta = json.loads(text[PNG_META_KEY])
    px, x0, y0 = meta["cell_px"], meta["grid_x"], meta["grid_y"]
    centre = px // 2
    cells = pixels[y0 + centre:y0 + meta["rows"] * px:px, x0 + centre:x0 + meta["columns"] * px:px]
    return meta, cells


# ---- the command ------------------------------------------------------------------

TERMINAL_COLUMNS = 64
TERMINAL_MAX_ROWS = 64     # 32 lines of half blocks
PNG_COLUMNS = 256


def fetch(monitor_path: str) -> PageMap:
    from .control.client import MonitorClient
    client = MonitorClient(monitor_path)
    try:
        return from_monitor(client.execute("query-pagemap"))
    finally:
        client.close()


def pagemap_command(args) -> int:
    if bool(args.source) == bool(args.monitor):
        raise ConfigError("give either --monitor PATH (a running VM) or file:PATH (a saved "
                          "migration stream)")
    if args.source:
        if not args.source.startswith("file:") or len(args.source) == 5:
            raise ConfigError(f"{args.source!r}: expected file:PATH, a migration stream saved "
                              "with kvmlite migrate ... file:PATH")
        pm = from_stream(args.source[5:])
    else:
        pm = fetch(args.monitor)
    from rich.console import Console
    console = Console()
    if args.png:
        cols = args.width or PNG_COLUMNS
        g = grid(pm, cols, cols, args.sent_rounds)
        write_png(g, args.png)
        print(f"kvmlite: wrote {args.png}: {g.scale}")
        return 0
    cols = args.width or min(TERMINAL_COLUMNS, max(console.width - 1, 8))
    render_terminal(grid(pm, cols, TERMINAL_MAX_ROWS, args.sent_rounds), console)
    return 0


def write_monitor_png(resp: dict, path: str, columns: int = PNG_COLUMNS) -> Grid:
    """The sent-rounds picture of a `query-pagemap` reply, as `kvmlite migrate --pagemap` writes it."""
    pm = from_monitor(resp)
    g = grid(pm, columns, columns, sent_rounds=pm.rounds is not None)
    write_png(g, path)
    return g

