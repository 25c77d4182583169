"""The VMM's own messages: one logger, one format, on stderr.

The guest's serial output goes to stdout (devices/output.py) and never
through here.  Every message reads "kvmlite: ..." so a user can tell the VMM
from the guest; warnings and errors say so.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("kvmlite")
trace_log = logging.getLogger("kvmlite.trace")   # every VM exit, with --trace (MachineConfig.trace)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"kvmlite: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"kvmlite: warning: {msg}"
        return f"kvmlite: {msg}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when the message is logged (pytest swaps it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup(verbosity: int = 0) -> None:
    """-1: warnings and errors only (--quiet); 0: the usual; 1 or more: debug too (-v)."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    log.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        h = _Stderr()
        h.setFormatter(_Format())
        log.addHandler(h)
    log.propagate = False


# Library use without setup(): messages still reach stderr in the same format.
setup(0)
