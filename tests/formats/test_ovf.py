"""OVF descriptors, manifests and OVA archives, checked against GNU tar, Python's tarfile,
sha256sum and qemu-img; hostile appliances refused with nothing written outside DIR."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import formats
from formats import ovf
from formats.errors import CorruptImage, FormatError, UnsafeImage, UnsupportedFeature
from formats.ovf import descriptor, manifest, ustar
from tests.external import need_tool, qemu_img, run

MiB = 1 << 20

MACHINE = {
    "name": "web1",
    "cpus": 2,
    "memory": 2 << 30,
    "firmware": "uefi",
    "secure_boot": True,
    "os": "linux",
    "disks": [
        {"path": "web1-disk1.vmdk", "format": "vmdk", "subformat": "streamOptimized",
         "bus": "scsi", "size": 10 << 30, "file_size": 12345, "populated_size": 4096},
        {"path": "web1-disk2.vmdk", "format": "vmdk", "subformat": "streamOptimized",
         "bus": "sata", "size": 1 << 30, "file_size": 99},
    ],
    "nics": [
        {"mac": "52:54:00:12:34:56", "model": "vmxnet3", "network": "VM Network"},
        {"mac": "52:54:00:12:34:57", "model": "e1000", "network": "backend"},
    ],
}  # fmt: skip


def _machine_fields(m):
    return {
        "name": m["name"],
        "cpus": m["cpus"],
        "memory": m["memory"],
        "firmware": m["firmware"],
        "secure_boot": m["secure_boot"],
        "os": m["os"],
        "disks": [(d["path"], d["format"], d["bus"], d["size"]) for d in m["disks"]],
        "nics": [(n["mac"], n["model"], n["network"]) for n in m["nics"]],
    }


# -- descriptor -----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_descriptor_round_trips(version):
    data = descriptor.build(MACHINE, version=version)
    parsed = descriptor.parse(data)
    assert parsed.version == version
    assert parsed.system_type == "vmx-11"
    assert _machine_fields(parsed.machine) == _machine_fields(MACHINE)
    assert [f["size"] for f in parsed.files] == [12345, 99]
    assert parsed.machine["disks"][0]["populated_size"] == 4096
    assert parsed.warnings == []


def test_descriptor_uses_interop_resource_types_and_plain_items():
    text = descriptor.build(MACHINE, version="2.0").decode()
    # INTEROP.md: StorageItem / EthernetPortItem break VMware Workstation
    assert "StorageItem" not in text and "EthernetPortItem" not in text
    root = descriptor.parse_xml(text.encode())
    types = [el.text for el in root.iter() if el.tag.endswith("}ResourceType")]
    assert types == ["3", "4", "6", "20", "17", "17", "10", "10"]
    assert 'xmlns="http://schemas.dmtf.org/ovf/envelope/2"' in text
    assert 'vmw:key="firmware" vmw:value="efi"' in text


def test_descriptor_rasd_children_are_in_schema_order():
    # the CIM schema's xs:sequence is alphabetical; ovftool validates it
    root = descriptor.parse_xml(descriptor.build(MACHINE))
    for item in root.iter("{http://schemas.dmtf.org/ovf/envelope/1}Item"):
        names = [c.tag.rsplit("}", 1)[1] for c in item]
        assert names == sorted(names)


def test_descriptor_reads_foreign_units_and_warns_about_devices():
    text = descriptor.build(MACHINE).decode()
    text = text.replace("<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
                        "<rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>")  # fmt: skip
    cd = (
        "<Item><rasd:ElementName>CD</rasd:ElementName><rasd:InstanceID>99</rasd:InstanceID>"
        "<rasd:ResourceType>15</rasd:ResourceType></Item>"
    )
    text = text.replace("<vmw:Config", cd + "<vmw:Config", 1)
    text = text.replace(
        "</VirtualSystem>", "<ProductSection><Info>x</Info></ProductSection></VirtualSystem>"
    )
    parsed = descriptor.parse(text.encode())
    assert parsed.machine["memory"] == 2 << 30
    assert "1 CD drive not carried over" in parsed.warnings
    assert "ProductSection is not carried over" in parsed.warnings


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda t: t.replace("<Envelope", "<Envelop", 1).replace("</Envelope>", "</Envelop>"), CorruptImage),
        (lambda t: t[:-40], CorruptImage),  # malformed XML
        (lambda t: t.replace('ovf:href="web1-disk1.vmdk"', 'ovf:href="../../etc/passwd"'), UnsafeImage),
        (lambda t: t.replace('ovf:href="web1-disk1.vmdk"', 'ovf:href="/etc/passwd"'), UnsafeImage),
        (lambda t: t.replace('ovf:href="web1-disk1.vmdk"', 'ovf:href="http://evil/x"'), UnsafeImage),
        (lambda t: t.replace('ovf:capacity="10737418240"', 'ovf:capacity="${disksize}"'), UnsupportedFeature),
        (lambda t: t.replace('ovf:capacity="10737418240"', 'ovf:capacity="99999999999999999999"'), CorruptImage),
        (lambda t: t.replace("<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>",
                             "<rasd:VirtualQuantity>999999999999</rasd:VirtualQuantity>"), CorruptImage),
        (lambda t: t.replace('ovf:fileRef="file1"', 'ovf:fileRef="nope"'), CorruptImage),
    ],
)  # fmt: skip
def test_descriptor_refuses_bad_input(mutate, error):
    text = descriptor.build(MACHINE).decode()
    with pytest.raises(error):
        descriptor.parse(mutate(text).encode())


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE Envelope [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References>&d;</References></Envelope>
"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">&x;</Envelope>
"""


