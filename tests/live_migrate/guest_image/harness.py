"""Running the test guest for the QEMU migration tests and the benchmark.

- `build_or_skip()`: builds (or finds in the cache) the guest; the test skips, or fails
  under CI, when a tool is missing.
- `Workdir`: short paths for QMP sockets (sun_path holds 108 bytes; pytest's tmp_path can
  be longer) and RAM files on /dev/shm (tmpfs: a shared file backend on disk would write
  the guest's memory back to the disk).
- `SerialLog`: the dirtier's lines, parsed; `check_continuation` compares the source's
  and the destination's after a migration.
- `Hosts`: source and destination in their own network namespaces joined by a veth pair
  when the machine allows it, else both on loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass

from live_migrate.qemu_launcher import QemuSpec, wait_for_line
from tests.external import need_tool, unavailable
from tests.netns import in_netns

from .build_guest import GuestBuildError, GuestImage, build

TICK = re.compile(r"^tick (\d+) sum ([0-9a-f]{16}) bad (\d+) passes (\d+)(?: work (\d+))?$")


def build_or_skip() -> GuestImage:
    """The test guest, or a skip (a failure under CI) saying what is missing."""
    need_tool("qemu-system-x86_64", "gcc", "cpio", "dpkg", "apt-get")
    try:
        return build()
    except GuestBuildError as exc:
        unavailable(f"cannot build the test guest: {exc}")


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/tmp"


class Workdir:
    """A short private directory for sockets and logs, and RAM files on tmpfs."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="p2vq-", dir="/tmp")
        self.tag = uuid.uuid4().hex[:8]
        self._ram_files: list[str] = []

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def ram(self, name: str) -> str:
        path = os.path.join(shm_dir(), f"p2v-test-{self.tag}-{name}.ram")
        self._ram_files.append(path)
        return path

    def cleanup(self) -> None:
        for path in self._ram_files:
            if os.path.exists(path):
                os.unlink(path)
        shutil.rmtree(self.path, ignore_errors=True)


def guest_spec(
    image: GuestImage,
    work: Workdir,
    name: str,
    *,
    ram_mib: int = 128,
    mem_mib: int = 32,
    rate_mb: int = 10,
    spin: bool = False,
) -> QemuSpec:
    append = image.append(mem_mib, rate_mb)
    if spin:
        append += " p2v_spin=1"
    return QemuSpec(
        ram_path=work.ram(name),
        ram_size=ram_mib << 20,
        qmp_socket=work.file(f"{name}.qmp"),
        kernel=image.kernel,
        initrd=image.initrd,
        append=append,
        serial_log=work.file(f"{name}.log"),
        accel=image.accel,
    )


def destination_spec(source: QemuSpec, work: Workdir, name: str = "dst") -> QemuSpec:
    """The destination's spec: the source's machine on its own files."""
    return dataclasses.replace(
        source,
        ram_path=work.ram(name),
        qmp_socket=work.file(f"{name}.qmp"),
        serial_log=work.file(f"{name}.log"),
    )


@dataclass(frozen=True)
class Tick:
    tick: int
    sum: str
    bad: int
    passes: int
    work: int


class SerialLog:
    """The dirtier's output on one QEMU's serial console."""

    def __init__(self, path: str) -> None:
        self.path = path

    def text(self) -> str:
        try:
            with open(self.path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def ticks(self) -> list[Tick]:
        """Every complete tick line (a line cut by the migration is dropped)."""
        out = []
        for line in self.text().splitlines():
            m = TICK.match(line.strip("\r"))
            if m:
                out.append(Tick(int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5] or 0)))
        return out

    def last_tick(self) -> int:
        ticks = self.ticks()
        return ticks[-1].tick if ticks else 0

    def bad_lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if "BAD" in line]

    def wait_tick(self, at_least: int, timeout: float = 60.0, alive=None) -> int:
        """Wait until a tick >= `at_least` is printed; return the latest tick."""
        line = wait_for_line(
            self.path,
            lambda s: bool((m := TICK.match(s)) and int(m[1]) >= at_least),
            timeout=timeout,
            alive=alive,
        )
        if line is None:
            raise AssertionError(
                f"{self.path}: no tick {at_least} within {timeout:.0f} s; "
                f"last lines: {self.text()[-300:]!r}"
            )
        return self.last_tick()

    def keeps_counting(self, ticks: int = 3, timeout: float = 30.0) -> bool:
        """Whether the guest prints `ticks` more ticks from now."""
        start = self.last_tick()
        try:
            self.wait_tick(start + ticks, timeout)
        except AssertionError:
            return False
        return True


