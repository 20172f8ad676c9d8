"""The OVF manifest (DSP0243 section 5.1): one line per file, `SHA256(name)= hex`.

The spelling is exact on purpose: no space before the parenthesis, one after `=`.
Older vSphere builds accept only SHA1 and newer ones only SHA256 (INTEROP.md), so the
writer offers both; the reader also knows SHA512, which newer ovftool writes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..errors import CorruptImage, FormatError, UnsafeImage

ALGORITHMS = {"sha1": "SHA1", "sha256": "SHA256", "sha512": "SHA512"}
_BY_TAG = {v: k for k, v in ALGORITHMS.items()}
_DIGEST_LEN = {"sha1": 40, "sha256": 64, "sha512": 128}
MAX_MANIFEST = 1 << 20
MAX_LINES = 4096

_LINE = re.compile(r"^(SHA1|SHA256|SHA512) ?\(([^()\r\n]+)\) ?= ?([0-9a-fA-F]+)$")


@dataclass(frozen=True)
class Entry:
    algorithm: str  # hashlib name: sha1, sha256, sha512
    name: str
    digest: str  # lowercase hex


def algorithm(name: str) -> str:
    key = name.lower().replace("-", "")
    if key not in ALGORITHMS:
        raise FormatError(f"unknown manifest digest {name!r} (sha256 or sha1)")
    return key


def hasher(algo: str):
    return hashlib.new(algorithm(algo))


def line(algo: str, name: str, digest: str) -> str:
    return f"{ALGORITHMS[algorithm(algo)]}({name})= {digest.lower()}\n"


def build(entries: list[tuple[str, str]], algo: str = "sha256") -> bytes:
    """The manifest for (name, hex digest) pairs, in the order given."""
    return "".join(line(algo, n, d) for n, d in entries).encode("utf-8")


def size(names: list[str], algo: str = "sha256") -> int:
    """The manifest's exact length before any digest is known: OVA writers reserve it
    ahead of the disks, whose digests come last."""
    width = _DIGEST_LEN[algorithm(algo)]
    return len(build([(n, "0" * width) for n in names], algo))


def parse(data: bytes, *, where: str = "manifest") -> dict[str, Entry]:
    """name -> Entry; a malformed line or a name listed twice is a CorruptImage."""
    if len(data) > MAX_MANIFEST:
        raise UnsafeImage(f"{where}: {len(data)} bytes is too large for a manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptImage(f"{where}: not UTF-8 text") from None
    out: dict[str, Entry] = {}
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise UnsafeImage(f"{where}: {len(lines)} lines is too many for a manifest")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        m = _LINE.match(raw.strip())
        if not m:
            raise CorruptImage(f"{where}: line {number} is not 'SHA256(name)= hex': {raw[:80]!r}")
        algo = _BY_TAG[m.group(1)]
        digest = m.group(3).lower()
        if len(digest) != _DIGEST_LEN[algo]:
            raise CorruptImage(
                f"{where}: line {number}: {m.group(1)} digest has {len(digest)} hex digits"
            )
        name = m.group(2)
        if name in out:
            raise CorruptImage(f"{where}: {name!r} is listed twice")
        out[name] = Entry(algo, name, digest)
    return out
