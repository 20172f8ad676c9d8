"""The controller's side of the imaging agent's protocol (see p2v/agent.py for the wire).

`AgentConnection` sends requests from any thread and keeps many in flight on one stream;
a receiver thread matches responses to waiting callers by request id, so a remote disk's
reads are pipelined and the SSH channel stays full. Payloads are decompressed by the
caller, on the conversion engine's pool, never on the receiver thread.

The framing constants are declared here with construct and repeated, deliberately, in
the agent (which must stay one stdlib-only file); tests/p2v/test_protocol.py checks that
the two agree.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import os
import shlex
import subprocess
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from construct import Bytes, Const, Int8ub, Int32ub, Int64ub, Struct

log = logging.getLogger(__name__)

MAGIC = b"PV"
VERSION = 1

# Frame headers: a request carries its operation, a response its status.
RequestHeader = Struct(
    "magic" / Const(MAGIC),
    "op" / Int8ub,
    "flags" / Int8ub,
    "id" / Int32ub,
    "length" / Int32ub,
)
ResponseHeader = Struct(
    "magic" / Const(MAGIC),
    "status" / Int8ub,
    "flags" / Int8ub,
    "id" / Int32ub,
    "length" / Int32ub,
)
HEADER_SIZE = RequestHeader.sizeof()

ReadBody = Struct("handle" / Int32ub, "offset" / Int64ub, "length" / Int32ub)
HashBody = Struct("handle" / Int32ub, "offset" / Int64ub, "length" / Int64ub, "chunk" / Int32ub)
HandleBody = Struct("handle" / Int32ub)
Digest = Bytes(32)

OP_HELLO = 1
OP_INVENTORY = 2
OP_DISKS = 3
OP_OPEN = 4
OP_CLOSE = 5
OP_READ = 6
OP_HASH = 7
OP_FREEZE = 8
OP_THAW = 9
OP_SNAPSHOT = 10
OP_DROP_SNAPSHOT = 11
OP_BYE = 12

STATUS_OK = 0
STATUS_ERROR = 1
STATUS_INVALID = 2

READ_ZLIB = 1
DATA_ZLIB = 1
DATA_ZERO = 2

MAX_REQUEST_BODY = 1 << 20
MAX_READ = 8 << 20
MIN_HASH_CHUNK = 4096
MAX_HASH_CHUNK = 64 << 20
MAX_HASH_CHUNKS = 1 << 16
MAX_HASH_SPAN = 4 << 30
MAX_IN_FLIGHT = 64
DIGEST = "sha256"
DIGEST_SIZE = 32

#: below the agent's MAX_IN_FLIGHT, so the agent never stops reading while we wait on it
CLIENT_IN_FLIGHT = 48
#: the largest response we accept: a READ of MAX_READ plus its digest (zlib only shrinks)
MAX_RESPONSE_BODY = MAX_READ + DIGEST_SIZE + 4096
RECV_SIZE = 1 << 20


#: a response body as the receiver hands it over
Payload = bytes | memoryview
#: turns (status, flags, body) into a request's result
Decoder = Callable[[int, int, Payload], Any]


class AgentError(Exception):
    """Anything that went wrong talking to the agent."""


class AgentLost(AgentError):
    """The agent's stream ended (connection cut, agent died)."""


