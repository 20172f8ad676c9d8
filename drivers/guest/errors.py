"""The one error drivers/guest raises: the step that failed and why, on one line."""

from __future__ import annotations

from ..errors import DriverError


class GuestError(DriverError):
    """A guest that cannot be inspected or converted; the message names the step."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
