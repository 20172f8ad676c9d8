"""The agent's inventory becomes machine.json and a drivers.MachineSpec."""

from __future__ import annotations

import os

import pytest

from p2v import inventory, protocol
from p2v.protocol import PipeStream, start_agent
from p2v.remote import RemoteDisk


@pytest.fixture
def agent():
    conn = start_agent(PipeStream())
    yield conn
    conn.close()


def test_description_from_a_real_inventory_and_a_remote_partition_table(agent, pristine_disk):
    path, layout = pristine_disk
    inv = agent.call(protocol.OP_INVENTORY)
    with RemoteDisk.open(agent, path) as disk:
        table = inventory.partition_layout(disk)
        size = disk.size
    assert table["table"] == "gpt"
    assert [(p["start"], p["size"]) for p in table["partitions"]] == [
        (layout["fat_start"], layout["fat_size"]),
        (layout["ext4_start"], layout["ext4_size"]),
    ]
    assert table["partitions"][0]["type_name"] == "EFI System"
    cloned = inventory.ClonedDisk(path, size, "sda.qcow2", "qcow2", layout=table)
    desc = inventory.describe(inv, [cloned], source="root@server:22")
    assert desc["cpus"] == os.cpu_count() and desc["memory"] >= inv["memory"]
    assert desc["firmware"] in ("bios", "uefi")
    assert desc["disks"][0]["path"] == "sda.qcow2" and desc["disks"][0]["size"] == size
    assert desc["os"]["kernel"] == os.uname().release
    # only adapters with a device (no bridges, veths, ifb) and a real MAC are recreated
    names = {n["name"] for n in desc["nics"]}
    for name in names:
        assert os.path.exists(f"/sys/class/net/{name}/device")


def test_description_becomes_a_machine_spec_for_the_drivers():
    desc = {
        "name": "web1",
        "cpus": 4,
        "memory": 8 << 30,
        "firmware": "uefi",
        "disks": [{"path": "sda.qcow2", "format": "qcow2", "size": 20 << 30}],
        "nics": [{"name": "eth0", "mac": "52:54:00:12:34:56"}],
    }
    spec = inventory.machine_spec(desc)
    assert (spec.name, spec.cpus, spec.memory, spec.firmware) == ("web1", 4, 8 << 30, "uefi")
    assert [d.path for d in spec.disks] == ["sda.qcow2"]
    assert [n.mac for n in spec.nics] == ["52:54:00:12:34:56"]
