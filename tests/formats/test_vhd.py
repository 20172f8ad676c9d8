"""formats/vhd.py against qemu-img/qemu-io (reading what they write, checking what we write)
and libvhdi (a second reader, the only one for differencing disks: qemu reads a VHD
differencing disk as if it had no parent)."""

import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
import formats.options
from formats import vhd
from formats.convert import convert
from formats.extents import Kind
from tests.external import HANG_SECONDS, need_module, qemu_img, qemu_io

MiB = 1 << 20

PATTERNS = [
    "write -P 0xab 0 64k",
    "write -P 0x11 1M 3M",  # the blocks that follow are for larger disks
    "write -P 0x22 7340544 1536",  # unaligned to blocks, sector aligned
    "write -P 0x33 30M 2M",
    "write -z 31M 256k",
]


def head_tail(path):
    data = Path(path).read_bytes()
    return data[:4096], data[-512:]


def qemu_raw(tmp_path, path, fmt="vpc"):
    out = str(tmp_path / (os.path.basename(path) + ".raw"))
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def make_qemu(tmp_path, name, size, *opts):
    path = str(tmp_path / name)
    args = ["create", "-q", "-f", "vpc"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, str(size))
    fits = [p for p in PATTERNS if formats.options.parse_size(p.split()[-2]) < size - 4 * MiB]
    qemu_io("vpc", path, *fits)
    return path


def pattern_raw(tmp_path, size=40 * MiB, name="src.raw"):
    """A sparse raw disk with data at block edges, inside blocks and at the end."""
    path = str(tmp_path / name)
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in ((0, 4096), (MiB + 17, 3 * MiB), (8 * MiB - 512, 1024), (size - 700, 700)):
            f.seek(off)
            f.write(rng.integers(1, 255, n, dtype=np.uint8).tobytes())
    return path


def libvhdi_read(path, parent=None):
    pyvhdi = need_module("pyvhdi", "libvhdi-python")
    f = pyvhdi.file()
    f.open(path)
    keep = []
    if parent is not None:
        p = pyvhdi.file()
        p.open(parent)
        f.set_parent(p)
        keep.append(p)
    try:
        return f.read_buffer_at_offset(f.get_media_size(), 0)
    finally:
        f.close()
        for p in keep:
            p.close()


# -- reading what qemu writes --------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [(), ("subformat=fixed",), ("force_size=on",), ("subformat=fixed", "force_size=on")],
    ids=["dynamic", "fixed", "dynamic-force", "fixed-force"],
)
def test_reads_qemu_images_like_qemu(tmp_path, opts):
    size = 33 * MiB + 12345 * 512
    path = make_qemu(tmp_path, "q.vhd", size, *opts)
    expected = qemu_raw(tmp_path, path)
    assert vhd.matches(*head_tail(path))  # fixed too, where qemu says raw
    with formats.open(path, "vpc") as img:
        assert img.size == len(expected)
        assert img.read(0, img.size) == expected
        assert img.check().corruptions == []
        data = [e for e in img.extents() if e.kind == Kind.DATA]
        assert data, "written ranges must be mapped as data"
        for e in img.extents():
            if e.kind == Kind.ZERO:
                assert expected[e.start : e.end].count(0) == e.length
        info = img.info()
        assert info["subformat"] == ("fixed" if "subformat=fixed" in opts else "dynamic")
        if info["subformat"] == "dynamic":
            assert info["cluster-size"] == 2 * MiB


