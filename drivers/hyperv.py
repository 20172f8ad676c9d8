"""Hyper-V: a PowerShell script that creates the VM with New-VM and attaches its VHDX
disks (Hyper-V module cmdlets: New-VM, Set-VM, Set-VMProcessor, Set-VMMemory,
Add-VMHardDiskDrive, Add-VMScsiController, Add-VMNetworkAdapter, Set-VMFirmware,
Set-VMBios), and the reader for such a script.

Generation 2 (UEFI) attaches every disk to SCSI; generation 1 (BIOS) boots only from IDE,
so the first two disks go to IDE controller 0 and the rest to an added SCSI controller.
Hyper-V counts memory in MiB multiples of 2 and offers only synthetic NICs here (the
legacy adapter is a 100 Mbit DEC 21140 that modern guests rarely need). The OS family is
kept in the VM's Notes so the reader can return it.
"""

from __future__ import annotations

import os
import re

from . import checklist
from .errors import DriverError
from .machine import DiskSpec, MachineSpec, NicSpec
from .platform import Adapted, DiskTarget, Platform, disk_location

MAX_SCRIPT = 1 << 20
SWITCH_DEFAULT = "Default Switch"
_NOTES = re.compile(r"p2v: os=(\w+)")


def _ps(value: str) -> str:
    """A PowerShell single-quoted string: nothing inside is expanded."""
    return "'" + value.replace("'", "''") + "'"


class Hyperv(Platform):
    name = "hyperv"
    title = "Microsoft Hyper-V"
    disk = DiskTarget("vhdx")
    formats = ("vhdx", "vpc")
    buses = ("scsi", "ide")
    nic_models = ("netvsc",)
    memory_step_mib = 2
    default_network = SWITCH_DEFAULT

    def adapt(
        self,
        spec: MachineSpec,
        *,
        bus: str | None = None,
        nic_model: str | None = None,
        network: str | None = None,
    ) -> Adapted:
        out = super().adapt(spec, bus=bus, nic_model=nic_model, network=network)
        s = out.spec
        if s.firmware == "bios":
            # generation 1 boots from IDE only, and IDE holds four devices (one is the DVD)
            for i, d in enumerate(s.disks):
                want = "ide" if i < 2 else "scsi"
                if d.bus != want:
                    out.changes = [c for c in out.changes if not c.startswith(f"disk {i + 1} bus")]
                    before = spec.disks[i].bus or "unknown"
                    if before != want:
                        out.changes.append(f"disk {i + 1} bus: {before} -> {want} (generation 1)")
                    d.bus = want
        else:
            for i, d in enumerate(s.disks):
                if d.bus != "scsi":
                    before = spec.disks[i].bus or "unknown"
                    out.changes = [c for c in out.changes if not c.startswith(f"disk {i + 1} bus")]
                    out.changes.append(f"disk {i + 1} bus: {before} -> scsi (generation 2)")
                    d.bus = "scsi"
        return out

    # SCSI disks and synthetic NICs are VMBus devices: no PCI path, so the NICs keep the
    # kernel's names; Linux drives generation 1's IDE disks through hv_storvsc as well
    # (ata_piix steps aside on Hyper-V), the emulated controller being the fallback
    disk_drivers = {
        "scsi": ("hv_vmbus", "hv_storvsc"),
        "ide": ("hv_vmbus", "hv_storvsc", "ata_piix"),
    }

    def interface_names(self, spec: MachineSpec) -> tuple[str, ...]:
        return tuple(f"eth{i}" for i in range(len(spec.nics)))

    def preferred_bus(self, spec: MachineSpec) -> str:
        return "scsi"

    def definition_path(self, spec: MachineSpec, outdir: str) -> str:
        return os.path.join(outdir, f"{self.stem(spec)}.ps1")

    def render(self, spec: MachineSpec, outdir: str) -> bytes:
        # a UTF-8 BOM: Windows PowerShell 5.1 reads BOM-less scripts in the ANSI code page
        return b"\xef\xbb\xbf" + script(spec, outdir).replace("\n", "\r\n").encode("utf-8")

    def checklist(self, source: MachineSpec, target: MachineSpec) -> list[str]:
        out = checklist.common(source, target)
        gen = 2 if target.firmware == "uefi" else 1
        if target.os in (None, "linux"):
            out.append(
                "Linux guests: hv_vmbus, hv_storvsc and hv_netvsc must be in the initramfs "
                "(dracut --add-drivers 'hv_vmbus hv_storvsc hv_netvsc')"
            )
            if target.secure_boot:
                out.append(
                    "Linux guests with Secure Boot use the MicrosoftUEFICertificateAuthority template"
                )
        out.append(
            f"run {self.stem(target)}.ps1 in an elevated PowerShell on the Hyper-V host, from the "
            f"directory holding the disks; it creates a generation {gen} VM "
            "(-SwitchName NAME picks the virtual switch)"
        )
        out.append(
            "remove the previous platform's guest tools (VMware Tools, qemu-guest-agent) if present"
        )
        return out


