"""Block device names in a guest's configuration, remapped to `UUID=`.

A disk's name changes with its bus (/dev/sda on AHCI is /dev/vda on virtio, /dev/xvda on
Xen, /dev/nvme0n1 on Nitro), a filesystem's UUID does not: fstab, crypttab, resume= and
the kernel's root= name it by UUID after conversion. Names that already survive a new bus
(UUID=, LABEL=, PARTUUID=, /dev/mapper/..., /dev/VG/LV, /dev/disk/by-uuid/...) are kept.
The guest's n-th disk is the appliance's n-th disk, as the machine's disks are added in
order; a name with no filesystem UUID behind it is left as it is and reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..kvm import _dev_name
from .appliance import Appliance

#: a whole-disk or partition name of a bus that changes: sd, hd, vd, xvd, nvme
_DEV = re.compile(r"^/dev/(?:(?:sd|hd|vd|xvd)([a-z]{1,3})|nvme(\d{1,3})n1)(?:p?(\d{1,3}))?$")

Remap = Callable[[str], "str | None"]


def disk_position(name: str) -> tuple[int, int | None] | None:
    """('/dev/sdb2') -> (1, 2): the disk's index and the partition number (None: whole
    disk); None for a name that does not depend on the bus."""
    m = _DEV.match(name)
    if not m:
        return None
    letters, nvme, part = m.groups()
    if letters is not None:
        index = 0
        for ch in letters:
            index = index * 26 + (ord(ch) - ord("a") + 1)
        index -= 1
    else:
        index = int(nvme)
    return index, (int(part) if part is not None else None)


def appliance_name(index: int, part: int | None) -> str:
    """The appliance's name for partition `part` of the guest's disk `index` (virtio-scsi:
    sda, sdb, ... with libvirt's and Linux's letters)."""
    return "/dev/" + _dev_name("sd", index) + (str(part) if part is not None else "")


class DeviceMap:
    """Guest device name -> `UUID=...` through the appliance's view of the same disks."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.disks = app.devices()
        self._cache: dict[str, str | None] = {}

    def __call__(self, name: str) -> str | None:
        if name not in self._cache:
            self._cache[name] = self._lookup(name)
        return self._cache[name]

    def _lookup(self, name: str) -> str | None:
        pos = disk_position(name)
        if pos is None or pos[0] >= len(self.disks):
            return None
        dev = appliance_name(*pos)
        try:
            uuid = self.app.g.vfs_uuid(dev)
        except RuntimeError:
            return None
        return f"UUID={uuid}" if uuid else None


def remap_table(text: str, field_index: int, remap: Remap) -> tuple[str, list[str]]:
    """Rewrite field `field_index` (0: fstab's device, 1: crypttab's source) of every line
    of a whitespace-separated table; comments, blank lines and spacing are kept. Returns
    the new text and one line per change."""
    out, changes = [], []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        if not body.strip() or body.lstrip().startswith("#"):
            out.append(line)
            continue
        parts = re.split(r"(\s+)", body)
        # parts alternates field, separator; a leading blank makes parts[0] empty
        fields = [i for i in range(len(parts)) if parts[i] and not parts[i].isspace()]
        if len(fields) <= field_index:
            out.append(line)
            continue
        at = fields[field_index]
        new = remap(parts[at])
        if new is None or new == parts[at]:
            out.append(line)
            continue
        changes.append(f"{parts[at]} -> {new}")
        parts[at] = new
        out.append("".join(parts) + line[len(body) :])
    return "".join(out), changes


_KERNEL_ARG = re.compile(r"(?<![\w.-])(?P<head>(?:root|resume)=)(?P<dev>/dev/[^\s\"';]+)")


def _substitute(pattern: re.Pattern[str], text: str, remap: Remap) -> tuple[str, list[str]]:
    """Replace group 'dev' of every match of `pattern` by its remapping (when known),
    keeping group 'head' before it."""
    changes: list[str] = []

    def sub(m: re.Match[str]) -> str:
        new = remap(m.group("dev"))
        if new is None:
            return m.group(0)
        changes.append(f"{m.group('dev')} -> {new} ({m.group('head').strip()})")
        return f"{m.group('head')}{new}"

    return pattern.sub(sub, text), changes


def remap_kernel_args(text: str, remap: Remap) -> tuple[str, list[str]]:
    """root=/dev/... and resume=/dev/... anywhere in `text` (a GRUB default, a
    menu.lst) remapped; the rest is left byte for byte."""
    return _substitute(_KERNEL_ARG, text, remap)


def remap_assignment(text: str, key: str, remap: Remap) -> tuple[str, list[str]]:
    """KEY=/dev/... lines (initramfs-tools' RESUME=) remapped; quotes are dropped."""
    pattern = rf"^(?P<head>[ \t]*{re.escape(key)}=)([\"']?)(?P<dev>/dev/[^\s\"']+)\2[ \t]*$"
    return _substitute(re.compile(pattern, re.M), text, remap)
