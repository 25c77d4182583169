"""Test-only fault injection, so tests can kill or stop a VMM at a named point.

    KVMLITE_TEST_FAULTS="dst:round:1=kill"  python -m kvmlite run --incoming ...

The variable holds comma-separated `point=action` pairs; actions are `kill`
(SIGKILL this process: it dies as a crashed or killed host would, with no
chance to clean up), `stop` (SIGSTOP: a hung peer) and `sleep:SECONDS`.
The points are listed in docs/reliability.md.  Without the variable,
:func:`point` is a function that does nothing, so production code pays one
call per place it is named, and those are not on per-page paths.

KVMLITE_TEST_BROKEN_ORDER=1 is the other test-only switch: it makes the
migration source read the guest's free bits *before* clearing the dirty log,
the race claim 2 of the patent exists to prevent (see source.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "KVMLITE_TEST_FAULTS"
BROKEN_ORDER_ENV = "KVMLITE_TEST_BROKEN_ORDER"


def parse(spec: str) -> dict[str, str]:
    """`"a=kill,b=sleep:0.5"` -> {"a": "kill", "b": "sleep:0.5"}; raises ValueError."""
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, action = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{ENV}: {item!r} is not point=action")
        if action not in ("kill", "stop") and not (
                action.startswith("sleep:") and _is_number(action[6:])):
            raise ValueError(f"{ENV}: {action!r} is not kill, stop or sleep:SECONDS")
        faults[name] = action
    return faults


def _is_number(s: str) -> bool:
    try:
        return float(s) >= 0
    except ValueError:
        return False


def _act(name: str, action: str) -> None:
    print(f"kvmlite: test fault at {name}: {action}", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        time.sleep(float(action[6:]))


def _make_point(spec: str | None):
    if not spec:
        return lambda name: None
    faults = parse(spec)

    def point(name: str) -> None:
        action = faults.get(name)
        if action is not None:
            _act(name, action)
    return point


point = _make_point(os.environ.get(ENV))
active = bool(os.environ.get(ENV))
broken_order = os.environ.get(BROKEN_ORDER_ENV) == "1"
