"""formats/vhdx against qemu-img/qemu-io and libvhdi: every subformat both ways, the
metadata log (replayed, or refused when it cannot be), differencing disks, damage."""

import hashlib
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
from formats import vhdx
from formats.convert import convert
from formats.extents import Kind
from formats.options import parse_size
from formats.vhdx import layout as L
from tests.external import HANG_SECONDS, need_module, qemu_img, qemu_io

MiB = 1 << 20

PATTERNS = [
    "write -P 0xab 0 64k",
    "write -P 0x11 1M 3M",
    "write -P 0x22 7340544 1536",
    "write -P 0x33 40M 2M",
    "write -z 41M 256k",
    "write -P 0x44 258M 1M",
]


def head_tail(path):
    data = Path(path).read_bytes()
    return data[:4096], data[-512:]


def make_qemu(tmp_path, name, size, *opts):
    path = str(tmp_path / name)
    args = ["create", "-q", "-f", "vhdx"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, str(size))
    fits = [p for p in PATTERNS if parse_size(p.split()[-2]) + parse_size(p.split()[-1]) <= size]
    qemu_io("vhdx", path, *fits)
    return path


def qemu_raw(tmp_path, path):
    out = str(tmp_path / (os.path.basename(path) + ".raw"))
    qemu_img("convert", "-f", "vhdx", "-O", "raw", path, out)
    return Path(out).read_bytes()


def pattern_raw(tmp_path, size=40 * MiB, name="src.raw"):
    path = str(tmp_path / name)
    rng = np.random.default_rng(5)
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
    p = None
    if parent is not None:
        p = pyvhdi.file()
        p.open(parent)
        f.set_parent(p)
    try:
        return f.read_buffer_at_offset(f.get_media_size(), 0)
    finally:
        f.close()
        if p is not None:
            p.close()


# -- reading what qemu writes ------------------------------------------------------------


@pytest.mark.parametrize(
    "size, opts",
    [
        (64 * MiB, ("subformat=dynamic", "block_size=1M", "log_size=1M")),
        (64 * MiB, ("subformat=dynamic", "block_size=32M", "log_size=2M")),
        (260 * MiB, ("subformat=dynamic", "block_size=256M")),
        (48 * MiB, ("subformat=fixed", "block_size=1M")),
        (64 * MiB, ("subformat=fixed", "block_size=32M", "log_size=1M")),
        (260 * MiB, ("subformat=dynamic",)),
    ],
    ids=["dyn-1M", "dyn-32M-log2M", "dyn-256M", "fixed-1M", "fixed-32M", "dyn-default"],
)
def test_reads_qemu_images_like_qemu(tmp_path, size, opts):
    path = make_qemu(tmp_path, "q.vhdx", size, *opts)
    expected = qemu_raw(tmp_path, path)
    assert vhdx.matches(*head_tail(path))
    with formats.open(path, "vhdx") as img:
        assert img.size == len(expected)
        assert img.read(0, img.size) == expected
        assert img.read(MiB - 5, 2 * MiB) == expected[MiB - 5 : 3 * MiB - 5]
        assert img.check().corruptions == []
        info = img.info()
        assert info["subformat"] == ("fixed" if "subformat=fixed" in opts else "dynamic")
        for o in opts:
            if o.startswith("block_size="):
                assert info["cluster-size"] == parse_size(o.split("=")[1])
            if o.startswith("log_size="):
                assert info["log-size"] == parse_size(o.split("=")[1])
        for e in img.extents():
            if e.kind == Kind.ZERO:
                assert expected[e.start : e.end].count(0) == e.length


# -- writing: qemu-img and libvhdi read what we write ----------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"block_size": "1M"},
        {"block_size": "32M", "log_size": "2M"},
        {"block_size": "256M"},
        {"subformat": "fixed", "block_size": "1M"},
        {"subformat": "fixed", "block_size": "32M", "block_state_zero": "off"},
        {},
    ],
    ids=["dyn-1M", "dyn-32M", "dyn-256M", "fixed-1M", "fixed-32M", "default"],
)
def test_written_images_pass_qemu_check_and_equal_source(tmp_path, options):
    src = pattern_raw(tmp_path)
    out = str(tmp_path / "o.vhdx")
    with formats.open(src, "raw") as s:
        convert(s, out, "vhdx", options=options)
    res = qemu_img("check", "-f", "vhdx", out)
    assert "No errors" in res.stdout
    qemu_img("compare", "-f", "vhdx", "-F", "raw", out, src)
    expected = Path(src).read_bytes()
    assert libvhdi_read(out) == expected
    with formats.open(out, "vhdx") as img:
        assert img.read(0, img.size) == expected
        assert img.check().corruptions == []
        if "block_size" in options:
            assert img.info()["block-size"] == parse_size(options["block_size"])
    # zero runs stay holes even inside written blocks
    assert os.stat(out).st_blocks * 512 < 12 * MiB


