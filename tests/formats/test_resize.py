"""Resizing keeps a GPT valid (sgdisk -v), refuses to cut partitions, leaves MBRs alone."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import formats
from formats import partitions
from formats.resize import resize
from tests.external import need_tool, qemu_img

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


def test_other_formats_resize_through_their_own_method_or_refuse_cleanly(gpt_disk, tmp_path):
    qcow = str(tmp_path / "d.qcow2")
    qemu_img("convert", "-O", "qcow2", gpt_disk, qcow)
    try:
        formats.open(qcow, "qcow2").close()
    except (formats.UnsupportedFeature, AttributeError):  # absent, or still being written
        pytest.skip("the qcow2 module is not in this build yet")
    try:
        res = resize(qcow, 64 * MiB, "qcow2")
    except formats.UnsupportedFeature as exc:
        assert "qcow2" in str(exc) or "not available" in str(exc)
        return
    assert res.gpt_backup_moved
    info = json.loads(qemu_img("info", "--output=json", qcow).stdout)
    assert info["virtual-size"] == 64 * MiB
    qemu_img("check", qcow)
    back = str(tmp_path / "back.raw")
    qemu_img("convert", "-O", "raw", qcow, back)
    assert "No problems found" in run("sgdisk", "-v", back).stdout
