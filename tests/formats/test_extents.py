import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from formats.extents import Extent, Kind, coalesce, from_cluster_kinds, intersect_data, runs


@given(st.lists(st.integers(0, 2), max_size=200))
def test_runs_reconstruct_the_array(values):
    arr = np.array(values, dtype=np.uint8)
    rebuilt = []
    for first, count, value in runs(arr):
        assert count > 0
        rebuilt += [value] * count
        assert first == len(rebuilt) - count
    assert rebuilt == values


def test_from_cluster_kinds_clips_to_range():
    kinds = np.array([0, 1, 1, 0], dtype=np.uint8)
    got = list(from_cluster_kinds(kinds, 100, 1000, 1050, 1350))
    assert got == [
        Extent(1050, 50, Kind.ZERO),
        Extent(1100, 200, Kind.DATA),
        Extent(1300, 50, Kind.ZERO),
    ]


@given(st.lists(st.tuples(st.integers(1, 50), st.booleans()), min_size=1, max_size=30))
def test_coalesce_and_intersect_agree_with_a_byte_model(parts):
    exts, pos = [], 0
    for n, is_data in parts:
        exts.append(Extent(pos, n, Kind.DATA if is_data else Kind.ZERO))
        pos += n
    merged = list(coalesce(exts))
    assert all(a.end == b.start and a.kind != b.kind for a, b in itertools.pairwise(merged))
    model = np.zeros(pos, bool)
    for e in exts:
        model[e.start : e.end] = e.kind == Kind.DATA
    half = [Extent(0, pos // 2, Kind.DATA), Extent(pos // 2, pos - pos // 2, Kind.ZERO)]
    both = np.zeros(pos, bool)
    for e in intersect_data(exts, half):
        both[e.start : e.end] = e.kind == Kind.DATA
    expect = model.copy()
    expect[pos // 2 :] = False
    assert (both == expect).all()
