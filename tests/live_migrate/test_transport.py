"""Transports: TLS with a verified server certificate and optional client certificate,
the bandwidth cap, and the adapters for streams that are not sockets."""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

from live_migrate.engine import Migration, MigrationOptions
from live_migrate.errors import TransportError
from live_migrate.guests.sim import SimGuest, parse_spec
from live_migrate.states import MigrationState
from live_migrate.transport import (
    FdStream,
    LimitedStream,
    RateLimiter,
    RecvStream,
    SocketStream,
    open_channels,
    parse_address,
    recv_exact,
    recv_parts,
    tls_client_context,
)
from tests.live_migrate.pki import make_pki
from tests.live_migrate.receiver_process import start_receiver


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pki"))
    return make_pki(root, "good"), make_pki(root, "other")


def tls_receiver(pki, client_ca: bool = False):
    good, _ = pki
    extra = ["--tls-cert", good["server"] + ".crt", "--tls-key", good["server"] + ".key"]
    if client_ca:
        extra += ["--tls-client-ca", good["ca"] + ".crt"]
    return start_receiver(*extra)


def test_tls_migration_verifies_the_receiver(pki) -> None:
    good, _ = pki
    receiver = tls_receiver(pki)
    try:
        with SimGuest(parse_spec("sim:16M,workload=uniform,rate=10M")) as guest:
            tls = tls_client_context(good["ca"] + ".crt")
            streams = open_channels(receiver.address, 2, tls=tls)
            report = Migration(guest, streams, MigrationOptions(compress="lz4")).run()
            assert report.completed, report.error
            memory = guest.memory_hash()
        result = receiver.result()
        assert result["completed"] and result["memory_sha256"] == memory
    finally:
        receiver.kill()


def test_tls_refuses_a_receiver_signed_by_another_ca(pki) -> None:
    _, other = pki
    receiver = tls_receiver(pki)
    try:
        tls = tls_client_context(other["ca"] + ".crt")
        with pytest.raises(TransportError, match="certificate verify failed"):
            open_channels(receiver.address, 1, tls=tls)
    finally:
        receiver.kill()


def test_tls_client_certificate_is_required_when_asked(pki) -> None:
    good, _other = pki
    receiver = tls_receiver(pki, client_ca=True)
    try:
        with SimGuest(parse_spec("sim:4M")) as guest:
            # without a certificate (TLS 1.3 reports it at the first read): refused
            stranger = tls_client_context(good["ca"] + ".crt")
            try:
                streams = open_channels(receiver.address, 1, tls=stranger)
            except TransportError:
                pass  # TLS 1.2, or 1.3 when the alert arrives first
            else:
                report = Migration(guest, streams).run()
                assert report.state is MigrationState.FAILED and report.source_running
            assert not guest.is_paused
            # with one, signed by the CA the receiver trusts
            known = tls_client_context(
                good["ca"] + ".crt", good["client"] + ".crt", good["client"] + ".key"
            )
            report = Migration(guest, open_channels(receiver.address, 1, tls=known)).run()
            assert report.completed, report.error
        result = receiver.result()
        assert result["completed"]
    finally:
        receiver.kill()


def test_rate_limiter_caps_all_channels_together() -> None:
    limiter = RateLimiter(20e6)
    pairs = [socket.socketpair() for _ in range(2)]
    received = [0, 0]

    def drain(i: int, sock: socket.socket) -> None:
        while chunk := sock.recv(1 << 20):
            received[i] += len(chunk)

    threads = [threading.Thread(target=drain, args=(i, b)) for i, (_, b) in enumerate(pairs)]
    for t in threads:
        t.start()
    streams = [LimitedStream(SocketStream(a), limiter) for a, _ in pairs]
    t0 = time.monotonic()
    senders = [threading.Thread(target=s.sendall, args=(b"\0" * (5 << 20),)) for s in streams]
    for s in senders:
        s.start()
    for s in senders:
        s.join()
    elapsed = time.monotonic() - t0
    for s in streams:
        s.close()
    for t in threads:
        t.join()
    assert received == [5 << 20, 5 << 20]
    # one bucket for both: 10 MiB take at least (10 MiB - one burst) / 20 MB/s, however
    # fast or loaded the machine (two buckets would let it go in half the time)
    assert elapsed >= ((10 << 20) - limiter.burst) / 20e6


