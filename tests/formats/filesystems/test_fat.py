"""FAT12/16/32 used-cluster maps: copies of only the used clusters pass fsck.vfat and hold
every file (read back with mtools)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats.filesystems import detect, fat, ranges
from tests.external import need_tool
from tests.formats.filesystems.fsbuild import (
    MiB,
    grain_bytes,
    nonzero_bytes,
    old_disk,
    run,
    skip_unused,
)
from tests.formats.memimage import mutate_and_run

VARIANTS = {
    "fat12": (8 * MiB, ["-F", "12"]),
    "fat16": (32 * MiB, ["-F", "16"]),
    "fat32": (64 * MiB, ["-F", "32", "-s", "1"]),
}


def make_fat(tmp_path, size: int, options: list[str]) -> str:
    need_tool("mkfs.vfat", "mcopy", "mdel")
    path = old_disk(tmp_path / "fs.img", size)
    run("mkfs.vfat", *options, path)
    tree = tmp_path / "tree"
    run("mcopy", "-s", "-i", path, *(str(p) for p in tree.iterdir()), "::/")
    # a deleted file leaves its clusters free but still holding its data
    (tmp_path / "gone.bin").write_bytes(b"\x5a" * 300_000)
    run("mcopy", "-i", path, str(tmp_path / "gone.bin"), "::/gone.bin")
    run("mdel", "-i", path, "::/gone.bin")
    return path


def read_back(image: str, files: dict[str, bytes], where) -> dict[str, bytes]:
    where.mkdir()
    out = {}
    for rel in files:
        dst = where / rel.replace("/", "_")
        run("mcopy", "-n", "-i", image, f"::/{rel}", str(dst))
        out[rel] = dst.read_bytes()
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_used_clusters_copy_passes_fsck_and_holds_every_file(tmp_path, tree, variant):
    size, options = VARIANTS[variant]
    src = make_fat(tmp_path, size, options)
    with formats.open(src, "raw") as img:
        assert detect(img) == "vfat"
        g = fat._geometry(img.read(0, 512))
        assert g is not None and g["bits"] == int(variant[3:])
        r = fat.used(img)
        used = ranges.covered(r)
    assert sum(len(v) for v in tree.values()) < used < size * 3 // 4
    out = str(tmp_path / "out.raw")
    stats = skip_unused(src, out)
    assert "copied whole" not in stats["stderr"]
    assert nonzero_bytes(out) <= grain_bytes(r)
    need_tool("fsck.vfat")
    run("fsck.vfat", "-n", out)
    assert read_back(out, tree, tmp_path / "back") == tree
    with open(out, "rb") as f:
        assert b"\x5a" * 4096 not in f.read()  # the deleted file's data stayed behind


def test_map_matches_the_free_cluster_count(tmp_path, tree):
    src = make_fat(tmp_path, 32 * MiB, ["-F", "16", "-s", "4"])
    res = run("fsck.vfat", "-n", "-v", src).stdout
    # "/path: N files, USED/TOTAL clusters"
    used_clusters = int(res.strip().splitlines()[-1].split(",")[1].split("/")[0])
    with formats.open(src, "raw") as img:
        g = fat._geometry(img.read(0, 512))
        r = fat.used(img)
    cluster = g["spc"] * g["bps"]
    data_start = g["first_data"] * g["bps"]
    in_data = ranges.covered(ranges.clip(r, data_start, data_start + g["clusters"] * cluster))
    assert in_data == used_clusters * cluster


@pytest.fixture(scope="module")
def fat_seeds(tmp_path_factory):
    need_tool("mkfs.vfat", "mcopy")
    d = tmp_path_factory.mktemp("fatseed")
    (d / "f").write_bytes(b"x" * 70_000)
    seeds = []
    for bits, size in ((12, 2 * MiB), (16, 20 * MiB), (32, 40 * MiB)):
        path = str(d / f"f{bits}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        run("mkfs.vfat", "-F", str(bits), "-s", "1", path)
        run("mcopy", "-i", path, str(d / "f"), "::/f")
        with open(path, "rb") as f:
            seeds.append(bytearray(f.read()))
    return seeds


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(0, 2),
    st.lists(st.tuples(st.integers(0, 8192), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_damaged_boot_sector_or_fat_raises_only_format_errors(fat_seeds, which, edits):
    seed = fat_seeds[which]
    try:
        r = mutate_and_run(seed, edits, fat.used)
    except formats.FormatError:
        return
    assert ranges.covered(r) <= len(seed)
