"""Xen: an xl.cfg(5) for an HVM guest (`xl create NAME.cfg`), and its reader.

Disks are named xvdX: in an HVM guest the first four are also emulated as IDE, so the
guest boots without PV drivers and switches to xen-blkfront once it has them (hdX and sdX
name purely emulated IDE and SCSI disks). NICs are emulated e1000 (or rtl8139) with the
same fallback to xen-netfront. UEFI is OVMF (`bios = "ovmf"`). Windows gets `viridian`,
the Hyper-V enlightenments Windows uses for timers and spinlocks under Xen; for other
guests the OS family is kept in a comment the reader understands.
"""

from __future__ import annotations

import os
import re
from typing import Any

from . import checklist, sourcepath
from .errors import DriverError
from .machine import DiskSpec, MachineSpec, NicSpec
from .platform import DiskTarget, Platform, disk_location

MAX_CFG = 1 << 20
DEFAULT_BRIDGE = "xenbr0"
_PREFIX = {"ide": "xvd", "scsi": "sd"}
_FORMATS = {"raw": "raw", "qcow2": "qcow2", "vpc": "vhd"}
_OS_COMMENT = re.compile(r"^#\s*p2v-os:\s*(\w+)\s*$", re.M)


def _letters(index: int) -> str:
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return letters


def _quote(value: str) -> str:
    if '"' in value or "\n" in value or "\\" in value:
        raise DriverError(f"xen: {value!r} cannot be written in xl.cfg (quote or backslash)")
    return f'"{value}"'


class Xen(Platform):
    name = "xen"
    title = "Xen (xl, HVM)"
    disk = DiskTarget("raw")
    formats = ("raw", "qcow2", "vpc")
    buses = ("ide", "scsi")
    nic_models = ("e1000", "rtl8139")
    secure_boot = False
    default_network = DEFAULT_BRIDGE

    def definition_path(self, spec: MachineSpec, outdir: str) -> str:
        return os.path.join(outdir, f"{self.stem(spec)}.cfg")

    def render(self, spec: MachineSpec, outdir: str) -> bytes:
        return xl_cfg(spec, outdir).encode("utf-8")

    # an HVM Linux guest with the PV drivers unplugs the emulated disk and NIC and uses
    # xen-blkfront/xen-netfront (xvda, eth0); the emulated drivers stay as the fallback
    disk_drivers = {
        "ide": ("xen_blkfront", "ata_piix"),
        "scsi": ("xen_blkfront", "sym53c8xx"),
    }
    nic_drivers = {"e1000": ("xen_netfront", "e1000"), "rtl8139": ("xen_netfront", "8139cp")}

    def interface_names(self, spec: MachineSpec) -> tuple[str, ...]:
        return tuple(f"eth{i}" for i in range(len(spec.nics)))

    def checklist(self, source: MachineSpec, target: MachineSpec) -> list[str]:
        out = checklist.common(source, target)
        if target.os in (None, "linux"):
            out.append(
                "Linux guests: xen-blkfront and xen-netfront in the initramfs let the guest use "
                "PV devices; without them it runs on the emulated IDE disk and e1000 NIC"
            )
        if target.os in (None, "windows"):
            out.append("Windows guests: install the Xen PV drivers after the first boot")
        if source.secure_boot:
            out.append("Secure Boot is not offered by xl's OVMF: the guest boots without it")
        out.append(
            f"start with: xl create {self.stem(target)}.cfg (bridge {DEFAULT_BRIDGE} unless the NIC names one)"
        )
        return out


