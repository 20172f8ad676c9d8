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


_TAGGED = re.compile(r"^([A-Za-z0-9-]+) ?\(")


def parse(
    data: bytes, *, where: str = "manifest", warnings: list[str] | None = None
) -> dict[str, Entry]:
    """name -> Entry. A line that cannot be read is a CorruptImage, or, when `warnings` is
    given, a warning there and the line skipped (virt-v2v warns and reads on: manifests
    in the field hold lines no spec allows). A name listed twice is always refused."""
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
    bad: list[tuple[int, str]] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        m = _LINE.match(raw.strip())
        if not m:
            bad.append((number, raw))
            continue
        algo = _BY_TAG[m.group(1)]
        digest = m.group(3).lower()
        if len(digest) != _DIGEST_LEN[algo]:
            bad.append((number, raw))
            continue
        name = m.group(2)
        if name in out:
            raise CorruptImage(f"{where}: {name!r} is listed twice")
        out[name] = Entry(algo, name, digest)
    expected = _expected_algorithm(out)
    for number, raw in bad:
        problem = f"{where}: line {number} {_why_bad(raw.strip(), expected)}: {raw[:80]!r}"
        if warnings is None:
            raise CorruptImage(problem)
        warnings.append(f"{problem} (line skipped)")
    return out


def _expected_algorithm(entries: dict[str, Entry]) -> str:
    """The tag the manifest's good lines use, SHA256 when there are none or they differ."""
    tags = {ALGORITHMS[e.algorithm] for e in entries.values()}
    return tags.pop() if len(tags) == 1 else "SHA256"


def _why_bad(line: str, expected: str) -> str:
    m = _LINE.match(line)
    if m:
        tag = m.group(1)
        width = _DIGEST_LEN[_BY_TAG[tag]]
        return f"has a {tag} digest of {len(m.group(3))} hex digits ({tag} has {width})"
    tagged = _TAGGED.match(line)
    if tagged and tagged.group(1).upper() not in _BY_TAG:
        return f"uses {tagged.group(1)}, not one of {', '.join(_BY_TAG)}"
    return f"is not '{expected}(name)= hex' like the manifest's other lines"
