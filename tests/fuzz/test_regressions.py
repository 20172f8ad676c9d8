"""Inputs the fuzzer broke a parser with, kept small and rebuilt here in code: each test
names the finding and the rule it broke. They run in-process (no atheris), in
milliseconds, through the same targets the harness drives, so the rules (only the
parser's own errors, the file rules, the memory cap) apply to them as well.
"""

from __future__ import annotations

import hashlib
import zlib

import pytest

from tests.fuzz import targets


def _reply(status: int, flags: int, req_id: int, body: bytes) -> bytes:
    from p2v import protocol as P

    return (
        P.ResponseHeader.build(dict(status=status, flags=flags, id=req_id, length=len(body))) + body
    )


# -- p2v/protocol.py: the controller decoding an agent's READ ------------------------------


def test_agent_read_with_corrupt_zlib_is_an_agent_error():
    """Found by agent_replies: zlib.error escaped ReadResult.data_into."""
    from p2v import protocol as P

    digest = hashlib.sha256(b"").digest()
    stream = _reply(P.STATUS_OK, P.DATA_ZLIB, 2, digest + b"\x78\x9c\xff\xff\x00")
    targets.agent_replies_target(stream)
    r = P.ReadResult(4096, digest, P.DATA_ZLIB, b"\x78\x9c\xff\xff\x00")
    with pytest.raises(P.AgentError, match="corrupt zlib"):
        r.data_into(memoryview(bytearray(4096)))


def test_agent_read_zlib_bomb_is_refused_within_its_length():
    """The same decoder inflated without a bound: 1 MiB of zlib became 1 GiB in memory.
    Now it stops one byte past the READ's length (the cap would raise MemoryError)."""
    from p2v import protocol as P
    from tests.fuzz import guard

    z = zlib.compressobj(9)
    bomb = b"".join(z.compress(bytes(64 << 20)) for _ in range(16)) + z.flush()
    assert len(bomb) < 2 << 20
    r = P.ReadResult(65536, b"\0" * 32, P.DATA_ZLIB, bomb)
    with guard.memory_cap(256 << 20), pytest.raises(P.AgentError, match="does not end"):
        r.data_into(memoryview(bytearray(65536)))


def test_agent_read_zlib_with_trailing_bytes_is_refused():
    from p2v import protocol as P

    data = bytes(range(256)) * 16
    r = P.ReadResult(len(data), b"\0" * 32, P.DATA_ZLIB, zlib.compress(data) + b"junk")
    with pytest.raises(P.AgentError):
        r.data_into(memoryview(bytearray(len(data))))
    good = P.ReadResult(len(data), b"\0" * 32, P.DATA_ZLIB, zlib.compress(data))
    buf = bytearray(len(data))
    good.data_into(memoryview(buf))
    assert bytes(buf) == data


# -- formats/ovf: descriptors --------------------------------------------------------------

_ENVELOPE = (
    '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
    'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"/>'
)


@pytest.mark.parametrize("encoding", ["UTF-7", "UTF-16", "x-no-such-codec"])
def test_ovf_descriptor_in_an_encoding_expat_refuses_is_a_format_error(encoding):
    """Found by ovf: `<?xml ... encoding="UTF-7"?>` made expat raise a plain ValueError
    ("multi-byte encodings are not supported") through defusedxml."""
    data = f'<?xml version="1.0" encoding="{encoding}"?>\n{_ENVELOPE}'.encode()
    targets.ovf_target(data)