@pytest.mark.parametrize("bomb", [BILLION_LAUGHS, EXTERNAL_ENTITY])
def test_descriptor_bombs_are_refused(bomb):
    with pytest.raises(UnsafeImage, match="refused"):
        descriptor.parse(bomb)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_descriptor_parser_raises_only_format_errors(data):
    try:
        descriptor.parse(data)
    except FormatError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 16), st.binary(min_size=0, max_size=8)), max_size=6))
def test_mutated_descriptors_raise_only_format_errors(edits):
    data = bytearray(descriptor.build(MACHINE))
    for at, chunk in edits:
        at %= len(data)
        data[at : at + len(chunk)] = chunk
    try:
        parsed = descriptor.parse(bytes(data))
    except FormatError:
        return
    assert isinstance(parsed.machine["memory"], int)


# -- manifest -------------------------------------------------------------------------


def test_manifest_line_format_is_exact():
    digest = hashlib.sha256(b"x").hexdigest()
    assert manifest.build([("a.ovf", digest)]) == f"SHA256(a.ovf)= {digest}\n".encode()
    sha1 = hashlib.sha1(b"x").hexdigest()
    assert manifest.build([("a.ovf", sha1)], "sha1") == f"SHA1(a.ovf)= {sha1}\n".encode()
    names = ["a.ovf", "disk-1.vmdk"]
    assert manifest.size(names, "sha256") == len(manifest.build([(n, digest) for n in names]))


def test_manifest_parse_strict():
    d = "ab" * 32
    parsed = manifest.parse(f"SHA256(a.ovf)= {d}\r\nSHA1(b.vmdk)= {'cd' * 20}\n".encode())
    assert parsed["a.ovf"].digest == d and parsed["b.vmdk"].algorithm == "sha1"
    for bad in (f"SHA256(a)= {d[:-2]}", "MD5(a)= 00", f"SHA256(a)= {d}\nSHA256(a)= {d}", "junk"):
        with pytest.raises(CorruptImage):
            manifest.parse(bad.encode())


# -- the tar container ----------------------------------------------------------------


def _write_small_ova(tmp_path, names=("disk1.vmdk", "disk2.vmdk"), digest="sha256"):
    files = []
    for i, n in enumerate(names):
        p = tmp_path / f"src-{n}"
        p.write_bytes(os.urandom(1000 + 777 * i))
        files.append((n, str(p)))
    out = str(tmp_path / "a.ova")
    size, digests = ovf.write_ova(out, "a.ovf", b"<Envelope/>", files, digest=digest)
    return out, size, digests, files


