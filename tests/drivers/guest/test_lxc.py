"""`--to lxc`: a machine's Linux guest as an LXC container. The configuration is read back
by LXC's own parser; server (a), a real Debian 12 built from Debian packages, becomes a
container that `lxc-start` runs, whose hostname answers, whose eth0 gets an address from
a DHCP server on a bridge the test creates (no uplink), and whose sshd lets root in."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from drivers.guest import lxc
from drivers.guest.inspection import Inspection
from drivers.machine import DiskSpec, MachineSpec, NicSpec
from tests.external import need_root, need_tool, p2v, run

MiB = 1 << 20

FSTAB = """# /etc/fstab: static file system information.
UUID=0a1b2c3d-aaaa-bbbb-cccc-000000000001 /      ext4 errors=remount-ro 0 1
/dev/sda2       /home  ext4    defaults        0       2
LABEL=data      /srv   xfs     defaults        0       2
/dev/mapper/vg-swap none swap sw 0 0
/swapfile       none   swap    sw              0       0
tmpfs           /scratch tmpfs size=64m        0       0
nfs1:/export    /mnt/nfs nfs   ro              0       0
/srv/www        /var/www none  bind            0       0
"""


def test_fstab_drops_the_disks_own_mounts_and_swap_and_keeps_the_rest():
    new, dropped = lxc.fstab_for_container(FSTAB, {"/", "/home", "/srv"})
    active = [ln.split()[1] for ln in new.splitlines() if ln and not ln.startswith("#")]
    assert active == ["/scratch", "/mnt/nfs", "/var/www"]
    assert len(dropped) == 5 and "dropped the mount of /dev/sda2 on /home (ext4)" in dropped
    # dropped lines stay, commented, so the admin sees what the machine had
    assert "# /dev/sda2       /home" in new
    assert lxc.fstab_for_container(new, set()) == (new, [])


def _spec(**kw) -> MachineSpec:
    base = dict(name="web1", cpus=3, memory=768 * MiB, disks=[DiskSpec("/x.img", "raw")],
                nics=[NicSpec(), NicSpec()], os="linux")  # fmt: skip
    return MachineSpec(**(base | kw))


def _found() -> Inspection:
    return Inspection(images=["/x.img"], os_family="linux", distribution="debian",
                      version="12.5", architecture="x86_64")  # fmt: skip


@pytest.mark.parametrize("cgroup", ["v1", "v2"])
def test_config_is_read_back_by_lxc(tmp_path, cgroup):
    """lxc-info -c asks LXC's own parser for each key (and the include must exist)."""
    need_tool("lxc-info")
    text = lxc.config_text(
        _spec(), _found(), rootfs_path="/var/lib/lxc/web1/rootfs", bridge="br-test",
        cgroup=cgroup, hwaddrs=["00:16:3e:00:00:01", "00:16:3e:00:00:02"],
    )  # fmt: skip
    (tmp_path / "web1").mkdir()
    (tmp_path / "web1" / "config").write_text(text)

    def key(k: str) -> str:
        res = run(["lxc-info", "-n", "web1", "-P", str(tmp_path), "-c", k])
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().partition(" = ")[2]

    assert key("lxc.uts.name") == "web1"
    assert key("lxc.rootfs.path").removeprefix("dir:") == "/var/lib/lxc/web1/rootfs"
    assert key("lxc.arch") in ("amd64", "x86_64")
    if cgroup == "v2":
        assert key("lxc.cgroup2.memory.max") == str(768 * MiB)
        assert key("lxc.cgroup2.cpu.max") == "300000 100000"
    else:
        assert key("lxc.cgroup.memory.limit_in_bytes") == str(768 * MiB)
        assert key("lxc.cgroup.cpu.cfs_quota_us") == "300000"
    for i in (0, 1):
        assert key(f"lxc.net.{i}.type") == "veth"
        assert key(f"lxc.net.{i}.link") == "br-test"
        assert key(f"lxc.net.{i}.name") == f"eth{i}"
        assert key(f"lxc.net.{i}.hwaddr") == f"00:16:3e:00:00:0{i + 1}"


def test_names_made_fit_and_bad_ones_refused():
    assert lxc.container_name("Web Server #1") == "Web-Server-1"
    assert lxc.container_name("../..") == "container"
    for bad in ("", "a/b", "-x", "x" * 64):
        with pytest.raises(lxc.GuestError, match="container name"):
            lxc.check_name(bad)


