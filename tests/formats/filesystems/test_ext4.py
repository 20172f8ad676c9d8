"""ext2/3/4 used-block maps: copies of only the used blocks pass e2fsck and hold every file."""

from __future__ import annotations

import logging
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import formats
from formats.disk import used_extents
from formats.extents import Kind
from formats.filesystems import detect, ext4, ranges
from tests.external import need_root, need_tool
from tests.formats.filesystems.fsbuild import (
    MiB,
    grain_bytes,
    nonzero_bytes,
    old_disk,
    run,
    skip_unused,
)
from tests.formats.memimage import mutate_and_run

SIZE = 48 * MiB

VARIANTS = {
    "ext4": (["-t", "ext4"], "ext4"),
    # 1 KiB blocks in 1 MiB groups: many groups, most of them BLOCK_UNINIT
    "ext4-many-uninit-groups": (["-t", "ext4", "-b", "1024", "-g", "1024"], "ext4"),
    "ext2-1k": (["-t", "ext2", "-b", "1024"], "ext2"),
    "ext3": (["-t", "ext3"], "ext3"),
    "ext4-bigalloc": (["-t", "ext4", "-O", "bigalloc", "-C", "16384"], "ext4"),
    "ext4-64bit-meta_bg": (["-t", "ext4", "-O", "64bit,meta_bg,^resize_inode"], "ext4"),
    "ext4-sparse_super2-no-flex": (["-t", "ext4", "-O", "sparse_super2,^flex_bg"], "ext4"),
}


def make_ext(tmp_path, options: list[str], size: int = SIZE) -> str:
    need_tool("mkfs.ext4")
    path = old_disk(tmp_path / "fs.img", size)
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", *options, "-d", str(tmp_path / "tree"), path)
    return path


def dump_all(image: str, files: dict[str, bytes], where) -> dict[str, bytes]:
    """Read every file back with debugfs (no mount, no kernel driver)."""
    need_tool("debugfs")
    where.mkdir()
    cmds = "".join(f"dump /{rel} {where / rel.replace('/', '_')}\n" for rel in files)
    script = where / "cmds"
    script.write_text(cmds)
    run("debugfs", "-f", str(script), image)
    return {rel: (where / rel.replace("/", "_")).read_bytes() for rel in files}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_used_blocks_copy_passes_e2fsck_and_holds_every_file(tmp_path, tree, variant):
    options, name = VARIANTS[variant]
    src = make_ext(tmp_path, options)
    if variant == "ext4-many-uninit-groups":
        assert "BLOCK_UNINIT" in run("dumpe2fs", src).stdout  # the case we mean to cover
    with formats.open(src, "raw") as img:
        assert detect(img) == name
        r = ext4.used(img)
        used = ranges.covered(r)
    assert sum(len(v) for v in tree.values()) < used < SIZE // 2
    out = str(tmp_path / "out.raw")
    stats = skip_unused(src, out)
    assert "copied whole" not in stats["stderr"]
    assert stats["bytes-written"] <= used
    assert nonzero_bytes(out) <= grain_bytes(r)  # free blocks full of old data were not copied
    run("e2fsck", "-fn", out)
    assert dump_all(out, tree, tmp_path / "back") == tree


def test_map_matches_the_free_block_count(tmp_path, tree):
    src = make_ext(tmp_path, ["-t", "ext4", "-b", "4096"])
    free = int(
        next(
            ln.split(":")[1]
            for ln in run("dumpe2fs", "-h", src).stdout.splitlines()
            if ln.startswith("Free blocks:")
        )
    )
    with formats.open(src, "raw") as img:
        used = ranges.covered(ext4.used(img))
    assert used == SIZE - free * 4096


def test_recovery_flag_with_an_empty_journal_maps_as_usual(tmp_path, tree, caplog):
    src = make_ext(tmp_path, ["-t", "ext4"])
    with formats.open(src, "raw") as img:
        clean = ranges.covered(ext4.used(img))
    run("debugfs", "-w", "-R", "feature needs_recovery", src)
    with caplog.at_level(logging.INFO), formats.open(src, "raw") as img:
        assert ranges.covered(ext4.used(img)) == clean
    assert "0 block bitmap(s) taken" in caplog.text


