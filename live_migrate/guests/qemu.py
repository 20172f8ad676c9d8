"""A real QEMU guest, driven over QMP, as a migration source or target (issue 7).

The guest's RAM must be a ``memory-backend-file`` with ``share=on`` that is the machine's
memory backend (``-machine memory-backend=ID``): QEMU then writes guest memory straight
into that file's pages and p2v reads it through its own mmap (source) or fills it before
QEMU loads anything (destination). p2v moves all of RAM with its own engine (scanning
for dirty pages: QEMU offers no dirty log to outsiders); QEMU's migration carries only the
rest (CPU and device state, small ROM blocks) with capability ``x-ignore-shared``, which
makes it skip shared RAM blocks on both sides.

Source: `QemuSource` — `pause()` is QMP ``stop``, `save_device_state()` runs
``migrate`` to an fd handed over with ``getfd`` and returns the bytes QEMU wrote,
`resume()` is ``cont`` (after cancelling a half-done hand-off), `finish()` leaves QEMU
stopped in ``postmigrate`` as QEMU's own migration does.
Destination: `QemuTarget` — a QEMU started with ``-incoming defer -S`` on the RAM file;
`load_device_state()` is ``migrate-incoming`` from an fd fed with those bytes,
`resume()` is ``cont``, `discard()` quits that QEMU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import GuestError
from ..guest import PAGE_SIZE, DirtyTracking, Geometry, StateFormat, TargetFactory
from ..qemu_launcher import QemuProcess, QemuSpec
from ..qmp import QMPClient, QMPError, QMPTimeout
from .qemu_throttle import Throttle, make_throttle

#: the device state of a machine whose RAM is shared: CPU, devices, ROM and firmware
#: blocks (a few hundred KiB, tens of MiB with video RAM); anything past this is refused
MAX_DEVICE_STATE = 256 << 20
#: the hand-off runs while the guest is paused, so QEMU must not rate-limit it
HANDOFF_BANDWIDTH = 100 << 30
FDNAME = "p2v-device-state"

RAM_HELP = (
    "start QEMU with -object memory-backend-file,id=ram0,size=SIZE,mem-path=FILE,share=on "
    "-machine memory-backend=ram0 -m SIZE"
)


def _ram_backend(qmp: QMPClient, ram_path: str) -> int:
    """Check that `ram_path` is the shared file holding all of the guest's RAM; its size.

    Each check names what is missing, since a guest set up otherwise cannot be migrated
    this way (its RAM would be invisible to p2v or only partly in the file)."""
    try:
        backend = qmp.execute("qom-get", {"path": "/machine", "property": "memory-backend"})
    except QMPError as exc:
        raise GuestError(f"QEMU's machine has no memory backend: {RAM_HELP}") from exc
    if not backend:
        raise GuestError(f"QEMU's machine has no memory backend: {RAM_HELP}")
    backend_id = str(backend).rsplit("/", 1)[-1]
    devs = {d.get("id"): d for d in qmp.execute("query-memdev")}
    dev = devs.get(backend_id)
    if dev is None:
        raise GuestError(f"QEMU's memory backend {backend_id!r} is not listed by query-memdev")
    if not dev.get("share"):
        raise GuestError(f"QEMU's memory backend {backend_id!r} lacks share=on: {RAM_HELP}")
    try:
        mem_path = qmp.execute(
            "qom-get", {"path": f"/objects/{backend_id}", "property": "mem-path"}
        )
    except QMPError as exc:
        raise GuestError(
            f"QEMU's memory backend {backend_id!r} is not a memory-backend-file: {RAM_HELP}"
        ) from exc
    try:
        same = os.path.samefile(mem_path, ram_path)
    except OSError as exc:
        raise GuestError(
            f"cannot compare QEMU's RAM file {mem_path} with {ram_path}: {exc}"
        ) from exc
    if not same:
        raise GuestError(f"QEMU's RAM is in {mem_path}, not in {ram_path}")
    size = int(dev["size"])
    summary = qmp.execute("query-memory-size-summary")
    if int(summary.get("plugged-memory", 0)):
        raise GuestError("QEMU has hot-plugged memory outside the RAM file: not supported")
    if int(summary["base-memory"]) != size:
        raise GuestError(
            f"QEMU's RAM is {summary['base-memory']} bytes but its file backend holds {size}"
        )
    if size % PAGE_SIZE:
        raise GuestError(f"QEMU's RAM size {size} is not a whole number of pages")
    if os.path.getsize(ram_path) < size:
        raise GuestError(f"{ram_path} is shorter than QEMU's RAM ({size} bytes)")
    return size


def _map(path: str, size: int, *, writable: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
    finally:
        os.close(fd)


def _capability(qmp: QMPClient, name: str) -> bool:
    for cap in qmp.execute("query-migrate-capabilities"):
        if cap["capability"] == name:
            return bool(cap["state"])
    raise GuestError(f"this QEMU has no migration capability {name} (QEMU >= 4.0 needed)")


def _set_capability(qmp: QMPClient, name: str, state: bool) -> None:
    qmp.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": name, "state": state}]}
    )


def _migration_status(qmp: QMPClient) -> dict[str, Any]:
    return qmp.execute("query-migrate")


ACTIVE = ("setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling")


def _wait_migration(qmp: QMPClient, deadline: float, alive=None) -> dict[str, Any]:
    """Poll until QEMU's migration leaves its active states (QEMU 7.2 emits MIGRATION
    events only with the ``events`` capability, which a user's QEMU may not have)."""
    delay = 0.0005
    while True:
        info = _migration_status(qmp)
        if info.get("status") not in ACTIVE:
            return info
        if time.monotonic() > deadline:
            raise GuestError(f"QEMU's device-state migration still {info.get('status')}")
        if alive is not None and not alive():
            raise GuestError("QEMU exited during the device-state migration")
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


