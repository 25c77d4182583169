"""The migration state machines, one per side, with every transition checked.

As QEMU's `migrate_set_state`: a state changes only through `advance()`, which
refuses a transition the table does not list, so the code cannot drift into a
state nobody designed (such as resuming a VM it has handed over).  The
monitor, the stats and the events all read these enums.  docs/architecture.md
draws both machines; docs/wire-format.md says which message moves which.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Generic, TypeVar


class MigrationStatus(str, enum.Enum):
    """The source's states.  Names as QEMU's MigrationStatus where QEMU has the state."""
    NONE = "none"
    SETUP = "setup"                 # connecting, handshake, dirty logging on, header sent
    ACTIVE = "active"               # pre-copy rounds, the guest running here
    DEVICE = "device"               # paused here: last pass, state, END; waiting for READY
    HANDOVER = "handover"           # READY came, COMMIT going out: never resume on our own
    COMPLETED = "completed"         # the destination acknowledged COMMIT: the VM is there
    FAILED = "failed"               # failed before COMMIT: the guest resumed here
    CANCELLING = "cancelling"       # cancel asked; stops at the next check
    CANCELLED = "cancelled"         # cancelled before COMMIT: the guest resumed here
    UNRESOLVED = "unresolved"       # COMMIT sent, no answer: paused here until an operator decides
    # Post-copy (docs/postcopy.md): after COMMIT the guest runs at the destination
    # and this side serves the pages still to come.  It never resumes the guest.
    POSTCOPY_ACTIVE = "postcopy-active"     # serving pages: requests first, then the push
    POSTCOPY_PAUSED = "postcopy-paused"     # the link broke: both halves wait for a resume
    POSTCOPY_RECOVER = "postcopy-recover"   # reconnecting (migrate with resume: true)

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        """Over for good (UNRESOLVED is not: it waits for an operator)."""
        return self in _FINISHED

    @property
    def in_progress(self) -> bool:
        return self not in _FINISHED and self is not MigrationStatus.NONE

    @property
    def guest_here(self) -> bool:
        """Whether this side may run the guest in this state (on its own)."""
        return self in (MigrationStatus.NONE, MigrationStatus.SETUP, MigrationStatus.ACTIVE,
                        MigrationStatus.FAILED, MigrationStatus.CANCELLED,
                        MigrationStatus.CANCELLING)


S = MigrationStatus
_FINISHED = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
POSTCOPY_STATES = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER})

SOURCE_TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP}),
    S.SETUP: frozenset({S.ACTIVE, S.DEVICE, S.FAILED, S.CANCELLING}),
    S.ACTIVE: frozenset({S.DEVICE, S.FAILED, S.CANCELLING}),
    S.DEVICE: frozenset({S.HANDOVER, S.COMPLETED, S.FAILED, S.CANCELLING}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    # Once COMMIT may have reached the destination, only its answer (ACK:
    # completed, or post-copy begins; ABORT, its promise never to run the
    # guest: failed) or an operator (resolve) can end the migration.
    # Nothing else resumes here.
    S.HANDOVER: frozenset({S.COMPLETED, S.FAILED, S.UNRESOLVED, S.POSTCOPY_ACTIVE}),
    # A post-copy migration whose answer to COMMIT was lost may find the
    # destination in post-copy: a resume tries, and falls back here if it cannot.
    S.UNRESOLVED: frozenset({S.COMPLETED, S.FAILED, S.POSTCOPY_RECOVER}),
    # Post-copy: the guest has run at the destination; this side never resumes it.
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.POSTCOPY_PAUSED}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.UNRESOLVED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class ReceiveState(str, enum.Enum):
    """The destination's states."""
    WAITING = "waiting"             # listening; refused peers do not end it
    RECEIVING = "receiving"         # pages, STATE, END; then vCPUs and devices restored, parked
    READY = "ready"                 # READY sent, waiting for COMMIT; the guest does not run
    RUNNING = "running"             # COMMIT received: the guest runs here (every page is here)
    FAILED = "failed"               # the guest never ran here
    # Post-copy: COMMIT received, the guest runs here, pages still arrive.
    POSTCOPY_ACTIVE = "postcopy-active"     # faults served, pages arriving
    POSTCOPY_PAUSED = "postcopy-paused"     # the link broke: listening for the source's resume
    POSTCOPY_RECOVER = "postcopy-recover"   # a source reconnected and named this migration

    def __str__(self) -> str:
        return self.value


R = ReceiveState
RECEIVE_TRANSITIONS: dict[ReceiveState, frozenset[ReceiveState]] = {
    R.WAITING: frozenset({R.RECEIVING, R.FAILED}),
    R.RECEIVING: frozenset({R.READY, R.RUNNING, R.FAILED}),
    R.READY: frozenset({R.RUNNING, R.FAILED, R.POSTCOPY_ACTIVE}),
    R.POSTCOPY_ACTIVE: frozenset({R.RUNNING, R.POSTCOPY_PAUSED}),
    R.POSTCOPY_PAUSED: frozenset({R.POSTCOPY_RECOVER}),
    R.POSTCOPY_RECOVER: frozenset({R.POSTCOPY_ACTIVE, R.POSTCOPY_PAUSED}),
    R.RUNNING: frozenset(),
    R.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug: the code tried a state change the table does not allow."""


_S = TypeVar("_S", bound=enum.Enum)


class StateMachine(Generic[_S]):
    """A state, the table of allowed transitions, and listeners told of each change.

    `advance(new)` is the only way to change the state; `advance(new, only_from=...)`
    changes it only if the current state is one of those (atomically), and says
    whether it did: how two threads racing to act (cancel against commit)
    learn which one won.
    """

    def __init__(self, initial: _S, table: Mapping[_S, frozenset[_S]]) -> None:
        self._state = initial
        self._table = table
        self._lock = threading.Lock()
        # called with (old, new) after each change, outside the lock
        self.listeners: list[Callable[[_S, _S], None]] = []

    @property
    def state(self) -> _S:
        return self._state

    def advance(self, new: _S, *, only_from: Collection[_S] | None = None) -> bool:
        with self._lock:
            old = self._state
            if only_from is not None and old not in only_from:
                return False
            if new not in self._table[old]:
                raise IllegalTransition(f"migration state {old.value} -> {new.value} is not allowed")
            self._state = new
        for listener in list(self.listeners):
            listener(old, new)
        return True
