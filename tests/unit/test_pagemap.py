"""kvmlite.pagemap and kvmlite pagemap: the PNG encoder, the grid rules, stream files, the terminal."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from rich.console import Console

from tests.fakes import FakeMachine
from kvmlite.cli import main
from kvmlite.control.arraycodec import decode_array, encode_array, mask_to_words, words_to_mask
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
            "dirty": encode_array(mask_to_words(dirty)), "sent_round": encode_array(sent),
            "migration": {"status": "active", "hint": True, "rounds": 2}}
    got = from_monitor(json.loads(json.dumps(resp)))
    assert got.states.tolist() == [FREE, UNTOUCHED, ACTIVE, ACTIVE,
                                   FREE, DIRTY, ACTIVE, ACTIVE]
    assert got.rounds.tolist() == sent.tolist()
    assert "3 pages free" in got.summary and "5 active" in got.summary
    resp["migration"]["hint"] = False
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
    page 1 again and page 6 as zero; then state and END."""
    crc = wire.Crc()
    out = [crc.add(wire.encode_preamble({"page_size": 4096, "ram": [[0, 8 * 4096]], "vcpus": 1,
                                         "hint": True, "live": True, "source": "test"}))]
    out += [crc.add(wire.pages_header(0, 2)), b"\x11" * 8192]
    out += [crc.add(wire.zero_record(4 * 4096, 1)), crc.add(wire.round_record(1))]
    out += [crc.add(wire.pages_header(4096, 1)), b"\x22" * 4096]
    out += [crc.add(wire.zero_record(6 * 4096, 1)), crc.add(wire.round_record(2))]
    out += [crc.add(wire.state_record({"version": 1})), wire.end_record(3, 2, crc.value)]
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
    assert main(["pagemap", f"file:{path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvmlite: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["pagemap"], "either --monitor"),
    (["pagemap", "vm.mig"], "expected file:PATH"),
    (["pagemap", "file:/nonexistent/vm.mig"], "No such file"),
    (["pagemap", "--monitor", "/nonexistent.sock"], "cannot connect"),
    (["inspect", "--monitor", "/nonexistent.sock"], "cannot connect"),
])
def test_bad_pagemap_and_inspect_input_is_one_line(argv, message, capsys):
    """Bad sources and missing monitors give one clear line and status 1."""
    assert main(argv) == 1
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


# ---- the monitor's side: query-vcpu's pause policy, query-pagemap's arrays ---------------------


@pytest.fixture
def monitor_for(tmp_path):
    from kvmlite.monitor import Monitor
    made = []

    def make(machine):
        made.append(Monitor(machine, f"unix:{tmp_path}/m{len(made)}.sock"))
        return made[-1]
    yield make
    for m in made:
        m.stop()


def test_query_vcpu_pauses_a_running_vm_and_resumes_it(monitor_for):
    """A running VM is paused for the read and resumed; the reply has rip, cs and the exits."""
    m = FakeMachine()
    r = monitor_for(m).handle_line(b'{"execute": "query-vcpu"}\n')["return"]
    assert m.calls == ["pause", "resume"] and not m.paused
    assert r["registers"]["rip"] == 0x101000 and r["registers"]["cs"]["dpl"] == 3
    assert r["exits"] == {"IoOut": 4, "IoIn": 1} and r["exits_total"] == 5


def test_query_vcpu_leaves_a_stopped_vm_stopped(monitor_for):
    """A VM already paused is read as it is: no pause, no resume."""
    m = FakeMachine(paused=True)
    r = monitor_for(m).handle_line(b'{"execute": "query-vcpu"}\n')["return"]
    assert m.calls == [] and m.paused and r["registers"]["rip"] == 0x101000


def test_query_vcpu_does_not_touch_a_migrating_vm(monitor_for):
    """While a migration runs, registers are not read: its pause is not ours to undo."""
    import threading
    m = FakeMachine()
    mon = monitor_for(m)
    mon.migration = type("Mig", (), {"done": threading.Event()})()
    r = mon.handle_line(b'{"execute": "query-vcpu"}\n')["return"]
    assert m.calls == [] and r["registers"] is None and "migration" in r["registers_unread"]


