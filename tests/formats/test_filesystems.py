"""Used-block maps of whole disks: tables kept, each partition mapped by its filesystem,
unknown content copied whole with a warning naming the partition, gaps dropped."""

from __future__ import annotations

import itertools
import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats import partitions
from formats.disk import used_extents, used_ranges
from formats.extents import Kind
from formats.filesystems import ranges
from tests.external import need_tool
from tests.formats.filesystems.fsbuild import OLD_DATA, MiB, old_disk, run, skip_unused, write_tree
from tests.formats.memimage import MemoryImage, mutate_and_run

SIZE = 96 * MiB


@pytest.fixture
def tree(tmp_path) -> dict[str, bytes]:
    return write_tree(tmp_path / "tree")


def put(disk: str, offset: int, image: str) -> None:
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(offset)
        while chunk := src.read(4 * MiB):
            dst.write(chunk)


def fs_image(tmp_path, name: str, size: int, *mkfs: str) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    run(*mkfs, str(path))
    return str(path)


@pytest.fixture
def disk(tmp_path, tree):
    """GPT: 1 BIOS boot (random), 2 FAT16, 3 ext4 with files, 4 unknown (random),
    5 swap; old data in the gaps and after the last partition."""
    need_tool("sfdisk", "mkfs.vfat", "mkfs.ext4", "mkswap")
    path = old_disk(tmp_path / "disk.img", SIZE)
    script = (
        "label: gpt\n"
        "start=2048, size=1M, type=21686148-6449-6E6F-744E-656564454649\n"  # BIOS boot
        "start=6144, size=16M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
        "start=40960, size=24M, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
        "start=98304, size=4M, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
        "start=110592, size=8M, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n"
    )
    run("sfdisk", "-q", path, input=script)
    with formats.open(path, "raw") as img:
        t = partitions.read_table(img)
    parts = {p.number: p for p in t.partitions}
    boot = tmp_path / "boot.bin"
    boot.write_bytes(os.urandom(MiB))
    put(path, parts[1].start, str(boot))
    put(path, parts[2].start, fs_image(tmp_path, "fat", parts[2].size, "mkfs.vfat", "-F", "16"))
    ext = fs_image(tmp_path, "ext", parts[3].size, "mkfs.ext4", "-q", "-d", str(tmp_path / "tree"))
    put(path, parts[3].start, ext)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4 * MiB))
    put(path, parts[4].start, str(junk))
    put(path, parts[5].start, fs_image(tmp_path, "swap", parts[5].size, "mkswap"))
    return path, parts


def test_disk_map_keeps_tables_maps_partitions_and_drops_gaps(disk, caplog):
    path, parts = disk
    with caplog.at_level(logging.WARNING), formats.open(path, "raw") as img:
        ext = used_extents(img)
        r = used_ranges(img)
    assert ext[0].start == 0 and sum(e.length for e in ext) == SIZE
    assert all(a.end == b.start and a.kind != b.kind for a, b in itertools.pairwise(ext))

    def covered(start: int, end: int) -> int:
        return ranges.covered(ranges.clip(r, start, end))

    assert covered(0, MiB) == MiB  # before the first partition: tables and boot code
    assert covered(SIZE - 33 * 512, SIZE) == 33 * 512  # the backup GPT
    assert covered(parts[1].start, parts[1].end) == parts[1].size  # BIOS boot: whole, silently
    assert covered(parts[4].start, parts[4].end) == parts[4].size  # unknown: whole, warned
    assert covered(parts[2].start, parts[2].end) < parts[2].size // 4
    assert covered(parts[3].start, parts[3].end) < parts[3].size // 2
    assert covered(parts[5].start, parts[5].end) == 4096
    assert covered(parts[1].end, parts[2].start) == 0  # gaps between partitions
    assert covered(parts[5].end, SIZE - 33 * 512) == 0
    assert "partition 4: no filesystem recognised; copied whole" in caplog.text
    assert "partition 1" not in caplog.text


def test_skip_unused_disk_copy_is_a_working_disk(disk, tmp_path, tree):
    path, parts = disk
    out = str(tmp_path / "out.raw")
    stats = skip_unused(path, out)
    assert "partition 4" in stats["stderr"]
    assert stats["bytes-written"] < SIZE // 3
    assert "No problems found" in run("sgdisk", "-v", out).stdout
    with formats.open(out, "raw") as img:
        assert partitions.read_table(img).partitions == list(parts.values())
    ext = str(tmp_path / "p3.raw")
    fat = str(tmp_path / "p2.raw")
    run(
        "dd",
        f"if={out}",
        f"of={ext}",
        "bs=1M",
        f"skip={parts[3].start // MiB}",
        "count=24",
        "status=none",
    )
    run(
        "dd",
        f"if={out}",
        f"of={fat}",
        "bs=1M",
        f"skip={parts[2].start // MiB}",
        "count=16",
        "status=none",
    )
    run("e2fsck", "-fn", ext)
    run("fsck.vfat", "-n", fat)
    with open(out, "rb") as f:
        f.seek(MiB)  # before the first partition, old data is kept like boot code would be
        assert OLD_DATA[:4096] not in f.read()