def test_logical_sector_4096(tmp_path):
    """qemu reads only 512-byte logical sectors; libvhdi and we read 4096."""
    src = pattern_raw(tmp_path)
    out = str(tmp_path / "4k.vhdx")
    with formats.open(src, "raw") as s:
        convert(s, out, "vhdx", options={"logical_sector_size": "4096", "block_size": "2M"})
    expected = Path(src).read_bytes()
    assert libvhdi_read(out) == expected
    with formats.open(out, "vhdx") as img:
        assert img.info()["logical-sector-size"] == 4096
        assert img.read(0, img.size) == expected


def test_rewriting_a_qemu_image_in_place(tmp_path):
    path = make_qemu(tmp_path, "w.vhdx", 64 * MiB, "block_size=1M")
    expected = bytearray(qemu_raw(tmp_path, path))
    with formats.open(path, "vhdx", writable=True) as img:
        img.write(6 * MiB - 3, b"Q" * 7)
        img.write_zeroes(MiB, MiB)
        img.write(50 * MiB, b"E" * MiB)
    expected[6 * MiB - 3 : 6 * MiB + 4] = b"Q" * 7
    expected[MiB : 2 * MiB] = bytes(MiB)
    expected[50 * MiB : 51 * MiB] = b"E" * MiB
    assert "No errors" in qemu_img("check", "-f", "vhdx", path).stdout
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
    sub=st.sampled_from(["dynamic", "fixed"]),
)
def test_random_writes_match_a_bytearray_model(tmp_path, ops, sub):
    path = str(tmp_path / f"m-{sub}.vhdx")
    if os.path.exists(path):
        os.unlink(path)
    size = 5 * MiB
    model = bytearray(size)
    with formats.create(path, "vhdx", size, subformat=sub, block_size="1M") as img:
        for off, n, zero, val in ops:
            n = min(n, size - off)
            if zero:
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                img.write(off, bytes([val]) * n)
                model[off : off + n] = bytes([val]) * n
    with formats.open(path, "vhdx") as img:
        assert img.read(0, size) == bytes(model)
        assert img.check().corruptions == []


# -- differencing ---------------------------------------------------------------------------


def make_child(tmp_path, base_name="base.vhdx"):
    base_raw = pattern_raw(tmp_path, name="base.raw")
    base = str(tmp_path / base_name)
    with formats.open(base_raw, "raw") as s:
        convert(s, base, "vhdx", options={"block_size": "1M"})
    top = bytearray(Path(base_raw).read_bytes())
    top[5 * MiB : 5 * MiB + 3000] = b"T" * 3000  # partial block: sector bitmap bits
    top[MiB + 100 : MiB + 200] = bytes(100)  # zeros over the parent's data
    top[2 * MiB : 3 * MiB] = bytes(MiB)  # a whole block of zeros over the parent's data
    top[20 * MiB : 22 * MiB] = b"W" * (2 * MiB)  # whole blocks
    top_raw = str(tmp_path / "top.raw")
    Path(top_raw).write_bytes(top)
    child = str(tmp_path / "child.vhdx")
    with formats.open(top_raw, "raw") as s:
        convert(
            s,
            child,
            "vhdx",
            backing_file=base_name,
            backing_fmt="vhdx",
            options={"block_size": "1M"},
        )
    return base, child, bytes(top)


def test_differencing_written_and_read_back_with_parent(tmp_path):
    base, child, top = make_child(tmp_path)
    with formats.open(child, "vhdx") as img:
        info = img.info()
        assert info["subformat"] == "differencing"
        assert info["parent"] == os.path.realpath(base)
        assert img.read(0, len(top)) == top
    assert libvhdi_read(child, parent=base) == top
    assert os.stat(child).st_blocks < os.stat(base).st_blocks
    # without its parent the child still opens for check/info
    with formats.open(child, "vhdx", allow_backing=False) as img:
        assert img.check().corruptions == []


def test_differencing_parent_changed_is_refused(tmp_path):
    base, child, _ = make_child(tmp_path)
    with formats.open(base, "vhdx", writable=True) as img:
        img.write(0, b"changed")  # a new DataWriteGuid
    with pytest.raises(formats.UnsafeImage, match="changed"):
        formats.open(child, "vhdx")


