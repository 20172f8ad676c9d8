"""Windows and composites read exactly the bytes they stand for, with matching maps."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import formats
from formats.extents import Kind
from formats.views import CompositeImage, Piece, WindowImage
from tests.formats.memimage import MemoryImage

BASE = os.urandom(64 * 1024)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("img"), st.integers(0, 60_000), st.integers(1, 5000)),
            st.tuples(st.just("bytes"), st.integers(0, 0), st.integers(1, 3000)),
            st.tuples(st.just("zero"), st.integers(0, 0), st.integers(1, 3000)),
        ),
        min_size=1,
        max_size=8,
    ),
    st.data(),
)
def test_composite_reads_equal_the_concatenation(specs, data):
    base = MemoryImage(BASE)
    pieces, model = [], bytearray()
    for kind, off, n in specs:
        if kind == "img":
            n = min(n, len(BASE) - off)
            pieces.append(Piece(n, image=base, offset=off))
            model += BASE[off : off + n]
        elif kind == "bytes":
            chunk = bytes([len(model) % 251 + 1]) * n
            pieces.append(Piece(n, data=chunk))
            model += chunk
        else:
            pieces.append(Piece(n))
            model += bytes(n)
    comp = CompositeImage(pieces)
    assert comp.size == len(model)
    start = data.draw(st.integers(0, len(model) - 1))
    n = data.draw(st.integers(0, len(model) - start))
    assert comp.read(start, n) == bytes(model[start : start + n])
    ext = list(comp.extents())
    assert sum(e.length for e in ext) == len(model)
    for e in ext:  # ZERO extents really read as zeros
        if e.kind == Kind.ZERO:
            assert model[e.start : e.end] == bytes(e.length)


def test_window_is_bounded_and_shifts_extents():
    base = MemoryImage(bytes(4096) + BASE[:4096] + bytes(4096))
    with pytest.raises(formats.FormatError):
        WindowImage(base, 8192, 8192)
    w = WindowImage(base, 2048, 8192)
    assert w.read(2048, 4096) == BASE[:4096]
    with pytest.raises(formats.FormatError):
        w.read(8000, 500)
    assert [(e.start, e.length) for e in w.extents()] == [(0, 8192)]
    assert w.files() == base.files()
