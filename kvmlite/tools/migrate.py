"""`kvmlite migrate`: drive a source VM's monitor, show progress, print the stats."""

from __future__ import annotations

import json
import os
import sys
import time

from ..control.client import MonitorClient
from ..errors import KvmliteError, MigrationError
from ..units import human_bytes

POLL_INTERVAL = 0.05
FINAL = ("completed", "failed", "cancelled", "unresolved")


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


def migrate_command(*, monitor: str, uri: str | None = None, hint: bool = True,
                    stop_copy: bool = False, downtime_ms: float = 5.0, bandwidth: str = "0",
                    max_rounds: int = 30, as_json: bool = False, timeout: float | None = None,
                    auth_key: str | None = None, keep_running: bool = False,
                    pagemap: str | None = None, resolve: str | None = None, channels: int = 1,
                    local: bool = False) -> int:
    """`kvmlite migrate`: start a migration on a VM's monitor, follow it, print its stats.
    With `resolve` ("source" or "destination"), settle an unresolved one instead."""
    from ..units import parse_size
    client = MonitorClient(monitor)
    png_error = None
    try:
        if resolve is not None:
            client.execute("x-migrate-resolve", owner=resolve)
            s = client.execute("query-migrate")
            print(f"kvmlite: migration resolved: {s['status']}", file=sys.stderr)
            return 0
        if uri is None:
            raise KvmliteError("give the destination (tcp:HOST:PORT, unix:PATH or file:PATH), "
                               "or --resolve")
        parse_size(bandwidth, "--bandwidth")
        if pagemap:
            _check_writable(pagemap)
        extra = {"downtime-ms": downtime_ms, "max-rounds": max_rounds}
        if timeout:
            extra["timeout"] = timeout
        if auth_key:
            # the source VMM reads the file: give it a path it can open
            extra["auth-key"] = os.path.abspath(auth_key)
        if keep_running:
            extra["keep-running"] = True
        if channels != 1:
            extra["channels"] = channels
        if local:
            extra["local"] = True
        client.execute("migrate", uri=uri, hint=hint, live=not stop_copy,
                       bandwidth=bandwidth, **extra)
        s = follow(client, show_progress=not as_json and sys.stderr.isatty(), hold=bool(pagemap))
        if pagemap:
            # The source was held: it is still up to be asked for the picture,
            # and goes only after the plain query-migrate that follows it.
            png_error = _write_pagemap(client, pagemap)
            s = client.execute("query-migrate")
    finally:
        client.close()
    if as_json:
        print(json.dumps(s, indent=2))
    else:
        print_stats(s)
    if s["status"] == "unresolved":
        print("kvmlite: the destination's answer to COMMIT was lost: the VM is paused at the "
              "source and may be running at the destination. Check the destination, then: "
              f"kvmlite migrate --monitor {monitor} --resolve destination|source", file=sys.stderr)
    if pagemap and png_error:
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
    from .pagemap import write_monitor_png
    try:
        g = write_monitor_png(client.execute("query-pagemap"), path)
    except KvmliteError as e:
        return str(e)
    print(f"kvmlite: wrote {path}: {g.scale}", file=sys.stderr)
    return None


def follow(client: MonitorClient, show_progress: bool = False, hold: bool = False,
           timeout: float | None = None, interval: float = POLL_INTERVAL) -> dict:
    """Poll query-migrate until the migration ends (raising TimeoutError after
    `timeout` seconds).  `hold`: ask a finished source to stay up for more
    queries (a plain query-migrate releases it)."""
    query = {"hold": True} if hold else {}
    deadline = None if timeout is None else time.monotonic() + timeout
    progress = task = None
    if show_progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        progress = Progress(TextColumn("[bold]migrating"), BarColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), transient=True)
        progress.start()
        task = progress.add_task("", total=1.0)
    try:
        while True:
            s = client.execute("query-migrate", **query)
            if progress is not None:
                done = s["pages_transferred"] + s["pages_skipped_free"]
                progress.update(task, completed=min(done / max(s["pages_total"], 1), 1.0), description=(
                    f"round {s['rounds']}  sent {human_bytes(s['bytes_wire'])}  "
                    f"skipped {s['pages_skipped_free']} free pages  [{s['status']}]"))
            if s["status"] in FINAL:
                return s
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the migration did not finish within {timeout:g} s")
            time.sleep(interval)
    finally:
        if progress is not None:
            progress.stop()


def migrate(monitor_path: str, uri: str, **kwargs) -> dict:
    """Library entry point: migrate and return the final stats (raises on failure)."""
    client = MonitorClient(monitor_path)
    try:
        client.execute("migrate", uri=uri, **kwargs)
        s = follow(client, show_progress=False)
    finally:
        client.close()
    if s["status"] != "completed":
        raise MigrationError(s.get("error") or s["status"])
    return s