class _DeviceStateCapture:
    """QEMU's own migration (with ``x-ignore-shared``) into a socketpair, in a thread.

    Started as soon as the guest is paused, so that the QMP set-up and QEMU's
    serialisation of its devices run while the engine scans RAM for the last time: they
    overlap instead of adding up in the downtime. `result()` waits for the bytes;
    `abandon()` drops them (a failure)."""

    def __init__(self, qmp: QMPClient, timeout: float, prepare: Callable[[], None]) -> None:
        self.qmp = qmp
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.data = b""
        self.info: dict[str, Any] = {}
        self.error: BaseException | None = None
        self._prepare = prepare
        self._ours, self._theirs = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="qemu-device-state", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            try:
                self._prepare()
                self.qmp.execute("getfd", {"fdname": FDNAME}, fds=[self._theirs.fileno()])
                self.qmp.execute("migrate", {"uri": f"fd:{FDNAME}"})
            finally:
                self._theirs.close()
            self.data = _read_all(self._ours, self.deadline, MAX_DEVICE_STATE)
            # QEMU's verdict is asked here too, so that it is in before the engine has
            # sent the last pages: result() then costs no QMP round trip
            self.info = _wait_migration(self.qmp, self.deadline)
        except (GuestError, OSError) as exc:  # QMPError is a GuestError
            self.error = exc

    def result(self) -> bytes:
        self._thread.join(max(0.0, self.deadline - time.monotonic()))
        try:
            if self._thread.is_alive():
                raise GuestError("QEMU's device-state migration did not finish in time")
            if self.error is not None:
                raise GuestError(f"QEMU's device-state migration failed: {self.error}")
        finally:
            self._ours.close()
        if self.info.get("status") != "completed":
            reason = self.info.get("error-desc", self.info.get("status"))
            raise GuestError(f"QEMU's device-state migration failed: {reason}")
        return self.data

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_RDWR)  # wakes the reader
        self._thread.join(10)
        self._ours.close()


