"""LVM2 physical volumes: the label and metadata area are used; each logical volume is
assembled from its segments and the filesystem inside it mapped in turn; physical
extents no logical volume holds are free.

On-disk format per LVM2's lib/format_text (label_header, pv_header, mda_header,
raw_locn); the metadata is LVM's text configuration format, parsed here by a small
recursive-descent parser. A logical volume that is not linear on this one PV (striped,
mirrored, thin, or spread over other PVs) has its extents here copied whole; its
sub-volumes (a RAID image, say) are themselves listed and mapped.
"""

from __future__ import annotations

import logging
import re
import zlib
from typing import Any

import numpy as np
from construct import Bytes, Int32ul, Int64ul, Struct

from ..errors import CorruptImage
from ..image import Image
from ..views import CompositeImage, Piece
from . import ranges
from .ranges import Ranges

log = logging.getLogger(__package__)

SECTOR = 512
LABEL_SCAN_SECTORS = 4

LabelHeader = Struct(
    "id" / Bytes(8),  # "LABELONE"
    "sector_xl" / Int64ul,
    "crc_xl" / Int32ul,  # from offset_xl to the end of the sector
    "offset_xl" / Int32ul,
    "type" / Bytes(8),  # "LVM2 001"
)
DiskLocn = Struct("offset" / Int64ul, "size" / Int64ul)
PVHeader = Struct("pv_uuid" / Bytes(32), "device_size_xl" / Int64ul)
MDAHeader = Struct(
    "checksum_xl" / Int32ul,
    "magic" / Bytes(16),
    "version" / Int32ul,
    "start" / Int64ul,
    "size" / Int64ul,
)
RawLocn = Struct("offset" / Int64ul, "size" / Int64ul, "checksum" / Int32ul, "flags" / Int32ul)
FMTT_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
RAW_LOCN_IGNORED = 0x1
INITIAL_CRC = 0xF597A6CF
MAX_METADATA = 64 << 20
MAX_AREAS = 16


