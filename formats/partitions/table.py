"""What a partition table says, whichever kind it is: the dataclasses both readers fill."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError


@dataclass
class Partition:
    number: int  # as Linux numbers it: GPT entry index + 1; MBR slot 1-4, logicals from 5
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # GPT type GUID (upper case, as sgdisk prints it) or the MBR type byte in hex
    type_name: str
    name: str = ""  # GPT partition name
    uuid: str | None = None  # GPT unique partition GUID; MBR: Linux's PARTUUID
    bootable: bool = False  # MBR active flag, or GPT attribute bit 2 (legacy BIOS bootable)
    attributes: int = 0  # GPT attribute bits
    is_container: bool = False  # an MBR extended partition: holds logicals, not data

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class PartitionTable:
    kind: str  # "gpt" or "mbr"
    sector_size: int
    disk_size: int
    id: str  # GPT disk GUID, or the MBR disk signature as 0x%08x
    partitions: list[Partition]
    first_usable: int | None = None  # bytes (GPT)
    last_usable: int | None = None  # bytes, inclusive end of the last usable sector (GPT)
    #: byte ranges (offset, length) holding the table itself: MBR, EBRs, GPT headers+entries
    metadata: list[tuple[int, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: what a writer needs to rebuild the table unchanged (GPT entry array, header fields)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def disk_guid(self) -> str | None:
        return self.id if self.kind == "gpt" else None

    @property
    def signature(self) -> int | None:
        """The MBR disk signature (what Windows and Linux's PARTUUIDs are built from)."""
        return int(self.id, 16) if self.kind == "mbr" else None

    def partition(self, number: int) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        have = ", ".join(str(p.number) for p in self.partitions) or "none"
        raise FormatError(f"{self.kind}: no partition {number} (partitions: {have})")
