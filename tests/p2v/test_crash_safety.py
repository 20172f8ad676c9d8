"""Killing `p2v convert` at any moment never leaves an incomplete file under the final
name, and a rerun succeeds (the .partial + rename rule)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.external import qemu_img

MiB = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash") / "src.raw"
    rng = random.Random(5)
    with open(path, "wb") as f:
        f.truncate(256 * MiB)
        for i in range(0, 256, 3):
            f.seek(i * MiB)
            f.write(rng.randbytes(MiB))
    return str(path)


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