def test_recovery_from_an_external_journal_is_copied_whole(tmp_path, tree, caplog):
    src = make_ext(tmp_path, ["-t", "ext4"])
    run("debugfs", "-w", "-R", "feature needs_recovery", src)
    run("debugfs", "-w", "-R", "ssv journal_inum 0", src)
    with caplog.at_level(logging.WARNING), formats.open(src, "raw") as img:
        assert used_extents(img) == [formats.Extent(0, SIZE, Kind.DATA)]
    assert "external journal" in caplog.text


def test_crashed_filesystem_copy_recovers_with_every_file(tmp_path, caplog):
    """Files fsynced on a mounted filesystem, the disk copied before unmount: their
    blocks are allocated only in the journal's bitmaps. The used-blocks copy must hold
    them, so that recovery on the copy finds every file."""
    need_root()
    need_tool("mkfs.ext4", "e2fsck", "debugfs")
    path = old_disk(tmp_path / "fs.img", SIZE)
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-o", "loop", path, str(mnt))
    files = {f"f{i}": os.urandom(100_000 + i) for i in range(40)}
    crashed = str(tmp_path / "crashed.img")
    try:
        for name, data in files.items():
            with open(mnt / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # commits the journal; bitmaps are not written home yet
        with open(path, "rb") as src, open(crashed, "wb") as dst:
            while chunk := src.read(4 * MiB):
                dst.write(chunk)
    finally:
        run("umount", str(mnt))
    with caplog.at_level(logging.INFO), formats.open(crashed, "raw") as img:
        crash_used = ranges.covered(ext4.used(img))
    taken = int(caplog.text.split("; ")[1].split(" block bitmap")[0])
    assert taken >= 1
    with formats.open(path, "raw") as img:  # the same filesystem after a clean unmount
        assert crash_used >= ranges.covered(ext4.used(img)) - 64 * 1024
    blind = str(tmp_path / "blind.img")  # the same crash, read without its journal
    with open(crashed, "rb") as src, open(blind, "wb") as dst:
        dst.write(src.read())
    run("debugfs", "-w", "-R", "feature ^needs_recovery", blind)
    with formats.open(blind, "raw") as img:
        assert ranges.covered(ext4.used(img)) < crash_used - 1_000_000  # files missed
    out = str(tmp_path / "out.raw")
    skip_unused(crashed, out)
    run("e2fsck", "-fy", out, ok=(0, 1))  # replays the journal
    run("e2fsck", "-fn", out)
    assert dump_all(out, files, tmp_path / "back") == files


def test_damaged_superblock_is_copied_whole_with_a_warning(tmp_path, tree, caplog):
    src = make_ext(tmp_path, ["-t", "ext4"])
    with open(src, "r+b") as f:
        f.seek(1024 + 0x20)  # s_blocks_per_group
        f.write((3).to_bytes(4, "little"))
    with caplog.at_level(logging.WARNING), formats.open(src, "raw") as img:
        assert used_extents(img) == [formats.Extent(0, SIZE, Kind.DATA)]
    assert "copied whole" in caplog.text


def test_filesystem_smaller_than_its_image_keeps_the_tail(tmp_path, tree):
    need_tool("mkfs.ext4")
    path = old_disk(tmp_path / "fs.img", 20 * MiB)
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", path, "16M")
    with formats.open(path, "raw") as img:
        ext = used_extents(img)
    assert ext[-1] == formats.Extent(16 * MiB, 4 * MiB, Kind.DATA) or ext[-1].end == 20 * MiB


@pytest.fixture(scope="module")
def small_ext4(tmp_path_factory):
    need_tool("mkfs.ext4")
    d = tmp_path_factory.mktemp("ext4seed")
    (d / "t").mkdir()
    (d / "t" / "f").write_bytes(os.urandom(100_000))
    path = str(d / "s.img")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    run("mkfs.ext4", "-q", "-F", "-b", "1024", "-g", "512", "-O", "64bit", "-d", str(d / "t"), path)
    with open(path, "rb") as f:
        return bytearray(f.read())


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.integers(1024, 1024 + 1024 + 8192), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    )
)
@example(edits=[(1231, 8)])  # s_reserved_gdt_blocks' high byte: 2 K blocks past the end
def test_damaged_metadata_raises_only_format_errors(small_ext4, edits):
    try:
        r = mutate_and_run(small_ext4, edits, ext4.used)
    except formats.FormatError:
        return
    assert ranges.covered(r) <= len(small_ext4)
