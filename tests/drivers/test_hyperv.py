"""The Hyper-V script against the cmdlets and parameters Microsoft documents for the
Hyper-V PowerShell module, and read back by our reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings

from drivers import DriverError, hyperv
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from tests.drivers.strategies import machines

MiB = 1 << 20

# learn.microsoft.com/powershell/module/hyper-v: the parameters we may use per cmdlet
DOCUMENTED = {
    "New-VM": {
        "Name",
        "Generation",
        "MemoryStartupBytes",
        "NoVHD",
        "Path",
        "SwitchName",
        "BootDevice",
    },
    "Set-VM": {"Name", "Notes", "AutomaticCheckpointsEnabled"},
    "Set-VMProcessor": {"VMName", "Count"},
    "Set-VMMemory": {"VMName", "DynamicMemoryEnabled"},
    "Get-VMNetworkAdapter": {"VMName"},
    "Remove-VMNetworkAdapter": set(),
    "Add-VMScsiController": {"VMName"},
    "Add-VMHardDiskDrive": {
        "VMName",
        "ControllerType",
        "ControllerNumber",
        "ControllerLocation",
        "Path",
    },
    "Get-VMHardDiskDrive": {"VMName", "ControllerType", "ControllerNumber", "ControllerLocation"},
    "Add-VMNetworkAdapter": {"VMName", "Name", "SwitchName", "StaticMacAddress"},
    "Set-VMFirmware": {"VMName", "EnableSecureBoot", "SecureBootTemplate", "FirstBootDevice"},
    "Set-VMBios": {"VMName", "StartupOrder"},
    "Join-Path": set(),
    "Split-Path": {"Parent"},
    "Write-Output": set(),
    "Out-Null": set(),
}
CMDLET = re.compile(r"(?:^|[|(]\s*)([A-Z][a-z]+-[A-Za-z]+)")


def machine(**kw):
    base = dict(
        name="it's web",
        cpus=8,
        memory=8191 * MiB,
        firmware="uefi",
        secure_boot=True,
        disks=[DiskSpec("w-disk1.vhdx", "vhdx", "scsi"), DiskSpec("w-disk2.vhdx", "vhdx", "scsi")],
        nics=[
            NicSpec("52:54:00:12:34:56", "netvsc"),
            NicSpec("52:54:00:12:34:57", "netvsc", "Backend"),
        ],
        os="linux",
    )
    base.update(kw)
    return MachineSpec(**base)


def _cmdlets_and_params(text):
    found = []
    for line in text.splitlines():
        if line.startswith("#") or line.startswith("$") or line.startswith("param("):
            continue
        for segment in re.split(r"[|(]", line):
            m = re.match(r"\s*([A-Z][a-z]+-[A-Za-z]+)(.*)", segment)
            if m:
                params = set(re.findall(r"\s-([A-Za-z]+)", m.group(2)))
                found.append((m.group(1), params))
    return found


@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_script_uses_documented_cmdlets_and_parameters(tmp_path, firmware):
    spec = machine(firmware=firmware, secure_boot=firmware == "uefi")
    if firmware == "bios":
        spec = hyperv.PLATFORM.adapt(spec).spec
    text = hyperv.script(spec, str(tmp_path))
    used = _cmdlets_and_params(text)
    assert used
    for cmdlet, params in used:
        assert cmdlet in DOCUMENTED, cmdlet
        assert params <= DOCUMENTED[cmdlet], (cmdlet, params - DOCUMENTED[cmdlet])
    assert text.count("(") == text.count(")")
    gen = re.search(r"-Generation (\d)", text).group(1)
    assert gen == ("2" if firmware == "uefi" else "1")
    memory = int(re.search(r"-MemoryStartupBytes (\d+)", text).group(1))
    assert memory % (2 * MiB) == 0 and memory >= 8191 * MiB
    assert "$Name = 'it''s web'" in text


def test_generation_1_boots_from_ide(tmp_path):
    spec = hyperv.PLATFORM.adapt(machine(firmware="bios", secure_boot=False, disks=[
        DiskSpec(f"d{i}.vhdx", "vhdx", "scsi") for i in range(3)])).spec  # fmt: skip
    text = hyperv.script(spec, str(tmp_path))
    assert "-ControllerType IDE -ControllerNumber 0 -ControllerLocation 0" in text
    assert "-ControllerType IDE -ControllerNumber 0 -ControllerLocation 1" in text
    assert "Add-VMScsiController" in text
    assert (
        "-ControllerType SCSI -ControllerNumber 0 -ControllerLocation 0 -Path (Join-Path $Here 'd2.vhdx')"
        in text
    )
    assert "Set-VMBios" in text and "Set-VMFirmware" not in text


def test_written_file_has_a_bom_and_crlf(tmp_path):
    path = hyperv.PLATFORM.write(machine(), str(tmp_path))
    raw = Path(path).read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw


@settings(max_examples=40, deadline=None)
@given(machines(buses=("scsi",), nic_models=("netvsc",), extensions=("vhdx", "vhd"), max_disks=3))
def test_written_scripts_read_back_the_same(tmp_path_factory, m):
    out = tmp_path_factory.mktemp("hv")
    m = hyperv.PLATFORM.adapt(m).spec
    back = hyperv.read_script(hyperv.PLATFORM.write(m, str(out)))
    want = m.replace(disks=[DiskSpec(str(out / d.path), d.format, d.bus) for d in m.disks])
    want.os = m.os or "other"
    assert back == want
    assert back.warnings == []


def test_reader_refuses_escaping_paths_and_missing_memory(tmp_path):
    bad = tmp_path / "bad.ps1"
    bad.write_text(
        "New-VM -Name 'x' -Generation 2 -MemoryStartupBytes 1073741824 -NoVHD\n"
        "Add-VMHardDiskDrive -VMName 'x' -ControllerType SCSI -Path (Join-Path $Here '..\\..\\sam')\n"
    )
    with pytest.raises(DriverError, match="escapes"):
        hyperv.read_script(str(bad))
    bad.write_text("New-VM -Name 'x' -Generation 2 -NoVHD\n")
    with pytest.raises(DriverError, match="MemoryStartupBytes"):
        hyperv.read_script(str(bad))
