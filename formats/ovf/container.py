"""Where an appliance's files are: a directory beside a .ovf, or an archive, in each of the
shapes virt-v2v's `-i ova` reads (its input/OVA.ml): a plain tar (the OVA the spec
defines), a tar compressed with gzip or xz, or a zip.

Every container answers the same three things: the regular files it holds and their
sizes, a small file's bytes (descriptor, manifest; capped), and readers of exactly a
file's declared size for the files to extract. Nothing here writes anything: names are
checked as members are listed, links, devices and names that could leave a directory are
refused, and a reader never yields more than the size the archive declared.

A compressed tar cannot be read out of order, so it is read twice: once to list members
and keep the small metadata files, once to stream the wanted files in archive order.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import lzma
import os
import stat
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

from ..errors import CorruptImage, FormatError, UnsafeImage, UnsupportedFeature
from . import ustar

#: the metadata files a first pass over a compressed tar keeps in memory (capped by the caller)
METADATA_SUFFIXES = (".ovf", ".mf")
#: what a compressed tar's first pass keeps of one metadata member, at most
MAX_METADATA = 4 << 20

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a first entry, or an empty archive's end record

#: errors a decompressor raises on damaged input
DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)


class Readable(Protocol):
    """What a container hands out for a file: bytes on read, b"" at the end."""

    def read(self, n: int = -1, /) -> bytes: ...


class Container:
    """The regular files of an appliance, by name ('/'-separated, relative to its top)."""

    kind = "ova"

    def __init__(self, path: str) -> None:
        self.path = path
        self.sizes: dict[str, int] = {}

    def read(self, name: str, cap: int) -> bytes:
        """A small file's bytes; UnsafeImage past `cap`."""
        size = self.sizes[name]
        if size > cap:
            raise UnsafeImage(f"{self.path}: {name} is {size} bytes (at most {cap} expected)")
        with self.stream([name]) as files:
            for _, f, n in files:
                data = f.read(n)
                if len(data) != n:
                    raise CorruptImage(f"{self.path}: {name} is truncated")
                return data
        raise CorruptImage(f"{self.path}: {name} vanished from the archive")  # pragma: no cover

    @contextlib.contextmanager
    def stream(self, names: Iterable[str]) -> Iterator[Iterator[tuple[str, Readable, int]]]:
        """(name, reader, size) for each of `names`, in the order cheapest for the
        container; each reader must be read before the next is taken."""
        raise NotImplementedError

    def check(self, name: str) -> None:
        """Raise when reading `name` would reach outside the appliance."""

    def _add(self, name: str, size: int) -> None:
        if name in self.sizes:
            raise CorruptImage(f"{self.path}: member {name} appears twice")
        self.sizes[name] = size


class Directory(Container):
    """An OVF package: the descriptor and its files side by side in one directory. A
    symlink that leads out of it is refused when it is named or read."""

    kind = "ovf"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.base = os.path.dirname(os.path.abspath(path))
        self._real_base = os.path.realpath(self.base)
        for entry in os.scandir(self.base):
            if entry.is_file():
                self.sizes[entry.name] = entry.stat().st_size

    def check(self, name: str) -> None:
        real = os.path.realpath(os.path.join(self.base, name))
        if os.path.commonpath([real, self._real_base]) != self._real_base:
            raise UnsafeImage(f"ovf: file {name} leads outside the package directory")

    @contextlib.contextmanager
    def stream(self, names):
        def each():
            for name in names:
                self.check(name)
                with open(os.path.join(self.base, name), "rb") as f:
                    yield name, f, os.fstat(f.fileno()).st_size

        yield each()


