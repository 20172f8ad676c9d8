"""`p2v partitions` and `p2v resize` as a user runs them."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.external import need_tool, p2v

MiB = 1 << 20
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def run(*cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd}: {res.stdout}{res.stderr}"
    return res


@pytest.fixture
def disk(tmp_path):
    need_tool("sfdisk", "mkfs.vfat", "mkfs.ext4")
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(48 * MiB)
    run("sfdisk", "-q", path, input=f"label: gpt\nsize=16M, type={ESP}, name=EFI\nsize=+\n")
    for start, size, cmd in (
        (MiB, 16 * MiB, ["mkfs.vfat"]),
        (17 * MiB, 30 * MiB, ["mkfs.ext4", "-q"]),
    ):
        part = str(tmp_path / "p.img")
        with open(part, "wb") as f:
            f.truncate(size)
        run(*cmd, part)
        run(
            "dd",
            f"if={part}",
            f"of={path}",
            "bs=1M",
            f"seek={start // MiB}",
            "conv=notrunc",
            "status=none",
        )
    return path


def test_partitions_json_lists_offsets_types_names_and_filesystems(disk):
    out = json.loads(p2v("partitions", "-f", "raw", "--output", "json", disk, check=True).stdout)
    assert out["label"] == "gpt"
    assert [(p["number"], p["start"], p["size"]) for p in out["partitions"]] == [
        (1, MiB, 16 * MiB),
        (2, 17 * MiB, 30 * MiB),  # sfdisk ends it on a MiB boundary
    ]
    assert [p["filesystem"] for p in out["partitions"]] == ["vfat", "ext4"]
    assert out["partitions"][0]["name"] == "EFI"
    assert out["partitions"][0]["type-name"] == "EFI System"


def test_partitions_human_output_and_bare_filesystem(disk, tmp_path):
    text = p2v("partitions", "-f", "raw", disk, check=True).stdout
    assert "gpt" in text and "EFI System" in text and "ext4" in text
    bare = str(tmp_path / "bare.img")
    with open(bare, "wb") as f:
        f.truncate(8 * MiB)
    run("mkfs.vfat", bare)
    assert (
        "No partition table; content: vfat"
        in p2v("partitions", "-f", "raw", bare, check=True).stdout
    )


def test_resize_grow_then_shrink_with_negative_size(disk):
    p2v("resize", "-f", "raw", disk, "+16M", check=True)
    assert "No problems found" in run("sgdisk", "-v", disk).stdout
    res = p2v("resize", "-f", "raw", disk, "-8M")
    assert res.returncode == 1 and "needs --shrink" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    out = json.loads(
        p2v("resize", "-f", "raw", "--shrink", "--output", "json", disk, "-8M", check=True).stdout
    )
    assert out["new-size"] == 56 * MiB and out["gpt-backup-moved"]
    assert "No problems found" in run("sgdisk", "-v", disk).stdout
    res = p2v("resize", "-f", "raw", "--shrink", disk, "--", "-40M")
    assert res.returncode == 1 and "would cut partition 2" in res.stderr


def test_partitions_of_a_missing_file_is_one_line_error(tmp_path):
    res = p2v("partitions", str(tmp_path / "nope.img"))
    assert res.returncode == 1
    assert res.stderr.startswith("p2v: error:") and "Traceback" not in res.stderr


def test_resize_rewrites_a_vmdk_and_refuses_cutting_a_partition_leaving_it_alone(disk, tmp_path):
    vmdk = str(tmp_path / "disk.vmdk")
    p2v("convert", "-f", "raw", "-O", "vmdk", disk, vmdk, check=True)
    out = json.loads(p2v("resize", "--output", "json", vmdk, "+16M", check=True).stdout)
    assert out["new-size"] == 64 * MiB and out["method"] == "rewrite" and out["gpt-backup-moved"]
    back = str(tmp_path / "back.raw")
    run("qemu-img", "convert", "-O", "raw", vmdk, back)
    assert "No problems found" in run("sgdisk", "-v", back).stdout
    before = (tmp_path / "disk.vmdk").read_bytes()
    res = p2v("resize", "--shrink", vmdk, "32M")
    assert res.returncode == 1 and "would cut partition 2" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert (tmp_path / "disk.vmdk").read_bytes() == before
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*"))


def test_resize_of_a_chs_sized_vhd_says_it_rounded_up(tmp_path):
    vhd = str(tmp_path / "d.vhd")
    run("qemu-img", "create", "-f", "vpc", vhd, "8M")
    text = p2v("resize", vhd, "20M", check=True).stdout
    assert "rounds 20971520 up" in text
    info = json.loads(
        run(
            "qemu-img",
            "info",
            "--output=json",
            "--image-opts",
            f"driver=vpc,file.filename={vhd},force_size_calc=chs",
        ).stdout
    )
    assert info["virtual-size"] > 20 * MiB and str(info["virtual-size"]) in text