def script(spec: MachineSpec, outdir: str) -> str:
    gen = 2 if spec.firmware == "uefi" else 1
    memory = -(-spec.memory_mib // 2) * 2 << 20
    notes = f"p2v: os={spec.os or 'other'}"
    lines = [
        f"# Made by p2v: creates the Hyper-V VM {spec.name!r} (generation {gen}) and attaches its disks.",
        "# Run it in an elevated PowerShell on the Hyper-V host, from the folder holding the disks.",
        f"param([string]$SwitchName = {_ps(SWITCH_DEFAULT)})",
        "$ErrorActionPreference = 'Stop'",
        "$Here = Split-Path -Parent $MyInvocation.MyCommand.Path",
        f"$Name = {_ps(spec.name)}",
        f"New-VM -Name $Name -Generation {gen} -MemoryStartupBytes {memory} -NoVHD -Path $Here | Out-Null",
        f"Set-VM -Name $Name -Notes {_ps(notes)} -AutomaticCheckpointsEnabled $false",
        f"Set-VMProcessor -VMName $Name -Count {spec.cpus}",
        "Set-VMMemory -VMName $Name -DynamicMemoryEnabled $false",
        "Get-VMNetworkAdapter -VMName $Name | Remove-VMNetworkAdapter",
    ]
    scsi_used = 0
    ide_used = 0
    if gen == 1 and any(d.bus == "scsi" for d in spec.disks):
        lines.append("Add-VMScsiController -VMName $Name")
    for d in spec.disks:
        rel = os.path.relpath(disk_location(d.path, outdir), os.path.abspath(outdir))
        if rel.startswith(".."):
            raise DriverError(f"hyperv: disk {d.path} must be inside {outdir}")
        if d.bus == "ide" and gen == 1:
            ctl, loc = 0, ide_used
            ide_used += 1
            kind = "IDE"
        elif d.bus in ("scsi", None):
            ctl, loc = 0, scsi_used
            scsi_used += 1
            kind = "SCSI"
        else:
            raise DriverError(f"hyperv: a generation {gen} VM has no {d.bus} disk bus")
        if kind == "IDE" and loc > 1:
            raise DriverError("hyperv: more than two IDE disks (IDE 1 holds the DVD drive)")
        if loc > 63:
            raise DriverError("hyperv: more than 64 SCSI disks")
        lines.append(
            f"Add-VMHardDiskDrive -VMName $Name -ControllerType {kind} -ControllerNumber {ctl} "
            f"-ControllerLocation {loc} -Path (Join-Path $Here {_ps(rel)})"
        )
    for i, n in enumerate(spec.nics, 1):
        mac = f" -StaticMacAddress {_ps(n.mac.replace(':', '').upper())}" if n.mac else ""
        switch = _ps(n.network) if n.network and n.network != SWITCH_DEFAULT else "$SwitchName"
        lines.append(
            f"Add-VMNetworkAdapter -VMName $Name -Name {_ps(f'Network Adapter {i}')} -SwitchName {switch}{mac}"
        )
    if gen == 2:
        first = (
            " -FirstBootDevice (Get-VMHardDiskDrive -VMName $Name -ControllerType SCSI "
            "-ControllerNumber 0 -ControllerLocation 0)"
            if spec.disks
            else ""
        )
        if spec.secure_boot:
            template = (
                "MicrosoftWindows" if spec.os == "windows" else "MicrosoftUEFICertificateAuthority"
            )
            lines.append(
                f"Set-VMFirmware -VMName $Name -EnableSecureBoot On -SecureBootTemplate {template}{first}"
            )
        else:
            lines.append(f"Set-VMFirmware -VMName $Name -EnableSecureBoot Off{first}")
    else:
        lines.append(
            "Set-VMBios -VMName $Name -StartupOrder @('IDE', 'CD', 'LegacyNetworkAdapter', 'Floppy')"
        )
    lines.append("Write-Output \"Created VM '$Name'\"")
    return "\n".join(lines) + "\n"


# -- reading ----------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<param>-[A-Za-z]+)
      | '(?P<str>(?:[^']|'')*)'
      | (?P<paren>\((?:[^()']|'(?:[^']|'')*')*\))
      | (?P<word>[^\s'()|]+)
      | (?P<pipe>\|)
    )""",
    re.X,
)


def _params(line: str, where: str) -> tuple[str, dict[str, str]]:
    """A cmdlet line's name and its -Parameter values (quoted strings unquoted; a
    parenthesised expression yields the last quoted string inside it)."""
    pos = 0
    words: list[tuple[str, str]] = []
    while pos < len(line):
        m = _TOKEN.match(line, pos)
        if not m or m.end() == pos:
            if line[pos:].strip() == "":
                break
            raise DriverError(f"{where}: cannot read {line[pos : pos + 40]!r}")
        pos = m.end()
        if m.group("param"):
            words.append(("param", m.group("param")[1:].lower()))
        elif m.group("str") is not None:
            words.append(("value", m.group("str").replace("''", "'")))
        elif m.group("paren"):
            inner = re.findall(r"'((?:[^']|'')*)'", m.group("paren"))
            words.append(("value", inner[-1].replace("''", "'") if inner else m.group("paren")))
        elif m.group("pipe"):
            break
        else:
            words.append(("value", m.group("word")))
    if not words or words[0][0] != "value":
        return "", {}
    cmd = words[0][1]
    params: dict[str, str] = {}
    i = 1
    while i < len(words):
        kind, text = words[i]
        if kind == "param":
            if i + 1 < len(words) and words[i + 1][0] == "value":
                params[text] = words[i + 1][1]
                i += 2
                continue
            params[text] = "true"
        i += 1
    return cmd, params


def _int(text: str | None, what: str, where: str) -> int:
    if text is None or not text.isdigit() or len(text) > 20:
        raise DriverError(f"{where}: {what} {text!r} is not a whole number")
    return int(text)


def read_script(path: str) -> MachineSpec:
    """A Hyper-V creation script (as p2v writes them) as a MachineSpec."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SCRIPT + 1)
    except OSError as exc:
        raise DriverError(f"{path}: {exc.strerror}") from exc
    if len(raw) > MAX_SCRIPT:
        raise DriverError(f"{path}: too large for a Hyper-V script")
    text = raw.decode("utf-8-sig", errors="replace")
    return parse_script(text, os.path.dirname(os.path.abspath(path)), where=path)


def parse_script(text: str, base_dir: str, *, where: str = "script") -> MachineSpec:
    from . import sourcepath

    variables: dict[str, str] = {}
    name = None
    gen = 1
    memory = None
    cpus = 1
    secure = False
    family = None
    disks: list[tuple[tuple[int, int, int], DiskSpec]] = []
    nics: list[NicSpec] = []
    warnings: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^\$(\w+)\s*=\s*'((?:[^']|'')*)'$", line)
        if m:
            variables[m.group(1).lower()] = m.group(2).replace("''", "'")
            continue
        cmd, p = _params(line, where)
        cmd = cmd.lower()
        if cmd == "new-vm":
            name = p.get("name")
            gen = _int(p.get("generation", "1"), "generation", where)
            if "memorystartupbytes" in p:
                memory = _int(p["memorystartupbytes"], "memory", where)
        elif cmd == "set-vm":
            n = _NOTES.search(p.get("notes", ""))
            family = n.group(1) if n else family
        elif cmd == "set-vmprocessor":
            cpus = _int(p.get("count"), "processor count", where)
        elif cmd == "add-vmharddiskdrive":
            kind = p.get("controllertype", "IDE").lower()
            key = (0 if kind == "ide" else 1, _int(p.get("controllernumber", "0"), "controller", where),
                   _int(p.get("controllerlocation", "0"), "location", where))  # fmt: skip
            file = p.get("path")
            if not file:
                raise DriverError(f"{where}: Add-VMHardDiskDrive without -Path")
            full = sourcepath.resolve(file, base_dir, where=where)
            fmt = {".vhdx": "vhdx", ".vhd": "vpc"}.get(os.path.splitext(file)[1].lower())
            disks.append((key, DiskSpec(full, fmt, "ide" if kind == "ide" else "scsi")))
        elif cmd == "add-vmnetworkadapter":
            mac = p.get("staticmacaddress")
            switch = p.get("switchname")
            network = None if switch in (None, "$SwitchName", "$switchname") else switch
            nics.append(NicSpec(mac, "netvsc", network))
        elif cmd == "set-vmfirmware":
            secure = p.get("enablesecureboot", "").lower() == "on"
        elif cmd in ("param", "set-vmmemory", "get-vmnetworkadapter", "set-vmbios", "write-output",
                     "add-vmscsicontroller") or cmd.startswith("$"):  # fmt: skip
            continue
        else:
            warnings.append(f"command {cmd} is not carried over")
    if name in ("$Name", "$name"):
        name = variables.get("name")
    if not name:
        raise DriverError(f"{where}: no New-VM -Name in the script")
    if memory is None:
        raise DriverError(f"{where}: no New-VM -MemoryStartupBytes in the script")
    spec = MachineSpec(
        name=name,
        cpus=cpus,
        memory=memory,
        firmware="uefi" if gen == 2 else "bios",
        secure_boot=secure and gen == 2,
        disks=[d for _, d in sorted(disks, key=lambda x: x[0])],
        nics=nics,
        os=family if family in ("linux", "windows") else None if family is None else "other",
    )
    spec.warnings = warnings
    return spec


PLATFORM = Hyperv()