class Tar(Container):
    """A plain tar: each member read in place, at the offset its header gives."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._offsets: dict[str, int] = {}
        with open(path, "rb") as f:
            for m in ustar.members(f, os.fstat(f.fileno()).st_size):
                self._add(m.name, m.size)
                self._offsets[m.name] = m.offset

    @contextlib.contextmanager
    def stream(self, names):
        with open(self.path, "rb") as f:

            def each():
                for name in names:
                    f.seek(self._offsets[name])
                    yield name, f, self.sizes[name]

            yield each()


class CompressedTar(Container):
    """A tar inside a gzip or xz stream, read front to back, twice: the first pass lists
    the members and keeps the metadata files, the second streams the wanted ones."""

    def __init__(self, path: str, compression: str) -> None:
        super().__init__(path)
        self.kind = f"ova ({compression})"
        self.compression = compression
        self._metadata: dict[str, bytes] = {}
        with self._open() as f:
            for m in _guarded(ustar.members(f, None), path, compression):
                self._add(m.name, m.size)
                if m.name.lower().endswith(METADATA_SUFFIXES) and m.size <= MAX_METADATA:
                    self._metadata[m.name] = _read_exact(f, m.size, path, compression)

    def _open(self) -> io.BufferedIOBase:
        if self.compression == "gzip":
            return gzip.open(self.path, "rb")
        return lzma.open(self.path, "rb")

    def read(self, name: str, cap: int) -> bytes:
        if name in self._metadata and len(self._metadata[name]) <= cap:
            return self._metadata[name]
        return super().read(name, cap)

    @contextlib.contextmanager
    def stream(self, names):
        wanted = set(names)
        with self._open() as f:

            def each():
                for m in _guarded(ustar.members(f, None), self.path, self.compression):
                    if m.name in wanted:
                        yield m.name, _Guard(f, self.path, self.compression), m.size

            yield each()


class Zip(Container):
    """A zip, which the OVF spec does not allow and the field ships anyway (virt-v2v reads
    it). Each entry is inflated on its own, never past the size its directory declares."""

    kind = "ova (zip)"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        with _open_zip(path) as z:
            infos = z.infolist()
        if len(infos) > ustar.MAX_MEMBERS:
            raise UnsafeImage(f"{path}: more than {ustar.MAX_MEMBERS} zip entries")
        self._entries: dict[str, str] = {}  # checked name -> the entry's own name
        for info in infos:
            name = _zip_name(info)
            if name is None:
                continue
            self._add(name, info.file_size)
            self._entries[name] = info.filename

    @contextlib.contextmanager
    def stream(self, names):
        z = _open_zip(self.path)

        def each():
            for name in names:
                try:
                    f = z.open(self._entries[name])
                except (
                    *DECOMPRESS_ERRORS,
                    KeyError,
                    NotImplementedError,
                    RuntimeError,
                    ValueError,
                ) as exc:
                    # a damaged local header: zipfile seeks where it says (EINVAL) or finds junk
                    raise CorruptImage(f"{self.path}: {name}: {exc}") from exc
                with f:
                    # ZipExtFile stops at the entry's declared size and checks its CRC
                    yield name, _Guard(f, self.path, "zip"), self.sizes[name]

        with z:
            yield each()


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except NotImplementedError as exc:  # a zip version or feature zipfile does not read
        raise UnsupportedFeature(f"{path}: {exc}") from exc
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptImage(f"{path}: not a readable zip archive ({exc})") from exc


def _zip_name(info: zipfile.ZipInfo) -> str | None:
    """The entry's checked name, or None for a directory; links and the like refused."""
    mode = info.external_attr >> 16
    name = info.filename
    if (
        info.create_system == 3
        and mode
        and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR)
    ):
        what = "symbolic link" if stat.S_ISLNK(mode) else "special file"
        raise UnsafeImage(f"ova: zip entry {name!r} is a {what}; refused")
    if info.flag_bits & 0x1:
        raise UnsupportedFeature(f"ova: zip entry {name!r} is encrypted")
    if info.is_dir():
        ustar.check_member_name(name.rstrip("/"))
        return None
    return ustar.check_member_name(name)


class _Guard:
    """A decompressing reader whose damage is a CorruptImage naming the archive."""

    def __init__(self, f: Readable, path: str, compression: str) -> None:
        self._f, self._path, self._compression = f, path, compression

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except DECOMPRESS_ERRORS as exc:
            raise CorruptImage(
                f"{self._path}: {self._compression} data is damaged ({exc})"
            ) from exc


def _guarded(it: Iterator[ustar.Member], path: str, compression: str) -> Iterator[ustar.Member]:
    while True:
        try:
            m = next(it)
        except StopIteration:
            return
        except DECOMPRESS_ERRORS as exc:
            raise CorruptImage(f"{path}: {compression} data is damaged ({exc})") from exc
        yield m


def _read_exact(f: Readable, n: int, path: str, compression: str) -> bytes:
    data = _Guard(f, path, compression).read(n)
    if len(data) != n:
        raise CorruptImage(f"{path}: the archive ends inside a member")
    return data


def open_container(path: str) -> Container:
    """The container `path` is, told by its first bytes (as virt-v2v tells them), not by
    its name: an .ova may be a tar, a compressed tar or a zip."""
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    if path.lower().endswith(".ovf"):
        return Directory(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(GZIP_MAGIC):
            return CompressedTar(path, "gzip")
        if head.startswith(XZ_MAGIC):
            return CompressedTar(path, "xz")
        if head.startswith(ZIP_MAGIC):
            return Zip(path)
        return Tar(path)
    except FormatError as exc:
        if str(exc).startswith(path):
            raise
        raise type(exc)(f"{path}: {exc}") from exc
    except OSError as exc:
        raise FormatError(f"{path}: {exc.strerror}") from exc
