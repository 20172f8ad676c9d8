"""Block sharing and its fallbacks (formats/transfer.py, the engine's use of it).

Filesystems are made in files and loop-mounted: XFS (mkfs.xfs turns reflink on by
default) where blocks can be shared, ext4 where they cannot. The oracle is qemu-img
(compare, check); what went which way is read from the conversion's own counts."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats.convert import convert
from formats.extents import Extent, Kind
from formats.transfer import Mover, shares_blocks
from formats.views import WindowImage
from tests.external import loop_mount, need_tool, p2v, qemu_img, qemu_io, run, unavailable

MiB = 1 << 20
KiB = 1 << 10
FORMATS = ["raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"]
CHECKABLE = {"qcow2", "vmdk", "vhdx", "vdi"}  # qemu-img check supports these


def _mounted(tmp_path_factory, name: str, size: str, mkfs: list[str]):
    need_tool(mkfs[0])
    base = tmp_path_factory.mktemp(name)
    img, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    res = run([*mkfs, str(img)])
    if res.returncode:
        raise AssertionError(f"{mkfs[0]} failed: {res.stderr}")
    loop_mount(str(img), str(mnt))
    return mnt


@pytest.fixture(scope="module")
def xfs(tmp_path_factory):
    mnt = _mounted(tmp_path_factory, "xfs", "600M", ["mkfs.xfs", "-q", "-m", "reflink=1"])
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture(scope="module")
def ext4(tmp_path_factory):
    mnt = _mounted(tmp_path_factory, "ext4", "256M", ["mkfs.ext4", "-q", "-F"])
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _own_dir(mnt, request):
    """A directory of the test's own on a mount, removed afterwards (space is short)."""
    d = mnt / request.node.name.replace("[", "_").replace("]", "")
    d.mkdir()
    yield d
    shutil.rmtree(d)


@pytest.fixture
def xdir(xfs, request):
    yield from _own_dir(xfs, request)


@pytest.fixture
def edir(ext4, request):
    yield from _own_dir(ext4, request)


