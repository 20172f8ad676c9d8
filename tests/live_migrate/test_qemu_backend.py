"""The QEMU backend's parts against a real QEMU: QMP, RAM checks, throttling, hand-off."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from live_migrate.errors import GuestError
from live_migrate.guest import PAGE_SIZE, DirtyTracking, SourceGuest, TargetGuest
from live_migrate.guests.qemu import QemuSource, QemuTarget, parse_guest_option
from live_migrate.guests.qemu_throttle import CgroupThrottle, measure_cpu, vcpu_threads
from live_migrate.qemu_launcher import QemuProcess, QemuSpec, connectable
from live_migrate.qmp import QMPClient, QMPCommandError, QMPError
from tests.external import need_tool

from .guest_image.harness import (
    SerialLog,
    Workdir,
    build_or_skip,
    destination_spec,
    guest_spec,
)


@pytest.fixture
def work():
    w = Workdir()
    yield w
    w.cleanup()


@pytest.fixture
def bare_qemu(work):
    """A QEMU with 16 MiB of shared file RAM and no guest (firmware only): fast to start."""
    need_tool("qemu-system-x86_64")
    spec = QemuSpec(ram_path=work.ram("bare"), ram_size=16 << 20, qmp_socket=work.file("bare.qmp"))
    with open(spec.ram_path, "wb") as f:
        f.truncate(spec.ram_size)
    qemu = QemuProcess(spec)
    yield qemu, spec
    qemu.kill()


def _raw_qemu(work: Workdir, name: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A QEMU started by hand (as a user would) with its QMP socket."""
    qmp = work.file(f"{name}.qmp")
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{qmp},server=on,wait=off",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The socket's file appears at bind(), a moment before QEMU listens on it: wait
    # until a connection is accepted (QEMU takes the next client once this one closes).
    for _ in range(500):
        if connectable(qmp):
            break
        assert proc.poll() is None, "QEMU did not start"
        time.sleep(0.01)
    return proc, qmp


# --- QMP --------------------------------------------------------------------------------


def test_qmp_greeting_commands_errors_and_events(bare_qemu):
    qemu, _ = bare_qemu
    qmp = qemu.qmp
    assert "qemu" in qmp.greeting["version"]
    assert qmp.execute("query-status")["status"] == "running"
    with pytest.raises(QMPCommandError) as err:
        qmp.execute("no-such-command")
    assert err.value.error_class == "CommandNotFound"
    qmp.execute("stop")
    event = qmp.wait_event("STOP", timeout=5)
    assert event["event"] == "STOP"
    qmp.execute("cont")
    assert qmp.wait_event("RESUME", timeout=5)["event"] == "RESUME"
    with pytest.raises(QMPError, match="timed out waiting for event NOPE"):
        qmp.wait_event("NOPE", timeout=0.2)
    # the session survives errors and timeouts
    assert qmp.execute("query-status")["running"] is True


def test_qmp_passes_file_descriptors(bare_qemu):
    qemu, _ = bare_qemu
    a, b = socket.socketpair()
    try:
        qemu.qmp.execute("getfd", {"fdname": "probe"}, fds=[b.fileno()])
        qemu.qmp.execute("closefd", {"fdname": "probe"})
        with pytest.raises(QMPCommandError):
            qemu.qmp.execute("closefd", {"fdname": "probe"})  # gone: it had arrived
    finally:
        a.close()
        b.close()


def _fake_server(path: str, reply: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        if reply:
            conn.sendall(reply)
            conn.recv(100)
        conn.close()
        srv.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return th


@pytest.mark.parametrize(
    "reply, message",
    [
        (b'{"hello": 1}\n', "expected a greeting"),
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "expected an object"),
        (b"", "closed the connection"),
    ],
)
def test_qmp_peer_errors_are_one_line(work, reply, message):
    path = work.file("fake.qmp")
    th = _fake_server(path, reply)
    with pytest.raises(QMPError, match=message):
        QMPClient(path, timeout=2)
    th.join(5)


