"""Killing `p2v clone` at any moment never leaves an incomplete file under a final name
(image, machine.json, clone state, VM definition), a qcow2 killed mid-write is never
under its final name unless `qemu-img check` passes, and rerunning the same command
resumes and ends with an image equal to the server's disk.

The "server" is the real sshd on 127.0.0.1 of tests/p2v/conftest.py; its disk a file.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.external import qemu_img
from tests.p2v.disks import kill_when, striped_disk

MiB = 1 << 20

#: the CLI with the journal committed every 50 ms instead of every 30 s, so kills land
#: between journal records and a rerun resumes from one (the path a crash exercises)
CLI = (
    "import sys, p2v.clone\n"
    "p2v.clone.COMMIT_SECONDS = 0.05\n"
    "from p2v.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """A 96 MiB disk: random data every third MiB, zeros between (both cross the wire
    differently), and data in the last MiB."""
    path = str(tmp_path_factory.mktemp("crash-server") / "sda.raw")
    return striped_disk(path, 96, seed=7, last_mib=True)


def _same(src: str, image: str, fmt: str) -> bool:
    res = qemu_img("compare", "-f", "raw", "-F", fmt, src, image, check=False)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode == 0


def _check_finished_files(out: str, src: str, image: str, fmt: str) -> list[str]:
    """What stands under a final name in OUT is whole; returns the names seen."""
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    for name in names:
        path = os.path.join(out, name)
        if name.endswith((".partial", ".journal")):
            continue
        if name == os.path.basename(image):
            if fmt == "qcow2":
                qemu_img("check", path)
            assert _same(src, path, fmt), f"{name} stands under its final name but differs"
        elif name.endswith(".json"):
            with open(path) as f:
                json.load(f)  # a torn JSON file would raise
        elif name.endswith(".xml"):
            ET.parse(path)
        else:
            raise AssertionError(f"unexpected file {name} in {out}")
    if "machine.json" in names:
        # the description comes last: the image it names is there
        assert os.path.basename(image) in names
    return names


def test_sigkill_of_clone_never_leaves_partial_output_and_rerun_resumes(sshd, disk, tmp_path):
    fmt = "qcow2"  # the format with metadata a kill could tear; raw adds only seconds
    out = str(tmp_path / "out")
    image = os.path.join(out, f"sda.{fmt}")
    cmd = [
        sys.executable,
        "-c",
        CLI,
        "clone",
        "-p",
        str(sshd.port),
        "-i",
        sshd.user_key,
        "--no-agent",
        "--known-hosts",
        sshd.known_hosts,
        "--no-progress",
        "--disk",
        disk,
        "-O",
        fmt,
        "--target",
        "kvm",
        "-W",
        "3",
        sshd.target,
        out,
    ]
    journal = image + ".journal"

    def journal_state() -> tuple[int, int] | None:
        try:
            st = os.stat(journal)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def finished() -> None:  # a run that ended between two polls: whole, then again
        _check_finished_files(out, disk, image, fmt)
        subprocess.run(["rm", "-rf", out], check=True)

    # each kill lands as the copy journals a record (every 50 ms here), so a rerun
    # resumes from what the killed runs stored, however fast or loaded the machine
    for _ in range(3):
        before = journal_state()
        kill_when(cmd, lambda before=before: journal_state() not in (None, before), finished)
        _check_finished_files(out, disk, image, fmt)
        assert os.path.exists(image + ".partial"), "the kill landed after the copy"
        # the half-written qcow2 may leak clusters (exit 3) but is never corrupt
        res = qemu_img("check", image + ".partial", check=False)
        assert res.returncode in (0, 3), res.stdout + res.stderr
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "verified" in rerun.stdout
    names = _check_finished_files(out, disk, image, fmt)
    assert os.path.basename(image) in names and "machine.json" in names
    assert not [n for n in names if n.endswith((".partial", ".journal"))], names
    assert _same(disk, image, fmt)


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx", "vdi", "raw"])
def test_an_empty_extent_range_is_empty_in_every_format(tmp_path, fmt):
    """Found by the kill test: a clone killed after its journal reached the end of the
    disk resumes by asking the image for extents(size, size); qcow2 raised ValueError
    from numpy instead of yielding nothing, and the rerun failed."""
    import formats

    path = str(tmp_path / f"x.{fmt}")
    qemu_img("create", "-q", "-f", fmt, path, "96M")
    with formats.open(path, fmt) as img:
        for at in (img.size, MiB, 5):
            assert list(img.extents(at, at)) == []


def test_clone_killed_between_rename_and_state_save_is_complete_on_rerun(
    sshd, tmp_path, monkeypatch
):
    """The moment no random delay hits reliably: the image is verified and renamed, but
    the state file still says "copying". The rerun must take the image as done, not
    refuse it as a stranger's file under the name."""
    from p2v import clone as cloning
    from tests.p2v.conftest import connect_options

    disk = str(tmp_path / "server" / "sdb.raw")
    os.makedirs(os.path.dirname(disk))
    with open(disk, "wb") as f:
        f.write(random.Random(3).randbytes(4 * MiB))
        f.truncate(16 * MiB)
    out = str(tmp_path / "out")
    opts = cloning.CloneOptions(out_format="qcow2", disks=[disk])
    save = cloning._save_state

    def killed_at_complete(outdir, state):
        if any(e.get("state") == "complete" for e in state["disks"]):
            raise KeyboardInterrupt  # SIGKILL here: nothing after it runs
        save(outdir, state)

    monkeypatch.setattr(cloning, "_save_state", killed_at_complete)
    with pytest.raises(KeyboardInterrupt):
        cloning.clone(connect_options(sshd), out, opts)
    assert os.path.exists(os.path.join(out, "sdb.qcow2"))
    monkeypatch.setattr(cloning, "_save_state", save)
    res = cloning.clone(connect_options(sshd), out, opts)
    (d,) = res.disks
    assert d.skipped and d.verified is True
    assert _same(disk, d.image, "qcow2")
    assert sorted(os.listdir(out)) == ["machine.json", cloning.STATE_FILE, "sdb.qcow2"]
