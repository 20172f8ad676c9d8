"""NTFS used-cluster maps ($Bitmap through the MFT): copies pass ntfsfix and hold every
file (read back with ntfscat)."""

from __future__ import annotations

import logging
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats.disk import used_extents
from formats.extents import Kind
from formats.filesystems import detect, ntfs, ranges
from tests.external import need_tool
from tests.formats.filesystems.fsbuild import (
    MiB,
    grain_bytes,
    nonzero_bytes,
    old_disk,
    run,
    skip_unused,
)
from tests.formats.memimage import MemoryImage, mutate_and_run

SIZE = 64 * MiB


def make_ntfs(tmp_path, files: dict[str, bytes], options=()) -> str:
    need_tool("mkntfs", "ntfscp")
    path = old_disk(tmp_path / "fs.img", SIZE)
    run("mkntfs", "-q", "-F", "-Q", *options, path)  # -Q: free space keeps its old data
    for rel in files:
        if "/" in rel:
            continue  # ntfscp cannot make directories
        run("ntfscp", "-q", path, str(tmp_path / "tree" / rel), rel)
    return path


@pytest.mark.parametrize("cluster", [4096, 512, 65536])
def test_used_clusters_copy_passes_ntfsfix_and_holds_every_file(tmp_path, tree, cluster):
    files = {k: v for k, v in tree.items() if "/" not in k}
    src = make_ntfs(tmp_path, files, ["-c", str(cluster)])
    with formats.open(src, "raw") as img:
        assert detect(img) == "ntfs"
        r = ntfs.used(img)
        used = ranges.covered(r)
    assert sum(len(v) for v in files.values()) < used < SIZE // 2
    out = str(tmp_path / "out.raw")
    stats = skip_unused(src, out)
    assert "copied whole" not in stats["stderr"]
    assert nonzero_bytes(out) <= grain_bytes(r)
    need_tool("ntfsfix", "ntfscat")
    run("ntfsfix", "--no-action", out)
    for rel, data in files.items():
        assert _cat(out, rel) == data, rel


def _cat(image: str, rel: str) -> bytes:
    res = subprocess.run(["ntfscat", image, rel], capture_output=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_map_matches_ntfsinfo_free_clusters(tmp_path, tree):
    need_tool("ntfsinfo")
    src = make_ntfs(tmp_path, {k: v for k, v in tree.items() if "/" not in k})
    info = run("ntfsinfo", "-m", src).stdout
    total = int(info.split("Volume Size in Clusters:")[1].split()[0])
    free = int(info.split("Free Clusters:")[1].split()[0])
    with formats.open(src, "raw") as img:
        r = ntfs.used(img)
    assert ranges.covered(ranges.clip(r, 0, total * 4096)) == (total - free) * 4096


@pytest.fixture(scope="module")
def ntfs_seed(tmp_path_factory):
    need_tool("mkntfs", "ntfscp")
    d = tmp_path_factory.mktemp("ntfsseed")
    (d / "f").write_bytes(b"y" * 50_000)
    path = str(d / "n.img")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    run("mkntfs", "-q", "-F", "-Q", "-c", "1024", path)
    run("ntfscp", "-q", path, str(d / "f"), "f")
    with formats.open(path, "raw") as img:
        _, record, mft, _ = ntfs._geometry(img)
    with open(path, "rb") as f:
        return bytearray(f.read()), mft, record


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.integers(0, 8 * 1024), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
def test_damaged_boot_sector_or_mft_raises_only_format_errors(ntfs_seed, edits, in_mft):
    seed, mft, record = ntfs_seed
    if in_mft:  # records 0 and 6, and their neighbours
        edits = [(mft + off % (8 * record), v) for off, v in edits]
    else:
        edits = [(off % 512, v) for off, v in edits]
    try:
        r = mutate_and_run(seed, edits, ntfs.used)
    except formats.FormatError:
        return
    assert ranges.covered(r) <= len(seed)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=8))
