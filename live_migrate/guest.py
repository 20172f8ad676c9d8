"""The Guest protocol: what the pre-copy engine needs from a guest on each side.

The engine never knows what runs the guest. A backend (`live_migrate/guests/<name>.py`)
gives it, on the **source**, a `SourceGuest`: the guest's RAM as one read-only buffer of
`page_count * page_size` bytes, a way to learn which pages changed, pause/resume, an
optional throttle, and the device state as bytes once paused. On the **destination** it
gives a `TargetGuest`: a writable RAM buffer of the same geometry that the receiver fills
page by page, a place to load the device state, and resume/discard.

Two ways to learn dirty pages (`DirtyTracking`):

- ``LOG``: the guest or its hypervisor marks every page it writes. `collect_dirty_log()`
  returns the pages written since the previous call and must lose no write: a write that
  races with the call shows up either in this answer or in the next one.
- ``SCAN``: no log exists (a QEMU guest whose RAM is an mmap'd file). The engine keeps a
  copy of what it last sent and compares RAM with it, page by page, with numpy. The guest
  only has to expose its RAM; `collect_dirty_log()` is never called.

A real QEMU guest fits as follows (issue 7): `memory()` is a memoryview over the mmap of
its `memory-backend-file,share=on`; `dirty_tracking` is SCAN; `pause()`/`resume()` are
QMP `stop`/`cont`; `save_device_state()` runs QEMU's own migration with capability
`x-ignore-shared` into a pipe and returns those bytes (they travel inside our stream);
on the destination `memory()` is the mmap of the file the destination QEMU will use,
`load_device_state()` starts `qemu -incoming` on those bytes, `resume()` is `cont`.
A backend that hands device state over by another path returns ``b""`` and does that work
in `save_device_state()` / `load_device_state()`.

Buffers, not copies: the engine wraps `memory()` in numpy views (`numpy.frombuffer`) and
reads or writes whole batches of pages; it never asks a backend for one page at a time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

#: the page size every backend here uses (x86 base pages); the wire carries it anyway
PAGE_SIZE = 4096


class DirtyTracking(enum.Enum):
    """How the source learns which pages changed since they were last sent."""

    LOG = "log"
    SCAN = "scan"


class StateFormat(enum.Enum):
    """What the device-state bytes are: the source says it at the handshake, so a
    destination that could not load them refuses before any page is sent (not after the
    source has paused)."""

    SIM = "sim"  # the synthetic guest's, opaque
    QEMU = "qemu"  # QEMU's migration stream (x-ignore-shared)


@dataclass(frozen=True)
class Geometry:
    """The shape of a guest's RAM, as the handshake carries it to the destination."""

    page_size: int
    page_count: int

    @property
    def memory_size(self) -> int:
        return self.page_size * self.page_count


@runtime_checkable
class SourceGuest(Protocol):
    """The running guest on the migration's source.

    Call order the engine follows: `memory()` and (LOG) `start_dirty_log()` once in setup;
    rounds of `collect_dirty_log()` (LOG) while the guest runs, with `set_throttle()` when
    auto-converge acts; then `pause()`, a last `collect_dirty_log()`, `save_device_state()`;
    then either `finish()` (the destination confirmed it holds everything and resumed) or
    `resume()` (any failure: the guest keeps running here). `close()` is the caller's.
    """

    @property
    def geometry(self) -> Geometry:
        """Page size and count; fixed for the guest's life."""
        ...

    @property
    def dirty_tracking(self) -> DirtyTracking:
        """LOG when `collect_dirty_log()` works, else SCAN."""
        ...

    @property
    def is_paused(self) -> bool: ...

    @property
    def state_format(self) -> StateFormat:
        """What `save_device_state()` returns."""
        ...

    def memory(self) -> memoryview:
        """The whole RAM, read-only, C-contiguous, `geometry.memory_size` bytes long.

        The guest keeps writing into it while it runs; the engine copes with torn pages
        (a page written while it is read is dirty again and sent again).
        """
        ...

    def start_dirty_log(self) -> None:
        """Begin logging writes (LOG only). Pages written before this call are not
        reported: the engine's first round sends every page anyway."""
        ...

    def collect_dirty_log(self) -> np.ndarray:
        """Pages written since the previous call (or `start_dirty_log()`), as a bool
        array of `page_count` entries (LOG only). Loses no write: a racing write appears
        in this answer or the next. Works while paused (the final collection)."""
        ...

    def stop_dirty_log(self) -> None:
        """Stop logging (LOG only); called after a failure or after the final round."""
        ...

    def pause(self) -> None:
        """Stop the guest's vCPUs. On return no write is in progress and none follows
        until `resume()`."""
        ...

    def resume(self) -> None:
        """Let the guest run again on this host (after a failed or cancelled migration)."""
        ...

    def set_throttle(self, fraction: float) -> None:
        """Slow the guest to `1 - fraction` of its speed (0 = full speed, at most 0.99),
        as QEMU's cpu-throttle does for auto-converge. A backend that cannot throttle
        reports `can_throttle` False and ignores the call."""
        ...

    @property
    def can_throttle(self) -> bool: ...

    def save_device_state(self) -> bytes:
        """The device state (CPU registers, devices) of the paused guest, as bytes the
        destination's `load_device_state()` accepts; ``b""`` when handed over otherwise."""
        ...

    def finish(self) -> None:
        """The destination holds everything and runs the guest: stop here for good."""
        ...


@runtime_checkable
class TargetGuest(Protocol):
    """The guest being built on the migration's destination.

    The receiver writes pages into `memory()` as they arrive (in place, like QEMU's
    incoming side); nothing runs until `resume()`, so a failed migration only has to
    `discard()` the target: no half-written guest ever starts.
    """

    @property
    def geometry(self) -> Geometry: ...

    def memory(self) -> memoryview:
        """The whole target RAM, writable, C-contiguous, `geometry.memory_size` bytes,
        zero-filled at creation (pages never sent are zero pages)."""
        ...

    @property
    def state_format(self) -> StateFormat:
        """The device state `load_device_state()` can load."""
        ...

    def load_device_state(self, state: bytes) -> None:
        """Install the device state the source sent (before the acknowledgement)."""
        ...

    def resume(self) -> None:
        """Start the guest here: called only after the source committed."""
        ...

    def discard(self) -> None:
        """Throw the target away (a failed or cancelled migration); idempotent."""
        ...


#: how a receiver makes its target once the handshake told it the source's geometry
TargetFactory = Callable[[Geometry], TargetGuest]
