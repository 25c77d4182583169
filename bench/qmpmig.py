"""One migration driven over QMP: the same client code for QEMU and for kvmlite.

Both VMMs speak QMP (kvmlite: docs/monitor.md), so one function migrates either:
the destination started waiting (`-incoming defer` / `--incoming defer`) and
told `migrate-incoming`, both sides given their capabilities and parameters,
the source `stop`ped for a stop-copy, then `migrate`, `query-migrate` until
the status is final, and `quit` of the source left in postmigrate.  The
figures are the same `query-migrate` fields read from either VMM, and the
same end-to-end times from QMP events on one host clock: total from the
migrate command (or `stop`) to the destination's RESUME, downtime from the
source's STOP to that RESUME.

Post-copy goes the same way for both: the `postcopy-ram` capability on both
sides, then `migrate-start-postcopy` once the source has synced its dirty
bitmap a given number of times (0: right after `migrate`); kvmlite's
`x-postcopy-now` parameter, where the caller sets it, makes "at once" exact.
The destination's RESUME then comes at the switch, so a migration that went
post-copy is timed to the source's MIGRATION `completed` event (every page at
the destination) instead.
"""

from __future__ import annotations

import time

from kvmlite.control.client import QmpClient, QmpClientError

FINAL = ("completed", "failed", "cancelled", "unresolved", "postcopy-paused")


class MigrationFailed(RuntimeError):
    def __init__(self, info: dict):
        super().__init__(f"migration {info.get('status')}: {info.get('error-desc')}")
        self.info = info


def set_up(q: QmpClient, capabilities: dict, parameters: dict) -> None:
    if capabilities:
        q.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": k, "state": v} for k, v in capabilities.items()]})
    if parameters:
        q.execute("migrate-set-parameters", parameters)


def _event_time(q: QmpClient, name: str, timeout: float) -> float:
    ts = q.wait_event(name, timeout)["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def figures(info: dict) -> dict:
    """The figures both VMMs report in query-migrate, flat, under the names the
    bench's tables use; kvmlite's x- members where there are any."""
    ram = info.get("ram", {})
    out = {
        "status": info.get("status"),
        "vmm_total_ms": info.get("x-total-time-ms", info.get("total-time")),
        "vmm_downtime_ms": info.get("x-downtime-ms", info.get("downtime")),
        "vmm_setup_ms": info.get("x-setup-time-ms", info.get("setup-time")),
        "bytes_wire": ram.get("transferred"),
        "pages_sent": ram.get("normal"),
        "pages_zero": ram.get("duplicate"),
        "pages_total": ram.get("total", 0) // ram.get("page-size", 4096),
        "mbps": ram.get("mbps"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
        "multifd_bytes": ram.get("multifd-bytes"),
    }
    # post-copy: QEMU's members, where the VMM has them
    out.update(postcopy_bytes=ram.get("postcopy-bytes"), postcopy_requests=ram.get("postcopy-requests"),
               postcopy_blocktime_ms=info.get("postcopy-blocktime"))
    pc = info.get("x-postcopy")
    if pc:                        # kvmlite's post-copy figures, the destination's with them
        d = pc.get("destination") or {}
        lat = d.get("remote-latency-us") or {}
        out.update(switch=pc.get("switch"), pages_pending=pc.get("pages-pending"),
                   pages_free=pc.get("pages-free"), pages_pushed=pc.get("pages-pushed", 0),
                   pages_on_request=pc.get("pages-on-request", 0),
                   requests_for_free=pc.get("requests-for-free"), remote_faults=d.get("faults-remote"),
                   zero_faults=d.get("faults-zero-free"), p50=lat.get("p50"), p99=lat.get("p99"),
                   max=lat.get("max"), switch_to_last_page_ms=d.get("switch-to-last-page-ms"))
    if "x-rounds" in info:        # kvmlite's own
        out.update(pages_skipped_free=ram.get("x-skipped-free"), pages_resent=ram.get("x-resent"),
                   rounds=len(info["x-rounds"]), round_pages=[r["pages"] for r in info["x-rounds"]],
                   round_ms=[r["ms"] for r in info["x-rounds"]],
                   downtime_parts_ms=info.get("x-downtime-parts", {}),
                   throttle_pct=info.get("cpu-throttle-percentage", 0))
    return out


def migrate(src: QmpClient, dst: QmpClient, uri: str, *, live: bool = True,
            src_capabilities: dict | None = None, dst_capabilities: dict | None = None,
            parameters: dict | None = None, postcopy: int | None = None, timeout: float = 300.0,
            interval: float = 0.005) -> dict:
    """Migrate the VM behind `src` to the deferred destination behind `dst` at
    `uri`; returns figures() plus the end-to-end `total_ms` and `downtime_ms`
    (from the events) and the last query-migrate as `info`.  `postcopy`: send
    migrate-start-postcopy once the source's dirty-sync-count has gone this
    many past the first (0: at once; None: never; postcopy-ram is the
    caller's to set, in both capability sets).  Raises MigrationFailed if it
    did not complete; quits the source if it did."""
    # MIGRATION events time the switch and the end (both VMMs have the capability)
    set_up(src, {"events": True, **(src_capabilities or {})}, parameters or {})
    set_up(dst, dst_capabilities or {}, {})
    dst.execute("migrate-incoming", {"uri": uri})
    t_start = time.time()
    if not live:
        src.execute("stop")
    src.execute("migrate", {"uri": uri})
    deadline = time.monotonic() + timeout
    asked = postcopy is None
    while (info := src.execute("query-migrate")).get("status") not in FINAL:
        syncs = (info.get("ram") or {}).get("dirty-sync-count", 0)
        if not asked and (postcopy == 0 or syncs >= 1 + postcopy):
            src.execute("migrate-start-postcopy")
            asked = True
        if time.monotonic() > deadline:
            raise TimeoutError(f"the migration did not finish within {timeout:g} s: {info}")
        time.sleep(interval)
    if info["status"] != "completed":
        raise MigrationFailed(info)
    changes = {}
    while "completed" not in changes:
        e = src.wait_event("MIGRATION", 10)
        ts = e["timestamp"]
        changes[e["data"]["status"]] = ts["seconds"] + ts["microseconds"] / 1e6
    resumed = _event_time(dst, "RESUME", 30)
    stopped = _event_time(src, "STOP", 5)
    out = figures(info)
    out.update(total_ms=(resumed - t_start) * 1000, downtime_ms=(resumed - stopped) * 1000, info=info)
    if "postcopy-active" in changes:
        # the guest ran at the destination from the switch; the migration ended
        # when its last page was there
        out.update(total_ms=(changes["completed"] - t_start) * 1000,
                   switch_ms=(changes["postcopy-active"] - t_start) * 1000,
                   switch_to_done_ms=(changes["completed"] - changes["postcopy-active"]) * 1000)
    try:
        src.execute("quit")           # the source sits in postmigrate; the guest runs on there
    except QmpClientError:
        pass                          # it went already
    return out
