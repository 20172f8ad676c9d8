"""The agent's inventory becomes the machine description: `machine.json`, and the
`drivers.MachineSpec` a target driver turns into a VM definition.

The description keeps what a VM needs to boot like the server did: CPU count, memory,
firmware (UEFI when /sys/firmware/efi exists), disks with their partition tables, NICs
with their MACs (network identity survives the move, INTEROP.md), the OS and kernel.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from formats.errors import FormatError
from formats.fileio import write_file_atomic
from formats.image import Image

log = logging.getLogger(__name__)

MACHINE_FILE = "machine.json"


@dataclass
class ClonedDisk:
    """A disk as the description records it: where it came from, where it went."""

    source: str
    size: int
    image: str | None = None  # file name inside OUTDIR
    format: str | None = None
    layout: dict[str, Any] | None = None


def partition_layout(disk: Image) -> dict[str, Any] | None:
    """The partition table read locally through the remote disk (formats does the
    parsing; the agent has no parsing intelligence)."""
    try:
        from formats import partitions
    except ImportError:
        return None
    try:
        table = partitions.read_table(disk)
    except FormatError as exc:
        log.warning("%s: partition table unreadable: %s", disk.path, exc)
        return {"table": "unreadable", "error": str(exc)}
    if table is None:
        return {"table": None, "partitions": []}
    return {
        "table": table.kind,
        "id": table.id,
        "sector_size": table.sector_size,
        "partitions": [
            {
                "number": p.number,
                "start": p.start,
                "size": p.size,
                "type": p.type,
                "type_name": p.type_name,
                "name": p.name,
                "bootable": p.bootable,
            }
            for p in table.partitions
        ],
    }


def _filesystems(inv: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lsblk's view of each block device by path (fstype, mountpoint), flattened."""
    out: dict[str, dict[str, Any]] = {}

    def walk(nodes: list[dict[str, Any]] | None) -> None:
        for node in nodes or []:
            path = node.get("path") or f"/dev/{node.get('name')}"
            out[path] = node
            walk(node.get("children"))

    walk(inv.get("block_devices"))
    return out


def describe(inv: dict[str, Any], disks: list[ClonedDisk], *, source: str) -> dict[str, Any]:
    """machine.json's content from an agent inventory and the disks cloned."""
    cpu = inv.get("cpu") or {}
    os_release = inv.get("os") or {}
    kernel = inv.get("kernel") or {}
    fs = _filesystems(inv)
    by_path = {d.get("path"): d for d in inv.get("disks") or []}
    disk_list = []
    for d in disks:
        known = by_path.get(d.source, {})
        entry: dict[str, Any] = {
            "source": d.source,
            "size": d.size,
            "path": d.image,
            "format": d.format,
            "model": known.get("model"),
            "serial": known.get("serial"),
            "rotational": known.get("rotational"),
        }
        if d.layout is not None:
            entry.update(
                partition_table=d.layout.get("table"), partitions=d.layout.get("partitions")
            )
            for p in entry["partitions"] or []:
                sysfs = next(
                    (s for s in known.get("partitions") or [] if s.get("number") == p["number"]),
                    None,
                )
                node = fs.get(f"/dev/{sysfs['name']}") if sysfs else None
                if node:
                    p["fstype"] = node.get("fstype")
                    p["mountpoint"] = node.get("mountpoint")
        disk_list.append(entry)
    nics = [
        {
            "name": n.get("name"),
            "mac": n.get("mac"),
            "driver": n.get("driver"),
            "addresses": n.get("addresses") or [],
            "state": n.get("state"),
        }
        for n in inv.get("nics") or []
        if n.get("physical", True) and n.get("mac") and n.get("mac") != "00:00:00:00:00:00"
    ]
    return {
        "name": inv.get("hostname") or "p2v-machine",
        "cpus": cpu.get("count") or 1,
        "cpu_model": cpu.get("model"),
        "sockets": cpu.get("sockets"),
        "memory": inv.get("memory"),
        "firmware": inv.get("firmware") or "bios",
        "disks": disk_list,
        "nics": nics,
        "os": {
            "id": os_release.get("ID"),
            "name": os_release.get("NAME"),
            "version": os_release.get("VERSION_ID"),
            "pretty_name": os_release.get("PRETTY_NAME"),
            "kernel": kernel.get("release"),
            "arch": kernel.get("machine"),
        },
        "mounts": inv.get("mounts") or [],
        "source": {"host": source, "cloned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }


def write_description(outdir: str, description: dict[str, Any]) -> str:
    path = os.path.join(outdir, MACHINE_FILE)
    write_file_atomic(path, (json.dumps(description, indent=2) + "\n").encode())
    return path


def machine_spec(description: dict[str, Any]) -> Any:
    """A drivers.MachineSpec for the description (ImportError while the drivers package
    has none). Disk paths stay relative: the images sit beside the VM definition."""
    try:
        from drivers import MachineSpec  # type: ignore[attr-defined]
    except ImportError:
        from drivers.machine import MachineSpec

    fields = {
        "name": description["name"],
        "cpus": description["cpus"],
        "memory": description["memory"],
        "firmware": description["firmware"],
        "os": "linux",  # the agent reads sysfs and /proc: the source is Linux
        "disks": [
            {"path": d.get("path"), "format": d.get("format"), "size": d.get("size")}
            for d in description["disks"]
        ],
        "nics": [{"mac": n.get("mac")} for n in description["nics"]],
    }
    from_dict = getattr(MachineSpec, "from_dict", None)
    if from_dict is not None:
        return from_dict(fields)
    return MachineSpec(**fields)


def write_target_definition(description: dict[str, Any], platform: str, outdir: str) -> Any:
    """The target platform's VM definition through the drivers package. Raises
    NotAvailable when this build has no drivers for it yet."""
    try:
        import drivers

        write_definition = drivers.write_definition  # type: ignore[attr-defined]
        spec = machine_spec(description)
    except (ImportError, AttributeError) as exc:
        raise NotAvailable(
            f"--target {platform}: VM definitions are not available in this build "
            f"({exc}); machine.json is written"
        ) from exc
    return write_definition(spec, platform, outdir)


class NotAvailable(Exception):
    """A feature whose module is not part of this build yet."""