def test_size_rule_follows_creator_and_max_geometry(tmp_path):
    """INTEROP.md: current size for win/qem2/d2v/CTXS/tap, or CHS 65535/16/255; CHS otherwise."""
    path = str(tmp_path / "a.vhd")
    with formats.create(path, "vpc", 100 * MiB, subformat="fixed", force_size=True) as img:
        assert img.size == 100 * MiB
    raw = bytearray(Path(path).read_bytes()[-512:])
    foot = vhd.Footer.parse(raw)
    chs = vhd.chs_bytes(
        (
            foot.disk_geometry.cylinders,
            foot.disk_geometry.heads,
            foot.disk_geometry.sectors_per_track,
        )
    )
    assert chs != 100 * MiB  # the spec's CHS rounds down here
    for creator, expect in (
        (b"win ", 100 * MiB),
        (b"d2v ", 100 * MiB),
        (b"CTXS", 100 * MiB),
        (b"tap\0", 100 * MiB),
        (b"qem2", 100 * MiB),
        (b"vpc ", chs),
        (b"qemu", chs),
    ):
        raw[28:32] = creator
        raw[64:68] = vhd.checksum(raw, 64).to_bytes(4, "big")
        with open(path, "r+b") as f:
            f.seek(100 * MiB)
            f.write(raw)
        with formats.open(path, "vpc") as img:
            assert img.size == expect, creator
    # a maximal CHS means the footer's size whatever the creator
    raw[56:60] = struct.pack(">HBB", 65535, 16, 255)
    raw[64:68] = vhd.checksum(raw, 64).to_bytes(4, "big")
    with open(path, "r+b") as f:
        f.seek(100 * MiB)
        f.write(raw)
    with formats.open(path, "vpc") as img:
        assert img.size == 100 * MiB


def test_geometry_matches_qemu_rounding(tmp_path):
    """Without force_size 1 GiB becomes 2081/16/63 (1,073,995,776 bytes), as qemu-img does."""
    path = str(tmp_path / "g.vhd")
    with formats.create(path, "vpc", 1 << 30) as img:
        assert img.size == 1_073_995_776
        assert img.info()["geometry"] == "2081/16/63"
    assert qemu_img("info", "--output=json", path).stdout.count("1073995776") >= 1


def test_reads_any_block_size(tmp_path):
    """qemu writes 2 MiB blocks only; other writers use 512 KiB (and we can be told to)."""
    src = pattern_raw(tmp_path)
    for bs in ("512k", "4M"):
        out = str(tmp_path / f"b{bs}.vhd")
        with formats.open(src, "raw") as s:
            convert(s, out, "vpc", options={"block_size": bs})
        with formats.open(out, "vpc") as img, formats.open(src, "raw") as s:
            assert img.info()["block-size"] == vhd.parse_size(bs)
            assert img.read(0, s.size) == s.read(0, s.size)
        assert libvhdi_read(out)[: os.path.getsize(src)] == Path(src).read_bytes()
        qemu_img("compare", "-f", "vpc", "-F", "raw", out, src)


# -- writing: qemu-img and libvhdi read what we write ---------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"subformat": "fixed"}, {"force_size": "on"}, {"subformat": "fixed", "cloud": "on"}],
    ids=["dynamic", "fixed", "force", "cloud"],
)
def test_written_images_equal_source_for_qemu_and_libvhdi(tmp_path, options):
    src = pattern_raw(tmp_path)
    out = str(tmp_path / "o.vhd")
    with formats.open(src, "raw") as s:
        convert(s, out, "vpc", options=options)
    expected = Path(src).read_bytes()
    qemu_img("compare", "-f", "vpc", "-F", "raw", out, src)
    theirs = libvhdi_read(out)
    assert theirs[: len(expected)] == expected
    assert theirs[len(expected) :].count(0) == len(theirs) - len(expected)
    with formats.open(out, "vpc") as img:
        assert img.read(0, len(expected)) == expected
        assert img.check().corruptions == []
    if options.get("cloud"):
        # Azure: fixed, a whole number of MiB, file = size + 512
        with formats.open(out, "vpc") as img:
            assert img.size % MiB == 0 and img.size >= len(expected)
            assert os.path.getsize(out) == img.size + 512
            assert img.info()["subformat"] == "fixed"
    if options.get("force_size"):
        with formats.open(out, "vpc") as img:
            assert img.size == len(expected)


def test_random_writes_match_a_bytearray_model(tmp_path):
    run_model(tmp_path)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 6 * MiB - 1), st.integers(1, 300_000), st.booleans(), st.integers(1, 255)
        ),
        min_size=1,
        max_size=8,
    ),
    sub=st.sampled_from(["dynamic", "fixed"]),
)
def test_random_writes_hypothesis(tmp_path, ops, sub):
    run_model(tmp_path, ops, sub)


