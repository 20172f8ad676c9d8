"""The files every filesystem test puts in."""

from __future__ import annotations

import pytest

from tests.formats.filesystems.fsbuild import write_tree


@pytest.fixture
def tree(tmp_path) -> dict[str, bytes]:
    """A small directory tree: random and compressible files, an empty one, a nested one.
    Returns relative path -> content."""
    return write_tree(tmp_path / "tree")