def make_source(path, size: int = 24 * MiB) -> str:
    """Data, holes, zeros written as data, a run that ends off a 4 KiB block."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(os.urandom(3 * MiB))
        f.seek(5 * MiB)
        f.write(bytes(MiB))  # allocated zeros
        f.seek(9 * MiB + 512)
        f.write(os.urandom(5000))
        f.seek(16 * MiB)
        f.write(os.urandom(4 * MiB))
    return str(path)


def used_bytes(path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def empty_size(directory, fmt: str, size: int = 24 * MiB) -> int:
    """The space an image of `fmt` holding no data takes."""
    path = str(directory / f"empty.{fmt}")
    with formats.create(path, fmt, size) as img:
        files = img.files()
    taken = sum(os.stat(f).st_blocks * 512 for f in files)
    for f in files:
        os.unlink(f)
    return taken


def convert_path(src: str, dst: str, fmt: str, src_fmt: str = "raw", **kw):
    with formats.open(src, src_fmt) as img:
        return convert(img, dst, fmt, **kw)


def test_xfs_in_a_file_shares_blocks_and_ext4_does_not(xdir, edir):
    assert shares_blocks(str(xdir))
    assert not shares_blocks(str(edir))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_output_format_shares_the_sources_blocks_on_xfs(xdir, fmt):
    src = make_source(xdir / "src.raw")
    out = str(xdir / f"out.{fmt}")
    before = used_bytes(xdir)
    stats = convert_path(src, out, fmt)
    grown = used_bytes(xdir) - before
    assert stats.bytes_written > 0
    assert stats.bytes_shared == stats.bytes_written  # every run is block-aligned
    assert stats.bytes_copied == stats.bytes_copied_in_kernel == 0
    # a copy would grow by the data (~8 MiB); what grows is the format's own structures
    # (as large as in an empty image) and the tables that map the data
    assert grown < empty_size(xdir, fmt) + stats.bytes_written // 50, grown
    qemu_img("compare", "-f", "raw", "-F", fmt, src, out)
    if fmt in CHECKABLE:
        qemu_img("check", "-f", fmt, out)


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx", "vdi"])
def test_every_source_format_shares_into_raw_and_qcow2(xdir, fmt):
    """Sources laid out by qemu-img and by p2v. qemu-img starts VHD blocks and the VDI
    data area on 512-byte sectors only: those runs are copied in the kernel instead."""
    src = make_source(xdir / "src.raw")
    by_qemu, by_p2v = str(xdir / f"qemu.{fmt}"), str(xdir / f"p2v.{fmt}")
    qemu_img("convert", "-f", "raw", "-O", fmt, src, by_qemu)
    convert_path(src, by_p2v, fmt, share=False)
    for mid in (by_qemu, by_p2v):
        for out_fmt in ("raw", "qcow2"):
            out = str(xdir / f"out.{out_fmt}")
            stats = convert_path(mid, out, out_fmt, fmt)
            qemu_img("compare", "-f", "raw", "-F", out_fmt, src, out)
            os.unlink(out)
            assert stats.bytes_shared + stats.bytes_copied_in_kernel == stats.bytes_written > 0
            if mid == by_p2v or fmt not in ("vpc", "vdi"):
                assert stats.bytes_shared == stats.bytes_written


def test_shared_output_is_independent_of_its_source(xdir, tmp_path):
    src = make_source(xdir / "src.raw")
    reference = shutil.copy(src, tmp_path / "reference.raw")
    out = str(xdir / "out.qcow2")
    assert convert_path(src, out, "qcow2").bytes_shared > 0
    fd = os.open(src, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xee" * 3 * MiB, 0)  # over the shared blocks, in place
        os.pwrite(fd, b"\xdd" * 4 * MiB, 16 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", str(reference), out)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out, check=False).returncode == 1


def test_source_on_another_filesystem_is_copied_through_memory(xdir, edir):
    src = make_source(edir / "src.raw")
    out = str(xdir / "out.qcow2")
    stats = convert_path(src, out, "qcow2")
    assert stats.bytes_shared == stats.bytes_copied_in_kernel == 0
    assert stats.bytes_copied == stats.bytes_written > 0
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out)


def test_output_on_ext4_is_read_and_keeps_zeros_out(edir):
    src = make_source(edir / "src.raw")
    out = str(edir / "out.qcow2")
    stats = convert_path(src, out, "qcow2")
    assert stats.bytes_shared == stats.bytes_copied_in_kernel == 0
    # the allocated MiB of zeros was found by reading, and not written
    assert stats.bytes_written <= 8 * MiB
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out)


def test_no_share_copies_every_byte(xdir):
    src = make_source(xdir / "src.raw")
    out = str(xdir / "out.raw")
    stats = convert_path(src, out, "raw", share=False)
    assert stats.bytes_shared == stats.bytes_copied_in_kernel == 0
    assert stats.bytes_copied == stats.bytes_written > 0
    qemu_img("compare", "-f", "raw", "-F", "raw", src, out)


def test_runs_off_the_filesystem_block_are_copied_in_the_kernel(xdir, tmp_path):
    """A partition that starts 512 bytes into the disk: no run can be shared."""
    src = make_source(xdir / "src.raw")
    size = 20 * MiB
    reference = tmp_path / "window.raw"
    with open(src, "rb") as f:
        f.seek(512)
        reference.write_bytes(f.read(size))
    for start, shared in ((512, False), (MiB, True)):
        out = str(xdir / f"window{start}.qcow2")
        with formats.open(src, "raw") as disk:
            stats = convert(WindowImage(disk, start, size), out, "qcow2")
        assert stats.bytes_written > 0
        if shared:
            assert stats.bytes_shared == stats.bytes_written
        else:
            assert stats.bytes_shared == 0
            assert stats.bytes_copied_in_kernel == stats.bytes_written
            qemu_img("compare", "-f", "raw", "-F", "qcow2", str(reference), out)


def test_compressed_clusters_are_read_and_plain_ones_shared(xdir):
    src = make_source(xdir / "src.raw")
    packed = str(xdir / "packed.qcow2")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", src, packed)
    out = str(xdir / "out.raw")
    stats = convert_path(packed, out, "raw", "qcow2")
    # random data does not compress: qemu-img stores those clusters plain
    assert 0 < stats.bytes_copied < stats.bytes_written
    assert stats.bytes_shared > 0
    qemu_img("compare", "-f", "raw", "-F", "raw", src, out)


def test_block_device_source_is_read(xdir):
    need_tool("losetup")
    src = make_source(xdir / "src.raw")
    res = run(["losetup", "--find", "--show", "--read-only", src])
    if res.returncode:
        unavailable(f"losetup: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        out = str(xdir / "out.qcow2")
        stats = convert_path(dev, out, "qcow2")
        assert stats.bytes_shared == stats.bytes_copied_in_kernel == 0
        qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_backing_overlay_shares_where_the_backing_is_empty_and_compares_elsewhere(xdir):
    """-B: where the backing holds data, the source is read and compared with it (only
    what differs is stored); where it holds none, the source's blocks are shared."""
    src = make_source(xdir / "src.raw")
    base = str(xdir / "base.qcow2")
    qemu_img("create", "-f", "qcow2", base, str(24 * MiB))
    with open(src, "rb") as f:
        first = f.read(MiB)  # the backing holds the source's first MiB, and other bytes
    qemu_io("qcow2", base, "write -P 0x5a 16M 1M")
    with formats.open(base, "qcow2", writable=True) as img:
        img.write(0, first)
    out = str(xdir / "out.qcow2")
    stats = convert_path(src, out, "qcow2", backing_file="base.qcow2", backing_fmt="qcow2")
    # the MiB the backing holds differently is compared and stored, the equal one is not,
    # and everything else (2 + 1 + 4 - 1 MiB, 64 KiB around 9 MiB) is shared
    assert stats.bytes_copied == MiB
    assert stats.bytes_shared == 6 * MiB + 64 * KiB
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out)
    qemu_img("check", "-f", "qcow2", out)