def test_query_pagemap_arrays_decode_to_the_machine_bitmaps(monitor_for):
    """query-pagemap's free, backed, dirty and sent_round arrays decode to what the machine holds."""
    import threading
    from types import SimpleNamespace
    n = 100
    free = np.zeros(n, dtype=bool)
    free[10:60] = True
    backed = np.ones(n, dtype=bool)
    backed[40:] = False
    m = FakeMachine()
    m.fph = SimpleNamespace(free_mask=lambda: free)
    m.memory = SimpleNamespace(npages=n, backed_pages=lambda first, count: backed[first:first + count])
    mon = monitor_for(m)
    sent = np.zeros(n, dtype=np.uint8)
    sent[:5] = 1
    dirty = mask_to_words(np.arange(n) == 70)
    mon.migration = SimpleNamespace(done=threading.Event(), dirty_words=dirty, sent_round=sent,
                                    stats=SimpleNamespace(status="active", hint=True, rounds=1))
    r = json.loads(json.dumps(mon.handle_line(b'{"execute": "query-pagemap"}\n')["return"]))
    assert np.array_equal(words_to_mask(decode_array(r["free"]), n), free)
    assert np.array_equal(words_to_mask(decode_array(r["backed"]), n), backed)
    assert np.flatnonzero(words_to_mask(decode_array(r["dirty"]), n)).tolist() == [70]
    got = from_monitor(r)
    assert got.rounds[:6].tolist() == [1] * 5 + [0]
    assert got.states[70] == DIRTY and got.states[50] == UNTOUCHED and got.states[20] == FREE
    mon.migration.done.set()
    assert mon.handle_line(b'{"execute": "query-pagemap"}\n')["return"]["dirty"] is None


def test_query_migrate_hold_keeps_a_finished_source(monitor_for):
    """query-migrate with hold does not release a finished source; a plain one does."""
    import threading
    from types import SimpleNamespace
    mon = monitor_for(FakeMachine())
    done = threading.Event()
    done.set()
    mon.migration = SimpleNamespace(done=done, stats=SimpleNamespace(as_dict=lambda: {"status": "completed"}))
    mon.handle_line(b'{"execute": "query-migrate", "arguments": {"hold": true}}\n')
    assert mon.held.is_set() and not mon.final_seen.is_set()
    mon.handle_line(b'{"execute": "query-migrate"}\n')
    assert mon.final_seen.is_set()


def test_the_tools_take_keyword_arguments_not_a_command_line(monitor_for, capsys):
    """inspect_command and pagemap_command called from Python against a live monitor: no argparse."""
    from types import SimpleNamespace

    from kvmlite.tools.inspect import inspect_command
    from kvmlite.tools.pagemap import pagemap_command
    n = 100
    free = np.zeros(n, dtype=bool)
    free[10:60] = True
    backed = np.arange(n) < 40
    m = FakeMachine()
    m.fph = SimpleNamespace(registration=object(), count_free=lambda: int(free.sum()),
                            free_mask=lambda: free)
    m.memory = SimpleNamespace(npages=n, backed_pages=lambda first, count: backed[first:first + count])
    mon = monitor_for(m)
    mon.start()
    assert inspect_command(monitor=mon.path, as_json=True) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["registers"]["rip"] == 0x101000 and info["pages"]["free"] == 50
    assert m.calls == ["pause", "resume"]
    assert pagemap_command(monitor=mon.path, width=10) == 0
    out = capsys.readouterr().out        # no colour on a captured stdout: a letter a page
    rows = [line for line in out.splitlines() if line and set(line) <= set("#-.D")]
    assert rows == ["#" * 10] + ["-" * 10] * 3 + ["." * 10] * 2 + ["#" * 10] * 4


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
    import numpy as np

    from kvmlite.control.arraycodec import encode_array
    from kvmlite.pagemap.grid import grid
    from kvmlite.pagemap.model import POSTCOPY_KINDS, from_monitor
    codes = np.array([0] * 10 + [3] * 6 + [4] * 2 + [5] * 8 + [6] * 3 + [1], dtype=np.uint8)
    pm = from_monitor({"pages": len(codes), "page_size": 4096, "free": None, "backed": None,
                       "dirty": None, "sent_round": None, "postcopy": encode_array(codes)})
    assert "2 pages came by fault, 6 by the push, 3 free pages got a zero page here; 1 still" in pm.summary
    g = grid(pm, 30, 30)
    names = [k.name for k in g.kinds]
    assert g.page_counts[names.index(POSTCOPY_KINDS[7].name)] == 2      # by fault
    # two pages a cell: a cell with one faulted page shows it
    g2 = grid(pm, 15, 1)
    assert POSTCOPY_KINDS[7].name in [g2.kinds[c].name for c in g2.cells.ravel() if c >= 0]
    with pytest.raises(Exception, match="unknown post-copy page state"):
        from_monitor({"pages": 1, "postcopy": encode_array(np.array([9], np.uint8))})
