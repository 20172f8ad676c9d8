"""Images declaring a huge virtual size, up to what each format and qemu-img allow, with a
few MiB of data: `p2v info`, `check`, `map` and `convert` (to qcow2) finish in bounded
time and memory, and the conversion holds exactly the data. Headers declaring a table
larger than the file could hold are refused at once, never read whole.

Each command runs in a child of a small launcher (python -S), whose wait4() gives the
child's peak RSS without the parent's own size leaking into it. qemu-img map/compare
take minutes on these sizes, so the oracles are qemu-io pattern reads of the data and
`qemu-img check`'s allocated-cluster count of the converted image.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import uuid

import pytest

from tests.external import HANG_SECONDS, need_tool, qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20

RSS_MIB = 300

#: format, qemu-img size: the largest each format (and qemu-img 7.2) makes, except VDI
CASES = [
    ("qcow2", "2P"),  # the most with 64 KiB clusters: a 32 MiB L1 table, qemu's cap
    ("vmdk", "128T"),  # monolithicSparse; at 256T qemu-img leaves a broken 64 KiB file
    ("vpc", "2040G"),  # VHD's CHS geometry limit
    ("vhdx", "64T"),  # the spec's limit
    # qemu-img makes VDIs up to 0x1fffff8000000 bytes, but writes their whole 2 GiB block
    # map (9 s here); 16T keeps a 64 MiB one. p2v reads the map in chunks and keeps only
    # chunks with allocated blocks: the 512 TiB VDI runs each command in < 1 s, < 90 MiB.
    ("vdi", "16T"),
]

LAUNCHER = """
import json, os, sys, time
t = time.monotonic()
pid = os.fork()
if pid == 0:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.execv(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - t,
                  "rss_mib": ru.ru_maxrss / 1024}))
