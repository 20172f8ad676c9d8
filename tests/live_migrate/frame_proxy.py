"""A TCP proxy between source and receiver that reads the source's frames as it forwards
them, to damage one or to cut the connection at a chosen point of the protocol."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from live_migrate import wire

#: called with (frame type, frame index of that type, header, body); returns the bytes to
#: forward (header + body, possibly altered) or None to cut both directions now
Action = Callable[[wire.FrameType, int, bytes, bytearray], bytes | None]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


class FrameProxy:
    """Listens on 127.0.0.1; each connection is forwarded to `upstream`."""

    def __init__(self, upstream: tuple[str, int], action: Action) -> None:
        self.upstream = upstream
        self.action = action
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.seen: dict[wire.FrameType, int] = {}
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._socks += [client, server]
            threading.Thread(target=self._forward, args=(client, server), daemon=True).start()
            threading.Thread(target=self._back, args=(server, client), daemon=True).start()

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                header = _recv_exact(src, wire.FRAME_HEADER_SIZE)
                length = int.from_bytes(header[4:8], "big")
                body = bytearray(_recv_exact(src, length))
                ftype = wire.FrameType(header[2])
                with self._lock:
                    index = self.seen.get(ftype, 0)
                    self.seen[ftype] = index + 1
                out = self.action(ftype, index, header, body)
                if out is None:
                    self.close()
                    return
                dst.sendall(out)
        except (OSError, ConnectionError, ValueError):
            self._shut(dst)

    def _back(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data or self.cut.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        self._shut(dst)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.cut.set()
        for s in self._socks:
            self._shut(s)
        self.listener.close()


def forward(ftype: wire.FrameType, index: int, header: bytes, body: bytearray) -> bytes:
    return header + bytes(body)
