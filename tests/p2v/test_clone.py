"""Cloning a "physical server" (a real sshd on 127.0.0.1 whose disk is a file with a GPT,
a FAT and an ext4 partition) and checking the result with qemu-img, e2fsck and fsck.vfat."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time

import pytest

import formats
from formats.extents import Kind
from p2v import clone as cloning
from tests.external import loop_mount, need_root, need_tool, p2v, qemu_img
from tests.p2v.conftest import connect_options

MiB = 1 << 20


FORMATS = ("raw", "qcow2", "vdi", "vpc")


def _identical(a: str, b: str, fmt_b: str) -> bool:
    res = qemu_img("compare", "-f", "raw", "-F", fmt_b, a, b, check=False)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_clone_equals_source_and_describes_the_machine(sshd, server_disk, tmp_path, fmt):
    disk, layout = server_disk
    out = str(tmp_path / "out")
    res = cloning.clone(
        connect_options(sshd), out, cloning.CloneOptions(out_format=fmt, disks=[disk])
    )
    (d,) = res.disks
    assert d.verified is True and d.verified_blocks >= os.path.getsize(disk) // (256 << 10)
    assert d.bytes_read == os.path.getsize(disk)
    assert d.bytes_wire < d.bytes_read // 2  # zeros cross as flags, the rest compressed
    assert _identical(disk, d.image, fmt)
    assert sorted(os.listdir(out)) == sorted(
        ["machine.json", cloning.STATE_FILE, os.path.basename(d.image)]
    )
    with open(res.machine) as f:
        machine = json.load(f)
    assert machine["cpus"] == os.cpu_count()
    assert machine["firmware"] == ("uefi" if os.path.isdir("/sys/firmware/efi") else "bios")
    (md,) = machine["disks"]
    assert md["source"] == disk and md["path"] == os.path.basename(d.image)
    assert md["partition_table"] == "gpt"
    starts = [p["start"] for p in md["partitions"]]
    assert starts == [layout["fat_start"], layout["ext4_start"]]
    macs = {n["mac"] for n in machine["nics"]}
    for name in os.listdir("/sys/class/net"):
        if os.path.exists(f"/sys/class/net/{name}/device"):
            with open(f"/sys/class/net/{name}/address") as f:
                assert f.read().strip() in macs
    # a second run finds the disk complete and copies nothing
    again = cloning.clone(
        connect_options(sshd), out, cloning.CloneOptions(out_format=fmt, disks=[disk])
    )
    assert again.disks[0].skipped and again.disks[0].bytes_read == 0


def _extract(image: str, fmt: str, start: int, size: int, dest: str) -> str:
    with formats.open(image, fmt) as img, open(dest, "wb") as f:
        f.write(img.read(start, size))
    return dest


def test_skip_unused_copies_used_blocks_only_and_is_fsck_clean(sshd, server_disk, tmp_path):
    need_tool("e2fsck", "fsck.vfat")
    disk, layout = server_disk
    res = cloning.clone(
        connect_options(sshd),
        str(tmp_path / "out"),
        cloning.CloneOptions(out_format="raw", disks=[disk], skip_unused=True),
    )
    (d,) = res.disks
    size = os.path.getsize(disk)
    assert d.used_bytes is not None and d.bytes_read < size // 2
    # the garbage in free space was not copied, so the images differ as a whole...
    assert not _identical(disk, d.image, "raw")
    # ...but agree on every block a filesystem uses
    from formats.disk import used_extents

    with formats.open(disk, "raw") as src, formats.open(d.image, "raw") as img:
        used = [e for e in used_extents(src) if e.kind == Kind.DATA]
        assert sum(e.length for e in used) == d.used_bytes
        for e in used:
            assert src.read(e.start, e.length) == img.read(e.start, e.length), e
    ext4 = _extract(d.image, "raw", layout["ext4_start"], layout["ext4_size"], str(tmp_path / "e"))
    res = subprocess.run(["e2fsck", "-fn", ext4], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    fat = _extract(d.image, "raw", layout["fat_start"], layout["fat_size"], str(tmp_path / "f"))
    res = subprocess.run(["fsck.vfat", "-n", fat], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _cutting_progress(sshd, fraction: float, cuts: list[int]):
    """A progress factory that cuts the SSH connection once the copy passes `fraction`."""

    @contextlib.contextmanager
    def factory(label: str, total: int):
        def update(done: int, total_: int) -> None:
            if not cuts and done >= total_ * fraction:
                cuts.append(done)
                assert sshd.cut_connections() >= 1

        yield update

    return factory


@pytest.mark.parametrize("fmt", ("raw", "qcow2", "vdi"))
def test_clone_resumes_after_connection_loss(sshd, server_disk, tmp_path, monkeypatch, fmt):
    disk, _ = server_disk
    monkeypatch.setattr(cloning, "COMMIT_SECONDS", 0.0)  # journal every write
    out = str(tmp_path / "out")
    opts = cloning.CloneOptions(out_format=fmt, disks=[disk], workers=3)
    cuts: list[int] = []
    with pytest.raises(cloning.CloneInterrupted, match="run the same command again"):
        cloning.clone(
            connect_options(sshd), out, opts, progress_factory=_cutting_progress(sshd, 0.4, cuts)
        )
    assert cuts
    files = sorted(os.listdir(out))
    image = f"sda.{cloning.EXTENSIONS[fmt]}"
    assert image + ".partial" in files and image + ".journal" in files
    res = cloning.clone(connect_options(sshd), out, opts)
    (d,) = res.disks
    size = os.path.getsize(disk)
    assert d.resumed_from >= size // 4
    assert d.bytes_read <= size - d.resumed_from < size
    assert d.verified is True
    assert _identical(disk, d.image, fmt)
    assert not os.path.exists(d.image + ".journal")


def test_verify_catches_an_image_that_differs_from_the_server(
    sshd, server_disk, tmp_path, monkeypatch
):
    disk, _ = server_disk
    real = cloning._OrderedTarget.write_encoded
    hit: list[int] = []

    def corrupting(self, offset, encoded):
        n, inner = encoded
        if not hit and isinstance(inner, (bytes, memoryview)) and n > 4096:
            hit.append(offset)
            inner = bytes([inner[0] ^ 0xFF]) + bytes(inner[1:])
        real(self, offset, (n, inner))

    monkeypatch.setattr(cloning._OrderedTarget, "write_encoded", corrupting)
    with pytest.raises(cloning.VerifyError, match="1 of"):
        cloning.clone(
            connect_options(sshd),
            str(tmp_path / "out"),
            cloning.CloneOptions(out_format="raw", disks=[disk]),
        )
    assert hit
    assert not os.path.exists(tmp_path / "out" / "sda.raw")  # never renamed into place
    # a rerun copies the disk again rather than trusting what failed verification
    monkeypatch.setattr(cloning._OrderedTarget, "write_encoded", real)
    res = cloning.clone(
        connect_options(sshd),
        str(tmp_path / "out"),
        cloning.CloneOptions(out_format="raw", disks=[disk]),
    )
    assert res.disks[0].verified is True and res.disks[0].resumed_from == 0


@pytest.fixture
def mounted_ext4(server_disk, tmp_path):
    need_root()
    need_tool("mount", "umount")
    disk, layout = server_disk
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"loop,offset={layout['ext4_start']},sizelimit={layout['ext4_size']}"
    loop_mount(disk, str(mnt), opts)
    mounted = [True]

    def umount() -> None:
        if mounted[0]:
            subprocess.run(["umount", str(mnt)], check=True)
            mounted[0] = False

    yield str(mnt), umount
    umount()


def test_hot_clone_then_sync_makes_the_image_equal(sshd, server_disk, mounted_ext4, tmp_path):
    disk, _ = server_disk
    mnt, umount = mounted_ext4
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        rng = random.Random(3)
        i = 0
        deadline = time.monotonic() + 60  # bounded even if the clone hangs
        while not stop.is_set() and time.monotonic() < deadline:
            path = os.path.join(mnt, f"hot-{i % 60}.bin")
            with open(path, "wb") as f:
                f.write(rng.randbytes(rng.randint(4096, 256 << 10)))
                f.flush()
                os.fsync(f.fileno())
            written[0] += 1
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    out = str(tmp_path / "out")
    try:
        cloning.clone(
            connect_options(sshd), out, cloning.CloneOptions(out_format="raw", disks=[disk])
        )
    finally:
        stop.set()
        thread.join()
    assert written[0] > 0
    umount()  # writes stopped and flushed to the disk file
    res = p2v(
        "sync",
        "-p",
        str(sshd.port),
        "-i",
        sshd.user_key,
        "--known-hosts",
        sshd.known_hosts,
        "--no-agent",
        "--output",
        "json",
        sshd.target,
        out,
        check=True,
    )
    report = json.loads(res.stdout)
    (d,) = report["disks"]
    assert 0 < d["changed-blocks"] < d["blocks"]
    assert _identical(disk, os.path.join(out, "sda.raw"), "raw")
    # nothing changed since: a second sync sends nothing
    again = cloning.sync(connect_options(sshd), out, cloning.SyncOptions())
    assert again.disks[0].changed_blocks == 0


def test_cli_clone_reports_json_and_refuses_an_unknown_host(sshd, server_disk, tmp_path):
    disk, _ = server_disk
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    base = ["clone", "-p", str(sshd.port), "-i", sshd.user_key, "--no-agent"]
    res = p2v(
        *base,
        "--known-hosts",
        str(empty),
        sshd.target,
        "--disk",
        disk,
        "-O",
        "raw",
        str(tmp_path / "x"),
    )
    assert res.returncode == 1 and "unknown host key" in res.stderr
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")
    res = p2v(
        *base,
        "--known-hosts",
        sshd.known_hosts,
        "--output",
        "json",
        sshd.target,
        "--disk",
        disk,
        "-O",
        "raw",
        "--skip-unused",
        "--target",
        "kvm",
        str(tmp_path / "y"),
        check=True,
    )
    report = json.loads(res.stdout)
    (d,) = report["disks"]
    assert d["verified"] is True and d["bytes-read"] < os.path.getsize(disk)
    assert os.path.exists(tmp_path / "y" / "machine.json")
    assert report.get("definition") or "not available" in report.get("definition-error", "")


def test_snapshot_request_on_a_plain_disk_falls_back_to_the_live_device(
    sshd, server_disk, tmp_path, caplog
):
    disk, _ = server_disk
    with caplog.at_level("WARNING", logger="p2v.clone"):
        res = cloning.clone(
            connect_options(sshd),
            str(tmp_path / "out"),
            cloning.CloneOptions(out_format="raw", disks=[disk], snapshot=True, skip_unused=True),
        )
    (d,) = res.disks
    assert d.snapshot is None and d.verified is True
    assert "no snapshot" in caplog.text and "cloning the live device" in caplog.text


def test_verify_checks_data_digests_and_zero_ranges(tmp_path):
    from p2v.protocol import digest_of

    path = str(tmp_path / "img.raw")
    data = bytearray(os.urandom(MiB)) + bytearray(3 * MiB)
    with open(path, "wb") as f:
        f.write(data)
    blocks = [(o, 256 << 10) for o in range(0, MiB, 256 << 10)]
    digests = [(o, n, digest_of(bytes(data[o : o + n]))) for o, n in blocks]
    zeros = [(MiB, 3 * MiB)]
    with formats.open(path, "raw") as img:
        assert cloning.verify_image(img, digests, zeros) == (4 + 12, [])
    with open(path, "r+b") as f:
        f.seek(300 << 10)
        f.write(b"\1")
        f.seek(3 * MiB + 5)
        f.write(b"\1")
    with formats.open(path, "raw") as img:
        _, bad = cloning.verify_image(img, digests, zeros)
    assert bad == [256 << 10, MiB]
