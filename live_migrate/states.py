"""A migration's states and the one table of legal transitions between them.

    SETUP -> ITERATING -> STOPPING -> COMPLETED
      \\          \\           \\
       +----------+-----------+--> FAILED | CANCELLED

SETUP: handshake, buffers, dirty log started. ITERATING: pre-copy rounds while the guest
runs. STOPPING: the guest is paused, the rest and the device state are sent, the
destination acknowledges and resumes. The three last states are final.
"""

from __future__ import annotations

import enum
import threading
import time

from live_migrate.errors import StateError


class MigrationState(enum.Enum):
    SETUP = "setup"
    ITERATING = "iterating"
    STOPPING = "stopping"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL


FINAL = frozenset({MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLED})

TRANSITIONS: dict[MigrationState, frozenset[MigrationState]] = {
    MigrationState.SETUP: frozenset(
        {MigrationState.ITERATING, MigrationState.FAILED, MigrationState.CANCELLED}
    ),
    MigrationState.ITERATING: frozenset(
        {MigrationState.STOPPING, MigrationState.FAILED, MigrationState.CANCELLED}
    ),
    MigrationState.STOPPING: frozenset(
        {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLED}
    ),
    MigrationState.COMPLETED: frozenset(),
    MigrationState.FAILED: frozenset(),
    MigrationState.CANCELLED: frozenset(),
}


class StateMachine:
    """The current state, its history (with times since creation), and the guard."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.state = MigrationState.SETUP
        self.history: list[tuple[MigrationState, float]] = [(self.state, 0.0)]

    def enter(self, new: MigrationState) -> None:
        with self._lock:
            if new not in TRANSITIONS[self.state]:
                raise StateError(f"migration: no transition from {self.state.value} to {new.value}")
            self.state = new
            self.history.append((new, time.monotonic() - self._t0))

    def require(self, *allowed: MigrationState) -> None:
        if self.state not in allowed:
            names = ", ".join(s.value for s in allowed)
            raise StateError(f"migration is {self.state.value}, this needs {names}")

    @property
    def sequence(self) -> list[MigrationState]:
        return [s for s, _ in self.history]
