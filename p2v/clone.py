"""Clone a running server's disks, verify them, resume a broken clone, sync it later.

    clone(connect_options, outdir, CloneOptions) -> CloneResult
    sync(connect_options, outdir, SyncOptions) -> SyncResult

A clone writes OUTDIR/NAME.EXT.partial through the ordinary conversion engine, reading
the remote disk (p2v/remote.py). Every block the agent reads comes with its sha256.
The engine is told the target is sequential so it stores chunks in disk order: whatever
lies below the last write is complete, and that high-water mark, with the digests below
it, is appended to OUTDIR/NAME.EXT.journal after the image is flushed. A broken
connection therefore loses nothing: the same command resumes from the journal and reads
only what lies above the mark. After the copy, the written image is read back and each
block's hash compared with the agent's (a mismatch is an error); then it is renamed.

`sync` re-hashes the server's disks on the server, hashes the images here, and sends only
the blocks that differ: the hot clone stays online, the short sync happens at cut-over
(VMware Converter's and AWS MGN's synchronisation, INTEROP.md).
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import contextlib
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import formats
from formats.convert import convert_image
from formats.errors import FormatError
from formats.extents import Extent, Kind
from formats.image import Image

from . import inventory, protocol
from .protocol import AgentConnection, AgentError
from .remote import BLOCK, CHUNK, RemoteDisk, RemoteReadError, start_agent
from .ssh import ConnectOptions, connect

log = logging.getLogger(__name__)

STATE_FILE = "p2v-clone.json"
JOURNAL_SUFFIX = ".journal"
PARTIAL_SUFFIX = ".partial"
#: how often the journal records progress while the copy runs: each record costs an
#: image flush that stalls the pipeline. An interrupted connection commits at once
#: anyway; only a crash of p2v itself loses up to this much work
COMMIT_SECONDS = 30.0
#: the engine's readers: mostly waiting on the network, so more than the cores
DEFAULT_WORKERS = 6
VERIFY_RUN = 8 << 20
#: blocks a sync fetches at once (16 MiB)
RESEND_BATCH = 64
#: a sync compares this much at a time: remote and local hashing run side by side
SYNC_WINDOW = 1 << 30

EXTENSIONS = {
    "qcow2": "qcow2",
    "raw": "raw",
    "vmdk": "vmdk",
    "vpc": "vhd",
    "vhdx": "vhdx",
    "vdi": "vdi",
}

#: progress_factory(disk label, total bytes) -> context manager yielding a (done, total)
#: callback or None
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager]


class CloneError(Exception):
    """A clone or sync that cannot go on; the message says what to do."""


class CloneInterrupted(CloneError):
    """The copy stopped part-way; its work is journaled and a rerun resumes it."""


class VerifyError(CloneError):
    pass


@dataclass
class CloneOptions:
    out_format: str = "qcow2"
    options: dict[str, Any] = field(default_factory=dict)
    disks: list[str] | None = None  # None: every fixed disk in the inventory
    skip_unused: bool = False
    compress: bool = True
    target: str | None = None
    convert_guest: bool = True  # with a target: convert the guest on the images for it
    verify: bool = True
    snapshot: bool = False  # clone LVM volumes from a snapshot when there is room
    workers: int = DEFAULT_WORKERS
    python: str = "python3"
    max_bandwidth: float | None = None  # bytes/s taken off the link (None: all it gives)
    agent: str = "auto"  # "python", "shell" (no Python on the server), or chosen by probing


@dataclass
class DiskResult:
    source: str
    image: str
    format: str
    size: int
    bytes_planned: int = 0  # bytes of the disk this run had to copy
    bytes_read: int = 0  # bytes of the disk read by the agent this run
    bytes_zero: int = 0  # of which all-zero (only a flag crossed the wire)
    bytes_wire: int = 0  # protocol bytes received for this disk (payload, digests, headers)
    bytes_written: int = 0
    resumed_from: int = 0  # high-water mark found in the journal (0: fresh copy)
    used_bytes: int | None = None  # with --skip-unused: bytes the filesystems use
    verified_blocks: int = 0
    verified: bool | None = None
    seconds: float = 0.0
    snapshot: str | None = None
    skipped: bool = False  # complete from an earlier run


@dataclass
class CloneResult:
    host: str
    outdir: str
    machine: str
    disks: list[DiskResult]
    definition: Any = None
    definition_error: str | None = None
    conversion: Any = None  # drivers.guest.Conversion
    seconds: float = 0.0
    agent: str = ""  # the agent that ran: "python" or "shell"
    agent_reason: str = ""  # why that one


@dataclass
class SyncOptions:
    workers: int = 4
    compress: bool = True
    python: str = "python3"
    disks: list[str] | None = None
    max_bandwidth: float | None = None
    agent: str = "auto"


@dataclass
class DiskSync:
    source: str
    image: str
    blocks: int = 0
    changed_blocks: int = 0
    bytes_sent: int = 0
    bytes_wire: int = 0
    seconds: float = 0.0


@dataclass
class SyncResult:
    host: str
    outdir: str
    disks: list[DiskSync]
    seconds: float = 0.0
    agent: str = ""
    agent_reason: str = ""


# -- the state of an OUTDIR --------------------------------------------------------------


def _load_state(outdir: str) -> dict[str, Any] | None:
    path = os.path.join(outdir, STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise CloneError(f"{path}: unreadable clone state: {exc}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("disks"), list):
        raise CloneError(f"{path}: not a p2v clone state file")
    return state


def _save_state(outdir: str, state: dict[str, Any]) -> None:
    path = os.path.join(outdir, STATE_FILE)
    tmp = path + PARTIAL_SUFFIX
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _host_id(options: ConnectOptions) -> str:
    return f"{options.user}@{options.host}:{options.port}"


def image_name(source: str, taken: set[str], ext: str) -> str:
    base = os.path.basename(source.rstrip("/")) or "disk"
    base = re.sub(r"\.(raw|img|qcow2|vmdk|vhdx?|vdi)$", "", base)
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "disk"
    name, i = f"{base}.{ext}", 1
    while name in taken:
        i += 1
        name = f"{base}-{i}.{ext}"
    return name


# -- the journal ---------------------------------------------------------------------------


class Journal:
    """Append-only JSON lines: a header, then records
    {"hwm": bytes, "digests": [[off, n, hex]], "zeros": [[off, n]]}: the agent's digest of
    each data block, and runs of blocks it found all-zero (kept as ranges, so a mostly
    empty terabyte disk does not cost millions of records).

    A record is appended only after the image was flushed, so everything below its
    high-water mark is on disk; a torn last line (a crash while appending) is ignored.
    """

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self.path = path
        self.header = header
        self.hwm = 0
        self.digests: list[tuple[int, int, bytes]] = []
        self.zeros: list[tuple[int, int]] = []

    @classmethod
    def create(cls, path: str, header: dict[str, Any]) -> Journal:
        with open(path, "w") as f:
            f.write(json.dumps({"header": header}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return cls(path, header)

    @classmethod
    def load(cls, path: str, header: dict[str, Any]) -> Journal | None:
        """The journal at `path` if it belongs to the same copy (same source, size, format,
        plan), else None."""
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        if not lines:
            return None
        try:
            first = json.loads(lines[0])
        except ValueError:
            return None
        if first.get("header") != header:
            return None
        journal = cls(path, header)
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                hwm = int(rec["hwm"])
                digests = [(int(o), int(n), bytes.fromhex(h)) for o, n, h in rec["digests"]]
                zeros = [(int(o), int(n)) for o, n in rec.get("zeros", [])]
            except (ValueError, KeyError, TypeError):
                break  # a torn tail: what came before stands
            journal.hwm = max(journal.hwm, hwm)
            journal.digests.extend(digests)
            journal.zeros = merge_ranges(journal.zeros + zeros)
        return journal

    def append(
        self, hwm: int, digests: list[tuple[int, int, bytes]], zeros: list[tuple[int, int]]
    ) -> None:
        line = json.dumps(
            {
                "hwm": hwm,
                "digests": [[o, n, d.hex()] for o, n, d in digests],
                "zeros": [[o, n] for o, n in zeros],
            }
        )
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.hwm = hwm
        self.digests.extend(digests)
        self.zeros = merge_ranges(self.zeros + zeros)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, with touching ones joined."""
    out: list[tuple[int, int]] = []
    for o, n in sorted(ranges):
        if out and o <= out[-1][0] + out[-1][1]:
            last_o, last_n = out[-1]
            out[-1] = (last_o, max(last_n, o + n - last_o))
        else:
            out.append((o, n))
    return out