class _FakeTime:
    """The transport's clock, stepped by the test: sleeping advances it, nothing else
    does, so what the bucket lets through depends on the test's stalls alone."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


class _Clock:
    """A sink that notes when each write got through the bucket."""

    def __init__(self, clock: _FakeTime) -> None:
        self.clock = clock
        self.sent: list[tuple[float, int]] = []

    def sendall(self, data) -> None:
        self.sent.append((self.clock.monotonic(), memoryview(data).nbytes))

    def recv_into(self, buffer) -> int:
        return 0

    def close(self) -> None:
        pass


def test_rate_limiter_never_exceeds_the_cap_and_wins_back_stalls(monkeypatch) -> None:
    """From the bucket's creation, never more than rate x t bytes have gone; a sender
    that stalls (its encoders late, the CPU taken) makes up for it from the burst, so the
    average stays at the cap. A 20 ms burst lost 30 ms per 50 ms stall here: 0.77 of
    the cap."""
    clock = _FakeTime()
    monkeypatch.setattr("live_migrate.transport.time", clock)
    rate, chunk = 8e6, 256 << 10
    limiter = RateLimiter(rate)
    sink = _Clock(clock)
    stream = LimitedStream(sink, limiter)
    t0 = clock.monotonic()
    for i in range(32):
        stream.sendall(b"\0" * chunk)
        if i % 3 == 2:
            clock.sleep(0.05)  # 10 stalls: half of the transfer's 1 s
    total = 0
    for when, n in sink.sent:
        total += n
        assert total <= rate * (when - t0) + 1, "ahead of the cap"
    elapsed = sink.sent[-1][0] - t0
    assert total == 32 * chunk
    assert total / elapsed > 0.95 * rate


def test_recv_only_adapter_and_exact_reads() -> None:
    a, b = socket.socketpair()

    class Channel:  # what a paramiko channel offers
        def sendall(self, data):
            a.sendall(data)

        def recv(self, n):
            return a.recv(min(n, 7))

        def close(self):
            a.close()

    stream = RecvStream(Channel())
    b.sendall(b"0123456789abcdef")
    buf = bytearray(16)
    recv_exact(stream, memoryview(buf))
    assert bytes(buf) == b"0123456789abcdef"
    stream.sendall(b"back")
    assert b.recv(4) == b"back"
    b.close()
    with pytest.raises(TransportError, match="closed by the peer"):
        recv_exact(stream, memoryview(bytearray(1)))


def _scatter_views(sizes: list[int]) -> tuple[bytearray, list[memoryview]]:
    buf = bytearray(sum(sizes) + len(sizes))  # a gap byte after each view stays 0xEE
    buf[:] = b"\xee" * len(buf)
    views, at = [], 0
    for n in sizes:
        views.append(memoryview(buf)[at : at + n])
        at += n + 1
    return buf, views


@pytest.mark.parametrize("kind", ["socket", "pipe"])
def test_scattered_reads_fill_every_view_across_partial_reads(kind: str) -> None:
    """recvmsg_into / readv return as much as has arrived: the views are filled in
    order whatever the split, past IOV_LIMIT views, and a gap between them is left."""
    sizes = [1, 4096, 3, 0, 70000, *([5] * 700), 12345]
    data = os.urandom(sum(sizes))
    if kind == "socket":
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream = SocketStream(b)
        writer, closer = a.sendall, a.close
    else:
        r, w = os.pipe()
        stream = FdStream(r, w)

        def writer(chunk: bytes) -> None:
            os.write(w, chunk)

        def closer() -> None:
            pass

    def feed() -> None:
        for i in range(0, len(data), 999):  # many small writes: many partial reads
            writer(data[i : i + 999])
            time.sleep(0.0001)

    assert stream.scatters
    t = threading.Thread(target=feed)
    t.start()
    buf, views = _scatter_views(sizes)
    recv_parts(stream, views)
    t.join()
    assert b"".join(bytes(v) for v in views) == data
    gaps = np.cumsum(np.array(sizes) + 1) - 1
    assert set(bytes(buf[g] for g in gaps)) == {0xEE}  # the bytes between are untouched
    closer()
    stream.close()


def test_scattered_read_reports_a_peer_that_closes_midway() -> None:
    a, b = socket.socketpair()
    a.sendall(b"x" * 100)
    a.close()
    _, views = _scatter_views([60, 60])
    with pytest.raises(TransportError, match=r"closed by the peer \(100 of 120 bytes"):
        recv_parts(SocketStream(b), views)


def test_streams_that_cannot_scatter_read_view_by_view() -> None:
    a, b = socket.socketpair()

    class Channel:
        def sendall(self, data):
            a.sendall(data)

        def recv(self, n):
            return a.recv(min(n, 7))

        def close(self):
            a.close()

    stream = RecvStream(Channel())
    b.sendall(b"0123456789")
    _, views = _scatter_views([3, 0, 7])
    recv_parts(stream, views)
    assert [bytes(v) for v in views] == [b"012", b"", b"3456789"]
    a.close()
    b.close()


def test_parse_address() -> None:
    assert parse_address("10.0.0.1:4444") == ("10.0.0.1", 4444)
    assert parse_address("[::1]:5") == ("::1", 5)
    assert parse_address("host", 4444) == ("host", 4444)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("host")
    with pytest.raises(ValueError, match="out of range"):
        parse_address("h:70000")
