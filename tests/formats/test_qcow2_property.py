"""Random writes and zero-writes on qcow2 images we create read back like a bytearray
model, before and after reopening, and leave metadata that `qemu-img check` (and ours)
finds clean."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats import qcow2
from tests.external import need_tool, run

SIZE = 1 << 20

VARIANTS = [
    {"cluster_size": "512"},
    {"cluster_size": "4k", "refcount_bits": "1"},
    {"cluster_size": "64k", "compat": "0.10"},
    {"cluster_size": "16k", "extended_l2": "on"},
    {"cluster_size": "4k", "lazy_refcounts": "on", "refcount_bits": "8"},
]

op = st.tuples(
    st.sampled_from(["write", "write", "zero"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 150_000),
    st.integers(0, 255),
)


def apply(img, model, ops):
    for kind, off, n, value in ops:
        n = min(n, SIZE - off)
        if kind == "write":
            img.write(off, bytes([value]) * n)
            model[off : off + n] = bytes([value]) * n
        else:
            img.write_zeroes(off, n)
            model[off : off + n] = bytes(n)


def qemu_check_clean(path):
    res = run(["qemu-img", "check", "--output=json", path])
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0


@pytest.fixture(scope="module")
def base_image(tmp_path_factory):
    """A backing image every overlay example shares (read-only)."""
    d = tmp_path_factory.mktemp("base")
    path = str(d / "base.qcow2")
    with qcow2.create(path, SIZE, cluster_size="4k") as img:
        img.write(0, bytes(range(256)) * (SIZE // 256))
    return path


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    variant=st.sampled_from(range(len(VARIANTS))),
    backing=st.booleans(),
    first=st.lists(op, min_size=1, max_size=8),
    second=st.lists(op, max_size=5),
    data=st.data(),
)
def test_random_writes_match_a_bytearray_model(base_image, variant, backing, first, second, data):
    opts = dict(VARIANTS[variant])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.qcow2")
        model = bytearray(SIZE)
        if backing:
            shutil.copy(base_image, os.path.join(d, "base.qcow2"))
            opts.update(backing_file="base.qcow2", backing_fmt="qcow2")
            model[:] = bytes(range(256)) * (SIZE // 256)
        with qcow2.create(path, SIZE, **opts) as img:
            apply(img, model, first)
            assert img.read(0, SIZE) == model
        with formats.open(path, writable=True) as img:
            assert img.read(0, SIZE) == model
            apply(img, model, second)
            off = data.draw(st.integers(0, SIZE - 1))
            assert img.read(off, SIZE - off) == model[off:]
        with formats.open(path) as img:
            assert img.read(0, SIZE) == model
            assert img.check().exit_code == 0, img.check()
        if data.draw(st.integers(0, 4)) == 0:  # qemu-img for a fifth of the examples
            need_tool("qemu-img")
            qemu_check_clean(path)
            raw = os.path.join(d, "t.raw")
            res = run(["qemu-img", "convert", "-O", "raw", path, raw])
            assert res.returncode == 0, res.stderr
            with open(raw, "rb") as f:
                assert f.read() == model


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 15), st.binary(min_size=0, max_size=4096)), max_size=12),
    st.sampled_from(["zlib", "zstd"]),
)
def test_compressed_writes_match_a_bytearray_model(chunks, ctype):
    cs = 4096
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.qcow2")
        model = bytearray(16 * cs)
        with qcow2.create(
            path,
            16 * cs,
            cluster_size="4k",
            compress=True,
            compression_type=ctype,
            refcount_bits="2",
        ) as img:
            for idx, blob in chunks:
                chunk = (blob * (cs // max(len(blob), 1) + 1))[:cs] if blob else bytes(cs)
                img.write_encoded(idx * cs, img.encode(idx * cs, chunk))
                model[idx * cs : (idx + 1) * cs] = chunk
        with formats.open(path) as img:
            assert img.read(0, img.size) == model
            assert img.check().exit_code == 0, img.check()
        with formats.open(path, writable=True) as img:  # overwrite compressed clusters
            img.write(cs // 2, b"\xee" * cs)
            model[cs // 2 : cs // 2 + cs] = b"\xee" * cs
        with formats.open(path) as img:
            assert img.read(0, img.size) == model
            assert img.check().exit_code == 0, img.check()
