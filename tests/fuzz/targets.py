"""Fuzz targets: one per parser. Each takes raw bytes and drives the parser the way the
product does; the only exceptions allowed to escape are the parser's own error tree.

A target returns normally for inputs the parser refuses cleanly; anything else that
escapes is a finding. Besides exceptions, every target runs under the rules of
`guard.py`: files it may read and write, the backing files it must never open (seeds
name sentinels beside the input), and a cap on the memory one input may add.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tests.fuzz import guard

#: how much of an image a target reads back per input, to keep each run short
READ_BUDGET = 4 << 20
MAX_EXTENTS = 4096
#: memory one input may add: a base for the interpreter's own churn, plus a multiple of
#: the input's size (a parser may hold its input and a few tables no larger than it)
MEMORY_BASE = 256 << 20
MEMORY_PER_BYTE = 64
MEMORY_MAX = 1 << 30
#: filesystem seeds are stored with their trailing zeros cut; they are read as volumes
#: of this size (the rest reads as zeros, as a freshly made filesystem's free space does)
FS_VOLUME = 64 << 20
#: the backing files seeds name; opening any of them is a violation (seeds.py makes them)
SENTINELS = ("backing.img", "backing.qcow2", "backing.vmdk", "backing.vhd", "backing.vhdx")


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    #: seed kinds that feed this target (see seeds.py)
    seeds: tuple[str, ...]
    #: modules (packages with everything under them) atheris instruments for coverage;
    #: instrumenting costs seconds of start-up per package, so only the target's own
    covers: tuple[str, ...] = ()


class Finding(AssertionError):
    """The parser broke a rule without raising (a wrong answer, a file left behind)."""


#: test_fuzz.py points this into the test's own temporary directory
_SCRATCH = os.environ.get("P2V_FUZZ_SCRATCH") or os.path.join(
    tempfile.gettempdir(), f"p2v-fuzz-{os.getpid()}"
)


def scratch(name: str) -> str:
    """A private directory per target kind, made on first use (with its sentinels)."""
    path = os.path.join(_SCRATCH, name)
    if not os.path.isdir(path):
        os.makedirs(path)
        for s in SENTINELS:
            with open(os.path.join(path, s), "wb") as f:
                f.write(b"sentinel: the parser opened a backing file it was told not to\n")
    return path


def _sentinels(directory: str) -> tuple[str, ...]:
    return tuple(os.path.join(directory, s) for s in SENTINELS)


def _cap(data: bytes) -> int:
    return min(MEMORY_MAX, MEMORY_BASE + MEMORY_PER_BYTE * len(data))


@contextlib.contextmanager
def rules(
    data: bytes, *, read: tuple[str, ...] = (), write: tuple[str, ...] = ()
) -> Iterator[None]:
    sentinels = tuple(p for d in read for p in _sentinels(d))
    with guard.memory_cap(_cap(data)), guard.confined(read=read, write=write, sentinels=sentinels):
        yield


def _as_file(data: bytes, name: str = "input", kind: str = "img") -> str:
    path = os.path.join(scratch(kind), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# -- disk images --------------------------------------------------------------------------


def _exercise(img, *, read_all: bool = False) -> None:
    """What `p2v info`, `map`, `check` and `convert` ask of an image."""
    from formats.extents import Kind

    img.info()
    img.actual_size()
    budget = READ_BUDGET * (16 if read_all else 1)
    pos = 0
    for n, ext in enumerate(img.extents()):
        if n >= MAX_EXTENTS:
            break
        if ext.start != pos or ext.length <= 0:
            raise Finding(f"extents leave a gap or overlap at {pos:#x}: {ext}")
        pos = ext.end
        if ext.kind == Kind.DATA and budget > 0:
            chunk = min(ext.length, budget if read_all else 65536, budget)
            img.read(ext.start, chunk)
            budget -= chunk
    else:
        if pos != img.size:
            raise Finding(f"extents end at {pos:#x}, the image at {img.size:#x}")
    img.check()


def image_target(fmt: str, *, name: str = "input", read_all: bool = False):
    def run(data: bytes) -> None:
        import formats

        path = _as_file(data, name)
        directory = os.path.dirname(path)
        with rules(data, read=(directory,)):
            try:
                img = formats.open(path, fmt, allow_backing=False)
            except formats.FormatError:
                return
            try:
                _exercise(img, read_all=read_all)
            except formats.FormatError:
                pass
            finally:
                img.close()

    return run


def probe_target(data: bytes) -> None:
    import formats

    path = _as_file(data)
    with rules(data, read=(os.path.dirname(path),)):
        try:
            fmt = formats.probe(path)
        except formats.FormatError:
            return
    image_target(fmt)(data)


def vmdk_descriptor_target(data: bytes) -> None:
    """A descriptor file beside real extent files (seeds name extent-flat.vmdk and
    extent-sparse.vmdk): the text parser, then the image it describes."""
    from formats import FormatError
    from formats.vmdk import descriptor

    _vmdk_extents()
    with rules(data):
        try:
            descriptor.parse(data, "fuzz")
        except FormatError:
            return
    image_target("vmdk", name="input.vmdk")(data)


_EXTENTS_MADE = False


def _vmdk_extents() -> None:
    """The extent files descriptor seeds name, made once per process by qemu-img."""
    global _EXTENTS_MADE
    if _EXTENTS_MADE:
        return
    d = scratch("img")
    with open(os.path.join(d, "extent-flat.vmdk"), "wb") as f:
        f.write(bytes(range(256)) * 4096)  # 1 MiB = 2048 sectors
    sparse = os.path.join(d, "extent-sparse.vmdk")
    if not os.path.exists(sparse):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "vmdk", sparse, "1M"],
            check=True,
            capture_output=True,
        )
    _EXTENTS_MADE = True


# -- partition tables and filesystems -----------------------------------------------------


def _volume(data: bytes, size: int | None = None):
    """The input as a volume of `size` bytes (its tail reads as zeros), in memory."""
    from formats.image import Image

    class Volume(Image):
        format = "fuzz"

        def _readinto(self, offset: int, buf: memoryview) -> None:
            have = max(0, min(len(buf), len(data) - offset))
            buf[:have] = data[offset : offset + have]
            if have < len(buf):
                buf[have:] = bytes(len(buf) - have)

    return Volume(None, max(len(data), size or 0))


def partitions_target(data: bytes) -> None:
    import formats
    from formats import disk, partitions

    img = _volume(data)
    with rules(data):
        try:
            table = partitions.read_table(img)
            disk.describe(img)
            if table is not None:
                for p in table.partitions[:8]:
                    part = partitions.partition_image(img, p.number)
                    part.read(0, min(512, part.size))
        except formats.FormatError:
            pass


def _check_map(used, size: int) -> None:
    """A used map must become extents that tile the volume exactly, as the engine needs."""
    from formats.filesystems import ranges

    if used.ndim != 2 or used.shape[1] != 2:
        raise Finding(f"used map has shape {used.shape}, not (n, 2)")
    pos = 0
    for ext in ranges.to_extents(ranges.clip(ranges.merge([used]), 0, size), size):
        if ext.start != pos or ext.length <= 0:
            raise Finding(f"used map's extents leave a gap or overlap at {pos:#x}")
        pos = ext.start + ext.length
    if pos != size:
        raise Finding(f"used map's extents end at {pos:#x}, the volume at {size:#x}")


def filesystems_target(data: bytes) -> None:
    import formats
    from formats import disk, filesystems

    img = _volume(data, FS_VOLUME)
    with rules(data):
        try:
            filesystems.detect(img)
            extents = disk.used_extents(img)
        except formats.FormatError:
            return
    pos = 0
    for ext in extents:
        if ext.start != pos:
            raise Finding(f"used extents leave a gap or overlap at {pos:#x}")
        pos = ext.start + ext.length
    if pos != img.size:
        raise Finding(f"used extents end at {pos:#x}, the disk at {img.size:#x}")


def filesystem_target(module: str) -> Callable[[bytes], None]:
    """One filesystem's own probe and used map, without the fallbacks of map_volume
    (which turns a FormatError into "copy it whole")."""

    def run(data: bytes) -> None:
        from formats import FormatError
        from formats.filesystems import HEAD

        mod = importlib.import_module(f"formats.filesystems.{module}")
        img = _volume(data, FS_VOLUME)
        with rules(data):
            try:
                if not mod.probe(img.read(0, min(img.size, HEAD))):
                    return
                used = mod.used(img)
            except FormatError:
                return
        _check_map(used, img.size)

    return run


# -- OVF and OVA --------------------------------------------------------------------------


def ovf_target(data: bytes) -> None:
    """A descriptor's XML: only FormatError, whatever the markup or the numbers in it."""
    from formats import FormatError
    from formats.ovf import descriptor

    with rules(data):
        try:
            desc = descriptor.parse(data, where="fuzz")
        except FormatError:
            return
    machine = desc.machine
    if not isinstance(machine.get("disks"), list) or not isinstance(machine.get("memory"), int):
        raise Finding(f"parsed machine lacks disks or memory: {sorted(machine)}")