def test_ova_member_order_and_manifest_verify_with_gnu_tools(tmp_path):
    need_tool("tar", "sha256sum")
    out, size, _digests, files = _write_small_ova(tmp_path)
    assert os.path.getsize(out) == size
    listing = run(["tar", "tf", out]).stdout.split()
    assert listing == ["a.ovf", "a.mf", "disk1.vmdk", "disk2.vmdk"]
    x = tmp_path / "x"
    x.mkdir()
    assert run(["tar", "xf", out, "-C", str(x)]).returncode == 0
    lines = (x / "a.mf").read_text().splitlines()
    assert all(line.startswith("SHA256(") and ")= " in line for line in lines)
    # sha256sum -c reads "HEX  NAME": the manifest's digests must verify that way
    check = "".join(f"{line.split('= ')[1]}  {line[7 : line.index(')')]}\n" for line in lines)
    res = subprocess.run(
        ["sha256sum", "-c", "-"], input=check, text=True, cwd=x, capture_output=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for name, src in files:
        assert (x / name).read_bytes() == Path(src).read_bytes()


def test_ova_is_ustar_for_python_tarfile(tmp_path):
    out, *_ = _write_small_ova(tmp_path, digest="sha1")
    with tarfile.open(out, "r:") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["a.ovf", "a.mf", "disk1.vmdk", "disk2.vmdk"]
        assert tf.extractfile("a.mf").read().startswith(b"SHA1(a.ovf)= ")
    with open(out, "rb") as f:
        assert f.read(512)[257:263] == b"ustar\0"


def test_our_reader_reads_gnu_and_pax_archives(tmp_path):
    need_tool("tar")
    src = tmp_path / "d"
    src.mkdir()
    long_name = "x" * 120 + ".vmdk"
    (src / "a.ovf").write_bytes(b"1")
    (src / long_name).write_bytes(b"22")
    for fmt in ("ustar", "gnu", "pax"):
        names = ["a.ovf", long_name] if fmt != "ustar" else ["a.ovf"]
        out = tmp_path / f"{fmt}.tar"
        assert (
            run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(src), *names]).returncode == 0
        )
        members = ustar.read_members(str(out))
        assert [m.name for m in members] == names
        with open(out, "rb") as f:
            f.seek(members[-1].offset)
            assert f.read(members[-1].size) == (src / names[-1]).read_bytes()


def test_large_member_sizes_use_base256():
    block = ustar.header("big.vmdk", 9 << 30)
    info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
    assert info.size == 9 << 30
    assert ustar._number(block[124:136], "size", 0) == 9 << 30


def _tar_with(tmp_path, build) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        build(tf)
    path = tmp_path / "hostile.ova"
    path.write_bytes(buf.getvalue())
    return str(path)


def _add(tf, name, data=b"x", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if info.isreg() else None)


def _pack_descriptor(name="a.ovf", disk="disk.vmdk", disk_size=1):
    m = dict(MACHINE, disks=[dict(MACHINE["disks"][0], path=disk, file_size=disk_size)])
    return descriptor.build(m)


HOSTILE = {
    "traversal": lambda tf: (_add(tf, "a.ovf", _pack_descriptor()), _add(tf, "../evil.vmdk")),
    "absolute": lambda tf: (_add(tf, "a.ovf", _pack_descriptor()), _add(tf, "/tmp/evil.vmdk")),
    "symlink": lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()),
        _add(tf, "disk.vmdk", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    ),
    "hardlink": lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()),
        _add(tf, "disk.vmdk", b"", type=tarfile.LNKTYPE, linkname="a.ovf"),
    ),
    "device": lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()),
        _add(tf, "disk.vmdk", b"", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
    ),
    "billion-laughs": lambda tf: _add(tf, "a.ovf", BILLION_LAUGHS),
    "wrong-digest": lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()),
        _add(
            tf,
            "a.mf",
            manifest.build(
                [
                    ("a.ovf", hashlib.sha256(_pack_descriptor()).hexdigest()),
                    ("disk.vmdk", hashlib.sha256(b"y").hexdigest()),
                ]
            ),
        ),
        _add(tf, "disk.vmdk", b"x"),
    ),
    "wrong-descriptor-digest": lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()),
        _add(tf, "a.mf", manifest.build([("a.ovf", "0" * 64), ("disk.vmdk", "0" * 64)])),
        _add(tf, "disk.vmdk", b"x"),
    ),
    "wrong-size": lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor(disk_size=5)),
        _add(tf, "disk.vmdk", b"x"),
    ),
    "missing-disk": lambda tf: _add(tf, "a.ovf", _pack_descriptor()),
    "unlisted-in-manifest": lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()),
        _add(
            tf, "a.mf", manifest.build([("a.ovf", hashlib.sha256(_pack_descriptor()).hexdigest())])
        ),
        _add(tf, "disk.vmdk", b"x"),
    ),
    "two-descriptors": lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()),
        _add(tf, "b.ovf", b"<x/>"),
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_ova_refused_and_nothing_written_outside(tmp_path, case):
    ova = _tar_with(tmp_path, HOSTILE[case])
    box = tmp_path / "box"
    box.mkdir()
    target = box / "out"
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(box))
    with pytest.raises(FormatError) as info:
        ovf.unpack(ova, str(target))
    assert "\n" not in str(info.value)
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(box))) in (
        before,
        (before[0], ["out"]),
    )
    if target.exists():
        assert os.listdir(target) == []
    assert not os.path.exists("/tmp/evil.vmdk")


