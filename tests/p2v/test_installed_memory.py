"""The machine description's memory is the memory installed in the server (DMI, the
kernel's memory blocks), not MemTotal, which leaves out what firmware and kernel keep."""

from __future__ import annotations

import os
import struct

from p2v import inventory, protocol
from p2v.protocol import PipeStream, start_agent

MiB = 1 << 20
GiB = 1 << 30


def type17(size: int, extended: int | None = None, length: int = 0x28) -> str:
    """A Type 17 entry as /sys/firmware/dmi/entries/17-N/raw holds it (SMBIOS 7.18)."""
    raw = bytearray(max(length, 0x20))
    struct.pack_into("<BBH", raw, 0, 17, length, 0x1100)
    struct.pack_into("<H", raw, 0x0C, size)
    if extended is not None:
        struct.pack_into("<I", raw, 0x1C, extended)
    return bytes(raw).hex() + "00" * 2  # the string set that follows the formatted area


def sources(**kw):
    base = {"dmi_type17": [], "block_size": None, "blocks": 0, "mem_total": 959 * MiB}
    base.update(kw)
    return {"memory": base["mem_total"], "memory_sources": base}


def test_dmi_devices_are_summed_in_their_units():
    inv = sources(
        dmi_type17=[
            type17(512),  # 512 MiB
            type17(0x8000 | 16384),  # 16 MiB given in KiB
            type17(0),  # an empty slot
            type17(0xFFFF),  # unknown size: not counted
            type17(0x7FFF, extended=32 * 1024),  # 32 GiB in the extended field
        ]
    )
    assert inventory.installed_memory(inv) == (32 * GiB + 528 * MiB, "dmi")


def test_hostile_or_short_dmi_entries_fall_back_to_memory_blocks():
    inv = sources(
        dmi_type17=[
            "zz",  # not hex
            type17(512)[:16],  # truncated before Size
            type17(0x7FFF, extended=64, length=0x15),  # extended size past its length
            "10" + type17(512)[2:],  # a Type 17 file holding another type (16)
            type17(1),  # 1 MiB: less than MemTotal, so the table is wrong
        ],
        block_size="8000000",
        blocks=8,
    )
    assert inventory.installed_memory(inv) == (GiB, "memory-blocks")


def test_memtotal_is_the_last_resort():
    assert inventory.installed_memory(sources()) == (959 * MiB, "meminfo")
    bad = sources(block_size="not hex", blocks=8)
    assert inventory.installed_memory(bad) == (959 * MiB, "meminfo")
    huge = sources(block_size="8000000", blocks=1 << 40)
    assert inventory.installed_memory(huge) == (959 * MiB, "meminfo")


def test_this_machine_is_described_with_its_installed_memory():
    conn = start_agent(PipeStream())
    try:
        inv = conn.call(protocol.OP_INVENTORY)
    finally:
        conn.close()
    desc = inventory.describe(inv, [], source="root@here:22")
    with open("/proc/meminfo") as f:
        mem_total = int(f.readline().split()[1]) * 1024
    assert desc["memory"] >= mem_total
    if os.path.exists("/sys/devices/system/memory/block_size_bytes"):
        with open("/sys/devices/system/memory/block_size_bytes") as f:
            block = int(f.read(), 16)
        assert desc["memory"] % block == 0
        if desc["memory_source"] == "memory-blocks":
            count = len([n for n in os.listdir("/sys/devices/system/memory") if n[6:].isdigit()])
            assert desc["memory"] == block * count