class _OrderedTarget(Image):
    """The real target seen by the engine as sequential: chunks arrive in disk order, so
    the end of the last write is a high-water mark below which everything is stored."""

    is_sequential = True

    def __init__(self, dst: Image, start: int, on_write: Callable[[], None]) -> None:
        super().__init__(dst.path, dst.size, writable=True)
        self.dst = dst
        self.cluster_size = dst.cluster_size
        self.zero_grain = dst.zero_grain
        self.hwm = start
        self.written = 0
        self._on_write = on_write

    def encode(self, offset: int, data: bytes) -> Any:
        return len(data), self.dst.encode(offset, data)

    def write_encoded(self, offset: int, encoded: Any) -> None:
        n, inner = encoded
        self.hwm = max(self.hwm, offset)
        self.dst.write_encoded(offset, inner)
        self.hwm = offset + n
        self.written += n
        self._on_write()

    def _write(self, offset: int, data: memoryview) -> None:
        self.dst.write(offset, data)

    def _write_zeroes(self, offset: int, n: int) -> None:
        self.dst.write_zeroes(offset, n)

    def flush(self) -> None:
        self.dst.flush()

    def _close(self) -> None:
        pass  # the caller closes the real target


class _Copier:
    """One disk's copy: plan, journal, engine, commit."""

    def __init__(self, disk: RemoteDisk, dst: Image, journal: Journal | None) -> None:
        self.disk = disk
        self.dst = dst
        self.journal = journal
        self.lock = threading.Lock()
        self.pending: list[tuple[int, int, bytes]] = []
        self.start = journal.hwm if journal else 0
        self.target = _OrderedTarget(dst, self.start, self._maybe_commit)
        self.last_commit = time.monotonic()
        self.all_digests: list[tuple[int, int, bytes]] = list(journal.digests) if journal else []
        self.all_zeros: list[tuple[int, int]] = list(journal.zeros) if journal else []

    def record(self, offset: int, length: int, digest: bytes) -> None:
        with self.lock:
            self.pending.append((offset, length, digest))

    def _maybe_commit(self) -> None:
        if self.journal is not None and time.monotonic() - self.last_commit >= COMMIT_SECONDS:
            self.commit(self.target.hwm)

    def commit(self, hwm: int) -> None:
        with self.lock:
            done = [d for d in self.pending if d[0] + d[1] <= hwm]
            self.pending = [d for d in self.pending if d[0] + d[1] > hwm]
        digests = sorted(d for d in done if d[2] != _zero_digest(d[1]))
        zeros = merge_ranges((d[0], d[1]) for d in done if d[2] == _zero_digest(d[1]))
        self.all_digests.extend(digests)
        self.all_zeros = merge_ranges(self.all_zeros + zeros)
        if self.journal is not None:
            self.dst.flush()
            self.journal.append(hwm, digests, zeros)
        self.last_commit = time.monotonic()

    def run(self, plan: list[Extent], progress, workers: int) -> Any:
        self.disk.recorder = self.record
        try:
            stats = convert_image(
                self.disk, self.target, progress=progress, workers=workers, only=plan, chunk=CHUNK
            )
        except BaseException:
            # what was stored before the failure is kept for the next run
            if self.journal is not None:
                with contextlib.suppress(Exception):
                    self.commit(self.target.hwm)
            raise
        finally:
            self.disk.recorder = None
        self.commit(self.disk.size)
        return stats


