"""Running the real tools tests check against (qemu-img, qemu-io, the p2v command).

A test that needs something absent (a tool, an oracle library, root, a loop device)
skips locally with the reason; under CI (CI=true) the same absence is a failure, because
`make test` installs everything and CI runs as root. These helpers are the suite's only
way to skip: a bare pytest.skip or skipif would hide from CI."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from types import ModuleType
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip with the reason locally; fail under CI, where nothing may be missing."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def need_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            unavailable(f"{name} is not installed (make test installs it)")


def need_root() -> None:
    if os.geteuid() != 0:
        unavailable("this test needs root")


def need_module(name: str, package: str) -> ModuleType:
    """An oracle library, imported; `package` is what provides it (pyproject's test extra)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"{name} cannot be imported ({exc}; {package} provides it)")


def need_file(path: str, package: str) -> None:
    if not os.path.exists(path):
        unavailable(f"{path} is missing (Debian package {package}; make test installs it)")


def loop_mount(source: str, target: str, options: str = "loop") -> None:
    """mount -o OPTIONS SOURCE TARGET, or a skip where this machine has no loop devices
    (a container without /dev/loop-control): CI's machine has them."""
    need_root()
    need_tool("mount")
    res = run(["mount", "-o", options, source, target])
    if res.returncode:
        unavailable(f"cannot loop-mount here: {res.stderr.strip()}")


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


#: how long a bounded operation (a hostile image refused, a huge table walked) may take
#: before a test calls it a hang: far above any machine's time for it, so that a loaded
#: machine never turns such a test red, and far below what an unbounded loop would take
HANG_SECONDS = 120
