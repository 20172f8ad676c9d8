"""formats.zeros against a byte-by-byte model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from formats.zeros import differ_mask, nonzero_mask, nonzero_runs

GRAIN = 64


def model_runs(data: bytes, grain: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in range(0, len(data), grain):
        e = min(s + grain, len(data))
        if any(data[s:e]):
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
    return out


blobs = st.lists(st.tuples(st.integers(0, 40 * GRAIN), st.integers(1, 255)), max_size=8).flatmap(
    lambda edits: st.integers(0, 40 * GRAIN).map(lambda n: (n, edits))
)


def build(n: int, edits) -> bytearray:
    data = bytearray(n)
    for off, v in edits:
        if off < n:
            data[off] = v
    return data


@settings(max_examples=300)
@given(blobs)
def test_nonzero_runs_match_the_model(spec):
    data = build(*spec)
    assert nonzero_runs(memoryview(data), GRAIN) == model_runs(bytes(data), GRAIN)


@settings(max_examples=200)
@given(blobs, blobs)
def test_masks_match_the_model(a_spec, b_spec):
    n = max(a_spec[0], b_spec[0])
    padded = -(-n // GRAIN) * GRAIN
    a = build(n, a_spec[1]) + bytes(padded - n)
    b = build(n, b_spec[1]) + bytes(padded - n)
    grains = range(0, padded, GRAIN)
    assert nonzero_mask(memoryview(a), n, GRAIN).tolist() == [any(a[s : s + GRAIN]) for s in grains]
    assert differ_mask(memoryview(a), memoryview(b), n, GRAIN).tolist() == [
        a[s : s + GRAIN] != b[s : s + GRAIN] for s in grains
    ]


# per grain: all zeros, a single non-zero byte inside (first and last word zero), or data
grain_kinds = st.lists(st.sampled_from(["zero", "inner", "data", "data", "data"]), max_size=40)


@settings(max_examples=200)
@given(grain_kinds, st.integers(8, GRAIN - 9))
def test_nonzero_mask_finds_data_away_from_a_grains_edges(kinds, inner):
    """Mostly-data chunks take the path that reads only the grains whose first and last
    words are zero: a byte between them must still count."""
    data = bytearray(len(kinds) * GRAIN)
    for i, kind in enumerate(kinds):
        if kind == "inner":
            data[i * GRAIN + inner] = 1
        elif kind == "data":
            data[i * GRAIN : (i + 1) * GRAIN] = bytes(range(1, GRAIN + 1))
    expect = [kind != "zero" for kind in kinds]
    assert nonzero_mask(memoryview(data), len(data), GRAIN).tolist() == expect
