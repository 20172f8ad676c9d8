"""The VMDK text descriptor: parsed strictly, built with what VMware products need.

Spec: "Virtual Disk Format 5.0", "The Descriptor File". A descriptor is a small text file
(or a text area inside a monolithic sparse extent) of `key=value` lines, extent lines
`ACCESS SECTORS TYPE "FILE" [OFFSET]`, and the disk database (`ddb.*` keys).

Strict means: a line that is neither a comment, nor `key=value`, nor a well-formed extent
line is an error; a createType we do not know is UnsupportedFeature; extent sizes, offsets
and counts beyond sane caps are CorruptImage; the text itself is capped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import CorruptImage, UnsupportedFeature

#: a real descriptor is a few hundred bytes; a 62 TB twoGbMaxExtent disk has ~31,000
#: extent lines, about 1.5 MB
MAX_DESCRIPTOR_BYTES = 4 << 20
MAX_EXTENTS = 65536
#: 1 PiB in sectors, far beyond VMware's 62 TB limit
MAX_SECTORS = 1 << 41
NO_PARENT = 0xFFFF_FFFF

#: createTypes we read and their extent kinds; qemu's names for the writable ones
READABLE_TYPES = {
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsSparse",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "seSparse",
    "custom",
}
#: valid, but they name raw devices, which an image converter must not follow
DEVICE_TYPES = {
    "fullDevice",
    "partitionedDevice",
    "vmfsRaw",
    "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap",
}

ACCESS = ("RW", "RDONLY", "NOACCESS")
EXTENT_TYPES = ("FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE")
#: extent kinds whose line may carry a start offset inside the file
OFFSET_TYPES = ("FLAT", "VMFS", "VMFSRDM", "VMFSRAW")

_EXTENT_RE = re.compile(
    r"^(?P<access>RW|RDONLY|NOACCESS)\s+(?P<sectors>\d{1,20})\s+(?P<type>[A-Z]+)"
    r'(?:\s+"(?P<file>[^"]*)"(?:\s+(?P<offset>\d{1,20}))?)?\s*$'
)
_KEY_RE = re.compile(r"^(?P<key>[A-Za-z0-9_.]+)\s*=\s*(?P<value>.*?)\s*$")
_CORE_KEYS = ("version", "CID", "parentCID", "createType", "parentFileNameHint")


@dataclass
class ExtentLine:
    access: str
    sectors: int
    type: str
    filename: str | None = None
    offset: int = 0


@dataclass
class Descriptor:
    create_type: str
    extents: list[ExtentLine]
    cid: int = NO_PARENT
    parent_cid: int = NO_PARENT
    parent_hint: str | None = None
    version: int = 1
    ddb: dict[str, str] = field(default_factory=dict)
    #: header keys we carry but do not interpret (encoding, isNativeSnapshot, ...)
    other: dict[str, str] = field(default_factory=dict)

    @property
    def sectors(self) -> int:
        return sum(e.sectors for e in self.extents)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _hex32(value: str, key: str, where: str) -> int:
    try:
        n = int(value, 16)
    except ValueError:
        raise CorruptImage(f"{where}: {key}={value!r} is not a hexadecimal number") from None
    if not 0 <= n <= 0xFFFF_FFFF:
        raise CorruptImage(f"{where}: {key}={value!r} does not fit 32 bits")
    return n


_ENCODING_RE = re.compile(rb'^\s*encoding\s*=\s*"?([A-Za-z0-9_.-]{1,40})"?\s*$', re.M)


def _decode(raw: bytes) -> str:
    """Text in the descriptor's declared `encoding` (Windows products write their ANSI
    code page, e.g. windows-1252, for the parent's file name); UTF-8 otherwise."""
    m = _ENCODING_RE.search(raw)
    for codec in (m.group(1).decode() if m else "utf-8", "utf-8"):
        try:
            return raw.decode(codec)
        except (LookupError, UnicodeDecodeError):
            continue
    return raw.decode("latin-1")


