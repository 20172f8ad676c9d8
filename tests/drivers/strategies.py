"""hypothesis strategies for valid machine descriptions, shared by the driver tests."""

from __future__ import annotations

from hypothesis import strategies as st

from drivers.machine import DiskSpec, MachineSpec, NicSpec

MiB = 1 << 20

names = st.text(
    alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters=" -_.'"),
    min_size=1,
    max_size=30,
).filter(lambda s: s.strip() == s and s.strip())


@st.composite
def macs(draw):
    octets = draw(st.lists(st.integers(0, 255), min_size=6, max_size=6))
    octets[0] = (octets[0] & 0xFE) | 0x02  # unicast, locally administered
    if not any(octets):
        octets[1] = 1
    return ":".join(f"{o:02x}" for o in octets)


@st.composite
def machines(
    draw,
    *,
    buses,
    nic_models,
    extensions,
    max_disks=4,
    secure_boot=True,
    firmwares=("bios", "uefi"),
):
    n_disks = draw(st.integers(1, max_disks))
    bus = draw(st.sampled_from(buses))
    disks = []
    for i in range(n_disks):
        ext = draw(st.sampled_from(extensions))
        disks.append(DiskSpec(f"disk-{i}.{ext}", EXTENSIONS[ext], bus))
    mac_list = draw(st.lists(macs(), max_size=3, unique=True))
    nics = [NicSpec(m, draw(st.sampled_from(nic_models)), None) for m in mac_list]
    firmware = draw(st.sampled_from(firmwares))
    return MachineSpec(
        name=draw(names),
        cpus=draw(st.integers(1, 64)),
        memory=draw(st.integers(16, 65536)) * 4 * MiB,
        firmware=firmware,
        secure_boot=secure_boot and firmware == "uefi" and draw(st.booleans()),
        disks=disks,
        nics=nics,
        os=draw(st.sampled_from(["linux", "windows", "other", None])),
    )


EXTENSIONS = {
    "img": "raw",
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vhd": "vpc",
    "vhdx": "vhdx",
    "vdi": "vdi",
}
