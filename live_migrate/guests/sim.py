"""The synthetic guest: memory in shared memory, written by a child process.

The child (the "vCPU") runs beside the engine, not under its GIL, and writes pages with a
chosen workload at a set rate:

- ``idle``: writes nothing;
- ``uniform``: pages drawn uniformly from all memory;
- ``hotset``: a fraction `skew` of the writes falls in a hot set of `hot` bytes, the rest
  anywhere (a database's buffer pool beside the rest of the system);
- ``sequential``: sweeps memory from start to end and wraps (a copy or a scan loop).

A write changes `words` random 8-byte words of a page, as a real store-heavy loop does,
so deltas against the last sent copy are small. `rate` is bytes of pages written per
second (pages x page size), the dirty rate QEMU reports. The guest can be paused,
resumed and throttled (a throttle f runs the writer at 1 - f of its rate, like QEMU's
cpu-throttle); `deterministic=True` makes the child write only when `step()` asks, from
a seeded generator, for tests.

Dirty pages, both ways the `Guest` protocol knows:

- the dirty log: the writer marks each page it writes in one of two byte maps, chosen by
  an epoch. `collect_dirty_log()` asks for the next epoch and waits until the writer
  acknowledges it; the writer switches only between write batches, so every write of
  the old epoch is complete and marked when the engine reads the old map, and every
  later write lands in the new map: no write is lost;
- the scan: the engine compares memory with its last sent copy (`dirty_tracking=scan`).

The memory and the control block are files in /dev/shm, unlinked as soon as both
processes have mapped them: nothing is left behind if either process dies, and the child
exits when its parent does. A `SimTarget`'s memory is anonymous memory, or with `keep` a
file there that another process can check afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from live_migrate.errors import GuestError
from live_migrate.guest import PAGE_SIZE, DirtyTracking, Geometry, StateFormat

WORKLOADS = ("idle", "uniform", "hotset", "sequential")
FILLS = ("mixed", "random", "zero")
#: pages the writer writes at most between two looks at its control block
WRITE_BATCH = 2048
#: how long the writer sleeps when paused (the engine waits for its answers), and at
#: most when it is ahead of its rate or idle (a pause waits that long at worst)
TICK = 0.0002
MAX_TICK = 0.002
CONTROL_TIMEOUT = 10.0
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
#: map memory with its pages present: a fault per 4 KiB page on first touch would
#: otherwise cost more than the migration's own copies
_POPULATE = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

# control block: int64 words at the start of the control file, then two dirty maps
_COMMAND, _PAUSED, _EPOCH_REQ, _EPOCH_ACK, _THROTTLE = 0, 1, 2, 3, 4
_WRITES, _STEP_REQ, _STEP_DONE, _READY, _LOGGING = 5, 6, 7, 8, 9
_RUN, _PAUSE, _STOP = 0, 1, 2
_CONTROL_BYTES = 4096


@dataclass(frozen=True)
class SimConfig:
    """What `sim:SIZE,k=v,...` says (see `parse_spec`)."""

    size: int
    workload: str = "idle"
    rate: float = 0.0  # bytes of pages written per second
    hot: int = 64 << 20  # hot set bytes (hotset)
    skew: float = 0.9  # fraction of writes in the hot set (hotset)
    words: int = 8  # 8-byte words changed per page write
    dirty: DirtyTracking = DirtyTracking.LOG
    fill: str = "mixed"
    seed: int = 1
    deterministic: bool = False
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        ps = self.page_size
        if ps < 512 or ps & (ps - 1):
            raise GuestError(f"sim: page size {ps} is not a power of two >= 512")
        if self.size <= 0 or self.size % ps:
            raise GuestError(f"sim: size {self.size} is not a positive multiple of {ps}")
        if self.workload not in WORKLOADS:
            raise GuestError(f"sim: workload {self.workload!r}, expected one of {WORKLOADS}")
        if self.fill not in FILLS:
            raise GuestError(f"sim: fill {self.fill!r}, expected one of {FILLS}")
        if self.rate < 0 or not 0 <= self.skew <= 1:
            raise GuestError("sim: rate must be >= 0 and skew within 0..1")
        if not 1 <= self.words <= ps // 8:
            raise GuestError(f"sim: words must be within 1..{ps // 8}")
        if self.workload == "hotset" and not ps <= self.hot <= self.size:
            raise GuestError(f"sim: hot set of {self.hot} bytes in a {self.size}-byte guest")


def _parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1].isalpha() else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise GuestError(f"sim: invalid size {text!r}") from None
    if unit not in units or value < 0:
        raise GuestError(f"sim: invalid size {text!r}")
    return int(value * units[unit])


def parse_spec(spec: str) -> SimConfig:
    """Parse ``sim:SIZE[,workload=W][,rate=R][,hot=H][,skew=S][,words=N][,dirty=log|scan]
    [,fill=mixed|random|zero][,seed=N][,deterministic]``. Sizes and rates take K/M/G
    suffixes (powers of 1024; a rate is per second)."""
    body = spec.removeprefix("sim:")
    parts = [p for p in body.split(",") if p]
    if not parts:
        raise GuestError("sim: a size is required, e.g. sim:256M,workload=uniform,rate=50M")
    fields: dict[str, object] = {"size": _parse_size(parts[0])}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        key = key.strip()
        try:
            if key in ("workload", "fill"):
                fields[key] = value
            elif key == "rate":
                fields[key] = float(_parse_size(value.removesuffix("/s")))
            elif key in ("hot", "page_size"):
                fields[key] = _parse_size(value)
            elif key == "skew":
                fields[key] = float(value)
            elif key in ("words", "seed"):
                fields[key] = int(value)
            elif key == "dirty":
                fields[key] = DirtyTracking(value)
            elif key == "deterministic":
                fields[key] = value in ("", "1", "true", "yes")
            else:
                raise GuestError(f"sim: unknown option {key!r}")
        except ValueError:
            raise GuestError(f"sim: invalid value for {key}: {value!r}") from None
    if fields.get("workload") == "hotset" and "hot" not in fields:
        fields["hot"] = min(SimConfig.hot, int(fields["size"]) // 4)  # type: ignore[call-overload]
    config = SimConfig(**fields)  # type: ignore[arg-type]
    return config


# -- the child: the guest's "vCPU" ----------------------------------------------------


def _fill(mem: np.ndarray, fill: str, seed: int) -> None:
    """Initial contents: 'mixed' is 1/4 zero pages, 1/4 compressible, 1/2 random."""
    if fill == "zero":
        return
    pages, words = mem.shape
    rng = np.random.default_rng(seed)
    pool = min(pages, 1024)
    random_pool = rng.integers(0, 2**64, size=(pool, words), dtype=np.uint64, endpoint=False)
    # text-like pages: a half of letters, then the same again, as text repeats itself;
    # zstd and LZ4 halve them even between random pages (a 16-letter alphabet alone
    # would need an entropy coder that random pages in the same block defeat)
    half = rng.integers(0, 16, size=(pool, words * 4), dtype=np.uint8) + np.uint8(ord("a"))
    text_pool = np.concatenate([half, half], axis=1).view(np.uint64)
    for start in range(0, pages, pool):
        end = min(start + pool, pages)
        n = end - start
        block = mem[start:end]
        block[:] = random_pool[:n]
        index = np.arange(start, end, dtype=np.uint64)
        if fill == "mixed":
            kind = (index * np.uint64(2654435761) >> np.uint64(7)) & np.uint64(3)
            block[kind == 1] = text_pool[:n][kind == 1]
            block[kind == 0] = 0
            block[kind != 0, 0] = index[kind != 0]  # distinct pages, as in real memory
        else:
            block[:, 0] = index


class _Writer:
    """The workload's page picker and writer, running in the child."""

    def __init__(self, config: SimConfig, mem: np.ndarray, maps: np.ndarray) -> None:
        self.c = config
        self.mem = mem
        self.flat = mem.reshape(-1)
        self.maps = maps
        self.pages, self.words = mem.shape
        self.rng = np.random.default_rng(config.seed + 1)
        self.cursor = 0
        self.hot_pages = max(1, config.hot // config.page_size)
        self.hot_start = (self.pages - self.hot_pages) // 3  # not page 0: less typical
        self.serial = np.uint64(config.seed) << np.uint64(40)

    def pick(self, n: int) -> np.ndarray:
        kind = self.c.workload
        if kind == "uniform":
            return self.rng.integers(0, self.pages, n)
        if kind == "hotset":
            idx = self.rng.integers(0, self.pages, n)
            hot = self.rng.random(n) < self.c.skew
            idx[hot] = self.hot_start + self.rng.integers(0, self.hot_pages, int(hot.sum()))
            return idx
        if kind == "sequential":
            idx = (self.cursor + np.arange(n)) % self.pages
            self.cursor = int((self.cursor + n) % self.pages)
            return idx
        return np.empty(0, dtype=np.int64)

    def write(self, n: int, epoch: int, logging: bool) -> int:
        idx = self.pick(n)
        if not len(idx):
            return 0
        offsets = self.rng.integers(0, self.words, (len(idx), self.c.words))
        values = self.serial + np.arange(offsets.size, dtype=np.uint64).reshape(offsets.shape)
        self.serial += np.uint64(offsets.size)
        self.flat[(idx[:, None] * self.words + offsets).reshape(-1)] = values.reshape(-1)
        if logging:
            self.maps[epoch & 1, idx] = 1
        return len(idx)


def _child_main(config: SimConfig, mem_path: str, ctl_path: str) -> None:
    with open(mem_path, "r+b") as f:
        mem_map = mmap.mmap(f.fileno(), config.size)
    with open(ctl_path, "r+b") as f:
        ctl_map = mmap.mmap(f.fileno(), 0)
    pages = config.size // config.page_size
    mem = np.frombuffer(mem_map, dtype=np.uint64).reshape(pages, -1)
    ctl = np.frombuffer(ctl_map, dtype=np.int64, count=_CONTROL_BYTES // 8)
    maps = np.frombuffer(ctl_map, dtype=np.uint8, offset=_CONTROL_BYTES).reshape(2, pages)
    _fill(mem, config.fill, config.seed)
    writer = _Writer(config, mem, maps)
    ctl[_READY] = 1
    pages_per_second = config.rate / config.page_size
    budget, last = 0.0, time.monotonic()
    parent, checked = os.getppid(), last
    while True:
        command = ctl[_COMMAND]
        if command == _STOP:
            return
        if last - checked > 0.1:
            checked = last
            if os.getppid() != parent:
                return  # the engine died: a guest nobody migrates must not linger
        # the epoch flips only here, between write batches: see the module docstring
        epoch = int(ctl[_EPOCH_REQ])
        if ctl[_EPOCH_ACK] != epoch:
            ctl[_EPOCH_ACK] = epoch
        if command == _PAUSE:
            ctl[_PAUSED] = 1
            time.sleep(TICK * 5)
            last = time.monotonic()
            continue
        if ctl[_PAUSED]:
            ctl[_PAUSED] = 0
        logging = bool(ctl[_LOGGING])
        if config.deterministic:
            if ctl[_STEP_DONE] < ctl[_STEP_REQ]:
                ctl[_WRITES] += writer.write(WRITE_BATCH, epoch, logging)
                ctl[_STEP_DONE] += 1
            else:
                time.sleep(TICK)
            last = time.monotonic()
            continue
        now = time.monotonic()
        throttle = ctl[_THROTTLE] / 1000.0
        budget = min(budget + pages_per_second * (1 - throttle) * (now - last), 4 * WRITE_BATCH)
        last = now
        n = min(int(budget), WRITE_BATCH)
        if n >= 1:
            ctl[_WRITES] += writer.write(n, epoch, logging)
            budget -= n
        else:
            # sleep until the next page is due, but answer the engine within MAX_TICK
            rate = pages_per_second * (1 - throttle)
            time.sleep(min(MAX_TICK, (1 - budget) / rate) if rate > 0 else MAX_TICK)


# -- the parent: the Guest the engine sees --------------------------------------------


def _shm_file(prefix: str, size: int) -> str:
    fd, path = tempfile.mkstemp(prefix=prefix, dir=SHM_DIR)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


class SimGuest:
    """A synthetic source guest (implements `live_migrate.guest.SourceGuest`)."""

    state_format = StateFormat.SIM

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._geometry = Geometry(config.page_size, config.size // config.page_size)
        pages = self._geometry.page_count
        self.memory_path = _shm_file("p2v-sim-mem-", config.size)
        self._ctl_path = _shm_file("p2v-sim-ctl-", _CONTROL_BYTES + 2 * pages)
        self._proc: subprocess.Popen | None = None
        self._closed = False
        with open(self.memory_path, "rb") as f:
            self._mem_map = mmap.mmap(f.fileno(), config.size, flags=_POPULATE, prot=mmap.PROT_READ)
        with open(self._ctl_path, "r+b") as f:
            self._ctl_map = mmap.mmap(f.fileno(), 0)
        self._ctl = np.frombuffer(self._ctl_map, dtype=np.int64, count=_CONTROL_BYTES // 8)
        self._maps = np.frombuffer(self._ctl_map, dtype=np.uint8, offset=_CONTROL_BYTES).reshape(
            2, pages
        )
        self._epoch = 0
        self._paused = False
        self._throttle = 0.0
        self._device_state = self._make_device_state()
        self.finished = False
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_spec(cls, spec: str) -> SimGuest:
        return cls(parse_spec(spec))

    def _start(self) -> None:
        # a fresh interpreter, not fork (the engine may already run threads) nor
        # multiprocessing's spawn (it re-imports the caller's main module)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        args = json.dumps(
            {
                "config": {**asdict(self.config), "dirty": self.config.dirty.value},
                "memory": self.memory_path,
                "control": self._ctl_path,
            }
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "live_migrate.guests.sim", args],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C reaches the engine, which pauses/resumes
        )
        self._wait(lambda: self._ctl[_READY] == 1, "start", timeout=60 + self.config.size / 5e8)
        # both sides have mapped the files: their names can go, the memory stays until
        # the last mapping does, and nothing is left in /dev/shm if a process dies
        self._unlink()

    def _wait(self, done, what: str, timeout: float = CONTROL_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self._proc is None or self._proc.poll() is not None:
                raise GuestError(f"sim guest: writer process died during {what}")
            if time.monotonic() > deadline:
                raise GuestError(f"sim guest: no answer from the writer to {what}")
            time.sleep(TICK / 2)

    def _make_device_state(self) -> bytes:
        # stands in for vCPU registers and device models: some structure, some entropy
        rng = np.random.default_rng(self.config.seed + 7)
        header = f"sim-device-state v1 pages={self._geometry.page_count}\n".encode()
        return header + rng.integers(0, 256, 64 << 10, dtype=np.uint8).tobytes()

    # -- SourceGuest --

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    @property
    def dirty_tracking(self) -> DirtyTracking:
        return self.config.dirty

    @property
    def is_paused(self) -> bool:
        return self._paused

    @property
    def can_throttle(self) -> bool:
        return True

    def memory(self) -> memoryview:
        return memoryview(self._mem_map)

    def start_dirty_log(self) -> None:
        self._require_log()
        self._flip()
        self._maps[:] = 0
        self._ctl[_LOGGING] = 1
        self._flip()  # whatever raced with the clearing is in the map we now clear
        self._maps[(self._epoch - 1) & 1] = 0

    def collect_dirty_log(self) -> np.ndarray:
        self._require_log()
        old = self._flip()
        dirty = self._maps[old].astype(bool)
        self._maps[old] = 0
        return dirty

    def stop_dirty_log(self) -> None:
        self._ctl[_LOGGING] = 0

    def _require_log(self) -> None:
        if self.config.dirty is not DirtyTracking.LOG:
            raise GuestError("sim guest: no dirty log in scan mode (dirty=scan)")

    def _flip(self) -> int:
        """Move the writer to the next epoch's map; return the map it left."""
        old = self._epoch & 1
        self._epoch += 1
        self._ctl[_EPOCH_REQ] = self._epoch
        self._wait(lambda: self._ctl[_EPOCH_ACK] == self._epoch, "an epoch flip")
        return old

    def pause(self) -> None:
        self._ctl[_COMMAND] = _PAUSE
        self._wait(lambda: self._ctl[_PAUSED] == 1, "pause")
        self._paused = True

    def resume(self) -> None:
        if self.finished:
            raise GuestError("sim guest: resumed after it migrated away")
        self._ctl[_COMMAND] = _RUN
        self._wait(lambda: self._ctl[_PAUSED] == 0, "resume")
        self._paused = False

    def set_throttle(self, fraction: float) -> None:
        self._throttle = min(max(fraction, 0.0), 0.99)
        self._ctl[_THROTTLE] = round(self._throttle * 1000)

    @property
    def throttle(self) -> float:
        return self._throttle

    def save_device_state(self) -> bytes:
        if not self._paused:
            raise GuestError("sim guest: device state asked of a running guest")
        return self._device_state

    def finish(self) -> None:
        self.finished = True

    # -- for tests and benchmarks --

    @property
    def pages_written(self) -> int:
        """Pages the writer has written since it started (repeats counted)."""
        return int(self._ctl[_WRITES])

    def step(self, batches: int = 1) -> None:
        """Deterministic mode: write `batches` batches of pages now, and wait."""
        if not self.config.deterministic:
            raise GuestError("sim guest: step() needs deterministic mode")
        target = int(self._ctl[_STEP_REQ]) + batches
        self._ctl[_STEP_REQ] = target
        self._wait(lambda: self._ctl[_STEP_DONE] >= target, "a step")

    def memory_hash(self) -> str:
        return hashlib.sha256(self._mem_map).hexdigest()

    def device_state_hash(self) -> str:
        return hashlib.sha256(self._device_state).hexdigest()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._proc is not None:
            self._ctl[_COMMAND] = _STOP
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._ctl = np.empty(0, dtype=np.int64)
        self._maps = np.empty((2, 0), dtype=np.uint8)
        for m in (self._mem_map, self._ctl_map):
            with contextlib.suppress(BufferError):
                m.close()
        self._unlink()

    def _unlink(self) -> None:
        for path in (self.memory_path, self._ctl_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def __enter__(self) -> SimGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: QEMU_VM_FILE_MAGIC, the first bytes of QEMU's migration stream: a QEMU guest's state
QEMU_STATE_MAGIC = b"QEVM"


class SimTarget:
    """A synthetic destination guest (implements `live_migrate.guest.TargetGuest`):
    zero-filled memory (a /dev/shm file with `keep`), device state kept as bytes; a QEMU
    guest's device state is refused."""

    state_format = StateFormat.SIM

    def __init__(self, geometry: Geometry, keep: bool = False, prealloc: bool = False) -> None:
        self._geometry = geometry
        self.keep = keep
        # memory appears as the receiver writes it, as in a QEMU started with -incoming:
        # zero pages are never written, and the first touch of fresh memory (about 1 s
        # per GiB on the development VMs) is paid by the pages received. `prealloc`
        # touches it all at creation instead, as QEMU's -mem-prealloc does
        populate = getattr(mmap, "MAP_POPULATE", 0) if prealloc else 0
        self.path: str | None = None
        if keep:
            self.path = _shm_file("p2v-sim-target-", geometry.memory_size)
            with open(self.path, "r+b") as f:
                self._map = mmap.mmap(
                    f.fileno(), geometry.memory_size, flags=mmap.MAP_SHARED | populate
                )
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            self._map = mmap.mmap(-1, geometry.memory_size, flags=flags)
            # transparent huge pages, as QEMU asks for its guest RAM (MADV_HUGEPAGE):
            # one fault per 2 MiB instead of 512, 3-6x faster first touch here
            _madvise(self._map, "MADV_HUGEPAGE")
            if prealloc:
                # MADV_POPULATE_WRITE after the advice, so that it populates huge pages
                _madvise(self._map, "MADV_POPULATE_WRITE", 23)
        self.device_state: bytes | None = None
        self.resumed = False
        self.discarded = False

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    def memory(self) -> memoryview:
        return memoryview(self._map)

    def load_device_state(self, state: bytes) -> None:
        if bytes(state[:4]) == QEMU_STATE_MAGIC:
            # accepted, it would stop the source QEMU for good with its guest in a
            # simulation that ends with this process; refused, the source resumes
            raise GuestError(
                "the source is a QEMU guest: receive it into a QEMU with "
                "`p2v receive --qemu QMP_SOCKET,ram=PATH` (docs/migration-qemu.md)"
            )
        self.device_state = bytes(state)

    def resume(self) -> None:
        if self.discarded:
            raise GuestError("sim target: resumed after it was discarded")
        self.resumed = True

    def discard(self) -> None:
        if self.discarded:
            return
        self.discarded = True
        self.close(unlink=True)

    def memory_hash(self) -> str:
        return hashlib.sha256(self._map).hexdigest()

    def close(self, unlink: bool = False) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        if unlink:
            self._unlink()

    def _unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None


def _madvise(region: mmap.mmap, name: str, fallback: int | None = None) -> bool:
    """Advise the kernel, if it knows the advice; False when it does not (old kernels,
    THP disabled): the memory works either way."""
    advice = getattr(mmap, name, fallback)
    if advice is None:
        return False
    try:
        region.madvise(advice)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def sim_guest(spec: str) -> Iterator[SimGuest]:
    guest = SimGuest.from_spec(spec)
    try:
        yield guest
    finally:
        guest.close()


def _child_entry(argv: list[str]) -> None:
    args = json.loads(argv[0])
    conf = args["config"]
    conf["dirty"] = DirtyTracking(conf["dirty"])
    _child_main(SimConfig(**conf), args["memory"], args["control"])


if __name__ == "__main__":
    _child_entry(sys.argv[1:])
