"""formats.fileio: the small-file writer and preallocation."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import formats.fileio as fileio
from formats.fileio import PMD_SIZE, preallocate, pwrite_all, pwritev_all, write_file_atomic


def test_write_file_atomic_replaces_and_leaves_no_partial(tmp_path):
    path = tmp_path / "vm.xml"
    path.write_bytes(b"old")
    write_file_atomic(str(path), b"new definition")
    assert path.read_bytes() == b"new definition"
    assert sorted(os.listdir(tmp_path)) == ["vm.xml"]


def test_write_file_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "machine.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_file_atomic(str(path), "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["machine.json"]


def test_preallocate_keeps_size_and_reads_zeros(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDWR)
    try:
        assert preallocate(fd, 4096, 1 << 20)
        assert os.fstat(fd).st_size == 10
        assert os.fstat(fd).st_blocks * 512 >= 1 << 20  # the blocks are there
        os.pwrite(fd, b"y", (1 << 20) + 4095)
        assert os.pread(fd, 4096, 4096) == bytes(4096)
    finally:
        os.close(fd)


def test_contiguous_pieces_are_joined_and_written_in_one_call(tmp_path, monkeypatch):
    from formats import fileio

    segs = [(0, b"a" * 512), (512, b"b" * 4096), (8192, b"c" * 10), (8202, b"d")]
    assert [(o, len(b)) for o, b in fileio.contiguous(segs)] == [(0, 2), (8192, 2)]
    monkeypatch.setattr(fileio, "IOV_MAX", 1)
    assert [o for o, _ in fileio.contiguous(segs)] == [0, 512, 8192, 8202]
    monkeypatch.undo()
    calls = []
    real = os.pwritev
    monkeypatch.setattr(
        os, "pwritev", lambda fd, bufs, off: calls.append(off) or real(fd, bufs, off)
    )
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fileio.write_segments(fd, segs)
    finally:
        os.close(fd)
    assert calls == [0, 8192]
    data = path.read_bytes()
    assert data[:4608] == b"a" * 512 + b"b" * 4096 and data[8192:] == b"c" * 10 + b"d"
    assert data[4608:8192] == bytes(3584)


near_boundaries = st.one_of(
    st.integers(0, 4 * PMD_SIZE),
    st.sampled_from([0, PMD_SIZE, 3 * PMD_SIZE, 4096, PMD_SIZE - 4096, PMD_SIZE + 4096]),
)
lengths = st.one_of(
    st.integers(1, 5 * PMD_SIZE), st.sampled_from([1, 4096, PMD_SIZE, PMD_SIZE + 1, 3 * PMD_SIZE])
)


@settings(max_examples=60, deadline=None)
@given(near_boundaries, st.lists(lengths, min_size=1, max_size=3))
def test_writes_land_whole_and_no_call_covers_an_aligned_2mib_range(
    tmp_path_factory, offset, sizes
):
    # pwrite_all for one buffer, pwritev_all for several: every write of every format
    path = tmp_path_factory.mktemp("w") / "f"
    calls: list[tuple[int, int]] = []
    real = fileio._write_run

    def spy(fd: int, views: list, at: int) -> None:
        calls.append((at, sum(len(v) for v in views)))
        real(fd, views, at)

    bufs = [os.urandom(n) for n in sizes]
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fileio._write_run = spy
        try:
            if len(bufs) == 1:
                pwrite_all(fd, bufs[0], offset)
            else:
                pwritev_all(fd, bufs, offset)
        finally:
            fileio._write_run = real
        data = b"".join(bufs)
        assert os.pread(fd, len(data), offset) == data
    finally:
        os.close(fd)
    pos = offset
    for at, n in calls:  # in order, back to back
        assert at == pos
        pos += n
        first_boundary = -(-at // PMD_SIZE) * PMD_SIZE
        assert first_boundary + PMD_SIZE > at + n  # no whole aligned 2 MiB inside
    assert pos == offset + len(data)
    # one cut per aligned 2 MiB range inside the write, and no other
    first = -(-offset // PMD_SIZE) * PMD_SIZE
    inside = max(0, (offset + len(data) - first) // PMD_SIZE)
    assert len(calls) == 1 + inside
