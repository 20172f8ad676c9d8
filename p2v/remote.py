"""A disk on the physical server as a read-only `formats.Image`.

Reads are cut at BLOCK boundaries and sent as READ requests all at once, so one CHUNK
of the conversion engine is 16 requests in flight; with the engine's workers that
keeps the SSH channel full (pipelining, as nbdcopy does over NBD). The agent answers
zero blocks with a flag instead of data, may zlib-compress the rest, and sends the
sha256 of every block it read: those digests are what `clone` verifies the written image
against and what its resume journal keeps.

Small reads (partition tables, superblocks, bitmaps while the filesystem maps are
computed) go through a little block cache so that scanning metadata costs few round
trips.
"""

from __future__ import annotations

import collections
import logging
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass

from formats.errors import FormatError
from formats.image import Image

from . import protocol
from .bandwidth import ThrottledStream, TokenBucket
from .protocol import AgentConnection, AgentError, Stream
from .shell_agent import ShellConnection, start_shell_agent
from .ssh import Session

log = logging.getLogger(__name__)

#: request and digest granularity: small enough that a sync resends little, large
#: enough that per-request work stays negligible
BLOCK = 256 << 10
#: the engine's chunk for a remote disk: its READs go out together, so a larger chunk
#: keeps more of them in flight (bench_clone --skip-unused: 11.4 s with the engine's
#: 2 MiB, 8.6 s with 4 MiB, 9.4 s with 8 MiB)
CHUNK = 4 << 20
CACHE_BLOCKS = 64

Recorder = Callable[[int, int, bytes], None]


class RemoteReadError(FormatError):
    """A read of the remote disk failed (the agent refused it or the link broke)."""


@dataclass
class WireStats:
    requested: int = 0  # bytes of disk asked for
    zero: int = 0  # of which the agent found all-zero (no payload sent)
    payload: int = 0  # bytes of payload that crossed the wire (compressed or not)