def test_truncated_and_corrupt_headers(tmp_path):
    out, *_ = _write_small_ova(tmp_path)
    data = bytearray(Path(out).read_bytes())
    cut = tmp_path / "cut.ova"
    cut.write_bytes(data[:2000])
    with pytest.raises(CorruptImage):
        ustar.read_members(str(cut))
    data[10] ^= 0xFF
    bad = tmp_path / "bad.ova"
    bad.write_bytes(data)
    with pytest.raises(CorruptImage, match="checksum"):
        ustar.read_members(str(bad))


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=512, max_size=4096))
def test_tar_reader_raises_only_format_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.ova"
    path.write_bytes(data)
    try:
        ustar.read_members(str(path))
    except FormatError:
        pass


# -- pack and unpack (the VMDK writer and reader are formats.vmdk's) -----------------


@pytest.fixture
def raw_disk(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(24 * MiB)
        for at in (0, 5 * MiB, 23 * MiB):
            f.seek(at)
            f.write(os.urandom(300 * 1024))
    return str(path)


def test_pack_unpack_round_trip_with_qemu_img(tmp_path, raw_disk):
    out = str(tmp_path / "app.ova")
    machine = {k: v for k, v in MACHINE.items() if k != "disks"}
    res = ovf.pack([raw_disk, raw_disk], out, machine, ovf_version="2")
    assert res.ovf_version == "2.0"
    names = [m.name for m in ustar.read_members(out)]
    assert names == ["app.ovf", "app.mf", "app-disk1.vmdk", "app-disk2.vmdk"]
    x = tmp_path / "x"
    x.mkdir()
    with tarfile.open(out) as tf:
        for member in tf.getmembers():
            (x / member.name).write_bytes(tf.extractfile(member).read())
    for name in names[2:]:
        info = qemu_img("info", "--output=json", str(x / name)).stdout
        assert '"format": "vmdk"' in info and '"virtual-size": 25165824' in info
        assert "streamOptimized" in qemu_img("info", str(x / name)).stdout
        qemu_img("compare", "-f", "raw", "-F", "vmdk", raw_disk, str(x / name))
    parsed = descriptor.parse((x / "app.ovf").read_bytes())
    # ovf:size is the real file size
    assert [f["size"] for f in parsed.files] == [os.path.getsize(x / n) for n in names[2:]]
    assert parsed.machine["cpus"] == 2 and parsed.machine["firmware"] == "uefi"
    assert [n["mac"] for n in parsed.machine["nics"]] == ["52:54:00:12:34:56", "52:54:00:12:34:57"]

    target = tmp_path / "unpacked"
    back = ovf.unpack(out, str(target), out_format="raw")
    assert back.manifest == "sha256"
    assert sorted(os.listdir(target)) == ["app-disk1.img", "app-disk2.img"]
    for d in back.disks:
        qemu_img("compare", "-f", "raw", "-F", "raw", raw_disk, d.output)
    info = ovf.describe(out)
    assert info["format"] == "ova" and info["manifest"] == "sha256"
    assert info["machine"]["memory"] == 2 << 30


def test_unpack_an_ovf_package_directory(tmp_path, raw_disk):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    disk = pkg / "d1.vmdk"
    qemu_img(
        "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw_disk, str(disk)
    )
    m = dict(MACHINE, disks=[{"path": "d1.vmdk", "format": "vmdk", "subformat": "streamOptimized",
                              "bus": "scsi", "size": 24 * MiB}])  # fmt: skip
    path = ovf.write_package(str(pkg), "vm", m, digest="sha1")
    assert (pkg / "vm.mf").read_text().startswith("SHA1(vm.ovf)= ")
    res = ovf.unpack(path, str(tmp_path / "out"))
    assert res.manifest == "sha1"
    assert Path(res.disks[0].output).read_bytes() == disk.read_bytes()
    # a changed disk is caught by the manifest
    with open(disk, "r+b") as f:
        f.seek(600)
        f.write(b"\xff")
    with pytest.raises(CorruptImage, match="digest"):
        ovf.unpack(path, str(tmp_path / "out2"))
    assert os.listdir(tmp_path / "out2") == []


def test_pack_refuses_existing_output_and_leaves_no_partial(tmp_path, raw_disk):
    out = tmp_path / "a.ova"
    out.write_bytes(b"keep")
    with pytest.raises(FormatError, match="exists"):
        ovf.pack([raw_disk], str(out), {"name": "a", "cpus": 1, "memory": 1 << 30})
    assert out.read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["a.ova", "disk.raw"]
    with pytest.raises(FormatError):
        ovf.pack(
            [str(tmp_path / "missing.raw")],
            str(tmp_path / "b.ova"),
            {"name": "b", "cpus": 1, "memory": 1 << 30},
        )
    assert sorted(os.listdir(tmp_path)) == ["a.ova", "disk.raw"]


def test_describe_ovf_without_manifest_warns(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "web1-disk1.vmdk").write_bytes(b"x" * 12345)
    (pkg / "web1-disk2.vmdk").write_bytes(b"y" * 99)
    (pkg / "web1.ovf").write_bytes(descriptor.build(MACHINE))
    info = ovf.describe(str(pkg / "web1.ovf"))
    assert info["manifest"] is None
    assert any("no manifest" in w for w in info["warnings"])
    assert formats.FormatError  # the library's base error is what callers catch


# -- OVAs as the field writes them (the shapes virt-v2v's -i ova reads) ---------------


def _sha(tool: str, path: Path) -> str:
    """A digest computed by coreutils, not by us."""
    return run([tool, str(path)], check=True).stdout.split()[0]


@pytest.fixture
def field_pkg(tmp_path, raw_disk):
    """A package directory made by real tools: a streamOptimized VMDK by qemu-img, its
    digest by sha256sum, a descriptor that names it. Returns (dir, descriptor bytes)."""
    need_tool("sha256sum", "sha1sum", "tar", "gzip", "xz", "zip")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    disk = pkg / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
             raw_disk, str(disk))  # fmt: skip
    return pkg


