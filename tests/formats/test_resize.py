"""Resizing keeps a GPT valid (sgdisk -v), refuses to cut partitions, leaves MBRs alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import formats
from formats import partitions, vhd
from formats.resize import resize
from tests.external import need_tool, qemu_img, qemu_io

MiB = 1 << 20


def run(*cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd}: {res.stdout}{res.stderr}"
    return res


def sfdisk_parts(path: str) -> list[dict]:
    parts = json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]["partitions"]
    return [{k: v for k, v in p.items() if k != "node"} for p in parts]


@pytest.fixture(scope="module")
def gpt_template(tmp_path_factory):
    need_tool("sgdisk", "sfdisk")
    path = str(tmp_path_factory.mktemp("resize") / "d.img")
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    run("sgdisk", "-n1:2048:+8M", "-c1:one", "-n2:0:+8M", "-t2:8200", path)
    return path


@pytest.fixture
def gpt_disk(gpt_template, tmp_path):
    path = str(tmp_path / "d.img")
    shutil.copyfile(gpt_template, path)
    return path


def test_growing_a_gpt_disk_moves_the_backup_to_the_new_end(gpt_disk):
    before = sfdisk_parts(gpt_disk)
    res = resize(gpt_disk, 100 * MiB, "raw")
    assert res.gpt_backup_moved and res.table == "gpt"
    out = run("sgdisk", "-v", gpt_disk).stdout
    assert "No problems found" in out
    assert sfdisk_parts(gpt_disk) == before
    with open(gpt_disk, "rb") as f:
        f.seek(32 * MiB - 512)
        assert f.read(512) == bytes(512)  # the old backup header no longer stands there
        f.seek(100 * MiB - 512)
        assert f.read(8) == b"EFI PART"
    with formats.open(gpt_disk, "raw") as img:
        assert partitions.read_table(img).last_usable == 100 * MiB - 33 * 512


def test_shrinking_needs_the_flag_and_room_for_the_partitions(gpt_disk):
    with pytest.raises(formats.FormatError, match="needs --shrink"):
        resize(gpt_disk, 24 * MiB, "raw", shrink=False)
    with pytest.raises(formats.FormatError, match="would cut partition 2"):
        resize(gpt_disk, 17 * MiB, "raw")
    resize(gpt_disk, 18 * MiB, "raw")
    assert "No problems found" in run("sgdisk", "-v", gpt_disk).stdout
    assert len(sfdisk_parts(gpt_disk)) == 2


def test_mbr_and_bare_images_are_just_resized(tmp_path):
    need_tool("sfdisk")
    path = str(tmp_path / "m.img")
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    run("sfdisk", "-q", path, input="start=2048, size=8192, type=83\n")
    with open(path, "rb") as f:
        sector0 = f.read(512)
    res = resize(path, 20 * MiB, "raw")
    assert res.table == "mbr" and not res.gpt_backup_moved
    with open(path, "rb") as f:
        assert f.read(512) == sector0
    assert (tmp_path / "m.img").stat().st_size == 20 * MiB
    bare = tmp_path / "bare.img"
    bare.write_bytes(b"\1" * MiB)
    assert resize(str(bare), 3 * MiB, "raw").table is None
    assert bare.stat().st_size == 3 * MiB


def test_qcow2_grows_in_place_keeping_its_data_and_moving_the_gpt_backup(gpt_disk, tmp_path):
    qcow = str(tmp_path / "d.qcow2")
    qemu_img("convert", "-O", "qcow2", gpt_disk, qcow)
    inode = os.stat(qcow).st_ino
    res = resize(qcow, 64 * MiB, "qcow2")
    assert (res.method, res.old_size, res.new_size) == ("in-place", 32 * MiB, 64 * MiB)
    assert res.gpt_backup_moved and res.table == "gpt"
    assert os.stat(qcow).st_ino == inode  # resized where it lies, not rewritten
    info = json.loads(qemu_img("info", "--output=json", qcow).stdout)
    assert info["virtual-size"] == 64 * MiB
    qemu_img("check", qcow)
    # the oracle: the raw disk resized the same way reads identically
    resize(gpt_disk, 64 * MiB, "raw")
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", gpt_disk, qcow).returncode == 0
    back = str(tmp_path / "back.raw")
    qemu_img("convert", "-O", "raw", qcow, back)
    assert "No problems found" in run("sgdisk", "-v", back).stdout


# -- every writable format ------------------------------------------------------------

#: (format, qemu-img -o options); vpc is read by qemu with the size rule it was made with
FORMAT_SPECS = [
    ("raw", ""),
    ("qcow2", "compat=1.1,cluster_size=65536"),
    ("vmdk", "subformat=monolithicSparse,adapter_type=lsilogic"),
    ("vmdk", "subformat=streamOptimized"),
    ("vmdk", "subformat=monolithicFlat"),
    ("vmdk", "subformat=twoGbMaxExtentSparse"),
    ("vmdk", "subformat=twoGbMaxExtentFlat"),
    ("vpc", "subformat=fixed"),
    ("vpc", "subformat=dynamic"),
    ("vpc", "subformat=dynamic,force_size=on"),
    ("vhdx", "subformat=dynamic,block_size=1M"),
    ("vhdx", "subformat=fixed"),
    ("vdi", "static=off"),
    ("vdi", "static=on"),
]

#: written by qemu-io near the end of the 32 MiB disk, above partition 2 and below the
#: GPT backup; and near 24 MiB, what a shrink to 24 MiB keeps
NEAR_OLD_END = (32 * MiB - 33 * 512 - 64 * 1024, 60 * 1024, 0x5A)
NEAR_NEW_END = (24 * MiB - 33 * 512 - 8 * 1024, 8 * 1024, 0xA5)


def _spec(fmt: str, opts: str, path: str) -> str:
    """A qemu image-opts string: a VHD's size rule is told, as qemu guesses it otherwise
    (it reads a fixed VHD as its file size, footer included)."""
    if fmt != "vpc":
        return f"driver={fmt},file.filename={path}"
    calc = "current_size" if "force_size" in opts else "chs"
    return f"driver=vpc,file.filename={path},force_size_calc={calc}"


def _files_digest(img_path: str, fmt: str) -> dict[str, str]:
    import hashlib

    with formats.open(img_path, fmt) as img:
        names = img.files()
    out = {}
    for n in names:
        with open(n, "rb") as f:
            out[n] = hashlib.sha256(f.read()).hexdigest()
    return out


def _check_after(tmp_path, fmt, opts, path, res, ref_raw):
    spec = _spec(fmt, opts, path)
    info = json.loads(qemu_img("info", "--output=json", "--image-opts", spec).stdout)
    assert info["virtual-size"] == res.new_size
    if fmt not in ("vpc", "raw"):  # qemu has no check for these; ours runs below
        qemu_img("check", "-f", fmt, path)
    with formats.open(path, fmt) as img:
        assert img.size == res.new_size
        assert img.check().exit_code == 0
    # the oracle: the raw reference resized in place (truncated, its GPT moved); qemu-img
    # compare reads a shorter image as zero-padded: the sizes are checked above
    qemu_img("compare", "--image-opts", spec, f"driver=raw,file.filename={ref_raw}")
    back = str(tmp_path / "back.raw")
    qemu_img("convert", "--image-opts", spec, "-O", "raw", back)
    assert "No problems found" in run("sgdisk", "-v", back).stdout
    with open(back, "rb") as f:
        f.seek(res.new_size - 512)
        assert f.read(8) == b"EFI PART"  # the backup header is the last sector


def _identity(path: str, fmt: str) -> str | None:
    """What a hypervisor knows the disk by: VMDK's ddb.uuid, VHD's unique id, VHDX's
    virtual disk id, VDI's uuid."""
    with formats.open(path, fmt) as img:
        if fmt == "vmdk":
            return img.descriptor.ddb.get("ddb.uuid")  # type: ignore[attr-defined]
        key = {"vpc": "unique-id", "vhdx": "virtual-disk-id", "vdi": "uuid"}.get(fmt)
        return img.info().get(key) if key else None


