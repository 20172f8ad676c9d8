"""Killing `p2v convert` or `p2v ovf pack` at any moment never leaves an incomplete file
under the final name, and a rerun succeeds (the .partial + rename rule). `p2v clone` is
killed in test_crash_safety_clone.py."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.external import qemu_img
from tests.p2v.disks import striped_disk

MiB = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return striped_disk(str(tmp_path_factory.mktemp("crash") / "src.raw"), 256, seed=5)


@pytest.mark.parametrize("fmt, extra", [("qcow2", []), ("qcow2", ["-c"]), ("raw", [])])
def test_sigkill_never_leaves_partial_output_under_final_name(source, tmp_path, fmt, extra):
    delays = random.Random(42).sample([i / 100 for i in range(5, 120)], 4)
    out = str(tmp_path / f"out.{fmt}")
    cmd = [sys.executable, "-m", "p2v", "convert", *extra, "-O", fmt, source, out]
    for delay in delays:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if os.path.exists(out):
            # it finished before the kill: what stands there must be whole
            qemu_img("compare", source, out)
            os.unlink(out)
    rerun = subprocess.run([*cmd, "--force"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
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
    # moments as fractions of a timed whole run: inside the conversion, the staging and
    # the archive on a fast machine and a loaded one alike
    t0 = time.monotonic()
    subprocess.run(pack(str(tmp_path / "ref.ova")), check=True, capture_output=True)
    whole = time.monotonic() - t0
    rng = random.Random(43)
    # the archive is written in the last fifth or so: two moments aim there
    delays = [whole * rng.uniform(0.2, 1.0) for _ in range(3)]
    delays += [whole * rng.uniform(0.8, 1.0) for _ in range(2)]
    for delay in delays:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if os.path.exists(out):
            _ova_holds(out, source, str(tmp_path / "check"))
            os.unlink(out)
    rerun = subprocess.run([*cmd, "--force"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    _ova_holds(out, source, str(tmp_path / "check"))
    # what the killed runs staged is gone too: repeated crashes do not fill the disk
    assert os.listdir(os.path.dirname(out)) == ["vm.ova"]