def _plan(disk: RemoteDisk, skip_unused: bool) -> tuple[list[Extent], int | None]:
    """What to copy: the filesystems' used blocks, or the whole disk."""
    if not skip_unused:
        return [Extent(0, disk.size, Kind.DATA)], None
    from formats.disk import used_extents

    extents = used_extents(disk)
    disk.drop_cache()
    used = sum(e.length for e in extents if e.kind == Kind.DATA)
    return extents, used


def _above(plan: Iterable[Extent], start: int, size: int) -> list[Extent]:
    """The plan restricted to [start, size), the rest marked ZERO (already done)."""
    out = [Extent(0, start, Kind.ZERO)] if start else []
    for e in plan:
        if e.end <= start:
            continue
        s = max(e.start, start)
        out.append(Extent(s, e.end - s, e.kind))
    return [e for e in out if e.length > 0] or [Extent(0, size, Kind.ZERO)]


def _planned_bytes(plan: Iterable[Extent]) -> int:
    return sum(e.length for e in plan if e.kind == Kind.DATA)


def _zero_stale(dst: Image, start: int) -> None:
    """Whatever an interrupted run wrote above the journal's mark is not vouched for:
    clear it, so regions that now read as zero on the server are zero here too."""
    for e in list(dst.extents(start, dst.size)):
        if e.kind == Kind.DATA:
            dst.write_zeroes(e.start, e.length)


