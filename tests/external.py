"""Running the real tools tests check against (qemu-img, qemu-io, the p2v command).

A test that needs an absent tool skips locally with the reason; under CI (CI=true) the
same absence is a failure, because `make test` installs the tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            msg = f"{name} is not installed (make test installs it)"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)


def need_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test needs root")
        pytest.skip("this test needs root")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, **kw)


def p2v(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the p2v command as a user would, in a child process."""
    res = run([sys.executable, "-m", "p2v", *args], **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"p2v {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    need_tool("qemu-img")
    res = run(["qemu-img", *args])
    if check and res.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} failed: {res.stderr}")
    return res


def qemu_io(fmt: str, path: str, *commands: str) -> None:
    need_tool("qemu-io")
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    res = run([*cmd, path])
    if res.returncode != 0 or "error" in res.stdout.lower() or "failed" in res.stdout.lower():
        raise AssertionError(f"qemu-io {commands} on {path}: {res.stdout}{res.stderr}")
