"""formats/vmdk against qemu-img/qemu-io (reading every subformat they write, checking and
comparing everything we write) and libvmdk (a second reader of our output)."""

import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats.compare import compare_images
from formats.convert import convert
from formats.extents import Kind
from formats.vmdk import descriptor as dd
from formats.vmdk import layout as L
from tests.external import HANG_SECONDS, need_module, qemu_img, qemu_io

MiB = 1 << 20
GiB = 1 << 30
GRAIN = 64 * 1024
#: big enough for three twoGbMaxExtent pieces, sparse everywhere
SPLIT_SIZE = 4 * GiB + 256 * MiB

QEMU_SUBFORMATS = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]
OUR_SUBFORMATS = [*QEMU_SUBFORMATS, "vmfs"]

QEMU_IO_WRITES = [
    "write -P 0xab 0 64k",
    "write -P 0x11 1M 3M",
    "write -P 0x22 7340544 1536",  # sector-aligned, not grain-aligned
    "write -P 0x33 30M 2M",
    "write -z 31M 256k",
]
#: writes that land on both sides of the 2 GiB (qemu) and 2047 MiB (VMware) split points
SPLIT_WRITES = [
    "write -P 0x44 2047M 2M",
    "write -P 0x55 4095M 1M",
    "write -P 0x66 4351M 64k",
]


def size_for(subformat):
    return SPLIT_SIZE if subformat.startswith("twoGb") else 40 * MiB


def open_raw(path):
    return formats.open(path, "raw")


def assert_same(ours_path, raw_path):
    with formats.open(ours_path, "vmdk") as a, open_raw(raw_path) as b:
        res = compare_images(a, b)
        assert res.identical, res.message


def qemu_to_raw(tmp_path, path, name="expect.raw"):
    out = str(tmp_path / name)
    qemu_img("convert", "-f", "vmdk", "-O", "raw", path, out)
    return out


