"""The framing the agent speaks and the one the controller declares must agree: the
agent repeats the constants on purpose (it is one self-contained file)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from p2v import agent, protocol

SHARED = [
    "MAGIC",
    "VERSION",
    "OP_HELLO",
    "OP_INVENTORY",
    "OP_DISKS",
    "OP_OPEN",
    "OP_CLOSE",
    "OP_READ",
    "OP_HASH",
    "OP_FREEZE",
    "OP_THAW",
    "OP_SNAPSHOT",
    "OP_DROP_SNAPSHOT",
    "OP_BYE",
    "STATUS_OK",
    "STATUS_ERROR",
    "STATUS_INVALID",
    "READ_ZLIB",
    "DATA_ZLIB",
    "DATA_ZERO",
    "MAX_REQUEST_BODY",
    "MAX_READ",
    "MIN_HASH_CHUNK",
    "MAX_HASH_CHUNK",
    "MAX_HASH_CHUNKS",
    "MAX_HASH_SPAN",
    "MAX_IN_FLIGHT",
    "DIGEST",
    "DIGEST_SIZE",
]


def test_constants_agree():
    for name in SHARED:
        assert getattr(agent, name) == getattr(protocol, name), name
    assert protocol.CLIENT_IN_FLIGHT < agent.MAX_IN_FLIGHT


def test_headers_and_bodies_agree_byte_for_byte():
    req = protocol.RequestHeader.build({"op": 6, "flags": 1, "id": 0xDEADBEEF, "length": 16})
    assert req == agent.HEADER.pack(agent.MAGIC, 6, 1, 0xDEADBEEF, 16)
    assert agent.HEADER.size == protocol.HEADER_SIZE
    resp = agent.HEADER.pack(agent.MAGIC, 2, 3, 7, 99)
    parsed = protocol.ResponseHeader.parse(resp)
    assert (parsed.status, parsed.flags, parsed.id, parsed.length) == (2, 3, 7, 99)
    body = protocol.ReadBody.build({"handle": 3, "offset": 2**40 + 5, "length": 65536})
    assert agent.READ_BODY.unpack(body) == (3, 2**40 + 5, 65536)
    body = protocol.HashBody.build({"handle": 1, "offset": 4096, "length": 2**33, "chunk": 2**18})
    assert agent.HASH_BODY.unpack(body) == (1, 4096, 2**33, 2**18)
    assert protocol.HandleBody.build({"handle": 9}) == struct.pack(">I", 9)


def test_agent_command_carries_no_secret_and_reads_exact_length():
    cmd = protocol.agent_command(12345, sudo=True)
    assert cmd.startswith("sudo -n -- python3 -c ")
    assert "read(12345)" in cmd
    assert "password" not in cmd.lower()


class _Pieces:
    """A stream that hands out `data` in the given piece sizes (as SSH packets arrive)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.pos = data, sizes, 0

    def recv(self, n: int) -> bytes:
        size = self.sizes.pop(0) if self.sizes else n
        out = self.data[self.pos : self.pos + min(n, size)]
        self.pos += len(out)
        return out


@given(
    frames=st.lists(st.integers(0, 3000), max_size=12),
    sizes=st.lists(st.integers(1, 5000), max_size=40),
    cut=st.integers(0, 100),
)
def test_the_receiver_returns_each_frame_whole_whatever_the_pieces(frames, sizes, cut):
    data = bytes(i % 251 for i in range(sum(frames)))
    stream = data[: max(0, len(data) - cut)]  # the stream may end inside the last frame
    rx = protocol._Receiver(_Pieces(stream, sizes))
    pos = 0
    for n in frames:
        got = rx.read_exact(n)
        if pos + n > len(stream):
            assert got is None
            return
        assert got is not None and bytes(got) == data[pos : pos + n]
        pos += n