def _listing(root: str) -> set[str]:
    out = set()
    for base, dirs, files in os.walk(root):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(base, n), root))
    return out


def ova_target(data: bytes) -> None:
    """An OVA archive: describe, then unpack into out/; nothing may appear anywhere else,
    nothing under out/ may be a link, and a refused archive leaves out/ empty."""
    from formats import FormatError, ovf

    work = scratch("ova")
    out = os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    os.mkdir(out)
    path = os.path.join(work, "in.ova")
    with open(path, "wb") as f:
        f.write(data)
    before = _listing(work)
    failed = False
    with rules(data, read=(work,), write=(out,)):
        try:
            ovf.describe(path)
            ovf.unpack(path, out)
        except FormatError:
            failed = True
    after = _listing(work)
    outside = {p for p in after - before if not p.startswith("out" + os.sep)}
    if outside:
        raise Finding(f"unpack created {sorted(outside)} outside its target directory")
    for p in after - before:
        if os.path.islink(os.path.join(work, p)):
            raise Finding(f"unpack created a link {p}")
    if failed and os.listdir(out):
        raise Finding(f"a refused archive left {sorted(os.listdir(out))} behind")


# -- the p2v agent protocol ---------------------------------------------------------------


class _ReplyStream:
    """The agent's side as the controller sees it: canned bytes, then end of stream. It
    holds the bytes back until every request is in flight, so replies match them."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.go = threading.Event()

    def sendall(self, data: bytes) -> None:
        pass

    def recv(self, n: int) -> bytes:
        self.go.wait(5)
        # small, uneven pieces: frames straddle reads as they do over SSH
        step = min(n, 1 + (self.pos * 7919) % 3000)
        chunk = bytes(self.data[self.pos : self.pos + step])
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        pass

    def diagnostics(self) -> str:
        return ""


#: what the controller asks in the reply seeds' order: (op, ...) -> the request ids 1..N
AGENT_READ = (1, 0, 65536)
AGENT_HASH = (1, 0, 1 << 20, 65536)


def agent_replies_target(data: bytes) -> None:
    """The controller's receiver (p2v/protocol.py) fed an agent's replies to a HELLO, two
    READs, a HASH and a CLOSE: every request ends with a result or an AgentError, and a
    READ's payload decodes to exactly its length or raises AgentError."""
    from p2v import protocol as P

    stream = _ReplyStream(data)
    with rules(data):
        conn = P.AgentConnection(stream, name="fuzz")  # type: ignore[arg-type]
        futures = [
            conn.submit(P.OP_HELLO, b"{}", decode=P._decode_json),
            conn.read(*AGENT_READ, compress=True),
            conn.hash(*AGENT_HASH),
            conn.read(*AGENT_READ, compress=False),
            conn.submit(P.OP_CLOSE, P.HandleBody.build({"handle": 1}), decode=P._decode_empty),
        ]
        stream.go.set()
        conn._thread.join(10)
        if conn._thread.is_alive():
            raise Finding("the controller's receiver did not stop at end of stream")
        for fut in futures:
            exc = fut.exception(timeout=1)
            if exc is not None:
                if not isinstance(exc, P.AgentError):
                    raise exc
                continue
            value = fut.result()
            if isinstance(value, P.ReadResult):
                buf = bytearray(value.length)
                try:
                    value.data_into(memoryview(buf))
                except P.AgentError:
                    pass
        conn.close()