def _field_descriptor(file_size: int, *, extra: str = "") -> bytes:
    m = dict(MACHINE, disks=[{"path": "disk.vmdk", "format": "vmdk", "subformat": "streamOptimized",
                              "bus": "scsi", "size": 24 * MiB, "file_size": file_size}])  # fmt: skip
    data = descriptor.build(m)
    return data.replace(b'ovf:href="disk.vmdk"', b'ovf:href="disk.vmdk"' + extra.encode(), 1)


def _write_field_package(pkg: Path, *, disk_names=("disk.vmdk",), extra="", mf_lines=None,
                         algo="sha256sum", descriptor_listed=True, size_of=None) -> None:  # fmt: skip
    stored = pkg / disk_names[-1]
    (pkg / "vm.ovf").write_bytes(_field_descriptor(size_of or stored.stat().st_size, extra=extra))
    tag = {"sha256sum": "SHA256", "sha1sum": "SHA1"}[algo]
    names = (["vm.ovf"] if descriptor_listed else []) + list(disk_names)
    lines = [f"{tag}({n})= {_sha(algo, pkg / n)}" for n in names]
    (pkg / "vm.mf").write_text("\n".join(lines + list(mf_lines or [])) + "\n")


def _archive(pkg: Path, kind: str, members: list[str], out: Path) -> Path:
    """OUT made by the real tool for KIND from MEMBERS (paths relative to PKG)."""
    cmd = {
        "tar": ["tar", "--format=ustar", "-cf", str(out)],
        "tar.gz": ["tar", "--format=ustar", "-czf", str(out)],
        "tar.xz": ["tar", "--format=ustar", "-cJf", str(out)],
        "zip": ["zip", "-q", "-r", str(out)],
    }[kind]
    res = run(cmd + members, cwd=pkg)
    assert res.returncode == 0, res.stderr
    return out


