"""The conversion engine: zero skipping, used-block restriction, overlays, bounded work."""

from __future__ import annotations

import itertools
import os

import pytest

import formats
from formats.convert import chunk_ranges, convert, convert_image
from formats.extents import Extent, Kind
from tests.external import qemu_img, qemu_io

MiB = 1 << 20


def make_raw(path, size, writes):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return str(path)


class Recorder(formats.Image):
    """A real raw target that also remembers what the engine asked it to store."""

    def __init__(self, inner):
        super().__init__(inner.path, inner.size, writable=True)
        self.inner = inner
        self.cluster_size = 65536
        self.writes: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []

    def _readinto(self, offset, buf):
        self.inner.readinto(offset, buf)

    def _write(self, offset, data):
        self.writes.append((offset, len(data)))
        self.inner.write(offset, data)

    def _write_zeroes(self, offset, n):
        self.zeroes.append((offset, n))
        self.inner.write_zeroes(offset, n)

    def _close(self):
        self.inner.close()


def test_chunks_are_cluster_aligned_merged_and_cut():
    ext = [Extent(100, 10, Kind.DATA), Extent(4000, 200, Kind.DATA), Extent(5000, 1, Kind.ZERO)]
    got = list(chunk_ranges(ext, 4096, 1 << 20, 8192))
    assert got == [Extent(0, 8192, Kind.DATA)]
    ext = [Extent(0, 20000, Kind.DATA)]
    got = list(chunk_ranges(ext, 4096, 20000, 8192))
    assert [(e.start, e.length) for e in got] == [(0, 8192), (8192, 8192), (16384, 3616)]


def test_zero_clusters_are_never_written(tmp_path):
    data = os.urandom(100_000)
    src = make_raw(tmp_path / "src.raw", 16 * MiB, [(1 * MiB, data), (8 * MiB, bytes(MiB))])
    # the explicit zero MiB at 8 MiB is allocated in the source but must not be written
    with formats.open(src) as s, formats.create(str(tmp_path / "dst.raw"), "raw", s.size) as d:
        rec = Recorder(d)
        stats = convert_image(s, rec)
    written = sum(n for _, n in rec.writes)
    assert written == stats.bytes_written
    assert written <= 2 * 65536  # the 100 000 bytes span at most two clusters
    assert not any(off <= 8 * MiB < off + n for off, n in rec.writes)
    qemu_img("compare", "-f", "raw", "-F", "raw", src, str(tmp_path / "dst.raw"))


def test_only_restricts_copy_to_used_extents(tmp_path):
    src = make_raw(tmp_path / "src.raw", 4 * MiB, [(0, b"a" * MiB), (2 * MiB, b"b" * MiB)])
    dst = str(tmp_path / "dst.raw")
    with formats.open(src) as s:
        convert(s, dst, "raw", only=[Extent(0, MiB, Kind.DATA), Extent(MiB, 3 * MiB, Kind.ZERO)])
    with formats.open(dst) as d:
        assert d.read(0, MiB) == b"a" * MiB
        assert d.read(2 * MiB, MiB) == bytes(MiB)


def test_overlay_writes_only_clusters_that_differ_from_backing(tmp_path):
    base_data = os.urandom(MiB)
    base = make_raw(tmp_path / "base.raw", 4 * MiB, [(0, base_data), (2 * MiB, b"z" * MiB)])
    changed = bytearray(base_data)
    changed[70000:70010] = b"0123456789"  # one cluster differs
    # the 'z' MiB became zeros in the source: the overlay must record zeros there
    src = make_raw(tmp_path / "src.raw", 4 * MiB, [(0, bytes(changed))])
    with (
        formats.open(src) as s,
        formats.open(base) as b,
        formats.create(str(tmp_path / "dst.raw"), "raw", s.size) as d,
    ):
        rec = Recorder(d)
        convert_image(s, rec, backing=b)
    assert rec.writes == [(65536, 65536)]
    assert sum(n for _, n in rec.zeroes) == MiB
    assert all(2 * MiB <= off < 3 * MiB for off, _ in rec.zeroes)


