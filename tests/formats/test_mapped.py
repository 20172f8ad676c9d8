"""Raw sources read through a lease-guarded mapping (formats/mapped.py)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import formats
from formats.convert import convert
from formats.mapped import mapped
from tests.external import need_root, qemu_img

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_source(path, size, pattern=b"\x5a\xa5p2v!"):
    """A raw file of `size` bytes: data, a hole, an all-zero written stretch, data."""
    block = (pattern * (MiB // len(pattern) + 1))[:MiB]
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            if size // 4 <= off < size // 2:
                continue  # a hole
            n = min(MiB, size - off)
            f.seek(off)
            f.write(bytes(n) if size // 2 <= off < size // 2 + 2 * MiB else block[:n])
    return str(path)


def test_a_raw_source_is_copied_from_its_mapping(tmp_path):
    # a size off any grain: the last chunk is read the ordinary way
    src = make_source(tmp_path / "src.raw", 24 * MiB + 1000)
    for fmt in ("qcow2", "raw", "vpc"):
        out = str(tmp_path / f"out.{fmt}")
        with formats.open(src) as img:
            stats = convert(img, out, fmt, durable=False)
        assert 0 < stats.bytes_mapped < stats.bytes_read
        assert qemu_img("compare", "-f", "raw", src, out).returncode == 0
        if fmt == "qcow2":
            assert qemu_img("check", out).returncode == 0


def test_no_mapping_while_someone_has_the_file_open_for_writing(tmp_path):
    src = make_source(tmp_path / "src.raw", 8 * MiB)
    writer = os.open(src, os.O_RDWR)  # no read lease can be had: nor a mapping
    try:
        with formats.open(src) as img:
            stats = convert(img, str(tmp_path / "out.qcow2"), "qcow2", durable=False)
    finally:
        os.close(writer)
    assert stats.bytes_mapped == 0 and stats.bytes_read > 0
    assert qemu_img("compare", src, str(tmp_path / "out.qcow2")).returncode == 0


def test_no_mapping_off_the_main_thread(tmp_path):
    # the lease's SIGIO can only be caught by the main thread
    src = make_source(tmp_path / "src.raw", 8 * MiB)
    got = []

    def run():
        with formats.open(src) as img:
            got.append(convert(img, str(tmp_path / "out.qcow2"), "qcow2", durable=False))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert got and got[0].bytes_mapped == 0
    assert qemu_img("compare", src, str(tmp_path / "out.qcow2")).returncode == 0


def test_no_mapping_for_a_reader_who_may_not_lease_the_file(tmp_path):
    need_root()  # to run the reader as another user
    # a lease needs the file's owner (or CAP_LEASE): another user reading a root-owned
    # image converts it the ordinary way
    work = tempfile.mkdtemp(dir="/var/tmp")
    try:
        os.chmod(work, 0o777)
        src = make_source(os.path.join(work, "src.raw"), 8 * MiB)
        os.chmod(src, 0o644)
        out = os.path.join(work, "out.qcow2")
        child = subprocess.run(
            [sys.executable, "-c", CHILD, src, out, str(16 * MiB)],
            capture_output=True,
            cwd=ROOT,
            user=65534,
            group=65534,
        )
        assert child.returncode == 0, child.stderr
        mapped_bytes, read, _ = map(int, child.stdout.split())
        assert mapped_bytes == 0 and read > 0
        assert qemu_img("compare", src, out).returncode == 0
    finally:
        shutil.rmtree(work)


def _lease(fd):
    return fcntl.fcntl(fd, fcntl.F_GETLEASE)


def test_a_revoked_mapping_gives_its_lease_back_once_its_views_are_done(tmp_path):
    src = make_source(tmp_path / "src.raw", 4 * MiB)
    fd = os.open(src, os.O_RDONLY)
    try:
        with mapped(fd, src) as m:
            assert m is not None and _lease(fd) == fcntl.F_RDLCK
            view = m.view(MiB, MiB)
            with open(src, "rb") as f:
                f.seek(MiB)
                assert bytes(view) == f.read(MiB)
            assert m.view(4 * MiB - 4096, 8192) is None  # past the end
            m.revoke()
            assert m.view(0, 4096) is None  # none after a revoke
            assert _lease(fd) == fcntl.F_RDLCK  # a view is still in use
            view.release()
            m.unview(MiB)
            assert _lease(fd) == fcntl.F_UNLCK
        assert _lease(fd) == fcntl.F_UNLCK
    finally:
        os.close(fd)


CHILD = textwrap.dedent(
    """
    import fcntl, os, sys, time
    import formats
    from formats.convert import convert

    said = []

    with formats.open(sys.argv[1]) as img:

        def progress(done, total):
            if said or done < int(sys.argv[3]):
                return
            said.append(1)
            os.write(1, b"copying\\n")
            # hold the copy until the kernel starts breaking our lease (the parent's
            # truncate has begun), so that it cannot end first; the main thread sleeps
            # here, free to take the SIGIO
            deadline = time.monotonic() + 30
            while fcntl.fcntl(img.fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)

        stats = convert(img, sys.argv[2], "qcow2", durable=False, progress=progress)
    # VmHWM, not ru_maxrss: that counts the parent's pages too when we were vforked
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    rss = hwm // 1024
    print(stats.bytes_mapped, stats.bytes_read, rss, flush=True)
    """
)


def _convert_in_child(src, out, signal_at):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, src, out, str(signal_at)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )


def test_a_truncated_source_neither_kills_nor_waits_on_the_copy(tmp_path):
    """Another process truncates the source mid-copy: its truncate waits for the lease,
    which the copy gives back at once; the copy goes on with ordinary reads and ends
    cleanly (with a mapping and no lease it would die of SIGBUS; with a lease and no
    handler, of SIGIO)."""
    size = 256 * MiB
    src = make_source(tmp_path / "src.raw", size)
    with open(src, "rb") as f:
        head = f.read(16 * MiB)
    out = str(tmp_path / "out.qcow2")
    child = _convert_in_child(src, out, 16 * MiB)
    assert child.stdout.readline() == b"copying\n"
    t0 = time.monotonic()
    os.truncate(src, 32 * MiB)
    waited = time.monotonic() - t0
    rest, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    mapped_bytes, read, _ = map(int, rest.split())
    assert 0 < mapped_bytes < read  # it switched to ordinary reads
    assert waited < 10  # not the kernel's lease-break-time (45 s)
    assert qemu_img("check", out).returncode == 0
    with formats.open(out) as img:
        assert img.read(0, 16 * MiB) == head


def test_the_resident_set_stays_bounded(tmp_path):
    """Mapped pages are dropped from the page tables in batches: the resident set of a
    copy of 384 MiB of data stays far below it."""
    size = 512 * MiB
    src = make_source(tmp_path / "src.raw", size, pattern=b"\x01")
    child = _convert_in_child(src, str(tmp_path / "out.qcow2"), size + 1)  # no signal
    rest, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    mapped_bytes, read, rss_mib = map(int, rest.split())
    assert mapped_bytes == read > size // 2
    assert rss_mib < 200  # 110 MiB measured; 420 without the drops