class RemoteDisk(Image):
    format = "remote"

    def __init__(
        self,
        conn: AgentConnection,
        path: str,
        handle: int,
        size: int,
        *,
        compress: bool = False,
    ) -> None:
        super().__init__(path, size, writable=False)
        self.conn = conn
        self.handle = handle
        self.compress = compress
        self.stats = WireStats()
        self._stats_lock = threading.Lock()
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        #: the agent's request and digest granularity (the shell mode's is larger)
        self.block: int = getattr(conn, "block_size", BLOCK)
        self._cache_blocks = max(4, CACHE_BLOCKS * BLOCK // self.block)
        #: called as recorder(offset, length, digest) for every block read, when set
        self.recorder: Recorder | None = None

    @classmethod
    def open(cls, conn: AgentConnection, path: str, *, compress: bool = False) -> RemoteDisk:
        try:
            info = conn.call(protocol.OP_OPEN, {"path": path})
        except AgentError as exc:
            raise RemoteReadError(f"{conn.name}: cannot open {path}: {exc}") from exc
        return cls(conn, path, int(info["handle"]), int(info["size"]), compress=compress)

    def files(self) -> list[str]:
        return []  # nothing local: never "the same file" as an output

    def actual_size(self) -> int:
        return self.size

    # -- reading ------------------------------------------------------------------
    def _readinto(self, offset: int, buf: memoryview) -> None:
        if len(buf) < self.block and self.recorder is None:
            self._cached_readinto(offset, buf)
            return
        end = offset + len(buf)
        pending = []
        pos = offset
        try:
            while pos < end:
                n = min(self.block - pos % self.block, end - pos)
                pending.append(
                    (pos, n, self.conn.read(self.handle, pos, n, compress=self.compress))
                )
                pos += n
            for pos, n, fut in pending:
                res = fut.result()
                res.data_into(buf[pos - offset : pos - offset + n])
                self._account(res)
                if self.recorder is not None:
                    self.recorder(pos, n, res.digest)
        except AgentError as exc:
            for _, _, fut in pending:
                fut.cancel()  # answers still to come are dropped by the receiver
            raise RemoteReadError(f"{self.path}: read at {offset:#x}: {exc}") from exc

    def _account(self, res: protocol.ReadResult) -> None:
        with self._stats_lock:
            self.stats.requested += res.length
            if res.is_zero:
                self.stats.zero += res.length
            self.stats.payload += len(res.payload)

    def _cached_readinto(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        first, last = offset // self.block, (end - 1) // self.block
        for index in range(first, last + 1):
            block = self._block(index)
            base = index * self.block
            s, e = max(offset, base), min(end, base + len(block))
            buf[s - offset : e - offset] = block[s - base : e - base]

    def _block(self, index: int) -> bytes:
        with self._cache_lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
                return data
        start = index * self.block
        n = min(self.block, self.size - start)
        try:
            res = self.conn.read(self.handle, start, n, compress=self.compress).result()
        except AgentError as exc:
            raise RemoteReadError(f"{self.path}: read at {start:#x}: {exc}") from exc
        out = bytearray(n)
        res.data_into(memoryview(out))
        self._account(res)
        data = bytes(out)
        with self._cache_lock:
            self._cache[index] = data
            while len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        return data

    def drop_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    # -- hashing ------------------------------------------------------------------
    def hashes(self, start: int, end: int, chunk: int | None = None) -> list[bytes]:
        """The digest of each `chunk` (default: the block) of [start, end), computed by the
        agent (start aligned); compare them with `digest_of`."""
        chunk = chunk or self.block
        span = chunk * 256
        futs = []
        pos = start
        try:
            while pos < end:
                n = min(span, end - pos)
                futs.append(self.conn.hash(self.handle, pos, n, chunk))
                pos += n
            out: list[bytes] = []
            for f in futs:
                out.extend(f.result())
            return out
        except AgentError as exc:
            for f in futs:
                f.cancel()
            raise RemoteReadError(f"{self.path}: hashing {start:#x}..{end:#x}: {exc}") from exc

    def _close(self) -> None:
        if self.conn.failure is None:
            try:
                self.conn.close_handle(self.handle)
            except AgentError:
                pass


#: interpreters tried, in order, when the user did not name one (RHEL 7 and SLES 12 have
#: python2.7 only; RHEL 6 python2.6)
PYTHONS = ("python3", "python2.7", "python2", "python2.6", "python")
#: prints the first of its arguments that runs the agent (Python >= 2.6), or nothing
PROBE = (
    'for p in "$@"; do if command -v "$p" >/dev/null 2>&1 && '
    "\"$p\" -c 'import sys; sys.exit(sys.version_info[:2] < (2, 6))' >/dev/null 2>&1; "
    'then echo "$p"; exit 0; fi; done'
)
MODES = ("auto", "python", "shell")

Agent = AgentConnection | ShellConnection


class AgentStartError(AgentError):
    """The server cannot run either agent, or sudo refused; the message says why."""


def choose_agent(session: Session, *, python: str = "python3", mode: str = "auto") -> tuple:
    """(mode, interpreter, reason): the Python agent where a Python >= 2.6 exists, else
    the shell mode (p2v/shell_agent.py). A `python` other than the default is used as
    named, without a probe; mode "python" or "shell" forces the choice."""
    if mode not in MODES:
        raise ValueError(f"agent mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "python":
        return "python", python, f"--agent python ({python})"
    if mode == "auto" and python != "python3":
        # named by the user: nothing to look for (and a sudo rule may allow only that
        # interpreter, not the shell the probe needs)
        return "python", python, f"--python {python}"
    if mode == "shell":
        return "shell", None, "--agent shell"
    candidates = PYTHONS
    argv = " ".join(shlex.quote(c) for c in candidates)
    res = session.run(f"sh -c {shlex.quote(PROBE)} p2v-probe {argv}", check=False, timeout=60)
    err = res.stderr.decode("utf-8", "replace").strip()
    if session.options.sudo and res.exit_status != 0 and "sudo" in err:
        if "not found" in err or res.exit_status == 127:
            raise AgentStartError(f"{session.name}: --sudo, but the server has no sudo ({err})")
        raise AgentStartError(
            f"{session.name}: {err.splitlines()[-1]}; --sudo needs passwordless sudo (a "
            f"NOPASSWD rule) for {session.options.user} on the server"
        )
    found = res.stdout.decode("utf-8", "replace").strip().splitlines()
    if found and found[0] in candidates:
        return "python", found[0], f"{found[0]} on the server runs the agent"
    return (
        "shell",
        None,
        f"no Python >= 2.6 on the server (looked for {', '.join(candidates)}): "
        "POSIX tools (dd, cmp, sha256sum) do the agent's work",
    )


def start_agent(
    session: Session,
    *,
    python: str = "python3",
    max_bandwidth: float | None = None,
    mode: str = "auto",
) -> Agent:
    """Start the imaging agent on the server behind `session` (through sudo if asked),
    taking at most `max_bandwidth` bytes a second off the channel. The connection's
    `mode` and `mode_reason` say which agent runs and why."""
    mode, interpreter, reason = choose_agent(session, python=python, mode=mode)
    bucket = TokenBucket(max_bandwidth) if max_bandwidth else None

    def throttled(stream: Stream) -> Stream:
        return ThrottledStream(stream, bucket) if bucket is not None else stream

    conn: Agent
    if mode == "shell":
        conn = start_shell_agent(
            lambda: throttled(session.open_exec_channel(session.wrap("exec sh"))),
            name=f"shell agent on {session.name}",
        )
    else:
        assert interpreter is not None
        source = protocol.agent_source()
        command = protocol.agent_command(len(source), python=interpreter, sudo=session.options.sudo)
        stream = throttled(session.open_exec_channel(command))
        conn = protocol.start_agent(stream, name=f"agent on {session.name}")
    conn.mode = mode
    conn.mode_reason = reason
    log.debug("%s: %s agent (%s)", session.name, mode, reason)  # the result says it too
    return conn
