"""Linux swap: only the header page is used; a hibernation image keeps the whole area."""

from __future__ import annotations

import logging

import pytest

import formats
from formats.disk import used_extents
from formats.extents import Kind
from formats.filesystems import detect, ranges, swap
from tests.external import need_tool
from tests.formats.filesystems.fsbuild import MiB, nonzero_bytes, old_disk, run, skip_unused
from tests.formats.memimage import MemoryImage

SIZE = 16 * MiB


def make_swap(tmp_path) -> str:
    need_tool("mkswap")
    path = old_disk(tmp_path / "swap.img", SIZE)
    run("mkswap", "-L", "myswap", "-U", "11111111-2222-3333-4444-555555555555", path)
    return path


def test_only_the_header_page_is_copied_and_blkid_still_sees_the_swap(tmp_path):
    src = make_swap(tmp_path)
    with formats.open(src, "raw") as img:
        assert detect(img) == "swap"
        assert ranges.covered(swap.used(img)) == 4096
    out = str(tmp_path / "out.raw")
    skip_unused(src, out)
    assert nonzero_bytes(out) == 4096
    with open(src, "rb") as a, open(out, "rb") as b:
        assert a.read(4096) == b.read(4096)
    need_tool("blkid")
    probed = run("blkid", "-p", "-o", "export", out).stdout
    assert "TYPE=swap" in probed and "LABEL=myswap" in probed
    assert "UUID=11111111-2222-3333-4444-555555555555" in probed


def test_hibernation_image_is_kept_whole_with_a_warning(tmp_path, caplog):
    src = make_swap(tmp_path)
    with open(src, "r+b") as f:
        f.seek(4096 - 10)
        f.write(b"S1SUSPEND\0")
    with caplog.at_level(logging.WARNING), formats.open(src, "raw") as img:
        assert detect(img) == "swsuspend"
        assert used_extents(img) == [formats.Extent(0, SIZE, Kind.DATA)]
    assert "hibernation" in caplog.text


@pytest.mark.parametrize("data", [b"", b"\0" * 100, b"x" * 4086 + b"SWAPSPACE2"])
def test_truncated_or_garbage_headers_are_format_errors(data):
    with pytest.raises(formats.FormatError):
        swap.used(MemoryImage(data))
