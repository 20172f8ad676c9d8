"""MachineSpec: validation on construction, the dict form formats.ovf uses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from drivers import DriverError
from drivers.machine import DiskSpec, MachineSpec, NicSpec, file_stem, normalize_mac
from tests.drivers.strategies import machines

MiB = 1 << 20


def spec(**kw):
    base = dict(name="vm", cpus=2, memory=1024 * MiB)
    base.update(kw)
    return MachineSpec(**base)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("52:54:00:AB:cd:0F", "52:54:00:ab:cd:0f"),
        ("52-54-00-ab-cd-0f", "52:54:00:ab:cd:0f"),
        ("525400abcd0f", "52:54:00:ab:cd:0f"),
    ],
)
def test_mac_forms_normalise(text, expected):
    assert normalize_mac(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:0g",
        "52:54-00:ab:cd:0f",
        "01:00:5e:00:00:01",
        "00:00:00:00:00:00",
    ],
)
def test_bad_macs_are_refused(text):
    with pytest.raises(DriverError, match="MAC"):
        NicSpec(text)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(memory=1), "memory of 1 bytes is absurd"),
        (dict(memory=1 << 60), "absurd"),
        (dict(memory="lots"), "not a whole number"),
        (dict(cpus=0), "0 CPUs is absurd"),
        (dict(cpus=100000), "absurd"),
        (dict(cpus=True), "not a number"),
        (dict(firmware="coreboot"), "unknown firmware"),
        (dict(secure_boot=True), "Secure Boot needs UEFI"),
        (dict(name=" "), "empty"),
        (dict(name="a\nb"), "control characters"),
        (dict(name="x" * 200), "characters"),
        (dict(os="beos"), "unknown OS family"),
        (dict(disks=[{"path": "a", "bus": "floppy"}]), "unknown bus"),
        (dict(disks=[{"path": "a", "format": "iso"}]), "unknown format"),
        (dict(disks=[{"path": "a", "size": -1}]), "invalid size"),
        (dict(nics=[{"mac": "52:54:00:00:00:01"}, {"mac": "52-54-00-00-00-01"}]), "used twice"),
        (dict(nics=[{"model": "tulip"}]), "unknown model"),
    ],
)
def test_absurd_machines_are_refused(kw, match):
    with pytest.raises(DriverError, match=match):
        spec(**kw)


def test_aliases_and_normalisation():
    s = spec(firmware="EFI", disks=[{"path": "a.vhd", "format": "vhd", "bus": "SATA"}], os="Linux")
    assert s.firmware == "uefi"
    assert s.disks == [DiskSpec("a.vhd", "vpc", "sata")]
    assert s.os == "linux"
    assert spec(memory=1000 * MiB + 1).memory_mib == 1001


def test_from_dict_keeps_unknown_fields_as_warnings():
    s = MachineSpec.from_dict(
        {
            "name": "vm",
            "cpus": "4",
            "memory": 2048 * MiB,
            "cpu_model": "Xeon",
            "disks": [{"path": "a.img", "format": "raw", "serial": "X1"}],
            "nics": [{"mac": "52:54:00:00:00:01", "driver": "igb"}],
            "warnings": ["from the reader"],
        }
    )
    assert s.cpus == 4
    assert "from the reader" in s.warnings
    assert "field 'cpu_model' is not carried over" in s.warnings
    assert any("serial" in w for w in s.warnings)
    assert any("driver" in w for w in s.warnings)
    with pytest.raises(DriverError, match="no memory"):
        MachineSpec.from_dict({"name": "vm", "cpus": 1})


@settings(max_examples=50, deadline=None)
@given(
    machines(buses=("virtio", "sata"), nic_models=("virtio", "e1000"), extensions=("qcow2", "img"))
)
def test_dict_form_round_trips(m):
    assert MachineSpec.from_dict(m.to_dict()) == m


def test_replace_validates_and_keeps_warnings():
    s = spec()
    s.warnings.append("w")
    assert s.replace(cpus=3).warnings == ["w"]
    with pytest.raises(DriverError):
        s.replace(cpus=0)


def test_file_stem():
    assert file_stem("web 1 (copy)") == "web-1-copy"
    assert file_stem("../..") == "machine"
