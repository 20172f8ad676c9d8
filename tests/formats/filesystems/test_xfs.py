"""XFS used-block maps (allocation groups minus the bnobt's free extents): copies pass
xfs_repair -n and hold every file."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats.disk import used_extents
from formats.extents import Kind
from formats.fileio import punch_hole
from formats.filesystems import detect, ranges, xfs
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

SIZE = 64 * MiB
# mkfs.xfs refuses filesystems under 300 MB unless it believes it runs under xfstests
SMALL_OK = {**os.environ, "TEST_DEV": "1", "TEST_DIR": "1", "QA_CHECK_FS": "1"}


def protofile(tmp_path, files: dict[str, bytes]) -> str:
    """mkfs.xfs -p: the tree described in its prototype-file syntax."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    dirs: list[str] = []
    for rel in sorted(files, key=lambda r: (r.count("/"), r)):
        parts = rel.split("/")
        for depth in range(len(parts) - 1):
            d = "/".join(parts[: depth + 1])
            if d not in dirs:
                dirs.append(d)

    # the syntax nests: emit each directory's files, then its subdirectories, then "$"
    def emit(prefix: str, indent: int) -> None:
        for rel in sorted(files):
            head, _, name = rel.rpartition("/")
            if head == prefix:
                lines.append(" " * indent + f"{name} ---644 0 0 {tmp_path / 'tree' / rel}")
        for d in dirs:
            head, _, name = d.rpartition("/")
            if head == prefix:
                lines.append(" " * indent + f"{name} d--755 0 0")
                emit(d, indent + 1)
        lines.append(" " * indent + "$")

    emit("", 1)
    path = tmp_path / "proto"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def make_xfs(tmp_path, files: dict[str, bytes], options: list[str]) -> str:
    need_tool("mkfs.xfs")
    path = old_disk(tmp_path / "fs.img", SIZE)
    # -K: no discard, so free space keeps its old data
    run(
        "mkfs.xfs", "-q", "-f", "-K", *options, "-p", protofile(tmp_path, files), path, env=SMALL_OK
    )
    return path


@contextlib.contextmanager
def mounted(image: str, where):
    need_root()
    where.mkdir(exist_ok=True)
    run("mount", "-o", "loop,ro", image, str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def check_copy(tmp_path, src: str, files: dict[str, bytes], *, read_back: bool) -> None:
    with formats.open(src, "raw") as img:
        assert detect(img) == "xfs"
        r = xfs.used(img)
        used = ranges.covered(r)
    stored = sum(len(v) - v.count(bytes(1024)) * 1024 for v in files.values())  # holes aside
    assert stored < used < SIZE * 3 // 4
    out = str(tmp_path / "out.raw")
    stats = skip_unused(src, out)
    assert "copied whole" not in stats["stderr"]
    assert nonzero_bytes(out) <= grain_bytes(r)
    need_tool("xfs_repair")
    run("xfs_repair", "-n", "-f", out)
    if read_back:
        with mounted(out, tmp_path / "mnt") as m:
            for rel, data in files.items():
                assert (m / rel).read_bytes() == data, rel


@pytest.mark.parametrize(
    "options", [[], ["-b", "size=1024", "-d", "agcount=3"]], ids=["v5-4k", "v5-1k-3ags"]
)
def test_used_blocks_copy_passes_xfs_repair_and_holds_every_file(tmp_path, tree, options):
    src = make_xfs(tmp_path, tree, options)
    check_copy(tmp_path, src, tree, read_back=True)


def test_version_4_filesystem(tmp_path, tree):
    # the kernel may no longer mount V4: xfs_repair is the oracle here
    src = make_xfs(tmp_path, tree, ["-m", "crc=0"])
    check_copy(tmp_path, src, tree, read_back=False)


def test_fragmented_free_space_needs_a_two_level_tree(tmp_path, tree):
    """Holes punched in a big file leave thousands of free extents: the bnobt grows a level."""
    src = make_xfs(tmp_path, tree, ["-b", "size=1024", "-d", "agcount=2"])
    need_root()
    mnt = tmp_path / "rw"
    mnt.mkdir()
    run("mount", "-o", "loop", src, str(mnt))
    try:
        data = bytearray(os.urandom(12 * MiB))
        fd = os.open(mnt / "holes.bin", os.O_RDWR | os.O_CREAT)
        try:
            os.write(fd, data)
            os.fsync(fd)
            for off in range(0, len(data), 2048):
                punch_hole(fd, off, 1024)
                data[off : off + 1024] = bytes(1024)
        finally:
            os.close(fd)
    finally:
        run("umount", str(mnt))
    levels = run("xfs_db", "-r", "-c", "agf 0", "-c", "p bnolevel", src).stdout
    assert "bnolevel = 2" in levels
    free = int(run("xfs_db", "-r", "-c", "sb 0", "-c", "p fdblocks", src).stdout.split("=")[1])
    with formats.open(src, "raw") as img:
        used = ranges.covered(xfs.used(img))
    # fdblocks also counts the free-space trees' own blocks and the AG free lists, which
    # we keep; they are a small fraction
    assert SIZE - free * 1024 <= used <= SIZE - free * 1024 + 400 * 1024
    check_copy(tmp_path, src, {**tree, "holes.bin": bytes(data)}, read_back=True)


@pytest.fixture(scope="module")
def xfs_seed(tmp_path_factory):
    need_tool("mkfs.xfs")
    d = tmp_path_factory.mktemp("xfsseed")
    path = str(d / "x.img")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    run("mkfs.xfs", "-q", "-b", "size=1024", "-d", "agcount=2", path, env=SMALL_OK)
    with open(path, "rb") as f:
        return bytearray(f.read())


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.tuples(st.integers(0, 8 * 1024), st.integers(0, 255)), min_size=1, max_size=6),
    st.sampled_from([0, SIZE // 2]),
)
def test_damaged_superblock_agf_or_tree_raises_only_format_errors(xfs_seed, edits, ag_base):
    edits = [(ag_base + off, v) for off, v in edits]
    try:
        r = mutate_and_run(xfs_seed, edits, xfs.used)
    except formats.FormatError:
        return
    assert ranges.covered(r) <= len(xfs_seed)


def test_dirty_log_is_copied_whole_with_a_warning(tmp_path, tree, caplog):
    """Copied while mounted: the newest allocations are only in the log, so the on-disk
    free-space trees must not be trusted."""
    src = make_xfs(tmp_path, tree, [])
    need_root()
    mnt = tmp_path / "rw"
    mnt.mkdir()
    crashed = str(tmp_path / "crashed.img")
    run("mount", "-o", "loop", src, str(mnt))
    try:
        with open(mnt / "new.bin", "wb") as f:
            f.write(os.urandom(2 * MiB))
            f.flush()
            os.fsync(f.fileno())
        with open(src, "rb") as a, open(crashed, "wb") as b:
            b.write(a.read())
    finally:
        run("umount", str(mnt))
    with caplog.at_level(logging.WARNING), formats.open(crashed, "raw") as img:
        assert used_extents(img) == [formats.Extent(0, SIZE, Kind.DATA)]
    assert "log is dirty" in caplog.text
    with formats.open(src, "raw") as img:  # cleanly unmounted: mapped again
        assert ranges.covered(xfs.used(img)) < SIZE // 2
