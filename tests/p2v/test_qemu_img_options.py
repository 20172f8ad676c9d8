"""Every qemu-img option p2v's image commands accept means what it means in qemu-img
(docs/qemu-img.md lists them): each is run through both tools on the same inputs and
the results are compared with qemu-img's own readers."""

from __future__ import annotations

import json
import os

import pytest

from tests.external import p2v, qemu_img, qemu_io, run

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("spelling")
    raw = str(d / "disk.raw")
    with open(raw, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(b"compressible " * (MiB // 13))
        f.seek(9 * MiB)
        f.write(os.urandom(MiB))
    base = str(d / "base.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base)
    top = str(d / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("qcow2", top, "write -P 0x5a 4M 64k")
    return {"raw": raw, "base": base, "top": top, "dir": str(d)}


def both(tool_args: list[str], out_dir: str, name: str) -> tuple[str, str]:
    """Run `qemu-img ARGS OUT` and `p2v ARGS OUT`; both must succeed. The two outputs."""
    theirs, ours = os.path.join(out_dir, f"q-{name}"), os.path.join(out_dir, f"p-{name}")
    qemu_img(*tool_args, theirs)
    p2v(*tool_args, ours, check=True)
    return theirs, ours


def info(path: str, *extra: str) -> dict:
    return json.loads(qemu_img("info", "--output=json", *extra, path).stdout)


def data_ranges(entries: list[dict]) -> list[tuple[int, int]]:
    """The byte ranges a map calls data, coalesced (the tools split them differently)."""
    out: list[tuple[int, int]] = []
    for e in entries:
        if not e["data"]:
            continue
        if out and out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], e["start"] + e["length"])
        else:
            out.append((e["start"], e["start"] + e["length"]))
    return out


# -- convert --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "raw", "-O", "qcow2"],  # source and output formats
        ["-O", "qcow2", "-o", "cluster_size=131072"],  # creation options
        ["-O", "qcow2", "-W", "-m", "4"],  # out-of-order writes, parallel requests
        ["-O", "qcow2", "-m", "1"],
        ["-O", "raw", "-C"],  # copy offloading
        ["-O", "raw", "-t", "unsafe"],  # cache modes
        ["-O", "raw", "-t", "writeback"],
        ["-O", "vdi", "-p"],  # progress
    ],
    ids=lambda a: " ".join(a),
)
def test_convert_option_writes_what_qemu_img_writes(images, tmp_path, args):
    theirs, ours = both(["convert", *args, images["raw"]], str(tmp_path), "out")
    a, b = info(theirs), info(ours)
    for key in ("format", "virtual-size", "cluster-size"):
        assert a.get(key) == b.get(key), key
    qemu_img("compare", "-f", "raw", images["raw"], ours)


def test_convert_c_compresses_as_qemu_img_does(images, tmp_path):
    theirs, ours = both(["convert", "-c", "-O", "qcow2", images["raw"]], str(tmp_path), "c")
    for path in (theirs, ours):
        report = json.loads(qemu_img("check", "--output=json", path).stdout)
        assert report["compressed-clusters"] > 0, path
    qemu_img("compare", "-f", "raw", images["raw"], ours)


def test_convert_B_F_writes_an_overlay_on_that_backing_file(images, tmp_path):
    top_raw = str(tmp_path / "top.raw")
    qemu_img("convert", "-O", "raw", images["top"], top_raw)
    args = ["convert", "-O", "qcow2", "-B", images["base"], "-F", "qcow2", images["top"]]
    theirs, ours = both(args, str(tmp_path), "overlay")
    a, b = info(theirs), info(ours)
    assert a["backing-filename"] == b["backing-filename"] == images["base"]
    assert a["backing-filename-format"] == b["backing-filename-format"] == "qcow2"
    # only what differs from the backing file is in the overlay
    assert b["actual-size"] < 2 * MiB
    qemu_img("compare", "-f", "raw", top_raw, ours)


@pytest.mark.parametrize("m", ["0", "17"])
def test_convert_m_is_refused_outside_1_to_16_by_both(images, tmp_path, m):
    args = ["convert", "-m", m, "-O", "qcow2", images["raw"]]
    assert qemu_img(*args, str(tmp_path / "q"), check=False).returncode != 0
    res = p2v(*args, str(tmp_path / "p"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert not os.listdir(tmp_path)


def test_convert_m_sets_the_parallel_requests(images, tmp_path):
    """-m N reaches the engine as N requests in flight; --workers is its long spelling
    without qemu-img's bound; -W changes nothing."""
    from p2v.cli import parse

    for args, want in ((["-m", "3"], 3), (["--workers", "24"], 24), (["-W"], None)):
        ns = parse(["convert", *args, "-O", "raw", images["raw"], str(tmp_path / "x")])
        assert ns.workers == want


# -- info, check, compare, map, create ------------------------------------------------


@pytest.mark.parametrize("args", [["-f", "qcow2"], ["--backing-chain"], []], ids=str)
def test_info_options_describe_what_qemu_img_describes(images, args):
    theirs = json.loads(qemu_img("info", "--output=json", *args, images["top"]).stdout)
    ours = json.loads(p2v("info", "--output=json", *args, images["top"], check=True).stdout)
    if "--backing-chain" in args:
        # qemu-img lists the chain; p2v nests each backing image in the one above
        chain = []
        while ours is not None:
            chain.append(ours)
            ours = ours.get("backing-image")
        assert len(chain) == len(theirs) == 2
        pairs = zip(theirs, chain)
    else:
        pairs = [(theirs, ours)]
    for a, b in pairs:
        for key in ("format", "virtual-size", "cluster-size", "backing-filename"):
            assert a.get(key) == b.get(key), key


def test_check_exit_status_and_json_match_qemu_img(images):
    # (p2v also checks VHD, where qemu-img answers 63)
    for args, code in ((["-f", "qcow2", images["top"]], 0), (["-f", "raw", images["raw"]], 63)):
        theirs = qemu_img("check", "--output=json", *args, check=False)
        ours = p2v("check", "--output=json", *args)
        assert theirs.returncode == ours.returncode == code, ours.stderr
    ours = json.loads(p2v("check", "--output", "json", images["top"]).stdout)
    theirs = json.loads(qemu_img("check", "--output=json", images["top"]).stdout)
    assert ours["check-errors"] == theirs["check-errors"] == 0


def test_compare_f_F_s_decide_as_qemu_img_decides(images, tmp_path):
    d = str(tmp_path)
    empty, zeros, larger = (os.path.join(d, n) for n in ("e.qcow2", "z.qcow2", "l.qcow2"))
    for path, size in ((empty, "16M"), (zeros, "16M"), (larger, "20M")):
        qemu_img("create", "-q", "-f", "qcow2", path, size)
    qemu_io("qcow2", zeros, "write -P 0 0 1M")  # zeros, but allocated as data
    cases = [
        (["-f", "raw", "-F", "qcow2", images["raw"], images["base"]], 0),
        (["-f", "qcow2", "-F", "qcow2", images["base"], images["top"]], 1),
        ([empty, zeros], 0),
        (["-s", empty, zeros], 1),  # strict: block status differs
        ([empty, larger], 0),  # the extra range reads as zeros
        (["-s", empty, larger], 1),  # strict: sizes differ
        (["-s", images["base"], images["base"]], 0),
    ]
    for args, code in cases:
        theirs = qemu_img("compare", *args, check=False).returncode
        ours = p2v("compare", *args).returncode
        assert theirs == ours == code, args


def test_map_json_calls_the_same_ranges_data(images):
    for path in (images["raw"], images["top"]):
        theirs = json.loads(qemu_img("map", "--output=json", path).stdout)
        ours = json.loads(p2v("map", "--output=json", path, check=True).stdout)
        assert data_ranges(ours) == data_ranges(theirs), path


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "qcow2", "-o", "cluster_size=65536"],
        ["-f", "vdi"],
        ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"],  # size taken from the backing file
    ],
    ids=lambda a: " ".join(a),
)
def test_create_options_make_what_qemu_img_makes(images, args):
    d = images["dir"]
    name = "-".join(a.replace("=", "") for a in args if not a.startswith("-"))
    theirs, ours = (os.path.join(d, f"{who}-{name}.img") for who in ("q", "p"))
    size = [] if "-b" in args else ["32M"]
    run(["qemu-img", "create", "-q", *args, theirs, *size], check=True)
    p2v("create", *args, ours, *size, check=True)
    a, b = info(theirs), info(ours)
    for key in ("format", "virtual-size", "cluster-size", "backing-filename"):
        assert a.get(key) == b.get(key), key
    assert qemu_img("check", ours, check=False).returncode in (0, 63)
