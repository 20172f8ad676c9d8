"""The OVA container: a USTAR archive (POSIX.1-1988 `ustar` header, IEEE Std 1003.1
"pax" interchange format section), read and written with one header declaration.

We read tar ourselves instead of with `tarfile` because an OVA comes from strangers:
`tarfile` reads pax and GNU long-name headers of any declared size into memory and will
follow links on extraction. Here every header is checksummed, every size is checked
against the file, and links, devices and paths that could leave a directory are refused.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass

from construct import Bytes, PaddedString, Struct

from ..errors import CorruptImage, FormatError, UnsafeImage, UnsupportedFeature

BLOCK = 512
#: tar(1) pads archives to whole records of 20 blocks; readers do not need it, some tools like it
RECORD = 20 * BLOCK
#: the largest size an 11-digit octal field holds; beyond it GNU's base-256 form is used
MAX_OCTAL_SIZE = (1 << 33) - 1
MAX_MEMBERS = 4096
MAX_NAME = 255
#: pax and GNU long-name headers are small text; anything bigger is hostile
MAX_EXTENDED_HEADER = 64 << 10

REGULAR = (b"0", b"\0", b"7")  # '7' is a contiguous file: a regular file to readers
DIRECTORY = b"5"
PAX_HEADER = b"x"
PAX_GLOBAL = b"g"
GNU_LONGNAME = b"L"
LINKS = {b"1": "hard link", b"2": "symbolic link", b"K": "long link name"}
DEVICES = {b"3": "character device", b"4": "block device", b"6": "FIFO"}

# POSIX ustar header: 512 bytes, text fields NUL-padded, numbers in octal ASCII
Header = Struct(
    "name" / Bytes(100),
    "mode" / Bytes(8),
    "uid" / Bytes(8),
    "gid" / Bytes(8),
    "size" / Bytes(12),
    "mtime" / Bytes(12),
    "chksum" / Bytes(8),
    "typeflag" / Bytes(1),
    "linkname" / Bytes(100),
    "magic" / Bytes(6),  # b"ustar\0" (POSIX) or b"ustar " (GNU, with version b" \0")
    "version" / Bytes(2),
    "uname" / PaddedString(32, "ascii"),
    "gname" / PaddedString(32, "ascii"),
    "devmajor" / Bytes(8),
    "devminor" / Bytes(8),
    "prefix" / Bytes(155),
    # unused by POSIX and not always zero in the wild (a fuzzed archive made a Const raise
    # construct's own error here): read as bytes, written as zeros
    "pad" / Bytes(12),
)
assert Header.sizeof() == BLOCK


@dataclass(frozen=True)
class Member:
    """A regular file inside the archive: its name and where its bytes lie."""

    name: str
    offset: int
    size: int


# -- numbers --------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    """An octal field: digits, then a NUL, as POSIX writes them."""
    digits = f"{value:o}".encode()
    if len(digits) > width - 1:
        raise FormatError(f"ova: value {value} does not fit a {width}-byte tar field")
    return digits.rjust(width - 1, b"0") + b"\0"


def _size_field(value: int) -> bytes:
    if value <= MAX_OCTAL_SIZE:
        return _octal(value, 12)
    # GNU base-256: high bit set, then a big-endian number; read by GNU tar, bsdtar and
    # Python, and the only way a USTAR-shaped header can describe a disk over 8 GiB
    return bytes([0x80]) + value.to_bytes(11, "big")


def _number(field: bytes, what: str, where: int) -> int:
    if field[:1] and field[0] & 0x80:
        if field[0] != 0x80:
            raise CorruptImage(f"ova: negative base-256 {what} in tar header at {where:#x}")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptImage(
            f"ova: tar header at {where:#x}: {what} {field!r} is not an octal number"
        ) from None


def _checksum(block: bytes) -> int:
    return sum(block[:148]) + 8 * 0x20 + sum(block[156:])


# -- writing --------------------------------------------------------------------------


def header(name: str, size: int, *, mtime: int | None = None) -> bytes:
    """The 512-byte header of a regular file `name` of `size` bytes."""
    raw = name.encode("utf-8")
    prefix = b""
    if len(raw) > 100:
        cut = raw.rfind(b"/", 0, 156)
        if cut <= 0 or len(raw) - cut - 1 > 100:
            raise FormatError(f"ova: member name {name!r} is too long for a USTAR header")
        prefix, raw = raw[:cut], raw[cut + 1 :]
    fields = dict(
        name=raw.ljust(100, b"\0"),
        mode=_octal(0o644, 8),
        uid=_octal(0, 8),
        gid=_octal(0, 8),
        size=_size_field(size),
        mtime=_octal(int(time.time() if mtime is None else mtime), 12),
        chksum=b" " * 8,
        typeflag=b"0",
        linkname=bytes(100),
        magic=b"ustar\0",
        version=b"00",
        uname="",
        gname="",
        devmajor=_octal(0, 8),
        devminor=_octal(0, 8),
        prefix=prefix.ljust(155, b"\0"),
        pad=bytes(12),
    )
    block = bytearray(Header.build(fields))
    block[148:156] = f"{_checksum(bytes(block)):06o}".encode() + b"\0 "
    return bytes(block)


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def end_of_archive(position: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record as tar(1) writes."""
    end = position + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))


# -- reading --------------------------------------------------------------------------


def _text(field: bytes) -> str:
    raw = field.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptImage(f"ova: member name {raw!r} is not UTF-8") from None


