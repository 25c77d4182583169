"""A pagemap grid as a PNG: the codec (zlib and struct only), a 3x5 font for
the header and legend, and read_png_cells to find each cell again."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np

from ..errors import KvmliteError
from .grid import Grid
from .model import PAGE_SIZE

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