def test_damaged_bitmap_record_after_fixups_raises_only_format_errors(ntfs_seed, edits):
    """Past the update sequence check, attribute headers and run lists are still hostile."""
    seed, mft, record = ntfs_seed
    rec = ntfs.read_record(MemoryImage(seed), mft + 6 * record, record, "record 6")
    for off, value in edits:
        rec[off % record] = value
    try:
        a, part, pos = ntfs.find_data(rec, "record 6")
        if a.non_resident:
            ntfs._runs_of(rec, a, part, pos, 4096)
    except formats.FormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(1, 1 << 40))
def test_run_lists_are_validated(raw, clusters):
    try:
        runs = ntfs.decode_runs(raw, clusters)
    except formats.FormatError:
        return
    for length, lcn in runs:
        assert length > 0
        assert lcn is None or (lcn >= 0 and lcn + length <= clusters)


def _restart_page(flags: int) -> bytes:
    """A $LogFile restart page (with its update sequence applied) whose only client is
    in use: what Windows leaves while the volume is mounted or hibernated."""
    page = bytearray(4096)
    header = {
        "magic": b"RSTR",
        "usa_ofs": 0x1E,
        "usa_count": 9,
        "chkdsk_lsn": 0,
        "system_page_size": 4096,
        "log_page_size": 4096,
        "restart_area_offset": 0x30,
        "minor_ver": 1,
        "major_ver": 1,
    }
    page[: ntfs.RestartPageHeader.sizeof()] = ntfs.RestartPageHeader.build(header)
    area = {
        "current_lsn": 0x1000,
        "log_clients": 1,
        "client_free_list": 0xFFFF,
        "client_in_use_list": 0,
        "flags": flags,
    }
    page[0x30 : 0x30 + ntfs.RestartArea.sizeof()] = ntfs.RestartArea.build(area)
    usn = 1
    for i in range(8):  # the update sequence: each sector ends in the USN
        end = (i + 1) * 512
        page[0x20 + 2 * i : 0x22 + 2 * i] = page[end - 2 : end]
        page[end - 2 : end] = usn.to_bytes(2, "little")
    page[0x1E:0x20] = usn.to_bytes(2, "little")
    return bytes(page)


def _logfile_offset(path: str) -> int:
    with formats.open(path, "raw") as img:
        cluster, record, mft, clusters = ntfs._geometry(img)
        rec0 = ntfs.read_record(img, mft, record, "$MFT")
        a, nr, pos = ntfs.find_data(rec0, "$MFT")
        runs = ntfs._runs_of(rec0, a, nr, pos, clusters)
        rec2 = ntfs.read_record(img, ntfs.record_offset(runs, 2, record, cluster), record, "2")
        a, nr, pos = ntfs.find_data(rec2, "$LogFile")
        return ntfs._runs_of(rec2, a, nr, pos, clusters)[0][1] * cluster


@pytest.mark.parametrize("clean", [False, True])
def test_logfile_in_use_is_copied_whole_unless_marked_clean(tmp_path, tree, caplog, clean):
    files = {k: v for k, v in tree.items() if "/" not in k}
    src = make_ntfs(tmp_path, files)
    page = _restart_page(ntfs.RESTART_VOLUME_IS_CLEAN if clean else 0)
    at = _logfile_offset(src)
    with open(src, "r+b") as f:
        for off in (0, 4096):
            f.seek(at + off)
            f.write(page)
    if not clean:  # ntfs-3g agrees: it refuses to mount this volume read-write
        need_tool("ntfs-3g.probe")
        assert subprocess.run(["ntfs-3g.probe", "--readwrite", src]).returncode != 0
    with caplog.at_level(logging.WARNING), formats.open(src, "raw") as img:
        ext = used_extents(img)
    if clean:
        assert len(ext) > 1 and "LogFile" not in caplog.text
    else:
        assert ext == [formats.Extent(0, SIZE, Kind.DATA)]
        assert "$LogFile is not clean" in caplog.text
