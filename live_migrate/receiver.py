"""The destination: validate the stream, build the target guest, acknowledge, resume.

Every field that arrives is checked before it is used (`wire.parse_*`): page numbers in
range and increasing, counts and sizes under caps, kinds and encodings known and agreed
in the handshake, rounds in order on every channel, the frame sequence unbroken. A bad
stream ends the migration with a one-line `ProtocolError`: the receiver tells the source
(ABORT), discards the target, and returns its report; it never raises on what a peer
sends, never allocates more than a frame's cap, never hangs past its timeouts.

Pages are written into the target's memory as they arrive (like QEMU's incoming side):
the target never runs before the source commits, so a failure only has to discard it.
Each page's fingerprint is kept as it is applied; at END the digest of them all must
equal the source's, so a page lost or garbled anywhere on the way is caught before the
ACK.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numpy as np

from live_migrate import heap, wire
from live_migrate import pages as pg
from live_migrate.channel import Channel
from live_migrate.compression import decompress
from live_migrate.errors import (
    MigrationError,
    ProtocolError,
    RefusedError,
    TransportError,
)
from live_migrate.guest import Geometry, StateFormat, TargetFactory, TargetGuest
from live_migrate.report import PageCounts
from live_migrate.transport import Listener, Stream
from live_migrate.wire import Encoding, Feature, FrameType, PageKind

log = logging.getLogger(__name__)

#: a batch whose full pages form at most this many runs is read straight into the
#: target's memory, one read per run; more runs are read at once and scattered
DIRECT_RUNS = 64
#: the same over a stream that scatters a read over many buffers (recvmsg_into, readv):
#: one system call fills every run, and no copy through a buffer is made
SCATTER_RUNS = 2048


def _runs(pages: np.ndarray, limit: int = DIRECT_RUNS) -> list[tuple[int, int]] | None:
    """(first page, count) of each run of consecutive page numbers; None when there are
    more than `limit`."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    if len(breaks) >= limit:
        return None
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[a]), int(b - a)) for a, b in zip(starts, ends)]


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 40


#: why a HELLO is refused when the source's device state and the target do not match,
#: by whether the source is a QEMU guest
_STATE_MISMATCH = {
    True: "the source is a QEMU guest: receive it into a QEMU with "
    "`p2v receive --qemu QMP_SOCKET,ram=PATH` (docs/migration-qemu.md)",
    False: "this receiver's target is a QEMU, and the source is not a QEMU guest",
}


@dataclass
class ReceiverOptions:
    max_memory: int = field(default_factory=_physical_memory)  # largest guest accepted
    features: Feature = Feature.ZERO_PAGES | Feature.ZSTD | Feature.LZ4 | Feature.DELTA
    accept_timeout: float = 30.0  # for the source's extra channels
    hash_memory: bool = False  # report a SHA-256 of the memory received (tests, demos)


@dataclass
class ReceiveReport:
    completed: bool  # the guest runs here now
    error: str | None
    #: END's digest of every page's fingerprint matched the memory received
    memory_verified: bool
    memory_size: int
    page_size: int
    channels: int
    rounds: int
    pages_received: int
    bytes_received: int
    pages: PageCounts
    device_state_bytes: int
    total_time: float
    resumed_at: float | None  # time.time() when the target resumed
    memory_sha256: str | None = None
    device_state_sha256: str | None = None
    kept: str | None = None  # where the target's memory stays (a sim target's --keep)