def run_model(tmp_path, ops=None, sub="dynamic"):
    if ops is None:
        ops = [(100, 5000, False, 7), (2 * MiB - 10, 20, False, 9), (MiB, 2 * MiB, True, 0)]
    path = str(tmp_path / f"m-{sub}.vhd")
    if os.path.exists(path):
        os.unlink(path)
    size = 6 * MiB
    model = bytearray(size)
    with formats.create(path, "vpc", size, subformat=sub, force_size=True) as img:
        for off, n, zero, val in ops:
            n = min(n, size - off)
            if zero:
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                img.write(off, bytes([val]) * n)
                model[off : off + n] = bytes([val]) * n
        assert img.read(0, size) == bytes(model)
    with formats.open(path, "vpc") as img:
        assert img.read(0, size) == bytes(model)
    assert libvhdi_read(path)[:size] == bytes(model)


def test_zero_writes_leave_blocks_unallocated(tmp_path):
    path = str(tmp_path / "z.vhd")
    with formats.create(path, "vpc", 16 * MiB) as img:
        img.write_zeroes(0, 16 * MiB)
        img.write(4 * MiB, b"x" * 4096)
        assert img.info()["allocated-blocks"] == 1
    with formats.open(path, "vpc") as img:
        kinds = [(e.start, e.length, e.kind) for e in img.extents()]
        assert (4 * MiB, 2 * MiB, Kind.DATA) in kinds


def test_sequential_blocks_follow_each_other_with_data_block_aligned(tmp_path):
    """New blocks follow each other in file order, each sector bitmap placed so that the
    block's data starts on a 4 KiB filesystem block (the engine can share it)."""
    path = str(tmp_path / "c.vhd")
    with formats.create(path, "vpc", 16 * MiB) as img:
        img.write(0, b"\1" * 8 * MiB)
        offs = img.bat[:4].astype(int) * 512
        assert list(np.diff(offs)) == [2 * MiB + 4096] * 3
        assert all((o + 512) % 4096 == 0 for o in offs)
    raw = tmp_path / "c.raw"
    raw.write_bytes(b"\1" * 8 * MiB)
    os.truncate(raw, 16 * MiB)
    qemu_img("compare", "-f", "vpc", "-F", "raw", path, str(raw))


# -- differencing ----------------------------------------------------------------------


def test_differencing_written_and_read_back_with_parent(tmp_path):
    base_raw = pattern_raw(tmp_path, name="base.raw")
    base = str(tmp_path / "base.vhd")
    with formats.open(base_raw, "raw") as s:
        convert(s, base, "vpc")
    top = bytearray(Path(base_raw).read_bytes())
    top[5 * MiB : 5 * MiB + 3000] = b"T" * 3000  # partial block: bitmap bits
    top[MiB + 100 : MiB + 200] = bytes(100)  # zeros over parent data
    top[20 * MiB : 22 * MiB] = b"W" * (2 * MiB)  # a whole block
    top_raw = str(tmp_path / "top.raw")
    with open(top_raw, "wb") as f:
        f.write(top)
    child = str(tmp_path / "child.vhd")
    with formats.open(top_raw, "raw") as s:
        convert(s, child, "vpc", backing_file="base.vhd", backing_fmt="vpc")
    with formats.open(child, "vpc") as img:
        info = img.info()
        assert info["subformat"] == "differencing"
        assert info["parent"] == os.path.realpath(base)
        assert img.read(0, len(top)) == bytes(top)
    assert libvhdi_read(child, parent=base)[: len(top)] == bytes(top)
    # the child holds only what differs: far less than the parent
    assert os.stat(child).st_blocks < os.stat(base).st_blocks
    # qemu 7.2 reads a VHD differencing disk as if it had no parent (docs/formats/vhd.md):
    # this fails the day qemu learns to follow the locators, and the docs must say so
    res = qemu_img("compare", "-f", "vpc", "-F", "raw", child, top_raw, check=False)
    assert res.returncode == 1, res.stdout


