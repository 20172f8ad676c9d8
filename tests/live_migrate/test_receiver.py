"""The receiver against recorded, random and mutated streams: a valid recording replays
to the same memory; anything else is refused with one line, never a traceback or a hang."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live_migrate import wire
from live_migrate.engine import Migration, MigrationOptions
from live_migrate.guest import Geometry, StateFormat
from live_migrate.guests.sim import SimGuest, SimTarget, parse_spec
from live_migrate.receiver import Receiver, ReceiverOptions
from live_migrate.states import MigrationState
from live_migrate.transport import SocketStream
from tests.live_migrate.stepped import SteppedGuest, SteppedMigration


class Tee:
    """A stream that records what is sent through it."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.sent = bytearray()

    def sendall(self, data) -> None:
        self.sent += data
        self.stream.sendall(data)

    def recv_into(self, buffer) -> int:
        return self.stream.recv_into(buffer)

    def close(self) -> None:
        self.stream.close()


class Replay:
    """Feeds recorded bytes to a receiver; what it answers goes nowhere."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def sendall(self, data) -> None:
        pass

    def recv_into(self, buffer) -> int:
        n = min(len(buffer), len(self.data) - self.pos, 1 << 20)
        buffer[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        pass


class Targets:
    def __init__(self) -> None:
        self.made: list[SimTarget] = []

    def __call__(self, geometry: Geometry) -> SimTarget:
        target = SimTarget(geometry)
        self.made.append(target)
        return target


def replay(data: bytes, max_memory: int = 1 << 30):
    targets = Targets()
    receiver = Receiver(Replay(data), None, targets, ReceiverOptions(max_memory=max_memory))
    report = receiver.run()
    digest = None
    if report.completed:
        digest = hashlib.sha256(receiver.mem).hexdigest()
    for t in targets.made:
        assert t.resumed == report.completed
        assert t.discarded == (not report.completed)
    return report, digest


@pytest.fixture(scope="module")
def recording() -> tuple[bytes, str]:
    return record()


def _touch_words(guest: SteppedGuest) -> None:
    """Rounds 1-3 change one word in each of 64 pages of data: resent, they differ
    from the copy last sent by 8 bytes, and go as deltas. Then nothing changes."""
    if guest.rounds > 3:
        return
    pages = np.arange(guest.rounds, 256, 4)
    guest.mem[pages, guest.rounds] ^= np.uint64(0x0101)
    guest.dirty(pages)


@functools.cache
def record() -> tuple[bytes, str]:
    """A real migration's source-to-destination bytes (zero, full, compressed and
    delta pages, four rounds), and the memory it carried."""
    rng = np.random.default_rng(11)
    mem = np.zeros((512, 512), dtype=np.uint64)
    mem[:128] = rng.integers(0, 2**63, size=(128, 512), dtype=np.uint64)  # full
    mem[128:256] = np.arange(512, dtype=np.uint64) % 7  # compressible
    guest = SteppedGuest(mem, "scan", _touch_words)  # pages 256.. stay zero
    a, b = socket.socketpair()
    targets = Targets()
    receiver = Receiver(SocketStream(b), None, targets, ReceiverOptions(hash_memory=True))
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", receiver.run()))
    thread.start()
    tee = Tee(SocketStream(a))
    # no prediction fits a limit this small: rounds go on while the guest writes, and
    # stop when nothing is dirty; batches of 8 pages keep the random pages' batches
    # apart from the compressible ones
    options = MigrationOptions(compress="zstd", delta=True, max_downtime=1e-9, batch_pages=8)
    report = SteppedMigration(guest, [tee], options).run()
    thread.join()
    assert report.completed, report.error
    memory = hashlib.sha256(guest.mem.data).hexdigest()
    assert memory == result["r"].memory_sha256 and result["r"].memory_verified
    pages = report.pages
    assert pages.zero and pages.full and pages.compressed and pages.delta, pages
    assert len(report.rounds) >= 4
    return bytes(tee.sent), memory


def test_recorded_stream_replays_to_the_same_memory(recording) -> None:
    data, memory_hash = recording
    report, digest = replay(data)
    assert report.completed, report.error
    assert digest == memory_hash


def test_truncated_stream_is_refused_at_every_frame(recording) -> None:
    data, _ = recording
    # cut at each frame boundary and in the middle of each frame
    pos, cuts = 0, []
    while pos < len(data):
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        cuts += [pos, pos + 7, pos + wire.FRAME_HEADER_SIZE + length // 2]
        pos += wire.FRAME_HEADER_SIZE + length
    for cut in cuts[:-2]:
        report, _ = replay(data[:cut])
        assert not report.completed
        assert "closed by the peer" in report.error


def test_guest_larger_than_the_receiver_allows_is_refused(recording) -> None:
    report, _ = replay(recording[0], max_memory=1 << 20)
    assert not report.completed and "at most 1048576 bytes" in report.error


def test_oversized_frame_is_refused_before_its_body() -> None:
    header = wire.build_frame_header(wire.FrameType.HELLO, 1 << 30, 0)
    report, _ = replay(header)
    assert not report.completed and "at most" in report.error


def check_clean(data: bytes, reference: str | None = None) -> None:
    t = time.monotonic()
    report, digest = replay(data)
    assert time.monotonic() - t < 10
    if report.completed:
        # a change nothing depends on (the session id of a one-channel migration)
        assert digest == reference
    else:
        assert report.error and "\n" not in report.error
        assert "Traceback" not in report.error


FUZZ = settings(
    max_examples=int(os.environ.get("P2V_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused(data: bytes) -> None:
    check_clean(data)


@FUZZ
@given(st.binary(min_size=1, max_size=600))
def test_random_bytes_after_a_valid_hello_are_refused(tail: bytes) -> None:
    data, _ = record()
    hello = wire.FRAME_HEADER_SIZE + int.from_bytes(data[4:8], "big")
    check_clean(data[:hello] + tail)


@FUZZ
@given(st.data())
def test_mutated_streams_are_refused_or_harmless(draw) -> None:
    data, memory_hash = record()
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        # headers and tables are near the start of frames: weigh the first bytes
        limit = draw.draw(st.sampled_from([256, 4096, len(data)]))
        pos = draw.draw(st.integers(0, min(limit, len(mutated)) - 1))
        kind = draw.draw(st.sampled_from(["flip", "set", "delete", "insert"]))
        if kind == "flip":
            mutated[pos] ^= 1 << draw.draw(st.integers(0, 7))
        elif kind == "set":
            mutated[pos] = draw.draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, 1]))
        elif kind == "delete":
            del mutated[pos]
        else:
            mutated.insert(pos, draw.draw(st.integers(0, 255)))
    check_clean(bytes(mutated), memory_hash)


class _QemuLikeGuest(SimGuest):
    state_format = StateFormat.QEMU


class _QemuLikeTarget(SimTarget):
    state_format = StateFormat.QEMU


@pytest.mark.parametrize(
    ("guest_class", "target_class", "reason"),
    [
        (_QemuLikeGuest, SimTarget, "p2v receive --qemu"),
        (SimGuest, _QemuLikeTarget, "the source is not a QEMU guest"),
    ],
)
def test_device_state_formats_that_differ_are_refused_at_the_hello(
    guest_class, target_class, reason
) -> None:
    """A QEMU guest into a sim target (or the reverse) is refused before any page goes:
    the source is never paused, the target is discarded."""
    a, b = socket.socketpair()
    made: list[SimTarget] = []

    def targets(geometry: Geometry) -> SimTarget:
        made.append(target_class(geometry))
        return made[-1]

    receiver = Receiver(SocketStream(b), None, targets, ReceiverOptions())
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", receiver.run()))
    thread.start()
    with guest_class(parse_spec("sim:2M,workload=idle")) as guest:
        migration = Migration(guest, [SocketStream(a)], MigrationOptions())
        report = migration.run()
        assert not guest.is_paused
    thread.join(10)
    assert not report.completed and report.source_running
    assert reason in (report.error or ""), report.error
    assert MigrationState.STOPPING not in migration.states
    assert report.pages.total == 0
    assert not result["r"].completed and reason in (result["r"].error or "")
    assert [t.discarded for t in made] == [True]