def xl_cfg(spec: MachineSpec, outdir: str) -> str:
    disks = []
    counters: dict[str, int] = {}
    for d in spec.disks:
        bus = d.bus or "ide"
        if bus not in _PREFIX:
            raise DriverError(f"xen: no {bus} disk bus in an HVM guest (ide, scsi)")
        fmt = _FORMATS.get(d.format or "raw")
        if fmt is None:
            raise DriverError(f"xen: disks in {d.format} format are not usable (raw, qcow2, vhd)")
        prefix = _PREFIX[bus]
        index = counters.get(prefix, 0)
        counters[prefix] = index + 1
        target = disk_location(d.path, outdir)
        if "," in target:
            raise DriverError(
                f"xen: disk path {target} contains a comma, which xl.cfg cannot quote"
            )
        # target= must come last: everything after it is the path
        disks.append(f"format={fmt}, vdev={prefix}{_letters(index)}, access=rw, target={target}")
    vifs = []
    for n in spec.nics:
        parts = []
        if n.mac:
            parts.append(f"mac={n.mac}")
        parts.append(f"bridge={n.network or DEFAULT_BRIDGE}")
        parts.append(f"model={n.model or 'e1000'}")
        vifs.append(", ".join(parts))
    lines = [
        f"# Made by p2v: start with `xl create {os.path.basename(Xen().definition_path(spec, outdir))}`",
        f"# p2v-os: {spec.os or 'other'}",
        f"name = {_quote(spec.name)}",
        'type = "hvm"',
        f"memory = {spec.memory_mib}",
        f"maxmem = {spec.memory_mib}",
        f"vcpus = {spec.cpus}",
        f'bios = "{"ovmf" if spec.firmware == "uefi" else "seabios"}"',
    ]
    if spec.os == "windows":
        lines.append("viridian = 1")
        lines.append("localtime = 1")
    lines.append("disk = [ " + ", ".join(_quote(x) for x in disks) + " ]")
    lines.append("vif = [ " + ", ".join(_quote(x) for x in vifs) + " ]")
    lines += ['boot = "c"', 'serial = "pty"', "vnc = 1", 'vnclisten = "127.0.0.1"',
              'on_poweroff = "destroy"', 'on_reboot = "restart"', 'on_crash = "destroy"']  # fmt: skip
    return "\n".join(lines) + "\n"


# -- reading: xl.cfg is `KEY = VALUE` with strings, numbers and [lists] ---------------

_TOKENS = re.compile(
    r"""(?P<ws>[ \t\r]+) | (?P<comment>\#[^\n]*) | (?P<nl>[\n;]) |
        "(?P<dq>[^"\n]*)" | '(?P<sq>[^'\n]*)' |
        (?P<num>0x[0-9a-fA-F]+|\d+) | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*) |
        (?P<punct>[=\[\],])""",
    re.X,
)