def pattern_raw(path, size, spots):
    rng = np.random.default_rng(11)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in spots:
            f.seek(off)
            f.write(rng.integers(1, 255, n, dtype=np.uint8).tobytes())
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A sparse raw disk with data at grain edges, unaligned, across split points, at the end."""
    d = tmp_path_factory.mktemp("vmdksrc")
    spots_all = [
        (0, 4096),
        (MiB + 17, 3 * MiB),
        (8 * MiB - 512, 1024),
        (100 * MiB, 4096),
        (2047 * MiB - 1000, 3000),  # VMware's split point
        (2 * GiB - 100, 200),  # qemu's split point
        (SPLIT_SIZE - 700, 700),
    ]
    small = 40 * MiB
    spots_small = [(o, n) for o, n in spots_all if o + n <= small - 1000] + [(small - 900, 900)]
    return {
        SPLIT_SIZE: (pattern_raw(str(d / "big.raw"), SPLIT_SIZE, spots_all), spots_all),
        small: (pattern_raw(str(d / "small.raw"), small, spots_small), spots_small),
    }


# -- reading what qemu writes -----------------------------------------------------------------
@pytest.mark.parametrize("subformat", QEMU_SUBFORMATS)
def test_reads_every_subformat_qemu_makes(tmp_path, subformat):
    size = size_for(subformat)
    path = str(tmp_path / "q.vmdk")
    writes = QEMU_IO_WRITES + (SPLIT_WRITES if size > 4 * GiB else [])
    if subformat == "streamOptimized":
        # qemu-io cannot write a stream out of order: convert a raw disk it wrote
        raw = str(tmp_path / "w.raw")
        qemu_img("create", "-q", "-f", "raw", raw, str(size))
        qemu_io("raw", raw, *writes)
        qemu_img("convert", "-O", "vmdk", "-o", f"subformat={subformat}", raw, path)
    else:
        qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", path, str(size))
        qemu_io("vmdk", path, *writes)
    expect = qemu_to_raw(tmp_path, path)
    assert formats.probe(path) == "vmdk"
    assert_same(path, expect)
    with formats.open(path) as img:
        assert img.size == size
        assert img.info()["create-type"] == subformat
        assert img.read(MiB, 4096) == b"\x11" * 4096
        assert img.read(7340544, 1536) == b"\x22" * 1536
        assert img.read(31 * MiB, 4096) == bytes(4096)
        data = [e for e in img.extents() if e.kind == Kind.DATA]
        assert data and data[0].start == 0
        assert img.check().corruptions == []
        assert len(img.files()) == {"monolithicSparse": 1, "streamOptimized": 1}.get(
            subformat, 2 if subformat == "monolithicFlat" else 4
        )


def test_reads_a_qemu_delta_through_its_parent(tmp_path):
    base = str(tmp_path / "base.vmdk")
    child = str(tmp_path / "child.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", base, str(16 * MiB))
    qemu_io("vmdk", base, "write -P 0x01 0 8M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    qemu_io("vmdk", child, "write -P 0x02 1M 64k", "write -P 0x03 3000 1000")
    expect = qemu_to_raw(tmp_path, child)
    assert_same(child, expect)
    with formats.open(child) as img:
        assert img.backing is not None
        assert img.read(0, 3000) == b"\x01" * 3000
        assert img.read(3000, 1000) == b"\x03" * 1000
        assert img.info()["parent-file-name-hint"] == "base.vmdk"
        assert img.check().corruptions == []
        # the parent's data shows in the child's map
        assert [(e.start, e.end) for e in img.extents() if e.kind == Kind.DATA] == [(0, 8 * MiB)]
    with pytest.raises(formats.UnsafeImage):
        formats.open(child, allow_backing=False)


def test_reads_a_descriptor_mixing_extent_kinds(tmp_path):
    """FLAT + ZERO + SPARSE + VMFS extents in one disk; qemu-img reads it the same."""
    rng = np.random.default_rng(3)
    flat = rng.integers(0, 255, 2 * MiB, dtype=np.uint8).tobytes()
    (tmp_path / "a-flat.vmdk").write_bytes(b"\xee" * 4096 + flat)
    vmfs = rng.integers(0, 255, MiB, dtype=np.uint8).tobytes()
    (tmp_path / "c-flat.vmdk").write_bytes(vmfs)
    sparse = str(tmp_path / "b.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", sparse, str(4 * MiB))
    qemu_io("vmdk", sparse, "write -P 0x77 64k 128k")
    lines = [
        'RW 4096 FLAT "a-flat.vmdk" 8',
        'RW 8192 SPARSE "b.vmdk"',
        'RW 2048 VMFS "c-flat.vmdk"',
    ]
    text = "# Disk DescriptorFile\nversion=1\nCID=1234\nparentCID=ffffffff\n"
    # qemu refuses createType "custom" (VMware writes it) and skips ZERO extents and every
    # extent that is not RW: it reads this variant in full
    qemu_view = tmp_path / "qemu.vmdk"
    qemu_view.write_text(text + 'createType="twoGbMaxExtentFlat"\n' + "\n".join(lines) + "\n")
    expect = qemu_to_raw(tmp_path, str(qemu_view))
    assert os.path.getsize(expect) == 7 * MiB
    assert_same(str(qemu_view), expect)
    with_zero = Path(expect).read_bytes()
    (tmp_path / "expect8.raw").write_bytes(with_zero[: 2 * MiB] + bytes(MiB) + with_zero[2 * MiB :])
    lines.insert(1, "RW 2048 ZERO")
    lines[2] = lines[2].replace("RW", "RDONLY")
    path = tmp_path / "mixed.vmdk"
    path.write_text(text + 'createType="custom"\n' + "\n".join(lines) + "\n")
    assert_same(str(path), str(tmp_path / "expect8.raw"))
    with formats.open(str(path)) as img:
        assert img.size == 8 * MiB
        assert img.read(0, 2 * MiB) == flat
        assert img.read(3 * MiB + 64 * 1024, 4096) == b"\x77" * 4096
        assert img.read(7 * MiB, MiB) == vmfs
        assert [e["format"] for e in img.info()["extents"]] == ["FLAT", "ZERO", "SPARSE", "VMFS"]
    with formats.open(str(path), writable=True) as img:
        img.write(0, b"w" * 512)
        with pytest.raises(formats.FormatError, match="RDONLY"):
            img.write(3 * MiB, b"w" * 512)
        with pytest.raises(formats.FormatError):
            img.write(2 * MiB, b"w" * 512)  # a ZERO extent holds nothing


# -- writing: every subformat, checked by qemu-img and libvmdk --------------------------------
def libvmdk_handle(path):
    pyvmdk = need_module("pyvmdk", "libvmdk-python")
    h = pyvmdk.handle()
    h.open(path)
    h.open_extent_data_files()
    return h


@pytest.mark.parametrize("subformat", OUR_SUBFORMATS)
def test_writes_every_subformat(tmp_path, source, subformat):
    size = size_for(subformat)
    src, spots = source[size]
    out = str(tmp_path / "out.vmdk")
    with open_raw(src) as s:
        convert(s, out, "vmdk", options={"subformat": subformat})
    assert not os.path.exists(out + ".partial")
    info = qemu_img("info", "--output=json", out).stdout
    assert f'"create-type": "{subformat}"' in info
    res = qemu_img("check", out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    expect = src
    res = qemu_img("compare", "-f", "raw", "-F", "vmdk", expect, out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same(out, expect)
    with formats.open(out) as img:
        assert img.check().corruptions == []
        files = img.files()
    names = sorted(os.listdir(tmp_path))
    assert sorted(os.path.basename(f) for f in files) == names
    h = libvmdk_handle(out)
    try:
        assert h.get_media_size() == size
        with open(expect, "rb") as f:
            for off, n in spots:
                f.seek(off)
                h.seek(off)
                assert h.read(n) == f.read(n), f"libvmdk differs at {off:#x}"
    finally:
        h.close()


def test_extent_names_follow_the_final_name_and_failures_remove_them_all(tmp_path):
    out = str(tmp_path / "disk.vmdk")
    img = formats.create(
        out + ".partial", "vmdk", 5 * GiB, final_path=out, subformat="twoGbMaxExtentSparse"
    )
    try:
        assert [os.path.basename(f) for f in img.files()] == [
            "disk.vmdk.partial",
            "disk-s001.vmdk",
            "disk-s002.vmdk",
            "disk-s003.vmdk",
        ]
        text = Path(out + ".partial").read_text()
        assert 'RW 4192256 SPARSE "disk-s001.vmdk"' in text
    finally:
        img.close()
    for f in img.files():
        os.unlink(f)

    from formats.output import atomic_create

    with (
        pytest.raises(RuntimeError),
        atomic_create(out, "vmdk", 64 * MiB, subformat="monolithicFlat") as img,
    ):
        img.write(0, b"x" * 512)
        raise RuntimeError("conversion failed")
    assert os.listdir(tmp_path) == []


def test_refuses_to_clobber_an_existing_extent_file(tmp_path):
    (tmp_path / "d-flat.vmdk").write_bytes(b"precious")
    with pytest.raises(formats.FormatError, match="already exists"):
        formats.create(str(tmp_path / "d.vmdk"), "vmdk", MiB, subformat="monolithicFlat")
    assert (tmp_path / "d-flat.vmdk").read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["d-flat.vmdk"]


def test_writes_a_delta_that_qemu_reads_through_its_parent(tmp_path):
    base = str(tmp_path / "base.vmdk")
    with formats.create(base, "vmdk", 8 * MiB) as img:
        img.write(0, b"\x01" * (4 * MiB))
    child = str(tmp_path / "child.vmdk")
    with formats.create(child, "vmdk", 8 * MiB, backing_file="base.vmdk") as img:
        img.write(1000, b"\x02" * 3000)  # partial grain: the rest comes from the parent
        img.write_zeroes(2 * MiB, GRAIN)  # hides the parent's data
    info = qemu_img("info", "--output=json", child).stdout
    assert '"backing-filename": "base.vmdk"' in info
    expect = bytearray(b"\x01" * (4 * MiB) + bytes(4 * MiB))
    expect[1000:4000] = b"\x02" * 3000
    expect[2 * MiB : 2 * MiB + GRAIN] = bytes(GRAIN)
    (tmp_path / "expect.raw").write_bytes(expect)
    res = qemu_img("compare", "-F", "raw", child, str(tmp_path / "expect.raw"), check=False)
    assert res.returncode == 0, res.stdout
    assert qemu_img("check", child, check=False).returncode == 0
    with formats.open(child) as img:
        assert img.read(0, len(expect)) == bytes(expect)
        assert img.check().corruptions == []


def test_create_options_reach_the_descriptor(tmp_path):
    path = str(tmp_path / "o.vmdk")
    with formats.create(
        path, "vmdk", 10 * GiB, adapter_type="pvscsi", hwversion="13", toolsversion="12345"
    ) as img:
        info = img.info()
    assert info["adapter-type"] == "pvscsi"
    assert info["hwversion"] == "13"
    with formats.open(path) as img:
        ddb = img.descriptor.ddb
        assert ddb["ddb.toolsVersion"] == "12345"
        assert ddb["ddb.geometry.heads"] == "255" and ddb["ddb.geometry.sectors"] == "63"
        assert ddb["ddb.geometry.cylinders"] == str(10 * GiB // 512 // (255 * 63))
        assert len(ddb["ddb.uuid"].replace(" ", "").replace("-", "")) == 32
        assert img.descriptor.parent_cid == dd.NO_PARENT
        assert img.descriptor.cid not in (0xFFFFFFFF, 0xFFFFFFFE)
    with formats.create(str(tmp_path / "d.vmdk"), "vmdk", 100 * MiB) as img:
        ddb = img.descriptor.ddb
        assert ddb["ddb.adapterType"] == "ide"
        assert ddb["ddb.toolsVersion"] == "2147483647"
        assert ddb["ddb.virtualHWVersion"] == "4"
        assert ddb["ddb.geometry.heads"] == "16"
    with formats.create(str(tmp_path / "c.vmdk"), "vmdk", MiB, compat6="on") as img:
        assert img.descriptor.ddb["ddb.virtualHWVersion"] == "6"
    with formats.create(str(tmp_path / "e.vmdk"), "vmdk", MiB, subformat="vmfs") as img:
        assert img.descriptor.ddb["ddb.adapterType"] == "lsilogic"
        assert img.descriptor.extents[0].type == "VMFS"
    bad = [
        {"subformat": "vmfsSparse"},
        {"adapter_type": "scsi"},
        {"hwversion": "x"},
        {"compat6": "on", "hwversion": "7"},
        {"cluster_size": "64k"},
        {"compress": "on", "subformat": "monolithicFlat"},
        {"subformat": "monolithicFlat", "backing_file": "d.vmdk"},
        {"size": 0},
    ]
    for n, opts in enumerate(bad):
        size = opts.pop("size", MiB)
        with pytest.raises(formats.FormatError):
            formats.create(str(tmp_path / f"bad{n}.vmdk"), "vmdk", size, **opts)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("bad")]


# -- streamOptimized: what ESXi and VirtualBox require ----------------------------------------
@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    size = 70 * MiB - 5000  # not a whole number of grains; spans three grain tables
    src = pattern_raw(
        str(d / "s.raw"), size, [(0, 100), (GRAIN, 2 * GRAIN), (33 * MiB, MiB), (size - 10, 10)]
    )
    out = str(d / "s.vmdk")
    with formats.open(src, "raw") as s:
        convert(s, out, "vmdk", options={"subformat": "streamOptimized"})
    data = Path(out).read_bytes()
    return src, out, data, L.SparseExtentHeader.parse(data[:512])


def test_stream_header_is_version_3_with_markers_and_compression(stream):
    h = stream[3]
    assert h.version == 3
    assert h.flags & L.FLAG_VALID_NEWLINE
    assert h.flags & L.FLAG_COMPRESSED
    assert h.flags & L.FLAG_MARKERS
    assert h.compressAlgorithm == L.COMPRESSION_DEFLATE
    assert (h.singleEndLineChar, h.nonEndLineChar) == (b"\n", b" ")
    assert (h.doubleEndLineChar1, h.doubleEndLineChar2) == (b"\r", b"\n")


def test_stream_header_puts_the_grain_directory_at_the_end(stream):
    assert stream[3].gdOffset == L.GD_AT_END


def test_stream_ends_with_footer_marker_footer_and_end_of_stream(stream):
    data, h = stream[2], stream[3]
    assert len(data) % 512 == 0
    assert data[-512:] == bytes(512)  # end-of-stream marker
    marker = L.MetadataMarker.parse(data[-1536:-1024])
    assert (marker.type, marker.numSectors) == (L.MARKER_FOOTER, 1)
    footer = L.SparseExtentHeader.parse(data[-1024:-512])
    assert footer.gdOffset not in (0, L.GD_AT_END)
    assert footer.capacity == h.capacity and footer.grainSize == h.grainSize
    gd_marker = L.MetadataMarker.parse(data[(footer.gdOffset - 1) * 512 : footer.gdOffset * 512])
    assert gd_marker.type == L.MARKER_GD


def test_stream_embeds_a_descriptor_naming_the_final_file(stream):
    data, h = stream[2], stream[3]
    assert h.descriptorOffset == 1 and h.descriptorSize >= 1
    raw = data[512 : 512 + h.descriptorSize * 512]
    desc = dd.parse(raw, "test")
    assert desc.create_type == "streamOptimized"
    assert desc.extents[0].filename == "s.vmdk"
    assert desc.extents[0].sectors == h.capacity
    assert desc.ddb["ddb.toolsVersion"] == "2147483647"


def test_stream_capacity_is_whole_grains(stream):
    h = stream[3]
    assert h.grainSize == 128
    assert h.capacity % h.grainSize == 0
    assert h.capacity * 512 >= os.path.getsize(stream[0])


def test_stream_can_be_walked_marker_by_marker(stream):
    """What a streaming importer does: grains in order, every grain table after its grains,
    then the directory, footer and end-of-stream; each grain inflates to its source data."""
    src, _, data, h = stream
    raw = Path(src).read_bytes()
    pos = h.overHead * 512
    seen_grains, seen_tables, kinds = [], [], []
    while True:
        lba, size = struct.unpack_from("<QI", data, pos)
        if size:
            grain = zlib.decompress(data[pos + 12 : pos + 12 + size])
            assert len(grain) == GRAIN
            off = lba * 512
            assert grain[: len(raw) - off] == raw[off : off + GRAIN]
            seen_grains.append(lba // 128)
            pos += -(-(12 + size) // 512) * 512
            continue
        kind = struct.unpack_from("<I", data, pos + 12)[0]
        kinds.append(kind)
        if kind == L.MARKER_EOS:
            assert pos + 512 == len(data)
            break
        if kind == L.MARKER_GT:
            table = np.frombuffer(data, "<u4", 512, pos + 512)
            seen_tables.append(table)
            # the table comes after every grain it maps
            assert all(t * 512 < pos for t in table if t)
        pos += 512 + lba * 512
    assert seen_grains == sorted(seen_grains)
    assert len(seen_grains) == len(set(seen_grains))
    assert kinds[-3:] == [L.MARKER_GD, L.MARKER_FOOTER, L.MARKER_EOS]
    assert len(seen_tables) == 3  # grain tables of never-written ranges are left out
    # zero grains are not stored
    nonzero = {g for g in range(-(-len(raw) // GRAIN)) if any(raw[g * GRAIN : (g + 1) * GRAIN])}
    assert set(seen_grains) == nonzero


def test_stream_is_read_back_by_qemu_libvmdk_and_us(stream, tmp_path):
    src, out, _, _ = stream
    assert qemu_img("check", out, check=False).returncode == 0
    res = qemu_img("compare", "-f", "raw", "-F", "vmdk", src, out, check=False)
    assert res.returncode == 0, res.stdout
    assert_same(out, src)
    h = libvmdk_handle(out)
    try:
        n = os.path.getsize(src)
        assert h.read_buffer_at_offset(n, 0) == Path(src).read_bytes()
    finally:
        h.close()


def test_stream_writer_rejects_out_of_order_writes(tmp_path):
    with formats.create(
        str(tmp_path / "s.vmdk"), "vmdk", 4 * MiB, subformat="streamOptimized"
    ) as img:
        assert img.is_sequential and img.cluster_size == GRAIN
        img.write(MiB, b"a" * GRAIN)
        with pytest.raises(formats.FormatError, match="in order"):
            img.write(0, b"b" * GRAIN)
        img.write(2 * MiB + 100, b"c" * 100)  # partial grains are merged in order
        img.write(2 * MiB + 300, b"d" * 100)
        img.write_encoded(3 * MiB, img.encode(3 * MiB, b"e" * GRAIN))
    with formats.open(str(tmp_path / "s.vmdk")) as img:
        assert img.read(MiB, GRAIN) == b"a" * GRAIN
        assert img.read(2 * MiB, 500) == bytes(100) + b"c" * 100 + bytes(100) + b"d" * 100 + bytes(
            100
        )
        assert img.read(3 * MiB, GRAIN) == b"e" * GRAIN
        assert [(e.start, e.length) for e in img.extents() if e.kind == Kind.DATA] == [
            (MiB, GRAIN),
            (2 * MiB, GRAIN),
            (3 * MiB, GRAIN),
        ]


def test_stream_of_an_empty_disk_is_valid(tmp_path):
    out = str(tmp_path / "e.vmdk")
    formats.create(out, "vmdk", GiB, subformat="streamOptimized").close()
    assert qemu_img("check", out, check=False).returncode == 0
    assert os.path.getsize(out) < 256 * 1024
    with formats.open(out) as img:
        assert list(img.extents()) == [formats.Extent(0, GiB, Kind.ZERO)]


# -- structures ---------------------------------------------------------------------------------
def test_header_round_trips_on_a_qemu_made_header(tmp_path):
    path = str(tmp_path / "h.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", path, str(GiB))
    raw = Path(path).read_bytes()[:512]
    parsed = L.SparseExtentHeader.parse(raw)
    assert L.SparseExtentHeader.build(parsed) == raw
    assert L.SparseExtentHeader.parse(L.SparseExtentHeader.build(parsed)) == parsed
    marker = {"numSectors": 4, "type": L.MARKER_GT}
    assert L.MetadataMarker.parse(L.MetadataMarker.build(marker)).numSectors == 4


def test_descriptor_round_trips():
    desc = dd.Descriptor(
        "twoGbMaxExtentFlat",
        [dd.ExtentLine("RW", 100, "FLAT", "a b-f001.vmdk", 0), dd.ExtentLine("RDONLY", 7, "ZERO")],
        cid=0xDEADBEEF,
        parent_cid=0x12,
        parent_hint="base dir.vmdk",
        ddb={"ddb.adapterType": "lsilogic"},
    )
    again = dd.parse(dd.build(desc), "t")
    assert again == desc


def test_descriptor_parsing_is_strict(tmp_path):
    good = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=%s\n%s\n"
    assert dd.parse((good % ("monolithicFlat", 'RW 8 FLAT "x" 0')).encode(), "t").cid == 1
    assert dd.parse((good % ("streamOptimized", 'RW 8 SPARSE "x"')).encode(), "t")  # unquoted
    cases = [
        (good % ('"mysteryDisk"', 'RW 8 FLAT "x" 0'), formats.UnsupportedFeature),
        (good % ('"fullDevice"', 'RW 8 FLAT "/dev/sda" 0'), formats.UnsupportedFeature),
        (good % ('"monolithicFlat"', 'RW 0 FLAT "x" 0'), formats.CorruptImage),
        (good % ('"monolithicFlat"', f'RW {1 << 50} FLAT "x" 0'), formats.CorruptImage),
        (good % ('"monolithicFlat"', 'RW 8 FLAT "x" 99999999999999999'), formats.CorruptImage),
        (good % ('"monolithicFlat"', "RW 8 FLAT x 0"), formats.CorruptImage),
        (good % ('"monolithicFlat"', 'RW 8 SPARSE "x" 5'), formats.CorruptImage),
        (good % ('"monolithicFlat"', 'RW 8 TAPE "x"'), formats.UnsupportedFeature),
        (good % ('"monolithicFlat"', ""), formats.CorruptImage),
        (good % ('"monolithicFlat"', 'RW 8 FLAT "x" 0\nthis is not vmdk'), formats.CorruptImage),
        (good % ('"monolithicFlat"', 'RW 8 FLAT "x" 0\nCID=zz'), formats.CorruptImage),
        (good % ('"monolithicFlat"', 'RW 8 FLAT "x" 0\ncreateType="vmfs"'), formats.CorruptImage),
        ("version=1\n" + 'RW 8 FLAT "x" 0\n', formats.CorruptImage),
    ]
    for text, error in cases:
        with pytest.raises(error):
            dd.parse(text.encode(), "t")
    many = good % ('"twoGbMaxExtentFlat"', "\n".join(['RW 8 FLAT "x" 0'] * (dd.MAX_EXTENTS + 1)))
    with pytest.raises(formats.CorruptImage, match="more than"):
        dd.parse(many.encode(), "t")
    big = tmp_path / "big.vmdk"
    big.write_bytes(b"# Disk DescriptorFile\n" + b"#" * (dd.MAX_DESCRIPTOR_BYTES + 1))
    t0 = time.monotonic()
    with pytest.raises(formats.FormatError, match="cap"):
        formats.open(str(big), "vmdk")
    assert time.monotonic() - t0 < HANG_SECONDS


@pytest.mark.parametrize("name", ["../outside-flat.vmdk", "/etc/passwd", "link-flat.vmdk"])
def test_extent_paths_must_stay_beside_the_descriptor(tmp_path, name):
    inner = tmp_path / "vm"
    inner.mkdir()
    (tmp_path / "outside-flat.vmdk").write_bytes(bytes(4096))
    os.symlink(tmp_path / "outside-flat.vmdk", inner / "link-flat.vmdk")
    desc = dd.Descriptor("monolithicFlat", [dd.ExtentLine("RW", 8, "FLAT", name, 0)])
    (inner / "d.vmdk").write_bytes(dd.build(desc))
    with pytest.raises(formats.UnsafeImage, match="outside"):
        formats.open(str(inner / "d.vmdk"))


# -- hostile and damaged images: one-line errors, quickly ---------------------------------------
@pytest.fixture
def sparse_image(tmp_path):
    path = str(tmp_path / "c.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", path, str(64 * MiB))
    qemu_io("vmdk", path, "write -P 0x61 0 1M", "write -P 0x62 40M 64k")
    with open(path, "rb") as f:
        h = L.SparseExtentHeader.parse(f.read(512))
    return path, h


def fails_cleanly(path, *, via="extents"):
    t0 = time.monotonic()
    with pytest.raises(formats.FormatError) as info, formats.open(path, "vmdk") as img:
        list(img.extents())
        img.read(0, img.size)
    assert time.monotonic() - t0 < HANG_SECONDS
    assert "\n" not in str(info.value)
    return info.value


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_magic_is_refused(sparse_image):
    path, _ = sparse_image
    poke(path, 0, b"KDMX")
    fails_cleanly(path)
    assert formats.probe(path) == "raw"


def test_grain_table_entry_out_of_range_is_corrupt(sparse_image):
    path, h = sparse_image
    with open(path, "rb") as f:
        f.seek(h.gdOffset * 512)
        gt = struct.unpack("<I", f.read(4))[0]
    poke(path, gt * 512 + 4, struct.pack("<I", 0x7FFF_FFF0))
    err = fails_cleanly(path)
    assert isinstance(err, formats.CorruptImage) and "past the end" in str(err)
    with formats.open(path) as img:
        problems = img.check().corruptions
    assert any("beyond the end" in p for p in problems)
    assert qemu_img("check", path, check=False).returncode != 0  # qemu agrees


def test_grain_directory_out_of_range_is_corrupt(sparse_image):
    path, h = sparse_image
    poke(path, h.gdOffset * 512, struct.pack("<I", 0xFFFF_FF00))
    assert isinstance(fails_cleanly(path), formats.CorruptImage)


def test_two_grains_sharing_a_cluster_are_reported(sparse_image):
    path, h = sparse_image
    with open(path, "rb") as f:
        f.seek(h.gdOffset * 512)
        gt = struct.unpack("<I", f.read(4))[0]
        f.seek(gt * 512)
        first = f.read(4)
    poke(path, gt * 512 + 40, first)  # grain 10 now points at grain 0's data
    with formats.open(path) as img:
        problems = img.check().corruptions
    assert any("share" in p for p in problems)


def test_truncated_images_are_refused(sparse_image, stream, tmp_path):
    path, _ = sparse_image
    os.truncate(path, 100 * 512)
    fails_cleanly(path)
    cut = str(tmp_path / "cut.vmdk")
    Path(cut).write_bytes(stream[2][: len(stream[2]) // 2])
    err = fails_cleanly(cut)
    assert "footer" in str(err) or "truncated" in str(err)


def test_absurd_header_fields_are_refused(sparse_image):
    path, _ = sparse_image
    for offset, value in [
        (12, struct.pack("<Q", 1 << 60)),  # capacity
        (20, struct.pack("<Q", 3)),  # grainSize not a power of two
        (44, struct.pack("<I", 1 << 20)),  # numGTEsPerGT
        (4, struct.pack("<I", 9)),  # version
        (8, struct.pack("<I", 0x0400_0003)),  # unknown incompatible flag
        (73, b"\r"),  # newline detection: the file went through a text-mode copy
    ]:
        with open(path, "rb") as f:
            saved = f.read(512)
        poke(path, offset, value)
        fails_cleanly(path)
        poke(path, 0, saved)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8))
def test_damaged_metadata_gives_format_errors_only(tmp_path, edits):
    path = tmp_path / "f.vmdk"
    if not hasattr(test_damaged_metadata_gives_format_errors_only, "seed"):
        qemu_img("create", "-q", "-f", "vmdk", str(path), str(8 * MiB))
        qemu_io("vmdk", str(path), "write -P 0x61 0 128k")
        test_damaged_metadata_gives_format_errors_only.seed = path.read_bytes()
    data = bytearray(test_damaged_metadata_gives_format_errors_only.seed)
    for off, value in edits:
        data[off] = value
    path.write_bytes(data)
    try:
        with formats.open(str(path), "vmdk") as img:
            img.info()
            for ext in list(img.extents())[:64]:
                if ext.kind == Kind.DATA:
                    img.read(ext.start, min(ext.length, 256 * 1024))
            img.check()
    except formats.FormatError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=400))
def test_descriptor_parser_raises_only_format_errors(text):
    try:
        dd.parse(("# Disk DescriptorFile\n" + text).encode(), "t")
    except formats.FormatError:
        pass


# -- random writes against a model -------------------------------------------------------------
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(0, 2 * MiB - 1), st.integers(1, 200_000)),
        min_size=1,
        max_size=12,
    ),
    subformat=st.sampled_from(["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat"]),
)
def test_random_writes_match_a_model(tmp_path, ops, subformat):
    size = 2 * MiB + 4096
    d = tmp_path / f"m{time.monotonic_ns()}"
    d.mkdir()
    path = str(d / "m.vmdk")
    model = bytearray(size)
    rng = np.random.default_rng(len(ops))
    with formats.create(path, "vmdk", size, subformat=subformat) as img:
        for is_zero, off, n in ops:
            n = min(n, size - off)
            if is_zero:
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                data = rng.integers(1, 255, n, dtype=np.uint8).tobytes()
                img.write(off, data)
                model[off : off + n] = data
        assert img.read(0, size) == bytes(model)
    with formats.open(path, writable=False) as img:
        assert img.read(0, size) == bytes(model)
        assert img.check().corruptions == []
    assert qemu_img("check", path, check=False).returncode == 0


def test_writable_open_updates_a_qemu_image_in_place(sparse_image, tmp_path):
    path, _ = sparse_image
    with formats.open(path, writable=True) as img:
        img.write(40 * MiB + 100, b"z" * 100)  # allocated grain
        img.write(50 * MiB, b"y" * (3 * GRAIN))  # new grains
    expect = Path(qemu_to_raw(tmp_path, path)).read_bytes()
    assert expect[40 * MiB + 100 : 40 * MiB + 200] == b"z" * 100
    assert expect[40 * MiB : 40 * MiB + 100] == b"b" * 100
    assert expect[50 * MiB : 50 * MiB + 3 * GRAIN] == b"y" * (3 * GRAIN)
    assert qemu_img("check", path, check=False).returncode == 0


def test_stream_images_are_read_only(stream):
    with pytest.raises(formats.UnsupportedFeature, match="read-only"):
        formats.open(stream[1], writable=True)


def test_info_names_subformat_extents_and_ids(tmp_path):
    path = str(tmp_path / "i.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", path, str(MiB))
    with formats.open(path) as img:
        info = img.info()
    assert info["create-type"] == "monolithicFlat"
    assert info["cluster-size"] == 65536
    assert info["adapter-type"] == "ide" and info["hwversion"] == "4"
    assert info["parent-cid"] == 0xFFFFFFFF and isinstance(info["cid"], int)
    (ext,) = info["extents"]
    assert ext == {
        "filename": "i-flat.vmdk",
        "format": "FLAT",
        "virtual-size": MiB,
        "cluster-size": 512,
        "compressed": False,
    }


def test_reads_an_esx_cowd_sparse_extent(tmp_path):
    """vmfsSparse (COWD): built by hand from the spec, since qemu-img cannot make one;
    qemu-img reads it too."""
    grain_sectors, disk_sectors = 8, 2048
    gt_sector, first_grain = 5, 5 + 4096 * 4 // 512
    header = L.COWDisk_Header.build(
        dict(
            version=1,
            flags=3,
            numSectors=disk_sectors,
            grainSize=grain_sectors,
            gdOffset=4,
            numGDEntries=1,
            freeSector=first_grain + 3 * grain_sectors,
            u=bytes(1028),
            generation=0,
            name=bytes(60),
            description=bytes(512),
            savedGeneration=0,
            reserved=bytes(8),
            uncleanShutdown=0,
            padding=bytes(396),
        )
    )
    table = np.zeros(4096, "<u4")
    grains = {0: b"\x10", 5: b"\x15", 200: b"\x20"}
    body = bytearray(first_grain * 512)
    body[:2048] = header
    body[4 * 512 : 4 * 512 + 4] = struct.pack("<I", gt_sector)
    for n, g in enumerate(grains):
        table[g] = first_grain + n * grain_sectors
    body[gt_sector * 512 : gt_sector * 512 + table.nbytes] = table.tobytes()
    for fill in grains.values():
        body += fill * (grain_sectors * 512)
    delta = tmp_path / "d-delta.vmdk"
    delta.write_bytes(bytes(body))
    # as ESX lays out a snapshot: a descriptor naming the COWD extent
    path = tmp_path / "d.vmdk"
    desc = dd.Descriptor(
        "vmfsSparse", [dd.ExtentLine("RW", disk_sectors, "VMFSSPARSE", delta.name)]
    )
    path.write_bytes(dd.build(desc))
    expect = qemu_to_raw(tmp_path, str(path))
    assert_same(str(path), expect)
    assert_same(str(delta), expect)  # the extent alone opens too
    with formats.open(str(path)) as img:
        assert img.size == disk_sectors * 512
        assert img.info()["create-type"] == "vmfsSparse"
        assert img.read(5 * 4096, 4096) == b"\x15" * 4096
        data = [(e.start, e.length) for e in img.extents() if e.kind == Kind.DATA]
        assert data == [(0, 4096), (5 * 4096, 4096), (200 * 4096, 4096)]
    table[5] = 1 << 30  # past the end of the file
    body[gt_sector * 512 : gt_sector * 512 + table.nbytes] = table.tobytes()
    delta.write_bytes(bytes(body))
    fails_cleanly(str(path))


def test_a_delta_over_a_changed_parent_is_refused(tmp_path):
    """qemu and VMware refuse it too: the delta's grains were written over other data."""
    base = str(tmp_path / "base.vmdk")
    child = str(tmp_path / "child.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", base, str(4 * MiB))
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    formats.open(child).close()
    with formats.open(base, writable=True) as img:
        before = img.descriptor.cid
        img.write(0, b"changed")  # a write gives the disk a new CID, as VMware's do
    assert f"cid: {before}" not in qemu_img("info", base).stdout
    with pytest.raises(formats.CorruptImage, match="changed after this delta"):
        formats.open(child)
    assert qemu_img("convert", "-O", "raw", child, str(tmp_path / "x.raw"), check=False).returncode


