"""`kvmlite migrate`: drive a source VM's monitor, show progress, print the stats."""

from __future__ import annotations

import json
import os
import sys
import time

from ..control.client import MonitorClient  # noqa: F401  (its callers import it from here)
from ..errors import KvmliteError, MigrationError
from ..units import human_bytes

POLL_INTERVAL = 0.05
FINAL = ("completed", "failed", "cancelled")


def stats_rows(s: dict) -> list[tuple[str, str]]:
    return [
        ("status", s["status"] + (f" ({s['error']})" if s.get("error") else "")),
        ("mode", ("live" if s["live"] else "stop-copy") + (", free page hint on" if s["hint"] else ", hint off")),
        ("total time", f"{s['total_ms']:.1f} ms"),
        ("setup time", f"{s['setup_ms']:.1f} ms"),
        ("downtime", f"{s['downtime_ms']:.2f} ms"),
        ("rounds", str(s["rounds"])),
        ("pages total", str(s["pages_total"])),
        ("pages skipped as free", str(s["pages_skipped_free"])),
        ("pages zero", str(s["pages_zero"])),
        ("pages sent (data)", str(s["pages_sent"])),
        ("pages re-sent", str(s["pages_resent"])),
        ("bytes on the wire", f"{s['bytes_wire']} ({human_bytes(s['bytes_wire'])})"),
        ("throughput", f"{s['throughput_mbps']:.0f} MiB/s"),
        ("dirty rate", f"{s['dirty_rate_pps']:.0f} pages/s"),
        ("vCPU throttled", f"{s['throttle_pct']} %"),
    ]


def print_stats(s: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="kvmlite migration", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for k, v in stats_rows(s):
        table.add_row(k, v)
    Console(file=file or sys.stdout).print(table)


def migrate_command(args) -> int:
    from ..units import parse_size
    client = MonitorClient(args.monitor)
    try:
        parse_size(args.bandwidth, "--bandwidth")
        if args.pagemap:
            _check_writable(args.pagemap)
        extra = {"downtime-ms": args.downtime_ms, "max-rounds": args.max_rounds}
        if args.timeout:
            extra["timeout"] = args.timeout
        if args.auth_key:
            # the source VMM reads the file: give it a path it can open
            extra["auth-key"] = os.path.abspath(args.auth_key)
        if args.keep_running:
            extra["keep-running"] = True
        client.execute("migrate", uri=args.uri, hint=args.hint, live=not args.stop_copy,
                       bandwidth=args.bandwidth, **extra)
        s = _follow(client, show_progress=not args.json and sys.stderr.isatty(),
                    hold=bool(args.pagemap))
        if args.pagemap:
            # The source was held: it is still up to be asked for the picture,
            # and goes only after the plain query-migrate that follows it.
            png_error = _write_pagemap(client, args.pagemap)
            s = client.execute("query-migrate")
    finally:
        client.close()
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print_stats(s)
    if args.pagemap and png_error:
        print(f"kvmlite: error: {png_error}", file=sys.stderr)
        return 1
    return 0 if s["status"] == "completed" else 1


def _check_writable(path: str) -> None:
    """A PNG that cannot be written should stop `migrate` before it starts, not after."""
    import os
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise KvmliteError(f"--pagemap {path}: cannot write into {folder}")


def _write_pagemap(client: MonitorClient, path: str) -> str | None:
    """Fetch query-pagemap and write its sent-rounds PNG; an error message, or None."""
    from ..pagemap import write_monitor_png
    try:
        g = write_monitor_png(client.execute("query-pagemap"), path)
    except KvmliteError as e:
        return str(e)
    print(f"kvmlite: wrote {path}: {g.scale}", file=sys.stderr)
    return None


def _follow(client: MonitorClient, show_progress: bool, hold: bool = False) -> dict:
    """Poll query-migrate until the migration ends.  `hold`: ask a finished
    source to stay up for more queries (a plain query-migrate releases it)."""
    query = {"hold": True} if hold else {}
    if not show_progress:
        while True:
            s = client.execute("query-migrate", **query)
            if s["status"] in FINAL:
                return s
            time.sleep(POLL_INTERVAL)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("[bold]migrating"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), transient=True) as progress:
        task = progress.add_task("", total=1.0)
        while True:
            s = client.execute("query-migrate", **query)
            done = s["pages_transferred"] + s["pages_skipped_free"]
            frac = min(done / max(s["pages_total"], 1), 1.0)
            progress.update(task, completed=frac, description=(
                f"round {s['rounds']}  sent {human_bytes(s['bytes_wire'])}  "
                f"skipped {s['pages_skipped_free']} free pages  [{s['status']}]"))
            if s["status"] in FINAL:
                return s
            time.sleep(POLL_INTERVAL)


def migrate(monitor_path: str, uri: str, **kwargs) -> dict:
    """Library entry point: migrate and return the final stats (raises on failure)."""
    client = MonitorClient(monitor_path)
    try:
        client.execute("migrate", uri=uri, **kwargs)
        s = _follow(client, show_progress=False)
    finally:
        client.close()
    if s["status"] != "completed":
        raise MigrationError(s.get("error") or s["status"])
    return s