def check_continuation(src_log: SerialLog, dst_log: SerialLog, more: int = 15) -> None:
    """The destination's counter starts right after the source's and runs on without a
    gap; the guest's own memory checks stay clean on both sides."""
    last_src = src_log.last_tick()
    dst_log.wait_tick(last_src + more, timeout=60)
    dst_ticks = dst_log.ticks()
    first = dst_ticks[0].tick
    cut = not src_log.text().endswith("\n")
    assert first == last_src + 1 or (cut and first == last_src + 2), (last_src, first)
    assert [t.tick for t in dst_ticks] == list(range(first, first + len(dst_ticks)))
    assert all(t.bad == 0 for t in dst_ticks), dst_log.bad_lines()
    assert not dst_log.bad_lines() and not src_log.bad_lines()


def start_qemu_by_hand(spec: QemuSpec, timeout: float = 30.0) -> subprocess.Popen:
    """QEMU started as a user would (no QMP session held: p2v will open it)."""
    if not os.path.exists(spec.ram_path):
        with open(spec.ram_path, "wb") as f:
            f.truncate(spec.ram_size)
    proc = subprocess.Popen(spec.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not wait_for(lambda: os.path.exists(spec.qmp_socket) or proc.poll() is not None, timeout):
        proc.kill()
        raise AssertionError("QEMU opened no QMP socket")
    if proc.poll() is not None:
        raise AssertionError(f"QEMU failed: {proc.stderr.read().decode()[-400:]}")
    return proc


# --- two hosts ------------------------------------------------------------------------


class Hosts:
    """Where the destination listens and how to run a command there.

    With network namespaces, the destination lives in namespace `dst` at 10.213.<n>.2 and
    the source in `src` at 10.213.<n>.1, joined by a veth pair; commands for either side
    are prefixed with `ip netns exec`. Without, both are plain processes on 127.0.0.1.
    """

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.src_prefix: list[str] = []
        self.dst_prefix: list[str] = []
        self.src_address = self.dst_address = "127.0.0.1"
        if os.environ.get("P2V_TEST_NETNS", "1") != "0":
            self._try_namespaces()

    @property
    def isolated(self) -> bool:
        return bool(self.namespaces)

    @staticmethod
    def _remove_stale() -> None:
        """Namespaces left by a run that was killed (their owner pid is gone)."""
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for line in res.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            m = re.fullmatch(r"p2v-(?:src|dst)-(\d+)", name)
            if m and not os.path.exists(f"/proc/{m[1]}"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def _try_namespaces(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return
        self._remove_stale()
        n = os.getpid() % 250 + 1
        src, dst = f"p2v-src-{os.getpid()}", f"p2v-dst-{os.getpid()}"
        veth = f"p2v{os.getpid() % 100000}"
        steps = [
            ["ip", "netns", "add", src],
            ["ip", "netns", "add", dst],
            [
                "ip",
                "link",
                "add",
                f"{veth}a",
                "netns",
                src,
                "type",
                "veth",
                "peer",
                "name",
                f"{veth}b",
                "netns",
                dst,
            ],
            ["ip", "-n", src, "addr", "add", f"10.213.{n}.1/24", "dev", f"{veth}a"],
            ["ip", "-n", dst, "addr", "add", f"10.213.{n}.2/24", "dev", f"{veth}b"],
            ["ip", "-n", src, "link", "set", f"{veth}a", "up"],
            ["ip", "-n", dst, "link", "set", f"{veth}b", "up"],
            ["ip", "-n", src, "link", "set", "lo", "up"],
            ["ip", "-n", dst, "link", "set", "lo", "up"],
        ]
        for step in steps:
            res = subprocess.run(step, capture_output=True)
            if step[:3] == ["ip", "netns", "add"] and res.returncode == 0:
                self.namespaces.append(step[3])
            if res.returncode != 0:
                self.close()
                return
        self.src_prefix = ["ip", "netns", "exec", src]
        self.dst_prefix = ["ip", "netns", "exec", dst]
        self.src_address, self.dst_address = f"10.213.{n}.1", f"10.213.{n}.2"

    @contextlib.contextmanager
    def on_source(self):
        """Run the body with this thread in the source's namespace: sockets it creates
        (the migration's channels) stay there when the thread comes back."""
        if not self.isolated:
            yield
            return
        with in_netns(self.namespaces[0]):
            yield

    def close(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces = []
        self.src_prefix = self.dst_prefix = []
        self.src_address = self.dst_address = "127.0.0.1"


def wait_for(predicate, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