# -- verification --------------------------------------------------------------------------


def _runs(digests: list[tuple[int, int, bytes]]) -> Iterator[list[tuple[int, int, bytes]]]:
    """Group digests of adjacent ranges into runs of at most VERIFY_RUN bytes."""
    run: list[tuple[int, int, bytes]] = []
    for d in sorted(digests):
        if run and (d[0] != run[-1][0] + run[-1][1] or d[0] + d[1] - run[0][0] > VERIFY_RUN):
            yield run
            run = []
        run.append(d)
    if run:
        yield run


def is_zero(data: memoryview) -> bool:
    n = len(data)
    arr = np.frombuffer(data, dtype=np.uint64 if n % 8 == 0 else np.uint8)
    return not arr.any()


def local_digest(data: memoryview) -> bytes:
    """The agent's digest of a range, computed here (zeros need no hashing)."""
    if is_zero(data):
        return _zero_digest(len(data))
    return protocol.digest_of(data)


_zero_digest = protocol.zero_digest


def verify_image(
    img: Image,
    digests: list[tuple[int, int, bytes]],
    zeros: list[tuple[int, int]] = (),  # type: ignore[assignment]
    *,
    workers: int = 2,
) -> tuple[int, list[int]]:
    """Check `img` against what the agent read: each data block's sha256, and zeros where
    the agent found zeros. Returns (blocks checked, offsets that differ).

    A zero range that the image's own map reports as a hole needs no reading (qemu-img
    compare trusts block status the same way)."""
    holes = [(e.start, e.end) for e in img.extents() if e.kind == Kind.ZERO]
    starts = [h[0] for h in holes]

    def in_hole(offset: int, n: int) -> bool:
        i = bisect.bisect_right(starts, offset) - 1
        return i >= 0 and holes[i][0] <= offset and offset + n <= holes[i][1]

    def check(run: list[tuple[int, int, bytes]]) -> list[int]:
        start = run[0][0]
        end = run[-1][0] + run[-1][1]
        buf = memoryview(img.read(start, end - start))
        return [o for o, n, d in run if local_digest(buf[o - start : o - start + n]) != d]

    def check_zeros(offset: int, n: int) -> list[int]:
        for pos in range(offset, offset + n, VERIFY_RUN):
            step = min(VERIFY_RUN, offset + n - pos)
            if not in_hole(pos, step) and not is_zero(memoryview(img.read(pos, step))):
                return [pos]
        return []

    bad: list[int] = []
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="p2v-verify") as pool:
        for result in pool.map(check, _runs(digests)):
            bad.extend(result)
        for result in pool.map(lambda z: check_zeros(*z), zeros):
            bad.extend(result)
    blocks = len(digests) + sum(-(-n // BLOCK) for _, n in zeros)
    return blocks, sorted(bad)


# -- clone -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _agent(
    options: ConnectOptions, python: str, max_bandwidth: float | None = None, mode: str = "auto"
) -> Iterator[AgentConnection]:
    session = connect(options)
    try:
        try:
            conn = start_agent(session, python=python, max_bandwidth=max_bandwidth, mode=mode)
        except AgentError as exc:
            if options.sudo and "sudo:" in str(exc):
                # `sudo -n` never prompts: say which rule is missing rather than leave
                # "connection lost" as the whole story
                raise CloneError(
                    f"{exc}; --sudo needs passwordless sudo (a NOPASSWD rule) for {python} "
                    f"for {options.user} on the server"
                ) from exc
            raise
        try:
            yield conn
        finally:
            conn.close()
    finally:
        session.close()


def _open_disk(conn: AgentConnection, path: str, *, compress: bool) -> RemoteDisk:
    try:
        return RemoteDisk.open(conn, path, compress=compress)
    except RemoteReadError as exc:
        uid = conn.hello.get("uid")
        if uid not in (None, 0) and "PermissionError" in str(exc):
            raise CloneError(
                f"{exc} (the agent runs as uid {uid}: rerun with --sudo, or clone as root)"
            ) from exc
        raise


def _no_progress(label: str, total: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext(None)


def _choose_disks(inv: dict[str, Any], wanted: list[str] | None) -> list[str]:
    if wanted:
        return list(wanted)
    disks = [d["path"] for d in inv.get("disks") or [] if not d.get("removable")]
    if not disks:
        raise CloneError("the server reports no fixed disks; name them with --disk")
    return disks


def clone(
    options: ConnectOptions,
    outdir: str,
    opts: CloneOptions,
    *,
    progress_factory: ProgressFactory | None = None,
) -> CloneResult:
    """Clone the server's disks into OUTDIR, resuming whatever an earlier run left."""
    t0 = time.monotonic()
    progress_factory = progress_factory or _no_progress
    fmt = formats.normalize_format(opts.out_format)
    os.makedirs(outdir, exist_ok=True)
    host = _host_id(options)
    state = _load_state(outdir)
    if state is not None and state.get("host") != host:
        raise CloneError(
            f"{outdir} holds a clone of {state.get('host')}, not {host}; choose another OUTDIR"
        )
    if state is None:
        state = {"version": 1, "host": host, "disks": []}
    with _agent(options, opts.python, opts.max_bandwidth, opts.agent) as conn:
        agent = (conn.mode, conn.mode_reason)
        inv = conn.call(protocol.OP_INVENTORY)
        sources = _choose_disks(inv, opts.disks)
        results: list[DiskResult] = []
        described: list[inventory.ClonedDisk] = []
        for source in sources:
            entry = _state_entry(state, source, fmt, opts)
            _save_state(outdir, state)
            save = functools.partial(_save_state, outdir, state)
            res, layout = _clone_disk(
                conn, outdir, source, entry, fmt, opts, progress_factory, save
            )
            entry["state"] = "complete"
            entry["size"] = res.size
            entry["skip_unused"] = opts.skip_unused
            _save_state(outdir, state)
            results.append(res)
            described.append(
                inventory.ClonedDisk(source, res.size, entry["image"], fmt, layout=layout)
            )
    description = inventory.describe(inv, described, source=host)
    machine = inventory.write_description(outdir, description)
    result = CloneResult(host=host, outdir=outdir, machine=machine, disks=results)
    result.agent, result.agent_reason = agent
    if opts.target:
        try:
            result.definition = inventory.write_target_definition(description, opts.target, outdir)
        except (ValueError, OSError) as exc:
            # the images are done and verified: a definition that cannot be written is
            # reported, not a reason to call the clone failed
            log.warning("%s", exc)
            result.definition_error = str(exc)
    if opts.target and opts.convert_guest and result.definition_error is None:
        from drivers.guest import convert_machine  # libguestfs: loaded only to convert

        spec = inventory.machine_spec(description)
        result.conversion = convert_machine(spec, opts.target, outdir)
    result.seconds = time.monotonic() - t0
    return result


def _state_entry(state: dict[str, Any], source: str, fmt: str, opts: CloneOptions) -> dict:
    for entry in state["disks"]:
        if entry.get("source") == source:
            if entry.get("format") != fmt and entry.get("state") != "complete":
                raise CloneError(
                    f"{source}: an unfinished clone to {entry.get('format')} is in this "
                    f"OUTDIR; rerun with -O {entry.get('format')} or use another OUTDIR"
                )
            return entry
    taken = {e["image"] for e in state["disks"]}
    entry = {
        "source": source,
        "image": image_name(source, taken, EXTENSIONS.get(fmt, fmt)),
        "format": fmt,
        "options": {k: str(v) for k, v in opts.options.items()},
        "state": "copying",
    }
    state["disks"].append(entry)
    return entry


def _clone_disk(
    conn: AgentConnection,
    outdir: str,
    source: str,
    entry: dict[str, Any],
    fmt: str,
    opts: CloneOptions,
    progress_factory: ProgressFactory,
    save_state: Callable[[], None],
) -> tuple[DiskResult, dict[str, Any] | None]:
    t0 = time.monotonic()
    final = os.path.join(outdir, entry["image"])
    snapshot = None
    path = source
    if opts.snapshot:
        try:
            snapshot = conn.call(protocol.OP_SNAPSHOT, {"device": source})["snapshot"]
            path = snapshot
            log.info("%s: cloning from LVM snapshot %s", source, snapshot)
        except AgentError as exc:
            log.warning("%s: no snapshot (%s); cloning the live device", source, exc)
    try:
        disk = _open_disk(conn, path, compress=opts.compress)
        with disk:
            layout = inventory.partition_layout(disk)
            disk.drop_cache()
            res = DiskResult(
                source=source, image=final, format=fmt, size=disk.size, snapshot=snapshot
            )
            # "renaming": a run stopped after renaming the verified image, before
            # recording it complete
            if entry.get("state") in ("complete", "renaming") and os.path.exists(final):
                log.info("%s: already cloned to %s (use `p2v sync` to update it)", source, final)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final + JOURNAL_SUFFIX)
                res.skipped = True
                res.verified = entry.get("verified")
                return res, layout
            _copy_disk(conn, disk, final, entry, fmt, opts, progress_factory, res, save_state)
    finally:
        if snapshot is not None:
            with contextlib.suppress(AgentError):
                conn.call(protocol.OP_DROP_SNAPSHOT, {"snapshot": snapshot})
    entry["verified"] = res.verified
    res.seconds = time.monotonic() - t0
    return res, layout


def _open_for_resume(partial: str, fmt: str) -> Image | None:
    try:
        return formats.open(partial, fmt, writable=True, allow_backing=False)
    except (FormatError, OSError) as exc:
        log.warning("%s: cannot reopen to resume (%s); starting over", partial, exc)
        return None


def _copy_disk(
    conn: AgentConnection,
    disk: RemoteDisk,
    final: str,
    entry: dict[str, Any],
    fmt: str,
    opts: CloneOptions,
    progress_factory: ProgressFactory,
    res: DiskResult,
    save_state: Callable[[], None],
) -> None:
    partial = final + PARTIAL_SUFFIX
    journal_path = final + JOURNAL_SUFFIX
    plan, res.used_bytes = _plan(disk, opts.skip_unused)
    header = {
        "source": entry["source"],
        "size": disk.size,
        "format": fmt,
        "options": entry.get("options", {}),
        "skip_unused": opts.skip_unused,
        "block": BLOCK,
    }
    journal = Journal.load(journal_path, header) if os.path.exists(partial) else None
    dst = _open_for_resume(partial, fmt) if journal is not None else None
    if dst is not None and (dst.size != disk.size or dst.is_sequential):
        dst.close()
        dst = None
    if dst is None:
        journal = None
        for stale in (partial, journal_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        if os.path.lexists(final):
            raise CloneError(
                f"{final} exists and is not part of this clone; remove it or use another OUTDIR"
            )
        dst = formats.create(partial, fmt, disk.size, final_path=final, **opts.options)
        if not dst.is_sequential:
            journal = Journal.create(journal_path, header)
    else:
        assert journal is not None
        res.resumed_from = journal.hwm
        log.info(
            "%s: resuming above %d MiB (journal %s)",
            entry["source"],
            journal.hwm >> 20,
            journal_path,
        )
        _zero_stale(dst, journal.hwm)
    copier = _Copier(disk, dst, journal)
    todo = _above(plan, copier.start, disk.size)
    res.bytes_planned = _planned_bytes(todo)
    before = (disk.stats.requested, disk.stats.zero, conn.bytes_received)
    label = os.path.basename(final)
    try:
        with progress_factory(label, disk.size) as progress:
            try:
                copier.run(todo, progress, opts.workers)
            except (AgentError, FormatError) as exc:
                if conn.failure is not None:
                    raise CloneInterrupted(
                        f"{entry['source']}: copy interrupted at {copier.target.hwm >> 20} MiB of "
                        f"{disk.size >> 20} MiB ({exc}); run the same command again to resume"
                    ) from exc
                raise
    finally:
        res.bytes_read = disk.stats.requested - before[0]
        res.bytes_zero = disk.stats.zero - before[1]
        res.bytes_wire = conn.bytes_received - before[2]
        res.bytes_written = copier.target.written
        # an interrupted copy keeps its .partial and journal: the next run resumes
        dst.close()
    if opts.verify:
        with formats.open(partial, fmt, allow_backing=False) as img:
            checked, bad = verify_image(img, copier.all_digests, copier.all_zeros)
        res.verified_blocks = checked
        if bad:
            res.verified = False
            # the journal vouches for data that is wrong: a rerun must copy afresh
            with contextlib.suppress(FileNotFoundError):
                os.unlink(journal_path)
            raise VerifyError(
                f"{entry['source']}: {len(bad)} of {checked} blocks of {partial} differ from the "
                f"server's (first at {bad[0]:#x}); the image is left unrenamed and a rerun "
                "copies the disk again"
            )
        res.verified = True
    # recorded before the rename, so that a run killed right after it finds its own
    # verified image under the final name, not a stranger's file
    entry["state"] = "renaming"
    entry["verified"] = res.verified
    save_state()
    os.replace(partial, final)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal_path)


# -- sync ------------------------------------------------------------------------------------


def _sync_ranges(disk: RemoteDisk, skip_unused: bool) -> list[tuple[int, int]]:
    """BLOCK-aligned [start, end) ranges to compare: whole disk, or blocks in use."""
    plan, _ = _plan(disk, skip_unused)
    out: list[tuple[int, int]] = []
    for e in plan:
        if e.kind != Kind.DATA:
            continue
        s = e.start - e.start % disk.block
        t = min(-(-e.end // disk.block) * disk.block, disk.size)
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], t))
        else:
            out.append((s, t))
    return out