def test_differencing_parent_escaping_directory_is_refused(tmp_path):
    _base, child, _ = make_child(tmp_path)
    inside = tmp_path / "inside"
    inside.mkdir()
    moved = str(inside / "child.vhdx")
    shutil.move(child, moved)
    # rewrite the relative path to climb out, keeping its length
    data = bytearray(Path(moved).read_bytes())
    old = ".\\base.vhdx".encode("utf-16-le")
    new = "..\\ase.vhdx".encode("utf-16-le")
    assert len(old) == len(new)
    at = data.index(old)
    data[at : at + len(old)] = new
    Path(moved).write_bytes(data)
    with pytest.raises(formats.UnsafeImage, match="outside the allowed"):
        formats.open(moved, "vhdx")


# -- the log -----------------------------------------------------------------------------


def dirty_image(tmp_path):
    """A qemu image whose last BAT update is only in the log, as after a crash between
    the log flush and the in-place write: header LogGuid set, BAT entry stale."""
    path = make_qemu(tmp_path, "log.vhdx", 16 * MiB, "block_size=1M")
    with formats.open(path, "vhdx") as img:
        bat_offset, log_offset = img.bat_offset, img.header.log_offset
        payload = int(img.payload_index[1])
        assert img.states[1] == L.PAYLOAD_BLOCK_FULLY_PRESENT
    data = bytearray(Path(path).read_bytes())
    # qemu logs each update under a new LogGuid: the newest entry holds the whole BAT page
    newest, newest_at = None, 0
    for pos in range(0, MiB, 4096):
        hdr = L.LogEntryHeader.parse(data[log_offset + pos : log_offset + pos + 64])
        if hdr.signature == b"loge" and (
            newest is None or hdr.sequence_number > newest.sequence_number
        ):
            newest, newest_at = hdr, log_offset + pos
    assert newest is not None
    at = bat_offset + payload * 8
    data[at : at + 8] = (L.PAYLOAD_BLOCK_ZERO).to_bytes(8, "little")
    set_log_guid(data, bytes(newest.log_guid))
    bad = str(tmp_path / "dirty.vhdx")
    Path(bad).write_bytes(data)
    return path, bad, newest_at


def set_log_guid(data, guid, log_version=0):
    for at in L.HEADER_OFFSETS:
        h = bytearray(data[at : at + L.HEADER_SIZE])
        h[48:64] = guid
        h[64:66] = log_version.to_bytes(2, "little")
        data[at : at + L.HEADER_SIZE] = L.seal(h)


def test_dirty_log_is_replayed_in_memory_read_only(tmp_path):
    clean, dirty, _ = dirty_image(tmp_path)
    expected = qemu_raw(tmp_path, clean)
    before = hashlib.sha256(Path(dirty).read_bytes()).hexdigest()
    with formats.open(dirty, "vhdx") as img:
        assert img.info()["log-replayed-entries"] >= 1
        assert img.read(0, img.size) == expected
        assert img.read(MiB, 4) == b"\x11" * 4  # block 1 only reachable through the log
    assert hashlib.sha256(Path(dirty).read_bytes()).hexdigest() == before
    # qemu replays it too (check -r all), and agrees
    copy = str(tmp_path / "copy.vhdx")
    shutil.copy(dirty, copy)
    qemu_img("check", "-r", "all", "-f", "vhdx", copy, check=False)
    assert qemu_raw(tmp_path, copy) == expected


def test_dirty_log_is_replayed_on_disk_when_writable(tmp_path):
    clean, dirty, _ = dirty_image(tmp_path)
    expected = qemu_raw(tmp_path, clean)
    with formats.open(dirty, "vhdx", writable=True) as img:
        assert img.read(0, img.size) == expected
    assert "No errors" in qemu_img("check", "-f", "vhdx", dirty).stdout
    assert qemu_raw(tmp_path, dirty) == expected  # qemu opens it read-only: log is clean
    with formats.open(dirty, "vhdx") as img:
        assert img.header.log_guid == bytes(16)


def reseal_entry(data, log_offset, edit):
    hdr = L.LogEntryHeader.parse(data[log_offset : log_offset + 64])
    n = hdr.entry_length
    entry = bytearray(data[log_offset : log_offset + n])
    edit(entry)
    data[log_offset : log_offset + n] = L.seal(entry)


