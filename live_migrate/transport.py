"""Transports: the byte streams the engine and the receiver talk over.

The engine takes any object with `sendall(data)`, `recv_into(buffer) -> int` (or only
`recv(n) -> bytes`, as a paramiko channel has) and `close()`. This module adapts what
callers have: TCP sockets (`connect_tcp`, `Listener`), TLS over them (`tls_client_context`,
`tls_server_context`: the server certificate is always verified, a client certificate may
be required), a pair of file descriptors (a receiver started over SSH speaks on its
stdin/stdout), and a recv-only object (an SSH channel). `RateLimiter` caps the bytes per
second all channels of a migration send together (`max_bandwidth`, for sharing a link).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from live_migrate.errors import TransportError

DEFAULT_TIMEOUT = 30.0
#: streams that cannot gather get parts joined up to this size per write
COALESCE = 1 << 20
#: buffers per sendmsg/recvmsg_into/readv call (Linux's IOV_MAX is 1024)
IOV_LIMIT = 512


@runtime_checkable
class Stream(Protocol):
    """What the engine and the receiver need of a connection."""

    def sendall(self, data: bytes | memoryview, /) -> None: ...

    def recv_into(self, buffer: memoryview, /) -> int: ...

    def close(self) -> None: ...


class SocketStream:
    """A connected TCP or TLS socket; plain TCP sends a frame's parts in one sendmsg."""

    def __init__(self, sock: socket.socket, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        self._gather = not isinstance(sock, ssl.SSLSocket)
        #: `recv_parts` fills many buffers per system call
        self.scatters = self._gather

    def sendall(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        if not self._gather:
            send_parts(_Plain(self.sock), parts)
            return
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = self.sock.sendmsg(views[:IOV_LIMIT])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def recv_into(self, buffer: memoryview) -> int:
        return self.sock.recv_into(buffer)

    def recv_parts(self, views: Sequence[memoryview]) -> None:
        """Fill every view, in order: plain TCP scatters each read over them (recvmsg),
        so pages land in guest memory with no intermediate buffer."""
        if not self._gather:
            for v in views:
                recv_exact(self, v)
            return
        _scatter_read(lambda bufs: self.sock.recvmsg_into(bufs)[0], views)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __repr__(self) -> str:
        try:
            return f"<SocketStream {self.sock.getpeername()}>"
        except OSError:
            return "<SocketStream closed>"


class TLSStream(SocketStream):
    """A TLS socket that one thread may read while another writes.

    An OpenSSL connection must not be used by two threads at once, yet the engine reads
    channel 0 (to hear an ABORT at any time) while it sends on it. So the socket is
    non-blocking, every TLS call runs under one lock, and the waits for the socket to
    become readable or writable happen outside it.
    """

    CHUNK = 256 << 10

    def __init__(self, sock: ssl.SSLSocket, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        super().__init__(sock, None)
        sock.setblocking(False)
        self.timeout = timeout
        self._lock = threading.Lock()

    def _wait(self, readable: bool) -> None:
        r, w = ([self.sock], []) if readable else ([], [self.sock])
        if not any(select.select(r, w, [], self.timeout)[:2]):
            raise TimeoutError("timed out")

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            want_read = False
            with self._lock:
                try:
                    n = self.sock.send(view[: self.CHUNK])
                except ssl.SSLWantWriteError:
                    n = 0
                except ssl.SSLWantReadError:
                    n, want_read = 0, True
            view = view[n:]
            if view and not n:
                self._wait(readable=want_read)

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        send_parts(_Plain(self), parts)

    def recv_parts(self, views: Sequence[memoryview]) -> None:
        for v in views:
            recv_exact(self, v)

    def recv_into(self, buffer: memoryview) -> int:
        while True:
            want_write = False
            with self._lock:
                try:
                    return self.sock.recv_into(buffer)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLWantWriteError:
                    want_write = True
            self._wait(readable=not want_write)


class _Plain:
    """A stream seen without its gathering send, so that `send_parts` coalesces."""

    def __init__(self, stream: socket.socket | TLSStream) -> None:
        self.stream = stream

    def sendall(self, data: bytes | memoryview) -> None:
        self.stream.sendall(data)

    def recv_into(self, buffer: memoryview) -> int:
        return self.stream.recv_into(buffer)

    def close(self) -> None:
        self.stream.close()


class RecvStream:
    """Adapt an object with `sendall` and `recv(n)` only (a paramiko channel, p2v's
    ExecChannel): `recv_into` copies what `recv` returned."""

    def __init__(self, channel: object) -> None:
        self.channel = channel
        self._pending = b""

    def sendall(self, data: bytes | memoryview) -> None:
        self.channel.sendall(data)  # type: ignore[attr-defined]

    def recv_into(self, buffer: memoryview) -> int:
        if not self._pending:
            self._pending = self.channel.recv(max(len(buffer), 1 << 16))  # type: ignore[attr-defined]
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self.channel.close()  # type: ignore[attr-defined]


class FdStream:
    """Two file descriptors as one stream (a receiver's stdin and stdout under SSH)."""

    scatters = True  # readv

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.write_fd, view)
            view = view[n:]

    def recv_into(self, buffer: memoryview) -> int:
        return os.readv(self.read_fd, [buffer])

    def recv_parts(self, views: Sequence[memoryview]) -> None:
        _scatter_read(lambda bufs: os.readv(self.read_fd, bufs), views)

    def close(self) -> None:
        for fd in {self.read_fd, self.write_fd}:
            try:
                os.close(fd)
            except OSError:
                pass


class RateLimiter:
    """A token bucket shared by every channel of one migration: `rate` bytes per second
    in total. It starts empty, so that from its creation on no more than rate x t bytes
    go in t seconds; while the senders idle it saves up to `burst` bytes (default 100 ms
    of rate, QEMU's rate-limit window), so that a sender that lost the CPU or waited for
    its encoders catches up to the cap instead of falling below it for good."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"bandwidth cap must be positive, not {rate}")
        self.rate = float(rate)
        self.burst = burst or max(int(rate * 0.1), 64 << 10)
        self._tokens = 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.enabled = True

    def take(self, n: int) -> None:
        """Wait until `n` bytes (at most one burst) may go."""
        if not self.enabled:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class LimitedStream:
    """A stream whose sends draw from a shared `RateLimiter`."""

    def __init__(self, stream: Stream, limiter: RateLimiter) -> None:
        self.stream = stream
        self.limiter = limiter
        self._chunk = max(min(limiter.burst, 1 << 20), 16 << 10)

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self._chunk):
            part = view[start : start + self._chunk]
            self.limiter.take(len(part))
            self.stream.sendall(part)

    def recv_into(self, buffer: memoryview) -> int:
        return self.stream.recv_into(buffer)

    def close(self) -> None:
        self.stream.close()


def round_trip_time(stream: object) -> float | None:
    """The kernel's smoothed RTT of a TCP stream (Linux TCP_INFO), in seconds; None for
    other streams. It feeds the downtime prediction: a switch-over costs two round trips
    (END -> ACK, GO -> RESUMED)."""
    while not hasattr(stream, "sock") and hasattr(stream, "stream"):
        stream = stream.stream  # through LimitedStream
    sock = getattr(stream, "sock", None)
    info = getattr(socket, "TCP_INFO", None)
    if sock is None or info is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, info, 104)
    except OSError:
        return None
    if len(raw) < 72:
        return None
    # struct tcp_info: 8 one-byte fields, then u32s; tcpi_rtt (microseconds) is the 16th
    return int.from_bytes(raw[68:72], sys.byteorder) / 1e6


def send_parts(stream: Stream, parts: Sequence[bytes | memoryview]) -> None:
    """Send a frame made of several buffers: in one system call when the stream gathers
    (plain sockets), else in few large writes (TLS records, SSH packets cost per call)."""
    gather = getattr(stream, "send_parts", None)
    if gather is not None:
        gather(parts)
        return
    pending: list[bytes | memoryview] = []
    size = 0
    for p in parts:
        n = memoryview(p).nbytes
        if n >= COALESCE:
            if pending:
                stream.sendall(b"".join(pending))
                pending, size = [], 0
            stream.sendall(p)
            continue
        pending.append(p)
        size += n
        if size >= COALESCE:
            stream.sendall(b"".join(pending))
            pending, size = [], 0
    if pending:
        stream.sendall(b"".join(pending))


def recv_exact(stream: Stream, buffer: memoryview, *, may_idle: bool = False) -> None:
    """Fill `buffer` completely, or raise TransportError (peer closed or failed).
    With `may_idle`, a timeout before the first byte is not an error: the peer is quiet
    between messages (the source waits for the destination's ACK for a whole round)."""
    view = buffer.cast("B") if buffer.format != "B" else buffer
    got = 0
    while got < len(view):
        try:
            n = stream.recv_into(view[got:])
        except TimeoutError as exc:
            if may_idle and not got:
                continue
            raise TransportError(f"receive timed out: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise TransportError(f"receive failed: {exc}") from exc
        if not n:
            raise TransportError(
                f"connection closed by the peer ({got} of {len(view)} bytes of a message)"
            )
        got += n


def recv_parts(stream: Stream, views: Sequence[memoryview]) -> None:
    """Fill every view in order from `stream`: in few system calls when the stream
    scatters (plain sockets, pipes), else one `recv_exact` per view."""
    scatter = getattr(stream, "recv_parts", None)
    if scatter is not None:
        scatter(views)
        return
    for v in views:
        recv_exact(stream, v)


def _scatter_read(read: Callable[[list[memoryview]], int], views: Sequence[memoryview]) -> None:
    """Call `read` (recvmsg_into, readv) on the views not yet full until all are; at most
    IOV_LIMIT of them per call."""
    pending = [v.cast("B") if v.format != "B" else v for v in views if v.nbytes]
    total = sum(v.nbytes for v in pending)
    got = 0
    i = 0
    while i < len(pending):
        try:
            n = read(pending[i : i + IOV_LIMIT])
        except TimeoutError as exc:
            raise TransportError(f"receive timed out: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise TransportError(f"receive failed: {exc}") from exc
        if not n:
            raise TransportError(
                f"connection closed by the peer ({got} of {total} bytes of a message)"
            )
        got += n
        while n:
            size = pending[i].nbytes
            if n >= size:
                n -= size
                i += 1
            else:
                pending[i] = pending[i][n:]
                n = 0


# -- TCP and TLS ---------------------------------------------------------------------


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or (with a default port) 'HOST'."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, ""
    host = host.strip("[]")
    if not port:
        if default_port is None:
            raise ValueError(f"address {text!r}: expected HOST:PORT")
        return host, default_port
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"address {text!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"address {text!r}: port {number} out of range")
    return host or "127.0.0.1", number


def _tune(sock: socket.socket) -> None:
    # small control frames (END, ACK, GO) must not wait for Nagle; the socket buffers
    # are left to the kernel's autotuning, which beats any fixed size on loopback
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tls_client_context(
    cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """The source's TLS: the receiver's certificate is verified (against `cafile`, or the
    system's CAs) and its name checked; `certfile` proves the source when the receiver
    asks for a client certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def tls_server_context(
    certfile: str, keyfile: str | None = None, client_cafile: str | None = None
) -> ssl.SSLContext:
    """The receiver's TLS: its certificate, and when `client_cafile` is given, a client
    certificate signed by it is required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if client_cafile:
        ctx.load_verify_locations(client_cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def connect_tcp(
    address: tuple[str, int],
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> SocketStream:
    """Connect to a receiver (TLS handshake included when `tls` is given)."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        raise TransportError(f"cannot connect to {address[0]}:{address[1]}: {exc}") from exc
    _tune(sock)
    if tls is not None:
        try:
            tls_sock = tls.wrap_socket(sock, server_hostname=server_hostname or address[0])
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise TransportError(f"TLS with {address[0]}:{address[1]} failed: {exc}") from exc
        return TLSStream(tls_sock, timeout)
    return SocketStream(sock, timeout)


def open_channels(
    address: tuple[str, int],
    count: int,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[SocketStream]:
    """`count` connections to one receiver: channel 0 first (it carries the handshake)."""
    streams: list[SocketStream] = []
    try:
        for _ in range(count):
            streams.append(
                connect_tcp(address, tls=tls, server_hostname=server_hostname, timeout=timeout)
            )
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


class Listener:
    """A listening TCP socket (TLS when a server context is given) for the receiver."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        tls: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.tls = tls
        self.timeout = timeout
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(address)
            self.sock.listen(8)
        except OSError as exc:
            self.sock.close()
            raise TransportError(f"cannot listen on {address[0]}:{address[1]}: {exc}") from exc

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def accept(self, timeout: float | None = None) -> SocketStream:
        """The next connection (after its TLS handshake); TransportError on timeout or a
        refused handshake."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except OSError as exc:
            raise TransportError(f"no connection: {exc}") from exc
        _tune(conn)
        if self.tls is not None:
            conn.settimeout(self.timeout)
            try:
                tls_conn = self.tls.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                conn.close()
                raise TransportError(f"TLS handshake refused: {exc}") from exc
            return TLSStream(tls_conn, self.timeout)
        return SocketStream(conn, self.timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