def _local_hashes(
    img: Image,
    start: int,
    end: int,
    block: int = BLOCK,
    digest: Callable[[memoryview], bytes] = local_digest,
) -> list[bytes]:
    out = []
    pos = start
    while pos < end:
        n = min(max(VERIFY_RUN, block), end - pos)
        buf = memoryview(img.read(pos, n))
        for o in range(0, n, block):
            out.append(digest(buf[o : o + block]))
        pos += n
    return out


def sync(
    options: ConnectOptions,
    outdir: str,
    opts: SyncOptions,
    *,
    progress_factory: ProgressFactory | None = None,
) -> SyncResult:
    """Bring a finished clone up to date: only blocks whose hashes differ cross the wire."""
    t0 = time.monotonic()
    progress_factory = progress_factory or _no_progress
    state = _load_state(outdir)
    if state is None:
        raise CloneError(
            f"{outdir}: no clone here ({STATE_FILE} is missing); run `p2v clone` first"
        )
    host = _host_id(options)
    if state.get("host") != host:
        raise CloneError(f"{outdir} holds a clone of {state.get('host')}, not {host}")
    entries = [e for e in state["disks"] if not opts.disks or e["source"] in opts.disks]
    unfinished = [e["source"] for e in entries if e.get("state") != "complete"]
    if unfinished:
        raise CloneError(
            f"the clone of {', '.join(unfinished)} is unfinished; run `p2v clone` again first"
        )
    results = []
    with _agent(options, opts.python, opts.max_bandwidth, opts.agent) as conn:
        agent = (conn.mode, conn.mode_reason)
        for entry in entries:
            results.append(_sync_disk(conn, outdir, entry, opts, progress_factory))
    result = SyncResult(host=host, outdir=outdir, disks=results, seconds=time.monotonic() - t0)
    result.agent, result.agent_reason = agent
    return result