def _unpacks_equal(ova: Path, raw_disk: str, tmp_path: Path, name="out"):
    res = ovf.unpack(str(ova), str(tmp_path / name), out_format="raw")
    assert [d.name for d in res.disks] == ["disk.vmdk"]
    qemu_img("compare", "-f", "raw", "-F", "raw", raw_disk, res.disks[0].output)
    assert sorted(os.listdir(tmp_path / name)) == ["disk.img"]
    return res


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.xz", "zip"])
def test_archive_kinds_virt_v2v_reads(tmp_path, field_pkg, raw_disk, kind):
    _write_field_package(field_pkg)
    ova = _archive(field_pkg, kind, ["vm.ovf", "vm.mf", "disk.vmdk"], tmp_path / f"vm.{kind}.ova")
    res = _unpacks_equal(ova, raw_disk, tmp_path)
    assert res.manifest == "sha256"
    info = ovf.describe(str(ova))
    assert info["format"] == {"tar": "ova", "tar.gz": "ova (gzip)", "tar.xz": "ova (xz)",
                              "zip": "ova (zip)"}[kind]  # fmt: skip
    assert (kind == "tar") != any("plain tar" in w for w in res.warnings)


def test_descriptor_in_a_subfolder_with_its_manifest(tmp_path, field_pkg, raw_disk):
    # virt-v2v's test-i-ova-subfolders: everything inside sub/, the manifest names files
    # relative to itself
    _write_field_package(field_pkg, algo="sha1sum")
    sub = tmp_path / "top" / "sub"
    sub.mkdir(parents=True)
    for n in ("vm.ovf", "vm.mf", "disk.vmdk"):
        os.link(field_pkg / n, sub / n)
    for kind in ("tar", "tar.gz", "zip"):
        ova = _archive(tmp_path / "top", kind, ["sub"], tmp_path / f"sub.{kind}.ova")
        res = _unpacks_equal(ova, raw_disk, tmp_path, name=f"out-{kind}")
        assert res.manifest == "sha1"
        assert ovf.describe(str(ova))["descriptor"] == "sub/vm.ovf"


def test_vmware_snapshot_export_reads_the_newest(tmp_path, field_pkg, raw_disk):
    # disk.vmdk itself is absent; disk.vmdk.000000000 ... .000000002 hold the chain's
    # states and the highest number is the disk (virt-v2v RHBZ#1570407)
    disk = field_pkg / "disk.vmdk"
    for i in (0, 1):
        (field_pkg / f"disk.vmdk.00000000{i}").write_bytes(os.urandom(4096 + i))
    disk.rename(field_pkg / "disk.vmdk.000000002")
    names = [f"disk.vmdk.00000000{i}" for i in range(3)]
    _write_field_package(field_pkg, disk_names=names, algo="sha1sum",
                         mf_lines=[f"SHA1(disk.vmdk)= {'0' * 40}"])  # fmt: skip
    ova = _archive(field_pkg, "tar", ["vm.ovf", "vm.mf", *names], tmp_path / "snap.ova")
    res = _unpacks_equal(ova, raw_disk, tmp_path)
    assert any("newest snapshot disk.vmdk.000000002" in w for w in res.warnings)
    # a snapshot that does not match its manifest line is still refused
    data = (field_pkg / names[-1]).read_bytes()
    (field_pkg / names[-1]).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    bad = _archive(field_pkg, "tar", ["vm.ovf", "vm.mf", *names], tmp_path / "snap-bad.ova")
    with pytest.raises(CorruptImage, match="sha1 digest does not match"):
        ovf.unpack(str(bad), str(tmp_path / "bad"))
    assert os.listdir(tmp_path / "bad") == []


def test_gzip_compressed_disk_file(tmp_path, field_pkg, raw_disk):
    # ovf:compression="gzip": the file is stored compressed, its digest and ovf:size are
    # of the stored bytes
    disk = field_pkg / "disk.vmdk"
    res = run(["gzip", "-n", "-9", str(disk)])
    assert res.returncode == 0, res.stderr
    (field_pkg / "disk.vmdk.gz").rename(disk)
    _write_field_package(field_pkg, extra=' ovf:compression="gzip"')
    for kind in ("tar", "tar.xz"):
        ova = _archive(field_pkg, kind, ["vm.ovf", "vm.mf", "disk.vmdk"], tmp_path / f"gz.{kind}")
        out = _unpacks_equal(ova, raw_disk, tmp_path, name=f"out-{kind}")
        assert out.disks[0].format == "raw"
    assert ovf.describe(str(ova))["files"][0]["compression"] == "gzip"