def _tokens(text: str, where: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        m = _TOKENS.match(text, pos)
        if not m:
            line = text.count("\n", 0, pos) + 1
            raise DriverError(f"{where}: line {line}: cannot read {text[pos : pos + 30]!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind in ("ws", "comment"):
            continue
        if kind in ("dq", "sq"):
            out.append(("str", m.group(kind)))
        elif kind == "num":
            out.append(("num", int(m.group(kind), 0)))
        elif kind == "nl":
            out.append(("nl", None))
        else:
            out.append((kind, m.group(kind)))
    out.append(("nl", None))
    return out


def parse_xl_text(text: str, where: str) -> dict[str, Any]:
    toks = _tokens(text, where)
    out: dict[str, Any] = {}
    i = 0

    def expect_value(j: int) -> tuple[Any, int]:
        kind, val = toks[j]
        if kind in ("str", "num"):
            return val, j + 1
        if (kind, val) == ("punct", "["):
            items: list[Any] = []
            j += 1
            while True:
                while toks[j][0] == "nl":
                    j += 1
                if toks[j] == ("punct", "]"):
                    return items, j + 1
                if len(items) > 256:
                    raise DriverError(f"{where}: list of more than 256 items")
                v, j = expect_value(j)
                items.append(v)
                while toks[j][0] == "nl":
                    j += 1
                if toks[j] == ("punct", ","):
                    j += 1
                elif toks[j] != ("punct", "]"):
                    raise DriverError(f"{where}: expected ',' or ']' in a list")
        raise DriverError(f"{where}: expected a value, found {val!r}")

    while i < len(toks):
        kind, val = toks[i]
        if kind == "nl":
            i += 1
            continue
        if kind != "ident" or toks[i + 1] != ("punct", "="):
            raise DriverError(f"{where}: expected 'KEY = VALUE', found {val!r}")
        value, i = expect_value(i + 2)
        if toks[i][0] != "nl":
            raise DriverError(f"{where}: unexpected {toks[i][1]!r} after {val}")
        out[val] = value
    return out


def _spec_parts(text: str) -> dict[str, str]:
    """'format=raw, vdev=xvda, target=/a,b' -> dict; target takes the rest of the line."""
    out: dict[str, str] = {}
    rest = text
    while rest:
        rest = rest.lstrip(" ,")
        if not rest:
            break
        if rest.startswith("target="):
            out["target"] = rest[len("target=") :]
            break
        item, _, rest = rest.partition(",")
        key, eq, value = item.strip().partition("=")
        out[key.strip()] = value.strip() if eq else ""
    return out


def _disk(entry: str, base_dir: str, where: str) -> DiskSpec | None:
    if "=" not in entry.split(",")[0]:
        # the positional forms: TARGET,FORMAT,VDEV,ACCESS or the older TARGET,VDEV,ACCESS
        # whose TARGET may carry a 'file:', 'phy:' or format prefix
        parts = [p.strip() for p in entry.split(",")]
        if len(parts) >= 4:
            target, fmt, vdev = parts[0], parts[1], parts[2]
        else:
            padded = [*parts, "", ""]
            target, vdev, fmt = padded[0], padded[1], ""
        if ":" in target and not target.startswith("/"):
            prefix, target = target.split(":", 1)
            fmt = fmt or (
                {"file": "raw", "phy": "raw", "aio": "raw", "tap": "raw"}.get(prefix, prefix)
            )
        parts_d = {"target": target, "format": fmt or "raw", "vdev": vdev}
    else:
        parts_d = _spec_parts(entry)
    vdev = parts_d.get("vdev", "")
    if "cdrom" in parts_d or parts_d.get("devtype") == "cdrom" or vdev.endswith(":cdrom"):
        return None
    path = parts_d.get("target")
    if not path:
        raise DriverError(f"{where}: disk {entry!r} has no target")
    bus = "scsi" if vdev.startswith("sd") else "ide"
    disk_fmt = {"raw": "raw", "qcow2": "qcow2", "vhd": "vpc", "qcow": None}.get(
        parts_d.get("format", "raw")
    )
    return DiskSpec(
        sourcepath.resolve(path, base_dir, allow_absolute=True, where=where), disk_fmt, bus
    )


def read_xl(path: str) -> MachineSpec:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CFG + 1)
    except OSError as exc:
        raise DriverError(f"{path}: {exc.strerror}") from exc
    if len(raw) > MAX_CFG:
        raise DriverError(f"{path}: too large for an xl.cfg")
    text = raw.decode("utf-8", errors="replace")
    return parse_xl(text, os.path.dirname(os.path.abspath(path)), where=path)


def parse_xl(text: str, base_dir: str, *, where: str = "xl.cfg") -> MachineSpec:
    cfg = parse_xl_text(text, where)
    warnings: list[str] = []
    consumed = {"name", "type", "builder", "memory", "maxmem", "vcpus", "maxvcpus", "bios",
                "firmware", "disk", "vif", "viridian", "boot", "serial", "vnc", "vnclisten",
                "on_poweroff", "on_reboot", "on_crash", "localtime"}  # fmt: skip
    kind = cfg.get("type") or ("hvm" if cfg.get("builder") == "hvm" else "pv")
    if kind != "hvm":
        raise DriverError(f"{where}: a {kind} guest; only HVM guests are converted")
    name = cfg.get("name")
    memory = cfg.get("memory")
    if not isinstance(name, str) or not isinstance(memory, int):
        raise DriverError(f"{where}: name and memory must be given")
    disks: list[DiskSpec] = []
    dropped = 0
    for entry in cfg.get("disk") or []:
        if not isinstance(entry, str):
            raise DriverError(f"{where}: disk entries must be strings")
        d = _disk(entry, base_dir, where)
        if d is None:
            dropped += 1
        else:
            disks.append(d)
    if dropped:
        warnings.append(f"{dropped} CD drive(s) not carried over")
    nics: list[NicSpec] = []
    for entry in cfg.get("vif") or []:
        parts = _spec_parts(str(entry))
        model = parts.get("model")
        if model not in (None, "e1000", "rtl8139"):
            warnings.append(f"vif model {model} is not known; the target's default is used")
            model = None
        nics.append(NicSpec(parts.get("mac") or None, model, parts.get("bridge") or None))
    bios = str(cfg.get("bios") or cfg.get("firmware") or "seabios").lower()
    m = _OS_COMMENT.search(text)
    family = m.group(1) if m else None
    if cfg.get("viridian"):
        family = "windows"
    others = sorted(set(cfg) - consumed)
    if others:
        warnings.append("settings not carried over: " + ", ".join(others))
    vcpus = cfg.get("vcpus", 1)
    if not isinstance(vcpus, int):
        raise DriverError(f"{where}: vcpus must be a number")
    spec = MachineSpec(
        name=name,
        cpus=vcpus,
        memory=memory << 20,
        firmware="uefi" if bios in ("ovmf", "uefi") else "bios",
        disks=disks,
        nics=nics,
        os=family if family in ("linux", "windows", "other") else None,
    )
    spec.warnings = warnings
    return spec


PLATFORM = Xen()
