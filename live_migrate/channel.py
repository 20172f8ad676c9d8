"""One migration channel: frames over a stream, with per-direction sequence numbers."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from live_migrate import wire
from live_migrate.errors import ProtocolError, RefusedError, TransportError
from live_migrate.transport import Stream, recv_exact, recv_parts, send_parts


class Channel:
    """Sends and receives whole frames. Sending is thread-safe (a lock per channel);
    receiving belongs to one thread. The body buffer grows to the largest frame seen,
    within the caps `wire.parse_frame_header` enforces."""

    def __init__(self, stream: Stream, index: int = 0) -> None:
        self.stream = stream
        self.index = index
        self._send_lock = threading.Lock()
        self._send_seq = 0
        self._recv_seq = 0
        self._header = bytearray(wire.FRAME_HEADER_SIZE)
        self._body = bytearray(1 << 16)
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, ftype: wire.FrameType, parts: Sequence[bytes | memoryview] = ()) -> int:
        """Send one frame; returns its size on the wire."""
        length = sum(memoryview(p).nbytes for p in parts)
        with self._send_lock:
            header = wire.build_frame_header(ftype, length, self._send_seq)
            try:
                send_parts(self.stream, [header, *parts])
            except (OSError, ValueError) as exc:
                raise TransportError(f"channel {self.index}: send failed: {exc}") from exc
            self._send_seq += 1
        self.bytes_sent += wire.FRAME_HEADER_SIZE + length
        return wire.FRAME_HEADER_SIZE + length

    def receive_frame(self, *, may_idle: bool = False) -> wire.Frame:
        """The next frame's header, validated; its body is the caller's to read, whole,
        with `read_into` before the next frame. `may_idle`: wait however long the peer
        stays silent before it."""
        recv_exact(self.stream, memoryview(self._header), may_idle=may_idle)
        frame = wire.parse_frame_header(bytes(self._header), self._recv_seq)
        self._recv_seq += 1
        self.bytes_received += wire.FRAME_HEADER_SIZE
        return frame

    def read_into(self, view: memoryview) -> None:
        """Read exactly len(view) bytes of the current frame's body into `view`."""
        recv_exact(self.stream, view)
        self.bytes_received += view.nbytes

    def read_into_parts(self, views: Sequence[memoryview]) -> None:
        """Read exactly the views' total size of the current frame's body into them, in
        order (one scattered read where the stream can)."""
        recv_parts(self.stream, views)
        self.bytes_received += sum(v.nbytes for v in views)

    @property
    def scatters(self) -> bool:
        """Whether `read_into_parts` reads many views in one system call."""
        return bool(getattr(self.stream, "scatters", False))

    def scratch(self, n: int) -> memoryview:
        """A reusable buffer of n bytes (at most a frame's cap), valid until the next call."""
        if n > len(self._body):
            self._body = bytearray(n)
        return memoryview(self._body)[:n]

    def receive(self, *, may_idle: bool = False) -> tuple[wire.FrameType, memoryview]:
        """The next frame: its type and a view of its body, valid until the next call."""
        frame = self.receive_frame(may_idle=may_idle)
        body = self.scratch(frame.length)
        self.read_into(body)
        return frame.type, body

    def expect(self, *types: wire.FrameType) -> tuple[wire.FrameType, memoryview]:
        """The next frame, which must be one of `types`; an ABORT raises its reason."""
        ftype, body = self.receive()
        if ftype is wire.FrameType.ABORT and wire.FrameType.ABORT not in types:
            reason = wire.parse_body(wire.Abort, body, "ABORT").reason
            raise RefusedError(f"the peer aborted: {reason}")
        if ftype not in types:
            names = " or ".join(t.name for t in types)
            raise ProtocolError(f"channel {self.index}: {ftype.name} frame, expected {names}")
        return ftype, body

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass
