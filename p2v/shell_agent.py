"""The no-Python mode: the imaging agent's work done by the POSIX tools every Linux server
has, for servers with no usable Python (appliances, minimal installs, Python < 2.6).

`ShellConnection` answers the same calls as `protocol.AgentConnection` (HELLO, INVENTORY,
OPEN, READ, HASH, CLOSE), so `RemoteDisk`, clone, verify, resume and sync run unchanged on
top of it. Behind it, a few `sh` processes on the server (one SSH exec channel each) read
one command line per request and answer in order; requests are spread over them and many
are in flight at once, so the link stays full while each shell waits on its tools:

    READ   cmp -n LEN DISK /dev/zero OFF 0    all zero? answer `Z id`, nothing else crosses
           dd if=DISK bs skip count conv=sync the data: exactly LEN bytes, even on errors
           dd ... | sha256sum                 its digest, from a second read (page cache)
    HASH   the same zero test, then dd | sha256sum per chunk
    OPEN   test -b/-f, a one-sector dd (can it be opened?), blockdev/stat for the size
    INVENTORY  the /proc and /sys files the Python agent reads, dumped through od -tx1 and
           described here by the agent's own inventory code (agent.Host)

The unit of a request is UNIT (4 MiB): every request costs the shell a few forks, so it
must carry enough data to hide them. The controller hashes each block it receives and
compares it with the server's digest: a block that changed between the two reads (a hot
server) is read again, and a transfer that went wrong cannot pass unnoticed. Tools needed:
sh, dd, cmp, od, head and sha256sum (or md5sum); busybox's versions are enough.
Freezing and LVM snapshots need the Python agent and are refused here.
"""

from __future__ import annotations

import binascii
import collections
import concurrent.futures as cf
import contextlib
import hashlib
import logging
import re
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import agent as agent_code
from . import protocol
from .protocol import (
    DATA_ZERO,
    STATUS_ERROR,
    STATUS_INVALID,
    AgentError,
    AgentLost,
    AgentRequestError,
    ProcessStream,
    ReadResult,
    Stream,
    zero_digest,
)

__all__ = ["ProcessStream", "ShellAgentError", "ShellConnection", "start_shell_agent"]

log = logging.getLogger(__name__)

#: bytes per READ and HASH request: a request costs the shell 3-4 forks (~1 ms each)
UNIT = 4 << 20
#: shells on the server, each with its own channel: they run side by side
WORKERS = 4
#: a block whose two reads disagree this many times is taken as the controller received
#: it (a hot block; `p2v sync` brings it up to date like any block written after its copy)
READ_TRIES = 3
#: tools the shell mode needs besides sh (a hash tool is checked separately)
TOOLS = ("dd", "cmp", "od", "head")
HASH_TOOLS = ("sha256sum", "md5sum")
MAX_LINE = 1 << 16
MAX_DUMP = 16 << 20
RECV_SIZE = 1 << 20

