import os

import pytest

import formats
from formats.extents import Kind

MiB = 1 << 20


def test_holes_are_mapped_and_zero_writes_punch_holes(tmp_path):
    path = str(tmp_path / "a.raw")
    with formats.create(path, "raw", 8 * MiB) as img:
        img.write(2 * MiB, os.urandom(MiB))
        img.write(5 * MiB, b"x" * MiB)
        img.write_zeroes(5 * MiB, MiB)
    with formats.open(path) as img:
        data = [(e.start, e.length) for e in img.extents() if e.kind == Kind.DATA]
        assert data == [(2 * MiB, MiB)]
        assert img.read(5 * MiB, MiB) == bytes(MiB)
    assert os.stat(path).st_blocks * 512 <= 2 * MiB


def test_reads_beyond_size_raise(tmp_path):
    path = str(tmp_path / "a.raw")
    with open(path, "wb") as f:
        f.write(b"abc")
    with formats.open(path) as img:
        assert img.read(0, 3) == b"abc"
        with pytest.raises(formats.FormatError):
            img.read(2, 2)


def test_create_refuses_existing_file(tmp_path):
    path = tmp_path / "a.raw"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        formats.create(str(path), "raw", MiB)
    assert path.read_bytes() == b"keep"


def test_probe_falls_back_to_raw(tmp_path):
    path = tmp_path / "x.img"
    path.write_bytes(b"\1" * 4096)
    assert formats.probe(str(path)) == "raw"