_AGENT_PATCHED = False


def _fuzz_agent_class():
    """The agent with its outside world fenced: no tools run (fsfreeze on / would freeze
    this machine), devices only inside the scratch directory, and any exception other
    than its own Invalid/Failed recorded (the agent answers those too, as STATUS_ERROR,
    which would hide them from the fuzzer)."""
    global _AGENT_PATCHED
    from p2v import agent

    if not _AGENT_PATCHED:

        def no_tools(argv, timeout=60):
            raise agent.Failed(f"{argv[0]}: no tools run under fuzzing")

        agent._run = no_tools
        _AGENT_PATCHED = True

    base = os.path.realpath(scratch("agent"))

    class FuzzAgent(agent.Agent):
        unexpected: list[BaseException]

        def dispatch(self, op, flags, body):
            try:
                return super().dispatch(op, flags, body)
            except (agent.Invalid, agent.Failed):
                raise
            except Exception as exc:
                self.unexpected.append(exc)
                raise

        def op_open(self, args):
            path = args.get("path") if isinstance(args, dict) else None
            if isinstance(path, str) and path:
                real = os.path.realpath(os.path.join(base, path))
                if not real.startswith(base + os.sep):
                    raise agent.Invalid("outside the fuzzing directory")
                args = dict(args, path=real)
            return super().op_open(args)

    return agent, FuzzAgent, base