def test_differencing_parent_escaping_directory_is_refused(tmp_path):
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    base = str(outside / "base.vhd")
    with formats.create(base, "vpc", 4 * MiB) as img:
        img.write(0, b"p" * 512)
    child = str(outside / "child.vhd")
    with formats.create(child, "vpc", 4 * MiB, backing_file="base.vhd") as img:
        img.write(MiB, b"c" * 512)
    moved = str(inside / "child.vhd")
    shutil.move(child, moved)
    # rewrite the relative locator to climb out of the directory
    with formats.open(moved, "vpc", allow_backing=False) as img:
        loc = next(e for e in img.header.parent_locator_entries if e.platform_code == b"W2ru")
    text = "..\\outside\\base.vhd".encode("utf-16-le")
    assert len(text) <= loc.platform_data_space
    with open(moved, "r+b") as f:
        f.seek(loc.platform_data_offset)
        f.write(text)
        hdr = bytearray(Path(moved).read_bytes()[512:1536])
        i = [e.platform_code for e in vhd.DynamicHeader.parse(hdr).parent_locator_entries].index(
            b"W2ru"
        )
        struct.pack_into(">I", hdr, 576 + 24 * i + 8, len(text))
        hdr[36:40] = vhd.checksum(hdr, 36).to_bytes(4, "big")
        f.seek(512)
        f.write(hdr)
    with pytest.raises(formats.UnsafeImage, match="outside the allowed"):
        formats.open(moved, "vpc")
    # allowed explicitly, it opens and reads through
    with formats.open(moved, "vpc", backing_dirs=(str(tmp_path),)) as img:
        assert img.read(0, 512) == b"p" * 512


def test_differencing_parent_with_other_identity_is_refused(tmp_path):
    base = str(tmp_path / "base.vhd")
    formats.create(base, "vpc", 4 * MiB).close()
    child = str(tmp_path / "child.vhd")
    formats.create(child, "vpc", 4 * MiB, backing_file="base.vhd").close()
    os.unlink(base)
    formats.create(base, "vpc", 4 * MiB).close()  # same name, new unique id
    with pytest.raises(formats.UnsafeImage, match="unique id"):
        formats.open(child, "vpc")


# -- hostile and broken files ------------------------------------------------------------


def corrupt(tmp_path, edit, sub="dynamic"):
    path = make_qemu(
        tmp_path, f"c-{sub}.vhd", 8 * MiB, *(("subformat=fixed",) if sub == "fixed" else ())
    )
    data = bytearray(Path(path).read_bytes())
    edit(data)
    bad = str(tmp_path / "bad.vhd")
    with open(bad, "wb") as f:
        f.write(data)
    return bad


def expect_error(path, match, *, on_read=True):
    t0 = time.monotonic()
    with pytest.raises(formats.FormatError, match=match) as exc:
        img = formats.open(path, "vpc")
        if on_read:
            with img:
                img.read(0, img.size)
                list(img.extents())
    assert "\n" not in str(exc.value)
    assert time.monotonic() - t0 < HANG_SECONDS
    return exc.value


def test_bad_cookie(tmp_path):
    def edit(d):
        d[0:8] = b"XXXXXXXX"
        d[-512:-504] = b"XXXXXXXX"

    expect_error(corrupt(tmp_path, edit), "conectix")


def test_bad_footer_checksum_is_reported_by_check_and_refused_on_read(tmp_path):
    def edit(d):
        d[0x40] ^= 0xFF  # footer copy's checksum

    bad = corrupt(tmp_path, edit)
    with formats.open(bad, "vpc") as img:
        res = img.check()
        assert res.exit_code == 2 and "checksum" in res.corruptions[0]
    expect_error(bad, "checksum")


def test_bad_header_checksum(tmp_path):
    def edit(d):
        d[512 + 36] ^= 1

    expect_error(corrupt(tmp_path, edit), "dynamic header checksum")


