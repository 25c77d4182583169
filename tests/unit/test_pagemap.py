"""kvmlite.pagemap and kvmlite pagemap: the PNG encoder, the grid rules, stream files, the terminal."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from rich.console import Console

from kvmlite import exitcodes
from kvmlite.cli import main
from kvmlite.control.arraycodec import encode_array, mask_to_words
from kvmlite.pagemap.grid import grid
from kvmlite.pagemap.model import (ACTIVE, DATA, DIRTY, FREE, NOT_SENT, UNTOUCHED, VM_KINDS, ZERO,
                                   PageMap, from_monitor, round_colour)
from kvmlite.pagemap.png import (PNG_META_KEY, decode_png, encode_png, png_image, read_png_cells,
                                 write_png)
from kvmlite.pagemap.stream import from_stream
from kvmlite.pagemap.terminal import UPPER_HALF, render_terminal
from kvmlite.errors import KvmliteError, StreamError
from kvmlite.migration import wire


# ---- PNG --------------------------------------------------------------------------


def independent_decode(data: bytes):
    """Decode a PNG with nothing but struct and zlib, checking every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    stride = 1 + 3 * w
    assert len(raw) == h * stride
    rows = [raw[i * stride:(i + 1) * stride] for i in range(h)]
    assert all(r[0] == 0 for r in rows)           # filter type 0 on every scanline
    pixels = np.frombuffer(b"".join(r[1:] for r in rows), dtype=np.uint8).reshape(h, w, 3)
    return pixels, [k for k, _ in chunks]


def test_png_encoder_output_decodes_to_the_same_pixels():
    """encode_png's bytes, decoded with zlib and struct alone, give back every pixel."""
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    data = encode_png(img, {"Title": "test"})
    pixels, kinds = independent_decode(data)
    assert np.array_equal(pixels, img)
    assert kinds == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    back, text = decode_png(data)
    assert np.array_equal(back, img) and text == {"Title": "test"}


def test_png_encoder_output_reads_in_pillow_too():
    """A general PNG reader (Pillow, when installed) reads the same pixels."""
    image = pytest.importorskip("PIL.Image")
    img = np.zeros((4, 6, 3), dtype=np.uint8)
    img[1, 2] = (255, 10, 20)
    img[3, 5] = (1, 2, 3)
    got = np.asarray(image.open(io.BytesIO(encode_png(img))).convert("RGB"))
    assert np.array_equal(got, img)


def test_png_decoder_rejects_damage():
    """A flipped byte in a chunk is reported as damage, not decoded."""
    data = bytearray(encode_png(np.full((2, 2, 3), 9, dtype=np.uint8)))
    data[-20] ^= 0xFF                                   # inside IDAT
    with pytest.raises(KvmliteError, match="damaged"):
        decode_png(bytes(data))
    with pytest.raises(KvmliteError, match="not a PNG"):
        decode_png(b"GIF89a")


def test_png_encoder_refuses_a_bad_shape():
    """Only height x width x 3 images are encoded."""
    with pytest.raises(ValueError):
        encode_png(np.zeros((3, 3), dtype=np.uint8))


# ---- the grid ----------------------------------------------------------------------------


def vm_map(states, rounds=None):
    return PageMap("test", VM_KINDS, np.array(states, dtype=np.uint8),
                      None if rounds is None else np.array(rounds, dtype=np.uint8))


def test_one_page_per_cell_shows_every_page():
    """With room for every page, each cell is its page's state; cells past the end are empty."""
    states = [ACTIVE, FREE, UNTOUCHED, DIRTY, FREE]
    g = grid(vm_map(states), columns=3, max_rows=10)
    assert g.pages_per_cell == 1
    assert g.cells.tolist() == [[2, 1, 0], [3, 1, -1]]
    assert g.page_counts == [1, 2, 1, 1]
    assert g.rule == "one page per cell"


