"""A small synchronous client for the QEMU Machine Protocol (QMP) over a unix socket.

QMP (docs/interop/qmp-spec in QEMU's tree) is JSON objects, one per line, both ways: the
server greets with ``{"QMP": {...}}``, the client must send ``qmp_capabilities`` before
anything else, then every command gets exactly one ``{"return": ...}`` or
``{"error": {"class", "desc"}}`` answer carrying the command's ``id``; asynchronous
``{"event": ...}`` objects may arrive at any moment, between or before answers. This
client keeps those events in a queue for `wait_event()`.

No asyncio: the engine drives a guest from plain threads, and a throttling thread may
share one client, so every exchange holds a lock.
"""

from __future__ import annotations

import array
import collections
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import GuestError

#: cap on one QMP message: answers here are small (query-migrate, query-status)
MAX_MESSAGE = 16 * 1024 * 1024


class QMPError(GuestError):
    """The QMP connection failed or the server broke the protocol."""


class QMPTimeout(QMPError):
    """No answer or event came within the time given (the session is still usable)."""


class QMPCommandError(QMPError):
    """QEMU answered a command with an error object."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPClient:
    """One QMP session on a unix socket: connect, greeting, capabilities negotiation.

    `execute()` sends a command and returns its ``return`` value; events seen meanwhile
    are queued and handed out by `wait_event()` / `pop_events()`.
    """

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        # a stop/cont duty cycle makes two events per period: keep only the recent ones
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            greeting = self._read_message(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise QMPError(f"QMP {path}: expected a greeting, got {_short(greeting)}")
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.execute("qmp_capabilities")
        except OSError as exc:
            self._sock.close()
            raise QMPError(f"QMP {path}: cannot connect: {exc}") from exc
        except BaseException:
            self._sock.close()
            raise

    # --- commands -------------------------------------------------------------------

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        fds: list[int] | None = None,
    ) -> Any:
        """Run one command and return its ``return`` value; QMPCommandError on an error
        answer, QMPError when the connection fails or no answer comes within `timeout`.

        `fds` travel with the command as SCM_RIGHTS ancillary data (for ``getfd``)."""
        with self._lock:
            msg_id = f"p2v-{next(self._ids)}"
            request: dict[str, Any] = {"execute": command, "id": msg_id}
            if arguments:
                request["arguments"] = arguments
            self._send(request, fds)
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while True:
                message = self._read_message(deadline)
                if "event" in message:
                    self._events.append(message)
                    continue
                if message.get("id") != msg_id:
                    # an answer to nothing we sent: the session is out of step
                    raise QMPError(f"QMP {command}: unexpected message {_short(message)}")
                if "error" in message:
                    err = message["error"]
                    raise QMPCommandError(
                        command, str(err.get("class", "?")), str(err.get("desc", ""))
                    )
                if "return" not in message:
                    raise QMPError(f"QMP {command}: answer without return: {_short(message)}")
                return message["return"]

    # --- events ---------------------------------------------------------------------

    def wait_event(
        self,
        name: str,
        *,
        timeout: float | None = None,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """Return (and remove from the queue) the first event called `name` whose
        ``data`` satisfies `match`, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            while True:
                for event in list(self._events):
                    if event["event"] == name and (match is None or match(event.get("data", {}))):
                        self._events.remove(event)
                        return event
                message = self._read_message(deadline, waiting_for=f"event {name}")
                if "event" not in message:
                    raise QMPError(f"QMP: unexpected message {_short(message)}")
                self._events.append(message)

    def pop_events(self) -> list[dict[str, Any]]:
        """Every event queued so far (reading those already waiting on the socket)."""
        with self._lock:
            while True:
                try:
                    message = self._read_message(time.monotonic(), waiting_for="events")
                except QMPTimeout:
                    break
                self._events.append(message)
            events = list(self._events)
            self._events.clear()
            return events

    # --- plumbing -------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode() + b"\n"
        try:
            self._sock.settimeout(self.timeout)
            if fds:
                # the descriptors ride on the first byte; the rest follows plainly
                rights = array.array("i", fds).tobytes()
                sent = self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
                data = data[sent:]
            self._sock.sendall(data)
        except OSError as exc:
            raise QMPError(f"QMP {self.path}: send failed: {exc}") from exc

    def _read_message(self, deadline: float, waiting_for: str = "an answer") -> dict[str, Any]:
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                # a zero wait still drains what already arrived
                left = 0.0
            try:
                self._sock.settimeout(left if left > 0 else 0.0)
                chunk = self._sock.recv(65536)
            except (TimeoutError, BlockingIOError) as exc:
                raise QMPTimeout(f"QMP {self.path}: timed out waiting for {waiting_for}") from exc
            except OSError as exc:
                raise QMPError(f"QMP {self.path}: receive failed: {exc}") from exc
            if not chunk:
                raise QMPError(f"QMP {self.path}: QEMU closed the connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_MESSAGE:
                raise QMPError(f"QMP {self.path}: message over {MAX_MESSAGE} bytes")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QMPError(f"QMP {self.path}: not JSON: {line[:80]!r}") from exc
        if not isinstance(message, dict):
            raise QMPError(f"QMP {self.path}: expected an object, got {line[:80]!r}")
        return message


def _short(message: object) -> str:
    text = json.dumps(message)
    return text if len(text) <= 120 else text[:117] + "..."
