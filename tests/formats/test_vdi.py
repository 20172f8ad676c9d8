"""formats/vdi.py against qemu-img/qemu-io: static and dynamic images both ways."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats import vdi
from formats.convert import convert
from formats.extents import Kind
from formats.options import parse_size
from tests.external import HANG_SECONDS, qemu_img, qemu_io

MiB = 1 << 20

PATTERNS = [
    "write -P 0xab 0 64k",
    "write -P 0x11 1M 3M",
    "write -P 0x22 7340544 1536",
    "write -z 2M 256k",
]


def make_qemu(tmp_path, name, size, *opts):
    path = str(tmp_path / name)
    args = ["create", "-q", "-f", "vdi"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, str(size))
    fits = [p for p in PATTERNS if parse_size(p.split()[-2]) + parse_size(p.split()[-1]) <= size]
    qemu_io("vdi", path, *fits)
    return path


def head_tail(path):
    data = Path(path).read_bytes()
    return data[:4096], data[-512:]


def qemu_raw(tmp_path, path):
    out = str(tmp_path / (os.path.basename(path) + ".raw"))
    qemu_img("convert", "-f", "vdi", "-O", "raw", path, out)
    return Path(out).read_bytes()


def pattern_raw(tmp_path, size=12 * MiB + 4096):
    path = str(tmp_path / "src.raw")
    rng = np.random.default_rng(3)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in ((0, 4096), (MiB + 17, 2 * MiB), (8 * MiB - 512, 1024), (size - 700, 700)):
            f.seek(off)
            f.write(rng.integers(1, 255, n, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("opts", [(), ("static=on",)], ids=["dynamic", "static"])
def test_reads_qemu_images_like_qemu(tmp_path, opts):
    path = make_qemu(tmp_path, "q.vdi", 9 * MiB + 512, *opts)
    expected = qemu_raw(tmp_path, path)
    assert vdi.matches(*head_tail(path))
    with formats.open(path, "vdi") as img:
        assert img.size == len(expected)
        assert img.read(0, img.size) == expected
        assert img.read(MiB - 7, 3 * MiB) == expected[MiB - 7 : 4 * MiB - 7]
        assert img.check().corruptions == []
        info = img.info()
        assert info["subformat"] == ("static" if opts else "dynamic")
        assert info["cluster-size"] == MiB
        for e in img.extents():
            if e.kind == Kind.ZERO:
                assert expected[e.start : e.end].count(0) == e.length
        if not opts:
            data = sum(e.length for e in img.extents() if e.kind == Kind.DATA)
            assert data == 5 * MiB  # blocks 0, 1, 2, 3 and 7


@pytest.mark.parametrize(
    "options", [{}, {"static": "on"}, {"subformat": "static"}], ids=["dynamic", "static", "alias"]
)
def test_written_images_pass_qemu_check_and_compare(tmp_path, options):
    src = pattern_raw(tmp_path)
    out = str(tmp_path / "o.vdi")
    with formats.open(src, "raw") as s:
        convert(s, out, "vdi", options=options)
    res = qemu_img("check", "-f", "vdi", out)
    assert "No errors" in res.stdout
    qemu_img("compare", "-f", "vdi", "-F", "raw", out, src)
    info = qemu_img("info", "--output=json", out).stdout
    assert str(os.path.getsize(src)) in info
    with formats.open(out, "vdi") as img:
        assert img.info()["subformat"] == ("dynamic" if not options else "static")
    if not options:
        # dynamic: only the written blocks take space
        assert os.stat(out).st_blocks * 512 < 3 * MiB


def test_rewriting_a_qemu_image_in_place(tmp_path):
    path = make_qemu(tmp_path, "w.vdi", 9 * MiB)
    expected = bytearray(qemu_raw(tmp_path, path))
    with formats.open(path, "vdi", writable=True) as img:
        img.write(6 * MiB - 3, b"Q" * 7)
        img.write_zeroes(MiB, MiB)
        img.write(8 * MiB, b"E" * MiB)
    expected[6 * MiB - 3 : 6 * MiB + 4] = b"Q" * 7
    expected[MiB : 2 * MiB] = bytes(MiB)
    expected[8 * MiB : 9 * MiB] = b"E" * MiB
    assert "No errors" in qemu_img("check", "-f", "vdi", path).stdout
    assert qemu_raw(tmp_path, path) == bytes(expected)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 5 * MiB - 1), st.integers(1, 2 * MiB), st.booleans(), st.integers(1, 255)
        ),
        min_size=1,
        max_size=8,
    ),
    static=st.booleans(),
)
def test_random_writes_match_a_bytearray_model(tmp_path, ops, static):
    path = str(tmp_path / f"m{static}.vdi")
    if os.path.exists(path):
        os.unlink(path)
    size = 5 * MiB
    model = bytearray(size)
    with formats.create(path, "vdi", size, static=static) as img:
        for off, n, zero, val in ops:
            n = min(n, size - off)
            if zero:
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                img.write(off, bytes([val]) * n)
                model[off : off + n] = bytes([val]) * n
    with formats.open(path, "vdi") as img:
        assert img.read(0, size) == bytes(model)
        assert img.check().corruptions == []


def test_zero_writes_leave_blocks_unallocated(tmp_path):
    path = str(tmp_path / "z.vdi")
    with formats.create(path, "vdi", 8 * MiB) as img:
        img.write_zeroes(0, 8 * MiB)
        img.write(3 * MiB, b"x")
    with formats.open(path, "vdi") as img:
        assert img.info()["allocated-blocks"] == 1


def corrupt(tmp_path, edit):
    path = make_qemu(tmp_path, "c.vdi", 9 * MiB)
    data = bytearray(Path(path).read_bytes())
    edit(data)
    bad = str(tmp_path / "bad.vdi")
    Path(bad).write_bytes(data)
    return bad


def expect_error(path, match):
    t0 = time.monotonic()
    with pytest.raises(formats.FormatError, match=match) as exc, formats.open(path, "vdi") as img:
        img.read(0, img.size)
    assert "\n" not in str(exc.value)
    assert time.monotonic() - t0 < HANG_SECONDS


def bmap_at(data):
    return int.from_bytes(data[340:344], "little")


def test_bad_signature(tmp_path):
    def edit(d):
        d[64:68] = b"\0\0\0\0"

    expect_error(corrupt(tmp_path, edit), "signature")


def test_block_map_entry_out_of_range(tmp_path):
    def edit(d):
        d[bmap_at(d) : bmap_at(d) + 4] = (5000).to_bytes(4, "little")

    bad = corrupt(tmp_path, edit)
    with formats.open(bad, "vdi") as img:
        assert any("out of range" in c for c in img.check().corruptions)
    # qemu-img agrees that this is corrupt
    assert qemu_img("check", "-f", "vdi", bad, check=False).returncode == 2
    expect_error(bad, "out of range")


def test_shared_blocks_and_wrong_count(tmp_path):
    def edit(d):
        at = bmap_at(d)
        d[at + 4 : at + 8] = d[at : at + 4]

    bad = corrupt(tmp_path, edit)
    with formats.open(bad, "vdi") as img:
        found = " ".join(img.check().corruptions)
        assert "several" in found


def test_truncated_image(tmp_path):
    def edit(d):
        del d[len(d) - 2 * MiB :]

    expect_error(corrupt(tmp_path, edit), "past the end")


def test_absurd_header_values_fail_fast(tmp_path):
    for field, value in ((376, 3), (384, 0xFFFFFFF0), (340, 0xFFFFFF00)):

        def edit(d, field=field, value=value):
            d[field : field + 4] = value.to_bytes(4, "little")

        expect_error(corrupt(tmp_path, edit), "block|outside")


def test_random_byte_damage_only_raises_format_errors(tmp_path):
    path = make_qemu(tmp_path, "f.vdi", 4 * MiB)
    seed = bytearray(Path(path).read_bytes())
    rng = np.random.default_rng(2)
    bad = str(tmp_path / "fz.vdi")
    for _ in range(200):
        data = bytearray(seed)
        for pos in rng.integers(0, 512 + 64, 4):
            data[int(pos)] = int(rng.integers(0, 256))
        Path(bad).write_bytes(data)
        try:
            with formats.open(bad, "vdi") as img:
                img.read(0, min(img.size, 8 * MiB))  # a damaged size may be huge
                list(img.extents())
                img.check()
                img.info()
        except formats.FormatError:
            pass


def test_header_round_trips_on_a_qemu_header(tmp_path):
    path = make_qemu(tmp_path, "r.vdi", 4 * MiB)
    raw = Path(path).read_bytes()[: vdi.HEADER_BYTES]
    assert vdi.Header.build(vdi.Header.parse(raw)) == raw


def test_options(tmp_path):
    with pytest.raises(formats.FormatError, match="unknown options"):
        formats.create(str(tmp_path / "a.vdi"), "vdi", MiB, compress=True)
    with pytest.raises(formats.FormatError, match="disagree"):
        formats.create(str(tmp_path / "b.vdi"), "vdi", MiB, static="off", subformat="static")
