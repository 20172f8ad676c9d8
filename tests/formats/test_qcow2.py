"""formats/qcow2 against qemu-img and qemu-io: every variant qemu makes is read byte for
byte like `qemu-img convert -O raw` and mapped like `qemu-img map`; everything we write
passes `qemu-img check` and equals its source under `qemu-img compare`; damaged images
fail fast with a FormatError."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

import formats
from formats import qcow2
from formats.convert import convert
from formats.extents import Kind
from formats.qcow2 import layout as L
from tests.external import HANG_SECONDS, qemu_img, qemu_io, run

MiB = 1 << 20
KiB = 1 << 10

PATTERNS = [
    "write -P 0xab 0 64k",
    "write -P 0x11 1M 3M",
    "write -P 0x22 5M 4k",  # a subcluster with extended L2 entries
    "write -P 0x33 7340544 1536",  # unaligned, across a cluster boundary
    "write -z 2M 256k",
]


def qemu_create(path, size, *opts, backing=None):
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    qemu_img(*args, str(path), str(size))
    return str(path)


def qemu_raw(tmp_path, path, *extra):
    out = str(tmp_path / (os.path.basename(path) + ".raw"))
    if os.path.exists(out):
        os.unlink(out)
    qemu_img("convert", *extra, "-O", "raw", path, out)
    return Path(out).read_bytes()


def qemu_map(path):
    res = qemu_img("map", "--output=json", path)
    return [(e["start"], e["start"] + e["length"], e["data"]) for e in json.loads(res.stdout)]


def data_ranges(items):
    """Coalesced (start, end) ranges that hold data."""
    out: list[list[int]] = []
    for s, e, data in items:
        if not data:
            continue
        if out and out[-1][1] == s:
            out[-1][1] = e
        else:
            out.append([s, e])
    return [tuple(r) for r in out]


def our_map(img):
    return [(e.start, e.end, e.kind == Kind.DATA) for e in img.extents()]


def head_tail(path):
    data = Path(path).read_bytes()
    return data[:4096], data[-512:]


def assert_like_qemu(tmp_path, path, *, raw_opts=()):
    expected = qemu_raw(tmp_path, path, *raw_opts)
    with formats.open(path) as img:
        assert img.format == "qcow2"
        assert img.size == len(expected)
        assert img.read(0, img.size) == expected
        # unaligned reads across clusters and runs
        for off, n in ((MiB - 7, 3 * MiB), (7340000, 2000), (img.size - 1000, 1000)):
            if off + n <= img.size:
                assert img.read(off, n) == expected[off : off + n]
        assert data_ranges(our_map(img)) == data_ranges(qemu_map(path))
        for e in img.extents():
            if e.kind == Kind.ZERO:
                assert expected[e.start : e.end].count(0) == e.length
        assert img.check().exit_code == 0, img.check()
        return img.info()


def qemu_check(path, cwd=None):
    # qemu 7.2 resolves a relative data file name against its working directory
    res = run(["qemu-img", "check", "--output=json", path], cwd=cwd)
    report = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    assert res.returncode == 0, f"qemu-img check {path}: {res.stdout}{res.stderr}"
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


# ---------------------------------------------------------------------------------------
# reading what qemu writes


@pytest.mark.parametrize(
    "opts, size",
    [
        (("compat=0.10",), 9 * MiB),
        (("cluster_size=512",), 8 * MiB + 512),
        (("cluster_size=4k", "refcount_bits=1"), 9 * MiB),
        (("cluster_size=64k", "refcount_bits=8"), 9 * MiB),
        (("cluster_size=2M", "refcount_bits=64"), 9 * MiB),
        (("cluster_size=4k", "refcount_bits=2", "compat=1.1"), 8 * MiB),
        (("extended_l2=on",), 9 * MiB),
        (("extended_l2=on", "cluster_size=16k", "refcount_bits=32"), 9 * MiB),
        (("lazy_refcounts=on",), 9 * MiB),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v),
)
def test_reads_qemu_images_like_qemu(tmp_path, opts, size):
    path = qemu_create(tmp_path / "q.qcow2", size, *opts)
    qemu_io("qcow2", path, *PATTERNS)
    assert qcow2.matches(*head_tail(path))
    info = assert_like_qemu(tmp_path, path)
    qinfo = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["cluster-size"] == qinfo["cluster-size"]
    for key, value in qinfo["format-specific"]["data"].items():
        assert info[key] == value, key


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_reads_compressed_clusters(tmp_path, ctype):
    src = qemu_create(tmp_path / "src.qcow2", 9 * MiB)
    qemu_io("qcow2", src, *PATTERNS)
    path = str(tmp_path / "c.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, path)
    qemu_io("qcow2", path, "write -P 0x5a 6M 64k")  # an uncompressed cluster among them
    assert _l2_word(Path(path).read_bytes(), 0) & L.OFLAG_COMPRESSED
    with formats.open(path) as img:
        assert img.info()["compression-type"] == ctype
        assert img.read(MiB, 64 * KiB) == b"\x11" * 64 * KiB
    # small clusters: several compressed clusters share a host cluster
    raw = str(tmp_path / "c.raw")
    qemu_img("convert", "-O", "raw", path, raw)
    qemu_io("raw", raw, "write -P 0x77 8M 64k")
    mixed = str(tmp_path / "m.qcow2")
    opts = f"compression_type={ctype},cluster_size=4k"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", opts, raw, mixed)
    for p in (path, mixed):
        assert_like_qemu(tmp_path, p)


def test_backing_chain_of_three_reads_through_and_zero_flags_hide_it(tmp_path):
    base = qemu_create(tmp_path / "base.qcow2", 8 * MiB)
    qemu_io("qcow2", base, "write -P 0x11 0 8M")
    mid = qemu_create(tmp_path / "mid.qcow2", 8 * MiB, backing="base.qcow2")
    qemu_io("qcow2", mid, "write -P 0x22 1M 1M", "write -z 3M 64k")
    top = qemu_create(tmp_path / "top.qcow2", 10 * MiB, "extended_l2=on", backing="mid.qcow2")
    qemu_io("qcow2", top, "write -P 0x33 1536k 4k", "write -z 5M 8k", "write -P 0x44 9M 64k")
    info = assert_like_qemu(tmp_path, top)
    assert info["backing-filename"] == "mid.qcow2"
    assert info["backing-format"] == "qcow2"
    with formats.open(top) as img:
        assert img.read(3 * MiB, 64 * KiB) == bytes(64 * KiB)  # mid's zero flag over base
        assert img.read(5 * MiB, 8 * KiB) == bytes(8 * KiB)
        assert img.read(5 * MiB + 8 * KiB, 4) == b"\x11" * 4
        assert img.read(8 * MiB, 4) == bytes(4)  # past the backing's end


def test_backing_cycles_and_escapes_are_refused(tmp_path):
    a = qemu_create(tmp_path / "a.qcow2", MiB)
    b = qemu_create(tmp_path / "b.qcow2", MiB, backing="a.qcow2")
    _set_backing(a, "b.qcow2")
    with pytest.raises(formats.UnsafeImage, match="cycle"):
        formats.open(b)
    _set_backing(a, "../../etc/passwd")
    with pytest.raises(formats.UnsafeImage, match="outside"):
        formats.open(a)
    with formats.open(a, allow_backing=False) as img:  # check and info still work
        assert img.info()["backing-filename"] == "../../etc/passwd"
        assert img.read(0, 512) == bytes(512)


def _set_backing(path, name):
    """Point a qemu-made image's backing name elsewhere (qemu-img rebase -u would probe)."""
    data = bytearray(Path(path).read_bytes())
    hdr = L.Header.parse(data)
    off = hdr.backing_file_offset or 0x200
    enc = name.encode()
    data[off : off + len(enc)] = enc
    struct.pack_into(">QI", data, 8, off, len(enc))
    Path(path).write_bytes(data)


