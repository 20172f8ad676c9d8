"""The imaging agent on its own: a local child process speaking the real protocol.

It must run on Python 3.6 (checked statically by vermin: Debian 12 has no 3.6
interpreter to run it under; these tests run it under the system python3), open devices
read-only, refuse out-of-range and oversized
requests, and leave nothing behind (filesystems thawed when the controller goes away).
"""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import time
import zlib

import pytest

from p2v import protocol
from p2v.protocol import AgentRequestError, PipeStream, start_agent
from tests.external import loop_mount, need_root, need_tool

MiB = 1 << 20
AGENT = os.path.join(os.path.dirname(protocol.__file__), "agent.py")


@pytest.fixture
def agent():
    conn = start_agent(PipeStream("python3"))
    yield conn
    conn.close()


@pytest.fixture
def device(tmp_path):
    path = tmp_path / "dev.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))  # incompressible
        f.write(b"text " * (MiB // 5) + b"x" * (MiB % 5))  # compressible
    return str(path)


def test_agent_source_is_python36_compatible():
    vermin = shutil.which("vermin") or os.path.join(os.path.dirname(sys.executable), "vermin")
    if not os.path.exists(vermin):
        need_tool("vermin")
    res = subprocess.run(
        [vermin, "-t=3.6-", "--no-tips", "--violations", AGENT], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_agent_imports_only_the_standard_library():
    import ast

    tree = ast.parse(pathlib.Path(AGENT).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_read_returns_data_digest_and_zero_flags(agent, device):
    h = agent.call(protocol.OP_OPEN, {"path": device})
    assert h["size"] == 16 * MiB and h["kind"] == "file"
    raw = pathlib.Path(device).read_bytes()
    for offset, compress in ((0, True), (3 * MiB, True), (4 * MiB, True), (4 * MiB, False)):
        res = agent.read(h["handle"], offset, MiB, compress=compress).result()
        buf = bytearray(MiB)
        res.data_into(memoryview(buf))
        assert bytes(buf) == raw[offset : offset + MiB]
        assert res.digest == hashlib.sha256(raw[offset : offset + MiB]).digest()
        if offset == 0:
            assert res.is_zero and res.payload == b""
        elif offset == 3 * MiB:
            assert not res.flags & protocol.DATA_ZLIB  # random data is sent as is
        elif compress:
            assert res.flags & protocol.DATA_ZLIB and len(res.payload) < MiB // 10
            assert zlib.decompress(res.payload) == raw[offset : offset + MiB]
        else:
            assert res.flags == 0 and len(res.payload) == MiB


def test_hash_matches_sha256_of_each_chunk(agent, device):
    h = agent.call(protocol.OP_OPEN, {"path": device})["handle"]
    raw = pathlib.Path(device).read_bytes()
    chunk = 768 << 10  # not a divisor of the range: the last chunk is short
    digests = agent.hash(h, MiB, 15 * MiB, chunk).result()
    want = [
        hashlib.sha256(raw[o : min(o + chunk, 16 * MiB)]).digest()
        for o in range(MiB, 16 * MiB, chunk)
    ]
    assert digests == want


@pytest.mark.parametrize(
    "offset, length, words",
    [
        (15 * MiB, 2 * MiB, "outside the device"),
        (2**63, 4096, "outside the device"),
        (0, protocol.MAX_READ + 1, "at most"),
    ],
)
def test_out_of_range_and_oversized_reads_are_refused(agent, device, offset, length, words):
    h = agent.call(protocol.OP_OPEN, {"path": device})["handle"]
    with pytest.raises(AgentRequestError, match=words) as info:
        agent.read(h, offset, length, compress=False).result()
    assert info.value.is_invalid
    # the agent keeps serving after a refusal
    assert agent.read(h, 0, 4096, compress=False).result().is_zero


def test_bad_hash_requests_and_handles_are_refused(agent, device):
    h = agent.call(protocol.OP_OPEN, {"path": device})["handle"]
    with pytest.raises(AgentRequestError, match="chunk"):
        agent.hash(h, 0, MiB, 512).result()
    with pytest.raises(AgentRequestError, match="too many"):
        agent.hash(h, 0, 2**33, MiB).result()
    with pytest.raises(AgentRequestError, match="outside"):
        agent.hash(h, 8 * MiB, 16 * MiB, MiB).result()
    with pytest.raises(AgentRequestError, match="no open device"):
        agent.read(h + 7, 0, 4096, compress=False).result()
    with pytest.raises(AgentRequestError, match="unknown operation"):
        agent.call(99)
    with pytest.raises(AgentRequestError, match="neither a block device nor a file"):
        agent.call(protocol.OP_OPEN, {"path": os.path.dirname(device)})


def test_devices_are_opened_read_only(agent, device):
    h = agent.call(protocol.OP_OPEN, {"path": device})["handle"]
    pid = agent.hello["pid"]
    fds = glob.glob(f"/proc/{pid}/fd/*")
    modes = []
    for fd in fds:
        try:
            if os.readlink(fd) == device:
                with open(f"/proc/{pid}/fdinfo/{os.path.basename(fd)}") as f:
                    flags = int(f.read().split("flags:")[1].split()[0], 8)
                modes.append(flags & os.O_ACCMODE)
        except OSError:
            continue
    assert modes == [os.O_RDONLY]
    agent.close_handle(h)
    with pytest.raises(AgentRequestError):
        agent.read(h, 0, 4096, compress=False).result()


def test_broken_frame_ends_the_session():
    stream = PipeStream()
    conn = start_agent(stream)
    stream.sendall(b"XX" + bytes(10))  # wrong magic: the stream is out of step
    deadline = time.monotonic() + 10
    while conn.failure is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert isinstance(conn.failure, protocol.AgentError)
    stream.proc.wait(timeout=10)
    assert stream.proc.returncode == 0
    conn.close()


def test_inventory_describes_this_machine(agent):
    inv = agent.call(protocol.OP_INVENTORY)
    assert inv["cpu"]["count"] == os.cpu_count()
    assert inv["memory"] > 0
    assert inv["firmware"] == ("uefi" if os.path.isdir("/sys/firmware/efi") else "bios")
    assert inv["kernel"]["release"] == os.uname().release
    for nic in inv["nics"]:
        assert nic["name"] != "lo"
        with open(f"/sys/class/net/{nic['name']}/address") as f:
            assert nic["mac"] == f.read().strip()


@pytest.fixture
def mounted_fs(tmp_path):
    need_root()
    need_tool("mkfs.ext4", "fsfreeze", "mount")
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(img)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    loop_mount(str(img), str(mnt))
    yield str(mnt)
    subprocess.run(["fsfreeze", "--unfreeze", str(mnt)], capture_output=True)
    subprocess.run(["umount", str(mnt)], check=True)


def _is_frozen(mnt: str) -> bool:
    # a second freeze of a frozen filesystem fails with EBUSY
    res = subprocess.run(["fsfreeze", "--freeze", mnt], capture_output=True)
    if res.returncode == 0:
        subprocess.run(["fsfreeze", "--unfreeze", mnt], check=True)
        return False
    return True


def test_freeze_thaw_and_thaw_when_the_controller_goes_away(mounted_fs):
    conn = start_agent(PipeStream())
    conn.call(protocol.OP_FREEZE, {"mountpoint": mounted_fs, "timeout": 60})
    assert _is_frozen(mounted_fs)
    conn.call(protocol.OP_THAW, {"mountpoint": mounted_fs})
    assert not _is_frozen(mounted_fs)
    with pytest.raises(AgentRequestError, match="not a mount point"):
        conn.call(protocol.OP_FREEZE, {"mountpoint": "/proc/self"})
    conn.call(protocol.OP_FREEZE, {"mountpoint": mounted_fs, "timeout": 60})
    conn.stream.close()  # the controller vanishes without a word
    conn.close()
    assert not _is_frozen(mounted_fs)


def test_snapshot_of_a_non_lvm_device_is_refused_cleanly(agent, device):
    with pytest.raises(AgentRequestError):
        agent.call(protocol.OP_SNAPSHOT, {"device": "/dev/null"})
    with pytest.raises(AgentRequestError, match="was not made by this agent"):
        agent.call(protocol.OP_DROP_SNAPSHOT, {"snapshot": "/dev/vg/root"})


def test_compression_is_used_only_when_the_link_is_the_bottleneck():
    from p2v.agent import CompressionPolicy

    text = b"log line with words that repeat " * 8192
    noise = os.urandom(len(text))
    fast = CompressionPolicy(cores=2)
    fast.note_compress(MiB, MiB // 2, 0.02)  # zlib: 50 MB/s
    fast.note_send(MiB, 0.002)  # link: 500 MB/s
    assert [fast.should_compress(text) for _ in range(15)].count(True) == 0
    assert fast.should_compress(text)  # every 16th block refreshes the estimate
    slow = CompressionPolicy(cores=2)
    slow.note_compress(MiB, MiB // 2, 0.02)
    slow.note_send(MiB, 0.1)  # link: 10 MB/s
    assert all(slow.should_compress(text) for _ in range(20))
    assert not slow.should_compress(noise)  # incompressible data is never compressed


def test_cancelled_and_refused_requests_leave_the_connection_usable(agent, device):
    h = agent.call(protocol.OP_OPEN, {"path": device})["handle"]
    futs = [agent.read(h, i * MiB, MiB, compress=False) for i in range(8)]
    for f in futs:
        f.cancel()
    with pytest.raises(AgentRequestError):
        agent.read(h, 16 * MiB, 1, compress=False).result()
    assert agent.read(h, 3 * MiB, 4096, compress=False).result().length == 4096
    assert agent.failure is None