def _sync_disk(
    conn: AgentConnection,
    outdir: str,
    entry: dict[str, Any],
    opts: SyncOptions,
    progress_factory: ProgressFactory,
) -> DiskSync:
    t0 = time.monotonic()
    path = os.path.join(outdir, entry["image"])
    out = DiskSync(source=entry["source"], image=path)
    wire0 = conn.bytes_received
    disk = _open_disk(conn, entry["source"], compress=opts.compress)
    with disk, formats.open(path, entry["format"], writable=True, allow_backing=False) as img:
        if img.size != disk.size:
            raise CloneError(
                f"{entry['source']} is now {disk.size} bytes, the image {img.size}: clone it again"
            )
        ranges = _sync_ranges(disk, bool(entry.get("skip_unused")))
        # the shell mode hashes 4 MiB blocks, with md5 where the server has no sha256sum
        shell_digest = getattr(conn, "digest_of", None)
        sha256 = getattr(conn, "hash_tool", "sha256sum") == "sha256sum"
        digest = (disk.block, local_digest if sha256 else shell_digest)
        total = sum(e - s for s, e in ranges)
        with (
            progress_factory(os.path.basename(path) + " sync", total) as progress,
            cf.ThreadPoolExecutor(opts.workers, thread_name_prefix="p2v-sync") as pool,
        ):
            done = 0
            for s, e in ranges:
                pos = s
                while pos < e:
                    n = min(SYNC_WINDOW, e - pos)
                    step = 64 << 20
                    local_parts = [
                        pool.submit(_local_hashes, img, p, min(p + step, pos + n), *digest)
                        for p in range(pos, pos + n, step)
                    ]
                    remote = disk.hashes(pos, pos + n)
                    local = [d for part in local_parts for d in part.result()]
                    changed = [
                        pos + i * disk.block
                        for i, (a, b) in enumerate(zip(remote, local))
                        if a != b
                    ]
                    out.blocks += len(remote)
                    out.changed_blocks += len(changed)
                    out.bytes_sent += _resend(disk, img, changed)
                    pos += n
                    done += n
                    if progress:
                        progress(done, total)
        img.flush()
    out.bytes_wire = conn.bytes_received - wire0
    out.seconds = time.monotonic() - t0
    return out


def _resend(disk: RemoteDisk, img: Image, blocks: list[int]) -> int:
    """Read changed blocks from the server (pipelined, a batch at a time so memory stays
    bounded) and write them, zeros included."""
    sent = 0
    batch_size = max(1, RESEND_BATCH * BLOCK // disk.block)
    for first in range(0, len(blocks), batch_size):
        batch = blocks[first : first + batch_size]
        futs = [
            (b, n, disk.conn.read(disk.handle, b, n, compress=disk.compress))
            for b in batch
            for n in (min(disk.block, disk.size - b),)
        ]
        for b, n, fut in futs:
            res = fut.result()
            if res.is_zero:
                img.write_zeroes(b, n)
            else:
                buf = bytearray(n)
                res.data_into(memoryview(buf))
                img.write(b, buf)
            sent += len(res.payload)
    return sent