def parse(raw: bytes, where: str) -> Descriptor:
    """Parse descriptor text: it ends at the first NUL, as qemu reads it. qemu rewrites a
    descriptor in place when it changes the CID and leaves the old text's tail after the
    new text's NUL (the CID is printed without leading zeros, so it can get shorter)."""
    if len(raw) > MAX_DESCRIPTOR_BYTES:
        raise CorruptImage(
            f"{where}: descriptor of {len(raw)} bytes exceeds the {MAX_DESCRIPTOR_BYTES} cap"
        )
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    keys: dict[str, str] = {}
    extents: list[ExtentLine] = []
    ddb: dict[str, str] = {}
    total = 0
    for lineno, line in enumerate(_decode(raw).split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.split(None, 1)[0] in ACCESS:
            ext = _parse_extent(line, f"{where}: descriptor line {lineno}")
            extents.append(ext)
            total += ext.sectors
            if len(extents) > MAX_EXTENTS:
                raise CorruptImage(f"{where}: more than {MAX_EXTENTS} extents")
            if total > MAX_SECTORS:
                raise CorruptImage(
                    f"{where}: extents add up to {total} sectors, over the {MAX_SECTORS} cap"
                )
            continue
        m = _KEY_RE.match(line)
        if m is None:
            raise CorruptImage(f"{where}: descriptor line {lineno} not understood: {line[:80]!r}")
        key, value = m["key"], _unquote(m["value"])
        if key.startswith("ddb."):
            ddb[key] = value
            continue
        if key in keys and key in _CORE_KEYS:
            raise CorruptImage(f"{where}: descriptor names {key} twice")
        keys[key] = value
    return _assemble(keys, extents, ddb, where)


def _parse_extent(line: str, where: str) -> ExtentLine:
    m = _EXTENT_RE.match(line)
    if m is None:
        raise CorruptImage(f"{where}: malformed extent line {line[:120]!r}")
    kind = m["type"]
    if kind not in EXTENT_TYPES:
        raise UnsupportedFeature(f"{where}: extent type {kind} is not supported")
    sectors = int(m["sectors"])
    if not 0 < sectors <= MAX_SECTORS:
        raise CorruptImage(f"{where}: extent of {sectors} sectors is out of range")
    filename = m["file"]
    if kind == "ZERO":
        filename = None
    elif not filename:
        raise CorruptImage(f"{where}: {kind} extent without a file name")
    offset = 0
    if m["offset"] is not None:
        if kind not in OFFSET_TYPES:
            raise CorruptImage(f"{where}: a {kind} extent takes no offset")
        offset = int(m["offset"])
        if offset > MAX_SECTORS:
            raise CorruptImage(f"{where}: extent offset {offset} is out of range")
    return ExtentLine(m["access"], sectors, kind, filename, offset)


def _assemble(
    keys: dict[str, str], extents: list[ExtentLine], ddb: dict[str, str], where: str
) -> Descriptor:
    create_type = keys.pop("createType", None)
    if create_type is None:
        raise CorruptImage(f"{where}: descriptor has no createType")
    if create_type in DEVICE_TYPES:
        raise UnsupportedFeature(
            f"{where}: createType {create_type!r} maps a raw device; copy the device instead"
        )
    if create_type not in READABLE_TYPES:
        raise UnsupportedFeature(f"{where}: unknown VMDK createType {create_type!r}")
    if not extents:
        raise CorruptImage(f"{where}: descriptor lists no extents")
    version_text = keys.pop("version", "1")
    if version_text not in ("1", "2", "3"):
        raise UnsupportedFeature(f"{where}: descriptor version {version_text!r}")
    desc = Descriptor(create_type=create_type, extents=extents, version=int(version_text), ddb=ddb)
    if "CID" in keys:
        desc.cid = _hex32(keys.pop("CID"), "CID", where)
    if "parentCID" in keys:
        desc.parent_cid = _hex32(keys.pop("parentCID"), "parentCID", where)
    hint = keys.pop("parentFileNameHint", None)
    if hint is not None:
        if not hint or "\0" in hint:
            raise CorruptImage(f"{where}: empty parentFileNameHint")
        desc.parent_hint = hint
    keys.pop("encoding", None)  # the text is decoded already; we always write UTF-8
    desc.other = keys
    return desc


def _quote(value: str, what: str) -> str:
    if any(c in value for c in '"\n\r\0'):
        raise ValueError(f"{what} {value!r} cannot be written into a VMDK descriptor")
    return f'"{value}"'


def build(desc: Descriptor) -> bytes:
    """The descriptor text, laid out as VMware's own tools lay it out."""
    lines = [
        "# Disk DescriptorFile",
        f"version={desc.version}",
        'encoding="UTF-8"',
        f"CID={desc.cid:08x}",
        f"parentCID={desc.parent_cid:08x}",
    ]
    if desc.parent_hint is not None:
        lines.append(f"parentFileNameHint={_quote(desc.parent_hint, 'backing file name')}")
    for key, value in desc.other.items():
        lines.append(f"{key}={_quote(value, key)}")
    lines += [f"createType={_quote(desc.create_type, 'createType')}", "", "# Extent description"]
    for e in desc.extents:
        line = f"{e.access} {e.sectors} {e.type}"
        if e.filename is not None:
            line += f" {_quote(e.filename, 'extent file name')}"
        if e.type in ("FLAT",):
            line += f" {e.offset}"
        lines.append(line)
    lines += ["", "# The Disk Data Base", "#DDB", ""]
    lines += [f"{key} = {_quote(value, key)}" for key, value in desc.ddb.items()]
    return ("\n".join(lines) + "\n").encode("utf-8")
