"""LVM2 physical volumes: the label and metadata are kept, each logical volume's
filesystem is mapped in turn (across non-contiguous segments), free extents are dropped.

Built with the real LVM tools on a loop device; device-mapper is not needed (and often
absent in containers): volumes are created without activation and filled by writing
filesystem images at the extents LVM reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats.disk import used_ranges
from formats.extents import Kind
from formats.filesystems import detect, lvm, ranges
from tests.external import need_root, need_tool
from tests.formats.filesystems.fsbuild import MiB, old_disk, run, skip_unused
from tests.formats.memimage import MemoryImage, mutate_and_run

SIZE = 64 * MiB
# no /etc/lvm backups of throw-away volume groups, no device-mapper
LVM_CONFIG = "--config=backup{backup=0 archive=0}"
NO_DM = ("--driverloaded", "n")


@contextlib.contextmanager
def loop_device(path: str):
    dev = run("losetup", "-f", "--show", path).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev)


def lvm_cmd(*args: str) -> str:
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    return run(*args, env=env).stdout


def segments(report: dict, lv: str) -> list[tuple[int, int, int]]:
    """(LV byte offset, PV extent, extent count) of each segment of `lv`."""
    out = []
    for row in report["report"][0]["seg"]:
        if row["lv_name"] != lv:
            continue
        dev_range = row["seg_pe_ranges"].rsplit(":", 1)[1]
        first, last = (int(x) for x in dev_range.split("-"))
        out.append((int(row["seg_start"].rstrip("B")), first, last - first + 1))
    return sorted(out)


@pytest.fixture
def pv(tmp_path, tree):
    """A 64 MiB PV (1 MiB extents): LV root (ext4, in two segments), LV swap, LV blob
    (random bytes), and free extents full of old data."""
    need_root()
    need_tool("losetup", "pvcreate", "vgcreate", "lvcreate", "lvextend", "lvs", "mkfs.ext4")
    path = old_disk(tmp_path / "pv.img", SIZE)
    vg = f"p2vtest{uuid.uuid4().hex[:12]}"
    with loop_device(path) as dev:
        lvm_cmd("pvcreate", "-qq", "-y", "-ff", LVM_CONFIG, dev)
        lvm_cmd("vgcreate", "-qq", LVM_CONFIG, "-s", "1M", vg, dev)
        for name, size in (("root", "12M"), ("swap", "4M"), ("blob", "4M")):
            lvm_cmd("lvcreate", "-qq", LVM_CONFIG, *NO_DM, "-an", "-Zn", "-L", size, "-n", name, vg)
        lvm_cmd("lvextend", "-qq", LVM_CONFIG, *NO_DM, "-L", "+8M", f"{vg}/root")
        report = json.loads(
            lvm_cmd(
                "lvs",
                LVM_CONFIG,
                "--reportformat",
                "json",
                "--units",
                "b",
                "--segments",
                "-o",
                "lv_name,seg_start,seg_pe_ranges",
                vg,
            )
        )
        pe_start = int(
            lvm_cmd("pvs", LVM_CONFIG, "--noheadings", "--units", "b", "-o", "pe_start", dev)
            .strip()
            .rstrip("B")
        )
    layout = {lv: segments(report, lv) for lv in ("root", "swap", "blob")}
    assert len(layout["root"]) == 2  # the case we mean to cover: a non-contiguous LV

    def write_lv(lv: str, image: str) -> None:
        with open(image, "rb") as src, open(path, "r+b") as dst:
            for lv_off, pe, count in layout[lv]:
                src.seek(lv_off)
                dst.seek(pe_start + pe * MiB)
                dst.write(src.read(count * MiB))

    root = str(tmp_path / "root.img")
    with open(root, "wb") as f:
        f.truncate(20 * MiB)
    run("mkfs.ext4", "-q", "-F", "-d", str(tmp_path / "tree"), root)
    write_lv("root", root)
    swap_img = str(tmp_path / "swap.img")
    with open(swap_img, "wb") as f:
        f.truncate(4 * MiB)
    run("mkswap", swap_img)
    write_lv("swap", swap_img)
    blob = tmp_path / "blob.img"
    blob.write_bytes(os.urandom(4 * MiB))
    write_lv("blob", str(blob))
    return {"path": path, "vg": vg, "layout": layout, "pe_start": pe_start, "root": root}


def lv_bytes(image: str, pv: dict, lv: str) -> bytes:
    out = bytearray()
    with open(image, "rb") as f:
        for _, pe, count in pv["layout"][lv]:
            f.seek(pv["pe_start"] + pe * MiB)
            out += f.read(count * MiB)
    return bytes(out)


def test_logical_volumes_are_mapped_by_their_filesystems(pv, tree, tmp_path, caplog):
    with caplog.at_level(logging.WARNING), formats.open(pv["path"], "raw") as img:
        assert detect(img) == "LVM2_member"
        r = used_ranges(img)
    assert f"logical volume {pv['vg']}/blob: no filesystem recognised" in caplog.text
    assert "root" not in caplog.text and "swap" not in caplog.text
    used = ranges.covered(r)
    # label and metadata (1 MiB), the blob whole (4 MiB), a few MiB of ext4, a swap page
    assert 5 * MiB + sum(len(v) for v in tree.values()) < used < 16 * MiB
    out = str(tmp_path / "out.raw")
    skip_unused(pv["path"], out)
    root = str(tmp_path / "root-back.img")
    with open(root, "wb") as f:
        f.write(lv_bytes(out, pv, "root"))
    run("e2fsck", "-fn", root)
    for rel, data in tree.items():
        dst = tmp_path / "dump"
        run("debugfs", "-R", f"dump /{rel} {dst}", root)
        assert dst.read_bytes() == data, rel
    assert lv_bytes(out, pv, "blob") == lv_bytes(pv["path"], pv, "blob")
    assert lv_bytes(out, pv, "swap")[:4096] == lv_bytes(pv["path"], pv, "swap")[:4096]
    # free extents: old data not copied
    with open(out, "rb") as f:
        f.seek(SIZE - 8 * MiB)
        assert f.read(4 * MiB) == bytes(4 * MiB)


def test_lvm_still_reads_the_copy(pv, tmp_path):
    out = str(tmp_path / "out.raw")
    skip_unused(pv["path"], out)
    with loop_device(out) as dev:
        listed = lvm_cmd("lvs", LVM_CONFIG, "--noheadings", "-o", "lv_name", pv["vg"])
        assert sorted(listed.split()) == ["blob", "root", "swap"]
        assert dev


def test_metadata_text_parser_reads_lvm_syntax():
    text = """# comment
    vg0 {
        id = "abc-def"
        extent_size = 8192   # sectors
        status = ["RESIZEABLE", "READ"]
        physical_volumes { pv0 { id = "x" pe_start = 2048 pe_count = 10 } }
        logical_volumes {
            lv { segment1 { start_extent = 0 extent_count = 2 type = "striped"
                            stripe_count = 1 stripes = ["pv0", 3] } }
        }
    }
    contents = "Text Format Volume Group"
    version = 1
    """
    meta = lvm.parse_config(text)
    assert meta["vg0"]["extent_size"] == 8192
    assert meta["vg0"]["status"] == ["RESIZEABLE", "READ"]
    seg = meta["vg0"]["logical_volumes"]["lv"]["segment1"]
    assert seg["stripes"] == ["pv0", 3]
    assert meta["version"] == 1


@pytest.mark.parametrize(
    "text", ["vg { a = [1, 2", "vg { a = }", "}", 'a = "x', "{" * 100, "a = = 1"]
)
def test_malformed_metadata_is_a_format_error(text):
    with pytest.raises(formats.FormatError):
        lvm.parse_config(text)


def test_damaged_label_or_metadata_is_copied_whole(pv, caplog):
    with open(pv["path"], "rb") as f:
        data = bytearray(f.read())
    # the current metadata text is the last one written in the first MiB: change one
    # byte of it and its checksum fails
    text_at = data.rfind(b"physical_volumes", 0, MiB)
    data[text_at] ^= 0x20
    img = MemoryImage(data)
    with caplog.at_level(logging.WARNING):
        r = used_ranges(img)
    assert ranges.covered(r) == len(data)
    assert "checksum" in caplog.text
    assert [e.kind for e in formats.disk.used_extents(img)] == [Kind.DATA]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='ab1 ={}[],"#\n\\-', max_size=200))
def test_random_metadata_text_raises_only_format_errors(text):
    try:
        lvm.parse_config(text)
    except formats.FormatError:
        pass


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(0, 4096 + 512), st.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_label_and_area_headers_raise_only_format_errors(lvm_seed, edits):
    try:
        mutate_and_run(lvm_seed, edits, lvm.read_metadata)
    except formats.FormatError:
        pass


@pytest.fixture(scope="module")
def lvm_seed(tmp_path_factory):
    """A bare PV's first 2 MiB (label, metadata area header and text)."""
    need_root()
    need_tool("losetup", "pvcreate", "vgcreate")
    path = str(tmp_path_factory.mktemp("lvmseed") / "pv.img")
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    with loop_device(path) as dev:
        lvm_cmd("pvcreate", "-qq", "-y", "-ff", LVM_CONFIG, dev)
        lvm_cmd("vgcreate", "-qq", LVM_CONFIG, f"p2vseed{uuid.uuid4().hex[:12]}", dev)
    with open(path, "rb") as f:
        return bytearray(f.read(2 * MiB))