def test_log_claiming_a_longer_file_is_refused(tmp_path):
    _, dirty, log_offset = dirty_image(tmp_path)
    data = bytearray(Path(dirty).read_bytes())
    reseal_entry(data, log_offset, lambda e: struct.pack_into("<Q", e, 48, 1 << 40))
    Path(dirty).write_bytes(data)
    t0 = time.monotonic()
    with pytest.raises(formats.CorruptImage, match="truncated"):
        formats.open(dirty, "vhdx")
    assert time.monotonic() - t0 < HANG_SECONDS


def test_log_writing_into_the_headers_is_refused(tmp_path):
    _, dirty, log_offset = dirty_image(tmp_path)
    data = bytearray(Path(dirty).read_bytes())
    reseal_entry(data, log_offset, lambda e: struct.pack_into("<Q", e, 64 + 16, 64 * 1024))
    Path(dirty).write_bytes(data)
    with pytest.raises(formats.CorruptImage, match=r"cannot replay|outside"):
        formats.open(dirty, "vhdx")


def test_log_of_unknown_version_is_refused(tmp_path):
    _, dirty, _ = dirty_image(tmp_path)
    data = bytearray(Path(dirty).read_bytes())
    h = L.Header.parse(data[L.HEADER_OFFSETS[0] :])
    set_log_guid(data, bytes(h.log_guid), log_version=1)
    Path(dirty).write_bytes(data)
    with pytest.raises(formats.UnsupportedFeature, match="log"):
        formats.open(dirty, "vhdx")


def test_torn_log_entry_is_not_replayed(tmp_path):
    """A bad checksum means the entry never completed: the file's own metadata stands."""
    _clean, dirty, entry_at = dirty_image(tmp_path)
    data = bytearray(Path(dirty).read_bytes())
    data[entry_at + 100] ^= 0xFF
    Path(dirty).write_bytes(data)
    with formats.open(dirty, "vhdx") as img:
        assert "log-replayed-entries" not in img.info()
        assert img.read(MiB, 4) == bytes(4)  # the stale (zero) BAT entry


# -- hostile and broken files ---------------------------------------------------------------


def corrupt(tmp_path, edit, size=8 * MiB):
    path = make_qemu(tmp_path, "c.vhdx", size, "block_size=1M")
    data = bytearray(Path(path).read_bytes())
    edit(data)
    bad = str(tmp_path / "bad.vhdx")
    Path(bad).write_bytes(data)
    return bad


def expect_error(path, match):
    t0 = time.monotonic()
    with pytest.raises(formats.FormatError, match=match) as exc, formats.open(path, "vhdx") as img:
        img.read(0, img.size)
    assert "\n" not in str(exc.value)
    assert time.monotonic() - t0 < HANG_SECONDS


def test_bad_file_signature(tmp_path):
    def edit(d):
        d[0:8] = b"vhdxfilf"

    expect_error(corrupt(tmp_path, edit), "vhdxfile")


def test_one_bad_header_falls_back_to_the_other(tmp_path):
    def edit(d):
        d[L.HEADER_OFFSETS[1] + 40] ^= 1  # the newer header (qemu writes both)

    bad = corrupt(tmp_path, edit)
    with formats.open(bad, "vhdx") as img:
        assert img.read(MiB, 4) == b"\x11" * 4


def test_both_headers_bad(tmp_path):
    def edit(d):
        for at in L.HEADER_OFFSETS:
            d[at + 40] ^= 1

    expect_error(corrupt(tmp_path, edit), "no valid header")


def test_both_region_tables_bad(tmp_path):
    def edit(d):
        for at in L.REGION_TABLE_OFFSETS:
            d[at + 20] ^= 1

    expect_error(corrupt(tmp_path, edit), "region table")


def test_bat_entry_out_of_range_and_overlaps(tmp_path):
    def edit(d):
        bat = 2 * MiB  # qemu's layout (checked below)
        d[bat + 8 : bat + 16] = ((1 << 40) | 6).to_bytes(8, "little")

    bad = corrupt(tmp_path, edit)
    with formats.open(bad, "vhdx") as img:
        assert img.bat_offset == 2 * MiB
        assert any("outside" in c for c in img.check().corruptions)
    expect_error(bad, "outside")

    def edit2(d):
        bat = 2 * MiB
        d[bat + 16 : bat + 24] = d[bat + 8 : bat + 16]  # block 2 shares block 1's space

    bad = corrupt(tmp_path, edit2)
    with formats.open(bad, "vhdx") as img:
        assert any("overlap" in c for c in img.check().corruptions)


def test_truncated_image(tmp_path):
    def edit(d):
        del d[len(d) - 2 * MiB :]

    expect_error(corrupt(tmp_path, edit), "outside|past")