@pytest.mark.parametrize(("fmt", "opts"), FORMAT_SPECS, ids=[f"{f}-{o}" for f, o in FORMAT_SPECS])
def test_every_writable_format_grows_and_shrinks_keeping_data_and_gpt(
    gpt_template, tmp_path, fmt, opts
):
    need_tool("qemu-io")
    src_raw = str(tmp_path / "src.raw")
    shutil.copyfile(gpt_template, src_raw)
    for off, n, pat in (NEAR_OLD_END, NEAR_NEW_END):
        qemu_io("raw", src_raw, f"write -P {pat:#x} {off} {n}")
    path = str(tmp_path / f"d.{fmt}")
    qemu_img("convert", "-f", "raw", "-O", fmt, *(["-o", opts] if opts else []), src_raw, path)
    ref = str(tmp_path / "ref.raw")
    qemu_img("convert", "--image-opts", _spec(fmt, opts, path), "-O", "raw", ref)
    old_size = os.path.getsize(ref)

    identity = _identity(path, fmt)
    assert identity or fmt in ("raw", "qcow2", "vmdk")  # qemu-img writes no ddb.uuid
    res = resize(path, 48 * MiB, fmt)
    assert res.old_size == old_size and res.table == "gpt" and res.gpt_backup_moved
    assert res.method == ("in-place" if fmt in ("raw", "qcow2") else "rewrite")
    if fmt == "vpc" and "force_size" not in opts:
        assert res.new_size == vhd.size_for(48 * MiB, exact=False)[0] > 48 * MiB
    elif opts == "subformat=streamOptimized":
        assert res.new_size % (64 * 1024) == 0 and res.new_size - 48 * MiB < 64 * 1024
    else:
        assert res.new_size == 48 * MiB
    resize(ref, res.new_size, "raw")
    _check_after(tmp_path, fmt, opts, path, res, ref)
    qemu_io("raw", ref, f"read -P {NEAR_OLD_END[2]:#x} {NEAR_OLD_END[0]} {NEAR_OLD_END[1]}")
    after = _identity(path, fmt)  # still the same disk to a hypervisor
    assert after == identity or (fmt == "vmdk" and identity is None and after)
    identity = after

    # below partition 2 (it ends at 17 MiB, its backup needs 33 sectors more): refused, untouched
    before = _files_digest(path, fmt)
    with pytest.raises(formats.FormatError, match="would cut partition 2"):
        resize(path, 17 * MiB, fmt)
    assert _files_digest(path, fmt) == before
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())

    res = resize(path, 24 * MiB, fmt)
    assert res.new_size >= 24 * MiB and res.gpt_backup_moved
    resize(ref, res.new_size, "raw")
    _check_after(tmp_path, fmt, opts, path, res, ref)
    qemu_io("raw", ref, f"read -P {NEAR_NEW_END[2]:#x} {NEAR_NEW_END[0]} {NEAR_NEW_END[1]}")
    assert _identity(path, fmt) == identity  # a uuid we wrote is kept too
    # a multi-file VMDK keeps its usual file names and leaves nothing else behind
    if fmt == "vmdk":
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("d")) == sorted(
            os.path.basename(f) for f in _files_digest(path, fmt)
        )