class Receiver:
    """One incoming migration. `first` is channel 0; `accept` yields the extra channels
    the source announces (None: one channel only, as over an SSH pipe)."""

    def __init__(
        self,
        first: Stream,
        accept: Callable[[], Stream] | None,
        target_factory: TargetFactory,
        options: ReceiverOptions | None = None,
    ) -> None:
        self.options = options or ReceiverOptions()
        self.accept = accept
        self.target_factory = target_factory
        self.channels = [Channel(first, 0)]
        self.target: TargetGuest | None = None
        self.geometry: Geometry | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._barrier: threading.Barrier | None = None
        self._counts = PageCounts()
        self._pages = 0
        self._rounds = 0
        self._device_state: bytes | None = None
        self._resumed_at: float | None = None
        self._features = Feature(0)
        self._threads: list[threading.Thread] = []
        self._peer_aborted = False  # the source told us why: no ABORT back
        self._refused = False
        #: a HELLO of this protocol's version arrived: from here a refusal or a failure is
        #: that migration's answer, not a stray connection's
        self.source_seen = False
        self._memory_verified = False

    # -- the run ----------------------------------------------------------------------

    def run(self) -> ReceiveReport:
        t0 = time.monotonic()
        error = None
        completed = False
        try:
            heap.keep_freed_memory()  # delta temporaries not faulted in again per batch
            self._handshake()
            self._receive()
            completed = True
        except (Exception, KeyboardInterrupt) as exc:
            error = self._give_up(exc)
        finally:
            self._closing = True
            for ch in self.channels:
                ch.close()
            for th in self._threads:
                th.join(timeout=5)
        return self._report(completed, error, time.monotonic() - t0)

    def _handshake(self) -> None:
        ch0 = self.channels[0]
        _, body = ch0.expect(FrameType.HELLO)
        self.source_seen = _hello_version(body) == wire.PROTOCOL_VERSION
        hello = wire.parse_hello(body, self.options.max_memory)
        if hello.channels > 1 and self.accept is None:
            self._refuse("this receiver takes one channel only")
        self.geometry = Geometry(hello.page_size, hello.page_count)
        self.session = hello.session
        self._features = hello.features & self.options.features & ~Feature.QEMU_STATE
        try:
            self.target = self.target_factory(self.geometry)
        except (OSError, MigrationError, ValueError) as exc:
            self._refuse(f"cannot create the target guest: {exc}")
        assert self.target is not None
        from_qemu = bool(hello.features & Feature.QEMU_STATE)
        if from_qemu != (self.target.state_format is StateFormat.QEMU):
            self._refuse(_STATE_MISMATCH[from_qemu])
        if from_qemu:
            self._features |= Feature.QEMU_STATE
        self.mem = pg.as_pages(self.target.memory(), hello.page_size)
        if self.mem.shape[0] != hello.page_count or not self.mem.flags.writeable:
            self._refuse("the target's memory does not match the source's geometry")
        self.fp = np.zeros(hello.page_count, dtype=np.uint64)
        # pages that hold zeros: the whole target at creation (TargetGuest.memory). A
        # zero page there is not written: writing it would fault in memory for nothing
        self.known_zero = np.ones(hello.page_count, dtype=bool)
        self.weights = pg.fingerprint_weights(hello.page_size)
        welcome = wire.Welcome.build(
            dict(
                version=wire.PROTOCOL_VERSION,
                accepted=True,
                features=int(self._features),
                reason="",
            )
        )
        ch0.send(FrameType.WELCOME, [welcome])
        extra: dict[int, Channel] = {}
        while len(extra) < hello.channels - 1:
            assert self.accept is not None
            ch = Channel(self.accept(), -1)
            self.channels.append(ch)
            _, body = ch.expect(FrameType.JOIN)
            join = wire.parse_body(wire.Join, body, "JOIN")
            if join.session != hello.session:
                raise ProtocolError("JOIN: a channel of another migration")
            if not 1 <= join.channel < hello.channels or join.channel in extra:
                raise ProtocolError(f"JOIN: channel {join.channel} unexpected")
            ch.index = join.channel
            extra[join.channel] = ch

    def _refuse(self, reason: str) -> None:
        welcome = wire.Welcome.build(
            dict(version=wire.PROTOCOL_VERSION, accepted=False, features=0, reason=reason)
        )
        with contextlib.suppress(MigrationError):
            self.channels[0].send(FrameType.WELCOME, [welcome])
        self._refused = True
        raise RefusedError(f"refused the migration: {reason}")

    def _receive(self) -> None:
        self._barrier = threading.Barrier(len(self.channels))
        self._threads = [
            threading.Thread(
                target=self._pump_thread, args=(ch,), daemon=True, name=f"recv-{ch.index}"
            )
            for ch in self.channels[1:]
        ]
        for th in self._threads:
            th.start()
        end = self._pump(self.channels[0])
        self._check()
        self._finish(end)

    def _pump_thread(self, ch: Channel) -> None:
        try:
            self._pump(ch)
        except BaseException as exc:
            self._fail(exc)

    def _pump(self, ch: Channel) -> Any:
        """Apply frames from one channel until END (channel 0) or the stream ends."""
        round_no = 0
        pages_in_round = 0
        control = ch.index == 0
        head = bytearray(wire.BATCH_HEADER_SIZE + wire.MAX_BATCH_PAGES * 9)
        while True:
            frame = ch.receive_frame()
            if frame.type is FrameType.BATCH:
                batch = self._read_batch(ch, frame.length, memoryview(head))
                if batch.round != round_no:
                    raise ProtocolError(
                        f"channel {ch.index}: a batch of round {batch.round} during round {round_no}"
                    )
                self._apply(ch, batch)
                pages_in_round += len(batch.pages)
                continue
            body = ch.scratch(frame.length)
            ch.read_into(body)
            ftype = frame.type
            if ftype is FrameType.ROUND_END:
                end = wire.parse_body(wire.RoundEnd, body, "ROUND_END")
                if end.round != round_no or end.pages != pages_in_round:
                    raise ProtocolError(
                        f"channel {ch.index}: ROUND_END of round {end.round} with {end.pages} "
                        f"pages, received round {round_no} with {pages_in_round}"
                    )
                assert self._barrier is not None
                try:
                    # a page of round r+1 must not land before its round-r copy
                    self._barrier.wait()
                except threading.BrokenBarrierError:
                    self._check()
                    raise TransportError("another channel failed") from None
                round_no += 1
                pages_in_round = 0
                if control:
                    self._rounds = round_no
            elif control and ftype is FrameType.DEVICE_STATE:
                if self._device_state is not None:
                    raise ProtocolError("DEVICE_STATE sent twice")
                ds = wire.parse_body(wire.DeviceState, body, "DEVICE_STATE")
                if google_crc32c.value(ds.state) != ds.crc:
                    raise ProtocolError("DEVICE_STATE: checksum mismatch")
                self._device_state = ds.state
            elif control and ftype is FrameType.END:
                if pages_in_round:
                    raise ProtocolError("END in the middle of a round")
                return wire.parse_body(wire.End, body, "END")
            elif ftype is FrameType.ABORT:
                reason = wire.parse_body(wire.Abort, body, "ABORT").reason
                self._peer_aborted = True
                raise RefusedError(f"the source aborted: {reason}")
            else:
                raise ProtocolError(f"channel {ch.index}: unexpected {ftype.name} frame")

    def _read_batch(self, ch: Channel, length: int, head: memoryview) -> wire.Batch:
        """Read and validate a batch's header and page tables; its data stays unread."""
        assert self.geometry is not None
        if length < wire.BATCH_HEADER_SIZE:
            raise ProtocolError(f"BATCH: {length} bytes, shorter than its header")
        ch.read_into(head[: wire.BATCH_HEADER_SIZE])
        size = wire.BATCH_HEADER_SIZE + wire.batch_tables_size(head[: wire.BATCH_HEADER_SIZE])
        if length < size:
            raise ProtocolError(f"BATCH: {length} bytes, shorter than its page tables")
        ch.read_into(head[wire.BATCH_HEADER_SIZE : size])
        batch = wire.parse_batch_head(
            head[:size], length, self.geometry.page_size, self.geometry.page_count
        )
        if batch.encoding is not Encoding.RAW:
            wanted = Feature.ZSTD if batch.encoding is Encoding.ZSTD else Feature.LZ4
            if not self._features & wanted:
                raise ProtocolError(f"BATCH: {batch.encoding.name} was not agreed")
        n_zero = len(batch.pages) - batch.full_count - batch.delta_count
        if n_zero and not self._features & Feature.ZERO_PAGES:
            raise ProtocolError("BATCH: zero pages were not agreed")
        if batch.delta_count and not self._features & Feature.DELTA:
            raise ProtocolError("BATCH: delta pages were not agreed")
        return batch

    def _apply(self, ch: Channel, batch: wire.Batch) -> None:
        """Read the batch's data section and write its pages into the target."""
        assert self.geometry is not None
        ps = self.geometry.page_size
        words = ps // 8
        n_full, n_delta = batch.full_count, batch.delta_count
        n_zero = len(batch.pages) - n_full - n_delta
        pages = batch.pages.astype(np.intp)
        kinds = batch.kinds
        mem, fp = self.mem, self.fp
        full_pages = pages if n_full == len(pages) else pages[kinds == PageKind.FULL]
        runs = None
        if batch.encoding is Encoding.RAW:
            runs = _runs(full_pages, SCATTER_RUNS if ch.scatters else DIRECT_RUNS)
        if runs is not None:
            # full pages go straight from the socket into the target's memory
            rest = ch.scratch(batch.stored_length - n_full * ps)
            ch.read_into_parts([*(mem[a : a + n].data.cast("B") for a, n in runs), rest])
            self._fingerprint(full_pages, runs)
            self.known_zero[full_pages] = False
            data, data_off = rest, -n_full * ps  # offsets below are into the whole section
        else:
            stored = ch.scratch(batch.stored_length)
            ch.read_into(stored)
            data = stored
            if batch.encoding is not Encoding.RAW:
                data = memoryview(decompress(batch.encoding, stored, batch.raw_length))
            data_off = 0
            full = np.frombuffer(data, dtype=np.uint64, count=n_full * words).reshape(-1, words)
            if n_full:
                mem[full_pages] = full
                fp[full_pages] = pg.fingerprints(full, self.weights)
                self.known_zero[full_pages] = False
        if n_zero:
            where = pages[kinds == PageKind.ZERO]
            stale = where[~self.known_zero[where]]
            if len(stale):
                mem[stale] = 0
            self.known_zero[where] = True
            fp[where] = 0
        if n_delta:
            mb = wire.delta_mask_bytes(ps)
            off = n_full * ps + data_off
            masks = np.frombuffer(data, dtype=np.uint8, count=n_delta * mb, offset=off)
            masks = masks.reshape(n_delta, mb)
            if int(pg.mask_words(masks).sum()) != batch.delta_words:
                raise ProtocolError("BATCH: delta masks disagree with the word count")
            values = np.frombuffer(
                data, dtype=np.uint64, count=batch.delta_words, offset=off + n_delta * mb
            )
            where = pages[kinds == PageKind.DELTA]
            pg.delta_apply(mem, where, masks, values, fp, self.weights)
            self.known_zero[where] = False
        with self._lock:
            self._pages += len(pages)
            self._counts.zero += n_zero
            self._counts.delta += n_delta
            if batch.encoding is Encoding.RAW:
                self._counts.full += n_full
            else:
                self._counts.compressed += n_full

    def _fingerprint(self, pages: np.ndarray, runs: list[tuple[int, int]]) -> None:
        """Fingerprint rows `pages` (in `runs`) of the target, just written: over their
        whole span when the rows between are few (round 0 leaves out the zero pages),
        else run by run, else gathered."""
        if not len(pages):
            return
        mem, fp, w = self.mem, self.fp, self.weights
        first, last = int(pages[0]), int(pages[-1])
        span = last + 1 - first
        if span == len(pages):
            fp[first : last + 1] = pg.fingerprints(mem[first : last + 1], w)
        elif span <= 2 * len(pages):
            fp[pages] = pg.fingerprints(mem[first : last + 1], w)[pages - first]
        elif len(runs) <= DIRECT_RUNS:
            for a, n in runs:
                fp[a : a + n] = pg.fingerprints(mem[a : a + n], w)
        else:
            fp[pages] = pg.fingerprints(mem[pages], w)

    def _finish(self, end: Any) -> None:
        """Check END against what arrived, acknowledge, wait for GO, resume."""
        ch0 = self.channels[0]
        assert self.target is not None
        state = self._device_state
        if state is None:
            raise ProtocolError("END before DEVICE_STATE")
        if end.device_state_length != len(state):
            raise ProtocolError(
                f"END: device state of {end.device_state_length} bytes, received {len(state)}"
            )
        if end.rounds != self._rounds:
            raise ProtocolError(f"END: {end.rounds} rounds, received {self._rounds}")
        if end.pages_sent != self._pages:
            raise ProtocolError(f"END: {end.pages_sent} pages sent, received {self._pages}")
        digest = pg.memory_digest(self.fp)
        if digest != end.memory_digest:
            raise ProtocolError("END: memory checksum mismatch: pages were lost or damaged")
        self._memory_verified = True
        self.target.load_device_state(state)
        ch0.send(FrameType.ACK, [wire.Ack.build(dict(memory_digest=digest))])
        ch0.expect(FrameType.GO)
        self.target.resume()
        self._resumed_at = time.time()
        ch0.send(FrameType.RESUMED, [wire.Resumed.build(dict(resumed_at=self._resumed_at))])

    # -- failure ------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._failure is None and not self._closing:
                self._failure = exc
        if self._barrier is not None:
            self._barrier.abort()
        # unblock every channel's reader
        for ch in self.channels[1:]:
            ch.close()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _give_up(self, exc: BaseException) -> str:
        """Tell the source (unless it told us), discard the target, say why."""
        with self._lock:
            first = self._failure or exc
            self._failure = first
        if self._barrier is not None:
            self._barrier.abort()
        message = (
            str(first) if isinstance(first, MigrationError) else f"{type(first).__name__}: {first}"
        )
        told = self._peer_aborted or self._refused
        if not told and not isinstance(first, TransportError):
            with contextlib.suppress(Exception):
                self.channels[0].send(
                    FrameType.ABORT, [wire.Abort.build(dict(reason=message[:4000]))]
                )
        if self.target is not None:
            with contextlib.suppress(Exception):
                self.target.discard()
        return message

    def _report(self, completed: bool, error: str | None, total: float) -> ReceiveReport:
        g = self.geometry
        report = ReceiveReport(
            completed=completed,
            error=error,
            memory_verified=self._memory_verified,
            memory_size=g.memory_size if g else 0,
            page_size=g.page_size if g else 0,
            channels=len(self.channels),
            rounds=self._rounds,
            pages_received=self._pages,
            bytes_received=sum(ch.bytes_received for ch in self.channels),
            pages=self._counts,
            device_state_bytes=len(self._device_state or b""),
            total_time=total,
            resumed_at=self._resumed_at,
        )
        if completed:
            report.kept = getattr(self.target, "path", None)
        if completed and self.options.hash_memory:
            report.memory_sha256 = hashlib.sha256(self.mem.data).hexdigest()
            report.device_state_sha256 = hashlib.sha256(self._device_state or b"").hexdigest()
        return report


