"""`kvmlite migrate`: drive a source VM's QMP monitor, show progress, print the figures.

It does what a QMP client does by hand (docs/monitor.md, "Migration"):

    migrate-set-capabilities  x-free-page-hint, auto-converge, postcopy-ram, multifd (--channels),
                              x-local (--local)
    migrate-set-parameters    downtime-limit, max-bandwidth, x-max-rounds, x-stall-timeout, x-auth-key,
                              x-postcopy-after, x-postcopy-now, multifd-channels (--channels N, N > 1)
    stop                      (--stop-copy: QEMU's way to migrate in one pass)
    migrate                   uri (--resume: with resume true, for a post-copy migration paused
                              by a broken link)
    query-migrate ...         until the status is final (or postcopy-paused)
    quit                      the source, now in postmigrate (--no-quit leaves it there)

and prints the last query-migrate: a table, or its JSON (QAPI MigrationInfo).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from .. import exitcodes
from ..bitmap import PAGE_SIZE
from ..config import MAX_CHANNELS
from ..control.client import QmpClient
from ..errors import ConfigError, KvmliteError, MigrationError
from ..units import human_bytes, parse_size

POLL_INTERVAL = 0.05
# where `kvmlite migrate` stops following: over, or waiting for an operator
FINAL = ("completed", "failed", "cancelled", "unresolved", "postcopy-paused")
DEFAULT_DOWNTIME_MS = 5
DEFAULT_MAX_ROUNDS = 30


def _ram(info: dict) -> dict:
    return info.get("ram") or {}


def pages_total(info: dict) -> int:
    ram = _ram(info)
    return ram.get("total", 0) // ram.get("page-size", PAGE_SIZE)


def stats_rows(info: dict) -> list[tuple[str, str]]:
    """The table `kvmlite migrate` prints, from a query-migrate reply."""
    ram = _ram(info)
    mbps = ram.get("mbps", 0.0)
    error = info.get("error-desc")
    return [
        ("status", info.get("status", "none") + (f" ({error})" if error else "")),
        ("mode", ("live" if info.get("x-live", True) else "stop-copy")
         + (", free page hint on" if info.get("x-free-page-hint", True) else ", hint off")),
        ("total time", f"{info.get('x-total-time-ms', info.get('total-time', 0)):.1f} ms"),
        ("setup time", f"{info.get('x-setup-time-ms', info.get('setup-time', 0)):.1f} ms"),
        ("downtime", f"{info.get('x-downtime-ms', info.get('downtime', 0)):.2f} ms"),
        ("rounds", str(len(info.get("x-rounds", ())))),
        ("pages total", str(pages_total(info))),
        ("pages skipped as free", str(ram.get("x-skipped-free", 0))),
        ("pages zero", str(ram.get("duplicate", 0))),
        ("pages sent (data)", str(ram.get("normal", 0))),
        ("pages re-sent", str(ram.get("x-resent", 0))),
        ("bytes on the wire", f"{ram.get('transferred', 0)} ({human_bytes(ram.get('transferred', 0))})"),
        ("throughput", f"{mbps:,.0f} Mbit/s ({mbps * 1e6 / 8 / (1 << 20):,.0f} MiB/s)"),
        ("dirty rate", f"{ram.get('dirty-pages-rate', 0)} pages/s"),
        ("vCPU throttled", f"{info.get('cpu-throttle-percentage', 0)} %"),
    ] + postcopy_rows(info)


def postcopy_rows(info: dict) -> list[tuple[str, str]]:
    """The post-copy part of the table: the source's page server (x-postcopy and
    QEMU's postcopy-* fields), then the destination's faults."""
    pc = info.get("x-postcopy") or {}
    if not pc:
        return []
    ram = _ram(info)
    rows = [("post-copy switch", str(pc.get("switch"))),
            ("pages still to come at the switch", str(pc.get("pages-pending", 0))),
            ("pages free at the switch (never sent)", str(pc.get("pages-free", 0))),
            ("pages pushed / sent on request",
             f"{pc.get('pages-pushed', 0)} / {pc.get('pages-on-request', 0)}"),
            ("bytes after the switch", f"{ram.get('postcopy-bytes', 0)} "
             f"({human_bytes(ram.get('postcopy-bytes', 0))})"),
            ("requests from the destination", str(ram.get("postcopy-requests", 0))),
            ("requests for free pages", str(pc.get("requests-for-free", 0)))]
    if pc.get("recoveries"):
        rows.append(("recoveries", str(pc["recoveries"])))
    d = pc.get("destination") or {}
    if d:
        lat = d.get("remote-latency-us") or {}
        rows += [("faults served remotely", str(d.get("faults-remote", 0))),
                 ("faults served here with a zero page (free)", str(d.get("faults-zero-free", 0))),
                 ("faults avoided (page arrived first)", str(d.get("faults-already-arrived", 0))),
                 ("remote fault latency p50 / p99 / max",
                  f"{lat.get('p50', '-')} / {lat.get('p99', '-')} / {lat.get('max', '-')} µs"),
                 ("switch to last page", f"{d.get('switch-to-last-page-ms')} ms")]
    if "postcopy-blocktime" in info:
        rows.append(("vCPU blocked on remote pages", f"{info['postcopy-blocktime']} ms"))
    return rows


def print_stats(info: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="kvmlite migration", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for k, v in stats_rows(info):
        table.add_row(k, v)
    Console(file=file or sys.stdout).print(table)


# ---- the steps, for any QMP client (tests, soak, the benchmarks use them too) ----------------

def configure(client: QmpClient, *, hint: bool = True, auto_converge: bool = True,
              downtime_ms: int = DEFAULT_DOWNTIME_MS, bandwidth: int = 0,
              max_rounds: int = DEFAULT_MAX_ROUNDS, timeout: float | None = None,
              auth_key: str | None = None, postcopy: bool = False, postcopy_after: int = 0,
              postcopy_now: bool = False, channels: int = 1, local: bool = False) -> None:
    """Set the source's migration capabilities and parameters (every one, so
    that what an earlier client set does not linger).  `postcopy`: the
    postcopy-ram capability; `postcopy_after` rounds or `postcopy_now` say
    when it switches (docs/monitor.md, "Post-copy").  `channels` > 1: QEMU's
    multifd with that many multifd-channels; `local`: kvmlite's x-local (the
    RAM's memfd handed over, no page copied)."""
    client.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-free-page-hint", "state": hint},
        {"capability": "auto-converge", "state": auto_converge},
        {"capability": "postcopy-ram", "state": postcopy},
        {"capability": "multifd", "state": channels > 1},
        {"capability": "x-local", "state": local}]})
    params: dict[str, Any] = {
        "downtime-limit": downtime_ms, "max-bandwidth": bandwidth, "x-max-rounds": max_rounds,
        "x-stall-timeout": round(timeout * 1000) if timeout else 0,
        # the source VMM reads the file: give it a path it can open
        "x-auth-key": os.path.abspath(auth_key) if auth_key else "",
        "x-postcopy-after": postcopy_after, "x-postcopy-now": postcopy_now}
    if channels > 1:        # (with multifd off, multifd-channels says nothing)
        params["multifd-channels"] = channels
    client.execute("migrate-set-parameters", params)