def lvm_crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    """LVM's calc_crc: the CRC-32 polynomial without zlib's final inversion."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _label(head: bytes) -> tuple[int, Any] | None:
    for i in range(LABEL_SCAN_SECTORS):
        sector = head[i * SECTOR : (i + 1) * SECTOR]
        if len(sector) == SECTOR and sector[:8] == b"LABELONE" and sector[24:32] == b"LVM2 001":
            return i, LabelHeader.parse(sector)
    return None


def probe(head: bytes) -> str | None:
    return "LVM2_member" if _label(head) else None


def _read_locns(buf: bytes, pos: int) -> tuple[list[Any], int]:
    """A zero-terminated disk_locn list starting at `pos`."""
    out: list[Any] = []
    while True:
        if pos + DiskLocn.sizeof() > len(buf) or len(out) > MAX_AREAS:
            raise CorruptImage("lvm: the PV header's area lists run past the label sector")
        loc = DiskLocn.parse(buf[pos:])
        pos += DiskLocn.sizeof()
        if not loc.offset:
            return out, pos
        out.append(loc)


def read_metadata(image: Image) -> tuple[str, dict[str, Any], list[tuple[int, int]]]:
    """(PV uuid, parsed metadata, metadata areas as (offset, size)) of this PV."""
    found = _label(image.read(0, min(image.size, LABEL_SCAN_SECTORS * SECTOR)))
    if found is None:
        raise CorruptImage("lvm: no LVM2 label")
    index, label = found
    sector = image.read(index * SECTOR, SECTOR)
    if label.sector_xl != index or lvm_crc(sector[20:]) != label.crc_xl:
        raise CorruptImage("lvm: the label's checksum or position is wrong")
    if not 32 <= label.offset_xl <= SECTOR - PVHeader.sizeof():
        raise CorruptImage("lvm: the PV header lies outside the label sector")
    pvh = PVHeader.parse(sector[label.offset_xl :])
    _, pos = _read_locns(sector, label.offset_xl + PVHeader.sizeof())
    mdas, _ = _read_locns(sector, pos)
    areas = []
    text = None
    for mda in mdas:
        if mda.offset + mda.size > image.size or mda.size < MDA_HEADER_SIZE:
            raise CorruptImage(f"lvm: a metadata area at {mda.offset:#x} leaves the device")
        areas.append((mda.offset, mda.size))
        if text is None:
            text = _mda_text(image, mda.offset, mda.size)
    if text is None:
        raise CorruptImage("lvm: no metadata area holds the volume group's metadata")
    return pvh.pv_uuid.decode("ascii", "replace"), parse_config(text), areas


def _mda_text(image: Image, start: int, size: int) -> str | None:
    raw = image.read(start, MDA_HEADER_SIZE)
    h = MDAHeader.parse(raw)
    if h.magic != FMTT_MAGIC or h.start != start or lvm_crc(raw[4:]) != h.checksum_xl:
        raise CorruptImage(f"lvm: the metadata area header at {start:#x} is invalid")
    loc = RawLocn.parse(raw[MDAHeader.sizeof() :])
    if not loc.size or loc.flags & RAW_LOCN_IGNORED:
        return None
    if loc.size > min(MAX_METADATA, size - MDA_HEADER_SIZE) or not (
        MDA_HEADER_SIZE <= loc.offset < size
    ):
        raise CorruptImage("lvm: the metadata text lies outside its area")
    # the area is a ring after its header: text may wrap to just past the header
    first = min(loc.size, size - loc.offset)
    data = image.read(start + loc.offset, first)
    if first < loc.size:
        data += image.read(start + MDA_HEADER_SIZE, loc.size - first)
    if lvm_crc(data) != loc.checksum:
        raise CorruptImage("lvm: the metadata text fails its checksum")
    return data.rstrip(b"\0").decode("utf-8", "replace")


# -- the text format -----------------------------------------------------------------

_TOKEN = re.compile(
    r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|(-?\d+)|([A-Za-z0-9_.+\-/:@]+)|([={}\[\],]))', re.S
)
MAX_NESTING = 32


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise CorruptImage(f"lvm: metadata syntax error near {text[pos : pos + 20]!r}")
        pos = m.end()
        comment, string, number, word, punct = m.groups()
        if comment is not None:
            continue
        if string is not None:
            out.append(("str", re.sub(r"\\(.)", r"\1", string[1:-1])))
        elif number is not None:
            out.append(("num", int(number)))
        elif word is not None:
            out.append(("word", word))
        elif punct is not None:
            out.append((punct, punct))
    return out


def parse_config(text: str) -> dict[str, Any]:
    """LVM's configuration syntax: `name = value`, `name { ... }`, lists in brackets."""
    toks = _tokens(text)
    pos = 0

    def expect(kind: str) -> Any:
        nonlocal pos
        if pos >= len(toks) or toks[pos][0] != kind:
            got = toks[pos][1] if pos < len(toks) else "end of text"
            raise CorruptImage(f"lvm: metadata syntax error: expected {kind!r}, found {got!r}")
        pos += 1
        return toks[pos - 1][1]

    def value() -> Any:
        nonlocal pos
        if pos < len(toks) and toks[pos][0] == "[":
            pos += 1
            items = []
            while pos < len(toks) and toks[pos][0] != "]":
                items.append(value())
                if pos < len(toks) and toks[pos][0] == ",":
                    pos += 1
            expect("]")
            return items
        if pos < len(toks) and toks[pos][0] in ("str", "num", "word"):
            pos += 1
            return toks[pos - 1][1]
        raise CorruptImage("lvm: metadata syntax error: a value is missing")

    def section(depth: int, closing: bool) -> dict[str, Any]:
        nonlocal pos
        if depth > MAX_NESTING:
            raise CorruptImage("lvm: metadata nests too deeply")
        out: dict[str, Any] = {}
        while pos < len(toks):
            if toks[pos][0] == "}":
                if not closing:
                    raise CorruptImage("lvm: metadata syntax error: unbalanced '}'")
                pos += 1
                return out
            name = str(expect("word")) if toks[pos][0] == "word" else str(expect("str"))
            if pos < len(toks) and toks[pos][0] == "{":
                pos += 1
                out[name] = section(depth + 1, True)
            else:
                expect("=")
                out[name] = value()
        if closing:
            raise CorruptImage("lvm: metadata syntax error: a section is not closed")
        return out

    return section(0, False)


# -- mapping -------------------------------------------------------------------------