#: defined once in every shell. Arguments come quoted from the controller; every answer
#: starts with a line naming its request, so a shell out of step is caught at once.
#: p2v_z, the zero test: GNU cmp seeks to its SKIP; busybox's reads its way there (76 s
#: to reach 3.9 GB of a disk), so there dd seeks and pipes the block into cmp
PRELUDE = r"""
p2v_uid() { while read -r k v rest; do if [ "$k" = Uid: ]; then echo "$v"; return; fi; done < /proc/self/status; }
P2V_HASH=
for t in sha256sum md5sum; do if command -v $t >/dev/null 2>&1; then P2V_HASH=$t; break; fi; done
p2v_missing=
for t in dd cmp od head; do command -v $t >/dev/null 2>&1 || p2v_missing="$p2v_missing $t"; done
case "$(cmp --version 2>/dev/null)" in *GNU*) P2V_SEEK=1;; *) P2V_SEEK=;; esac
p2v_z() {
  if [ -n "$P2V_SEEK" ]; then cmp -s -n "$7" "$2" /dev/zero "$6" 0 2>/dev/null
  else dd if="$2" bs="$5" skip="$3" count="$4" 2>/dev/null | cmp -s -n "$7" - /dev/zero; fi
}
p2v_r() {
  { :; } <"$2" 2>/dev/null || { printf 'X %s cannot open %s\n' "$1" "$2"; return; }
  if p2v_z "$@"; then printf 'Z %s\n' "$1"; return; fi
  printf 'D %s\n' "$1"
  if [ "$8" = 0 ]; then
    dd if="$2" bs="$5" skip="$3" count="$4" conv=noerror,sync 2>/dev/null; p2v_rc=$?
    p2v_h=$(dd if="$2" bs="$5" skip="$3" count="$4" 2>/dev/null | $P2V_HASH)
  else
    dd if="$2" bs="$5" skip="$3" count="$4" conv=noerror,sync 2>/dev/null | head -c "$8"; p2v_rc=$?
    p2v_h=$(dd if="$2" bs="$5" skip="$3" count="$4" 2>/dev/null | head -c "$8" | $P2V_HASH)
  fi
  printf '\nE %s %s %s\n' "$1" "$p2v_rc" "${p2v_h%% *}"
}
p2v_s() {
  { :; } <"$2" 2>/dev/null || { printf 'X %s cannot open %s\n' "$1" "$2"; return; }
  if p2v_z "$@"; then printf 'S %s Z\n' "$1"; return; fi
  if [ "$8" = 0 ]; then p2v_h=$(dd if="$2" bs="$5" skip="$3" count="$4" 2>/dev/null | $P2V_HASH)
  else p2v_h=$(dd if="$2" bs="$5" skip="$3" count="$4" 2>/dev/null | head -c "$8" | $P2V_HASH); fi
  printf 'S %s %s\n' "$1" "${p2v_h%% *}"
}
p2v_o() {
  if [ -b "$2" ]; then p2v_t=block; elif [ -f "$2" ]; then p2v_t=file
  elif [ -e "$2" ]; then printf 'O %s other\n' "$1"; return
  else printf 'O %s missing\n' "$1"; return; fi
  if ! p2v_e=$(dd if="$2" bs=512 count=1 of=/dev/null 2>&1); then
    printf 'O %s unreadable %s\n' "$1" "$(printf '%s' "$p2v_e" | head -n 1)"; return
  fi
  p2v_n=
  if [ $p2v_t = block ]; then
    p2v_n=$(blockdev --getsize64 "$2" 2>/dev/null)
    if [ -z "$p2v_n" ]; then
      p2v_b=$(readlink -f "$2"); read -r p2v_n < "/sys/class/block/${p2v_b##*/}/size"
      p2v_n=$((p2v_n * 512))
    fi
  else
    p2v_n=$(stat -L -c %s "$2" 2>/dev/null) || p2v_n=$(wc -c < "$2")
  fi
  printf 'O %s %s %s\n' "$1" "$p2v_t" "$p2v_n"
}
p2v_f() { printf '%s %s\n' "$1" "$2"; head -c 1048576 "$2" 2>/dev/null | od -An -v -tx1; printf '.\n'; }
p2v_i() {
  printf 'I %s\n' "$1"; shift
  for p in "$@"; do
    if [ -L "$p" ]; then printf 'K %s %s\n' "$p" "$(readlink "$p")"; fi
    if [ -d "$p" ]; then
      printf 'L %s\n' "$p"; for e in "$p"/*; do [ -e "$e" ] && printf '%s\n' "${e##*/}"; done; printf '.\n'
    elif [ -f "$p" ] && [ -r "$p" ]; then p2v_f F "$p"
    fi
  done
  printf 'A %s\n' "$(uname -m 2>/dev/null)"
  if command -v lsblk >/dev/null 2>&1; then
    lsblk -J -b -o NAME,PATH,SIZE,TYPE,FSTYPE,MOUNTPOINT,PTTYPE,PARTTYPE,UUID,PKNAME > /dev/null 2>&1 &&
      { printf 'J lsblk\n'; lsblk -J -b -o NAME,PATH,SIZE,TYPE,FSTYPE,MOUNTPOINT,PTTYPE,PARTTYPE,UUID,PKNAME 2>/dev/null | head -c 4194304 | od -An -v -tx1; printf '.\n'; }
  fi
  printf 'END\n'
}
p2v_u=$(p2v_uid 2>/dev/null)
printf 'HELLO %s %s%s\n' "${p2v_u:--}" "${P2V_HASH:--}" "$p2v_missing"
"""