def test_probe_knows_descriptors_by_their_version_line(tmp_path):
    path = tmp_path / "d.vmdk"
    (tmp_path / "d-flat.vmdk").write_bytes(bytes(4096))
    path.write_text(
        '# made by hand\n\nversion=1\ncreateType="monolithicFlat"\nRW 8 FLAT "d-flat.vmdk" 0\n'
    )
    assert formats.probe(str(path)) == "vmdk"
    path.write_text("version=7\n")
    assert formats.probe(str(path)) == "raw"


def sesparse_entry(kind, index=0):
    # ESXi stores a grain's number with its low 12 bits above the high 36
    return (kind << 60) | ((index & 0xFFF) << 48) | (index >> 12)


def test_reads_an_esxi_sesparse_extent(tmp_path):
    """seSparse: built by hand to the layout qemu reads (qemu-img cannot make one)."""
    capacity = 40 * MiB // 512  # three 16 MiB grain tables
    gd_at, gt_at, grains_at = 8, 16, 16 + 3 * 64
    header = L.SESparseConstHeader.build(
        dict(
            version=L.SESPARSE_VERSION,
            capacity=capacity,
            grain_size=8,
            grain_table_size=64,
            flags=0,
            reserved=bytes(32),
            volatile_header_offset=1,
            volatile_header_size=1,
            journal_header_offset=2,
            journal_header_size=1,
            journal_offset=3,
            journal_size=4,
            grain_dir_offset=gd_at,
            grain_dir_size=1,
            grain_tables_offset=gt_at,
            grain_tables_size=3 * 64,
            free_bitmap_offset=7,
            free_bitmap_size=1,
            backmap_offset=7,
            backmap_size=1,
            grains_offset=grains_at,
            grains_size=4 * 8,
            pad=bytes(304),
        )
    )
    volatile = L.SESparseVolatileHeader.build(
        dict(free_gt_number=2, next_txn_seq_number=1, replay_journal=0, pad=bytes(480))
    )
    body = bytearray(grains_at * 512)
    body[:512], body[512:1024] = header, volatile
    gd = np.zeros(64, "<u8")
    gd[0], gd[2] = 0x1000_0000 << 32, (0x1000_0000 << 32) | 1
    body[gd_at * 512 : gd_at * 512 + 512] = gd.tobytes()
    t0, t1 = np.zeros(4096, "<u8"), np.zeros(4096, "<u8")
    t0[0], t0[5], t0[6] = (sesparse_entry(3, i) for i in (0, 1, 2))
    t0[7], t0[9] = sesparse_entry(2), sesparse_entry(1)  # zero, unmapped
    t1[3] = sesparse_entry(3, 3)
    body[gt_at * 512 : gt_at * 512 + 32768] = t0.tobytes()
    body[(gt_at + 64) * 512 : (gt_at + 64) * 512 + 32768] = t1.tobytes()
    for fill in (b"\x30", b"\x35", b"\x36", b"\x99"):
        body += fill * 4096
    (tmp_path / "d-sesparse.vmdk").write_bytes(bytes(body))
    desc = dd.Descriptor("seSparse", [dd.ExtentLine("RW", capacity, "SESPARSE", "d-sesparse.vmdk")])
    path = str(tmp_path / "d.vmdk")
    Path(path).write_bytes(dd.build(desc))
    expect = qemu_to_raw(tmp_path, path)
    assert_same(path, expect)
    with formats.open(path) as img:
        assert img.read(32 * MiB + 3 * 4096, 4096) == b"\x99" * 4096
        data = [(e.start, e.length) for e in img.extents() if e.kind == Kind.DATA]
        assert data == [(0, 4096), (5 * 4096, 8192), (32 * MiB + 3 * 4096, 4096)]
        assert img.info()["extents"][0]["format"] == "SESPARSE"
    with pytest.raises(formats.UnsupportedFeature):
        formats.open(path, writable=True)
    t1[3] = sesparse_entry(3, 1 << 30)  # past the end of the file
    with open(tmp_path / "d-sesparse.vmdk", "r+b") as f:
        f.seek((gt_at + 64) * 512)
        f.write(t1.tobytes())
    fails_cleanly(path)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_concurrent_reads_agree_with_serial_ones(tmp_path, subformat):
    """The engine reads (and inflates) on a thread pool: caches must be thread-safe."""
    import concurrent.futures as cf

    raw = pattern_raw(
        str(tmp_path / "r.raw"), 80 * MiB, [(i * 3 * MiB + 777, MiB) for i in range(26)]
    )
    path = str(tmp_path / "t.vmdk")
    qemu_img("convert", "-O", "vmdk", "-o", f"subformat={subformat}", raw, path)
    expect = Path(raw).read_bytes()
    rng = np.random.default_rng(5)
    spots = [
        (int(o), int(n)) for o, n in zip(rng.integers(0, 79 * MiB, 200), rng.integers(1, MiB, 200))
    ]
    with formats.open(path) as img, cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda s: img.read(s[0], s[1]), spots))
    for (off, n), data in zip(spots, got):
        assert data == expect[off : off + n], f"read at {off:#x} (+{n:#x}) differs"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(
        st.tuples(st.integers(0, 300_000), st.integers(1, 200_000), st.booleans()),
        min_size=1,
        max_size=10,
    )
)
def test_stream_writer_in_order_writes_match_a_model(tmp_path, pieces):
    """Writes in increasing order, whole grains through encode() or partial ones through
    write(), gaps left as zeros: the stream reads back as the model."""
    size = 2 * MiB - 3000
    d = tmp_path / f"s{time.monotonic_ns()}"
    d.mkdir()
    path = str(d / "s.vmdk")
    model = bytearray(-(-size // GRAIN) * GRAIN)
    rng = np.random.default_rng(len(pieces))
    pos = 0
    with formats.create(path, "vmdk", size, subformat="streamOptimized") as img:
        for gap, n, aligned in pieces:
            off = pos + gap
            if aligned:
                off = -(-off // GRAIN) * GRAIN
                n = -(-n // GRAIN) * GRAIN
            n = min(n, img.size - off)
            if n <= 0:
                break
            data = rng.integers(0, 3, n, dtype=np.uint8).tobytes()  # some grains all zero
            if aligned:
                img.write_encoded(off, img.encode(off, data))
            else:
                img.write(off, data)
            model[off : off + n] = data
            pos = off + n
    with formats.open(path) as img:
        assert img.read(0, img.size) == bytes(model)
    assert qemu_img("check", path, check=False).returncode == 0


def test_descriptor_ends_at_its_first_nul_like_qemus():
    """qemu rewrites a descriptor file in place when the CID changes; a shorter CID leaves
    the old text's last bytes after the NUL (seen as a flaky read of twoGbMaxExtentFlat)."""
    text = (
        b'# Disk DescriptorFile\nversion=1\nCID=4f29de\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        b'RW 2048 FLAT "q-flat.vmdk" 0\n'
    )
    desc = dd.parse(text + b"\0" + b'k"\n' + bytes(64), "test")
    assert desc.cid == 0x4F29DE
    assert len(desc.extents) == 1


def test_uuid_option_sets_ddb_uuid_in_vmware_spelling_and_refuses_garbage(tmp_path):
    u = "60 00 C2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6"
    with formats.create(str(tmp_path / "a.vmdk"), "vmdk", MiB, uuid=u) as img:
        assert img.descriptor.ddb["ddb.uuid"] == u.lower()
    with formats.create(
        str(tmp_path / "b.vmdk"), "vmdk", MiB, uuid="{6000c29a-1b2c-3d4e-5f60-718293a4b5c6}"
    ) as img:
        assert img.descriptor.ddb["ddb.uuid"] == u.lower()
    with pytest.raises(formats.FormatError, match="invalid uuid"):
        formats.create(str(tmp_path / "c.vmdk"), "vmdk", MiB, uuid="60 00 c2")
    assert not (tmp_path / "c.vmdk").exists()