def agent_requests_target(data: bytes) -> None:
    """The agent (p2v/agent.py) serving a request stream in-process: it never raises,
    answers every well-framed request with one well-framed response of the same id, and
    stops at the first broken frame."""
    from p2v import protocol as P

    _, FuzzAgent, base = _fuzz_agent_class()
    disk = os.path.join(base, "disk.img")
    if not os.path.exists(disk):
        with open(disk, "wb") as f:
            f.write(bytes(range(256)) * 1024 + bytes(256 << 10))
    out = io.BytesIO()
    a = FuzzAgent(io.BytesIO(data), out, workers=2)
    a.unexpected = []
    # the agent reads /proc, /sys and os-release for its inventory
    with rules(data, read=(base, "/proc", "/sys", "/etc")):
        a.serve()
    if a.unexpected:
        raise a.unexpected[0]
    replies = out.getvalue()
    pos = 0
    while pos < len(replies):
        try:
            h = P.ResponseHeader.parse(replies[pos : pos + P.HEADER_SIZE])
        except Exception as exc:
            raise Finding(f"agent wrote a garbled response header at {pos}") from exc
        pos += P.HEADER_SIZE + h.length
    if pos != len(replies):
        raise Finding("agent's last response is shorter than its header says")


# -- the migration wire protocol ----------------------------------------------------------

MIGRATION_MEMORY = 16 << 20


