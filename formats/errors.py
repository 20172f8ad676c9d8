"""The one error tree of the formats library: callers catch FormatError."""


class FormatError(ValueError):
    """An image (or appliance, or partition table) cannot be used as asked."""


class CorruptImage(FormatError):
    """The file contradicts its own format: bad magic, checksum, offset or count."""


class UnsupportedFeature(FormatError):
    """The file is valid but uses something this library does not implement."""


class UnsafeImage(FormatError):
    """The file asks for something we refuse: a backing-file escape, a cycle, a traversal."""
