"""Starting a QEMU whose RAM p2v can migrate: a `memory-backend-file` with ``share=on``.

The pre-copy engine reads the guest's RAM through its own mmap of that file, so QEMU must
map it shared (its writes land in the file's pages) and use it as the machine's only RAM
(``-machine memory-backend=ram0``). The destination QEMU runs the same command line on a
RAM file the receiver fills, plus ``-incoming defer``: QEMU then waits for
`migrate-incoming`, which brings the device state only (capability ``x-ignore-shared``
keeps QEMU's own migration off the shared RAM).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import GuestError
from .qmp import QMPClient, QMPError

QEMU_BINARY = "qemu-system-x86_64"


@dataclass
class QemuSpec:
    """What a QEMU for a migratable guest needs; `command()` turns it into argv.

    Source and destination must agree on everything but `incoming`, the paths and the
    log files (QEMU refuses device state from a differently shaped machine).
    """

    ram_path: str
    ram_size: int
    qmp_socket: str
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    serial_log: str | None = None
    accel: str = "tcg"
    machine: str = "pc"
    cpus: int = 1
    #: start with ``-incoming defer -S`` (a migration destination)
    incoming: bool = False
    extra_args: list[str] = field(default_factory=list)
    binary: str = QEMU_BINARY

    def command(self) -> list[str]:
        if self.ram_size <= 0 or self.ram_size % (1 << 20):
            raise GuestError(f"QEMU RAM size {self.ram_size} is not a positive whole MiB")
        mib = self.ram_size >> 20
        cmd = [
            self.binary,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            f"{self.machine},accel={self.accel},memory-backend=ram0",
            "-object",
            f"memory-backend-file,id=ram0,size={mib}M,mem-path={self.ram_path},share=on",
            "-m",
            f"{mib}M",
            "-smp",
            str(self.cpus),
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
        ]
        if self.kernel:
            cmd += ["-kernel", self.kernel]
        if self.initrd:
            cmd += ["-initrd", self.initrd]
        if self.append:
            cmd += ["-append", self.append]
        if self.serial_log:
            cmd += [
                "-chardev",
                f"file,id=serial0,path={self.serial_log}",
                "-serial",
                "chardev:serial0",
            ]
        if self.incoming:
            # -S: once the device state is in, QEMU would start the guest by itself;
            # it must wait for `cont`, sent only after the source committed
            cmd += ["-incoming", "defer", "-S"]
        return cmd + list(self.extra_args)


class QemuProcess:
    """A running QEMU started from a `QemuSpec`, with its QMP connection.

    Its stderr goes to `stderr_path` (or a file beside the QMP socket) so that a QEMU that
    dies at start-up can say why in the error.
    """

    def __init__(
        self, spec: QemuSpec, *, stderr_path: str | None = None, start_timeout: float = 10.0
    ) -> None:
        if shutil.which(spec.binary) is None:
            raise GuestError(f"{spec.binary} is not installed")
        self.spec = spec
        self.stderr_path = stderr_path or spec.qmp_socket + ".stderr"
        for stale in (spec.qmp_socket,):
            if os.path.exists(stale):
                os.unlink(stale)
        with open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                spec.command(), stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        self.pid = self.process.pid
        self._qmp: QMPClient | None = None
        try:
            self._qmp = self._connect(start_timeout)
        except BaseException:
            self.kill()
            raise

    def _connect(self, timeout: float) -> QMPClient:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise GuestError(f"at start-up: {self.exit_description()}")
            if os.path.exists(self.spec.qmp_socket):
                try:
                    return QMPClient(self.spec.qmp_socket)
                except QMPError:
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU opened no QMP socket within {timeout:.0f} s")
            time.sleep(0.02)

    @property
    def qmp(self) -> QMPClient:
        if self._qmp is None:
            raise GuestError("QEMU is not running")
        return self._qmp

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def exit_description(self) -> str:
        """How QEMU ended, with the end of its stderr: for one-line errors."""
        code = self.process.poll()
        if code is None:
            return "QEMU is running"
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        tail = self.stderr_tail()
        return f"QEMU exited ({how})" + (f": {tail}" if tail else "")

    def stderr_tail(self, limit: int = 400) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                text = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return text[-limit:].replace("\n", " | ")

    def quit(self, timeout: float = 5.0) -> None:
        """Ask QEMU to exit (QMP ``quit``), killing it when it does not."""
        if self.is_alive() and self._qmp is not None:
            try:
                self._qmp.execute("quit", timeout=timeout)
            except QMPError:
                pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_qmp()

    def kill(self) -> None:
        if self.is_alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._close_qmp()

    def _close_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if os.path.exists(self.spec.qmp_socket):
            try:
                os.unlink(self.spec.qmp_socket)
            except OSError:
                pass


def wait_for_line(
    path: str,
    predicate: Callable[[str], bool],
    *,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    start: int = 0,
) -> str | None:
    """Follow a (serial log) file from byte `start` and return the first complete line
    for which `predicate` holds; None when `timeout` passes or `alive()` turns False."""
    deadline = time.monotonic() + timeout
    offset = start
    pending = b""
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            if predicate(line):
                return line
        if time.monotonic() > deadline or (alive is not None and not alive()):
            return None
        time.sleep(0.05)


def probe_accel(
    spec: QemuSpec, first_line: str | re.Pattern[str], *, timeout: float = 15.0
) -> bool:
    """Boot `spec` once and tell whether its serial console reaches `first_line` in time.

    Used to decide on KVM: on nested set-ups /dev/kvm can exist while a guest kernel hangs
    early under it, so its presence alone proves nothing.
    """
    pattern = re.compile(first_line) if isinstance(first_line, str) else first_line
    if spec.serial_log is None:
        raise GuestError("a probe boot needs a serial log")
    if os.path.exists(spec.serial_log):
        os.unlink(spec.serial_log)
    try:
        qemu = QemuProcess(spec)
    except GuestError:
        return False
    try:
        return (
            wait_for_line(
                spec.serial_log,
                lambda line: bool(pattern.search(line)),
                timeout=timeout,
                alive=qemu.is_alive,
            )
            is not None
        )
    finally:
        qemu.kill()


def free_unix_path(directory: str, name: str) -> str:
    """A unix socket path in `directory`, short enough for sun_path (108 bytes)."""
    path = os.path.join(directory, name)
    if len(path.encode()) >= 100:
        raise GuestError(f"socket path too long for a unix socket: {path}")
    return path


def connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