def _int(d: dict[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or v < 0:
        raise CorruptImage(f"lvm: {what} has no valid {key}")
    return v


def used(image: Image) -> Ranges:
    from . import map_volume

    pv_uuid, meta, areas = read_metadata(image)
    vgs = [(k, v) for k, v in meta.items() if isinstance(v, dict) and "physical_volumes" in v]
    if len(vgs) != 1:
        raise CorruptImage("lvm: the metadata describes no volume group")
    vg_name, vg = vgs[0]
    extent = _int(vg, "extent_size", "the volume group") * SECTOR
    if not extent:
        raise CorruptImage("lvm: the extent size is zero")
    pvs = vg["physical_volumes"]
    mine = [
        name
        for name, pv in pvs.items()
        if isinstance(pv, dict) and str(pv.get("id", "")).replace("-", "") == pv_uuid
    ]
    if len(mine) != 1:
        raise CorruptImage("lvm: this PV is not in its volume group's metadata")
    pv_name = mine[0]
    pv = pvs[pv_name]
    pe_start = _int(pv, "pe_start", f"PV {pv_name}") * SECTOR
    pe_count = _int(pv, "pe_count", f"PV {pv_name}")
    pe_end = pe_start + pe_count * extent
    if pe_end > image.size:
        raise CorruptImage(f"lvm: {pe_count} extents from {pe_start:#x} leave the device")
    parts = [ranges.span(0, pe_start), ranges.span(pe_end, image.size)]
    parts += [ranges.span(off, off + n) for off, n in areas]
    lvs = vg.get("logical_volumes", {})
    if not isinstance(lvs, dict):
        raise CorruptImage("lvm: logical_volumes is not a section")
    for lv_name, lv in lvs.items():
        if isinstance(lv, dict):
            parts.append(
                _map_lv(
                    image,
                    f"{vg_name}/{lv_name}",
                    lv,
                    pv_name,
                    pe_start,
                    pe_count,
                    extent,
                    map_volume,
                )
            )
    return ranges.merge(parts)


def _segments(lv: dict[str, Any], what: str) -> list[dict[str, Any]]:
    segs = [v for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)]
    return sorted(segs, key=lambda s: _int(s, "start_extent", what))


def _map_lv(
    image: Image,
    what: str,
    lv: dict[str, Any],
    pv_name: str,
    pe_start: int,
    pe_count: int,
    extent: int,
    map_volume,
) -> Ranges:
    """Used ranges (PV byte offsets) of one LV's extents on this PV."""
    segs = _segments(lv, what)
    here = []  # (LV byte offset, PV byte offset, length) of linear pieces on this PV
    whole = []  # PV byte ranges we cannot look inside
    linear = bool(segs)
    expected = 0
    for s in segs:
        start, count = _int(s, "start_extent", what), _int(s, "extent_count", what)
        stripes = s.get("stripes")
        stype = s.get("type")
        if start != expected:
            linear = False
        expected = start + count
        if stype != "striped" or not isinstance(stripes, list) or len(stripes) % 2:
            linear = False
            continue
        k = len(stripes) // 2
        if k != 1:
            linear = False
        per = count // k if k else 0
        for i in range(k):
            name, pe = stripes[2 * i], stripes[2 * i + 1]
            if name != pv_name:
                linear = False
                continue
            if not isinstance(pe, int) or pe < 0 or pe + per > pe_count:
                raise CorruptImage(f"lvm: {what} uses extents beyond its PV")
            pv_off = pe_start + pe * extent
            if k == 1:
                here.append((start * extent, pv_off, per * extent))
            whole.append((pv_off, pv_off + per * extent))
    if not whole:
        return ranges.empty()
    if not linear:
        log.warning(
            "logical volume %s is not linear on this physical volume; its extents are copied whole",
            what,
        )
        return np.array(whole, dtype=np.int64)
    lv_image = CompositeImage(
        [Piece(n, image=image, offset=pv_off) for _, pv_off, n in here], path=image.path
    )
    lv_used = map_volume(lv_image, f"logical volume {what}")
    out = []
    for lv_off, pv_off, n in here:  # one shift per segment
        out.append(ranges.shift(ranges.clip(lv_used, lv_off, lv_off + n), pv_off - lv_off))
    return np.concatenate(out) if out else ranges.empty()
