"""A guest in the test's own process whose memory changes only when the migration asks
for its dirty pages: what each round finds dirty is fixed by the test, not by how fast
the machine runs (a rate-driven sim guest dirties more or less per round under load)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from live_migrate.engine import Migration
from live_migrate.guest import DirtyTracking, Geometry, StateFormat


class SteppedGuest:
    """`step(guest)` runs before each collection of dirty pages while the guest runs;
    it writes `guest.mem` (pages x 512 uint64) and marks what it wrote with `dirty()`."""

    state_format = StateFormat.SIM
    can_throttle = False

    def __init__(self, mem: np.ndarray, dirty: str, step: Callable[[SteppedGuest], None]) -> None:
        self.mem = mem
        self.tracking = DirtyTracking(dirty)
        self.log = np.zeros(len(mem), dtype=bool)
        self.paused = False
        self.rounds = 0
        self._step = step

    geometry = property(lambda self: Geometry(4096, len(self.mem)))
    dirty_tracking = property(lambda self: self.tracking)
    is_paused = property(lambda self: self.paused)

    def memory(self) -> memoryview:
        return memoryview(self.mem).cast("B")

    def start_dirty_log(self) -> None:
        self.log[:] = False

    def collect_dirty_log(self) -> np.ndarray:
        out, self.log = self.log, np.zeros_like(self.log)
        return out

    def stop_dirty_log(self) -> None:
        pass

    def step(self) -> None:
        self.rounds += 1
        self._step(self)

    def dirty(self, pages: np.ndarray) -> None:
        self.log[pages] = True

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def set_throttle(self, fraction: float) -> None:
        pass

    def save_device_state(self) -> bytes:
        return b"stepped"

    def finish(self) -> None:
        pass


class SteppedMigration(Migration):
    """A migration that lets its SteppedGuest write just before each collection."""

    guest: SteppedGuest

    def _collect(self) -> np.ndarray:
        if not self.guest.paused:
            self.guest.step()
        return super()._collect()
