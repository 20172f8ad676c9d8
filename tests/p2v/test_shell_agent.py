"""p2v clone and sync of a server with no Python at all (p2v/shell_agent.py): an sshd whose
sessions run in a busybox-only chroot, in a network namespace of the test's own
(tests/p2v/busybox_server.py). The same assertions as the Python agent's tests: the image
equals the disk (qemu-img compare), it is verified, a cut connection resumes, a sync
sends only the changed blocks; plus the no-Python inventory and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from p2v import clone as cloning
from p2v.shell_agent import UNIT, dd_geometry
from tests.external import need_tool, qemu_img, run, unavailable
from tests.p2v.busybox_server import MACS, busybox_server
from tests.p2v.conftest import connect_options
from tests.p2v.test_clone import _cutting_progress

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def loop_disk(pristine_disk, tmp_path_factory):
    """The server disk also as a loop device (a block device in the chroot), when this
    machine can make one."""
    need_tool("losetup")
    path = str(tmp_path_factory.mktemp("loop") / "loop.raw")
    subprocess.run(["cp", "--sparse=always", pristine_disk[0], path], check=True)
    res = run(["losetup", "--find", "--show", "--read-only", path])
    if res.returncode:
        yield None  # the tests that need it say so
        return
    dev = res.stdout.strip()
    st = os.stat(dev)
    try:
        yield dev, path, (os.major(st.st_rdev), os.minor(st.st_rdev))
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, loop_disk):
    loops = {}
    if loop_disk is not None:
        loops[os.path.basename(loop_disk[0])] = loop_disk[2]
    with busybox_server(str(tmp_path_factory.mktemp("busybox")), loops=loops) as srv:
        yield srv


@pytest.fixture
def disk(server, pristine_disk):
    """A private copy of the server disk inside the chroot: (host path, server path)."""
    host, remote = server.disk("sda.raw")
    subprocess.run(["cp", "--sparse=always", pristine_disk[0], host], check=True)
    server.login_as(None)
    yield host, remote
    os.unlink(host)


def _clone(server, out, **kw):
    with server.network():
        return cloning.clone(connect_options(server.sshd), out, cloning.CloneOptions(**kw))


def _identical(a: str, b: str, fmt: str) -> bool:
    res = qemu_img("compare", "-f", "raw", "-F", fmt, a, b, check=False)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode == 0


def _cli(server, *args: str) -> subprocess.CompletedProcess:
    sshd = server.sshd
    ssh = ["-p", str(sshd.port), "-i", sshd.user_key, "--known-hosts", sshd.known_hosts]
    return run(
        [*server.cli_prefix(), sys.executable, "-m", "p2v", args[0], *ssh, "--no-agent", *args[1:]],
        cwd=ROOT,
    )


def test_dd_reads_whole_blocks_and_cuts_odd_tails():
    assert dd_geometry(0, UNIT) == (UNIT, 0, 1, 0)
    assert dd_geometry(5 * UNIT, UNIT) == (UNIT, 5, 1, 0)
    assert dd_geometry(4096, 8192) == (4096, 1, 2, 0)
    # a 3 MiB + 5 byte tail at 4 MiB: two 2 MiB blocks cut to the length, not 3 M dd bs=1
    assert dd_geometry(UNIT, 3 * MiB + 5) == (2 * MiB, 2, 2, 3 * MiB + 5)
    for offset, length in ((UNIT, 4097), (3 * UNIT, 1), (12288, 4096)):
        bs, skip, count, cut = dd_geometry(offset, length)
        assert skip * bs == offset and count * bs >= length > (count - 1) * bs
        assert cut in (0, length) and (cut == 0) == (count * bs == length)


@pytest.mark.parametrize("shell", [["busybox", "sh"], ["sh"]])
def test_reads_hashes_and_refusals_over_a_local_shell(shell, tmp_path):
    import hashlib

    from p2v import protocol
    from p2v.protocol import AgentRequestError
    from p2v.shell_agent import ProcessStream, start_shell_agent

    need_tool(shell[0])
    path = tmp_path / "dev.raw"
    data = os.urandom(UNIT) + bytes(UNIT) + b"words " * (MiB // 6) + b"tail!"
    path.write_bytes(data)
    conn = start_shell_agent(lambda: ProcessStream(shell), name="local")
    try:
        h = conn.call(protocol.OP_OPEN, {"path": str(path)})
        assert (h["size"], h["kind"]) == (len(data), "file")
        results = [
            conn.read(h["handle"], o, min(UNIT, len(data) - o), compress=True)
            for o in range(0, len(data), UNIT)
        ]
        for i, fut in enumerate(results):
            res = fut.result(timeout=60)
            want = data[i * UNIT : (i + 1) * UNIT]
            buf = bytearray(len(want))
            res.data_into(memoryview(buf))
            assert bytes(buf) == want and res.digest == hashlib.sha256(want).digest()
            assert res.is_zero == (i == 1) and (res.payload == b"") == (i == 1)
        digests = conn.hash(h["handle"], 0, len(data), MiB).result(timeout=60)
        assert digests == [
            hashlib.sha256(data[o : o + MiB]).digest() for o in range(0, len(data), MiB)
        ]
        with pytest.raises(AgentRequestError, match="outside the device"):
            conn.read(h["handle"], len(data) - 1, 2, compress=False).result(timeout=60)
        with pytest.raises(AgentRequestError, match="at most"):
            conn.read(h["handle"], 0, protocol.MAX_READ + 1, compress=False).result(timeout=60)
        with pytest.raises(AgentRequestError, match="neither a block device nor a file"):
            conn.call(protocol.OP_OPEN, {"path": str(tmp_path)})
        with pytest.raises(AgentRequestError, match="Python agent"):
            conn.call(protocol.OP_FREEZE, {"mountpoint": "/"})
        path.unlink()  # the disk vanished: a one-line refusal, the connection lives on
        with pytest.raises(AgentRequestError, match="cannot open"):
            conn.read(h["handle"], 0, 4096, compress=False).result(timeout=60)
        assert conn.failure is None
    finally:
        conn.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_clone_without_python_equals_the_disk_and_describes_the_machine(
    server, disk, tmp_path, fmt
):
    host, remote = disk
    res = _clone(server, str(tmp_path / "out"), out_format=fmt, disks=[remote])
    assert res.agent == "shell" and "no Python" in res.agent_reason
    (d,) = res.disks
    size = os.path.getsize(host)
    assert d.verified is True and d.verified_blocks >= size // UNIT
    assert d.bytes_read == size and d.bytes_zero > 0
    assert d.bytes_wire < size - d.bytes_zero + MiB  # zero blocks never crossed
    assert _identical(host, d.image, fmt)
    with open(res.machine) as f:
        machine = json.load(f)
    assert machine["cpus"] == os.cpu_count()
    assert machine["firmware"] == ("uefi" if os.path.isdir("/sys/firmware/efi") else "bios")
    assert machine["os"]["id"] == "busybox"  # the chroot's os-release, read by the shell
    with open("/proc/meminfo") as f:
        assert machine["memory"] >= int(f.readline().split()[1]) * 1024
    assert machine["memory_source"] in ("dmi", "memory-blocks")
    (md,) = machine["disks"]
    assert md["partition_table"] == "gpt" and len(md["partitions"]) == 2


def test_inventory_without_python_lists_cpus_memory_nics_and_disks(server, disk):
    from p2v import protocol
    from p2v.remote import start_agent
    from p2v.ssh import connect

    with server.network(), connect(connect_options(server.sshd)) as session:
        conn = start_agent(session)
        try:
            assert conn.mode == "shell"
            inv = conn.call(protocol.OP_INVENTORY)
        finally:
            conn.close()
    assert inv["cpu"]["count"] == os.cpu_count()
    # the namespace's NICs, as the chroot's /sys shows them: the veth pair, MACs and all
    assert {n["name"]: n["mac"] for n in inv["nics"]} == MACS
    assert all(not n["physical"] for n in inv["nics"])  # veths have no device behind them
    with open("/sys/devices/system/memory/block_size_bytes") as f:
        block = int(f.read(), 16)
    assert inv["memory_sources"]["block_size"] and inv["memory_sources"]["blocks"] > 0
    assert int(inv["memory_sources"]["block_size"], 16) == block
    assert inv["kernel"]["release"] == os.uname().release
    assert inv["kernel"]["machine"] == os.uname().machine
    from p2v.agent import list_disks

    assert inv["disks"] == list_disks()  # the Python agent's view of the same /sys


def test_clone_of_a_loop_device_without_python(server, loop_disk, tmp_path):
    if loop_disk is None:
        unavailable("no loop device here")
    dev, path, _ = loop_disk
    res = _clone(server, str(tmp_path / "out"), out_format="raw", disks=[dev])
    (d,) = res.disks
    assert d.verified is True and d.size == os.path.getsize(path)
    assert _identical(path, d.image, "raw")


def test_clone_without_python_resumes_after_connection_loss(server, disk, tmp_path, monkeypatch):
    host, remote = disk
    monkeypatch.setattr(cloning, "COMMIT_SECONDS", 0.0)  # journal every write
    out = str(tmp_path / "out")
    opts = cloning.CloneOptions(out_format="qcow2", disks=[remote], workers=3)
    cuts: list[int] = []
    with server.network(), pytest.raises(cloning.CloneInterrupted, match="run the same command"):
        cloning.clone(
            connect_options(server.sshd),
            out,
            opts,
            progress_factory=_cutting_progress(server.sshd, 0.4, cuts),
        )
    assert cuts
    assert {"sda.qcow2.partial", "sda.qcow2.journal"} <= set(os.listdir(out))
    with server.network():
        res = cloning.clone(connect_options(server.sshd), out, opts)
    (d,) = res.disks
    size = os.path.getsize(host)
    assert d.resumed_from >= size // 4
    assert d.bytes_read <= size - d.resumed_from < size
    assert d.verified is True
    assert _identical(host, d.image, "qcow2")


def test_sync_without_python_sends_only_changed_blocks(server, disk, tmp_path):
    host, remote = disk
    out = str(tmp_path / "out")
    res = _cli(server, "clone", "--output", "json", server.sshd.target, "--disk", remote,
               "-O", "raw", "--skip-unused", out)  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["agent"] == "shell"
    assert report["disks"][0]["bytes-read"] < os.path.getsize(host) // 2
    # the first sync also brings over what --skip-unused left out of 4 MiB blocks that are
    # partly in use (the disk has garbage in free space): a few blocks at most
    res = _cli(server, "sync", "--output", "json", server.sshd.target, out)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["disks"][0]["changed-blocks"] <= 2
    # 4 KiB written into files' blocks in three different 4 MiB blocks
    import formats
    from formats.disk import used_extents
    from formats.extents import Kind

    with formats.open(host, "raw") as src:
        used = [e for e in used_extents(src) if e.kind == Kind.DATA]
    # file data (large used runs), never metadata: a superblock overwritten would change
    # which blocks count as used, and so what the sync compares
    chosen: dict[int, int] = {}
    for e in (e for e in used if e.length >= MiB):
        pos = (e.start + e.length // 2) // 4096 * 4096
        if len(chosen) < 3 and pos // UNIT not in chosen:
            chosen[pos // UNIT] = pos
    assert len(chosen) == 3
    with open(host, "r+b") as f:
        for offset in chosen.values():
            f.seek(offset)
            f.write(os.urandom(4096))
    res = _cli(server, "sync", "--output", "json", server.sshd.target, out)
    assert res.returncode == 0, res.stderr
    (d,) = json.loads(res.stdout)["disks"]
    assert d["changed-blocks"] == 3 and d["blocks"] > 3
    assert d["bytes-sent"] == 3 * UNIT  # the changed blocks, nothing else
    image = os.path.join(out, "sda.raw")
    with formats.open(host, "raw") as src, formats.open(image, "raw") as img:
        for e in used:
            assert src.read(e.start, e.length) == img.read(e.start, e.length), e
    res = _cli(server, "sync", server.sshd.target, out)
    assert res.returncode == 0 and "agent: shell (no Python" in res.stdout
    assert " 0 of " in res.stdout  # nothing changed since


def _trimmed_shell(tmp_path, missing: tuple[str, ...]) -> list[str]:
    """dash with a PATH holding every tool the shell mode may use but `missing` (busybox's
    sh runs its own applets whatever PATH says, so it cannot play such a server)."""
    from p2v.shell_agent import HASH_TOOLS, TOOLS

    need_tool("dash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (*TOOLS, *HASH_TOOLS, "stat", "readlink", "uname", "wc", "blockdev"):
        found = shutil.which(tool)
        if found and tool not in missing:
            os.symlink(found, bin_dir / tool)
    return ["env", "-i", f"PATH={bin_dir}", shutil.which("dash")]


@pytest.mark.parametrize(
    "missing, words",
    [(("dd",), "no dd"), (("sha256sum", "md5sum"), "neither sha256sum nor md5sum")],
)
def test_a_server_without_a_needed_tool_is_refused_in_one_line(missing, words, tmp_path):
    from p2v.shell_agent import ProcessStream, ShellAgentError, start_shell_agent

    shell = _trimmed_shell(tmp_path, missing)
    with pytest.raises(ShellAgentError, match=words) as info:
        start_shell_agent(lambda: ProcessStream(shell), name="root@old-appliance")
    assert "no Python >= 2.6" in str(info.value) and "\n" not in str(info.value)


def test_a_server_with_only_md5sum_is_verified_with_it(tmp_path):
    """Reads are checked against the server's md5 and recorded with the sha256 the
    journal and verify use; HASH answers md5, which sync compares with digest_of."""
    import hashlib

    from p2v import protocol
    from p2v.shell_agent import ProcessStream, start_shell_agent

    shell = _trimmed_shell(tmp_path, ("sha256sum",))
    path = tmp_path / "dev.raw"
    data = os.urandom(UNIT) + bytes(UNIT)
    path.write_bytes(data)
    conn = start_shell_agent(lambda: ProcessStream(shell), name="local")
    try:
        assert conn.hash_tool == "md5sum"
        h = conn.call(protocol.OP_OPEN, {"path": str(path)})["handle"]
        res = conn.read(h, 0, UNIT, compress=False).result(timeout=60)
        assert res.digest == hashlib.sha256(data[:UNIT]).digest()
        digests = conn.hash(h, 0, len(data), UNIT).result(timeout=60)
        assert digests == [hashlib.md5(data[:UNIT]).digest(), hashlib.md5(bytes(UNIT)).digest()]
        assert conn.digest_of(data[:UNIT]) == digests[0]
    finally:
        conn.close()


def _one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_tools_no_root_no_sudo_and_bad_disks_are_one_line_errors(server, disk, tmp_path):
    _, remote = disk
    base = [server.sshd.target, "-O", "raw"]
    res = _cli(server, "clone", *base, "--disk", "/disks/absent.raw", str(tmp_path / "a"))
    _one_line_error(res, "/disks/absent.raw", "No such file")
    server.login_as(65534)  # nobody: the disk (0644, root's) opens, /dev/zero too...
    os.chmod(disk[0], 0o600)  # ...until only root may read it
    try:
        res = _cli(server, "clone", *base, "--disk", remote, str(tmp_path / "n"))
        _one_line_error(res, "uid 65534", "--sudo")
        res = _cli(server, "clone", "--sudo", *base, "--disk", remote, str(tmp_path / "s"))
        _one_line_error(res, "no sudo")
    finally:
        server.login_as(None)
        os.chmod(disk[0], 0o644)


def test_a_block_that_changes_between_its_two_reads_is_read_again(tmp_path):
    """The server hashes a second read of each block: when the two disagree (a hot
    server writing it), the controller's check fails and the block is read again."""
    import hashlib

    from p2v import protocol
    from p2v.shell_agent import READ_TRIES, ProcessStream, start_shell_agent

    path = tmp_path / "dev.raw"
    data = os.urandom(UNIT)
    path.write_bytes(data)
    conn = start_shell_agent(lambda: ProcessStream(["sh"]), name="local")
    try:
        h = conn.call(protocol.OP_OPEN, {"path": str(path)})["handle"]
        real, calls = conn._hash, []

        def changed_once(payload=b""):
            calls.append(len(payload))
            # the first check sees other bytes than the server hashed
            return real(payload if len(calls) > 1 else payload + b"!")

        conn._hash = changed_once
        res = conn.read(h, 0, UNIT, compress=False).result(timeout=60)
        assert conn.retried_reads == 1 and conn.unverified_reads == 0
        assert res.digest == hashlib.sha256(data).digest()
        # a block that never reads the same twice is taken after READ_TRIES, with a warning
        conn._hash = lambda payload=b"": real(payload + b"!")
        res = conn.read(h, 0, UNIT, compress=False).result(timeout=60)
        assert conn.retried_reads == READ_TRIES and conn.unverified_reads == 1
        assert res.digest == hashlib.sha256(data).digest()
    finally:
        conn.close()
