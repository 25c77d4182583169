"""Test hooks: named points in the migration paths where a test may act.

Shipped code passes `NO_HOOKS`, whose `point` does nothing; a test passes an
object whose `point` kills, stops or stalls the process at the point it names
(tests/harness.py).  The points are listed in docs/reliability.md.  They sit
between records and rounds, never on a per-page path, so a no-op costs one
call per place.
"""

from __future__ import annotations


class Hooks:
    """Does nothing at every point.  Subclass it to act."""

    def point(self, name: str) -> None:
        """The migration reached the place called `name` (e.g. "dst:round:2")."""


NO_HOOKS = Hooks()
