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
