"""`kvmlite inspect`: a running VM's registers, exits by kind and page counts, over its QMP monitor."""

from __future__ import annotations

import json
import sys

from ..bitmap import PAGE_SIZE
from ..control.client import QmpClient
from ..units import human_bytes

GENERAL = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
CONTROL = ("rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer")


def gather(client) -> dict:
    """What `inspect` shows, from four monitor queries: the run state,
    x-query-vcpus (registers and exits of each vCPU), x-query-image and
    x-query-free-pages; the exits also summed over the vCPUs."""
    status = client.execute("query-status")
    vcpus = client.execute("x-query-vcpus")
    exits: dict[str, int] = {}
    for v in vcpus:
        for kind, n in v["exits"].items():
            exits[kind] = exits.get(kind, 0) + n
    return {"status": status["status"], "vcpus": vcpus,
            "exits": dict(sorted(exits.items(), key=lambda kv: (-kv[1], kv[0]))),
            "exits-total": sum(v["exits-total"] for v in vcpus),
            "image": client.execute("x-query-image"),
            "pages": client.execute("x-query-free-pages")}


def page_summary(pages: dict) -> list[tuple[str, str, str]]:
    """(what, pages, size) rows of the free-page bitmap summary."""
    total = pages["pages-total"]
    rows = [("total", str(total), human_bytes(total * PAGE_SIZE))]
    if pages.get("registered"):
        for what in ("free", "active"):
            rows.append((what, str(pages[what]), human_bytes(pages[what] * PAGE_SIZE)))
    else:
        rows.append(("free", "-", "no bitmap registered"))
    return rows


def render(info: dict, console) -> None:
    from rich.columns import Columns
    from rich.table import Table
    console.print(f"[bold]status[/bold] {info['status']}, {info['exits-total']} VM exits")

    first = info["vcpus"][0]
    regs = first.get("registers")
    if regs is None:
        console.print(f"registers not read: {first.get('registers-unread')}", highlight=False)
        tables = []
    else:
        general = Table(title="general registers", show_header=False)
        for a, b in zip(GENERAL[::2], GENERAL[1::2]):
            general.add_row(a, f"{regs[a]:#018x}", b, f"{regs[b]:#018x}")
        control = Table(title="control", show_header=False)
        for name in CONTROL:
            control.add_row(name, f"{regs[name]:#018x}")
        image = info.get("image")
        if image and image.get("loaded"):
            where = ("inside" if image["start"] <= regs["rip"] < image["end"] else "outside")
            control.add_row("", f"rip is {where} the image {image['start']:#x}..{image['end']:#x}")
        segs = Table(title="segments")
        for col in ("", "selector", "dpl", "base", "limit", "l", "db"):
            segs.add_column(col)
        for seg in ("cs", "ss"):
            s = regs[seg]
            segs.add_row(seg, f"{s['selector']:#06x}", str(s["dpl"]), f"{s['base']:#x}",
                         f"{s['limit']:#x}", str(s["l"]), str(s["db"]))
        tables = [general, control, segs]

    if len(info["vcpus"]) > 1:
        cpus = Table(title="every vCPU")
        for col in ("vCPU", "rip", "rsp", "CPL", "exits", "most frequent exit"):
            cpus.add_column(col, justify="right")
        for v in info["vcpus"]:
            r = v.get("registers")
            top = next(iter(v["exits"].items()), ("-", 0))
            cpus.add_row(str(v["cpu-index"]), f"{r['rip']:#x}" if r else "-", f"{r['rsp']:#x}" if r else "-",
                         str(r["cs"]["selector"] & 3) if r else "-", str(v["exits-total"]),
                         f"{top[0]} ({top[1]})")
        tables.append(cpus)

    exits = Table(title="VM exits by kind")
    exits.add_column("kind")
    exits.add_column("count", justify="right")
    for kind, n in info["exits"].items():      # the monitor sends them most frequent first
        exits.add_row(kind, str(n))
    pages = Table(title="free-page bitmap")
    pages.add_column("pages")
    pages.add_column("count", justify="right")
    pages.add_column("size", justify="right")
    for row in page_summary(info["pages"]):
        pages.add_row(*row)
    console.print(Columns(tables + [exits, pages]))


def inspect_command(*, monitor: str, as_json: bool = False) -> int:
    """Print what `gather` reads from the VM whose monitor socket is `monitor`:
    tables, or JSON with `as_json`."""
    with QmpClient(monitor) as client:
        info = gather(client)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    render(info, Console(file=sys.stdout))
    return 0
