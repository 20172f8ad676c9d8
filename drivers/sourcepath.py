"""Disk paths named by a definition someone else wrote: resolved against the definition's
directory, and refused when they lead out of it.

A .vmx or .ovf names its disks relative to itself; a path with `..`, an absolute path or
a symbolic link pointing elsewhere would make a conversion read files the user never
meant to hand over. libvirt names disks by absolute path as a rule, so its reader allows
absolute paths (the user points us at a domain they own) but still refuses `..`.
"""

from __future__ import annotations

import os

from .errors import DriverError


def resolve(path: str, base_dir: str, *, allow_absolute: bool = False, where: str = "") -> str:
    prefix = f"{where}: " if where else ""
    if not path or "\0" in path:
        raise DriverError(f"{prefix}disk path {path!r} is not a file name")
    if os.path.isabs(path):
        if not allow_absolute:
            raise DriverError(
                f"{prefix}disk path {path} is absolute; it escapes the source directory"
            )
        if ".." in path.split("/"):
            raise DriverError(f"{prefix}disk path {path} contains '..'")
        return os.path.normpath(path)
    if ".." in path.replace("\\", "/").split("/"):
        raise DriverError(f"{prefix}disk path {path} escapes the source directory")
    full = os.path.normpath(os.path.join(os.path.abspath(base_dir), path))
    if os.path.lexists(full):
        real = os.path.realpath(full)
        root = os.path.realpath(base_dir)
        if os.path.commonpath([real, root]) != root:
            raise DriverError(f"{prefix}disk path {path} leads outside the source directory (link)")
    return full
