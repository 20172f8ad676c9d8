"""Partition tables against the tools that made them (sgdisk, sfdisk) and that read ours."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
import formats.disk
from formats import partitions
from formats.extents import Kind
from formats.partitions import Partition, PartitionTable, gpt, mbr
from tests.external import need_root, need_tool, p2v
from tests.formats.memimage import MemoryImage

MiB = 1 << 20
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd}: {res.stdout}{res.stderr}"
    return res


def sfdisk_json(path: str) -> dict:
    need_tool("sfdisk")
    return json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]


def blank(path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def same_as_sfdisk(table: PartitionTable, theirs: dict) -> None:
    """Every partition sfdisk lists, we list identically (and nothing more)."""
    ss = theirs["sectorsize"]
    assert table.sector_size == ss
    label = {"gpt": "gpt", "mbr": "dos"}[table.kind]
    assert theirs["label"] == label
    assert table.id.lower() == theirs["id"].lower()
    ours = {p.number: p for p in table.partitions}
    assert len(ours) == len(theirs["partitions"])
    for tp in theirs["partitions"]:
        number = int(tp["node"].rsplit("img", 1)[1])
        p = ours[number]
        assert p.start == tp["start"] * ss
        assert p.size == tp["size"] * ss
        assert p.type.upper() == tp["type"].upper()
        assert p.name == tp.get("name", "")
        if table.kind == "gpt":
            assert p.uuid == tp["uuid"]
            assert p.bootable == ("LegacyBIOSBootable" in tp.get("attrs", ""))
        else:
            assert p.bootable == tp.get("bootable", False)


@pytest.fixture(scope="module")
def gpt_template(tmp_path_factory):
    need_tool("sgdisk")
    path = blank(tmp_path_factory.mktemp("gpt") / "gpt.img", 64 * MiB)
    run(
        "sgdisk",
        "-o",
        "-n1:2048:+8M",
        "-t1:ef00",
        "-c1:EFI system",
        "-n2:0:+20M",
        "-t2:8300",
        "-c2:root ünïcode",
        "-A2:set:2",
        "-n3:0:0",
        "-t3:8200",
        path,
    )
    return path


@pytest.fixture
def gpt_disk(gpt_template, tmp_path):
    """sgdisk takes a second per change (it sleeps after syncing): made once, copied."""
    path = str(tmp_path / "gpt.img")
    shutil.copyfile(gpt_template, path)
    return path


@pytest.fixture
def mbr_disk(tmp_path):
    need_tool("sfdisk")
    path = blank(tmp_path / "mbr.img", 64 * MiB)
    script = (
        "label: dos\nlabel-id: 0x1234abcd\n"
        "start=2048, size=16384, type=83, bootable\n"
        "start=18432, size=81920, type=5\n"
        "start=20480, size=8192, type=82\n"
        "start=30720, size=8192, type=83\n"
        "start=40960, size=20480, type=7\n"
        "start=102400, size=20480, type=c\n"
    )
    run("sfdisk", "-q", path, input=script)
    return path


def test_gpt_made_by_sgdisk_reads_as_sfdisk_reads_it(gpt_disk):
    with formats.open(gpt_disk, "raw") as img:
        table = partitions.read_table(img)
    same_as_sfdisk(table, sfdisk_json(gpt_disk))
    assert table.kind == "gpt"
    assert table.partitions[1].name == "root ünïcode"
    assert table.partitions[1].bootable  # attribute bit 2
    assert table.partitions[0].type_name == "EFI System"
    assert table.warnings == []


def test_mbr_with_logical_partitions_reads_as_sfdisk_reads_it(mbr_disk):
    with formats.open(mbr_disk, "raw") as img:
        table = partitions.read_table(img)
    same_as_sfdisk(table, sfdisk_json(mbr_disk))
    assert [p.number for p in table.partitions] == [1, 2, 3, 5, 6, 7]
    assert table.partition(2).is_container
    assert table.partition(5).type_name == "Linux swap / Solaris"
    # the EBR of every logical partition is table metadata
    assert len(table.metadata) == 1 + 3


def test_gpt_we_write_is_read_identically_by_sfdisk_and_sgdisk(tmp_path):
    path = blank(tmp_path / "ours.img", 48 * MiB)
    parts = [
        Partition(1, MiB, 4 * MiB, ESP, "", name="EFI"),
        Partition(2, 5 * MiB, 20 * MiB, LINUX, "", name="root", uuid=str(uuid.uuid4()).upper()),
        Partition(4, 30 * MiB, 8 * MiB, SWAP, "", name="swap", bootable=True),
    ]
    table = PartitionTable("gpt", 512, 48 * MiB, str(uuid.uuid4()).upper(), parts)
    with formats.open(path, "raw", writable=True) as img:
        partitions.write_table(img, table)
    theirs = sfdisk_json(path)
    with formats.open(path, "raw") as img:
        back = partitions.read_table(img)
    same_as_sfdisk(back, theirs)
    assert [p.name for p in back.partitions] == ["EFI", "root", "swap"]
    assert back.id == table.id
    need_tool("sgdisk")
    printed = run("sgdisk", "-p", path).stdout
    assert table.id in printed
    for line, p in zip([ln for ln in printed.splitlines() if ln.strip()[:1].isdigit()], parts):
        fields = line.split()
        assert int(fields[0]) == p.number
        assert int(fields[1]) == p.start // 512 and int(fields[2]) == p.end // 512 - 1
    assert "No problems found" in run("sgdisk", "-v", path).stdout


def test_mbr_we_write_with_logicals_is_read_identically_by_sfdisk(tmp_path):
    path = blank(tmp_path / "ours.img", 64 * MiB)
    parts = [
        Partition(1, MiB, 8 * MiB, "83", "", bootable=True),
        Partition(2, 10 * MiB, 40 * MiB, "5", ""),
        Partition(5, 11 * MiB, 4 * MiB, "82", ""),
        Partition(6, 16 * MiB, 10 * MiB, "83", ""),
        Partition(7, 30 * MiB, 19 * MiB, "7", ""),
    ]
    table = PartitionTable("mbr", 512, 64 * MiB, "0xdeadbeef", parts)
    with formats.open(path, "raw", writable=True) as img:
        partitions.write_table(img, table)
    with formats.open(path, "raw") as img:
        back = partitions.read_table(img)
    same_as_sfdisk(back, sfdisk_json(path))
    assert [p.number for p in back.partitions] == [1, 2, 5, 6, 7]


def test_damaged_gpt_primary_falls_back_to_backup_with_a_warning(gpt_disk, caplog):
    with open(gpt_disk, "r+b") as f:
        f.seek(512 + 40)  # inside the primary header: its CRC no longer matches
        f.write(b"\xff\xff")
    with caplog.at_level(logging.WARNING), formats.open(gpt_disk, "raw") as img:
        table = partitions.read_table(img)
    assert [p.number for p in table.partitions] == [1, 2, 3]
    assert any("primary header is corrupt" in w for w in table.warnings)
    assert "using the backup" in caplog.text


def test_damaged_gpt_entries_fall_back_to_backup(gpt_disk):
    with open(gpt_disk, "r+b") as f:
        f.seek(1024 + 200)  # inside the primary entry array
        f.write(b"garbage")
    with formats.open(gpt_disk, "raw") as img:
        table = partitions.read_table(img)
    assert len(table.partitions) == 3
    assert any("entry array CRC" in w for w in table.warnings)


def test_gpt_with_both_copies_damaged_is_refused(gpt_disk):
    size = os.path.getsize(gpt_disk)
    with open(gpt_disk, "r+b") as f:
        for off in (512 + 40, size - 512 + 40):
            f.seek(off)
            f.write(b"\xff\xff")
    with (
        formats.open(gpt_disk, "raw") as img,
        pytest.raises(formats.CorruptImage, match="both headers"),
    ):
        partitions.read_table(img)


def _ebr_link(path: str, ebr_sector: int, link_to: int) -> None:
    """Point the EBR at `ebr_sector` to a next EBR at `link_to` (relative to the extended)."""
    with open(path, "r+b") as f:
        f.seek(ebr_sector * 512 + 446 + 16 + 8)
        f.write(link_to.to_bytes(4, "little"))


def test_mbr_chain_that_loops_is_refused(mbr_disk):
    # the last logical's EBR links back to the first EBR (relative sector 0)
    with formats.open(mbr_disk, "raw") as img:
        last_ebr = partitions.read_table(img).metadata[-1][0] // 512
    with open(mbr_disk, "r+b") as f:
        f.seek(last_ebr * 512 + 446 + 16)
        f.write(mbr.PartitionEntry.build(mbr.entry(5, 18432, 10)))
        f.seek(last_ebr * 512 + 446 + 16 + 8)
        f.write((0).to_bytes(4, "little"))
    with formats.open(mbr_disk, "raw") as img, pytest.raises(formats.CorruptImage, match="loops"):
        partitions.read_table(img)


def test_mbr_link_outside_extended_and_partition_past_end_are_refused(mbr_disk):
    _ebr_link(mbr_disk, 18432, 10**6)
    with formats.open(mbr_disk, "raw") as img, pytest.raises(formats.CorruptImage, match="outside"):
        partitions.read_table(img)
    with open(mbr_disk, "r+b") as f:
        f.seek(446 + 12)  # partition 1's size
        f.write((10**7).to_bytes(4, "little"))
    with formats.open(mbr_disk, "raw") as img, pytest.raises(formats.CorruptImage, match="outside"):
        partitions.read_table(img)


def test_filesystem_boot_sector_is_not_taken_for_a_table(tmp_path):
    need_tool("mkfs.vfat")
    path = blank(tmp_path / "fat.img", 16 * MiB)
    run("mkfs.vfat", path)
    with formats.open(path, "raw") as img:
        assert partitions.read_table(img) is None


def test_partition_image_is_a_window_with_shifted_extents(tmp_path):
    path = blank(tmp_path / "d.img", 16 * MiB)
    run("sfdisk", "-q", path, input="label: gpt\nstart=2048, size=4M\nsize=4M\n")
    payload = os.urandom(64 * 1024)
    with open(path, "r+b") as f:
        f.seek(5 * MiB + 8192)
        f.write(payload)
    with formats.open(path, "raw") as disk:
        part = partitions.partition_image(disk, 2)
        assert part.size == 4 * MiB
        assert part.read(8192, len(payload)) == payload
        data = [(e.start, e.length) for e in part.extents() if e.kind == Kind.DATA]
        assert data and data[0][0] <= 8192 and all(s < 4 * MiB for s, _ in data)
        with pytest.raises(formats.FormatError):
            part.read(4 * MiB - 1, 2)
        with pytest.raises(formats.FormatError, match="no partition 3"):
            partitions.partition_image(disk, 3)
        with pytest.raises(formats.FormatError, match="read-only"):
            part.write(0, b"x")
    with formats.open(path, "raw", writable=True) as disk:
        part = partitions.partition_image(disk, 1)
        part.write(0, b"written through")
    with open(path, "rb") as f:
        f.seek(MiB)
        assert f.read(15) == b"written through"


@pytest.mark.parametrize("kind", ["gpt", "mbr"])
def test_wrapped_partition_is_a_valid_disk_holding_it(tmp_path, kind):
    need_tool("mkfs.ext4", "sgdisk")
    part = blank(tmp_path / "part.img", 9 * MiB + 512)  # not a whole number of MiB
    run("mkfs.ext4", "-q", "-F", part, "9M")
    out = str(tmp_path / "disk.raw")
    p2v(
        "convert",
        "--wrap-partition",
        "--table",
        kind,
        "-f",
        "raw",
        "-O",
        "raw",
        part,
        out,
        check=True,
    )
    assert os.path.getsize(out) % MiB == 0
    theirs = sfdisk_json(out)
    [tp] = theirs["partitions"]
    assert tp["start"] == 2048 and tp["size"] == (9 * MiB + 512) // 512
    if kind == "gpt":
        assert tp["type"] == LINUX
        assert "No problems found" in run("sgdisk", "-v", out).stdout
    else:
        assert tp["type"] == "83" and tp["bootable"]
    with open(part, "rb") as a, open(out, "rb") as b:
        b.seek(MiB)
        assert a.read() == b.read(9 * MiB + 512)
    with formats.open(part, "raw") as pimg:
        wrapped = formats.disk.wrap_partition(pimg, kind)
        ext = list(wrapped.extents())
        assert ext[0].start == 0 and ext[0].kind == Kind.DATA  # the table is data
        assert sum(e.length for e in ext) == wrapped.size
        assert wrapped.read(MiB, 4096) == pimg.read(0, 4096)


def test_describe_names_filesystems(tmp_path):
    need_tool("mkfs.vfat", "mkswap", "sfdisk")
    path = blank(tmp_path / "d.img", 24 * MiB)
    script = f"label: gpt\nstart=2048, size=8M, type={ESP}\nsize=8M, type={SWAP}\nsize=+\n"
    run("sfdisk", "-q", path, input=script)
    for n, cmd in ((1, ["mkfs.vfat"]), (2, ["mkswap"])):
        with formats.open(path, "raw") as disk:
            p = partitions.read_table(disk).partition(n)
        tmp = blank(tmp_path / f"p{n}", p.size)
        run(*cmd, tmp)
        with open(tmp, "rb") as src, open(path, "r+b") as dst:
            dst.seek(p.start)
            dst.write(src.read())
    with formats.open(path, "raw") as disk:
        layout = formats.disk.describe(disk)
    assert layout.label == "gpt"
    assert [e.filesystem for e in layout.partitions] == ["vfat", "swap", None]


# -- hostile input ---------------------------------------------------------------------


def _mutated(base: bytes, edits: list[tuple[int, int]]) -> MemoryImage:
    data = bytearray(base)
    for off, value in edits:
        data[off % len(data)] = value
    return MemoryImage(data)


@pytest.fixture(scope="module")
def table_seeds(tmp_path_factory):
    """A GPT disk and an MBR disk with logicals, as bytes (the tail holds the GPT backup)."""
    need_tool("sgdisk", "sfdisk")
    d = tmp_path_factory.mktemp("seeds")
    g = blank(d / "g.img", 2 * MiB)
    run("sgdisk", "-a", "8", "-n1:40:+100K", "-n2:0:+200K", "-c2:x", "-n3:0:0", g)
    m = blank(d / "m.img", 2 * MiB)
    script = "start=40, size=100, type=83\nstart=200, size=3000, type=5\n"
    script += "start=300, size=100, type=82\nstart=500, size=100\nstart=700, size=100\n"
    run("sfdisk", "-q", m, input=script)
    out = []
    for path in (g, m):
        with open(path, "rb") as f:
            out.append(f.read())
    return out


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 1),
    edits=st.lists(
        st.tuples(
            st.one_of(
                st.integers(0, 34 * 512), st.integers(-34 * 512, -1), st.integers(0, 2 * MiB)
            ),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_damaged_tables_raise_only_format_errors(table_seeds, which, edits):
    img = _mutated(table_seeds[which], edits)
    try:
        table = partitions.read_table(img)
    except formats.FormatError:
        return
    if table is not None:
        for p in table.partitions:
            assert p.start > 0 and p.end <= img.size


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=8192))
def test_random_bytes_raise_only_format_errors(data):
    try:
        partitions.read_table(MemoryImage(data + bytes(512 * 40)))
    except formats.FormatError:
        pass


def test_gpt_entries_parse_and_build_round_trip(gpt_disk):
    with formats.open(gpt_disk, "raw") as img:
        table = partitions.read_table(img)
    rebuilt = gpt.build_entries(table)
    assert rebuilt == table.raw["entries"]
    with open(gpt_disk, "rb") as f:
        raw = f.read(1024)[512:]
    h = gpt.GPTHeader.parse(raw)
    assert gpt.GPTHeader.build(h) == raw[: gpt.HEADER_SIZE]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.fixed_dictionaries(
        {
            "header_size": st.sampled_from([92, 0, 91, 512, 513, 2**32 - 1]),
            "my_lba": st.sampled_from([1, 0, 2, 2**64 - 1]),
            "alternate_lba": st.integers(0, 2**64 - 1),
            "first_usable_lba": st.integers(0, 5000),
            "last_usable_lba": st.one_of(st.integers(0, 5000), st.just(2**64 - 1)),
            "partition_entry_lba": st.one_of(st.integers(0, 5000), st.just(2**64 - 1)),
            "number_of_partition_entries": st.one_of(st.integers(0, 300), st.just(2**32 - 1)),
            "size_of_partition_entry": st.sampled_from([128, 0, 8, 127, 256, 4096, 2**32 - 1]),
        }
    ),
    st.lists(st.tuples(st.integers(0, 128 * 128 - 1), st.integers(0, 255)), max_size=8),
)
def test_headers_with_valid_crcs_and_hostile_fields_raise_only_format_errors(
    table_seeds, fields, entry_edits
):
    """CRCs recomputed, so the checks behind them are what is exercised."""
    import zlib

    disk = bytearray(table_seeds[0])
    entries = bytearray(disk[1024 : 1024 + 128 * 128])
    for off, value in entry_edits:
        entries[off] = value
    disk[1024 : 1024 + len(entries)] = entries
    h = dict(gpt.GPTHeader.parse(disk[512:1024]))
    h.pop("_io", None)
    h.update(fields, header_crc32=0, partition_entry_array_crc32=zlib.crc32(entries))
    raw = bytearray(gpt.GPTHeader.build(h).ljust(512, b"\0"))
    size = min(h["header_size"], 512)
    h["header_crc32"] = gpt.header_crc(bytes(raw), size)
    disk[512:1024] = gpt.GPTHeader.build(h).ljust(512, b"\0")
    disk[-512:] = bytes(512)  # no backup to fall back to
    try:
        table = partitions.read_table(MemoryImage(disk))
    except formats.FormatError:
        return
    assert table is not None
    for p in table.partitions:
        assert p.start > 0 and p.end <= len(disk)


def test_ntfs_boot_sector_is_never_a_table_whatever_its_code_bytes():
    sector = bytearray(512)
    sector[0:3] = b"\xeb\x52\x90"
    sector[3:11] = b"NTFS    "
    sector[446 + 4] = 0x07  # boot code that happens to look like a used entry
    sector[446 + 12] = 0x10
    sector[510:512] = b"\x55\xaa"
    assert partitions.read_table(MemoryImage(bytes(sector) + bytes(1 << 20))) is None


def test_gpt_with_4096_byte_sectors(tmp_path):
    """Made by sfdisk on a loop device with 4 KiB logical sectors (a 4Kn disk's image)."""
    need_root()
    need_tool("losetup", "sfdisk")
    path = blank(tmp_path / "4k.img", 64 * MiB)
    dev = run("losetup", "-f", "--show", "--sector-size", "4096", path).stdout.strip()
    try:
        subprocess.run(
            ["sfdisk", "-q", dev],
            input="label: gpt\nsize=8M\nsize=16M\n",
            text=True,
            capture_output=True,
            check=False,  # it cannot re-read a loop device's table
        )
        theirs = json.loads(run("sfdisk", "--json", dev).stdout)["partitiontable"]
    finally:
        run("losetup", "-d", dev)
    with formats.open(path, "raw") as img:
        table = partitions.read_table(img)
    assert table.sector_size == 4096 == theirs["sectorsize"]
    assert [(p.start, p.size) for p in table.partitions] == [
        (tp["start"] * 4096, tp["size"] * 4096) for tp in theirs["partitions"]
    ]
