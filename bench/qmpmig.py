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
"""

from __future__ import annotations

import time

from kvmlite.control.client import QmpClient, QmpClientError

FINAL = ("completed", "failed", "cancelled", "unresolved")


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
    if "x-rounds" in info:        # kvmlite's own
        out.update(pages_skipped_free=ram.get("x-skipped-free"), pages_resent=ram.get("x-resent"),
                   rounds=len(info["x-rounds"]), round_pages=[r["pages"] for r in info["x-rounds"]],
                   round_ms=[r["ms"] for r in info["x-rounds"]],
                   downtime_parts_ms=info.get("x-downtime-parts", {}),
                   throttle_pct=info.get("cpu-throttle-percentage", 0))
    return out


def migrate(src: QmpClient, dst: QmpClient, uri: str, *, live: bool = True,
            src_capabilities: dict | None = None, dst_capabilities: dict | None = None,
            parameters: dict | None = None, timeout: float = 300.0, interval: float = 0.005) -> dict:
    """Migrate the VM behind `src` to the deferred destination behind `dst` at
    `uri`; returns figures() plus the end-to-end `total_ms` and `downtime_ms`
    (from the events) and the last query-migrate as `info`.  Raises
    MigrationFailed if it did not complete; quits the source if it did."""
    set_up(src, src_capabilities or {}, parameters or {})
    set_up(dst, dst_capabilities or {}, {})
    dst.execute("migrate-incoming", {"uri": uri})
    t_start = time.time()
    if not live:
        src.execute("stop")
    src.execute("migrate", {"uri": uri})
    deadline = time.monotonic() + timeout
    while (info := src.execute("query-migrate")).get("status") not in FINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the migration did not finish within {timeout:g} s: {info}")
        time.sleep(interval)
    if info["status"] != "completed":
        raise MigrationFailed(info)
    resumed = _event_time(dst, "RESUME", 30)
    stopped = _event_time(src, "STOP", 5)
    out = figures(info)
    out.update(total_ms=(resumed - t_start) * 1000, downtime_ms=(resumed - stopped) * 1000, info=info)
    try:
        src.execute("quit")           # the source sits in postmigrate; the guest runs on there
    except QmpClientError:
        pass                          # it went already
    return out