def test_qmp_connect_error(work):
    with pytest.raises(QMPError, match="cannot connect"):
        QMPClient(work.file("nothing.qmp"), timeout=1)


# --- attaching to a user's QEMU ----------------------------------------------------------


def test_attach_names_what_is_missing(work):
    need_tool("qemu-system-x86_64")
    ram = work.ram("user")
    with open(ram, "wb") as f:
        f.truncate(16 << 20)
    cases = [
        (["-m", "16M"], "lacks share=on"),  # QEMU 7 makes an implicit private backend
        (
            [
                "-object",
                f"memory-backend-file,id=m,size=16M,mem-path={ram},share=off",
                "-machine",
                "pc,memory-backend=m",
                "-m",
                "16M",
            ],
            "share=on",
        ),
        (
            [
                "-object",
                "memory-backend-ram,id=m,size=16M,share=on",
                "-machine",
                "pc,memory-backend=m",
                "-m",
                "16M",
            ],
            "not a memory-backend-file",
        ),
    ]
    for args, message in cases:
        proc, qmp = _raw_qemu(work, "user", *args)
        try:
            with pytest.raises(GuestError, match=message):
                QemuSource(qmp, ram)
        finally:
            proc.kill()
            proc.wait()
            os.unlink(qmp)


def test_attach_refuses_another_ram_file(bare_qemu, work):
    qemu, _ = bare_qemu
    other = work.ram("other")
    with open(other, "wb") as f:
        f.truncate(16 << 20)
    with pytest.raises(GuestError, match="not in"):
        _attach(qemu, other)


def _attach(qemu: QemuProcess, ram: str) -> QemuSource:
    return QemuSource(qemu.spec.qmp_socket, ram, process=qemu)


def test_source_fits_the_guest_protocol_and_maps_the_ram(bare_qemu):
    qemu, spec = bare_qemu
    src = _attach(qemu, spec.ram_path)
    try:
        assert isinstance(src, SourceGuest)
        assert src.geometry.page_size == PAGE_SIZE
        assert src.geometry.memory_size == 16 << 20
        assert src.dirty_tracking is DirtyTracking.SCAN
        mem = np.frombuffer(src.memory(), dtype=np.uint8)
        with open(spec.ram_path, "rb") as f:
            f.seek(0xF0000)  # the BIOS shadow in low RAM, written by QEMU's firmware
            assert bytes(mem[0xF0000 : 0xF0000 + 4096]) == f.read(4096)
        assert not mem.flags.writeable
        src.pause()
        assert src.is_paused and qemu.qmp.execute("query-status")["status"] == "paused"
        src.resume()
        assert not src.is_paused and qemu.qmp.execute("query-status")["running"]
    finally:
        src.close()


def test_option_parsing():
    assert parse_guest_option("/run/g.qmp,ram=/dev/shm/g") == ("/run/g.qmp", {"ram": "/dev/shm/g"})
    with pytest.raises(GuestError, match="ram=PATH"):
        parse_guest_option("/run/g.qmp")
    with pytest.raises(GuestError, match="unknown"):
        parse_guest_option("/run/g.qmp,ram=x,colour=blue")


# --- with the test guest ----------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_image():
    return build_or_skip()