def test_several_pages_per_cell_any_dirty_then_majority():
    """A cell is dirty if any page is; else its most common state, a tie going to the more used one."""
    states = [FREE, FREE, FREE, ACTIVE,                # majority free
              FREE, DIRTY, FREE, FREE,                 # one dirty page: dirty
              UNTOUCHED, UNTOUCHED, ACTIVE, ACTIVE,    # tie: active wins
              UNTOUCHED]                               # a last, partial cell
    g = grid(vm_map(states), columns=2, max_rows=2)
    assert g.pages_per_cell == 4
    assert g.cells.tolist() == [[FREE, DIRTY], [ACTIVE, UNTOUCHED]]
    assert "dirty' if any of its pages is" in g.rule and "4 pages" in g.scale


def test_sent_rounds_view_shows_the_latest_round_and_greys_the_rest():
    """Rounds view: sent pages by round (a cell takes its latest), unsent ones in grey state colours."""
    states = [ACTIVE, ACTIVE, FREE, UNTOUCHED]
    rounds = [1, 3, 0, 0]
    g = grid(vm_map(states, rounds), columns=4, max_rows=1, sent_rounds=True)
    names = [k.name for k in g.kinds]
    assert names[4:] == ["sent in round 1", "sent in round 2", "sent in round 3"]
    assert [names[c] for c in g.cells[0]] == ["sent in round 1", "sent in round 3",
                                             names[FREE], names[UNTOUCHED]]
    assert all(k.rgb[0] == k.rgb[1] == k.rgb[2] for k in g.kinds[:4])
    coarse = grid(vm_map(states, rounds), columns=1, max_rows=1, sent_rounds=True)
    assert names[coarse.cells[0, 0]] == "sent in round 3"
    with pytest.raises(KvmliteError, match="no migration"):
        grid(vm_map(states), columns=4, max_rows=1, sent_rounds=True)


def test_round_colours_are_distinct_and_never_grey():
    """Up to 255 rounds, every round has its own colour, none of them a grey."""
    colours = [round_colour(r, 30) for r in range(1, 31)]
    assert len(set(colours)) == 30
    assert all(len(set(c)) > 1 for c in colours)