#: what the inventory reads (agent.Host's paths), as shell globs
INVENTORY_PATHS = (
    "/proc/cpuinfo /proc/meminfo /proc/mounts /etc/os-release /usr/lib/os-release "
    "/proc/sys/kernel/hostname /proc/sys/kernel/osrelease /proc/sys/kernel/version "
    "/sys/devices/system/cpu/online /sys/devices/system/memory "
    "/sys/devices/system/memory/block_size_bytes /sys/firmware/dmi/entries "
    "/sys/firmware/dmi/entries/17-*/raw /sys/firmware/efi "
    "/sys/block /sys/block/* /sys/block/*/size /sys/block/*/removable "
    "/sys/block/*/serial /sys/block/*/queue/rotational /sys/block/*/queue/logical_block_size "
    "/sys/block/*/device/model /sys/block/*/device/vendor /sys/block/*/device/serial "
    "/sys/block/*/*/partition /sys/block/*/*/start /sys/block/*/*/size "
    "/sys/class/net /sys/class/net/*/address /sys/class/net/*/operstate "
    "/sys/class/net/*/mtu /sys/class/net/*/speed /sys/class/net/*/device "
    "/sys/class/net/*/device/driver"
)

_ID = re.compile(rb"^[0-9]+$")
_HEX = re.compile(rb"^[0-9a-f]+$")
_NAME = re.compile(r"^[^/\x00-\x1f]{1,255}$")


class ShellAgentError(AgentError):
    """The server cannot be imaged without Python (a tool is missing, sudo refused)."""


@dataclass
class _Request:
    kind: str  # "read", "hash", "open", "inventory"
    req_id: int
    future: cf.Future
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def caller(self) -> cf.Future:
        """The future the caller waits on: a READ's outlives its retries, a HASH's
        gathers its chunks."""
        return self.meta.get("outer") or self.future


