"""The migration side's errors: one small tree, one line each, for the CLI."""

from __future__ import annotations


class MigrationError(Exception):
    """Base of every error the live_migrate library raises."""


class ProtocolError(MigrationError):
    """A stream that breaks the wire protocol: bad magic, field out of range, bad checksum."""


class TransportError(MigrationError):
    """The connection failed: refused, closed by the peer, timed out, TLS refused."""


class GuestError(MigrationError):
    """The guest backend failed (cannot pause, writer process died, bad geometry)."""


class StateError(MigrationError):
    """An operation that the migration's current state does not allow."""


class ConvergenceError(MigrationError):
    """The guest dirties memory faster than the link carries it, within the limits."""


class TimeLimitError(MigrationError):
    """The total-time limit passed before switch-over."""


class CancelledError(MigrationError):
    """The migration was cancelled by its caller."""


class RefusedError(MigrationError):
    """The peer refused the migration (its reason is in the message)."""