def _hello_version(body: bytes | memoryview) -> int | None:
    try:
        return int(wire.parse_body(wire.Hello, body, "HELLO").version)
    except ProtocolError:
        return None


def receive(
    first: Stream,
    target_factory: TargetFactory,
    options: ReceiverOptions | None = None,
    accept: Callable[[], Stream] | None = None,
) -> ReceiveReport:
    """Receive one migration whose channel 0 is `first`."""
    return Receiver(first, accept, target_factory, options).run()


def serve(
    listener: Listener,
    target_factory: TargetFactory,
    options: ReceiverOptions | None = None,
    *,
    once: bool = False,
) -> ReceiveReport:
    """Wait on `listener` for one migration, receive it, and return.

    A connection refused before it says HELLO in this protocol's version (bytes that
    are not the protocol, another version, a failed TLS handshake, a client certificate
    we do not trust) is logged in one line and the wait goes on: the migration this
    receiver was started for may still come. A source's HELLO refused (a guest too large,
    another device-state format) ends the wait with that report, as any later failure
    does. `once` returns the first connection's report whatever it was.

    The source connects all its channels before it says HELLO; over TLS each connection
    waits for its handshake, so the extra channels are accepted (and their handshakes
    done) by a thread from the first connection on, not when HELLO asks for them. What
    that thread accepted for a refused connection is tried next, in order.
    """
    options = options or ReceiverOptions()
    backlog: collections.deque[Stream] = collections.deque()
    while True:
        first = backlog.popleft() if backlog else _accept_first(listener)
        receiver = Receiver(first, None, target_factory, options)
        report, leftovers = _receive_with_acceptor(listener, receiver, options)
        if once or receiver.source_seen:
            for stream in leftovers:
                stream.close()
            return report
        log.warning("refused a connection before its HELLO: %s", report.error)
        backlog.extend(leftovers)


