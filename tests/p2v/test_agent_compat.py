"""One agent file for the Pythons old servers have: 2.6 (RHEL 6), 2.7 (RHEL 7, SLES 12)
and 3.x. vermin checks the source against each target; the protocol itself runs under
every interpreter this machine has (Debian 12 ships only 3.11 and no python2 package:
other interpreters are used when installed, never downloaded)."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from p2v import protocol
from p2v.protocol import PipeStream, start_agent
from tests.external import need_tool

MiB = 1 << 20
AGENT = os.path.join(os.path.dirname(protocol.__file__), "agent.py")
#: the versions the agent promises, as vermin spells them ("at most this is needed")
TARGETS = ("2.6", "3.0")


def interpreters() -> list[str]:
    """Every distinct Python on this machine, by its resolved path."""
    found: dict[str, str] = {}
    names = glob.glob("/usr/bin/python[23]*") + glob.glob("/usr/local/bin/python[23]*")
    names += glob.glob(os.path.expanduser("~/.pyenv/versions/*/bin/python"))
    for name in sorted(names):
        if not os.path.basename(name).replace("python", "").replace(".", "").isdigit():
            continue  # python3-config and the like
        real = os.path.realpath(name)
        if os.access(real, os.X_OK):
            found.setdefault(real, name)
    return sorted(found.values())


def test_agent_source_passes_the_static_check_for_python_2_6_2_7_and_3(tmp_path):
    vermin = shutil.which("vermin") or os.path.join(os.path.dirname(sys.executable), "vermin")
    if not os.path.exists(vermin):
        need_tool("vermin")
    targets = [f"-t={t}-" for t in TARGETS]
    res = subprocess.run(
        [vermin, *targets, "--no-tips", "--violations", AGENT], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # the check can fail: what the agent had before (str.format, os.pread) is refused
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nprint('{}'.format(os.pread(0, 1, 0)))\n")
    res = subprocess.run(
        [vermin, *targets, "--no-tips", "--violations", str(bad)], capture_output=True, text=True
    )
    assert res.returncode != 0 and "os.pread" in res.stdout, res.stdout


@pytest.mark.parametrize("python", interpreters())
def test_protocol_under_every_interpreter_here(python, tmp_path):
    path = tmp_path / "dev.raw"
    data = os.urandom(MiB) + bytes(MiB) + b"words " * (MiB // 6)
    path.write_bytes(data)
    conn = start_agent(PipeStream(python))
    try:
        assert conn.hello["version"] == protocol.VERSION
        h = conn.call(protocol.OP_OPEN, {"path": str(path)})
        assert h["size"] == len(data)
        for offset in (0, MiB, 2 * MiB):
            n = min(MiB, len(data) - offset)
            res = conn.read(h["handle"], offset, n, compress=True).result()
            buf = bytearray(n)
            res.data_into(memoryview(buf))
            assert bytes(buf) == data[offset : offset + n]
            assert res.digest == hashlib.sha256(data[offset : offset + n]).digest()
        assert conn.read(h["handle"], MiB, MiB, compress=False).result().is_zero
        digests = conn.hash(h["handle"], 0, len(data), 256 << 10).result()
        assert digests[4] == hashlib.sha256(bytes(256 << 10)).digest()
        inv = conn.call(protocol.OP_INVENTORY)
        assert inv["cpu"]["count"] == os.cpu_count()
        assert inv["memory_sources"]["mem_total"] > 0
        with pytest.raises(protocol.AgentRequestError, match="outside the device"):
            conn.read(h["handle"], len(data), 1, compress=False).result()
    finally:
        conn.close()
