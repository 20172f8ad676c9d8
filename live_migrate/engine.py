"""The pre-copy engine: rounds of dirty pages while the guest runs, then switch-over.

    setup      handshake on every channel; the dirty log starts (or, in scan mode, the
               copy of what was sent is allocated: all zero, like the destination)
    iterating  round 0 sends every page; each later round sends the pages dirtied during
               the previous one. After each round the engine measures the dirty rate and
               the bandwidth and predicts the downtime: remaining bytes / bandwidth, or
               pages x the last resend rounds' time per page when that is longer (plus,
               in scan mode, the time of a full scan, because the last one runs paused)
    stopping   when the prediction is under `max_downtime`: pause the source, collect the
               last dirty pages, send them and the device state, then END with the digest
               of every page's fingerprint; the destination checks it and ACKs; GO; the
               destination resumes and says RESUMED. Downtime = pause -> RESUMED received.

Until the ACK, any failure (the destination died, a corrupt stream, the time limit, a
cancel) resumes the source and tells the destination to discard what it has. After the
ACK the source never runs again: if the GO or the RESUMED is lost the guest is left
paused here, so that it never runs on both hosts; the report says so.

Auto-converge follows QEMU's cpu-throttle: when the pages dirtied during a round exceed
half of the bytes sent in it, twice in a row, the throttle goes up (20 %, then +10 % each
time, up to 99 %). Without it, a guest that does not converge within `max_rounds` or
`max_time` is left running and the migration fails.

Batches are encoded on a thread pool (numpy and the compressors release the GIL) and
sent by one thread per channel; a round ends on every channel with ROUND_END, so that the
receiver applies the rounds in order whatever channel carried a page.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import google_crc32c
import numpy as np

from live_migrate import heap, wire
from live_migrate import pages as pg
from live_migrate.channel import Channel
from live_migrate.compression import compress
from live_migrate.errors import (
    CancelledError,
    ConvergenceError,
    GuestError,
    MigrationError,
    ProtocolError,
    RefusedError,
    TimeLimitError,
    TransportError,
)
from live_migrate.guest import DirtyTracking, SourceGuest, StateFormat
from live_migrate.report import MigrationReport, PageCounts, Progress, RoundReport
from live_migrate.states import MigrationState, StateMachine
from live_migrate.transport import LimitedStream, RateLimiter, Stream, round_trip_time
from live_migrate.wire import Encoding, Feature, FrameType, PageKind

#: beyond this many runs of full pages in a batch, one gathered copy beats many iovecs
MAX_RUNS = 256
#: rounds of fewer pages are mostly fixed costs (ROUND_END, queue hand-offs): not timed
MIN_TIMED_PAGES = 512
#: the paused scan goes in this many parts, the pages of each sent during the next
SCAN_PARTS = 8
COMPRESSIONS = {"zstd": Encoding.ZSTD, "lz4": Encoding.LZ4}
_FEATURE_OF = {Encoding.ZSTD: Feature.ZSTD, Encoding.LZ4: Feature.LZ4}


@dataclass
class MigrationOptions:
    """The knobs, with QEMU's defaults where QEMU has the same knob (INTEROP.md)."""

    max_downtime: float = 0.300  # seconds; QEMU's downtime-limit
    max_bandwidth: float | None = None  # bytes/s for all channels together; None: no cap
    # the cap shares a link while the guest runs; paused, the guest waits for every byte,
    # so QEMU sends its final stage unlimited, and so does this unless told otherwise
    cap_switch_over: bool = False
    max_rounds: int = 30  # Clark et al. stop after about 30 rounds
    max_time: float = 600.0  # seconds before switch-over, then abort
    auto_converge: bool = False
    # once the prediction fits, rounds go on while each dirties less than half of what it
    # sent and the last transfer would still take more than this fraction of
    # max_downtime: such rounds are short and cost the guest nothing, the downtime does.
    # 0 switches over at the first fit, as QEMU does
    final_transfer_goal: float = 0.05
    throttle_initial: float = 0.20
    throttle_increment: float = 0.10
    throttle_max: float = 0.99
    zero_pages: bool = True  # zero pages travel as a flag
    compress: str | None = None  # "zstd" or "lz4"
    delta: bool = False  # resent pages as word deltas against the last sent copy
    batch_pages: int = 1024  # 4 MiB of 4 KiB pages per batch
    workers: int = 0  # encoder threads; 0: one per core
    reply_timeout: float = 30.0  # for WELCOME, ACK and RESUMED

    def __post_init__(self) -> None:
        if self.compress not in (None, *COMPRESSIONS):
            raise ValueError(f"compression {self.compress!r}: expected zstd, lz4 or none")
        if self.max_downtime <= 0:
            raise ValueError("max_downtime must be positive")
        if not 1 <= self.batch_pages <= wire.MAX_BATCH_PAGES:
            raise ValueError(f"batch_pages must be within 1..{wire.MAX_BATCH_PAGES}")


