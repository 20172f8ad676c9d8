"""docs/README.md is the index: it links every document under docs/, and every relative
link in the documentation leads to a file that exists."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _documents() -> set[str]:
    found = set()
    for dirpath, _dirs, files in os.walk(DOCS):
        for f in files:
            if f.endswith(".md"):
                found.add(os.path.relpath(os.path.join(dirpath, f), DOCS))
    return found


def test_index_links_every_document():
    with open(os.path.join(DOCS, "README.md")) as f:
        linked = {os.path.normpath(m) for m in LINK.findall(f.read())}
    missing = _documents() - linked - {"README.md"}
    assert not missing, f"docs/README.md does not link {sorted(missing)}"


def test_relative_links_lead_to_files():
    broken = []
    for doc in sorted(_documents()):
        path = os.path.join(DOCS, doc)
        with open(path) as f:
            for target in LINK.findall(f.read()):
                if "://" in target or target.startswith("mailto:"):
                    continue
                if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                    broken.append(f"{doc}: {target}")
    assert not broken, broken
