"""Network configuration: found (ifupdown, netplan, systemd-networkd, NetworkManager,
ifcfg, udev's persistent names), and carried over to the names the NICs get on the
target, addresses (DHCP or static) untouched.

A configuration bound to a MAC the VM will not have (a platform that assigns its own, or
a definition that changed it) is rebound to the interface's new name; one bound to a MAC
the definition keeps is left alone. Each format has one pure rewrite function
(text in, text and changes out) that the tests drive directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from .appliance import Appliance
from .errors import GuestError
from .report import Report

_MAC = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")
#: the names a physical NIC has (kernel, predictable, biosdevname); not lo, br0, bond0
_PHYSICAL = re.compile(r"^(?:eth\d+|en[a-z0-9]+|em\d+|p\d+p\d+(?:_\d+)?|wl[a-z0-9]+)$")
#: at most this many files per configuration directory are looked at
MAX_FILES = 512


@dataclass
class NetworkConfig:
    system: str
    path: str
    interfaces: list[str] = field(default_factory=list)
    #: MACs the configuration is bound to
    mac_pins: list[str] = field(default_factory=list)


@dataclass
class Rename:
    """What the rewrite functions need: old name -> new name, and for a MAC binding,
    whether the VM keeps that MAC and which new name the NIC with it gets."""

    names: dict[str, str]
    kept_macs: set[str] = field(default_factory=set)
    mac_names: dict[str, str] = field(default_factory=dict)
    #: the name for a stale MAC nobody could place (one NIC: that NIC's)
    only_name: str | None = None

    def stale(self, mac: str) -> bool:
        return mac.lower() not in self.kept_macs

    def name_for_mac(self, mac: str) -> str | None:
        return self.mac_names.get(mac.lower(), self.only_name)

    def rename(self, token: str) -> str:
        """ens3 -> enp1s0, and ens3.10 / ens3:1 (VLAN, alias) along with it."""
        base, sep, rest = _split(token)
        return self.names[base] + sep + rest if base in self.names else token


def _split(token: str) -> tuple[str, str, str]:
    m = re.match(r"^([^.:]+)([.:]?)(.*)$", token)
    return (m.group(1), m.group(2), m.group(3)) if m else (token, "", "")


# -- ifupdown --------------------------------------------------------------------------
_IFUPDOWN_NAMED = re.compile(r"^\s*(?:iface|auto|allow-[\w-]+|mapping)\s")


def ifupdown_names(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        if _IFUPDOWN_NAMED.match(line):
            words = line.split()
            names += words[1:2] if words[0] in ("iface", "mapping") else words[1:]
    return _unique(names)


def rewrite_ifupdown(text: str, r: Rename) -> tuple[str, list[str]]:
    """Every word naming a renamed interface (stanzas, bridge_ports, vlan-raw-device...)."""
    out, changes = [], []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            out.append(line)
            continue
        parts = re.split(r"(\s+)", line)
        new = [p if p.isspace() or not p else r.rename(p) for p in parts]
        if new != parts:
            changes.append(f"{line.strip()} -> {''.join(new).strip()}")
        out.append("".join(new))
    return "".join(out), changes


# -- netplan ---------------------------------------------------------------------------
def _netplan(text: str, path: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise GuestError("network", f"{path} in the guest is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("network", {}), dict):
        raise GuestError("network", f"{path} in the guest is not a netplan configuration")
    return data


def netplan_names(text: str, path: str = "netplan") -> tuple[list[str], list[str]]:
    net = _netplan(text, path).get("network") or {}
    names, macs = [], []
    for key, conf in (net.get("ethernets") or {}).items():
        conf = conf if isinstance(conf, dict) else {}
        names.append(str(conf.get("set-name") or key))
        mac = (
            (conf.get("match") or {}).get("macaddress")
            if isinstance(conf.get("match"), dict)
            else None
        )
        if mac:
            macs.append(str(mac).lower())
    return _unique(names), macs


def rewrite_netplan(text: str, r: Rename, path: str = "netplan") -> tuple[str, list[str]]:
    data = _netplan(text, path)
    net = data.get("network") or {}
    changes: list[str] = []
    ethernets = net.get("ethernets") or {}
    renamed: dict[str, str] = {}
    new_eth = {}
    for key, conf in ethernets.items():
        conf = dict(conf) if isinstance(conf, dict) else {}
        match = conf.get("match") if isinstance(conf.get("match"), dict) else None
        mac = str(match.get("macaddress", "")).lower() if match else ""
        name = str(conf.get("set-name") or key)
        if mac and r.stale(mac):
            new = r.names.get(name) or r.name_for_mac(mac) or name
            conf.pop("match")
            conf.pop("set-name", None)
            changes.append(f"{key}: match on MAC {mac} (not kept) -> interface {new}")
        elif mac:
            new = key  # matched by a MAC the VM keeps: still found
        else:
            new = r.rename(str(key))
        if new != key:
            renamed[str(key)] = new
            if not mac:
                changes.append(f"{key} -> {new}")
        new_eth[new] = conf
    if not changes:
        return text, []
    net["ethernets"] = new_eth
    for kind in ("bridges", "bonds"):
        for conf in (net.get(kind) or {}).values():
            if isinstance(conf, dict) and isinstance(conf.get("interfaces"), list):
                conf["interfaces"] = [renamed.get(str(i), i) for i in conf["interfaces"]]
    for conf in (net.get("vlans") or {}).values():
        if isinstance(conf, dict) and "link" in conf:
            conf["link"] = renamed.get(str(conf["link"]), conf["link"])
    return yaml.safe_dump(data, sort_keys=False), changes


# -- systemd-networkd (.network and .link) and NetworkManager keyfiles -----------------
def ini_names(text: str, keys: tuple[str, ...]) -> tuple[list[str], list[str]]:
    names, macs = [], []
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() in keys:
            names += value.split()
        elif key.strip() in ("MACAddress", "mac-address", "PermanentMACAddress"):
            macs += [v.lower() for v in value.split()]
    return _unique(names), macs


def rewrite_networkd(text: str, r: Rename, *, link: bool = False) -> tuple[str, list[str]]:
    """[Match] Name= renamed; a [Match] MACAddress= the VM will not have becomes a match
    on the new name (.network: Name=, .link: OriginalName=, keeping its chosen Name=)."""
    out, changes = [], []
    section = ""
    for line in text.splitlines(keepends=True):
        s = line.strip()
        if s.startswith("["):
            section = s
        key, eq, value = s.partition("=")
        key = key.strip()
        if section == "[Match]" and eq and key in ("Name", "OriginalName"):
            new = " ".join(r.rename(v) for v in value.split())
            if new != value.strip():
                changes.append(f"{key}={value.strip()} -> {key}={new}")
                line = f"{key}={new}\n"
        elif section == "[Match]" and eq and key in ("MACAddress", "PermanentMACAddress"):
            macs = [v.lower() for v in value.split()]
            if all(r.stale(m) for m in macs):
                names = _unique([n for m in macs if (n := r.name_for_mac(m))])
                if names:
                    match_key = "OriginalName" if link else "Name"
                    changes.append(
                        f"{key}={value.strip()} (not kept) -> {match_key}={' '.join(names)}"
                    )
                    line = f"{match_key}={' '.join(names)}\n"
        out.append(line)
    return "".join(out), changes


def _rewrite_keys(text: str, r: Rename, name_key: str, mac_key: str) -> tuple[str, list[str]]:
    """KEY=VALUE lines: `name_key` renamed, a `mac_key` naming a MAC not kept dropped."""
    out, changes = [], []
    for line in text.splitlines(keepends=True):
        key, eq, value = line.strip().partition("=")
        value = value.strip().strip("\"'")
        if eq and key == name_key:
            new = r.rename(value)
            if new != value:
                changes.append(f"{key}={value} -> {new}")
                line = f"{key}={new}\n"
        elif eq and key == mac_key and r.stale(value.lower()):
            changes.append(f"{key}={value} (not kept) removed")
            continue
        out.append(line)
    return "".join(out), changes


def rewrite_keyfile(text: str, r: Rename) -> tuple[str, list[str]]:
    """NetworkManager: interface-name= renamed, a mac-address= not kept dropped."""
    return _rewrite_keys(text, r, "interface-name", "mac-address")


# -- ifcfg -----------------------------------------------------------------------------
def rewrite_ifcfg(text: str, r: Rename) -> tuple[str, list[str]]:
    """DEVICE= renamed, an HWADDR= not kept dropped (MACADDR=, which sets it, is kept)."""
    return _rewrite_keys(text, r, "DEVICE", "HWADDR")


# -- udev persistent names --------------------------------------------------------------
_UDEV_RULE = re.compile(r'ATTR\{address\}=="([0-9a-fA-F:]{17})".*NAME="([^"]+)"')


def rewrite_udev(text: str, r: Rename) -> tuple[str, list[str]]:
    """70-persistent-net.rules: a rule naming a NIC by a MAC the VM will not have goes."""
    out, changes = [], []
    for line in text.splitlines(keepends=True):
        m = _UDEV_RULE.search(line)
        if m and not line.lstrip().startswith("#") and r.stale(m.group(1).lower()):
            changes.append(f"rule naming {m.group(2)} by MAC {m.group(1)} (not kept) removed")
            continue
        out.append(line)
    return "".join(out), changes


# -- finding and converting --------------------------------------------------------------
#: (system, directory, file name filter)
_PLACES = (
    ("ifupdown", "/etc/network", lambda n: n == "interfaces"),
    ("ifupdown", "/etc/network/interfaces.d", lambda n: not n.startswith(".")),
    ("netplan", "/etc/netplan", lambda n: n.endswith(".yaml")),
    ("systemd-networkd", "/etc/systemd/network", lambda n: n.endswith((".network", ".link"))),
    ("NetworkManager", "/etc/NetworkManager/system-connections", lambda n: not n.startswith(".")),
    (
        "ifcfg",
        "/etc/sysconfig/network-scripts",
        lambda n: n.startswith("ifcfg-") and n != "ifcfg-lo",
    ),
    ("ifcfg", "/etc/sysconfig/network", lambda n: n.startswith("ifcfg-") and n != "ifcfg-lo"),
    ("udev", "/etc/udev/rules.d", lambda n: n.startswith("70-persistent-net")),
)


def _files(app: Appliance) -> list[tuple[str, str]]:
    found = []
    for system, directory, wanted in _PLACES:
        names = [n for n in app.listdir(directory, limit=MAX_FILES) if wanted(n)]
        found += [(system, f"{directory}/{n}") for n in names]
    return [(s, p) for s, p in found if app.g.is_file(p, followsymlinks=True)]


def _parse(system: str, path: str, text: str) -> NetworkConfig:
    if system == "ifupdown":
        return NetworkConfig(system, path, [n for n in ifupdown_names(text) if n != "lo"])
    if system == "netplan":
        names, macs = netplan_names(text, path)
        return NetworkConfig(system, path, names, macs)
    if system == "systemd-networkd":
        names, macs = ini_names(text, ("Name", "OriginalName"))
        return NetworkConfig(system, path, names, macs)
    if system == "NetworkManager":
        names, macs = ini_names(text, ("interface-name",))
        return NetworkConfig(system, path, names, macs)
    if system == "ifcfg":
        names, _ = ini_names(text.replace('"', ""), ("DEVICE",))
        macs = [
            m.group(1).lower() for m in re.finditer(r'^HWADDR="?([0-9A-Fa-f:]{17})', text, re.M)
        ]
        return NetworkConfig(system, path, names, macs)
    rules = _UDEV_RULE.findall(text)
    return NetworkConfig(system, path, [n for _, n in rules], [m.lower() for m, _ in rules])


def inspect(app: Appliance) -> list[NetworkConfig]:
    return [
        _parse(system, path, app.read_text(path, step="network")) for system, path in _files(app)
    ]


def physical_names(configs: list[NetworkConfig]) -> list[str]:
    """The physical NICs' names the configuration uses, in a stable order (ens3 < ens4)."""
    names = {n for c in configs for n in c.interfaces if _PHYSICAL.match(n)}
    return sorted(
        names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]
    )


_REWRITE: dict[str, Callable[[str, Rename], tuple[str, list[str]]]] = {
    "ifupdown": rewrite_ifupdown,
    "NetworkManager": rewrite_keyfile,
    "ifcfg": rewrite_ifcfg,
    "udev": rewrite_udev,
}


def convert(app: Appliance, configs: list[NetworkConfig], r: Rename, report: Report) -> None:
    """Rewrite every configuration file for the new names; ifcfg files are renamed too."""
    for c in configs:
        text = app.read_text(c.path, step="network")
        if c.system == "netplan":
            new, changes = rewrite_netplan(text, r, c.path)
        elif c.system == "systemd-networkd":
            new, changes = rewrite_networkd(text, r, link=c.path.endswith(".link"))
        else:
            new, changes = _REWRITE[c.system](text, r)
        if new == text:
            continue
        app.write_text(c.path, new, step="network")
        path = c.path
        if c.system == "ifcfg":
            directory, _, name = path.rpartition("/")
            renamed = f"{directory}/ifcfg-{r.rename(name[len('ifcfg-') :])}"
            if renamed != path and not app.exists(renamed):
                app.g.mv(path, renamed)
                changes.append(f"renamed to {renamed}")
        report.file(path, changes)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