def test_lenient_manifests_warn(tmp_path, field_pkg, raw_disk):
    # the descriptor unlisted, a garbage line and a digest of the wrong length: read, with
    # a warning for each that says which algorithm the line was expected in
    _write_field_package(field_pkg, algo="sha1sum", descriptor_listed=False,
                         mf_lines=["garbage line", "SHA1(extra.txt)= abc"])  # fmt: skip
    ova = _archive(field_pkg, "tar", ["vm.ovf", "vm.mf", "disk.vmdk"], tmp_path / "lenient.ova")
    res = _unpacks_equal(ova, raw_disk, tmp_path)
    text = "\n".join(res.warnings)
    assert "does not list the descriptor vm.ovf" in text
    assert "line 2 is not 'SHA1(name)= hex'" in text and "garbage line" in text
    assert "line 3 has a SHA1 digest of 3 hex digits (SHA1 has 40)" in text
    # lenient is not blind: a wrong digest on a line it can read is refused
    lines = (field_pkg / "vm.mf").read_text().splitlines()
    lines[0] = lines[0][:-1] + ("0" if lines[0][-1] != "0" else "1")
    (field_pkg / "vm.mf").write_text("\n".join(lines) + "\n")
    bad = _archive(field_pkg, "tar", ["vm.ovf", "vm.mf", "disk.vmdk"], tmp_path / "bad.ova")
    with pytest.raises(CorruptImage, match="sha1 digest does not match"):
        ovf.unpack(str(bad), str(tmp_path / "bad"))


def test_manifest_lenient_parse_names_the_expected_algorithm():
    warnings: list[str] = []
    good = "ab" * 32
    parsed = manifest.parse(
        f"SHA256(a.ovf)= {good}\nMD5(b)= 00\nSHA256 b.vmdk {good}\n".encode(),
        where="x.mf",
        warnings=warnings,
    )
    assert list(parsed) == ["a.ovf"]
    assert warnings == [
        "x.mf: line 2 uses MD5, not one of SHA1, SHA256, SHA512: 'MD5(b)= 00' (line skipped)",
        f"x.mf: line 3 is not 'SHA256(name)= hex' like the manifest's other lines: "
        f"'SHA256 b.vmdk {good}' (line skipped)",
    ]