def test_a_bare_image_grows_by_a_few_sectors_and_shrinks_exactly(tmp_path):
    """No table: the result equals the truncated original byte for byte (and a growth
    smaller than a GPT backup is not special)."""
    need_tool("qemu-io")
    path = str(tmp_path / "b.vhdx")
    qemu_img("create", "-f", "vhdx", path, "8M")
    qemu_io("vhdx", path, "write -P 0x77 8064k 128k", "write -P 0x11 0 4k")
    ref = str(tmp_path / "ref.raw")
    qemu_img("convert", "-O", "raw", path, ref)
    for size in (8 * MiB + 4096, 8 * MiB - 64 * 1024):
        res = resize(path, size, "vhdx")
        assert res.table is None and res.new_size == size
        os.truncate(ref, size)
        info = json.loads(qemu_img("info", "--output=json", path).stdout)
        assert info["virtual-size"] == size
        qemu_img("compare", "-f", "vhdx", "-F", "raw", path, ref)
    assert resize(path, size, "vhdx").method == "rewrite"  # same size: nothing to do
    link = tmp_path / "link.vhdx"
    link.symlink_to("b.vhdx")
    resize(str(link), 9 * MiB, "vhdx")
    assert link.is_symlink()
    with formats.open(path, "vhdx") as img:
        assert img.size == 9 * MiB
    with pytest.raises(formats.FormatError, match="needs --shrink"):
        resize(path, MiB, "vhdx", shrink=False)