def test_progress_reaches_total(tmp_path):
    src = make_raw(tmp_path / "src.raw", 8 * MiB, [(3 * MiB, b"x" * 5000)])
    seen = []
    with formats.open(src) as s:
        convert(s, str(tmp_path / "o.raw"), "raw", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (8 * MiB, 8 * MiB)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))


def test_failed_conversion_leaves_nothing_under_final_name(tmp_path):
    src = make_raw(tmp_path / "src.raw", 8 * MiB, [(0, b"x" * MiB)])

    class Boom(Exception):
        pass

    def explode(done, total):
        raise Boom

    dst = tmp_path / "out.raw"
    with formats.open(src) as s, pytest.raises(Boom):
        convert(s, str(dst), "raw", progress=explode)
    assert not dst.exists()
    assert not (tmp_path / "out.raw.partial").exists()


@pytest.mark.parametrize("depth", [3])
def test_overlay_onto_chain_keeps_middle_data(tmp_path, depth):
    """qemu-img 7.2 drops mid's data converting base <- mid <- top with -B base."""
    base, mid, top = (str(tmp_path / n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io("qcow2", base, "write -P 0x11 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qemu_io("qcow2", mid, "write -P 0x22 1M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu_io("qcow2", top, "write -P 0x33 3M 64k")
    out = str(tmp_path / "out.qcow2")
    with formats.open(top) as s:
        convert(s, out, "qcow2", backing_file="base.qcow2", backing_fmt="qcow2")
    qemu_img("check", out)
    assert qemu_img("compare", top, out, check=False).returncode == 0
    info = qemu_img("info", "--output=json", out).stdout
    assert '"backing-filename": "base.qcow2"' in info


@pytest.mark.parametrize(
    "fmt, opts",
    [
        ("raw", {}),
        ("qcow2", {}),
        ("vmdk", {}),
        ("vmdk", {"subformat": "monolithicFlat"}),
        ("vmdk", {"subformat": "streamOptimized"}),
        ("vpc", {}),
        ("vhdx", {}),
        ("vdi", {}),
    ],
)
@pytest.mark.parametrize("durable", [True, False])
def test_durable_output_is_fsynced_and_unsafe_is_not(tmp_path, monkeypatch, fmt, opts, durable):
    src = make_raw(tmp_path / "src.raw", 8 * MiB, [(MiB, os.urandom(3 * MiB))])
    dst = tmp_path / f"out.{fmt}"
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with formats.open(src) as s:
        convert(s, str(dst), fmt, options=opts, durable=durable)
    monkeypatch.undo()
    ours = [p for p in synced if os.path.basename(p).startswith("out")]
    # creating an image may order its metadata with an early fsync; the data's own sync
    # comes at the close, after the whole image was written
    assert bool(ours) == durable or fmt == "vhdx", ours
    if fmt == "vhdx" and not durable:
        assert len(ours) <= 2, ours  # the two header writes of creation, nothing at close
    qemu_img("compare", src, str(dst))


def test_plain_copies_read_on_one_thread_compression_on_every_core(tmp_path):
    from formats.convert import default_workers

    src = make_raw(tmp_path / "src.raw", 4 * MiB, [(0, b"x" * MiB)])
    many = (os.cpu_count() or 2) + 1
    with formats.open(src) as s:
        for opts, expect in (({}, 1), ({"compress": True}, many)):
            out = tmp_path / f"o{expect}.qcow2"
            with formats.create(str(out), "qcow2", s.size, **opts) as d:
                assert default_workers(s, d) == expect
        with formats.create(
            str(tmp_path / "s.vmdk"), "vmdk", s.size, subformat="streamOptimized"
        ) as d:
            assert default_workers(s, d) == many
    for flags, expect in (([], 1), (["-c"], many)):  # compressed clusters need inflating
        path = str(tmp_path / f"c{expect}.qcow2")
        qemu_img("convert", *flags, "-O", "qcow2", src, path)
        with formats.open(path) as c, formats.create(path + ".raw", "raw", c.size) as d:
            assert default_workers(c, d) == expect


def test_preallocated_output_holds_exactly_the_data_runs(tmp_path):
    # runs long enough to be preallocated, with a zero gap: the output allocates the data
    # and nothing else, and its size is the image's, not the last preallocation's end
    runs = [(2 * MiB, os.urandom(3 * MiB)), (9 * MiB, os.urandom(MiB + 4096))]
    src = make_raw(tmp_path / "src.raw", 16 * MiB, runs)
    dst = tmp_path / "dst.raw"
    with formats.open(src) as s:
        convert(s, str(dst), "raw")
    fd = os.open(dst, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == 16 * MiB
        data, pos = [], 0
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            data.append((start, pos))
    finally:
        os.close(fd)
    expect = [(off, off + -(-len(b) // 4096) * 4096) for off, b in runs]  # ext4 blocks
    assert data == expect
    qemu_img("compare", "-f", "raw", "-F", "raw", src, str(dst))


@pytest.fixture
def preallocations(monkeypatch):
    """The (offset, length) of each preallocation the engine asks for."""
    import formats.convert as fc

    calls: list[tuple[int, int]] = []
    real = fc.preallocate

    def spy(fd: int, offset: int, length: int) -> bool:
        calls.append((offset, length))
        return real(fd, offset, length)

    monkeypatch.setattr(fc, "preallocate", spy)
    return calls


def test_appending_output_is_preallocated_ahead_and_trimmed(tmp_path, monkeypatch, preallocations):
    # qcow2 appends its clusters: the engine preallocates in whole steps past the end of
    # the file, fewer calls than writes; what the last step left past the end is released
    monkeypatch.setattr("formats.convert.PREALLOCATE_AHEAD", 8 * MiB)
    runs = [(0, os.urandom(20 * MiB)), (24 * MiB, os.urandom(3 * MiB))]
    src = make_raw(tmp_path / "src.raw", 32 * MiB, runs)
    dst = str(tmp_path / "dst.qcow2")
    with formats.open(src) as s:
        convert(s, dst, "qcow2", durable=False)
    assert 2 <= len(preallocations) <= 5  # 23 MiB of data in 2 MiB writes: 12 writes
    assert all(length >= 8 * MiB for _, length in preallocations)
    st = os.stat(dst)
    assert st.st_blocks * 512 <= st.st_size + 64 * 1024  # nothing kept past the end
    assert "No errors" in qemu_img("check", dst).stdout
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, dst)


def _data_map(path: str) -> list[tuple[int, int]]:
    """(start, end) of each data range of a file, from SEEK_DATA/SEEK_HOLE."""
    out, pos = [], 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past pos
                break
            pos = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def test_fresh_raw_output_is_preallocated_ahead_and_keeps_its_holes(
    tmp_path, monkeypatch, preallocations
):
    # a fresh raw file is preallocated in steps ahead of the writes, fewer calls than
    # writes; what the steps covered and no write did (zeros written in the source, gaps
    # between its data) is punched back: the output's holes are where qemu-img's are
    monkeypatch.setattr("formats.convert.PREALLOCATE_AHEAD", 16 * MiB)
    runs = [
        (0, os.urandom(6 * MiB)),
        (6 * MiB, bytes(3 * MiB)),  # allocated in the source, all zeros
        (9 * MiB, os.urandom(5 * MiB)),
        (17 * MiB, os.urandom(MiB + 4096)),  # after a hole, ending inside a grain
    ]
    src = make_raw(tmp_path / "src.raw", 40 * MiB, runs)
    dst, peer = str(tmp_path / "dst.raw"), str(tmp_path / "peer.raw")
    with formats.open(src) as s:
        convert(s, dst, "raw", durable=False)
    qemu_img("convert", "-f", "raw", "-O", "raw", src, peer)
    assert len(preallocations) <= 3  # 13 MiB of data in 2 MiB writes: 7 writes
    assert (
        _data_map(dst)
        == _data_map(peer)
        == [(0, 6 * MiB), (9 * MiB, 14 * MiB), (17 * MiB, 18 * MiB + 4096)]
    )
    assert os.stat(dst).st_blocks == os.stat(peer).st_blocks
    qemu_img("compare", "-f", "raw", "-F", "raw", src, dst)


def test_fresh_dynamic_vhdx_is_preallocated_ahead_and_keeps_its_holes(
    tmp_path, monkeypatch, preallocations
):
    # its metadata lies before the blocks: ahead-preallocation and punching back leave the
    # file exactly as sparse as exact per-write preallocation does
    import formats.convert as fc

    monkeypatch.setattr("formats.convert.PREALLOCATE_AHEAD", 16 * MiB)
    runs = [
        (0, os.urandom(5 * MiB)),
        (5 * MiB, bytes(3 * MiB)),  # zeros inside the first block: a hole in the output
        (8 * MiB, os.urandom(3 * MiB)),
        (40 * MiB, os.urandom(MiB)),
    ]
    src = make_raw(tmp_path / "src.raw", 64 * MiB, runs)
    outs = {}
    for ahead in (True, False):
        if not ahead:  # the exact ranges, as for targets that do not allow it
            real_init = fc._DataWriter.__init__

            def exact(self, dst, real_init=real_init):
                real_init(self, dst)
                self.ahead_of_writes = self.punch_back = False

            monkeypatch.setattr(fc._DataWriter, "__init__", exact)
        outs[ahead] = str(tmp_path / f"ahead-{ahead}.vhdx")
        with formats.open(src) as s:
            convert(s, outs[ahead], "vhdx", options={"block_size": "8M"}, durable=False)
        if ahead:
            assert len(preallocations) <= 3  # 9 MiB of data in 2 MiB writes
        qemu_img("compare", "-f", "raw", "-F", "vhdx", src, outs[ahead])
        assert "No errors" in qemu_img("check", outs[ahead]).stdout
    # the same holes, and the same blocks give or take ext4's extent tree blocks, whose
    # number varies with how fragmented the allocator left each file while other tests
    # wrote alongside (4 KiB apart in one loaded run); an unpunched step would be MiBs
    assert _data_map(outs[True]) == _data_map(outs[False])
    blocks = [os.stat(outs[ahead]).st_blocks * 512 for ahead in (True, False)]
    assert abs(blocks[0] - blocks[1]) <= 64 << 10
    assert os.stat(outs[True]).st_blocks * 512 < 16 * MiB  # the zeros and the gap are holes


def test_existing_or_preallocated_raw_targets_are_never_punched(tmp_path):
    # data the engine does not write must survive in a file it did not create, and a raw
    # file created with preallocation keeps all its blocks
    src = make_raw(tmp_path / "src.raw", 16 * MiB, [(0, os.urandom(3 * MiB))])
    keep = os.urandom(MiB)
    existing = make_raw(tmp_path / "old.raw", 16 * MiB, [(8 * MiB, keep)])
    with formats.open(src) as s, formats.open(existing, "raw", writable=True) as d:
        convert_image(s, d)
    with open(existing, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(MiB) == keep
    full = str(tmp_path / "full.raw")
    with formats.open(src) as s:
        convert(s, full, "raw", options={"preallocation": "falloc"}, durable=False)
    assert os.stat(full).st_blocks * 512 >= 16 * MiB


def test_chunks_merge_per_grain_but_widen_only_to_the_zero_grain():
    K = 1024
    data = [Extent(100 * K, 100 * K, Kind.DATA), Extent(900 * K, 124 * K, Kind.DATA)]
    # one grain (1 MiB) holds both: one range, starting at the 64 KiB grain below the first
    assert list(chunk_ranges(data, MiB, 8 * MiB, 4 * MiB, 64 * K)) == [
        Extent(64 * K, MiB - 64 * K, Kind.DATA)
    ]
    # a resumed copy asked to start mid-grain starts there (rounded to the zero grain)
    resumed = [Extent(1536 * K, 2 * MiB, Kind.DATA)]
    assert list(chunk_ranges(resumed, MiB, 8 * MiB, 4 * MiB, 64 * K)) == [
        Extent(1536 * K, 2 * MiB, Kind.DATA)
    ]
    assert next(iter(chunk_ranges(resumed, MiB, 8 * MiB, 4 * MiB))).start == MiB