def test_from_monitor_orders_the_states():
    """Never touched = unbacked and not in use; a dirty free page is not dirty when the hint is on."""
    n = 8
    free = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    backed = np.array([1, 0, 1, 0, 1, 1, 1, 1], dtype=bool)
    dirty = np.array([0, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    sent = np.array([0, 0, 2, 0, 1, 1, 0, 0], dtype=np.uint8)
    resp = {"pages": n, "free": encode_array(mask_to_words(free)),
            "backed": encode_array(mask_to_words(backed)),
            "dirty": encode_array(mask_to_words(dirty)), "sent-round": encode_array(sent),
            "migration": {"status": "active", "x-free-page-hint": True, "rounds": 2}}
    got = from_monitor(json.loads(json.dumps(resp)))
    assert got.states.tolist() == [FREE, UNTOUCHED, ACTIVE, ACTIVE,
                                   FREE, DIRTY, ACTIVE, ACTIVE]
    assert got.rounds.tolist() == sent.tolist()
    assert "3 pages free" in got.summary and "5 active" in got.summary
    resp["migration"]["x-free-page-hint"] = False
    assert from_monitor(resp).states[4] == DIRTY
    no_bitmap = from_monitor({"pages": n, "backed": resp["backed"]})
    assert no_bitmap.states.tolist() == [ACTIVE, UNTOUCHED, ACTIVE, UNTOUCHED] + [ACTIVE] * 4


def test_terminal_without_colour_draws_a_letter_per_cell():
    """The no-colour terminal picture has exactly one letter per page at one page per cell."""
    states = [ACTIVE] * 5 + [FREE] * 3 + [UNTOUCHED] * 4
    g = grid(vm_map(states), columns=4, max_rows=8)
    out = io.StringIO()
    render_terminal(g, Console(file=out, color_system=None, width=100))
    lines = out.getvalue().splitlines()
    assert lines[2:5] == ["####", "#---", "...."]
    assert "12 pages" in lines[1]


def test_png_cells_read_back_as_the_grid():
    """The PNG's cells, found again through its layout text, have the grid's colours."""
    rng = np.random.default_rng(3)
    states = rng.integers(0, 4, size=1000).astype(np.uint8)
    g = grid(vm_map(states), columns=40, max_rows=40)
    buf = io.BytesIO()
    img, meta = png_image(g, 3)
    buf.write(encode_png(img, {PNG_META_KEY: json.dumps(meta)}))
    pixels, text = decode_png(buf.getvalue())
    meta = json.loads(text[PNG_META_KEY])
    assert meta["pages_per_cell"] == 1 and meta["rows"] == 25
    want = np.array([k.rgb for k in g.kinds])[g.cells]
    x0, y0 = meta["grid_x"], meta["grid_y"]
    got = pixels[y0 + 1:y0 + 75:3, x0 + 1:x0 + 120:3]
    assert np.array_equal(got, want)


def test_write_png_and_read_png_cells(tmp_path):
    """write_png then read_png_cells gives one colour per cell and the page counts in the legend."""
    states = [ACTIVE] * 10 + [FREE] * 6
    g = grid(vm_map(states), columns=4, max_rows=4)
    path = tmp_path / "m.png"
    write_png(g, str(path))
    meta, cells = read_png_cells(str(path))
    active = tuple(VM_KINDS[ACTIVE].rgb)
    assert sum(tuple(c) == active for c in cells.reshape(-1, 3).tolist()) == 10
    assert {e["name"]: e["pages"] for e in meta["legend"]}[VM_KINDS[FREE].name] == 6


# ---- migration streams saved to a file -------------------------------------------------------


def small_stream() -> bytes:
    """8 pages of RAM: round 1 sends pages 0-1 as data and 4 as zero; round 2 sends
    page 1 again and page 6 as zero; then state and END.  Tagged with the file
    keys, as every snapshot is (docs/wire-format.md, "Integrity")."""
    integrity = wire.Integrity(wire.FILE_KEYS)
    crc = wire.Crc()
    out = []

    def struct(b: bytes) -> None:
        crc.add(b)
        integrity.structure(b)
        out.append(b)

    def pages(gpa: int, payload: bytes) -> None:
        head = wire.pages_header(gpa, len(payload) // 4096)
        tags = integrity.tags(head, np.frombuffer(payload, np.uint8).ctypes.data, np.array([0]),
                              np.array([len(payload) // 4096]))
        struct(head)
        out.extend([payload, tags])

    struct(wire.encode_preamble({"page_size": 4096, "ram": [[0, 8 * 4096]], "vcpus": 1, "hint": True,
                                 "live": True, "source": "test", "integrity": wire.INTEGRITY}))
    pages(0, b"\x11" * 8192)
    struct(wire.zero_record(4 * 4096, 1))
    struct(wire.round_record(1))
    pages(4096, b"\x22" * 4096)
    struct(wire.zero_record(6 * 4096, 1))
    struct(wire.round_record(2))
    struct(wire.state_record({"version": 1}))
    out.append(wire.end_record(3, 2, crc.value, integrity))
    return b"".join(out)


def test_stream_file_gives_each_page_its_round_and_record_kind(tmp_path):
    """Pages of a saved stream: the kind of the last record that carried them, and its round."""
    path = tmp_path / "vm.mig"
    path.write_bytes(small_stream())
    got = from_stream(str(path))
    D, Z, N = DATA, ZERO, NOT_SENT
    assert got.states.tolist() == [D, D, N, N, Z, N, Z, N]
    assert got.rounds.tolist() == [1, 2, 0, 0, 1, 0, 2, 0]
    assert "2 rounds" in got.title


def test_pagemap_command_on_a_stream_file(tmp_path, capsys):
    """`kvmlite pagemap file:PATH` draws the stream; with --sent-rounds, by round."""
    path = tmp_path / "vm.mig"
    path.write_bytes(small_stream())
    assert main(["pagemap", f"file:{path}"]) == 0
    out = capsys.readouterr().out
    assert "##..0.0." in out and "sent as a ZERO record" in out
    assert main(["pagemap", f"file:{path}", "--sent-rounds"]) == 0
    assert "12..1.2." in capsys.readouterr().out
    png = tmp_path / "vm.png"
    assert main(["pagemap", f"file:{path}", "--png", str(png)]) == 0
    meta, cells = read_png_cells(str(png))
    assert meta["pages"] == 8 and cells.shape == (1, 8, 3)


def test_truncated_stream_file_is_a_one_line_error(tmp_path, capsys):
    """A stream cut short names the file and what is missing; no traceback."""
    path = tmp_path / "cut.mig"
    path.write_bytes(small_stream()[:-30])
    with pytest.raises(StreamError, match="cut.mig"):
        from_stream(str(path))
    assert main(["pagemap", f"file:{path}"]) == exitcodes.DATAERR
    err = capsys.readouterr().err
    assert err.startswith("kvmlite: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message, status", [
    (["pagemap"], "either --monitor", exitcodes.CONFIG),
    (["pagemap", "vm.mig"], "expected file:PATH", exitcodes.CONFIG),
    (["pagemap", "file:/nonexistent/vm.mig"], "No such file", exitcodes.DATAERR),
    (["pagemap", "--monitor", "/nonexistent.sock"], "cannot connect", exitcodes.UNAVAILABLE),
    (["inspect", "--monitor", "/nonexistent.sock"], "cannot connect", exitcodes.UNAVAILABLE),
])
def test_bad_pagemap_and_inspect_input_is_one_line(argv, message, status, capsys):
    """Bad sources and missing monitors give one clear line and an exit status that says which."""
    assert main(argv) == status
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_terminal_in_colour_draws_two_cell_rows_per_line():
    """In colour, each line is two rows of cells: upper half block in the top cell's colour on the bottom's."""
    states = [UNTOUCHED] * 4 + [ACTIVE] * 4 + [DIRTY]
    g = grid(vm_map(states), columns=4, max_rows=8)
    out = io.StringIO()
    render_terminal(g, Console(file=out, color_system="truecolor", width=100))
    lines = out.getvalue().splitlines()
    untouched, active, dirty = (VM_KINDS[k].rgb for k in (UNTOUCHED, ACTIVE, DIRTY))
    top_on_bottom = "\x1b[38;2;{};{};{};48;2;{};{};{}m".format(*untouched, *active)
    assert lines[2].count(top_on_bottom) == 4 and lines[2].count(UPPER_HALF) == 4
    assert "\x1b[38;2;{};{};{}m".format(*dirty) in lines[3] and lines[3].count(UPPER_HALF) == 1


def test_postcopy_page_states_are_the_engines_own_codes():
    """The model's post-copy codes are kvmlite._postcopy's KVMLITE_PC_* (the monitor
    sends the engine's state array as it is)."""
    from kvmlite._postcopy import lib
    from kvmlite.pagemap import model
    assert model.POSTCOPY_CODES == {
        lib.KVMLITE_PC_OTHER: model.PC_HERE, lib.KVMLITE_PC_PENDING: model.PC_PENDING,
        lib.KVMLITE_PC_REQUESTED: model.PC_REQUESTED, lib.KVMLITE_PC_PUSHED: model.PC_PUSHED,
        lib.KVMLITE_PC_FAULTED: model.PC_FAULTED, lib.KVMLITE_PC_FREE: model.PC_FREE,
        lib.KVMLITE_PC_ZERO_FREE: model.PC_ZERO_FREE, lib.KVMLITE_PC_ZERO_OTHER: model.PC_ZERO_OTHER}


def test_a_postcopy_destination_is_drawn_by_how_each_page_came():
    """x-query-pagemap's postcopy-state array is drawn by how each page came."""
    from kvmlite.pagemap.model import POSTCOPY_KINDS, from_monitor
    codes = np.array([0] * 10 + [3] * 6 + [4] * 2 + [5] * 8 + [6] * 3 + [1], dtype=np.uint8)
    pm = from_monitor({"pages": len(codes), "page-size": 4096, "free": None, "backed": None,
                       "dirty": None, "sent-round": None, "postcopy-state": encode_array(codes)})
    assert "2 pages came by fault, 6 by the push, 3 free pages got a zero page here; 1 still" in pm.summary
    g = grid(pm, 30, 30)
    names = [k.name for k in g.kinds]
    assert g.page_counts[names.index(POSTCOPY_KINDS[7].name)] == 2      # by fault
    # two pages a cell: a cell with one faulted page shows it
    g2 = grid(pm, 15, 1)
    assert POSTCOPY_KINDS[7].name in [g2.kinds[c].name for c in g2.cells.ravel() if c >= 0]
    with pytest.raises(Exception, match="unknown post-copy page state"):
        from_monitor({"pages": 1, "postcopy-state": encode_array(np.array([9], np.uint8))})
