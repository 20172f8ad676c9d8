"""xl.cfg against the keys xl.cfg(5) documents, and read back by our reader."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from drivers import DriverError, xen
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from tests.drivers.strategies import machines

MiB = 1 << 20

# xl.cfg(5): the keys we may write, and the values it allows for the enumerated ones
DOCUMENTED = {
    "name", "type", "memory", "maxmem", "vcpus", "bios", "viridian", "localtime", "disk", "vif",
    "boot", "serial", "vnc", "vnclisten", "on_poweroff", "on_reboot", "on_crash",
}  # fmt: skip
DISK_KEYS = {"format", "vdev", "access", "target"}
VIF_KEYS = {"mac", "bridge", "model"}


def machine(**kw):
    base = dict(
        name="mail",
        cpus=2,
        memory=3000 * MiB,
        firmware="uefi",
        disks=[DiskSpec("m-disk1.img", "raw", "ide"), DiskSpec("m-disk2.qcow2", "qcow2", "scsi")],
        nics=[
            NicSpec("00:16:3e:01:02:03", "e1000"),
            NicSpec("00:16:3e:01:02:04", "rtl8139", "xenbr1"),
        ],
        os="windows",
    )
    base.update(kw)
    return MachineSpec(**base)


def test_xl_cfg_uses_documented_keys(tmp_path):
    text = xen.xl_cfg(machine(), str(tmp_path))
    cfg = xen.parse_xl_text(text, "t")
    assert set(cfg) <= DOCUMENTED
    assert cfg["type"] == "hvm" and cfg["bios"] == "ovmf" and cfg["viridian"] == 1
    assert cfg["memory"] == 3000 and cfg["vcpus"] == 2
    for entry in cfg["disk"]:
        parts = xen._spec_parts(entry)
        assert set(parts) == DISK_KEYS
        assert entry.rstrip().split(", ")[-1].startswith("target=")  # target must be last
        assert parts["format"] in ("raw", "qcow2", "vhd")
    assert [xen._spec_parts(e)["vdev"] for e in cfg["disk"]] == ["xvda", "sda"]
    for entry in cfg["vif"]:
        assert set(xen._spec_parts(entry)) <= VIF_KEYS
    assert xen._spec_parts(cfg["vif"][1])["bridge"] == "xenbr1"


@settings(max_examples=40, deadline=None)
@given(
    machines(
        buses=("ide", "scsi"), nic_models=("e1000", "rtl8139"), extensions=("img", "qcow2", "vhd"),
        secure_boot=False,
    )
)  # fmt: skip
def test_written_cfg_reads_back_the_same(tmp_path_factory, m):
    out = tmp_path_factory.mktemp("xen")
    back = xen.read_xl(xen.PLATFORM.write(m, str(out)))
    want = m.replace(disks=[DiskSpec(str(out / d.path), d.format, d.bus) for d in m.disks])
    want.nics = [NicSpec(n.mac, n.model, "xenbr0") for n in m.nics]
    want.os = m.os or "other"
    assert back == want
    assert back.warnings == []


def test_reads_hand_written_configs(tmp_path):
    cfg = tmp_path / "old.cfg"
    cfg.write_text(
        "# an older guest\n"
        "builder = 'hvm'\n"
        "name = 'legacy'; memory = 512\n"
        "vcpus = 1\n"
        "disk = [ '/srv/xen/legacy.img,raw,hda,w',\n"
        "         'file:/srv/iso/boot.iso,hdc:cdrom,r' ]\n"
        "vif = [ 'mac=00:16:3e:aa:bb:cc,bridge=xenbr0' ]\n"
        "pci = [ '01:00.0' ]\n"
    )
    spec = xen.read_xl(str(cfg))
    assert (spec.name, spec.memory, spec.firmware) == ("legacy", 512 * MiB, "bios")
    assert spec.disks == [DiskSpec("/srv/xen/legacy.img", "raw", "ide")]
    assert spec.nics == [NicSpec("00:16:3e:aa:bb:cc", None, "xenbr0")]
    assert "1 CD drive(s) not carried over" in spec.warnings
    assert "settings not carried over: pci" in spec.warnings


@pytest.mark.parametrize(
    "text, match",
    [
        ('name = "pv"\nmemory = 512\n', "only HVM"),
        ('type = "hvm"\nname = "x"\nmemory = \n', "expected a value"),
        ('type = "hvm"\nname = "x"\nmemory = 1\n', "absurd"),
        (
            'type = "hvm"\nname = "x"\nmemory = 512\ndisk = [ "format=raw, vdev=xvda, target=../../x" ]\n',
            "escapes",
        ),
        ('type = "hvm"\nname = "x" memory = 512\n', "unexpected"),
    ],
)
def test_bad_configs_give_one_line_errors(tmp_path, text, match):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(text)
    with pytest.raises(DriverError, match=match) as info:
        xen.read_xl(str(cfg))
    assert "\n" not in str(info.value)