def test_throttle_slows_the_vcpu_and_restores_it(guest_image, work):
    """Both methods cut the vCPU thread's CPU time; release puts everything back."""
    spec = guest_spec(guest_image, work, "spin", ram_mib=128, mem_mib=16, rate_mb=0, spin=True)
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    src = QemuSource.launch(spec, throttle="duty-cycle")
    try:
        log = SerialLog(spec.serial_log)
        log.wait_tick(3, timeout=90, alive=src.process.is_alive)
        tid = vcpu_threads(src.qmp)[0]
        with open(f"/proc/{tid}/cgroup") as f:
            cgroups_before = f.read()
        # on a loaded machine the free share can be small: QEMU's threads and this one
        # (the duty cycle's thread inherits its priority) run at a high priority (as
        # root, which CI is), so that neither the free share nor the throttle's timing
        # hangs on the other jobs; the throttle is hard enough (95 %) that the slowed
        # share stays well under whatever the free one is
        if os.geteuid() == 0:
            for task in os.listdir(f"/proc/{src.process.pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(task), -15)
            os.setpriority(os.PRIO_PROCESS, 0, -15)
        free = measure_cpu(tid, 0.8)
        assert free > 0.12, f"the spinning guest uses only {free:.2f} of a CPU"
        methods = ["duty-cycle"]
        try:
            CgroupThrottle(src.qmp, "probe").release()
            methods.append("cgroup")
        except GuestError:
            pass  # no writable cgroup here: the duty cycle is what auto-converge gets
        for method in methods:
            src._throttle_method = method
            src.set_throttle(0.95)
            assert src.throttle_kind.startswith("cgroup" if method == "cgroup" else "duty")
            measure_cpu(tid, 0.2)  # let the quota take hold
            slowed = measure_cpu(tid, 1.0)
            # 95 % off leaves ~5 %, plus the duty cycle's stop/cont overhead (CI saw 10.7 %):
            # the bound that matters is relative to the free share
            assert slowed < 0.25 and slowed < free * 0.3, (method, free, slowed)
            src.set_throttle(0.0)
            assert src.throttle_kind == "none"
            assert src.qmp.execute("query-status")["running"], method
            with open(f"/proc/{tid}/cgroup") as f:
                assert f.read() == cgroups_before, method
            # a full-suite run under CI (-n 2 on 2 cores) once saw 0.0 in the first
            # window after a cgroup release (not reproduced in 10 loaded cycles): the
            # same bound, given up to three windows to hold, with what the vCPU thread
            # and the guest were doing if it never does
            for _ in range(3):
                again = measure_cpu(tid, 0.8)
                if again > slowed * 1.5:
                    break
            with open(f"/proc/{tid}/stat") as f:
                thread_state = f.read().rsplit(")", 1)[1].split()[0]
            assert again > slowed * 1.5, (
                method,
                slowed,
                again,
                thread_state,
                src.qmp.execute("query-status")["status"],
                log.last_tick(),
            )
    finally:
        src.close()
        src.process.kill()
        if os.geteuid() == 0:
            os.setpriority(os.PRIO_PROCESS, 0, own_nice)  # this thread serves other tests


def test_handoff_by_hand_then_failed_load_resumes_source(guest_image, work):
    """save_device_state leaves the source in postmigrate; resume() brings it back."""
    spec = guest_spec(guest_image, work, "src", ram_mib=128, mem_mib=8, rate_mb=5)
    src = QemuSource.launch(spec)
    log = SerialLog(spec.serial_log)
    try:
        log.wait_tick(3, timeout=90, alive=src.process.is_alive)
        dst_spec = destination_spec(spec, work)
        target = QemuTarget.launch(dst_spec, src.geometry)
        assert isinstance(target, TargetGuest)
        try:
            src.pause()
            np.copyto(
                np.frombuffer(target.memory(), dtype=np.uint8),
                np.frombuffer(src.memory(), dtype=np.uint8),
            )
            state = src.save_device_state()
            assert 1000 < len(state) < 64 << 20
            assert src.qmp.execute("query-status")["status"] == "postmigrate"
            # a destination that dies now: the load fails, the source runs on
            target.process.kill()
            with pytest.raises(GuestError, match="QEMU exited"):
                target.load_device_state(state)
        finally:
            target.discard()
        src.resume()
        assert src.qmp.execute("query-status")["status"] == "running"
        assert log.keeps_counting(3)
        assert not log.bad_lines()
        caps = {c["capability"]: c["state"] for c in src.qmp.execute("query-migrate-capabilities")}
        assert caps["x-ignore-shared"] is False
        assert not os.path.exists(dst_spec.ram_path)  # the target made it, discard removed it
    finally:
        src.close()
        src.process.kill()
