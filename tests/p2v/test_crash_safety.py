"""Killing `p2v convert` or `p2v ovf pack` at any moment never leaves an incomplete file
under the final name, and a rerun succeeds (the .partial + rename rule). `p2v clone` is
killed in test_crash_safety_clone.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from formats.output import PARTIAL_SUFFIX
from tests.external import qemu_img
from tests.p2v.disks import allocated, kill_when, striped_disk

MiB = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return striped_disk(str(tmp_path_factory.mktemp("crash") / "src.raw"), 256, seed=5)


@pytest.mark.parametrize("fmt, extra", [("qcow2", []), ("qcow2", ["-c"]), ("raw", [])])
def test_sigkill_mid_write_never_leaves_partial_output_under_final_name(
    source, tmp_path, fmt, extra
):
    out = str(tmp_path / f"out.{fmt}")
    partial = out + PARTIAL_SUFFIX
    cmd = [sys.executable, "-m", "p2v", "convert", *extra, "-O", fmt, source, out]

    def finished() -> None:
        qemu_img("compare", source, out)  # what stands under the final name is whole
        os.unlink(out)

    # the source holds 86 MiB of data: kills as the output's first MiB lands, and
    # a third and two thirds of the way through
    for mib in (1, 32, 64):
        kill_when(cmd, lambda mib=mib: allocated(partial) >= mib * MiB, finished)
        assert not os.path.exists(out)
        assert allocated(partial) >= mib * MiB  # the killed run was writing its data
    rerun = subprocess.run([*cmd, "--force"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not os.path.exists(partial)
    qemu_img("compare", source, out)
    if fmt == "qcow2":
        qemu_img("check", out)


def _ova_holds(ova: str, source: str, scratch: str) -> None:
    """`p2v ovf unpack` verifies the archive and its manifest; the disk equals the source."""
    shutil.rmtree(scratch, ignore_errors=True)
    res = subprocess.run(
        [sys.executable, "-m", "p2v", "ovf", "unpack", "-O", "raw", ova, scratch],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    (disk,) = [f for f in os.listdir(scratch) if f.endswith(".img")]
    qemu_img("compare", "-f", "raw", "-F", "raw", source, os.path.join(scratch, disk))


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("crash-ova") / "src.raw")
    return striped_disk(path, 64, seed=6, last_mib=True)


def test_sigkill_of_ovf_pack_never_leaves_partial_ova_under_final_name(small_source, tmp_path):
    source = small_source
    out = str(tmp_path / "out" / "vm.ova")
    os.makedirs(os.path.dirname(out))

    def pack(to: str) -> list[str]:
        return [sys.executable, "-m", "p2v", "ovf", "pack", "-o", to, "-f", "raw", source]

    cmd = pack(out)
    stage = os.path.join(os.path.dirname(out), ".vm.ova.p2v-stage", "vm-disk1.vmdk.partial")
    partial = out + PARTIAL_SUFFIX

    def finished() -> None:
        _ova_holds(out, source, str(tmp_path / "check"))
        os.unlink(out)

    # killed while the disk is converted into the staging directory, then while the
    # archive (about 22 MiB) is written
    moments = [
        lambda: allocated(stage) >= MiB,
        lambda: allocated(partial) >= MiB,
        lambda: allocated(partial) >= 12 * MiB,
    ]
    for ready in moments:
        kill_when(cmd, ready, finished)
        assert not os.path.exists(out)
    rerun = subprocess.run([*cmd, "--force"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    _ova_holds(out, source, str(tmp_path / "check"))
    # what the killed runs staged is gone too: repeated crashes do not fill the disk
    assert os.listdir(os.path.dirname(out)) == ["vm.ova"]