def test_bat_entry_out_of_range(tmp_path):
    def edit(d):
        d[1536:1540] = (0x7FFFFF00).to_bytes(4, "big")

    bad = corrupt(tmp_path, edit)
    with formats.open(bad, "vpc") as img:
        assert any("outside" in c for c in img.check().corruptions)
    expect_error(bad, "BAT entry 0")


def test_overlapping_blocks(tmp_path):
    def edit(d):
        d[1540:1544] = d[1536:1540]  # block 1 shares block 0's space

    bad = corrupt(tmp_path, edit)
    with formats.open(bad, "vpc") as img:
        assert any("overlap" in c for c in img.check().corruptions)


def test_fixed_disk_shorter_than_its_footer_says(tmp_path):
    def edit(d):
        foot = bytearray(d[-512:])
        foot[48:56] = (64 * MiB).to_bytes(8, "big")  # current size
        foot[28:32] = b"win "  # so the current size counts
        foot[64:68] = vhd.checksum(foot, 64).to_bytes(4, "big")
        d[-512:] = foot

    bad = corrupt(tmp_path, edit, sub="fixed")
    with formats.open(bad, "vpc") as img:
        assert img.check().exit_code == 2
    expect_error(bad, "truncated")


def test_truncated_dynamic_image(tmp_path):
    def edit(d):
        del d[len(d) - 2 * MiB :]

    expect_error(corrupt(tmp_path, edit), "outside|conectix|past")


def test_huge_bat_claims_fail_fast(tmp_path):
    def edit(d):
        hdr = d[512:1536]
        hdr[28:32] = (0xFFFFFFFF).to_bytes(4, "big")  # max_table_entries
        hdr[16:24] = (1 << 40).to_bytes(8, "big")  # table_offset
        hdr[36:40] = vhd.checksum(hdr, 36).to_bytes(4, "big")
        d[512:1536] = hdr

    expect_error(corrupt(tmp_path, edit), "BAT at")


def test_random_byte_damage_only_raises_format_errors(tmp_path):
    path = make_qemu(tmp_path, "f.vhd", 4 * MiB)
    seed = bytearray(Path(path).read_bytes())
    rng = np.random.default_rng(1)
    meta = list(range(0, 1536 + 512)) + list(range(len(seed) - 512, len(seed)))
    bad = str(tmp_path / "fz.vhd")
    for _ in range(150):
        data = bytearray(seed)
        for pos in rng.choice(meta, 4):
            data[pos] = int(rng.integers(0, 256))
        with open(bad, "wb") as f:
            f.write(data)
        try:
            with formats.open(bad, "vpc") as img:
                img.read(0, min(img.size, 8 * MiB))  # a damaged size may be huge
                list(img.extents())
                img.check()
                img.info()
        except formats.FormatError:
            pass


def test_unknown_options_refused(tmp_path):
    with pytest.raises(formats.FormatError, match="unknown options"):
        formats.create(str(tmp_path / "x.vhd"), "vpc", MiB, cluster_size="64k")
    with pytest.raises(formats.FormatError, match="cloud"):
        formats.create(str(tmp_path / "y.vhd"), "vpc", MiB, subformat="dynamic", cloud="on")
    with pytest.raises(formats.FormatError, match="2040 GiB"):
        formats.create(str(tmp_path / "z.vhd"), "vpc", 3 << 40)


