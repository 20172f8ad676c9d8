"""The drivers library's one error: a machine description or definition we cannot use."""


class DriverError(ValueError):
    """A machine description is invalid, or a VM definition cannot be read or written.

    A ValueError like formats.FormatError, so the CLI prints it as one line."""