def test_random_byte_damage_only_raises_format_errors(tmp_path):
    path = make_qemu(tmp_path, "f.vhdx", 4 * MiB, "block_size=1M")
    seed = bytearray(Path(path).read_bytes())
    rng = np.random.default_rng(4)
    areas = [
        (0, 600),
        (L.HEADER_OFFSETS[0], 80),
        (L.REGION_TABLE_OFFSETS[0], 80),
        (3 * MiB, 256),
        (3 * MiB + 64 * 1024, 64),
        (2 * MiB, 64),
    ]
    bad = str(tmp_path / "fz.vhdx")
    for i in range(120):
        data = bytearray(seed)
        start, n = areas[i % len(areas)]
        for pos in rng.integers(start, start + n, 3):
            data[int(pos)] = int(rng.integers(0, 256))
        # keep checksums right half of the time, so damage gets past them
        if i % 2:
            for at in L.HEADER_OFFSETS:
                data[at : at + L.HEADER_SIZE] = L.seal(bytearray(data[at : at + L.HEADER_SIZE]))
            for at in L.REGION_TABLE_OFFSETS:
                data[at : at + L.REGION_TABLE_SIZE] = L.seal(
                    bytearray(data[at : at + L.REGION_TABLE_SIZE])
                )
        Path(bad).write_bytes(data)
        try:
            with formats.open(bad, "vhdx") as img:
                img.read(0, min(img.size, 8 * MiB))  # a damaged size may be huge
                list(img.extents())
                img.check()
                img.info()
        except formats.FormatError:
            pass


def test_structures_round_trip_on_a_qemu_file(tmp_path):
    path = make_qemu(tmp_path, "r.vhdx", 4 * MiB)
    data = Path(path).read_bytes()
    h = data[L.HEADER_OFFSETS[0] : L.HEADER_OFFSETS[0] + 80]
    assert L.Header.build(L.Header.parse(h)) == h
    assert L.checksum(
        data[L.HEADER_OFFSETS[0] : L.HEADER_OFFSETS[0] + L.HEADER_SIZE]
    ) == int.from_bytes(h[4:8], "little")
    r = data[L.REGION_TABLE_OFFSETS[0] : L.REGION_TABLE_OFFSETS[0] + 48]
    assert L.RegionTableHeader.build(L.RegionTableHeader.parse(r)) == r[:16]
    assert L.RegionTableEntry.build(L.RegionTableEntry.parse(r[16:])) == r[16:48]


def test_options(tmp_path):
    for opts, match in (
        ({"block_size": "3M"}, "power of two"),
        ({"block_size": "512M"}, "power of two"),
        ({"log_size": "1500k"}, "log_size"),
        ({"logical_sector_size": "1024"}, "512 or 4096"),
        ({"subformat": "sparse"}, "subformat"),
        ({"bogus": "1"}, "unknown options"),
    ):
        with pytest.raises(formats.FormatError, match=match):
            formats.create(str(tmp_path / "o.vhdx"), "vhdx", MiB, **opts)
        assert not os.path.exists(tmp_path / "o.vhdx")


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
    base = str(tmp_path / "pbase.vhdx")
    if not os.path.exists(base):
        with formats.create(base, "vhdx", size, block_size="1M") as img:
            img.write(0, np.random.default_rng(9).integers(1, 255, size, dtype=np.uint8).tobytes())
    with formats.open(base, "vhdx") as img:
        model = bytearray(img.read(0, size))
    child = str(tmp_path / "pchild.vhdx")
    if os.path.exists(child):
        os.unlink(child)
    with formats.create(child, "vhdx", size, block_size="1M", backing_file="pbase.vhdx") as img:
        for off, n, zero, val in ops:
            n = min(n, size - off)
            if zero:
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                img.write(off, bytes([val]) * n)
                model[off : off + n] = bytes([val]) * n
    with formats.open(child, "vhdx") as img:
        assert img.read(0, size) == bytes(model)
    assert libvhdi_read(child, parent=base) == bytes(model)


def test_disk_id_option_is_the_virtual_disk_id_and_refuses_garbage(tmp_path):
    guid = "{6F1B2C3D-4E5F-4071-8293-A4B5C6D7E8F9}"
    with formats.create(str(tmp_path / "a.vhdx"), "vhdx", MiB, disk_id=guid) as img:
        pass
    with formats.open(str(tmp_path / "a.vhdx")) as img:
        assert img.info()["virtual-disk-id"] == guid
    with pytest.raises(formats.FormatError, match="invalid disk_id"):
        formats.create(str(tmp_path / "b.vhdx"), "vhdx", MiB, disk_id="nope")
    assert not (tmp_path / "b.vhdx").exists()