def test_external_data_file(tmp_path):
    # qemu-img creates the data file relative to its working directory: name it fully
    data = str(tmp_path / "d.raw")
    path = qemu_create(tmp_path / "d.qcow2", 8 * MiB, f"data_file={data}")
    qemu_io("qcow2", path, *PATTERNS[:4])
    info = assert_like_qemu(tmp_path, path)
    assert info["data-file"] == data and info["data-file-raw"] is False
    with formats.open(path) as img:
        assert sorted(img.files()) == sorted([path, str(tmp_path / "d.raw")])


def test_internal_snapshots_are_listed_and_readable(tmp_path):
    path = qemu_create(tmp_path / "s.qcow2", 8 * MiB)
    qemu_io("qcow2", path, "write -P 0x11 0 2M")
    qemu_img("snapshot", "-c", "first", path)
    with formats.open(path) as img:  # L2 tables shared: every cluster counts twice
        assert img.check().exit_code == 0, img.check()
    qemu_io("qcow2", path, "write -P 0x22 1M 2M")
    qemu_img("snapshot", "-c", "second", path)
    qemu_io("qcow2", path, "write -z 0 64k")
    info = assert_like_qemu(tmp_path, path)
    names = [s["name"] for s in info["snapshots"]]
    assert names == ["first", "second"]
    assert {"id", "vm-state-size", "date", "clock"} <= set(info["snapshots"][0])
    expected = qemu_raw(tmp_path, path, "-l", "snapshot.name=first")
    with formats.open(path) as img:
        snap = img.snapshot("first")
        assert snap.size == img.size
        assert snap.read(0, snap.size) == expected
        assert data_ranges(our_map(snap)) == [(0, 2 * MiB)]
        assert img.snapshot("2").read(MiB, 4) == b"\x22" * 4  # by id
        with pytest.raises(formats.FormatError, match="no snapshot"):
            img.snapshot("third")
    with pytest.raises(formats.UnsupportedFeature, match="snapshots"):
        formats.open(path, writable=True)


