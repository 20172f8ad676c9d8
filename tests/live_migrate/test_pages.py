"""Page arithmetic: deltas decode to the new page, fingerprints see any changed word."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from live_migrate import pages as pg


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 40), st.integers(0, 512))
def test_delta_encode_then_apply_gives_the_new_pages(seed: int, n: int, changes: int) -> None:
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 2**63, (n, 512), dtype=np.uint64)
    new = old.copy()
    rows = rng.integers(0, n, changes)
    cols = rng.integers(0, 512, changes)
    new[rows, cols] = rng.integers(0, 2**63, changes, dtype=np.uint64)
    use, masks, values = pg.delta_encode(new, old, max_words=200)
    counts = (new != old).sum(axis=1)
    assert use.tolist() == (counts <= 200).tolist()
    target = old.copy()
    w = pg.fingerprint_weights(4096)
    fp = pg.fingerprints(old, w)
    pg.delta_apply(target, np.flatnonzero(use), masks, values, fp, w)
    assert (target[use] == new[use]).all()
    assert (target[~use] == old[~use]).all()
    # updated from the changed words only, the fingerprints are those of the pages
    assert (fp == pg.fingerprints(target, w)).all()


def test_fingerprints_change_with_any_word_and_are_zero_for_zero_pages() -> None:
    w = pg.fingerprint_weights(4096)
    assert (w & np.uint64(1)).all(), "odd weights: a single-word change always shows"
    rng = np.random.default_rng(1)
    page = rng.integers(0, 2**63, (1, 512), dtype=np.uint64)
    base = pg.fingerprints(page, w)[0]
    for word in (0, 1, 255, 511):
        changed = page.copy()
        changed[0, word] ^= np.uint64(1 << 63)
        assert pg.fingerprints(changed, w)[0] != base
    assert pg.fingerprints(np.zeros((3, 512), np.uint64), w).tolist() == [0, 0, 0]


def test_scan_finds_exactly_the_changed_pages() -> None:
    rng = np.random.default_rng(2)
    mem = rng.integers(0, 2**63, (5000, 512), dtype=np.uint64)
    sent = mem.copy()
    changed = rng.choice(5000, 300, replace=False)
    mem[changed, rng.integers(0, 512, 300)] += np.uint64(1)
    with ThreadPoolExecutor(2) as pool:
        found = pg.changed_pages(mem, sent, pool)
    assert set(np.flatnonzero(found)) == set(changed)
    assert set(np.flatnonzero(pg.changed_pages(mem, sent))) == set(changed)


def test_zero_pages() -> None:
    mem = np.ones((4, 512), np.uint64)
    mem[[0, 2]] = 0
    assert pg.zero_pages(mem).tolist() == [True, False, True, False]
