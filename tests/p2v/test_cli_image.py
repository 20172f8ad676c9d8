"""The image commands as a user runs them: exit codes, one-line errors, no partial output."""

from __future__ import annotations

import json
import os

import pytest

from tests.external import p2v, qemu_img, qemu_io

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(os.urandom(2 * MiB))
    return str(path)


def one_line_error(res):
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("p2v: error: ")
    assert "Traceback" not in res.stderr
    return lines[0]


def test_convert_then_info_json_matches_qemu_img(disk, tmp_path):
    out = str(tmp_path / "out.qcow2")
    p2v("convert", "-O", "qcow2", disk, out, check=True)
    ours = json.loads(p2v("info", "--output", "json", out, check=True).stdout)
    theirs = json.loads(qemu_img("info", "--output=json", out).stdout)
    for key in ("virtual-size", "format", "cluster-size"):
        assert ours[key] == theirs[key], key
    qemu_img("check", out)
    qemu_img("compare", disk, out)


@pytest.mark.parametrize("cache", ["unsafe", "writeback"])
def test_convert_cache_modes_write_the_same_image(disk, tmp_path, cache):
    out = str(tmp_path / "out.qcow2")
    p2v("convert", "-t", cache, "-O", "qcow2", disk, out, check=True)
    qemu_img("check", out)
    qemu_img("compare", disk, out)


def test_compare_exit_codes_and_first_difference(disk, tmp_path):
    other = tmp_path / "other.raw"
    with open(disk, "rb") as f:
        data = bytearray(f.read())
    data[5 * MiB + 3] ^= 0xFF
    other.write_bytes(data)
    assert p2v("compare", disk, disk).returncode == 0
    res = p2v("compare", disk, str(other))
    assert res.returncode == 1
    assert f"offset {5 * MiB + 3}" in res.stdout


def test_map_json_covers_whole_image(disk):
    entries = json.loads(p2v("map", "--output", "json", disk, check=True).stdout)
    assert entries[0]["start"] == 0
    assert sum(e["length"] for e in entries) == 16 * MiB
    assert any(e["data"] and e["start"] <= MiB < e["start"] + e["length"] for e in entries)


def test_create_takes_size_from_backing(tmp_path):
    base = str(tmp_path / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "32M")
    top = str(tmp_path / "top.qcow2")
    p2v("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, check=True)
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert info["virtual-size"] == 32 * MiB
    assert info["backing-filename"] == "base.qcow2"
    qemu_img("check", top)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["convert", "-O", "nosuchfmt", "{disk}", "{out}"], "unknown format"),
        (["convert", "-O", "qcow2", "{missing}", "{out}"], "no such file"),
        (["convert", "-O", "raw", "{disk}", "{disk}", "--force"], "same file"),
        (["convert", "-O", "raw", "{disk}", "{exists}"], "output exists"),
        (["convert", "-O", "qcow2", "-o", "cluster_size=3", "{disk}", "{out}"], "cluster"),
        (["convert", "-O", "qcow2", "-o", "bogus=1", "{disk}", "{out}"], "bogus"),
        (["info", "-f", "qcow2", "{disk}"], "qcow2"),
        (["convert", "-f", "qcow2", "-O", "raw", "{truncated}", "{out}"], "qcow2"),
        (["create", "-f", "raw", "{out}", "12X"], "size"),
    ],
)
def test_bad_input_is_one_line_error_and_leaves_no_output(tmp_path, disk, args, expect):
    truncated = tmp_path / "trunc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(truncated), "64M")
    qemu_io("qcow2", str(truncated), "write -P 1 0 1M")
    truncated.write_bytes(truncated.read_bytes()[:200_000])
    exists = tmp_path / "exists.raw"
    exists.write_bytes(b"keep")
    names = dict(
        disk=disk,
        out=str(tmp_path / "out.img"),
        missing=str(tmp_path / "missing.raw"),
        exists=str(exists),
        truncated=str(truncated),
    )
    res = p2v(*[a.format(**names) for a in args])
    line = one_line_error(res)
    assert expect.lower() in line.lower()
    assert not os.path.exists(names["out"])
    assert not os.path.exists(names["out"] + ".partial")
    assert exists.read_bytes() == b"keep"


def test_check_exit_code_for_unsupported_format(disk):
    assert p2v("check", disk).returncode == 63


@pytest.mark.parametrize("extra", [[], ["-o", "compression_type=zstd"]])
def test_convert_compressed_is_compressed_and_equal(disk, tmp_path, extra):
    out = str(tmp_path / "out.qcow2")
    text = tmp_path / "text.raw"
    with open(text, "wb") as f:
        f.truncate(16 * MiB)
        f.write(b"compressible text " * 100_000)
    p2v("convert", "-c", "-O", "qcow2", *extra, str(text), out, check=True)
    res = qemu_img("check", "--output=json", out)
    assert json.loads(res.stdout)["compressed-clusters"] > 0
    qemu_img("compare", str(text), out)
    assert os.path.getsize(out) < MiB


def test_convert_with_backing_writes_only_what_differs(disk, tmp_path):
    base = str(tmp_path / "base.qcow2")
    p2v("convert", "-O", "qcow2", disk, base, check=True)
    changed = tmp_path / "changed.raw"
    with open(disk, "rb") as f:
        data = bytearray(f.read())
    data[8 * MiB : 8 * MiB + 4096] = os.urandom(4096)
    data[MiB : MiB + 65536] = bytes(65536)  # data in the base that became zeros
    changed.write_bytes(data)
    top = str(tmp_path / "top.qcow2")
    p2v("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", str(changed), top, check=True)
    qemu_img("check", top)
    qemu_img("compare", str(changed), top)
    own = [
        e
        for e in json.loads(qemu_img("map", "--output=json", top).stdout)
        if e["depth"] == 0 and (e["data"] or e["zero"]) and e["start"] < 16 * MiB
    ]
    # only the two changed 64 KiB clusters live in the overlay
    assert sum(e["length"] for e in own) == 2 * 65536, own


def test_progress_bar_reaches_the_end(disk, tmp_path):
    res = p2v("convert", "-p", "-O", "qcow2", disk, str(tmp_path / "out.qcow2"), check=True)
    assert "100%" in res.stderr


def _refcount_entry(path: str, cluster: int) -> int:
    """File offset of a cluster's 16-bit refcount (a fresh qemu-img image: one block)."""
    with open(path, "rb") as f:
        header = f.read(104)
        reftable = int.from_bytes(header[48:56], "big")
        f.seek(reftable)
        block = int.from_bytes(f.read(8), "big")
    return block + 2 * cluster


@pytest.mark.parametrize("damage, code", [("leak", 3), ("corrupt", 2)])
def test_check_exit_codes_match_qemu_img(tmp_path, damage, code):
    img = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io("qcow2", img, "write -P 7 0 1M")
    size = os.path.getsize(img)
    with open(img, "r+b") as f:
        if damage == "leak":
            # a cluster past the end that the refcounts claim: leaked
            f.truncate(size + 65536)
            f.seek(_refcount_entry(img, size // 65536))
            f.write((1).to_bytes(2, "big"))
        else:
            # the header cluster with a refcount of 0: in use but unaccounted, corrupt
            f.seek(_refcount_entry(img, 0))
            f.write((0).to_bytes(2, "big"))
    assert qemu_img("check", img, check=False).returncode == code
    res = p2v("check", img)
    assert res.returncode == code, res.stdout + res.stderr
    as_json = p2v("check", "--output", "json", img)
    assert as_json.returncode == code
    json.loads(as_json.stdout)