"""


def measured(tmp_path, *args: str, timeout: float = 120) -> tuple[dict, str]:
    """Run `p2v ARGS` under the launcher: ({rc, seconds, rss_mib}, its output)."""
    out = str(tmp_path / "p2v.out")
    res = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCHER, out, sys.executable, "-m", "p2v", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert res.returncode == 0, res.stderr
    with open(out) as f:
        return json.loads(res.stdout), f.read()


def bounded(tmp_path, *args: str) -> str:
    """`p2v ARGS` succeeds under RSS_MIB, and without hanging; returns its output."""
    m, text = measured(tmp_path, *args)
    assert m["rc"] == 0, text
    assert m["seconds"] < HANG_SECONDS, (args, m)
    assert m["rss_mib"] < RSS_MIB, (args, m)
    return text


def _virtual_size(path: str, fmt: str) -> int:
    info = json.loads(qemu_img("info", "-f", fmt, "--output=json", path).stdout)
    return info["virtual-size"]


@pytest.mark.parametrize("fmt, size", CASES)
def test_huge_image_info_check_map_convert_in_bounded_time_and_memory(tmp_path, fmt, size):
    need_tool("qemu-img", "qemu-io")
    src = str(tmp_path / f"huge.{fmt}")
    qemu_img("create", "-q", "-f", fmt, src, size)
    vsize = _virtual_size(src, fmt)
    # data at the start, in the middle and at the very end
    regions = [(0, MiB, 0x11), (vsize // 2 // MiB * MiB, 64 * KiB, 0x22), (vsize - MiB, MiB, 0x33)]
    qemu_io(fmt, src, *(f"write -P {p:#x} {o} {n}" for o, n, p in regions))

    info = json.loads(bounded(tmp_path, "info", "--output", "json", src))
    assert info["format"] == fmt and info["virtual-size"] == vsize
    check = json.loads(bounded(tmp_path, "check", "--output", "json", src))
    assert check["corruptions"] == 0 and check["leaks"] == 0, check
    extents = json.loads(bounded(tmp_path, "map", "--output", "json", src))
    assert extents[0]["start"] == 0
    assert sum(e["length"] for e in extents) == vsize
    data = [(e["start"], e["start"] + e["length"]) for e in extents if e["data"]]
    for o, n, _ in regions:  # every region lies in a DATA extent, and little else does
        assert any(s <= o and o + n <= e for s, e in data), (o, data)
    assert sum(e - s for s, e in data) <= 3 * 64 * MiB  # at most a block (VHDX) a region

    out = str(tmp_path / "out.qcow2")
    bounded(tmp_path, "convert", "-f", fmt, "-O", "qcow2", src, out)
    assert _virtual_size(out, "qcow2") == vsize
    checked = json.loads(qemu_img("check", "--output=json", out).stdout)
    assert checked["allocated-clusters"] * 64 * KiB == sum(n for _, n, _ in regions), checked
    qemu_io(
        "qcow2",
        out,
        *(f"read -P {p:#x} {o} {n}" for o, n, p in regions),
        f"read -P 0 {vsize // 4} {MiB}",
        f"read -P 0 {vsize - 2 * MiB} {MiB}",
    )


# -- hostile headers: a table declared larger than the file could hold ------------------


def _patch(path: str, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _qcow2_l1(path: str) -> None:
    # 2 PiB needs 4M L1 entries (32 MiB, qemu's cap) at offset 0x30000 of a 256 KiB file
    _patch(path, 24, ">Q", 2 << 50)
    _patch(path, 36, ">I", 4 << 20)


def _qcow2_refcount_table(path: str) -> None:
    _patch(path, 56, ">I", 1 << 20)  # 1M clusters of refcount table: 64 GiB


def _vmdk_grain_directory(path: str) -> None:
    # capacity of 1 PiB (our cap): a 128 MiB grain directory, in a file of a few MiB
    _patch(path, 12, "<Q", 1 << 41)


def _vpc_checksum(block: bytearray, at: int) -> None:
    block[at : at + 4] = b"\0\0\0\0"
    block[at : at + 4] = struct.pack(">I", ~sum(block) & 0xFFFFFFFF)


def _vpc_bat(path: str) -> None:
    # the dynamic header's Max Table Entries: 2^31 blocks, an 8 GiB BAT; the footer's
    # size 2040 GiB with the maximal CHS that says "use the size field", so 1 M entries
    # (4 MiB) are needed from a 2 MiB file. Checksums fixed: only the sizes are hostile.
    with open(path, "r+b") as f:
        footer = bytearray(f.read(512))
        footer[40:60] = struct.pack(">QQHBB", 2040 << 30, 2040 << 30, 65535, 16, 255)
        _vpc_checksum(footer, 64)
        f.seek(0)
        f.write(footer)
        f.seek(-512, os.SEEK_END)
        f.write(footer)
        f.seek(512)
        dyn = bytearray(f.read(1024))
        dyn[28:32] = struct.pack(">I", 1 << 31)
        _vpc_checksum(dyn, 36)
        f.seek(512)
        f.write(dyn)


def _vdi_block_map(path: str) -> None:
    # disk size ~512 TiB, blocks in image 0x1fffff8: a 128 MiB block map in a small file
    _patch(path, 0x170, "<Q", 0x1FFFFF8 << 20)
    _patch(path, 0x180, "<I", 0x1FFFFF8)


def _vhdx_virtual_size(path: str) -> None:
    # VirtualDiskSize in the metadata region (not checksummed) raised to 64 TiB: the BAT
    # it needs (2 M entries, 16 MiB) is far larger than the 1 MiB BAT region
    size_item = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
    meta_region = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    with open(path, "r+b") as f:
        table = f.read(4 * MiB)
    at = table.index(meta_region, 192 * KiB)
    (region,) = struct.unpack_from("<Q", table, at + 16)
    item = table.index(size_item, region)
    (value_at,) = struct.unpack_from("<I", table, item + 16)
    _patch(path, region + value_at, "<Q", 64 << 40)


HOSTILE = [
    ("qcow2", _qcow2_l1),
    ("qcow2", _qcow2_refcount_table),
    ("vmdk", _vmdk_grain_directory),
    ("vpc", _vpc_bat),
    ("vdi", _vdi_block_map),
    ("vhdx", _vhdx_virtual_size),
]


@pytest.mark.parametrize("fmt, damage", HOSTILE, ids=[d.__name__.lstrip("_") for _, d in HOSTILE])
def test_table_larger_than_the_file_is_refused_never_read_whole(tmp_path, fmt, damage):
    need_tool("qemu-img", "qemu-io")
    path = str(tmp_path / f"hostile.{fmt}")
    qemu_img("create", "-q", "-f", fmt, path, "64M")
    damage(path)
    # info, map and convert open the image alike; check opens it to report damage
    for command in ("map", "check"):
        m, text = measured(tmp_path, command, "-f", fmt, path)
        assert m["seconds"] < HANG_SECONDS and m["rss_mib"] < RSS_MIB, (command, m)
        assert "Traceback" not in text, text
        if command == "check":
            # qemu-img's convention: 2 corrupt (or 1 when the image cannot be opened)
            assert m["rc"] in (1, 2), (command, m, text)
        else:
            # one line naming the format and the table
            assert m["rc"] == 1 and text.startswith(f"p2v: error: {fmt}: "), (command, text)
            assert text.count("\n") == 1, text
