"""`kvmlite inspect` and `kvmlite pagemap` against real VMs, and the picture of a real migration."""

from __future__ import annotations

import json

from kvmlite.pagemap.model import ACTIVE, DATA, FREE, STREAM_KINDS, UNTOUCHED, VM_KINDS, ZERO
from kvmlite.pagemap.png import read_png_cells
from kvmlite.procs import VmProcess, free_port, start_destination

from .helpers import fill_vm, kvmlite

MEMORY = "64M"          # 16384 pages: one page per cell at 128 or 256 columns
PAGES = 16384
LOAD_ADDR = 0x100000    # flat images load at 1 MiB (docs/boot.md)


def small_fill_vm() -> VmProcess:
    return fill_vm(MEMORY, live=20, stale=30, dirty=200)[0]


def cell_counts(png: str) -> tuple[dict, dict[str, int]]:
    """A pagemap PNG's layout, and how many of its cells have each legend colour."""
    meta, cells = read_png_cells(png)
    colours = [tuple(c) for c in cells.reshape(-1, 3).tolist()]
    return meta, {e["name"]: colours.count(tuple(e["rgb"])) for e in meta["legend"]}


def test_inspect_shows_rip_in_the_image_and_the_exits_the_guest_makes(guest_image):
    """inspect --json: RIP inside the loaded image at CPL 3, I/O exits counted, bitmap page counts."""
    with small_fill_vm() as vm:
        out = kvmlite("inspect", "--monitor", vm.monitor_path, "--json")
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        regs = info["vcpus"][0]["registers"]
        image_end = LOAD_ADDR + guest_image.stat().st_size
        assert LOAD_ADDR <= regs["rip"] < image_end, hex(regs["rip"])
        assert regs["cs"]["dpl"] == 3 and regs["cs"]["l"] == 1     # the guest works in 64-bit ring 3
        assert info["exits"]["IoOut"] > 0 and info["exits"]["IoIn"] > 0   # serial output, idle device
        assert sum(info["exits"].values()) > 0 and info["status"] == "running"
        pages = info["pages"]
        assert pages["pages-total"] == PAGES and pages["free"] + pages["active"] == PAGES
        assert vm.execute("query-status")["status"] == "running"     # inspect paused it and resumed it

        table = kvmlite("inspect", "--monitor", vm.monitor_path)
        assert table.returncode == 0, table.stderr
        assert "rip is inside the image" in table.stdout and "IoOut" in table.stdout


def test_inspect_leaves_a_stopped_vm_stopped(guest_image):
    """A VM the user stopped is read where it stands and stays stopped."""
    with small_fill_vm() as vm:
        vm.execute("stop")
        first = json.loads(kvmlite("inspect", "--monitor", vm.monitor_path, "--json").stdout)
        again = json.loads(kvmlite("inspect", "--monitor", vm.monitor_path, "--json").stdout)
        assert first["status"] == again["status"] == "paused"
        assert first["vcpus"][0]["registers"]["rip"] == again["vcpus"][0]["registers"]["rip"]  # it did not move
        assert vm.execute("query-status")["status"] == "paused"
        vm.execute("cont")
        vm.execute("x-guest-finish")
        assert vm.wait(60) == 0, vm.output()


def test_pagemap_free_cells_equal_query_free_pages(guest_image, tmp_path):
    """The picture's free cells (never touched + stale) are the bitmap's free pages."""
    with small_fill_vm() as vm:
        vm.execute("stop")                 # hold the bitmap still between the two looks
        free = vm.execute("x-query-free-pages")
        png = tmp_path / "vm.png"
        out = kvmlite("pagemap", "--monitor", vm.monitor_path, "--png", str(png), "--width", "128")
        assert out.returncode == 0, out.stderr
        meta, counts = cell_counts(str(png))
        assert meta["pages_per_cell"] == 1 and meta["pages"] == PAGES
        names = [k.name for k in VM_KINDS]
        assert counts[names[UNTOUCHED]] + counts[names[FREE]] == free["free"]
        assert counts[names[ACTIVE]] == free["active"]
        text = kvmlite("pagemap", "--monitor", vm.monitor_path)
        assert text.returncode == 0, text.stderr
        assert f"{free['free']} pages free" in text.stdout


def test_migrate_pagemap_png_marks_every_page_sent(guest_image, tmp_path):
    """migrate --pagemap: the PNG's cells sent in some round are the distinct pages the migration sent."""
    port = free_port()
    dst = start_destination(port, MEMORY)
    with small_fill_vm() as src, dst:
        png = tmp_path / "sent.png"
        out = kvmlite("migrate", "--monitor", src.monitor_path, f"tcp:127.0.0.1:{port}", "--json",
                      "--pagemap", str(png))
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        assert s["status"] == "completed"
        assert f"wrote {png}" in out.stderr
        meta, counts = cell_counts(str(png))
        assert meta["pages_per_cell"] == 1
        sent = sum(n for name, n in counts.items() if name.startswith("sent in round"))
        assert sent == s["ram"]["normal"] + s["ram"]["duplicate"] - s["ram"]["x-resent"]
        assert f"sent in round {len(s['x-rounds'])} (final pass, vCPU paused)" in counts
        assert src.wait(30) == 0, src.output()
        dst.execute("x-guest-finish")
        assert dst.wait(60) == 0, dst.output()


def test_pagemap_of_a_saved_stream_counts_its_pages(guest_image, tmp_path):
    """pagemap file:PATH of a real snapshot: data and zero pages are the pages the migration sent."""
    stream = tmp_path / "vm.mig"
    with small_fill_vm() as src:
        out = kvmlite("migrate", "--monitor", src.monitor_path, f"file:{stream}", "--json", "--stop-copy")
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        assert s["status"] == "completed"
    png = tmp_path / "stream.png"
    shown = kvmlite("pagemap", f"file:{stream}", "--png", str(png))
    assert shown.returncode == 0, shown.stderr
    meta, counts = cell_counts(str(png))
    names = [k.name for k in STREAM_KINDS]
    assert counts[names[DATA]] == s["ram"]["normal"] and counts[names[ZERO]] == s["ram"]["duplicate"]
    rounds = kvmlite("pagemap", f"file:{stream}", "--sent-rounds")
    assert rounds.returncode == 0 and "sent in round 1" in rounds.stdout