def dd_geometry(offset: int, length: int, unit: int = UNIT) -> tuple[int, int, int, int]:
    """(bs, skip, count, cut) for dd to read [offset, offset + length): the largest power
    of two up to `unit` and `length` that divides the offset. A length it does not divide
    (the odd tail of a file) is read whole blocks and cut to `cut` bytes by head -c, rather
    than byte by byte (dd bs=1 took 20 s for 3 MiB)."""
    bs = 1
    while bs < unit and bs * 2 <= max(length, 1) and offset % (bs * 2) == 0:
        bs *= 2
    count = -(-length // bs)
    return bs, offset // bs, count, 0 if count * bs == length else length


class _Reader:
    """Lines and exact byte counts off one shell's stdout."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.pos = 0
        self.received = 0

    def _fill(self) -> None:
        if self.pos > RECV_SIZE:
            del self.buf[: self.pos]
            self.pos = 0
        chunk = self.stream.recv(RECV_SIZE)
        if not chunk:
            raise EOFError
        self.received += len(chunk)
        self.buf += chunk

    def readline(self) -> bytes:
        while True:
            end = self.buf.find(b"\n", self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos : end])
                self.pos = end + 1
                return line
            if len(self.buf) - self.pos > MAX_LINE:
                raise AgentError("the server's shell sent an overlong line")
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            self._fill()
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return data


class _Shell:
    """One `sh` on the server: requests go in as lines, answers come back in order."""

    def __init__(self, conn: ShellConnection, stream: Stream, index: int) -> None:
        self.conn = conn
        self.stream = stream
        self.index = index
        self.reader = _Reader(stream)
        self.pending: collections.deque[_Request] = collections.deque()
        self.lock = threading.Lock()  # the queue of pending requests
        self.send_lock = threading.Lock()  # the order of lines on the stream
        self.dead = False  # the receiver has stopped: nothing queued here would be answered
        self.hello: list[str] = []
        self.thread = threading.Thread(
            target=self._receive, name=f"p2v-shell-{index}-rx", daemon=True
        )

    def start(self) -> None:
        self.stream.sendall(PRELUDE.encode())
        # the greeting is read here, before the receiver takes over the stream
        try:
            line = self.reader.readline()
        except EOFError:
            raise AgentLost(
                f"{self.conn.name}: the shell ended before greeting{self.conn._diag(self)}"
            ) from None
        fields = line.decode("utf-8", "replace").split()
        if not fields or fields[0] != "HELLO":
            raise AgentError(f"{self.conn.name}: the shell greeted with {line[:80]!r}")
        self.hello = fields[1:]
        self.thread.start()

    def send(self, request: _Request, line: str) -> None:
        # the receiver takes only `lock`: a send blocked on a full channel never stops it
        with self.send_lock:
            with self.lock:
                if self.dead:
                    raise self.conn._failure or AgentLost(f"{self.conn.name}: shell ended")
                self.pending.append(request)
            try:
                self.stream.sendall(line.encode() + b"\n")
            except Exception as exc:
                raise AgentLost(f"{self.conn.name}: sending failed: {exc}") from exc

    @property
    def load(self) -> int:
        return len(self.pending)

    def _receive(self) -> None:
        current: _Request | None = None  # taken off the queue, its answer being read
        try:
            while True:
                line = self.reader.readline()
                with self.lock:
                    if not self.pending:
                        raise AgentError(f"{self.conn.name}: unexpected answer {line[:80]!r}")
                    current = self.pending.popleft()
                self._answer(current, line)
                current = None
        except EOFError:
            reason = "agent stopped" if self.conn.closed else "connection to the server was lost"
            self.conn._fail(AgentLost(f"{self.conn.name}: {reason}{self.conn._diag(self)}"))
        except AgentError as exc:
            self.conn._fail(exc)
        except Exception as exc:
            self.conn._fail(AgentLost(f"{self.conn.name}: connection lost: {exc}"))
        finally:
            self.conn.bytes_received_by[self.index] = self.reader.received
            # the request whose answer the stream cut, and any queued after _fail took
            # the queue (its send raced the end of the stream), fail here, not wait
            with self.lock:
                self.dead = True
                left = [*([current] if current is not None else []), *self.pending]
                self.pending.clear()
            failure = self.conn._failure or AgentLost(f"{self.conn.name}: shell ended")
            for request in left:
                _settle(request.future, exc=failure)
                _settle(request.caller, exc=failure)

    def _answer(self, request: _Request, line: bytes) -> None:
        fields = line.split(b" ", 2)
        tag = fields[0]
        if len(fields) < 2 or not _ID.match(fields[1]) or int(fields[1]) != request.req_id:
            raise AgentError(f"{self.conn.name}: answer {line[:80]!r} out of step")
        if tag == b"X":
            message = (fields[2] if len(fields) > 2 else b"").decode("utf-8", "replace")
            _settle(request.caller, exc=AgentRequestError(STATUS_ERROR, message))
        elif request.kind == "read" and tag in (b"Z", b"D"):
            self._read_answer(request, tag)
        elif request.kind == "hash" and tag == b"S":
            self.conn._hash_answer(request, fields[2] if len(fields) > 2 else b"")
        elif request.kind == "open" and tag == b"O":
            _settle(request.future, (fields[2] if len(fields) > 2 else b"").decode())
        elif request.kind == "inventory" and tag == b"I":
            _settle(request.future, self._dump())
        else:
            raise AgentError(f"{self.conn.name}: answer {line[:80]!r} to a {request.kind}")

    def _read_answer(self, request: _Request, tag: bytes) -> None:
        length = request.meta["length"]
        if tag == b"Z":
            zero = ReadResult(length, zero_digest(length), DATA_ZERO, b"")
            _settle(request.caller, zero)
            return
        data = self.reader.read_exact(length)
        trailer = self.reader.readline() + b"\n" + self.reader.readline()
        fields = trailer.split(b" ")
        if (
            len(fields) != 4
            or fields[0] != b"\nE"
            or fields[1] != str(request.req_id).encode()
            or not fields[2].isdigit()
        ):
            raise AgentError(f"{self.conn.name}: a read's data ended out of step")
        if int(fields[2]) != 0:
            error = AgentRequestError(
                STATUS_ERROR,
                f"{request.meta['path']}: read error at {request.meta['offset']:#x} "
                f"(dd exited with {int(fields[2])})",
            )
            _settle(request.caller, exc=error)
            return
        self.conn._check_read(request, data, fields[3])

    def _dump(self) -> dict[str, Any]:
        """The inventory dump: files (F), directory listings (L), links (K), facts."""
        files: dict[str, bytes] = {}
        dirs: dict[str, list[str]] = {}
        links: dict[str, str] = {}
        facts: dict[str, Any] = {}
        total = 0
        while True:
            line = self.reader.readline().decode("utf-8", "replace")
            if line == "END":
                return {"files": files, "dirs": dirs, "links": links, "facts": facts}
            tag, _, rest = line.partition(" ")
            if tag == "F" or tag == "J":
                hex_lines = []
                while True:
                    part = self.reader.readline()
                    if part == b".":
                        break
                    total += len(part)
                    if total > MAX_DUMP:
                        raise AgentError(f"{self.conn.name}: the inventory is too large")
                    hex_lines.append(part)
                try:
                    data = binascii.unhexlify(b"".join(b"".join(hex_lines).split()))
                except (binascii.Error, ValueError):
                    data = b""
                if tag == "F":
                    files[rest] = data
                else:
                    facts[rest] = data
            elif tag == "L":
                names = []
                while True:
                    part = self.reader.readline().decode("utf-8", "replace")
                    if part == ".":
                        break
                    if _NAME.match(part) and len(names) < 65536:
                        names.append(part)
                dirs[rest] = names
            elif tag == "K":
                path, _, target = rest.partition(" ")
                links[path] = target
            elif tag == "A":
                facts["machine"] = rest
            else:
                raise AgentError(f"{self.conn.name}: inventory line {line[:80]!r} out of step")


def _settle(fut: cf.Future, value: Any = None, *, exc: BaseException | None = None) -> None:
    with contextlib.suppress(cf.InvalidStateError):
        if fut.cancelled():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


class DumpedHost(agent_code.Host):
    """The server's files as the shell dumped them, for the agent's inventory code."""

    def __init__(self, dump: dict[str, Any], uid: int | None) -> None:
        self.files: dict[str, bytes] = dump["files"]
        self.dirs: dict[str, list[str]] = dump["dirs"]
        self.links: dict[str, str] = dump["links"]
        self.facts: dict[str, Any] = dump["facts"]
        self.uid = uid

    def read_bytes(self, path: str, limit: int = 1 << 20) -> bytes | None:
        data = self.files.get(path)
        return None if data is None else data[:limit]

    def listdir(self, path: str) -> list[str]:
        names = self.dirs.get(path)
        if names is None:
            raise OSError(2, "not in the inventory dump", path)
        return list(names)

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.dirs or path in self.links

    def isdir(self, path: str) -> bool:
        return path in self.dirs

    def readlink(self, path: str) -> str:
        target = self.links.get(path)
        if target is None:
            raise OSError(22, "not a link", path)
        return target

    def hostname(self) -> str:
        return self.read_text("/proc/sys/kernel/hostname") or "localhost"

    def uname(self) -> dict[str, Any]:
        return {
            "release": self.read_text("/proc/sys/kernel/osrelease"),
            "version": self.read_text("/proc/sys/kernel/version"),
            "machine": self.facts.get("machine") or None,
        }

    def cpu_count(self) -> int:
        """CPUs from /sys/devices/system/cpu/online ("0-3,6"), else cpuinfo's processors."""
        text = self.read_text("/sys/devices/system/cpu/online") or ""
        count = 0
        try:
            for part in text.split(","):
                first, _, last = part.partition("-")
                count += int(last or first) - int(first) + 1
        except ValueError:
            count = 0
        if 0 < count <= 1 << 16:
            return count
        cpuinfo = self.read_text("/proc/cpuinfo") or ""
        return sum(1 for line in cpuinfo.splitlines() if line.startswith("processor")) or 1

    def tool_json(self, argv: list[str]) -> Any:
        if argv[0] != "lsblk" or "lsblk" not in self.facts:
            return None  # ip -j addr: addresses are not needed to rebuild the machine
        import json

        try:
            return json.loads(self.facts["lsblk"])
        except ValueError:
            return None

    def python(self) -> None:
        return None


class ShellConnection:
    """The agent's calls answered by shells on a server without Python."""

    mode = "shell"
    mode_reason = ""
    block_size = UNIT

    def __init__(self, streams: list[Stream], *, name: str = "shell") -> None:
        self.name = name
        self.closed = False
        self._failure: AgentError | None = None
        self._lock = threading.Lock()
        self._next_id = 1
        self._handles: dict[int, tuple[str, int]] = {}
        self._next_handle = 1
        self.bytes_received_by = [0] * len(streams)
        self.shells = [_Shell(self, s, i) for i, s in enumerate(streams)]
        self.hello: dict[str, Any] = {}
        self.retried_reads = 0
        self.unverified_reads = 0

    # -- start ---------------------------------------------------------------------
    def start(self) -> None:
        for shell in self.shells:
            shell.start()
        fields = self.shells[0].hello
        if len(fields) < 2:
            raise AgentError(f"{self.name}: the shell's greeting {fields!r} is incomplete")
        uid_text, hash_tool, missing = fields[0], fields[1], fields[2:]
        if missing:
            raise ShellAgentError(
                f"{self.name}: no Python >= 2.6, and no {' or '.join(missing)} either: p2v "
                "needs one or the other on the server to read its disks (busybox's "
                "applets will do)"
            )
        if hash_tool not in HASH_TOOLS:
            raise ShellAgentError(
                f"{self.name}: no Python >= 2.6, and neither sha256sum nor md5sum to verify "
                "blocks with: install one of them (coreutils or busybox has both)"
            )
        self.hash_tool = hash_tool
        self._hash = hashlib.sha256 if hash_tool == "sha256sum" else hashlib.md5
        self.hello = {
            "version": protocol.VERSION,
            "python": None,
            "uid": int(uid_text) if uid_text.isdigit() else None,  # "-": no /proc
            "digest": "sha256",
            "hash_tool": hash_tool,
            "max_read": protocol.MAX_READ,
            "mode": "shell",
        }

    # -- the agent's calls ---------------------------------------------------------
    @property
    def failure(self) -> AgentError | None:
        return self._failure

    @property
    def bytes_received(self) -> int:
        return sum(s.reader.received for s in self.shells)

    def _new_id(self) -> int:
        with self._lock:
            if self._failure is not None:
                raise self._failure
            req_id = self._next_id
            self._next_id += 1
            return req_id

    def _submit(
        self,
        kind: str,
        words: list[Any],
        meta: dict[str, Any] | None = None,
        *,
        shell: _Shell | None = None,
        globs: str = "",
    ) -> cf.Future:
        """Queue a request on a shell (the least busy one unless named); its arguments are
        quoted, `globs` goes as it is (our constants, for the shell to expand). Whatever
        happens, the request's futures are settled: answered, or failed with the link."""
        request = _Request(kind, 0, cf.Future(), meta or {})
        try:
            request.req_id = self._new_id()
            target = shell or min(self.shells, key=lambda s: s.load)
            quoted = [shlex.quote(str(w)) for w in words[1:]]
            line = " ".join([words[0], str(request.req_id), *quoted, globs]).rstrip()
            target.send(request, line)
        except AgentError as exc:
            self._fail(exc)
            failure = self._failure or exc
            _settle(request.future, exc=failure)
            _settle(request.caller, exc=failure)
        return request.future

    def call(
        self, op: int, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        args = args or {}
        if op == protocol.OP_HELLO:
            return dict(self.hello)
        if op in (protocol.OP_INVENTORY, protocol.OP_DISKS):
            inv = self.inventory(timeout)
            return inv if op == protocol.OP_INVENTORY else inv["disks"]
        if op == protocol.OP_OPEN:
            return self._open(args.get("path"), timeout)
        if op == protocol.OP_BYE:
            return {}
        if op in (
            protocol.OP_FREEZE,
            protocol.OP_THAW,
            protocol.OP_SNAPSHOT,
            protocol.OP_DROP_SNAPSHOT,
        ):
            raise AgentRequestError(
                STATUS_INVALID, "freezing and LVM snapshots need the Python agent on the server"
            )
        raise AgentRequestError(STATUS_INVALID, f"unknown operation {op}")

    def inventory(self, timeout: float | None = None) -> dict[str, Any]:
        # the paths go unquoted: they are our constants, and the shell expands their globs
        future = self._submit("inventory", ["p2v_i"], shell=self.shells[0], globs=INVENTORY_PATHS)
        dump = future.result(timeout)
        host = DumpedHost(dump, self.hello.get("uid"))
        inv = agent_code.inventory(host)
        inv["agent"] = "shell"
        return inv

    def _open(self, path: Any, timeout: float | None) -> dict[str, Any]:
        if not isinstance(path, str) or not path or not _NAME.match(path.replace("/", "x")):
            raise AgentRequestError(STATUS_INVALID, "open: a path is required")
        answer = self._submit("open", ["p2v_o", path], shell=self.shells[0]).result(timeout)
        kind, _, rest = answer.partition(" ")
        if kind == "missing":
            raise AgentRequestError(STATUS_ERROR, f"{path}: No such file or directory")
        if kind == "other":
            raise AgentRequestError(STATUS_INVALID, f"{path}: neither a block device nor a file")
        if kind == "unreadable":
            # "Permission denied" is what clone's --sudo hint looks for
            denied = "PermissionError: " if "ermission denied" in rest else ""
            raise AgentRequestError(STATUS_ERROR, f"{denied}{path}: cannot be opened: {rest}")
        if kind not in ("block", "file") or not rest.strip().isdigit():
            raise AgentRequestError(STATUS_ERROR, f"{path}: size unknown ({answer[:80]})")
        size = int(rest)
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._handles[handle] = (path, size)
        return {"handle": handle, "size": size, "kind": kind, "path": path}

    def close_handle(self, handle: int) -> None:
        with self._lock:
            if self._handles.pop(handle, None) is None:
                raise AgentRequestError(STATUS_INVALID, f"no open device with handle {handle}")

    def _device(self, handle: int, offset: int, length: int) -> str:
        with self._lock:
            entry = self._handles.get(handle)
        if entry is None:
            raise AgentRequestError(STATUS_INVALID, f"no open device with handle {handle}")
        path, size = entry
        if offset < 0 or length < 0 or offset + length > size:
            raise AgentRequestError(
                STATUS_INVALID,
                f"{path}: range {offset:#x}+{length:#x} is outside the device ({size:#x} bytes)",
            )
        return path

    def read(self, handle: int, offset: int, length: int, *, compress: bool) -> cf.Future:
        """READ a range (compression is not available: the data crosses as it is)."""
        if length > protocol.MAX_READ:
            return _failed(
                AgentRequestError(
                    STATUS_INVALID, f"read: {length} bytes asked, at most {protocol.MAX_READ}"
                )
            )
        try:
            path = self._device(handle, offset, length)
        except AgentRequestError as exc:
            return _failed(exc)
        return self._read(path, offset, length, cf.Future(), 1)

    def _read(self, path: str, offset: int, length: int, outer: cf.Future, tries: int) -> Any:
        bs, skip, count, cut = dd_geometry(offset, length)
        meta = {"path": path, "offset": offset, "length": length, "tries": tries, "outer": outer}
        self._submit("read", ["p2v_r", path, skip, count, bs, offset, length, cut], meta)
        return outer

    def _check_read(self, request: _Request, data: bytes, server_hex: bytes) -> None:
        """Runs on a shell's receiver: the server's digest against the data received."""
        meta = request.meta
        outer: cf.Future = meta["outer"]
        ours = self._hash(data).digest()
        if not _HEX.match(server_hex) or binascii.unhexlify(server_hex) != ours:
            if meta["tries"] < READ_TRIES and self._failure is None:
                with self._lock:
                    self.retried_reads += 1
                self._read(meta["path"], meta["offset"], meta["length"], outer, meta["tries"] + 1)
                return
            with self._lock:
                self.unverified_reads += 1
            log.warning(
                "%s: the block at %#x changed while it was read %d times; taking the last "
                "read (p2v sync updates it)",
                meta["path"],
                meta["offset"],
                READ_TRIES,
            )
        digest = ours if self._hash is hashlib.sha256 else protocol.digest_of(data)
        _settle(outer, ReadResult(len(data), digest, 0, data))

    def hash(self, handle: int, offset: int, length: int, chunk: int) -> cf.Future:
        """HASH a range in chunks; the result is a list of sha256 digests (or md5 where
        the server has only md5sum: compare them with `digest_of`)."""
        if not protocol.MIN_HASH_CHUNK <= chunk <= protocol.MAX_HASH_CHUNK:
            return _failed(AgentRequestError(STATUS_INVALID, f"hash: chunk {chunk} out of range"))
        if -(-length // chunk) > protocol.MAX_HASH_CHUNKS:
            return _failed(AgentRequestError(STATUS_INVALID, "hash: too many chunks"))
        try:
            path = self._device(handle, offset, length)
        except AgentRequestError as exc:
            return _failed(exc)
        outer: cf.Future = cf.Future()
        starts = list(range(offset, offset + length, chunk))
        state = {"left": len(starts), "digests": [b""] * len(starts)}
        if not starts:
            outer.set_result([])
            return outer
        for i, pos in enumerate(starts):
            n = min(chunk, offset + length - pos)
            bs, skip, count, cut = dd_geometry(pos, n)
            meta = {"outer": outer, "index": i, "length": n, "state": state}
            self._submit("hash", ["p2v_s", path, skip, count, bs, pos, n, cut], meta)
        return outer

    def _hash_answer(self, request: _Request, value: bytes) -> None:
        meta = request.meta
        if value == b"Z":
            digest = self._zero(meta["length"])
        elif _HEX.match(value) and len(value) == 2 * self._hash().digest_size:
            digest = binascii.unhexlify(value)
        else:
            raise AgentError(f"{self.name}: a hash answer {value[:80]!r} is not a digest")
        state = meta["state"]
        with self._lock:
            state["digests"][meta["index"]] = digest
            state["left"] -= 1
            done = state["left"] == 0
        if done:
            _settle(meta["outer"], state["digests"])

    def _zero(self, n: int) -> bytes:
        return zero_digest(n) if self._hash is hashlib.sha256 else self._hash(bytes(n)).digest()

    def digest_of(self, data: bytes | memoryview) -> bytes:
        """The digest HASH answers in, computed here (sync compares with it)."""
        return self._hash(data).digest()

    # -- failure and shutdown ------------------------------------------------------
    def _diag(self, shell: _Shell) -> str:
        return protocol.diagnostics_suffix(shell.stream)

    def _fail(self, exc: AgentError) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = exc
            failure = self._failure
        for shell in self.shells:
            with shell.lock:
                pending = list(shell.pending)
                shell.pending.clear()
            for request in pending:
                _settle(request.future, exc=failure)
                _settle(request.caller, exc=failure)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for shell in self.shells:
            with contextlib.suppress(Exception):
                shell.stream.sendall(b"exit 0\n")
        for shell in self.shells:
            with contextlib.suppress(Exception):
                shell.stream.close()
        for shell in self.shells:
            if shell.thread.is_alive():
                shell.thread.join(timeout=5)

    def __enter__(self) -> ShellConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _failed(exc: BaseException) -> cf.Future:
    fut: cf.Future = cf.Future()
    fut.set_exception(exc)
    return fut


def start_shell_agent(
    open_stream: Callable[[], Stream], *, name: str, workers: int = WORKERS
) -> ShellConnection:
    """Start `workers` shells (each from `open_stream()`, a channel running `sh`) and
    greet them; a missing tool is a one-line ShellAgentError."""
    streams: list[Stream] = []
    try:
        for _ in range(workers):
            streams.append(open_stream())
        conn = ShellConnection(streams, name=name)
        conn.start()
    except BaseException:
        for s in streams:
            with contextlib.suppress(Exception):
                s.close()
        raise
    return conn