class AgentRequestError(AgentError):
    """The agent refused a request (status INVALID) or could not carry it out (ERROR)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def is_invalid(self) -> bool:
        return self.status == STATUS_INVALID


class Stream(Protocol):
    """A byte stream to a running agent: an SSH exec channel or a local pipe."""

    def sendall(self, data: bytes) -> None: ...

    def recv(self, n: int) -> bytes: ...

    def close(self) -> None: ...

    def diagnostics(self) -> str: ...


@dataclass(frozen=True)
class ReadResult:
    """One READ answer: the digest of the raw range and its payload (maybe compressed)."""

    length: int
    digest: bytes
    flags: int
    payload: Payload  # a view of what the stream received

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & DATA_ZERO)

    def data_into(self, buf: memoryview) -> None:
        """Decode into buf (len == length); zero ranges are filled with zeros."""
        if self.is_zero:
            buf[:] = _zeros(self.length)
            return
        data = _inflate(self.payload, self.length) if self.flags & DATA_ZLIB else self.payload
        if len(data) != self.length:
            raise AgentError(f"agent sent {len(data)} bytes for a read of {self.length}")
        buf[:] = data


def _inflate(payload: Payload, length: int) -> bytes:
    """A READ's zlib payload, which must decode to `length` bytes: a corrupt stream is an
    AgentError, and a bomb never makes more than length + 1 bytes (found by fuzzing)."""
    z = zlib.decompressobj()
    try:
        data = z.decompress(payload, length + 1)
    except zlib.error as exc:
        raise AgentError(f"agent sent corrupt zlib data for a read of {length}: {exc}") from None
    if len(data) > length or not z.eof or z.unused_data:
        raise AgentError(f"agent's zlib data for a read of {length} bytes does not end there")
    return data


_ZERO_BYTES: dict[int, memoryview] = {}


def _zeros(n: int) -> memoryview:
    """Zeros to copy from: kept, because a fresh large bytes() is an mmap and page faults."""
    z = _ZERO_BYTES.get(n)
    if z is None:
        z = memoryview(bytes(n))
        if len(_ZERO_BYTES) < 16:
            _ZERO_BYTES[n] = z
    return z


def agent_source() -> bytes:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent.py"), "rb") as f:
        return f.read()


def agent_command(source_length: int, *, python: str = "python3", sudo: bool = False) -> str:
    """The remote command line that starts the agent from the channel.

    `python3 -` would read its program up to end-of-file, which would close the very
    stream the protocol needs; so a one-line loader reads exactly the agent's length from
    stdin and runs it. Nothing is written to the server's disks and no secret is on this
    line (it shows in the server's process list).
    """
    # the same line for Python 2 and 3: no stdin.buffer in 2, and exec is a statement
    # there, while eval runs a code object compiled for 'exec' under both
    loader = (
        "import sys;"
        f"eval(compile(getattr(sys.stdin,'buffer',sys.stdin).read({int(source_length)}),"
        "'p2v-agent','exec'),{'__name__':'__main__'})"
    )
    argv = [python, "-c", loader]
    if sudo:
        argv = ["sudo", "-n", "--", *argv]
    return " ".join(shlex.quote(a) for a in argv)


def diagnostics_suffix(stream: Any) -> str:
    """What a failing stream can tell about why (the remote's stderr, its exit status), as
    " (...)" to append to an error line, or "" when it says nothing."""
    try:
        text = stream.diagnostics()
    except Exception:
        return ""
    return f" ({text})" if text else ""


class _Receiver:
    """Whole frames from a stream, each byte copied at most once: what `recv` returns is
    kept and sliced, and only a frame spread over several of them is joined. (Joining
    every read with what was left over, then copying the rest back, copied a READ's
    payload two or three times: 0.2 s of CPU per GiB under the GIL, and as many fresh
    megabyte-sized objects, each a page fault per page.)"""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.have = 0

    def read_exact(self, n: int) -> bytes | memoryview | None:
        """n bytes, or None if the stream ends first. A memoryview when they lie in one
        received piece (it keeps that piece alive: decoders copy what they keep)."""
        if n == 0:
            return b""
        while self.have < n:
            chunk = self.stream.recv(max(RECV_SIZE, n - self.have))
            if not chunk:
                return None
            self.chunks.append(memoryview(chunk))
            self.have += len(chunk)
        self.have -= n
        first = self.chunks[0]
        if len(first) >= n:
            if len(first) == n:
                self.chunks.popleft()
            else:
                self.chunks[0] = first[n:]
            return first[:n]
        parts = []
        while n:
            piece = self.chunks.popleft()
            if len(piece) > n:
                self.chunks.appendleft(piece[n:])
                piece = piece[:n]
            parts.append(piece)
            n -= len(piece)
        return b"".join(parts)


class AgentConnection:
    """Requests to one agent; thread-safe; many requests in flight."""

    #: which agent answers and why (p2v/remote.py sets them; shell_agent is the other)
    mode = "python"
    mode_reason = ""

    def __init__(self, stream: Stream, *, name: str = "agent") -> None:
        self.stream = stream
        self.name = name
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[cf.Future, Decoder]] = {}
        self._next_id = 1
        self._slots = threading.BoundedSemaphore(CLIENT_IN_FLIGHT)
        self._closed = False
        self._failure: AgentError | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.hello: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._receive, name=f"p2v-{name}-rx", daemon=True)
        self._thread.start()

    # -- sending ------------------------------------------------------------------
    def submit(self, op: int, body: bytes, *, flags: int = 0, decode: Decoder) -> cf.Future:
        if len(body) > MAX_REQUEST_BODY:
            raise AgentError(f"request body of {len(body)} bytes is too large")
        self._slots.acquire()
        fut: cf.Future = cf.Future()
        with self._lock:
            if self._failure is not None:
                self._slots.release()
                raise self._failure
            req_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
            self._pending[req_id] = (fut, decode)
        head = RequestHeader.build({"op": op, "flags": flags, "id": req_id, "length": len(body)})
        try:
            with self._send_lock:
                self.stream.sendall(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    self.stream.sendall(body)
                self.bytes_sent += len(head) + len(body)
        except Exception as exc:
            self._fail(AgentLost(f"{self.name}: sending failed: {exc}{self._diag()}"))
        return fut

    def call(
        self, op: int, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """A control request: JSON in, JSON out."""
        body = json.dumps(args or {}).encode()
        return self.submit(op, body, decode=_decode_json).result(timeout)

    def read(self, handle: int, offset: int, length: int, *, compress: bool) -> cf.Future:
        """READ a range; the future's result is a ReadResult."""
        body = ReadBody.build({"handle": handle, "offset": offset, "length": length})

        def decode(status: int, flags: int, payload: Payload) -> ReadResult:
            _raise_for(status, payload)
            if len(payload) < DIGEST_SIZE:
                raise AgentError("agent sent a read answer without its digest")
            # the digest outlives the answer (the verify pass): a copy, not a view that
            # would keep the whole received piece alive
            digest = bytes(payload[:DIGEST_SIZE])
            return ReadResult(length, digest, flags, payload[DIGEST_SIZE:])

        return self.submit(OP_READ, body, flags=READ_ZLIB if compress else 0, decode=decode)

    def hash(self, handle: int, offset: int, length: int, chunk: int) -> cf.Future:
        """HASH a range in chunks; the future's result is a list of digests."""
        body = HashBody.build(
            {"handle": handle, "offset": offset, "length": length, "chunk": chunk}
        )
        expected = -(-length // chunk)

        def decode(status: int, flags: int, payload: Payload) -> list[bytes]:
            _raise_for(status, payload)
            payload = bytes(payload)
            if len(payload) != expected * DIGEST_SIZE:
                raise AgentError(f"agent sent {len(payload)} bytes of digests, not {expected}")
            return [payload[i : i + DIGEST_SIZE] for i in range(0, len(payload), DIGEST_SIZE)]

        return self.submit(OP_HASH, body, decode=decode)

    def close_handle(self, handle: int) -> None:
        self.submit(OP_CLOSE, HandleBody.build({"handle": handle}), decode=_decode_empty).result()

    # -- receiving ----------------------------------------------------------------
    def _receive(self) -> None:
        rx = _Receiver(self.stream)
        try:
            while True:
                head = rx.read_exact(HEADER_SIZE)
                if head is None:
                    break
                try:
                    head = bytes(head)
                    hdr = ResponseHeader.parse(head)
                except Exception as exc:
                    raise AgentError(f"{self.name}: garbled response header {head!r}") from exc
                if hdr.length > MAX_RESPONSE_BODY:
                    raise AgentError(f"{self.name}: response of {hdr.length} bytes is too large")
                body = rx.read_exact(hdr.length) if hdr.length else b""
                if body is None:
                    break
                self.bytes_received += HEADER_SIZE + hdr.length
                with self._lock:
                    entry = self._pending.pop(hdr.id, None)
                if entry is None:
                    raise AgentError(f"{self.name}: response to unknown request {hdr.id}")
                self._slots.release()
                fut, decode = entry
                if fut.cancelled():
                    continue  # the caller gave up on it; the answer is dropped
                try:
                    value = decode(hdr.status, hdr.flags, body)
                except Exception as exc:
                    with contextlib.suppress(cf.InvalidStateError):
                        fut.set_exception(exc)
                    continue
                with contextlib.suppress(cf.InvalidStateError):
                    fut.set_result(value)
        except AgentError as exc:
            self._fail(exc)
            return
        except Exception as exc:
            self._fail(AgentLost(f"{self.name}: connection lost: {exc}{self._diag()}"))
            return
        reason = "agent stopped" if self._closed else "connection to the agent was lost"
        self._fail(AgentLost(f"{self.name}: {reason}{self._diag()}"))

    def _diag(self) -> str:
        return diagnostics_suffix(self.stream)

    def _fail(self, exc: AgentError) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = exc
            pending = list(self._pending.values())
            self._pending.clear()
        for fut, _ in pending:
            self._slots.release()
            with contextlib.suppress(cf.InvalidStateError):
                fut.set_exception(self._failure)

    @property
    def failure(self) -> AgentError | None:
        return self._failure

    def close(self) -> None:
        """Say goodbye (the agent thaws, drops snapshots, exits) and close the stream."""
        if self._closed:
            return
        self._closed = True
        if self._failure is None:
            try:
                self.call(OP_BYE, timeout=10)
            except (AgentError, cf.TimeoutError):
                pass
        try:
            self.stream.close()
        finally:
            self._thread.join(timeout=5)

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_for(status: int, payload: Payload) -> None:
    if status != STATUS_OK:
        raise AgentRequestError(status, bytes(payload).decode("utf-8", "replace"))


def _decode_json(status: int, flags: int, payload: Payload) -> Any:
    _raise_for(status, payload)
    try:
        return json.loads(bytes(payload))
    except ValueError as exc:
        raise AgentError("agent sent a control answer that is not JSON") from exc


def _decode_empty(status: int, flags: int, payload: Payload) -> None:
    _raise_for(status, payload)


def start_agent(stream: Stream, *, name: str = "agent") -> AgentConnection:
    """Send the agent's source down a stream whose remote end runs `agent_command()`,
    then greet it. The stream must have been opened with agent_command(len(source))."""
    source = agent_source()
    try:
        stream.sendall(source)
    except Exception as exc:
        raise AgentLost(f"{name}: could not send the agent: {exc}") from exc
    conn = AgentConnection(stream, name=name)
    try:
        hello = conn.call(OP_HELLO, timeout=60)
    except AgentError:
        conn.close()
        raise
    except cf.TimeoutError as exc:
        conn.close()
        raise AgentLost(f"{name}: the agent did not answer{conn._diag()}") from exc
    if hello.get("version") != VERSION:
        conn.close()
        raise AgentError(f"{name}: agent speaks version {hello.get('version')}, not {VERSION}")
    conn.hello = hello
    return conn


class ProcessStream:
    """A local child process as a stream (`argv`): for tests, and for imaging this very
    machine (PipeStream below runs the agent; the shell mode runs a plain `sh`)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._stderr = b""
        self._err_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_thread.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr = (self._stderr + line)[-4096:]

    def sendall(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def recv(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        return self.proc.stdout.read1(n)

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def diagnostics(self) -> str:
        status = self.proc.poll()
        text = self._stderr.decode("utf-8", "replace").strip().splitlines()
        parts = []
        if status is not None:
            parts.append(f"agent exited with status {status}")
        if text:
            parts.append(text[-1])
        return "; ".join(parts)


class PipeStream(ProcessStream):
    """A local agent in a child process: for tests, and for imaging this very machine."""

    def __init__(self, python: str = "python3", *, sudo: bool = False) -> None:
        cmd = agent_command(len(agent_source()), python=python, sudo=sudo)
        super().__init__(["/bin/sh", "-c", cmd])


def digest_of(data: bytes | memoryview) -> bytes:
    """The agent's digest of a range, computed locally (for verify and sync)."""
    return hashlib.new(DIGEST, data).digest()


_ZERO_DIGESTS: dict[int, bytes] = {}


def zero_digest(n: int) -> bytes:
    """The digest of n zero bytes, kept for the few lengths blocks have."""
    d = _ZERO_DIGESTS.get(n)
    if d is None:
        d = digest_of(_zeros(n))
        if len(_ZERO_DIGESTS) < 64:
            _ZERO_DIGESTS[n] = d
    return d
