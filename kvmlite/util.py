"""Small helpers with no better home."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside the block (a migration's downtime),
    and the collector back as it was after it, not switched on for a caller
    that had it off."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