def test_a_small_growth_of_a_gpt_disk_moves_the_backup_over_the_old_one(gpt_template, tmp_path):
    path = str(tmp_path / "d.vdi")
    qemu_img("convert", "-O", "vdi", gpt_template, path)
    res = resize(path, 32 * MiB + 8 * 512, "vdi")
    assert res.new_size == 32 * MiB + 4096
    back = str(tmp_path / "back.raw")
    qemu_img("convert", "-O", "raw", path, back)
    assert "No problems found" in run("sgdisk", "-v", back).stdout


@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vhdx"])
def test_a_differencing_image_keeps_its_parent(tmp_path, fmt):
    base = str(tmp_path / f"base.{fmt}")
    child = str(tmp_path / f"child.{fmt}")
    with formats.create(base, fmt, 4 * MiB, **({"force_size": True} if fmt == "vpc" else {})) as b:
        b.write(0, b"\x01" * MiB)
        b.write(3 * MiB, b"\x02" * MiB)
    extra = {"force_size": True} if fmt == "vpc" else {}
    with formats.create(child, fmt, 4 * MiB, backing_file=f"base.{fmt}", **extra) as c:
        c.write(MiB, b"\x03" * 4096)

    def stored(img):
        # VHD and VHDX copy whole blocks (the engine's grain is the block): count blocks
        return img.info().get("allocated-blocks", img.actual_size())

    with formats.open(child, fmt) as c:
        before = stored(c)
    res = resize(child, 6 * MiB, fmt)
    assert res.new_size == 6 * MiB and res.method == "rewrite"
    with formats.open(child, fmt) as c:
        assert c.backing is not None and os.path.samefile(c.backing.path, base)
        assert c.read(0, 4096) == b"\x01" * 4096  # still read from the parent
        assert c.read(MiB, 4096) == b"\x03" * 4096
        assert c.read(4 * MiB - 4096, 4096) == b"\x02" * 4096
        assert c.read(4 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert c.check().exit_code == 0
        # what the parent holds is not copied into the child
        assert stored(c) <= before
    if fmt == "vmdk":
        info = json.loads(qemu_img("info", "--output=json", child).stdout)
        assert info["virtual-size"] == 6 * MiB and info["backing-filename"] == "base.vmdk"
    resize(child, 3 * MiB, fmt)
    with formats.open(child, fmt) as c:
        assert c.size == 3 * MiB and c.read(MiB, 4096) == b"\x03" * 4096


def test_qcow2_with_internal_snapshots_is_refused_and_untouched(gpt_disk, tmp_path):
    path = str(tmp_path / "s.qcow2")
    qemu_img("convert", "-O", "qcow2", gpt_disk, path)
    qemu_img("snapshot", "-c", "s1", path)
    before = _files_digest(path, "qcow2")
    with pytest.raises(formats.UnsupportedFeature, match="snapshot"):
        resize(path, 64 * MiB)
    assert _files_digest(path, "qcow2") == before


def test_a_vmdk_subformat_we_cannot_write_is_refused(tmp_path):
    desc = tmp_path / "c.vmdk"
    (tmp_path / "c-flat.vmdk").write_bytes(bytes(MiB))
    desc.write_text(
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="custom"\n'
        '\nRW 2048 FLAT "c-flat.vmdk" 0\n\nddb.adapterType = "ide"\n'
    )
    with pytest.raises(formats.UnsupportedFeature, match="custom"):
        resize(str(desc), 2 * MiB, "vmdk")
    assert (tmp_path / "c-flat.vmdk").stat().st_size == MiB