class QemuSource:
    """A running QEMU as the migration's source (`live_migrate.guest.SourceGuest`).

    Attach to a QEMU the user started (`qmp_socket`, `ram_path`), or let `launch()`
    start one. `throttle` picks the auto-converge method: "auto" (cgroup where
    writable, else a stop/cont duty cycle), "cgroup" or "duty-cycle".
    """

    state_format = StateFormat.QEMU

    def __init__(
        self,
        qmp_socket: str,
        ram_path: str,
        *,
        throttle: str = "auto",
        handoff_timeout: float = 30.0,
        process: QemuProcess | None = None,
    ) -> None:
        self.process = process
        self.qmp = process.qmp if process is not None else QMPClient(qmp_socket)
        self.ram_path = ram_path
        self.handoff_timeout = handoff_timeout
        try:
            size = _ram_backend(self.qmp, ram_path)
            self._geometry = Geometry(PAGE_SIZE, size // PAGE_SIZE)
            status = self.qmp.execute("query-status")["status"]
            if status not in ("running", "paused"):
                raise GuestError(f"QEMU is {status}: only a running or paused guest migrates")
            self._paused = status == "paused"
            self._was_paused = self._paused
            _capability(self.qmp, "x-ignore-shared")
            self._map = _map(ram_path, size, writable=False)
        except BaseException:
            if process is None:
                self.qmp.close()
            raise
        self._throttle_method = throttle
        self._throttle: Throttle | None = None
        self._restore: dict[str, Any] | None = None
        self._capture: _DeviceStateCapture | None = None
        self._lock = threading.Lock()
        #: pause -> device state in hand (overlapped with the engine's final scan)
        self.handoff_seconds = 0.0

    @classmethod
    def launch(cls, spec: QemuSpec, **kw: Any) -> QemuSource:
        """Start QEMU from `spec` (its RAM file is created when missing) and attach."""
        if not os.path.exists(spec.ram_path):
            with open(spec.ram_path, "wb") as f:
                f.truncate(spec.ram_size)
        process = QemuProcess(spec)
        try:
            return cls(spec.qmp_socket, spec.ram_path, process=process, **kw)
        except BaseException:
            process.kill()
            raise

    # --- SourceGuest ---------------------------------------------------------------

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    @property
    def dirty_tracking(self) -> DirtyTracking:
        return DirtyTracking.SCAN

    @property
    def is_paused(self) -> bool:
        return self._paused

    def memory(self) -> memoryview:
        return memoryview(self._map)

    def start_dirty_log(self) -> None:
        raise GuestError("a QEMU guest has no dirty log for p2v: pages are found by scanning")

    def collect_dirty_log(self) -> np.ndarray:
        raise GuestError("a QEMU guest has no dirty log for p2v: pages are found by scanning")

    def stop_dirty_log(self) -> None:
        pass

    def pause(self) -> None:
        """QMP ``stop``; then QEMU starts writing its device state at once (see
        `_DeviceStateCapture`): only the engine's scan and sending remain."""
        with self._lock:
            self._release_throttle()
            self.qmp.execute("stop")
            self._paused = True
            self._capture = _DeviceStateCapture(
                self.qmp, self.handoff_timeout, self._prepare_migration_settings
            )

    def resume(self) -> None:
        """Run the guest here again, whatever stage the hand-off reached."""
        with self._lock:
            self._release_throttle()
            self._abandon_capture()
            try:
                if _migration_status(self.qmp).get("status") in ACTIVE:
                    self.qmp.execute("migrate_cancel")
                    _wait_migration(self.qmp, time.monotonic() + 10)
            finally:
                self._restore_migration_settings()
                # QEMU leaves a migrated guest in "postmigrate"; cont runs it from there
                if not self._was_paused:
                    self.qmp.execute("cont")
                    self._paused = False

    @property
    def can_throttle(self) -> bool:
        return True

    def set_throttle(self, fraction: float) -> None:
        with self._lock:
            if self._paused:
                return
            if fraction <= 0:
                self._release_throttle()
                return
            if self._throttle is None:
                self._throttle = make_throttle(
                    self.qmp, f"{os.getpid()}-{id(self):x}", self._throttle_method
                )
            self._throttle.set(fraction)

    @property
    def throttle_kind(self) -> str:
        return self._throttle.kind if self._throttle is not None else "none"

    def save_device_state(self) -> bytes:
        """The bytes of QEMU's migration of everything but the shared RAM, which it began
        writing when the guest was paused."""
        if not self._paused:
            raise GuestError("the device state is saved from a paused guest only")
        capture, self._capture = self._capture, None
        if capture is None:
            raise GuestError("QEMU's device-state migration was not started by pause()")
        state = capture.result()
        self.handoff_seconds = time.monotonic() - capture.started
        return state

    def finish(self) -> None:
        """The destination runs the guest: this QEMU stays stopped (``postmigrate``);
        one that p2v started is told to quit."""
        with self._lock:
            self._release_throttle()
            self._restore_migration_settings()
            if self.process is not None:
                self.process.quit()

    def close(self) -> None:
        with self._lock:
            self._release_throttle()
            self._abandon_capture()
        with contextlib.suppress(BufferError):
            # views the engine still holds keep the mapping; it goes with them
            self._map.close()
        if self.process is None:
            self.qmp.close()

    # --- helpers -------------------------------------------------------------------

    def _abandon_capture(self) -> None:
        if self._capture is not None:
            self._capture.abandon()
            self._capture = None

    def _release_throttle(self) -> None:
        if self._throttle is not None:
            self._throttle.release()
            self._throttle = None

    def _prepare_migration_settings(self) -> None:
        if self._restore is None:
            params = self.qmp.execute("query-migrate-parameters")
            self._restore = {
                "x-ignore-shared": _capability(self.qmp, "x-ignore-shared"),
                "max-bandwidth": params.get("max-bandwidth"),
            }
        _set_capability(self.qmp, "x-ignore-shared", True)
        self.qmp.execute("migrate-set-parameters", {"max-bandwidth": HANDOFF_BANDWIDTH})

    def _restore_migration_settings(self) -> None:
        """Leave the user's QEMU as it was: a later plain `migrate` must copy RAM."""
        if self._restore is None:
            return
        try:
            _set_capability(self.qmp, "x-ignore-shared", self._restore["x-ignore-shared"])
            if self._restore["max-bandwidth"] is not None:
                self.qmp.execute(
                    "migrate-set-parameters", {"max-bandwidth": self._restore["max-bandwidth"]}
                )
        except QMPError:
            pass
        self._restore = None


def _read_all(sock: socket.socket, deadline: float, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestError("QEMU's device-state migration did not finish in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError as exc:
            raise GuestError("QEMU's device-state migration did not finish in time") from exc
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise GuestError(f"QEMU's device state is over {limit} bytes")
        chunks.append(chunk)


class QemuTarget:
    """A QEMU waiting for an incoming migration (`live_migrate.guest.TargetGuest`).

    The QEMU runs ``-incoming defer -S`` on `ram_path`, a ``share=on`` file backend of
    the source's size. `memory()` maps that file; the receiver fills it while QEMU waits.
    """

    state_format = StateFormat.QEMU

    def __init__(
        self,
        qmp_socket: str,
        ram_path: str,
        geometry: Geometry,
        *,
        process: QemuProcess | None = None,
        owns_ram_file: bool = False,
        load_timeout: float = 30.0,
    ) -> None:
        self.process = process
        self.qmp = process.qmp if process is not None else QMPClient(qmp_socket)
        self.ram_path = ram_path
        self.load_timeout = load_timeout
        self._owns_ram_file = owns_ram_file
        self._discarded = False
        try:
            status = self.qmp.execute("query-status")["status"]
            if status != "inmigrate":
                raise GuestError(
                    f"destination QEMU is {status}, not waiting for a migration: "
                    "start it with -incoming defer -S"
                )
            size = _ram_backend(self.qmp, ram_path)
            if size != geometry.memory_size or geometry.page_size != PAGE_SIZE:
                raise GuestError(
                    f"destination QEMU has {size} bytes of RAM, the source "
                    f"{geometry.memory_size} (pages of {geometry.page_size})"
                )
            _capability(self.qmp, "x-ignore-shared")
            self._geometry = geometry
            self._map = _map(ram_path, size, writable=True)
            self._zero()
            self._incoming: socket.socket | None = self._arm_incoming()
        except BaseException:
            if process is None:
                self.qmp.close()
            raise
        self.load_seconds = 0.0

    @classmethod
    def launch(cls, spec: QemuSpec, geometry: Geometry, **kw: Any) -> QemuTarget:
        """Create the RAM file and start a QEMU from `spec` with ``-incoming defer -S``."""
        spec = dataclasses.replace(spec, ram_size=geometry.memory_size, incoming=True)
        created = not os.path.exists(spec.ram_path)
        with open(spec.ram_path, "ab") as f:
            f.truncate(spec.ram_size)
        try:
            process = QemuProcess(spec)
        except BaseException:
            if created:
                os.unlink(spec.ram_path)
            raise
        try:
            return cls(
                spec.qmp_socket,
                spec.ram_path,
                geometry,
                process=process,
                owns_ram_file=created,
                **kw,
            )
        except BaseException:
            process.kill()
            if created:
                os.unlink(spec.ram_path)
            raise

    def _arm_incoming(self) -> socket.socket:
        """Start ``migrate-incoming`` on an fd now, so that at switch-over the device
        state only has to be written into it (QMP round trips stay out of the downtime).
        QEMU waits on the fd; with ``x-ignore-shared`` it never touches the RAM file."""
        ours, theirs = socket.socketpair()
        try:
            # MIGRATION events tell the end of the load at once, where polling would
            # add up to a polling interval to the downtime
            self.qmp.execute(
                "migrate-set-capabilities",
                {
                    "capabilities": [
                        {"capability": "x-ignore-shared", "state": True},
                        {"capability": "events", "state": True},
                    ]
                },
            )
            self.qmp.execute("getfd", {"fdname": FDNAME}, fds=[theirs.fileno()])
            self.qmp.execute("migrate-incoming", {"uri": f"fd:{FDNAME}"})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def _zero(self) -> None:
        """Make the RAM read as zeros (the receiver skips zero pages): QEMU wrote ROM
        images into it at start-up, and an attached file may hold an old guest."""
        try:
            self._map.madvise(mmap.MADV_REMOVE)
            return
        except (OSError, AttributeError):
            pass
        arr = np.frombuffer(self._map, dtype=np.uint64)
        step = 1 << 21
        for start in range(0, arr.size, step):
            arr[start : start + step] = 0
        del arr

    # --- TargetGuest ---------------------------------------------------------------

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    def memory(self) -> memoryview:
        return memoryview(self._map)

    def load_device_state(self, state: bytes) -> None:
        """Feed the source's device state to the waiting ``migrate-incoming``; QEMU stays
        paused (``-S``) until `resume()`."""
        started = time.monotonic()
        deadline = started + self.load_timeout
        incoming, self._incoming = self._incoming, None
        if incoming is None:
            raise GuestError("the device state was already loaded")
        try:
            incoming.settimeout(self.load_timeout)
            incoming.sendall(state)
            incoming.shutdown(socket.SHUT_WR)
            info = self._wait_loaded(deadline)
        except (QMPError, OSError, GuestError) as exc:
            raise GuestError(
                f"destination QEMU refused the device state: {self._why(exc)}"
            ) from exc
        finally:
            incoming.close()
        if info.get("status") != "completed":
            reason = info.get("error-desc", info.get("status"))
            raise GuestError(f"destination QEMU failed to load the device state: {reason}")
        try:
            # QEMU started without -S would run the guest now: it emits RESUME before
            # the MIGRATION event that said "completed" (QEMU changes the run state
            # first), so the event queue tells without a query-status round trip
            self.qmp.wait_event("RESUME", timeout=0)
        except QMPTimeout:
            pass
        else:
            try:
                self.qmp.execute("stop")  # hold it until the source commits
            except QMPError as exc:
                raise GuestError(f"destination QEMU: {self._why(exc)}") from exc
        self.load_seconds = time.monotonic() - started

    def _wait_loaded(self, deadline: float) -> dict[str, Any]:
        """The incoming migration's final status, from its MIGRATION event (asking
        QEMU for the reason only when it is not "completed")."""
        done = ("completed", "failed", "cancelled")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError("destination QEMU did not load the device state in time")
            try:
                event = self.qmp.wait_event(
                    "MIGRATION", timeout=min(left, 0.5), match=lambda d: d.get("status") in done
                )
                break
            except QMPTimeout:
                if self.process is not None and not self.process.is_alive():
                    raise GuestError(self.process.exit_description()) from None
        if event.get("data", {}).get("status") == "completed":
            return {"status": "completed"}
        return _migration_status(self.qmp)

    def resume(self) -> None:
        try:
            self.qmp.execute("cont")
        except QMPError as exc:
            raise GuestError(f"destination QEMU did not resume: {self._why(exc)}") from exc

    def discard(self) -> None:
        """Quit the destination QEMU (it holds a half-built guest); idempotent."""
        if self._discarded:
            return
        self._discarded = True
        if self._incoming is not None:
            self._incoming.close()
            self._incoming = None
        if self.process is not None:
            self.process.kill()
        else:
            try:
                self.qmp.execute("quit")
            except QMPError:
                pass
            self.qmp.close()
        with contextlib.suppress(BufferError):
            self._map.close()
        if self._owns_ram_file:
            with contextlib.suppress(OSError):
                os.unlink(self.ram_path)

    def close(self) -> None:
        """Let go of the mapping and QMP; a resumed QEMU keeps running."""
        with contextlib.suppress(BufferError):
            self._map.close()
        if self.process is None:
            self.qmp.close()

    def _why(self, exc: Exception) -> str:
        if self.process is not None and not self.process.is_alive():
            return self.process.exit_description()
        return str(exc)


def target_factory(
    *, spec: QemuSpec | None = None, qmp_socket: str | None = None, ram_path: str | None = None
) -> TargetFactory:
    """A receiver's factory: launch a destination QEMU from `spec` (its ram_size is
    taken from the handshake), or attach to one the user started with `qmp_socket` and
    `ram_path`. Starting QEMU at the handshake keeps its start-up out of the downtime."""
    if spec is not None:
        template = spec
        return lambda geometry: QemuTarget.launch(template, geometry)
    if qmp_socket is None or ram_path is None:
        raise GuestError("a QEMU target needs a QEMU spec, or a QMP socket and a RAM file")
    socket_path, ram = qmp_socket, ram_path
    return lambda geometry: QemuTarget(socket_path, ram, geometry)


def parse_guest_option(text: str) -> tuple[str, dict[str, str]]:
    """``QMP_SOCKET,ram=PATH[,throttle=auto|cgroup|duty-cycle]`` → (socket, options),
    the form `p2v migrate --guest qemu:...` and `p2v receive --qemu ...` take."""
    first, *rest = text.split(",")
    if not first:
        raise GuestError("expected QMP_SOCKET,ram=PATH")
    options: dict[str, str] = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq or key not in ("ram", "throttle"):
            raise GuestError(f"unknown QEMU guest option {item!r} (ram=PATH, throttle=METHOD)")
        options[key] = value
    if "ram" not in options:
        raise GuestError("the QEMU guest needs ram=PATH (the file of its memory-backend-file)")
    return first, options


def open_qemu_source(text: str) -> QemuSource:
    """`--guest qemu:QMP_SOCKET,ram=PATH[,throttle=...]`: attach to a running QEMU."""
    qmp_socket, options = parse_guest_option(text)
    return QemuSource(qmp_socket, options["ram"], throttle=options.get("throttle", "auto"))


def qemu_target_factory(text: str) -> TargetFactory:
    """`p2v receive --qemu QMP_SOCKET,ram=PATH`: the destination QEMU the user started
    with ``-incoming defer -S`` on that RAM file."""
    qmp_socket, options = parse_guest_option(text)
    if "throttle" in options:
        raise GuestError("throttle= is a source option")
    return target_factory(qmp_socket=qmp_socket, ram_path=options["ram"])
