"""Migration statistics, as `query-migrate` and `kvmlite migrate` report them."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class MigrationStats:
    status: str = "none"          # a MigrationStatus value (migration/status.py)
    error: str | None = None
    hint: bool = True
    live: bool = True
    rounds: int = 0
    pages_total: int = 0          # pages of guest RAM
    pages_sent: int = 0           # pages sent with their data (P records)
    pages_zero: int = 0           # active pages found all-zero, sent as Z records
    pages_skipped_free: int = 0   # pages examined and never sent: the guest's bitmap said free
    pages_resent: int = 0         # pages sent (P or Z) more than once: dirtied again during rounds
    pages_remaining: int = 0      # dirty pages still to send, as of the last sync
    bytes_wire: int = 0           # every byte written to the socket
    precopy_bytes: int = 0        # of those, the bytes written before the guest was paused
    multifd_bytes: int = 0        # of those, the bytes written on secondary channels (--channels)
    dirty_syncs: int = 0          # dirty-log syncs: one per round, the last pass's included
    setup_ms: float = 0.0
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    throughput_mib_s: float = 0.0  # MiB/s (not Mbit/s) of wire bytes over the whole migration
    dirty_rate_pps: float = 0.0   # pages/s the guest dirtied while pre-copy rounds ran
    throttle_pct: int = 0         # share of time the vCPU was made to sit out (auto-converge)
    throttled_ms: float = 0.0     # how long the vCPU was slowed: first throttle to the end of pre-copy
    dirty_log: str = ""           # "bitmap" or "ring": how dirty pages were tracked ("": none, local)
    sync_ms: list[float] = field(default_factory=list)   # each fetch of the dirty log (rings: harvest + reset)
    round_pages: list[int] = field(default_factory=list)   # pages sent (data or zero) in each round
    round_ms: list[float] = field(default_factory=list)    # how long each round took
    # where the downtime went: pause, final sync, final pages, state, destination's reply
    downtime_parts_ms: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    # Post-copy, once switched (docs/postcopy.md, "Stats"): why it switched, the
    # switch's sets, the page server's counters (pages pushed and sent on
    # request, requests, requests for free pages: 0), and at the end, under
    # "destination", the destination's own: faults served remotely, locally
    # with a zero page, avoided; remote-fault latency; switch to last page.
    postcopy: dict[str, Any] = field(default_factory=dict)
    # Brings live counters up to date before they are read (post-copy's page
    # server counts in C): set by the Migration, not part of the figures.
    refresh: Callable[[MigrationStats], None] | None = field(
        default=None, init=False, repr=False, compare=False)

    @property
    def pages_transferred(self) -> int:
        return self.pages_sent + self.pages_zero

    def update(self) -> None:
        """Bring the live counters up to date (a no-op before post-copy)."""
        if self.refresh is not None:
            self.refresh(self)

    def as_dict(self) -> dict[str, Any]:
        self.update()
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
             if f.name != "refresh"}
        d["pages_transferred"] = self.pages_transferred
        return d