def _gz(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
        g.write(data)
    return buf.getvalue()


def _tgz_with(tmp_path, build, name="hostile.ova") -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        build(tf)
    path = tmp_path / name
    path.write_bytes(_gz(buf.getvalue()))
    return str(path)


def _zip_with(tmp_path, entries) -> str:
    path = tmp_path / "hostile.ova"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for info, data in entries:
            z.writestr(info, data)
    return str(path)


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _gzip_disk_descriptor(stored: bytes, declared: int | None = None, capacity=1 << 20) -> bytes:
    m = dict(MACHINE, disks=[{"path": "disk.vmdk", "format": "raw", "bus": "scsi",
                              "size": capacity, "file_size": declared or len(stored)}])  # fmt: skip
    return descriptor.build(m).replace(
        b'ovf:href="disk.vmdk"', b'ovf:href="disk.vmdk" ovf:compression="gzip"', 1
    )


_BOMB = _gz(bytes(64 * MiB))  # 64 MiB of zeros in ~64 KiB


HOSTILE_FIELD = {
    "zip-traversal": lambda p: _zip_with(
        p, [("a.ovf", _pack_descriptor()), ("../evil.vmdk", b"x")]
    ),
    "zip-absolute": lambda p: _zip_with(
        p, [("a.ovf", _pack_descriptor()), ("/tmp/evil.vmdk", b"x")]
    ),
    "zip-symlink": lambda p: _zip_with(
        p, [("a.ovf", _pack_descriptor()), _zip_symlink("disk.vmdk", "/etc/passwd")]
    ),
    "tgz-symlink": lambda p: _tgz_with(p, lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()),
        _add(tf, "disk.vmdk", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    )),
    "tgz-traversal": lambda p: _tgz_with(p, lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()), _add(tf, "sub/../../evil.vmdk"),
    )),
    "tgz-truncated": lambda p: (
        Path(q := _tgz_with(p, lambda tf: (
            _add(tf, "a.ovf", _pack_descriptor()), _add(tf, "disk.vmdk", os.urandom(4096)),
        ))).write_bytes(Path(q).read_bytes()[:-200]) and q
    ),
    "xz-garbage": lambda p: (
        (p / "hostile.ova").write_bytes(b"\xfd7zXZ\x00" + os.urandom(2000)) and str(p / "hostile.ova")
    ),
    # a gzip disk that decompresses past what its disk (1 MiB) could hold: stopped at the cap
    "gzip-bomb-past-capacity": lambda p: _tar_with(p, lambda tf: (
        _add(tf, "a.ovf", _gzip_disk_descriptor(_BOMB)), _add(tf, "disk.vmdk", _BOMB),
    )),
    # ovf:size says what it decompresses to, and it lies
    "gzip-size-lies": lambda p: _tar_with(p, lambda tf: (
        _add(tf, "a.ovf", _gzip_disk_descriptor(_gz(b"y" * 9000), declared=4096, capacity=64 << 20)),
        _add(tf, "disk.vmdk", _gz(b"y" * 9000)),
    )),
    "gzip-damaged": lambda p: _tar_with(p, lambda tf: (
        _add(tf, "a.ovf", _gzip_disk_descriptor(_gz(b"y" * 9000)[:-9] + b"123456789")),
        _add(tf, "disk.vmdk", _gz(b"y" * 9000)[:-9] + b"123456789"),
    )),
    "snapshot-without-number": lambda p: _tar_with(p, lambda tf: (
        _add(tf, "a.ovf", _pack_descriptor()), _add(tf, "disk.vmdk.latest"),
    )),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE_FIELD))
def test_hostile_field_archives_refused_and_nothing_written_outside(tmp_path, case):
    box = tmp_path / "box"
    box.mkdir()
    ova = HOSTILE_FIELD[case](box)
    target = box / "out"
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(box))
    with pytest.raises(FormatError) as info:
        ovf.unpack(ova, str(target))
    assert "\n" not in str(info.value)
    if "bomb" in case:
        assert "decompresses past" in str(info.value)
    if case == "gzip-size-lies":
        assert "ovf:size" in str(info.value)
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(box))) in (
        before,
        (before[0], sorted(before[1] + ["out"])),
    )
    if target.exists():
        assert os.listdir(target) == []
    assert not os.path.exists("/tmp/evil.vmdk") and not (tmp_path / "evil.vmdk").exists()


def _seed_archives() -> dict[str, bytes]:
    """A small valid appliance as a tar, a gzip tar, an xz tar and a zip."""
    disk = os.urandom(1000) + bytes(2000)
    desc = _pack_descriptor(disk_size=len(disk))
    mf = manifest.build(
        [
            ("a.ovf", hashlib.sha256(desc).hexdigest()),
            ("disk.vmdk", hashlib.sha256(disk).hexdigest()),
        ]
    )
    files = (("a.ovf", desc), ("a.mf", mf), ("disk.vmdk", disk))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in files:
            _add(tf, name, data)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files:
            z.writestr(name, data)
    tar = buf.getvalue()
    return {"tar": tar, "gzip": _gz(tar), "xz": lzma.compress(tar), "zip": zbuf.getvalue()}


SEEDS = _seed_archives()


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(SEEDS)),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.binary(min_size=0, max_size=8)), max_size=6),
)
def test_mutated_archives_raise_only_format_errors(tmp_path_factory, kind, edits):
    """Each kind of container, its bytes edited anywhere (a found case: a zip whose local
    header sends zipfile seeking before the file start raised a bare OSError)."""
    data = bytearray(SEEDS[kind])
    for at, chunk in edits:
        at %= len(data)
        data[at : at + len(chunk)] = chunk
    work = tmp_path_factory.mktemp("fuzz")
    path = work / "f.ova"
    path.write_bytes(bytes(data))
    try:
        ovf.describe(str(path))
        ovf.unpack(str(path), str(work / "out"))
    except FormatError:
        pass