def test_lazy_refcounts_left_dirty_read_checked_and_repaired(tmp_path):
    path = qemu_create(tmp_path / "lazy.qcow2", 8 * MiB, "lazy_refcounts=on")
    res = run(["qemu-io", "-c", "write -P 0x11 0 1M", "-c", "sigraise 9", path])
    assert res.returncode != 0  # killed before it wrote its refcounts back
    with formats.open(path) as img:
        assert img.info()["dirty-flag"] is True
        assert img.read(0, MiB) == b"\x11" * MiB
        result = img.check()
        assert result.exit_code == 2
        assert "dirty" in result.corruptions[0]
    with formats.open(path, writable=True) as img:  # opening for writing repairs
        img.write(2 * MiB, b"\x22" * 4096)
    qemu_check(path)
    assert qemu_raw(tmp_path, path)[2 * MiB : 2 * MiB + 4096] == b"\x22" * 4096


# ---------------------------------------------------------------------------------------
# writing


def model_raw(tmp_path, size):
    """A raw source with data, holes and an unaligned tail."""
    path = str(tmp_path / "src.raw")
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in ((0, 4096), (MiB + 17, 2 * MiB), (5 * MiB, 64 * KiB), (size - 700, 700)):
            f.seek(off)
            f.write(rng.integers(1, 255, n, dtype=np.uint8).tobytes())
        f.seek(6 * MiB)
        f.write(b"compressible text " * 20000)
    return path


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"compat": "0.10"},
        {"cluster_size": "512"},
        {"cluster_size": "4k", "refcount_bits": "1"},
        {"cluster_size": "2M", "refcount_bits": "64"},
        {"cluster_size": "16k", "refcount_bits": "2", "extended_l2": "on"},
        {"compress": True},
        {"compress": True, "compression_type": "zstd", "cluster_size": "4k", "refcount_bits": "4"},
        {"compress": True, "cluster_size": "512", "refcount_bits": "1"},
        {"lazy_refcounts": "on", "preallocation": "metadata"},
        {"data_file": "out.data"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_converted_images_pass_qemu_check_and_compare(tmp_path, opts):
    src_path = model_raw(tmp_path, 9 * MiB + 512)
    out = str(tmp_path / "out.qcow2")
    with formats.open(src_path, "raw") as src:
        convert(src, out, "qcow2", options=dict(opts))
    qemu_check(out, cwd=tmp_path)
    assert run(["qemu-img", "compare", src_path, out], cwd=tmp_path).returncode == 0
    qinfo = json.loads(run(["qemu-img", "info", "--output=json", out], cwd=tmp_path).stdout)
    assert qinfo["cluster-size"] == formats.options.parse_size(opts.get("cluster_size", "64k"))
    if opts.get("compress"):
        res = run(["qemu-img", "check", out])
        assert "0.00% compressed" not in res.stdout
    with formats.open(out) as img:
        assert img.check().exit_code == 0
        assert img.read(0, img.size) == Path(src_path).read_bytes()


def test_writes_in_place_partial_and_zero_on_qemu_image(tmp_path):
    path = qemu_create(tmp_path / "q.qcow2", 8 * MiB, "cluster_size=4k")
    qemu_io("qcow2", path, *PATTERNS[:4])
    model = bytearray(qemu_raw(tmp_path, path))
    with formats.open(path, writable=True) as img:
        for off, data in ((MiB + 100, b"X" * 10000), (0, b"Y"), (8 * MiB - 3, b"end")):
            img.write(off, data)
            model[off : off + len(data)] = data
        img.write_zeroes(MiB + 5000, 300000)
        model[MiB + 5000 : MiB + 305000] = bytes(300000)
        assert img.read(0, img.size) == model
    qemu_check(path)
    assert qemu_raw(tmp_path, path) == model


def test_overlay_writes_keep_backing_visible_and_zeroes_hide_it(tmp_path):
    base = qemu_create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io("qcow2", base, "write -P 0x11 0 4M")
    for compat in ("1.1", "0.10"):
        top = str(tmp_path / f"top{compat}.qcow2")
        with qcow2.create(
            top, 4 * MiB, backing_file="base.qcow2", backing_fmt="qcow2", compat=compat
        ) as img:
            img.write(100, b"abc")  # read-modify-write over the backing's cluster
            img.write_zeroes(MiB, 128 * KiB)
            img.write_zeroes(2 * MiB + 10, 20)
        qemu_check(top)
        raw = qemu_raw(tmp_path, top)
        want = bytearray(b"\x11" * 4 * MiB)
        want[100:103] = b"abc"
        want[MiB : MiB + 128 * KiB] = bytes(128 * KiB)
        want[2 * MiB + 10 : 2 * MiB + 30] = bytes(20)
        assert raw == want
        info = json.loads(qemu_img("info", "--output=json", top).stdout)
        assert info["backing-filename"] == "base.qcow2"


def test_extended_l2_subcluster_writes_over_backing(tmp_path):
    base = qemu_create(tmp_path / "base.qcow2", 2 * MiB)
    qemu_io("qcow2", base, "write -P 0x11 0 2M")
    top = str(tmp_path / "top.qcow2")
    model = bytearray(b"\x11" * 2 * MiB)
    with qcow2.create(top, 2 * MiB, backing_file="base.qcow2", extended_l2=True) as img:
        for off, n, v in ((4096, 2048, 0x22), (70000, 10, 0x33), (200000, 300000, 0x44)):
            img.write(off, bytes([v]) * n)
            model[off : off + n] = bytes([v]) * n
        img.write_zeroes(600 * KiB, 6 * KiB)
        model[600 * KiB : 606 * KiB] = bytes(6 * KiB)
    qemu_check(top)
    assert qemu_raw(tmp_path, top) == model
    m = qemu_map(top)
    # only the subclusters written are allocated in top: the rest reads through
    assert any(s == 4096 and e == 6144 for s, e, _ in m)
    with formats.open(top) as img:
        assert img.read(0, img.size) == model


def test_resize_grows_and_shrinks(tmp_path):
    path = qemu_create(tmp_path / "r.qcow2", 4 * MiB, "cluster_size=512")
    qemu_io("qcow2", path, "write -P 0x11 0 4M")
    with formats.open(path, writable=True) as img:
        img.resize(64 * MiB + 1000)  # the L1 table grows
        assert img.size == 64 * MiB + 1024
        img.write(60 * MiB, b"z" * 4096)
    qemu_check(path)
    raw = qemu_raw(tmp_path, path)
    assert raw[: 4 * MiB] == b"\x11" * 4 * MiB and raw[4 * MiB : 60 * MiB].count(0) == 56 * MiB
    with formats.open(path, writable=True) as img:
        img.resize(MiB + 512)
        img.resize(2 * MiB)  # what was cut off must not come back
    qemu_check(path)
    raw = qemu_raw(tmp_path, path)
    assert raw == b"\x11" * (MiB + 512) + bytes(MiB - 512)


def test_create_options(tmp_path):
    with pytest.raises(formats.FormatError, match="bogus"):
        qcow2.create(str(tmp_path / "a"), MiB, bogus=1)
    with pytest.raises(formats.FormatError, match="power of two"):
        qcow2.create(str(tmp_path / "b"), MiB, cluster_size="3")
    with pytest.raises(formats.FormatError, match=r"compat=1\.1"):
        qcow2.create(str(tmp_path / "c"), MiB, compat="0.10", compression_type="zstd")
    with pytest.raises(formats.UnsupportedFeature, match="encrypted"):
        qcow2.create(str(tmp_path / "d"), MiB, **{"encrypt.format": "luks"})
    assert not any(tmp_path.iterdir())  # nothing half-made stays behind
    path = str(tmp_path / "e.qcow2")
    with qcow2.create(path, 2 << 40, cluster_size="2M") as img:  # 2 TiB, sparse
        img.write((2 << 40) - 4096, b"x" * 4096)
    assert os.path.getsize(path) < 16 * MiB
    qemu_check(path)


def test_compressed_cluster_that_does_not_shrink_is_stored_plain(tmp_path):
    path = str(tmp_path / "c.qcow2")
    rnd = np.random.default_rng(0).integers(0, 255, 64 * KiB, dtype=np.uint8).tobytes()
    chunk = rnd + b"a" * 64 * KiB
    with qcow2.create(path, MiB, compress=True) as img:
        img.write_encoded(0, img.encode(0, chunk))
    qemu_check(path)
    data = Path(path).read_bytes()
    assert not _l2_word(data, 0) & L.OFLAG_COMPRESSED  # random: stored as it is
    assert _l2_word(data, 1) & L.OFLAG_COMPRESSED
    assert qemu_raw(tmp_path, path)[: 128 * KiB] == chunk


def test_huge_sparse_image_stays_small_in_memory(tmp_path):
    path = str(tmp_path / "h.qcow2")
    t0 = time.monotonic()
    with qcow2.create(path, 2 << 40) as img:
        for i in range(8):
            img.write(i * (256 << 30), b"q" * 65536)
        assert len(img.rc.counts) < 1 << 16  # refcounts follow the host file, not 2 TiB
    with formats.open(path) as img:
        kinds = list(img.extents())
        assert sum(e.length for e in kinds if e.kind == Kind.DATA) == 8 * 65536
    assert time.monotonic() - t0 < HANG_SECONDS
    qemu_check(path)


# ---------------------------------------------------------------------------------------
# hostile input


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    d = tmp_path_factory.mktemp("victim")
    path = qemu_create(d / "v.qcow2", 4 * MiB)
    qemu_io("qcow2", path, "write -P 0x11 0 1M")
    comp = str(d / "c.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", path, comp)
    return Path(path).read_bytes(), Path(comp).read_bytes()


def _corrupt(tmp_path, data, edits, *, truncate=None):
    buf = bytearray(data)
    for off, value in edits:
        buf[off : off + len(value)] = value
    if truncate is not None:
        del buf[truncate:]
    p = tmp_path / "bad.qcow2"
    p.write_bytes(buf)
    return str(p)


def _l2_offset(data):
    hdr = L.Header.parse(data)
    return (
        int.from_bytes(data[hdr.l1_table_offset : hdr.l1_table_offset + 8], "big") & L.OFFSET_MASK
    )


@pytest.mark.parametrize(
    "case",
    [
        "truncated header",
        "bad magic",
        "cluster_bits",
        "header_length",
        "L1 past EOF",
        "L1 too big",
        "L2 misaligned",
        "refcount table out of range",
        "snapshot count",
        "backing name length",
        "extension length",
        "incompatible bit",
        "encrypted",
        "compressed outside",
        "truncated data",
    ],
)
def test_damaged_images_fail_fast_with_format_error(tmp_path, victim, case):
    plain, comp = victim
    hdr = L.Header.parse(plain)
    be64 = lambda v: v.to_bytes(8, "big")  # noqa: E731
    be32 = lambda v: v.to_bytes(4, "big")  # noqa: E731
    l2 = _l2_offset(plain)
    cases = {
        "truncated header": (plain, [], 50),
        "bad magic": (plain, [(0, b"QFI\0")], None),
        "cluster_bits": (plain, [(20, be32(30))], None),
        "header_length": (plain, [(100, be32(4096 * 64))], None),
        "L1 past EOF": (plain, [(40, be64(len(plain) + 65536))], None),
        "L1 too big": (plain, [(36, be32(1 << 30))], None),
        "L2 misaligned": (plain, [(hdr.l1_table_offset, be64(l2 + 512 | L.OFLAG_COPIED))], None),
        "refcount table out of range": (plain, [(48, be64(1 << 40))], None),
        "snapshot count": (plain, [(60, be32(1 << 20))], None),
        "backing name length": (plain, [(8, be64(512)), (16, be32(5000))], None),
        "extension length": (plain, [(hdr.header_length + 4, be32(1 << 30))], None),
        "incompatible bit": (plain, [(72, be64(1 << 40))], None),
        "encrypted": (plain, [(32, be32(2))], None),
        "compressed outside": (
            comp,
            [(_l2_offset(comp), be64(L.OFLAG_COMPRESSED | (1 << 50) - 1))],
            None,
        ),
        "truncated data": (plain, [], len(plain) - 65536 * 8),
    }
    data, edits, cut = cases[case]
    path = _corrupt(tmp_path, data, edits, truncate=cut)
    t0 = time.monotonic()
    with pytest.raises(formats.FormatError) as exc, formats.open(path, "qcow2") as img:
        img.read(0, img.size)
    assert time.monotonic() - t0 < HANG_SECONDS
    assert "\n" not in str(exc.value)
    if case in ("incompatible bit", "encrypted"):
        assert isinstance(exc.value, formats.UnsupportedFeature)


def test_check_reports_leaks_and_corruptions_like_qemu(tmp_path, victim):
    plain, _ = victim
    hdr = L.Header.parse(plain)
    rb = int.from_bytes(plain[hdr.refcount_table_offset : hdr.refcount_table_offset + 8], "big")
    # a leak: the L1 table's cluster counted twice; a corruption: a data cluster's count 0
    l1_cluster = hdr.l1_table_offset // 65536
    leak = _corrupt(tmp_path, plain, [(rb + 2 * l1_cluster, (2).to_bytes(2, "big"))])
    res = run(["qemu-img", "check", leak])
    with formats.open(leak) as img:
        ours = img.check()
    assert ours.exit_code == res.returncode == 3
    assert len(ours.leaks) == 1
    (tmp_path / "bad.qcow2").unlink()
    data_cluster = (_l2_word(plain, 0) & L.OFFSET_MASK) // 65536
    bad = _corrupt(tmp_path, plain, [(rb + 2 * data_cluster, (0).to_bytes(2, "big"))])
    res = run(["qemu-img", "check", bad])
    with formats.open(bad) as img:
        ours = img.check()
    assert ours.exit_code == res.returncode == 2
    assert any(f"cluster {data_cluster} refcount=0 reference=1" in c for c in ours.corruptions)


def _l2_word(data, i):
    l2 = _l2_offset(data)
    return int.from_bytes(data[l2 + 8 * i : l2 + 8 * i + 8], "big")


def test_layout_round_trips_qemu_header(tmp_path):
    for opts in (("compat=0.10",), ("compression_type=zstd",)):
        path = qemu_create(tmp_path / f"h{len(opts[0])}.qcow2", MiB, *opts)
        raw = Path(path).read_bytes()
        hdr = L.Header.parse(raw)
        n = L.header_bytes(hdr.version, hdr.header_length or 0)
        assert L.Header.build(hdr) == raw[:n]
        assert L.Header.parse(L.Header.build(hdr)) == hdr


def test_data_file_stays_closed_when_backing_files_are_disabled(tmp_path):
    data = str(tmp_path / "d.raw")
    path = qemu_create(tmp_path / "d.qcow2", MiB, f"data_file={data}")
    qemu_io("qcow2", path, "write -P 0x11 0 64k")
    with formats.open(path, allow_backing=False) as img:
        assert img.files() == [path]
        assert img.check().exit_code == 0
        assert data_ranges(our_map(img)) == [(0, 64 * KiB)]
        with pytest.raises(formats.UnsupportedFeature, match="data file"):
            img.read(0, 4096)
    with pytest.raises(formats.UnsupportedFeature, match="disabled"):
        formats.open(path, writable=True, allow_backing=False)


def test_tables_grow_and_evicted_l2_tables_are_written_back(tmp_path, monkeypatch):
    # 512-byte clusters with 64-bit refcounts: one refcount table cluster covers 2 MiB of
    # host file, one L2 table 32 KiB of disk; a cache of four tables must write back
    monkeypatch.setattr(qcow2.Qcow2Image, "l2_cache_bytes", 2048)
    path = str(tmp_path / "g.qcow2")
    rng = np.random.default_rng(5)
    data = rng.integers(0, 255, 3 * MiB, dtype=np.uint8).tobytes()
    with qcow2.create(path, 4 * MiB, cluster_size="512", refcount_bits="64") as img:
        for off in range(0, 3 * MiB, 192 * KiB):  # back and forth across tables
            img.write(off + 100, data[off + 100 : off + 192 * KiB])
        for off in range(0, 3 * MiB, 192 * KiB):
            img.write(off, data[off : off + 100])
        assert len(img.cache._tables) <= 4
        assert img.read(0, 3 * MiB) == data
    report = qemu_check(path)
    assert report["image-end-offset"] > 3 * MiB
    hdr = L.Header.parse(Path(path).read_bytes()[:112])
    assert hdr.refcount_table_clusters > 1
    assert qemu_raw(tmp_path, path)[: 3 * MiB] == data


def test_partial_write_into_preallocated_zero_cluster_keeps_zeros(tmp_path):
    path = qemu_create(tmp_path / "z.qcow2", MiB)
    # qemu keeps the host cluster and sets the zero flag (a "zero, allocated" cluster)
    qemu_io("qcow2", path, "write -P 0x55 0 128k", "write -z 0 128k")
    assert _l2_word(Path(path).read_bytes(), 0) & L.OFLAG_ZERO
    with formats.open(path, writable=True) as img:
        img.write(100, b"abc")
        img.write_zeroes(64 * KiB + 10, 10)
    qemu_check(path)
    want = bytearray(MiB)
    want[100:103] = b"abc"
    assert qemu_raw(tmp_path, path) == want


def test_many_snapshots_open_and_check_without_hanging(tmp_path):
    path = qemu_create(tmp_path / "s.qcow2", MiB, "compat=0.10")
    qemu_io("qcow2", path, "write -P 1 0 64k")
    data = bytearray(Path(path).read_bytes())
    data += bytes(-len(data) % 65536)
    table = len(data)
    data += bytes(65536 * L.SNAPSHOT_FIXED)  # entries with empty L1 tables, ids and names
    struct.pack_into(">IQ", data, 60, 65536, table)
    Path(path).write_bytes(data)
    t0 = time.monotonic()
    with formats.open(path) as img:
        assert len(img.info()["snapshots"]) == 65536
        assert img.check().exit_code == 2  # the table's clusters have no refcount
    assert time.monotonic() - t0 < HANG_SECONDS


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_a_compressed_cluster_that_does_not_decompress_is_corrupt(ctype):
    from formats.errors import CorruptImage
    from formats.qcow2 import compression as C

    kind = C.COMPRESSION_ZSTD if ctype == "zstd" else C.COMPRESSION_ZLIB
    good = C.compress(kind, b"\x42" * 65536)
    assert C.decompress(kind, good, 65536, 0) == b"\x42" * 65536
    bad = b"\x28\xb5\x2f\xfd" + b"\xff" * 60 if ctype == "zstd" else b"\xff" * 64
    with pytest.raises(CorruptImage, match=r"does not decompress|holds"):
        C.decompress(kind, bad, 65536, 0x10000)