def test_structures_round_trip_on_a_qemu_header(tmp_path):
    path = make_qemu(tmp_path, "r.vhd", 4 * MiB)
    raw = Path(path).read_bytes()[:1536]
    assert vhd.Footer.build(vhd.Footer.parse(raw[:512])) == raw[:512]
    assert vhd.DynamicHeader.build(vhd.DynamicHeader.parse(raw[512:])) == raw[512:]
    assert vhd.checksum(raw[:512], 64) == int.from_bytes(raw[64:68], "big")


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 4 * MiB - 1),
            st.integers(1, MiB + 5000),
            st.booleans(),
            st.integers(1, 255),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_random_writes_on_a_differencing_disk(tmp_path, ops):
    size = 4 * MiB
    base = str(tmp_path / "pbase.vhd")
    if not os.path.exists(base):
        with formats.create(base, "vpc", size, force_size=True) as img:
            img.write(0, np.random.default_rng(9).integers(1, 255, size, dtype=np.uint8).tobytes())
    with formats.open(base, "vpc") as img:
        model = bytearray(img.read(0, size))
    child = str(tmp_path / "pchild.vhd")
    if os.path.exists(child):
        os.unlink(child)
    with formats.create(child, "vpc", size, force_size=True, backing_file="pbase.vhd") as img:
        for off, n, zero, val in ops:
            n = min(n, size - off)
            if zero:
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                img.write(off, bytes([val]) * n)
                model[off : off + n] = bytes([val]) * n
    with formats.open(child, "vpc") as img:
        assert img.read(0, size) == bytes(model)
    assert libvhdi_read(child, parent=base)[:size] == bytes(model)


def rewrite_locators(path, entries):
    """Replace a child's parent locators with (code, text) pairs, written after the BAT."""
    data = bytearray(Path(path).read_bytes())
    hdr = vhd.DynamicHeader.parse(data[512:1536])
    pos = hdr.table_offset + -(-hdr.max_table_entries * 4 // 512) * 512
    out = []
    for code, text in entries:
        blob = text.encode("utf-8" if code == vhd.MACX else "utf-16-le")
        assert len(blob) <= 512
        data[pos : pos + 512] = blob.ljust(512, b"\0")
        out.append(
            {
                "platform_code": code,
                "platform_data_space": 512,
                "platform_data_length": len(blob),
                "reserved": 0,
                "platform_data_offset": pos,
            }
        )
        pos += 512
    blank = {
        "platform_code": bytes(4),
        "platform_data_space": 0,
        "platform_data_length": 0,
        "reserved": 0,
        "platform_data_offset": 0,
    }
    fields = dict(hdr)
    fields.pop("_io", None)
    fields["parent_locator_entries"] = out + [blank] * (8 - len(out))
    fields["parent_unicode_name"] = bytes(512)
    data[512:1536] = vhd.with_checksum(vhd.DynamicHeader, fields, vhd.HEADER_CHECKSUM_AT)
    Path(path).write_bytes(data)


@pytest.mark.parametrize(
    "entries",
    [
        [(b"W2ru", ".\\base.vhd")],
        [(b"MacX", "file://localhost{dir}/base.vhd")],
        [(b"W2ku", "C:\\Users\\someone\\disks\\base.vhd")],
        [(b"W2ru", ".\\gone.vhd"), (b"W2ku", "D:\\vms\\base.vhd")],
    ],
    ids=["W2ru", "MacX", "W2ku-file-name", "fallback"],
)
def test_parent_found_through_each_locator_kind(tmp_path, entries):
    base = str(tmp_path / "base.vhd")
    with formats.create(base, "vpc", 4 * MiB, force_size=True) as img:
        img.write(0, b"parent" * 1000)
    child = str(tmp_path / "child.vhd")
    with formats.create(child, "vpc", 4 * MiB, force_size=True, backing_file="base.vhd") as img:
        img.write(2 * MiB, b"child" * 1000)
    real_dir = os.path.realpath(tmp_path)
    rewrite_locators(child, [(c, t.format(dir=real_dir)) for c, t in entries])
    with formats.open(child, "vpc") as img:
        assert img.backing is not None and img.backing.path == os.path.realpath(base)
        assert img.read(0, 6000) == b"parent" * 1000
        assert img.read(2 * MiB, 5000) == b"child" * 1000


def test_parent_url_outside_the_directory_is_refused(tmp_path):
    base = str(tmp_path / "base.vhd")
    formats.create(base, "vpc", 4 * MiB).close()
    child = str(tmp_path / "child.vhd")
    formats.create(child, "vpc", 4 * MiB, backing_file="base.vhd").close()
    rewrite_locators(child, [(b"MacX", "file://localhost/etc/passwd")])
    with pytest.raises(formats.UnsafeImage, match="outside"):
        formats.open(child, "vpc")