def check_member_name(name: str) -> str:
    """The name normalised, or UnsafeImage when extracting it could leave the directory."""
    if not name or len(name) > MAX_NAME:
        raise UnsafeImage(f"ova: member name {name[:80]!r} is empty or too long")
    if "\0" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise UnsafeImage(f"ova: member name {name!r} contains forbidden characters")
    if name.startswith("/"):
        raise UnsafeImage(f"ova: member {name!r} has an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise UnsafeImage(f"ova: member {name!r} climbs out of the archive with '..'")
    clean = posixpath.normpath(name)
    if clean in (".", ""):
        raise UnsafeImage(f"ova: member name {name!r} names no file")
    return clean


def _pax_path(data: bytes, where: int) -> str | None:
    """The `path` record of a pax extended header ('LEN key=value\\n' records)."""
    path = None
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos, pos + 20)
        if space < 0:
            raise CorruptImage(f"ova: malformed pax header at {where:#x}")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise CorruptImage(f"ova: malformed pax record length at {where:#x}") from None
        if length <= space - pos + 1 or pos + length > len(data):
            raise CorruptImage(f"ova: pax record at {where:#x} runs past its header")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "strict")
        elif key in (b"linkpath",):
            raise UnsafeImage(f"ova: pax header at {where:#x} declares a link")
        pos += length
    return path


def _skip_to(f, pos: int) -> None:
    """Move a forward-only stream (a decompressor) to `pos` by reading, a megabyte at a time."""
    at = f.tell()
    if pos < at:
        raise CorruptImage(f"ova: tar member at {pos:#x} is behind the stream ({at:#x})")
    while at < pos:
        got = len(f.read(min(1 << 20, pos - at)))
        if not got:
            raise CorruptImage(f"ova: tar archive is truncated at {at:#x}")
        at += got


def members(f, file_size: int | None) -> Iterator[Member]:
    """The archive's regular files in archive order; anything unsafe raises UnsafeImage.

    `file_size` None reads `f` front to back as a stream (a decompressor): a consumer may
    read a member's bytes when it is yielded, from the position the stream is at."""
    pos = 0
    long_name: str | None = None
    count = 0
    stream = file_size is None
    while True:
        if file_size is not None and pos + BLOCK > file_size:
            if pos == file_size:
                return  # missing end-of-archive blocks: GNU tar accepts it too
            raise CorruptImage(f"ova: tar archive is truncated at {pos:#x} of {file_size:#x}")
        if stream:
            _skip_to(f, pos)
        else:
            f.seek(pos)
        block = f.read(BLOCK)
        if stream and not block:
            return
        if len(block) < BLOCK:
            raise CorruptImage(f"ova: short read at {pos:#x}")
        if block == bytes(BLOCK):
            return
        stored = _number(block[148:156], "checksum", pos)
        if stored != _checksum(block) and stored != _signed_checksum(block):
            raise CorruptImage(f"ova: tar header at {pos:#x} fails its checksum")
        h = Header.parse(block)
        if not h.magic.startswith(b"ustar"):
            raise UnsupportedFeature(
                f"ova: tar header at {pos:#x} is pre-POSIX (no 'ustar' magic); OVA needs USTAR"
            )
        size = _number(h.size, "size", pos)
        data_at = pos + BLOCK
        if file_size is not None and size > file_size - data_at:
            raise CorruptImage(
                f"ova: member at {pos:#x} declares {size} bytes, past the end of the "
                f"archive ({file_size:#x})"
            )
        nxt = data_at + size + (-size % BLOCK)
        flag = h.typeflag
        if flag in (PAX_HEADER, PAX_GLOBAL, GNU_LONGNAME):
            if size > MAX_EXTENDED_HEADER:
                raise UnsafeImage(f"ova: extended tar header at {pos:#x} is {size} bytes")
            data = f.read(size)  # the header was just read: the stream is at data_at
            if len(data) != size:
                raise CorruptImage(f"ova: extended tar header at {pos:#x} is truncated")
            if flag == GNU_LONGNAME:
                long_name = _text(data)
            elif flag == PAX_HEADER:
                long_name = _pax_path(data, pos) or long_name
            pos = nxt
            continue
        name = long_name
        long_name = None
        if name is None:
            name = _text(h.name)
            if h.magic == b"ustar\0" and h.prefix[:1] != b"\0":
                name = _text(h.prefix) + "/" + name
        if flag in LINKS:
            raise UnsafeImage(f"ova: member {name!r} is a {LINKS[flag]}; links are refused")
        if flag in DEVICES:
            raise UnsafeImage(f"ova: member {name!r} is a {DEVICES[flag]}; refused")
        clean = check_member_name(name.rstrip("/") if flag == DIRECTORY else name)
        count += 1
        if count > MAX_MEMBERS:
            raise UnsafeImage(f"ova: more than {MAX_MEMBERS} tar members")
        if flag == DIRECTORY:
            pos = nxt
            continue
        if flag not in REGULAR:
            raise UnsupportedFeature(f"ova: member {name!r} has tar type {flag!r}")
        yield Member(clean, data_at, size)
        pos = nxt


def _signed_checksum(block: bytes) -> int:
    # some old tars summed signed chars; POSIX allows readers to accept either
    def signed(b: bytes) -> int:
        return sum(x - 256 if x > 127 else x for x in b)

    return signed(block[:148]) + 8 * 0x20 + signed(block[156:])


def read_members(path: str) -> list[Member]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return list(members(f, size))
    except OSError as exc:
        raise FormatError(f"{path}: {exc.strerror}") from exc