def _accept_first(listener: Listener) -> Stream:
    while True:
        try:
            return listener.accept()
        except TransportError as exc:
            # a client without the certificate we ask for is not the source: keep waiting
            log.warning("refused a connection: %s", exc)


def _receive_with_acceptor(
    listener: Listener, receiver: Receiver, options: ReceiverOptions
) -> tuple[ReceiveReport, list[Stream]]:
    """Run `receiver` with a thread accepting its extra channels; the report, and the
    connections accepted that nobody asked for."""
    pending: queue.Queue = queue.Queue()
    done = threading.Event()

    def accept_more() -> None:
        while not done.is_set():
            try:
                pending.put(listener.accept(timeout=0.1))
            except TransportError as exc:
                if not isinstance(exc.__cause__, TimeoutError):
                    pending.put(exc)  # a refused handshake: the receiver reports it
                    return

    def accept() -> Stream:
        try:
            item = pending.get(timeout=options.accept_timeout)
        except queue.Empty:
            raise TransportError(
                f"the source's other channels did not connect within {options.accept_timeout:g} s"
            ) from None
        if isinstance(item, BaseException):
            raise item
        return item

    receiver.accept = accept
    acceptor = threading.Thread(target=accept_more, name="p2v-accept", daemon=True)
    acceptor.start()
    try:
        report = receiver.run()
    finally:
        done.set()
        acceptor.join()
    leftovers = []
    while not pending.empty():
        item = pending.get()
        if not isinstance(item, BaseException):
            leftovers.append(item)
    return report, leftovers