class _WireStream:
    """The source's side as the receiver sees it: the input's frames, with their header
    checksums made right (so mutations reach the bodies), then end of stream."""

    def __init__(self, data: bytes) -> None:
        self.data = _fix_frame_crcs(data)
        self.pos = 0

    def sendall(self, data) -> None:
        pass

    def recv_into(self, buffer: memoryview) -> int:
        n = min(len(buffer), len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        pass


def _fix_frame_crcs(data: bytes) -> bytes:
    import google_crc32c

    from live_migrate import wire

    if data[:1] == b"\xff":  # the raw stream, checksums as sent: the crc check itself
        return data[1:]
    buf = bytearray(data)
    pos = 0
    while pos + wire.FRAME_HEADER_SIZE <= len(buf):
        head = buf[pos : pos + 12]
        buf[pos + 12 : pos + 16] = google_crc32c.value(bytes(head)).to_bytes(4, "big")
        pos += wire.FRAME_HEADER_SIZE + int.from_bytes(head[4:8], "big")
    return bytes(buf)


class _FuzzTarget:
    def __init__(self, geometry) -> None:
        self._geometry = geometry
        self.mem = bytearray(geometry.memory_size)

    @property
    def geometry(self):
        return self._geometry

    @property
    def state_format(self):
        from live_migrate.guest import StateFormat

        return StateFormat.SIM

    def memory(self) -> memoryview:
        return memoryview(self.mem)

    def load_device_state(self, state: bytes) -> None:
        pass

    def resume(self) -> None:
        pass

    def discard(self) -> None:
        pass


def migration_wire_target(data: bytes) -> None:
    """The receiver (live_migrate/receiver.py) fed a source's stream: it returns a report
    whatever arrives, and the error it reports is one of its own (a MigrationError)."""
    from live_migrate import receiver as R
    from live_migrate.errors import MigrationError

    seen: list[BaseException] = []

    class FuzzReceiver(R.Receiver):
        def _give_up(self, exc: BaseException) -> str:
            seen.append(self._failure or exc)
            return super()._give_up(exc)

    opts = R.ReceiverOptions(max_memory=MIGRATION_MEMORY)
    with rules(data):
        report = FuzzReceiver(_WireStream(data), None, _FuzzTarget, opts).run()  # type: ignore[arg-type]
    for exc in seen:
        if not isinstance(exc, MigrationError):
            raise exc
    if report.completed == bool(report.error):
        raise Finding(f"report says completed={report.completed} with error {report.error!r}")


# -- the registry -------------------------------------------------------------------------

_IMAGES = ("qcow2", "vmdk", "vpc", "vhdx", "vdi")
_MODULE = {"vpc": "formats.vhd", "vdi": "formats.vdi"}
_CORE = ("formats.backing", "formats.extents", "formats.image", "formats.fileio")
_FILESYSTEMS = {
    "ext4": (("fs-ext4",), ("formats.filesystems.ext4", "formats.filesystems.jbd2")),
    "fat": (("fs-fat",), ("formats.filesystems.fat",)),
    "ntfs": (("fs-ntfs",), ("formats.filesystems.ntfs",)),
    "xfs": (("fs-xfs",), ("formats.filesystems.xfs",)),
    "swap": (("fs-swap",), ("formats.filesystems.swap",)),
    "lvm": (("fs-lvm",), ("formats.filesystems.lvm",)),
}
_MIGRATION = (
    "live_migrate.wire",
    "live_migrate.receiver",
    "live_migrate.channel",
    "live_migrate.compression",
    "live_migrate.pages",
)


def _image_modules(fmt: str) -> tuple[str, ...]:
    return (_MODULE.get(fmt, f"formats.{fmt}"), *_CORE)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "probe",
            probe_target,
            _IMAGES,
            covers=tuple(_image_modules(f)[0] for f in _IMAGES),
        ),
        *(Target(f, image_target(f), (f, f"{f}-backing"), _image_modules(f)) for f in _IMAGES),
        Target(
            "vmdk_descriptor",
            vmdk_descriptor_target,
            ("vmdk-descriptor",),
            ("formats.vmdk", *_CORE),
        ),
        Target(
            "vmdk_stream",
            image_target("vmdk", read_all=True),
            ("vmdk-stream",),
            ("formats.vmdk", *_CORE),
        ),
        Target(
            "partitions",
            partitions_target,
            ("disk",),
            covers=("formats.partitions", "formats.views"),
        ),
        Target(
            "filesystems",
            filesystems_target,
            ("fs", "disk"),
            covers=("formats.filesystems", "formats.partitions"),
        ),
        *(
            Target(
                f"fs_{m}",
                filesystem_target(m),
                seeds,
                (*mods, "formats.filesystems.ranges"),
            )
            for m, (seeds, mods) in _FILESYSTEMS.items()
        ),
        Target("ovf", ovf_target, ("ovf",), ("formats.ovf.descriptor",)),
        Target("ova", ova_target, ("ova",), ("formats.ovf",)),
        Target(
            "agent_replies",
            agent_replies_target,
            ("agent-replies",),
            ("p2v.protocol",),
        ),
        Target(
            "agent_requests",
            agent_requests_target,
            ("agent-requests",),
            ("p2v.agent",),
        ),
        Target(
            "migration_wire",
            migration_wire_target,
            ("migration",),
            _MIGRATION,
        ),
    )
}