def start(client: QmpClient, uri: str, *, stop_copy: bool = False, keep_running: bool = False) -> bool:
    """`migrate` (after `stop` for a stop-copy); returns whether it stopped the VM."""
    stopped = False
    if stop_copy and client.execute("query-status")["status"] == "running":
        client.execute("stop")
        stopped = True
    args: dict[str, Any] = {"uri": uri}
    if keep_running:
        args["x-keep-running"] = True
    try:
        client.execute("migrate", args)
    except KvmliteError:
        if stopped:
            client.execute("cont")
        raise
    return stopped


def resume_migration(client: QmpClient, uri: str) -> None:
    """Reconnect a post-copy migration in postcopy-paused to `uri` (QEMU's
    `migrate` with `resume: true`); follow() then sees it finish, or pause again."""
    client.execute("migrate", {"uri": uri, "resume": True})


def follow(client: QmpClient, show_progress: bool = False, timeout: float | None = None,
           interval: float = POLL_INTERVAL) -> dict:
    """Poll query-migrate until the migration ends (TimeoutError after `timeout` s);
    returns the last reply."""
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
            info = client.execute("query-migrate")
            if progress is not None:
                ram = _ram(info)
                done = ram.get("normal", 0) + ram.get("duplicate", 0) + ram.get("x-skipped-free", 0)
                progress.update(task, completed=min(done / max(pages_total(info), 1), 1.0), description=(
                    f"round {ram.get('dirty-sync-count', 0)}  sent {human_bytes(ram.get('transferred', 0))}"
                    f"  skipped {ram.get('x-skipped-free', 0)} free pages  [{info.get('status')}]"))
            if info.get("status") in FINAL:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the migration did not finish within {timeout:g} s")
            time.sleep(interval)
    finally:
        if progress is not None:
            progress.stop()


def finish(client: QmpClient, info: dict, *, stopped: bool = False, quit: bool = True) -> None:
    """After the migration: `quit` a source left in postmigrate; `cont` a VM this
    client stopped for a stop-copy that did not complete (it runs on here)."""
    status = client.execute("query-status")["status"]
    if status == "postmigrate" and quit:
        client.execute("quit")
    elif stopped and info.get("status") in ("failed", "cancelled") and status == "paused":
        client.execute("cont")


