"""network.py: each configuration format carried to the target's interface names."""

from __future__ import annotations

import yaml
from hypothesis import given
from hypothesis import strategies as st

from drivers.guest import network

OLD_MAC = "52:54:00:aa:bb:01"
R = network.Rename(
    {"ens3": "enp1s0"}, kept_macs=set(), mac_names={OLD_MAC: "enp1s0"}, only_name="enp1s0"
)
KEEP = network.Rename({"ens3": "enp1s0"}, kept_macs={OLD_MAC}, only_name="enp1s0")

IFUPDOWN = """# The loopback network interface
auto lo
iface lo inet loopback

allow-hotplug ens3
iface ens3 inet static
    address 192.0.2.10/24
    gateway 192.0.2.1
auto ens3.10
iface ens3.10 inet dhcp
    vlan-raw-device ens3
# ens3 in a comment stays
"""


def test_ifupdown_stanzas_renamed_addresses_kept():
    new, changes = network.rewrite_ifupdown(IFUPDOWN, R)
    assert "allow-hotplug enp1s0\niface enp1s0 inet static\n    address 192.0.2.10/24" in new
    assert "iface enp1s0.10 inet dhcp\n    vlan-raw-device enp1s0\n" in new
    assert "# ens3 in a comment stays" in new and "iface lo inet loopback" in new
    assert network.ifupdown_names(IFUPDOWN) == ["lo", "ens3", "ens3.10"]
    assert len(changes) == 5


@given(
    st.lists(
        st.sampled_from(["ens3", "ens30", "xens3", "ens3:1", "lo", "eth0", "inet", "\n", " "]),
        max_size=30,
    )
)
def test_ifupdown_renames_whole_names_only(words):
    text = "iface " + " ".join(words) + "\n"
    new, _ = network.rewrite_ifupdown(text, R)
    assert new.split() == ["iface", *[R.rename(w) for w in text.split()[1:]]]
    assert "ens30" not in text or ("ens30" in new and "xens3" not in text) or "xens3" in new


def test_netplan_key_renamed_and_stale_mac_match_dropped():
    text = yaml.safe_dump({"network": {"version": 2, "ethernets": {"ens3": {"dhcp4": True}}}})
    new, _ = network.rewrite_netplan(text, R)
    assert yaml.safe_load(new)["network"]["ethernets"] == {"enp1s0": {"dhcp4": True}}
    pinned = {
        "network": {
            "ethernets": {
                "lan": {
                    "match": {"macaddress": OLD_MAC},
                    "set-name": "lan",
                    "addresses": ["192.0.2.5/24"],
                }
            },
            "bridges": {"br0": {"interfaces": ["lan"]}},
        }
    }
    new, _ = network.rewrite_netplan(yaml.safe_dump(pinned), R)
    data = yaml.safe_load(new)["network"]
    assert data["ethernets"] == {"enp1s0": {"addresses": ["192.0.2.5/24"]}}
    assert data["bridges"]["br0"]["interfaces"] == ["enp1s0"]
    # the MAC is kept: the match still finds the NIC, nothing to change
    assert network.rewrite_netplan(yaml.safe_dump(pinned), KEEP) == (yaml.safe_dump(pinned), [])


def test_networkd_match_by_mac_and_name():
    text = "[Match]\nMACAddress=52:54:00:AA:BB:01\n\n[Network]\nDHCP=yes\n"
    new, changes = network.rewrite_networkd(text, R)
    assert new == "[Match]\nName=enp1s0\n\n[Network]\nDHCP=yes\n" and changes
    assert network.rewrite_networkd(text, KEEP) == (text, [])
    new, _ = network.rewrite_networkd("[Match]\nName=ens3\n[Network]\nAddress=192.0.2.4/24\n", R)
    assert new == "[Match]\nName=enp1s0\n[Network]\nAddress=192.0.2.4/24\n"
    link = "[Match]\nMACAddress=52:54:00:aa:bb:01\n[Link]\nName=lan0\n"
    new, _ = network.rewrite_networkd(link, R, link=True)
    assert new == "[Match]\nOriginalName=enp1s0\n[Link]\nName=lan0\n"
    # Name= outside [Match] (a .netdev's own name) is not an interface match
    assert network.rewrite_networkd("[NetDev]\nName=ens3\n", R)[0] == "[NetDev]\nName=ens3\n"


def test_keyfile_ifcfg_and_udev():
    nm = "[connection]\nid=Wired\ninterface-name=ens3\n[ethernet]\nmac-address=52:54:00:AA:BB:01\n[ipv4]\nmethod=auto\n"
    new, _ = network.rewrite_keyfile(nm, R)
    assert new == "[connection]\nid=Wired\ninterface-name=enp1s0\n[ethernet]\n[ipv4]\nmethod=auto\n"
    ifcfg = 'DEVICE="ens3"\nHWADDR=52:54:00:aa:bb:01\nBOOTPROTO=dhcp\n'
    new, _ = network.rewrite_ifcfg(ifcfg, R)
    assert new == "DEVICE=enp1s0\nBOOTPROTO=dhcp\n"
    rules = 'SUBSYSTEM=="net", ACTION=="add", ATTR{address}=="52:54:00:aa:bb:01", NAME="eth0"\n'
    assert network.rewrite_udev(rules, R)[0] == ""
    assert network.rewrite_udev(rules, KEEP)[0] == rules


def test_physical_names_in_order():
    configs = [
        network.NetworkConfig(
            "ifupdown", "/etc/network/interfaces", ["lo", "ens10", "ens3", "br0", "ens3.10"]
        )
    ]
    assert network.physical_names(configs) == ["ens3", "ens10"]