@pytest.mark.parametrize("command", ["v2v", "v2v-ova", "convert-guest"])
def test_a_disk_without_an_os_is_one_line_and_leaves_nothing(tmp_path, command):
    need_tool("qemu-img")
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(64 * MiB)
    out = tmp_path / "out"
    if command == "v2v":
        res = p2v("v2v", "--to", "lxc", str(blank), str(out))
    elif command == "v2v-ova":
        # through an appliance: its disk is verified and unpacked into OUTDIR's staging
        # directory, which goes whatever happens
        ova = tmp_path / "blank.ova"
        assert p2v("ovf", "pack", "-o", str(ova), str(blank)).returncode == 0
        res = p2v("v2v", "--to", "lxc", str(ova), str(out))
    else:
        out.mkdir()
        res = p2v("convert-guest", "--to", "lxc", "-o", str(out), str(blank))
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no operating system" in lines[0], res.stderr
    assert os.listdir(out) == []
    assert blank.stat().st_size == 64 * MiB


# -- server (a) as a container --------------------------------------------------------------

#: what the test puts into server (a)'s overlay before converting it, so that keeping
#: owners, xattrs, ACLs and device nodes can fail; and a MAC-bound udev rule to drop
MARKS = [
    ["mkdir-p", "/srv/p2v"],
    ["touch", "/srv/p2v/owned"],
    ["chown", "12345", "54321", "/srv/p2v/owned"],
    ["setxattr", "user.p2v", "kept", "4", "/srv/p2v/owned"],
    ["touch", "/srv/p2v/acl"],
    ["acl-set-file", "/srv/p2v/acl", "access", "u::rw-,u:4242:r--,g::r--,m::r--,o::---"],
    ["mknod-c", "0620", "4", "64", "/srv/p2v/ttyS0"],
    ["write", "/etc/udev/rules.d/70-persistent-net.rules",
     'SUBSYSTEM=="net", ACTION=="add", ATTR{address}=="52:54:00:50:32:0a", NAME="ens3"\n'],
]  # fmt: skip


def _marked_overlay(image: str, tmp_path: Path, accel: str) -> Path:
    ov = tmp_path / "server-a.qcow2"
    res = run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", str(ov)])
    assert res.returncode == 0, res.stderr
    script = "".join(" ".join([cmd[0], *map(_quote, cmd[1:])]) + "\n" for cmd in MARKS)
    env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
    if accel == "tcg":
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    res = run(["guestfish", "--rw", "-a", str(ov), "-i"], input=script, env=env)
    assert res.returncode == 0, res.stderr
    return ov


def _quote(word: str) -> str:
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@contextlib.contextmanager
def _bridge_with_dhcp(tmp_path: Path):
    """A bridge with no uplink and a DHCP server on it: the container's network stays on
    this machine."""
    name = f"p2vt{os.getpid() % 100000}"
    subnet = f"10.{os.getpid() % 200 + 20}.77"
    run(["ip", "link", "del", name])
    assert run(["ip", "link", "add", name, "type", "bridge"]).returncode == 0
    dhcp = None
    try:
        for cmd in (["ip", "addr", "add", f"{subnet}.1/24", "dev", name],
                    ["ip", "link", "set", name, "up"]):  # fmt: skip
            res = run(cmd)
            assert res.returncode == 0, res.stderr
        dhcp = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--port=0", "--bind-interfaces",
             f"--interface={name}", "--except-interface=lo", f"--dhcp-range={subnet}.50,{subnet}.99",
             f"--dhcp-leasefile={tmp_path / 'leases'}", "--conf-file=/dev/null",
             f"--pid-file={tmp_path / 'dnsmasq.pid'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        yield name, subnet
    finally:
        if dhcp is not None:
            dhcp.terminate()
            dhcp.wait(timeout=30)
        run(["ip", "link", "del", name])