def run_migration(client: QmpClient, uri: str, *, stop_copy: bool = False, keep_running: bool = False,
                  quit: bool = True, timeout: float | None = None, interval: float = POLL_INTERVAL,
                  **settings: Any) -> dict:
    """configure, start, follow, finish: one migration through `client`, whatever
    its outcome; returns the last query-migrate."""
    configure(client, **settings)
    stopped = start(client, uri, stop_copy=stop_copy, keep_running=keep_running)
    info = follow(client, timeout=timeout, interval=interval)
    finish(client, info, stopped=stopped, quit=quit)
    return info


def migrate(monitor: str, uri: str, **kwargs: Any) -> dict:
    """Library entry point: migrate the VM whose monitor is at `monitor` (a
    socket path, unix:PATH or tcp:HOST:PORT); returns the final query-migrate,
    or raises MigrationError.  Keywords as run_migration and configure."""
    with QmpClient(monitor) as client:
        info = run_migration(client, uri, **kwargs)
    if info["status"] != "completed":
        raise MigrationError(info.get("error-desc") or info["status"])
    return info


# ---- the command ---------------------------------------------------------------------------------

def migrate_command(*, monitor: str, uri: str | None = None, hint: bool = True,
                    stop_copy: bool = False, downtime_ms: int = DEFAULT_DOWNTIME_MS,
                    bandwidth: str = "0", max_rounds: int = DEFAULT_MAX_ROUNDS, as_json: bool = False,
                    timeout: float | None = None, auth_key: str | None = None,
                    keep_running: bool = False, pagemap: str | None = None,
                    resolve: str | None = None, quit: bool = True, postcopy: bool = False,
                    postcopy_after: int = 0, postcopy_now: bool = False,
                    resume: bool = False, channels: int = 1, local: bool = False) -> int:
    """`kvmlite migrate`: start a migration on a VM's monitor, follow it, print its
    figures, quit the source it left in postmigrate.  With `resolve` ("source"
    or "destination"), settle an unresolved one instead; with `resume`,
    reconnect a post-copy migration in postcopy-paused to `uri` and follow it
    to its end.  Returns the exit status."""
    rate = parse_size(bandwidth, "--bandwidth")
    if type(channels) is not int or not 1 <= channels <= MAX_CHANNELS:
        raise ConfigError(f"--channels {channels}: 1 to {MAX_CHANNELS} connections")
    with QmpClient(monitor) as client:
        if resolve is not None:
            client.execute("x-migrate-resolve", {"owner": resolve})
            info = client.execute("query-migrate")
            print(f"kvmlite: migration resolved: {info['status']}", file=sys.stderr)
            finish(client, info, quit=quit)
            return exitcodes.OK
        if uri is None:
            raise KvmliteError("give the destination (tcp:HOST:PORT, unix:PATH or file:PATH), "
                               "or --resolve")
        if pagemap:
            _check_writable(pagemap)
        stopped = False
        if resume:
            # the migration's own settings stand: only where it goes is new
            resume_migration(client, uri)
        else:
            configure(client, hint=hint, downtime_ms=downtime_ms, bandwidth=rate,
                      max_rounds=max_rounds, timeout=timeout, auth_key=auth_key,
                      postcopy=postcopy, postcopy_after=postcopy_after, postcopy_now=postcopy_now,
                      channels=channels, local=local)
            stopped = start(client, uri, stop_copy=stop_copy, keep_running=keep_running)
        info = follow(client, show_progress=not as_json and sys.stderr.isatty())
        # the source is in postmigrate: still there to be asked for the picture
        png_error = _write_pagemap(client, pagemap) if pagemap else None
        finish(client, info, stopped=stopped, quit=quit)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print_stats(info)
    if info["status"] == "unresolved":
        print("kvmlite: the destination's answer to COMMIT was lost: the VM is paused at the "
              "source and may be running at the destination. Check the destination, then: "
              f"kvmlite migrate --monitor {monitor} --resolve destination|source", file=sys.stderr)
        return exitcodes.PROTOCOL
    if info["status"] == "postcopy-paused":
        print("kvmlite: the post-copy link broke: the VM runs at the destination and its "
              "remaining pages wait here; nothing is lost while both VMMs live. Reconnect: "
              f"kvmlite migrate --monitor {monitor} {uri} --resume", file=sys.stderr)
        return exitcodes.PROTOCOL
    if png_error:
        print(f"kvmlite: error: {png_error}", file=sys.stderr)
        return exitcodes.CANTCREAT
    return exitcodes.OK if info["status"] == "completed" else exitcodes.TEMPFAIL


def _check_writable(path: str) -> None:
    """A PNG that cannot be written should stop `migrate` before it starts, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise KvmliteError(f"--pagemap {path}: cannot write into {folder}")


def _write_pagemap(client: QmpClient, path: str) -> str | None:
    """Fetch x-query-pagemap and write its sent-rounds PNG; an error message, or None."""
    from .pagemap import write_monitor_png
    try:
        g = write_monitor_png(client.execute("x-query-pagemap", timeout=60), path)
    except KvmliteError as e:
        return str(e)
    print(f"kvmlite: wrote {path}: {g.scale}", file=sys.stderr)
    return None