def test_cli_reports_sharing_and_accepts_minus_c(xdir):
    src = make_source(xdir / "src.raw")
    out = str(xdir / "out.vdi")
    res = p2v("convert", "-C", "-O", "vdi", "--output", "json", src, out, check=True)
    assert '"bytes-shared": ' in res.stdout and '"bytes-shared": 0,' not in res.stdout
    res = p2v("convert", "--no-share", "-O", "vdi", src, str(xdir / "b.vdi"), check=True)
    assert "0 B shared" in res.stdout


def test_mover_falls_back_run_by_run(xdir, edir):
    a = make_source(xdir / "a.raw")
    other = make_source(edir / "other.raw")
    fa = os.open(a, os.O_RDONLY)
    fo = os.open(other, os.O_RDONLY)
    fb = os.open(xdir / "b.raw", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        m = Mover()
        m.move(fa, 0, fb, 0, MiB + 100)  # whole blocks shared, the tail copied in the kernel
        assert (m.counts.shared, m.counts.copied_in_kernel) == (MiB, 100)
        m.move(fa, 512, fb, 2 * MiB, 4096)  # off a block
        assert m.counts.copied_in_kernel == 100 + 4096
        m.move(fo, 0, fb, 3 * MiB, 8192)  # another filesystem
        assert m.counts.copied == 8192
        size = os.fstat(fa).st_size
        m.move(fa, size - 4096, fb, 4 * MiB, 8192)  # past the source's end: zeros
        with open(a, "rb") as f, open(xdir / "b.raw", "rb") as g:
            assert g.read(MiB + 100) == f.read(MiB + 100)
            f.seek(512)
            g.seek(2 * MiB)
            assert g.read(4096) == f.read(4096)
            f.seek(size - 4096)
            g.seek(4 * MiB)
            assert g.read(8192) == f.read(4096) + bytes(4096)
    finally:
        for fd in (fa, fo, fb):
            os.close(fd)


_writes = st.lists(
    st.tuples(st.integers(0, 16 * MiB - 1), st.integers(1, 3 * MiB), st.integers(1, 255)),
    max_size=6,
)
_used = st.lists(st.tuples(st.integers(0, 16 * MiB - 1), st.integers(1, 4 * MiB)), max_size=4)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(writes=_writes, used=st.none() | _used, fmt=st.sampled_from(FORMATS[1:]))
def test_writers_place_shared_data_where_qemu_img_reads_it(xdfs_dir, writes, used, fmt):
    """Any pattern of writes, any restriction to 'used' ranges (--skip-unused): the output
    that shares its data reads in qemu-img as the one that copies every byte (and as the
    source, unrestricted), and qemu-img check finds it clean."""
    d = xdfs_dir
    size = 16 * MiB
    src, shared, copied = d / "src.raw", str(d / f"shared.{fmt}"), str(d / f"copied.{fmt}")
    for p in (src, shared, copied):
        if os.path.exists(p):
            os.unlink(p)
    with open(src, "wb") as f:
        f.truncate(size)
        for off, n, byte in writes:
            f.seek(off)
            f.write(bytes([byte]) * min(n, size - off))
    only = None
    if used is not None:
        merged: list[list[int]] = []
        for off, n in sorted(used):
            end = min(off + n, size)
            if merged and off <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([off, end])
        only = [Extent(s, e - s, Kind.DATA) for s, e in merged]
    stats = convert_path(str(src), shared, fmt, only=only)
    assert stats.bytes_copied == 0
    convert_path(str(src), copied, fmt, only=only, share=False)
    qemu_img("compare", "-f", fmt, "-F", fmt, copied, shared)
    if only is None:
        qemu_img("compare", "-f", "raw", "-F", fmt, str(src), shared)
    if fmt in CHECKABLE:
        qemu_img("check", "-f", fmt, shared)


@pytest.fixture(scope="module")
def xdfs_dir(xfs):
    d = xfs / "property"
    d.mkdir()
    return d