@dataclass
class _Encoded:
    parts: list[bytes | memoryview]
    pages: int
    counts: PageCounts


@dataclass
class _RoundEnd:
    round: int


@dataclass
class _SendStats:
    pages: int = 0
    wire_bytes: int = 0
    send_time: float = 0.0
    counts: PageCounts = field(default_factory=PageCounts)


class Migration:
    """One migration of `guest` over `streams` (channel 0 first). `run()` once; `cancel()`
    from any thread. The report is returned whatever happens; only programming errors
    raise out of `run()`."""

    def __init__(
        self,
        guest: SourceGuest,
        streams: Sequence[Stream],
        options: MigrationOptions | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> None:
        if not streams or len(streams) > wire.MAX_CHANNELS:
            raise ValueError(f"a migration needs 1..{wire.MAX_CHANNELS} channels")
        self.guest = guest
        self.options = options or MigrationOptions()
        self.progress = progress
        self._sm = StateMachine()
        limiter = RateLimiter(self.options.max_bandwidth) if self.options.max_bandwidth else None
        self._limiter = limiter
        self.channels = [
            Channel(LimitedStream(s, limiter) if limiter else s, i) for i, s in enumerate(streams)
        ]
        g = guest.geometry
        self.page_size = g.page_size
        self.page_count = g.page_count
        self.tracking = guest.dirty_tracking
        self._cancel = threading.Event()
        self._failure: BaseException | None = None
        self._failure_lock = threading.Lock()
        self._replies: queue.Queue = queue.Queue()
        self._closing = False
        self._committed = False
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._executor: ThreadPoolExecutor | None = None
        self._encoding = Encoding.RAW
        self._zero_pages = self.options.zero_pages
        self._delta = self.options.delta
        # results
        self._rounds: list[RoundReport] = []
        self._counts = PageCounts()
        self._bytes_sent = 0
        self._setup_time = 0.0
        self._downtime: float | None = None
        self._paused_at: float | None = None
        self._expected: float | None = None
        self._throttle = 0.0
        self._max_throttle = 0.0
        self._device_state_bytes = 0
        self._error: str | None = None
        self._source_running = True
        self._resumed = False
        self._memory_verified = False
        self._features: list[str] = []
        self._bandwidth = 0.0
        self._bandwidths: list[float] = []  # the last two rounds' that say something
        self._digest_time = 0.0
        self._wire_ratio = 1.0
        self._page_times: list[float] = []  # seconds per page, the last two resend rounds
        self._latency = 0.0
        self._phases: dict[str, float] = {}  # switch-over: seconds per step

    @property
    def state(self) -> MigrationState:
        return self._sm.state

    @property
    def states(self) -> list[MigrationState]:
        return self._sm.sequence

    def cancel(self) -> None:
        """Stop the migration and leave the guest running here (ignored once the
        destination acknowledged: then the switch-over completes)."""
        self._cancel.set()

    # -- the run ----------------------------------------------------------------------

    def run(self) -> MigrationReport:
        self._sm.require(MigrationState.SETUP)
        t0 = time.monotonic()
        try:
            self._setup()
            self._setup_time = time.monotonic() - t0
            self._sm.enter(MigrationState.ITERATING)
            last_dirty = self._iterate(t0)
            self._sm.enter(MigrationState.STOPPING)
            self._switch_over(last_dirty)
            self._sm.enter(MigrationState.COMPLETED)
        except (Exception, KeyboardInterrupt) as exc:
            self._abandon(exc)
        finally:
            self._shut_down()
        return self._report(time.monotonic() - t0)

    def _setup(self) -> None:
        heap.keep_freed_memory()  # temporaries of resent pages not faulted in again
        opts = self.options
        requested = Feature(0)
        if self._zero_pages:
            requested |= Feature.ZERO_PAGES
        if opts.compress:
            requested |= _FEATURE_OF[COMPRESSIONS[opts.compress]]
        if self._delta:
            requested |= Feature.DELTA
        if self.guest.state_format is StateFormat.QEMU:
            requested |= Feature.QEMU_STATE
        ch0 = self.channels[0]
        hello = wire.build_hello(self.page_size, self.page_count, requested, len(self.channels))
        session = wire.Hello.parse(hello).session
        reader = threading.Thread(target=self._reader, name="p2v-replies", daemon=True)
        self._threads.append(reader)
        reader.start()
        t = time.monotonic()
        ch0.send(FrameType.HELLO, [hello])
        ftype, body = self._reply()
        if ftype is not FrameType.WELCOME:
            raise ProtocolError(f"{ftype.name} frame, expected WELCOME")
        # the WELCOME waited for the target's creation: the kernel knows the real RTT
        rtts = [round_trip_time(ch.stream) for ch in self.channels]
        known = [r for r in rtts if r is not None]
        self._latency = max(known) if known else min(time.monotonic() - t, 0.05)
        welcome = wire.parse_body(wire.Welcome, body, "WELCOME")
        if not welcome.accepted:
            raise RefusedError(f"the destination refused the migration: {welcome.reason}")
        accepted = Feature(welcome.features) & requested
        if requested & Feature.QEMU_STATE and not accepted & Feature.QEMU_STATE:
            raise RefusedError("the destination cannot load a QEMU guest's device state")
        self._zero_pages = bool(accepted & Feature.ZERO_PAGES)
        self._delta = bool(accepted & Feature.DELTA)
        if opts.compress and accepted & _FEATURE_OF[COMPRESSIONS[opts.compress]]:
            self._encoding = COMPRESSIONS[opts.compress]
        self._features = [str(f.name).lower() for f in Feature if f & accepted]
        for ch in self.channels[1:]:
            ch.send(FrameType.JOIN, [wire.Join.build(dict(session=session, channel=ch.index))])

        self.mem = pg.as_pages(self.guest.memory(), self.page_size)
        if self.mem.shape[0] != self.page_count:
            raise GuestError(
                f"guest memory is {self.mem.nbytes} bytes, expected {self.page_count} pages"
            )
        self.weights = pg.fingerprint_weights(self.page_size)
        self.fp = np.zeros(self.page_count, dtype=np.uint64)
        t = time.monotonic()
        pg.memory_digest(self.fp)  # a part of the downtime, on each side
        self._digest_time = time.monotonic() - t
        # what the destination holds: needed to scan, and to send deltas against
        self.sent: np.ndarray | None = None
        if self.tracking is DirtyTracking.SCAN or self._delta:
            # np.zeros is calloc: pages materialise when sent (zeros_like writes them all)
            self.sent = np.zeros(self.mem.shape, dtype=self.mem.dtype)
        self._sent_zero = np.ones(self.page_count, dtype=bool)  # rows of `sent` known zero
        # a delta is worth it when it is at most half a page (masks included)
        self.max_delta_words = (self.page_size // 2 - wire.delta_mask_bytes(self.page_size)) // 8
        workers = self.options.workers or os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="p2v-encode")
        self._in_flight = 2 * workers + len(self.channels)
        for ch in self.channels:
            q: queue.Queue = queue.Queue(maxsize=4)
            th = threading.Thread(
                target=self._sender, args=(ch, q), name=f"p2v-send-{ch.index}", daemon=True
            )
            self._queues.append(q)
            self._threads.append(th)
            th.start()
        if self.tracking is DirtyTracking.LOG:
            self.guest.start_dirty_log()

    def _iterate(self, t0: float) -> np.ndarray:
        """Pre-copy rounds; returns the dirty pages left when the prediction fits."""
        opts = self.options
        ps = self.page_size
        dirty = np.arange(self.page_count, dtype=np.int64)
        last_collect = time.monotonic()
        high_rounds = 0
        round_no = 0
        while True:
            self._check()
            throttle = self._throttle
            stats = self._send_round(round_no, dirty)
            t_scan = time.monotonic()
            dirty = self._collect()
            now = time.monotonic()
            scan_time = now - t_scan
            period = max(now - last_collect, 1e-6)
            last_collect = now
            dirty_bytes = len(dirty) * ps
            dirty_rate = dirty_bytes / period
            self._learn(round_no, stats)
            expected = self._predict(len(dirty), scan_time)
            self._expected = expected
            self._rounds.append(
                RoundReport(
                    round=round_no,
                    pages_sent=stats.pages,
                    bytes_sent=stats.wire_bytes,
                    duration=period,
                    bandwidth=stats.wire_bytes / stats.send_time if stats.send_time else 0.0,
                    dirty_pages=len(dirty),
                    dirty_rate=dirty_rate,
                    scan_time=scan_time,
                    expected_downtime=expected,
                    throttle=throttle,
                    pages=stats.counts,
                )
            )
            self._notify(round_no, dirty_bytes, dirty_rate, expected)
            if not len(dirty):
                # with nothing dirty, more rounds cannot shorten the pause: what is left
                # (a final scan, two round trips) is the floor, reported as expected
                return dirty
            if expected <= opts.max_downtime:
                shrinking = len(dirty) <= stats.pages / 2
                goal = opts.final_transfer_goal * opts.max_downtime
                if not goal or not shrinking or self._transfer_time(len(dirty)) <= goal:
                    return dirty
            self._check()
            elapsed = time.monotonic() - t0
            if elapsed > opts.max_time:
                raise TimeLimitError(
                    f"no switch-over within the {opts.max_time:g} s limit: "
                    f"{self._diagnosis(dirty_rate, expected)}"
                )
            if round_no + 1 >= opts.max_rounds:
                raise ConvergenceError(
                    f"no convergence in {opts.max_rounds} rounds: "
                    f"{self._diagnosis(dirty_rate, expected)}"
                )
            if opts.auto_converge and self.guest.can_throttle:
                # QEMU's trigger: dirtied more than half of what was sent, twice running
                high_rounds = high_rounds + 1 if dirty_bytes > stats.wire_bytes / 2 else 0
                if high_rounds >= 2:
                    high_rounds = 0
                    self._raise_throttle()
            round_no += 1

    def _switch_over(self, dirty: np.ndarray) -> None:
        ch0 = self.channels[0]
        phases = self._phases
        t_pause = mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[name] = now - mark
            mark = now

        self._paused_at = time.time()
        self.guest.pause()
        self._source_running = False
        if self._limiter is not None and not self.options.cap_switch_over:
            self._limiter.enabled = False
        phase("pause")
        final = len(self._rounds)
        if self.tracking is DirtyTracking.LOG:
            # what the last round left, and what was written since its collection (a
            # mask, not np.union1d: its first call costs 20 ms of numpy's lazy set-up)
            mask = np.array(self._dirty_mask(), dtype=bool)
            mask[dirty] = True
            self.guest.stop_dirty_log()
            phase("collect")
            stats = self._send_round(final, np.flatnonzero(mask))
        else:
            # the scan compares with what was sent (it finds both the last round's pages
            # and the later writes) a part of memory at a time, and the pages found are
            # encoded and sent while it goes on: only the tail of the sending remains
            # when it ends
            stats = self._send_round(final, self._scan_parts(lambda: phase("collect")))
        phase("send")
        scan_time = phases["collect"]
        state = self.guest.save_device_state()
        self._device_state_bytes = len(state)
        ch0.send(
            FrameType.DEVICE_STATE,
            [wire.DeviceState.build(dict(crc=google_crc32c.value(state), state=state))],
        )
        phase("device_state")
        digest = pg.memory_digest(self.fp)
        pages_sent = sum(r.pages_sent for r in self._rounds) + stats.pages
        end = wire.End.build(
            dict(
                rounds=final + 1,
                pages_sent=pages_sent,
                memory_digest=digest,
                device_state_length=len(state),
            )
        )
        ch0.send(FrameType.END, [end])
        ftype, body = self._reply()
        if ftype is not FrameType.ACK:
            raise ProtocolError(f"{ftype.name} frame, expected the destination's ACK")
        if wire.parse_body(wire.Ack, body, "ACK").memory_digest != digest:
            raise ProtocolError("the destination acknowledged a different memory digest")
        self._memory_verified = True
        phase("acknowledge")
        # the destination holds everything: from here the source must never run again
        self._committed = True
        ch0.send(FrameType.GO)
        ftype, body = self._reply()
        if ftype is not FrameType.RESUMED:
            raise ProtocolError(f"{ftype.name} frame, expected RESUMED")
        wire.parse_body(wire.Resumed, body, "RESUMED")
        phase("resume")
        self._downtime = time.monotonic() - t_pause
        self._resumed = True
        self.guest.finish()
        self._bytes_sent = sum(ch.bytes_sent for ch in self.channels)
        duration = time.monotonic() - t_pause
        self._rounds.append(
            RoundReport(
                round=final,
                pages_sent=stats.pages,
                bytes_sent=stats.wire_bytes,
                duration=duration,
                bandwidth=stats.wire_bytes / stats.send_time if stats.send_time else 0.0,
                dirty_pages=0,
                dirty_rate=0.0,
                scan_time=scan_time,
                expected_downtime=self._expected or 0.0,
                throttle=self._throttle,
                pages=stats.counts,
                final=True,
            )
        )

    # -- failure ------------------------------------------------------------------------

    def _abandon(self, exc: BaseException) -> None:
        """Leave the guest running here (or, once committed, paused) and say why."""
        cancelled = isinstance(exc, (CancelledError, KeyboardInterrupt))
        if isinstance(exc, KeyboardInterrupt):
            exc = CancelledError("interrupted")
        self._error = _describe(exc)
        if not self._committed:
            with contextlib.suppress(Exception):
                reason = wire.Abort.build(dict(reason=self._error[:4000]))
                self.channels[0].send(FrameType.ABORT, [reason])
            self._closing = True
            for ch in self.channels:
                ch.close()  # unblocks the senders before the guest is touched
            try:
                if self.tracking is DirtyTracking.LOG:
                    self.guest.stop_dirty_log()
                self.guest.set_throttle(0.0)
                if self.guest.is_paused:
                    self.guest.resume()
                self._source_running = True
            except Exception as guest_exc:  # the report must still come back
                self._source_running = not self.guest.is_paused
                self._error += f"; the source could not be resumed: {_describe(guest_exc)}"
        else:
            self._source_running = False
            self._error += (
                "; the destination had acknowledged all memory and device state, so the "
                "guest was left paused on the source (never running on both hosts): "
                "check whether it runs on the destination"
            )
        final = MigrationState.CANCELLED if cancelled else MigrationState.FAILED
        self._sm.enter(final)
        self._bytes_sent = sum(ch.bytes_sent for ch in self.channels)

    def _fail(self, exc: BaseException) -> None:
        with self._failure_lock:
            if self._failure is None:
                self._failure = exc

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._cancel.is_set() and not self._committed:
            raise CancelledError("cancelled")

    def _shut_down(self) -> None:
        self._closing = True
        for ch in self.channels:
            ch.close()
        for q in self._queues:
            with contextlib.suppress(queue.Full):
                q.put(None, timeout=1.0)
        for th in self._threads:
            th.join(timeout=5.0)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        # the threads' frames stay in reference cycles (tracebacks of the exceptions that
        # ended them) until a garbage collection: without these references, the guest's
        # memory and the copy of what was sent are released now, not during whatever
        # runs next (unmapping a GiB costs 0.3 s of CPU there)
        self.mem = np.empty((0, self.page_size // 8), dtype=np.uint64)
        self.fp = np.empty(0, dtype=np.uint64)
        self.sent = None
        self._queues = []

    # -- threads ------------------------------------------------------------------------

    def _sender(self, ch: Channel, q: queue.Queue) -> None:
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                if self._failure is not None:
                    continue  # drain: the main thread is unwinding
                if isinstance(item, _RoundEnd):
                    pages = self._channel_pages[ch.index]
                    ch.send(
                        FrameType.ROUND_END,
                        [wire.RoundEnd.build(dict(round=item.round, pages=pages))],
                    )
                else:
                    ch.send(FrameType.BATCH, item.parts)
                    self._channel_pages[ch.index] += item.pages
            except BaseException as exc:
                if not self._closing:
                    self._fail(exc)
            finally:
                q.task_done()

    def _reader(self) -> None:
        """Channel 0's replies (WELCOME, ACK, RESUMED) and the destination's ABORT at
        any time: a destination that gives up mid-round stops the source at once."""
        ch0 = self.channels[0]
        try:
            while True:
                ftype, body = ch0.receive(may_idle=True)
                if ftype is FrameType.ABORT:
                    reason = wire.parse_body(wire.Abort, body, "ABORT").reason
                    raise RefusedError(f"the destination aborted: {reason}")
                if ftype not in (FrameType.WELCOME, FrameType.ACK, FrameType.RESUMED):
                    raise ProtocolError(f"unexpected {ftype.name} frame from the destination")
                self._replies.put((ftype, bytes(body)))
        except BaseException as exc:
            if not self._closing:
                self._fail(exc)
                self._replies.put(exc)

    def _reply(self) -> tuple[FrameType, bytes]:
        try:
            item = self._replies.get(timeout=self.options.reply_timeout)
        except queue.Empty:
            raise TransportError(
                f"no answer from the destination within {self.options.reply_timeout:g} s"
            ) from None
        if isinstance(item, BaseException):
            raise item
        return item

    # -- rounds -------------------------------------------------------------------------

    def _send_round(self, round_no: int, dirty: np.ndarray | Iterable[np.ndarray]) -> _SendStats:
        """Encode and send the pages `dirty` (sorted page numbers, or parts of them in
        order as they are found), then ROUND_END on every channel; returns when every
        byte is handed to the transports."""
        stats = _SendStats()
        self._channel_pages = [0] * len(self.channels)
        before = sum(ch.bytes_sent for ch in self.channels)
        t0 = time.monotonic()
        assert self._executor is not None
        step = self.options.batch_pages
        pending: list[Future] = []
        target = 0
        for part in [dirty] if isinstance(dirty, np.ndarray) else dirty:
            for start in range(0, len(part), step):
                self._check()
                pending.append(
                    self._executor.submit(self._encode, round_no, part[start : start + step])
                )
                while len(pending) >= self._in_flight:
                    target = self._dispatch(pending.pop(0), stats, target)
            # the senders get what is encoded before the next part is looked for
            while pending and pending[0].done():
                target = self._dispatch(pending.pop(0), stats, target)
        for fut in pending:
            target = self._dispatch(fut, stats, target)
        for q in self._queues:
            self._put(q, _RoundEnd(round_no))
        for q in self._queues:
            self._drain(q)
        self._check()
        stats.send_time = time.monotonic() - t0
        stats.wire_bytes = sum(ch.bytes_sent for ch in self.channels) - before
        self._counts.add(stats.counts)
        return stats

    def _dispatch(self, fut: Future, stats: _SendStats, target: int) -> int:
        encoded: _Encoded = fut.result()
        stats.pages += encoded.pages
        stats.counts.add(encoded.counts)
        self._put(self._queues[target], encoded)
        return (target + 1) % len(self._queues)

    def _put(self, q: queue.Queue, item: object) -> None:
        while True:
            self._check()
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _drain(self, q: queue.Queue) -> None:
        with q.all_tasks_done:
            while q.unfinished_tasks:
                if self._failure is not None:
                    break
                q.all_tasks_done.wait(0.05)
        self._check()

    def _encode(self, round_no: int, idx: np.ndarray) -> _Encoded:
        """One batch: snapshot, zero pages, deltas, fingerprints, compression.

        The bytes sent and the copy kept as "last sent" must be the same bytes, so when a
        copy is kept the batch is sent from it. Without one (dirty log, no deltas) full
        pages go from guest memory to the socket with no copy: a page torn by a racing
        write is dirty in the log and goes again next round.

        Zero pages are found on guest memory before the copy and are not copied: the kept
        copy starts as untouched zero memory, and writing zeros into it would fault in as
        much memory as the guest has. A page written between the test and the copy was
        announced as zero and the kept copy says zero: the next scan finds it.
        """
        mem, sent = self.mem, self.sent
        first, last = int(idx[0]), int(idx[-1])
        n = len(idx)
        contiguous = last - first + 1 == n
        use_delta = self._delta and round_no > 0 and sent is not None
        live = mem[first : last + 1] if contiguous else mem.take(idx, axis=0)
        if sent is None:
            return self._encode_live(round_no, idx, live)
        zero = pg.zero_pages(live) if self._zero_pages else np.zeros(n, dtype=bool)
        if use_delta:
            snap = live.copy() if contiguous else live  # the old copy is needed for deltas
        else:
            snap = self._keep(live, zero, first, last, idx, contiguous)
        kinds = np.full(n, PageKind.FULL, dtype=np.uint8)
        kinds[zero] = PageKind.ZERO
        zero_count = int(np.count_nonzero(zero))
        if zero_count == n:
            fps = np.zeros(n, dtype=np.uint64)
        else:
            fps = pg.fingerprints(snap, self.weights)
            # a page written since its zero test was announced as zero: the destination
            # holds zeros (its write is dirty, and goes next round)
            fps[zero] = 0
        masks = values = np.empty(0, dtype=np.uint64)
        delta_count = 0
        if use_delta:
            assert sent is not None
            cand = np.flatnonzero(kinds == PageKind.FULL)
            if len(cand):
                # no zero page (the usual final round): no copy of the batch for deltas
                every = len(cand) == n
                if contiguous:
                    old = sent[first : last + 1] if every else sent[first + cand]
                else:
                    old = sent[idx] if every else sent[idx[cand]]
                new = snap if every else snap[cand]
                use, masks, values = pg.delta_encode(new, old, self.max_delta_words)
                kinds[cand[use]] = PageKind.DELTA
                delta_count = int(use.sum())
            self._keep(snap, zero, first, last, idx, contiguous)
        if contiguous:
            self.fp[first : last + 1] = fps
        else:
            self.fp[idx] = fps
        full_count = int(np.count_nonzero(kinds == PageKind.FULL))
        data = _row_runs(snap, kinds == PageKind.FULL, full_count)
        data += [a.data.cast("B") for a in (masks, values) if a.size]
        return self._package(round_no, idx, kinds, full_count, delta_count, len(values), data)

    def _encode_live(self, round_no: int, idx: np.ndarray, live: np.ndarray) -> _Encoded:
        """A batch sent from guest memory itself (no copy kept): fingerprints first, in
        the one pass that brings the pages from memory, then the zero test on the rows
        whose fingerprint is 0, while they are in cache (a zero page's fingerprint is 0,
        so no zero page is missed). A page written between the two looks is dirty and
        goes again next round, as in `_encode`."""
        n = len(idx)
        fps = pg.fingerprints(live, self.weights)
        zero = np.zeros(n, dtype=bool)
        if self._zero_pages:
            cand = np.flatnonzero(fps == 0)
            if len(cand) == n:
                zero = pg.zero_pages(live)
            elif len(cand):
                zero[cand] = pg.zero_pages(live[cand])
        full_count = n - int(np.count_nonzero(zero))
        first, last = int(idx[0]), int(idx[-1])
        if last - first + 1 == n:
            self.fp[first : last + 1] = fps
        else:
            self.fp[idx] = fps
        kinds = np.where(zero, np.uint8(PageKind.ZERO), np.uint8(PageKind.FULL))
        data = _row_runs(live, ~zero, full_count)
        return self._package(round_no, idx, kinds, full_count, 0, 0, data)

    def _package(
        self,
        round_no: int,
        idx: np.ndarray,
        kinds: np.ndarray,
        full_count: int,
        delta_count: int,
        delta_words: int,
        data: list[memoryview],
    ) -> _Encoded:
        """Compress the data section if asked (and worth it), and put the batch's
        header and tables before it."""
        n = len(idx)
        encoding = Encoding.RAW
        counts = PageCounts(zero=n - full_count - delta_count, full=full_count, delta=delta_count)
        parts: list[bytes | memoryview] = list(data)
        if self._encoding is not Encoding.RAW and data:
            packed = compress(self._encoding, data[0] if len(data) == 1 else b"".join(data))
            if packed is not None:
                parts = [memoryview(packed)]
                encoding = self._encoding
                counts.compressed, counts.full = full_count, 0
        stored = sum(memoryview(d).nbytes for d in parts)
        prefix = wire.build_batch_prefix(
            round_no, idx, kinds, full_count, delta_count, delta_words, encoding, stored
        )
        return _Encoded(parts=[*prefix, *parts], pages=n, counts=counts)

    def _keep(
        self,
        rows: np.ndarray,
        zero: np.ndarray,
        first: int,
        last: int,
        idx: np.ndarray,
        contiguous: bool,
    ) -> np.ndarray:
        """Store `rows` as the destination's copy of pages `idx`, without writing the
        zero rows whose copy is zero already; return the kept rows (a view of the copy
        when the pages are contiguous, else `rows` itself)."""
        sent, known_zero = self.sent, self._sent_zero
        assert sent is not None
        if contiguous:
            kept = sent[first : last + 1]
            if zero.any():
                np.copyto(kept, rows, where=~zero[:, None])
                stale = zero & ~known_zero[first : last + 1]
                if stale.any():
                    kept[stale] = 0
            else:
                np.copyto(kept, rows)
            known_zero[first : last + 1] = zero
            return kept
        if not zero.any():
            sent[idx] = rows
            known_zero[idx] = False
            return rows
        nonzero = ~zero
        sent[idx[nonzero]] = rows[nonzero]
        stale = idx[zero & ~known_zero[idx]]
        if len(stale):
            sent[stale] = 0
        known_zero[idx] = zero
        return rows

    def _scan_parts(self, scanned: Callable[[], None]) -> Iterator[np.ndarray]:
        """The changed pages (scan mode), a part of memory at a time; `scanned()` is
        called when the last part is compared."""
        assert self.sent is not None
        n = self.page_count
        size = max(pg.BLOCK_PAGES, -(-n // SCAN_PARTS))
        for start in range(0, n, size):
            end = min(start + size, n)
            mask = pg.changed_pages(self.mem[start:end], self.sent[start:end], self._executor)
            if end == n:
                scanned()
            yield np.flatnonzero(mask) + start

    def _collect(self) -> np.ndarray:
        return np.flatnonzero(self._dirty_mask())

    def _dirty_mask(self) -> np.ndarray:
        if self.tracking is DirtyTracking.LOG:
            mask = self.guest.collect_dirty_log()
            if mask.shape != (self.page_count,):
                raise GuestError(f"dirty log of {mask.shape} entries for {self.page_count} pages")
        else:
            assert self.sent is not None
            mask = pg.changed_pages(self.mem, self.sent, self._executor)
        return mask

    # -- measurement and prediction ----------------------------------------------------

    def _learn(self, round_no: int, stats: _SendStats) -> None:
        """Bandwidth, bytes-per-page and seconds-per-page from the round just sent (QEMU
        uses the last period). Tiny rounds are mostly latency: they do not update the
        estimates."""
        if stats.send_time > 0 and (stats.wire_bytes >= 4 << 20 or not self._bandwidths):
            self._bandwidths = [*self._bandwidths[-1:], stats.wire_bytes / stats.send_time]
            self._bandwidth = self._bandwidths[-1]
        data_pages = stats.counts.full + stats.counts.compressed + stats.counts.delta
        if data_pages:
            # dirty pages are written pages: expect them to cost what data pages cost
            ratio = stats.wire_bytes / (data_pages * self.page_size)
            self._wire_ratio = min(max(ratio, 0.01), 1.1)
        if round_no and stats.pages >= MIN_TIMED_PAGES:
            # resent pages are what the final round holds: scattered, often deltas, whose
            # gathering, encoding and applying can cost more than the few bytes they put
            # on the wire (20 MB of deltas: 0.3 MB sent, 22 ms of work)
            self._page_times = [*self._page_times[-1:], stats.send_time / stats.pages]

    def _predict(self, dirty_pages: int, scan_time: float) -> float:
        """The downtime if the guest paused now: the dirty pages at the slower of the
        last two rounds' bandwidths (a link shared with other traffic varies, and a
        downtime over the limit costs more than one round more), the final collection
        (a full scan in scan mode, a log flip otherwise), the memory digest on both
        sides, and END -> ACK, GO -> RESUMED: two round trips."""
        fixed = scan_time + 2 * self._digest_time + 2 * self._latency
        return self._transfer_time(dirty_pages) + fixed

    def _transfer_time(self, dirty_pages: int) -> float:
        """The final round's sending: on the wire, or in the work per page when that is
        the slower (the slower of the last two resend rounds')."""
        bandwidth = max(min(self._bandwidths, default=0.0), 1.0)
        if self.options.max_bandwidth:
            bandwidth = min(bandwidth, self.options.max_bandwidth)
        wire_time = dirty_pages * self.page_size * self._wire_ratio / bandwidth
        return max(wire_time, dirty_pages * max(self._page_times, default=0.0))

    def _diagnosis(self, dirty_rate: float, expected: float) -> str:
        tip = "" if self.options.auto_converge else "; try --auto-converge"
        return (
            f"dirty rate {dirty_rate / 1e6:.1f} MB/s against {self._bandwidth / 1e6:.1f} MB/s "
            f"of bandwidth, expected downtime {expected * 1000:.0f} ms > "
            f"{self.options.max_downtime * 1000:.0f} ms{tip}"
        )

    def _raise_throttle(self) -> None:
        opts = self.options
        if self._throttle == 0:
            new = opts.throttle_initial
        else:
            new = min(self._throttle + opts.throttle_increment, opts.throttle_max)
        if new != self._throttle:
            self._throttle = new
            self._max_throttle = max(self._max_throttle, new)
            self.guest.set_throttle(new)

    def _notify(self, round_no: int, remaining: int, dirty_rate: float, expected: float) -> None:
        if self.progress is None:
            return
        self.progress(
            Progress(
                state=self.state,
                round=round_no,
                memory_size=self.page_count * self.page_size,
                bytes_sent=sum(ch.bytes_sent for ch in self.channels),
                remaining=remaining,
                dirty_rate=dirty_rate,
                bandwidth=self._bandwidth,
                expected_downtime=expected,
                throttle=self._throttle,
            )
        )

    def _report(self, total: float) -> MigrationReport:
        return MigrationReport(
            state=self.state,
            error=self._error,
            source_running=self._source_running,
            destination_resumed=self._resumed,
            memory_verified=self._memory_verified,
            total_time=total,
            setup_time=self._setup_time,
            downtime=self._downtime,
            paused_at=self._paused_at,
            expected_downtime=self._expected,
            memory_size=self.page_count * self.page_size,
            page_size=self.page_size,
            bytes_sent=self._bytes_sent,
            pages=self._counts,
            rounds=self._rounds,
            dirty_tracking=self.tracking.value,
            channels=len(self.channels),
            features=self._features,
            max_downtime=self.options.max_downtime,
            max_bandwidth=self.options.max_bandwidth,
            auto_converge=self.options.auto_converge,
            throttle=self._max_throttle,
            device_state_bytes=self._device_state_bytes,
            switch_over=dict(self._phases),
            states=[(s.value, t) for s, t in self._sm.history],
        )


def _row_runs(rows: np.ndarray, selected: np.ndarray, count: int) -> list[memoryview]:
    """The selected rows as byte views, one per run of consecutive selected rows: the
    transport gathers them (sendmsg) without a copy here."""
    if count == len(rows):
        return [rows.data.cast("B")] if count else []
    if count == 0:
        return []
    edges = np.flatnonzero(np.diff(selected.astype(np.int8), prepend=0, append=0))
    if len(edges) > 2 * MAX_RUNS:
        return [np.compress(selected, rows, axis=0).data.cast("B")]
    return [rows[a:b].data.cast("B") for a, b in zip(edges[::2], edges[1::2])]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MigrationError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def migrate(
    guest: SourceGuest,
    streams: Sequence[Stream],
    options: MigrationOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> MigrationReport:
    """Migrate `guest` over `streams` (channel 0 first); the report says how it ended."""
    return Migration(guest, streams, options, progress).run()
