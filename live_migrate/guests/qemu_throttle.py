"""Slowing a running QEMU guest for auto-converge, and putting it back to full speed.

QEMU's own cpu-throttle sleeps each vCPU thread for part of every 10 ms slice. From the
outside the same effect comes from the kernel's CPU bandwidth control on the vCPU threads:
a cgroup whose quota is ``(1 - fraction) x period x vCPUs`` (``cpu.max`` on cgroup v2,
``cpu.cfs_quota_us`` on cgroup v1, which can hold single threads, so only the vCPUs slow
down and QMP keeps answering at full speed). Where no writable cgroup exists, a QMP
``stop``/``cont`` duty cycle does the job more coarsely.

Every throttle records what it changed and `release()` undoes it: threads go back to the
cgroup they came from, the duty cycle ends with the guest running.
"""

from __future__ import annotations

import os
import threading
import time

from ..errors import GuestError
from ..qmp import QMPClient, QMPError

#: CFS period: 100 ms, the kernel's default, fine-grained enough against a 10 ms tick
CFS_PERIOD_US = 100_000
#: the duty cycle's period; QMP stop/cont cost about a millisecond each
DUTY_PERIOD = 0.05
MAX_FRACTION = 0.99


class Throttle:
    """Interface: `set(fraction)` slows the guest to ``1 - fraction``; `release()`."""

    kind = "none"

    def set(self, fraction: float) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


def vcpu_threads(qmp: QMPClient) -> list[int]:
    """Host thread ids of the guest's vCPUs."""
    return [int(cpu["thread-id"]) for cpu in qmp.execute("query-cpus-fast")]


def _cgroup_mounts() -> tuple[str | None, str | None]:
    """(cgroup v1 cpu controller mount, cgroup v2 mount) from /proc/self/mountinfo."""
    v1 = v2 = None
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_point, fstype, super_opts = fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup" and "cpu" in super_opts and v1 is None:
            v1 = mount_point
        elif fstype == "cgroup2" and v2 is None:
            v2 = mount_point
    return v1, v2


def _own_cgroup(tid: int, v1: bool) -> str | None:
    """The cgroup path (relative to its hierarchy) that holds thread `tid`."""
    try:
        with open(f"/proc/{tid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (v1 and "cpu" in controllers.split(",")) or (not v1 and controllers == ""):
            return path
    return None


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class CgroupThrottle(Throttle):
    """CPU bandwidth control of the vCPU threads (v1) or of the QEMU process (v2)."""

    def __init__(self, qmp: QMPClient, name: str) -> None:
        v1_root, v2_root = _cgroup_mounts()
        self.tids = vcpu_threads(qmp)
        if not self.tids:
            raise GuestError("QEMU reports no vCPU threads")
        self.fraction = 0.0
        self._moved: dict[int, str] = {}
        self._v1 = False
        self._dir = ""
        if v1_root is not None and os.access(v1_root, os.W_OK):
            self._v1, self._root = True, v1_root
            self.kind = "cgroup-v1"
        elif v2_root is not None and self._v2_has_cpu(v2_root):
            self._root = v2_root
            self.kind = "cgroup-v2"
            # v2 moves whole processes: the one that owns the vCPU threads
            self.tids = [_thread_group(self.tids[0])]
        else:
            raise GuestError("no writable cgroup with the cpu controller")
        self._dir = os.path.join(self._root, f"p2v-throttle-{name}")
        try:
            os.makedirs(self._dir, exist_ok=True)
            if self._v1:
                _write(os.path.join(self._dir, "cpu.cfs_period_us"), str(CFS_PERIOD_US))
        except OSError as exc:
            raise GuestError(f"cannot create cgroup {self._dir}: {exc}") from exc

    @staticmethod
    def _v2_has_cpu(root: str) -> bool:
        try:
            with open(os.path.join(root, "cgroup.controllers")) as f:
                if "cpu" not in f.read().split():
                    return False
            with open(os.path.join(root, "cgroup.subtree_control")) as f:
                if "cpu" in f.read().split():
                    return True
            _write(os.path.join(root, "cgroup.subtree_control"), "+cpu")
            return True
        except OSError:
            return False

    def set(self, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), MAX_FRACTION)
        if fraction == 0.0:
            self.release()
            return
        quota = max(1000, int(CFS_PERIOD_US * (1.0 - fraction) * len(self.tids)))
        try:
            if self._v1:
                _write(os.path.join(self._dir, "cpu.cfs_quota_us"), str(quota))
            else:
                _write(os.path.join(self._dir, "cpu.max"), f"{quota} {CFS_PERIOD_US}")
            for tid in self.tids:
                if tid not in self._moved:
                    origin = _own_cgroup(tid, self._v1)
                    if origin is None:
                        continue
                    _write(
                        os.path.join(self._dir, "tasks" if self._v1 else "cgroup.procs"), str(tid)
                    )
                    self._moved[tid] = origin
        except OSError as exc:
            raise GuestError(f"cannot throttle through {self._dir}: {exc}") from exc
        self.fraction = fraction

    def release(self) -> None:
        for tid, origin in list(self._moved.items()):
            target = os.path.join(self._root, origin.lstrip("/"))
            try:
                _write(os.path.join(target, "tasks" if self._v1 else "cgroup.procs"), str(tid))
            except OSError:
                pass  # the thread ended (QEMU quit): nothing left to put back
            del self._moved[tid]
        self.fraction = 0.0
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


def _thread_group(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


class DutyCycleThrottle(Throttle):
    """QMP ``stop`` for `fraction` of every period, ``cont`` for the rest, in a thread."""

    kind = "duty-cycle"

    def __init__(self, qmp: QMPClient) -> None:
        self.qmp = qmp
        self.fraction = 0.0
        self._thread: threading.Thread | None = None
        self._quit = threading.Event()
        self.error: Exception | None = None

    def set(self, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), MAX_FRACTION)
        if fraction == 0.0:
            self.release()
            return
        self.fraction = fraction
        if self._thread is None:
            self._quit.clear()
            self._thread = threading.Thread(target=self._run, name="qemu-throttle", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._quit.is_set():
                stopped = DUTY_PERIOD * self.fraction
                self.qmp.execute("stop")
                try:
                    # never leave the guest stopped: a quit request ends the pause early
                    self._quit.wait(stopped)
                finally:
                    self.qmp.execute("cont")
                self._quit.wait(DUTY_PERIOD - stopped)
        except QMPError as exc:
            self.error = exc

    def release(self) -> None:
        """End the cycle; on return the guest runs (unless QEMU went away)."""
        self._quit.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.fraction = 0.0


def make_throttle(qmp: QMPClient, name: str, method: str = "auto") -> Throttle:
    """A cgroup throttle when `method` allows and one can be made, else the duty cycle."""
    if method not in ("auto", "cgroup", "duty-cycle"):
        raise GuestError(f"unknown throttle method {method!r} (auto, cgroup, duty-cycle)")
    if method != "duty-cycle":
        try:
            return CgroupThrottle(qmp, name)
        except GuestError:
            if method == "cgroup":
                raise
    return DutyCycleThrottle(qmp)


def measure_cpu(tid: int, seconds: float) -> float:
    """Share of one CPU thread `tid` used over `seconds` (from /proc schedstat)."""

    def used() -> int:
        with open(f"/proc/{tid}/schedstat") as f:
            return int(f.read().split()[0])

    start, t0 = used(), time.monotonic()
    time.sleep(seconds)
    return (used() - start) / 1e9 / (time.monotonic() - t0)
