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

from construct import Int8ul, Int16ul, Int32ul, Struct

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
    from formats import partitions

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


# SMBIOS 3.x, 7.18 "Memory Device (Type 17)": the formatted area up to Size (offset 0Ch);
# Extended Size (offset 1Ch, a DWORD of MiB) is used when Size is 7FFFh
MemoryDevice = Struct(
    "type" / Int8ul,
    "length" / Int8ul,
    "handle" / Int16ul,
    "physical_memory_array_handle" / Int16ul,
    "memory_error_information_handle" / Int16ul,
    "total_width" / Int16ul,
    "data_width" / Int16ul,
    "size" / Int16ul,
)
EXTENDED_SIZE = Struct("extended_size" / Int32ul)
EXTENDED_SIZE_OFFSET = 0x1C
SIZE_UNKNOWN = 0xFFFF
SIZE_EXTENDED = 0x7FFF
SIZE_IN_KIB = 0x8000
#: sanity caps for what a server may claim
MAX_MEMORY = 1 << 52
MAX_MEMORY_BLOCKS = 1 << 24


def dmi_device_size(raw: bytes) -> int | None:
    """Bytes installed in one Type 17 memory device (0: empty slot), None when the entry
    does not say (unknown size, truncated or not a Type 17 entry)."""
    if len(raw) < MemoryDevice.sizeof():
        return None
    dev = MemoryDevice.parse(raw)
    if dev.type != 17 or dev.length < MemoryDevice.sizeof() or dev.length > len(raw):
        return None
    if dev.size == SIZE_UNKNOWN:
        return None
    if dev.size == SIZE_EXTENDED:
        if dev.length < EXTENDED_SIZE_OFFSET + 4:
            return None
        ext = EXTENDED_SIZE.parse(raw[EXTENDED_SIZE_OFFSET : EXTENDED_SIZE_OFFSET + 4])
        return (ext.extended_size & 0x7FFFFFFF) << 20
    if dev.size & SIZE_IN_KIB:
        return (dev.size & 0x7FFF) << 10
    return dev.size << 20


def installed_memory(inv: dict[str, Any]) -> tuple[int | None, str]:
    """(bytes, source): the memory installed in the server, as the other P2V tools take it.

    MemTotal leaves out what firmware and kernel reserved (a 1 GiB server shows ~960 MiB),
    so a VM sized from it is smaller than the machine. First choice: the DMI memory
    devices (what sits in the slots; readable by root). Then the kernel's memory blocks
    (/sys/devices/system/memory: block size x blocks, the physical memory it manages,
    holes excluded). Then MemTotal. A source that claims less than MemTotal is wrong."""
    sources = inv.get("memory_sources") or {}
    mem_total = _int_or_none(sources.get("mem_total", inv.get("memory")))
    floor = mem_total or 0
    sizes = []
    for text in sources.get("dmi_type17") or []:
        try:
            raw = bytes.fromhex(text) if isinstance(text, str) else b""
        except ValueError:
            continue
        size = dmi_device_size(raw)
        if size is not None:
            sizes.append(size)
    dmi = sum(sizes)
    if 0 < dmi <= MAX_MEMORY and dmi >= floor:
        return dmi, "dmi"
    block = sources.get("block_size")
    blocks = _int_or_none(sources.get("blocks"))
    try:
        block_size = int(block, 16) if isinstance(block, str) else 0
    except ValueError:
        block_size = 0
    if blocks and 0 < blocks <= MAX_MEMORY_BLOCKS and 0 < block_size <= 1 << 40:
        total = block_size * blocks
        if floor <= total <= MAX_MEMORY:
            return total, "memory-blocks"
    return mem_total, "meminfo"


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


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
    memory, memory_source = installed_memory(inv)
    return {
        "name": inv.get("hostname") or "p2v-machine",
        "cpus": cpu.get("count") or 1,
        "cpu_model": cpu.get("model"),
        "sockets": cpu.get("sockets"),
        "memory": memory,
        "memory_source": memory_source,
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
    """A drivers.MachineSpec for the description. Disk paths stay relative: the images
    sit beside the VM definition."""
    from drivers.machine import MachineSpec  # on first use: only --target needs it

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
    return MachineSpec.from_dict(fields)


def write_target_definition(description: dict[str, Any], platform: str, outdir: str) -> str:
    """The target platform's VM definition through the drivers package (a DriverError,
    a ValueError, when the description does not fit the platform)."""
    import drivers

    return drivers.write_definition(machine_spec(description), platform, outdir)