def _until(what: str, check, timeout: float = 600.0):
    """Poll `check` (a generous timeout: a loaded machine is slower, never red)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(2)


def test_server_a_runs_as_an_lxc_container(tmp_path):
    from tests.guests import fixtures

    need_root()
    need_tool("lxc-start", "lxc-attach", "dnsmasq", "getfacl", "guestfish", "ssh", "ip")
    server = fixtures.server("a")
    source = _marked_overlay(server.image, tmp_path, fixtures.accel())
    out = tmp_path / "out"
    with _bridge_with_dhcp(tmp_path) as (bridge, subnet):
        res = p2v("v2v", "--to", "lxc", "--name", "srva", "--cpus", "2", "--memory", "768M",
                  "--network", bridge, "--output", "json", str(source), str(out))  # fmt: skip
        assert res.returncode == 0, res.stderr
        result = json.loads(res.stdout)
        assert sorted(os.listdir(out)) == ["srva.config", "srva.rootfs.tar"]
        changed = {c["target"]: c["details"] for c in result["changes"]}
        assert "/etc/udev/rules.d/70-persistent-net.rules" in changed
        assert any("/dev/sda1 on /" in d for d in changed["/etc/fstab"])

        lxcpath = tmp_path / "lxc"
        rootfs = lxcpath / "srva" / "rootfs"
        rootfs.mkdir(parents=True)
        res = run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
                   "-xpf", result["rootfs"], "-C", str(rootfs)])  # fmt: skip
        assert res.returncode == 0, res.stderr
        _check_tree(rootfs)

        start = ["lxc-start", "-n", "srva", "-P", str(lxcpath), "-f", result["config"],
                 "-s", f"lxc.rootfs.path=dir:{rootfs}", "-l", "INFO",
                 "-o", str(tmp_path / "lxc.log")]  # fmt: skip
        res = run(start)
        assert res.returncode == 0, res.stderr + (tmp_path / "lxc.log").read_text()[-2000:]
        try:
            _check_running(lxcpath, rootfs, server, subnet, result["cgroup"], tmp_path)
        finally:
            run(["lxc-stop", "-n", "srva", "-P", str(lxcpath), "-k"], timeout=120)


def _check_tree(rootfs: Path) -> None:
    owned = rootfs / "srv/p2v/owned"
    st = owned.lstat()
    assert (st.st_uid, st.st_gid) == (12345, 54321)
    assert os.getxattr(owned, "user.p2v") == b"kept"
    acl = run(["getfacl", "-cn", str(rootfs / "srv/p2v/acl")]).stdout
    assert "user:4242:r--" in acl
    dev = (rootfs / "srv/p2v/ttyS0").lstat()
    assert stat.S_ISCHR(dev.st_mode) and (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (4, 64)
    assert (rootfs / "boot").is_dir() and os.listdir(rootfs / "boot") == []
    assert not list((rootfs / "usr/lib/modules").iterdir())
    assert (rootfs / "etc/ssh/sshd_config").exists() and (rootfs / "usr/sbin/sshd").exists()
    fstab = [ln for ln in (rootfs / "etc/fstab").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]  # fmt: skip
    assert fstab == []
    interfaces = (rootfs / "etc/network/interfaces").read_text()
    assert "iface eth0 inet dhcp" in interfaces and "ens3" not in interfaces
    assert not (rootfs / "etc/udev/rules.d/70-persistent-net.rules").exists()


def _attach(lxcpath: Path, *cmd: str) -> subprocess.CompletedProcess:
    return run(["lxc-attach", "-n", "srva", "-P", str(lxcpath), "--", *cmd], timeout=120)


def _check_running(lxcpath, rootfs, server, subnet, cgroup, tmp_path) -> None:
    hostname = (rootfs / "etc/hostname").read_text().strip()
    answered = _until("lxc-attach -- hostname", lambda: _attach(lxcpath, "hostname").stdout)
    assert answered.strip() == hostname
    # the limits the machine description gave (--cpus 2 --memory 768M), in force
    key = "memory.limit_in_bytes" if cgroup == "v1" else "memory.max"
    limit = run(["lxc-cgroup", "-n", "srva", "-P", str(lxcpath), key]).stdout.strip()
    assert limit == str(768 * MiB)
    _until("sshd in the container", lambda: _attach(lxcpath, "pgrep", "-x", "sshd").returncode == 0)

    def address():
        text = _attach(lxcpath, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        words = text.split()
        return words[words.index("inet") + 1].split("/")[0] if "inet" in words else None

    ip = _until("an address from the bridge's DHCP on eth0", address)
    assert ip.startswith(subnet + ".")
    known = tmp_path / "known_hosts"
    known.write_text(f"{ip} {server.host_key}\n")
    res = run(["ssh", "-i", server.identity, "-o", f"UserKnownHostsFile={known}",
               "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
               "-o", "ConnectTimeout=60", f"root@{ip}", "hostname"], timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == hostname


HOSTILE = {
    "fstab-symlink": ([("symlink", "/etc/fstab", "/tmp/p2v-host-marker")], "fstab: /etc/fstab"),
    "binary-interfaces": (
        [("write", "/etc/network/interfaces.d/bin", b"auto ens3\n\0\x7fELF\0\0")],
        "network: /etc/network/interfaces.d/bin in the guest is binary",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_guest_is_one_line_and_writes_nothing(case, tmp_path):
    from tests.drivers.guest.test_convert import _plant, copy_of, digest, one_line_error
    from tests.guests import fixtures

    server = fixtures.server("a")
    edits, expected = HOSTILE[case]
    marker = "/tmp/p2v-host-marker"
    with open(marker, "w") as f:
        f.write("host file\n")
    image = copy_of(server.image, str(tmp_path / "disk.qcow2"))
    _plant(image, edits)
    before = digest(image)
    out = tmp_path / "out"
    out.mkdir()
    line = one_line_error(p2v("convert-guest", "--to", "lxc", "-o", str(out), image))
    assert expected in line, line
    assert digest(image) == before
    assert os.listdir(out) == []  # no tarball, no .partial, no config, no overlay left
    with open(marker) as f:
        assert f.read() == "host file\n"