def test_mbr_boot_loader_gap_is_kept(tmp_path):
    need_tool("sfdisk", "mkfs.ext4")
    path = old_disk(tmp_path / "mbr.img", 32 * MiB)
    run("sfdisk", "-q", path, input="start=2048, type=83\n")
    core = os.urandom(100 * 512)  # where GRUB puts core.img on MBR disks
    with open(path, "r+b") as f:
        f.seek(512)
        f.write(core)
    put(path, MiB, fs_image(tmp_path, "ext", 31 * MiB, "mkfs.ext4", "-q"))
    with formats.open(path, "raw") as img:
        r = used_ranges(img)
    assert ranges.covered(ranges.clip(r, 0, MiB)) == MiB
    out = str(tmp_path / "out.raw")
    skip_unused(path, out)
    with open(out, "rb") as f:
        assert f.read(512 + len(core))[512:] == core


def test_unreadable_table_copies_the_whole_disk_with_a_warning(disk, caplog):
    path, _ = disk
    with open(path, "r+b") as f:
        for off in (512 + 16, SIZE - 512 + 16):  # both GPT headers' CRC fields
            f.seek(off)
            f.write(b"\0\0\0\0")
    with caplog.at_level(logging.WARNING), formats.open(path, "raw") as img:
        assert used_extents(img) == [formats.Extent(0, SIZE, Kind.DATA)]
    assert "whole disk is copied" in caplog.text


def test_bare_filesystem_is_mapped_directly(tmp_path, tree):
    need_tool("mkfs.ext4")
    path = old_disk(tmp_path / "fs.img", 32 * MiB)
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", str(tmp_path / "tree"), path)
    from formats.filesystems import ext4

    with formats.open(path, "raw") as img:
        assert ranges.covered(used_ranges(img)) == ranges.covered(ext4.used(img))


def test_unknown_bare_image_is_copied_whole_with_a_warning(tmp_path, caplog):
    path = tmp_path / "junk.img"
    path.write_bytes(os.urandom(2 * MiB))
    with caplog.at_level(logging.WARNING), formats.open(str(path), "raw") as img:
        assert used_extents(img) == [formats.Extent(0, 2 * MiB, Kind.DATA)]
    assert "no filesystem recognised" in caplog.text


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """An 8 MiB GPT disk: FAT12, ext4 (1 KiB blocks), swap; as a bytearray."""
    need_tool("sfdisk", "mkfs.vfat", "mkfs.ext4", "mkswap")
    d = tmp_path_factory.mktemp("smalldisk")
    path = str(d / "disk.img")
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    run("sfdisk", "-q", path, input="label: gpt\nsize=2M\nsize=3M\nsize=1M\n")
    starts = [MiB, 3 * MiB, 6 * MiB]
    for start, size, cmd in zip(
        starts, (2 * MiB, 3 * MiB, MiB), (["mkfs.vfat"], ["mkfs.ext4", "-q"], ["mkswap"])
    ):
        put(path, start, fs_image(d, "p", size, *cmd))
    with open(path, "rb") as f:
        return bytearray(f.read()), starts


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, MiB, 3 * MiB, 6 * MiB, 8 * MiB - 34 * 512]),
            st.integers(0, 17 * 1024),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_damaged_disks_still_map_completely(small_disk, edits):
    """Whatever is damaged, the map covers the disk and nothing but warnings escapes."""
    seed, _ = small_disk
    edits = [(min(base + off, len(seed) - 1), v) for base, off, v in edits]
    ext = mutate_and_run(seed, edits, used_extents)
    assert ext[0].start == 0 and ext[-1].end == len(seed)
    assert all(a.end == b.start for a, b in itertools.pairwise(ext))


@pytest.mark.parametrize(
    ("offset", "magic", "name"),
    [
        (3, b"EXFAT   ", "exfat"),
        (0x10040, b"_BHRfS_M", "btrfs"),
        (0, b"LUKS\xba\xbe", "crypto_LUKS"),
    ],
)
def test_recognised_but_unmapped_content_is_named_and_copied_whole(offset, magic, name, caplog):
    data = bytearray(os.urandom(256 * 1024))
    data[510:512] = b"\0\0"  # not an MBR
    data[offset : offset + len(magic)] = magic
    img = MemoryImage(data)
    from formats.filesystems import detect

    assert detect(img) == name
    with caplog.at_level(logging.WARNING):
        assert used_extents(img) == [formats.Extent(0, len(data), Kind.DATA)]
    assert f"no used-block map for {name}" in caplog.text
