"""The disk spool in front of Kafka: records are durable (and devices acknowledged) while Kafka
is unreachable or slower than ingest, and reach Kafka later, in order, without loss.

`Spool` is an append-only log of records in segment files, in the segment format of filesink.py
(version 2: a header, then sync-marked, byte-stuffed `[u32 length][u32 crc32][body]` frames;
version 1 segments left by older releases are still read), fsynced per append, plus a committed
position: everything before it has been acknowledged by Kafka. Each record has a position
(0, 1, 2, ... for the life of the directory); a segment is named after its first position
(`{first:020d}.seg`) and is deleted whole once every record in it is committed. The committed
position lives in the file `committed` (8 bytes + CRC, fsynced). Total size is bounded
(`max_bytes`): an append that does not fit waits for the replayer to free whole segments, which
stalls the pipeline lane, which withholds acknowledgements and pauses reading from sockets
(backpressure, never loss).

`SpoolingSink` is the pipeline's sink for one lane: Kafka first, the spool when Kafka cannot
take the batch in time. The rule that keeps per-device order:

    while the spool holds anything not yet acknowledged by Kafka, new records go to the spool
    too (behind the older ones), and one replayer sends the spool to Kafka strictly in order.

- `write(batch)`, spool empty: hand the batch to the producer and wait up to `ack_timeout` for
  Kafka's acks. All acked: done. Otherwise the records not (yet) acked are appended to the spool
  and fsynced, the batch is durable, and the replayer is started. Batches still in the producer
  at that moment are "in doubt": the idempotent producer keeps retrying them (it never expires
  an in-flight batch), so they will be delivered ahead of anything sent later on the same
  partition.
- `write(batch)`, spool not empty: append and fsync; the replayer is running.
- the replayer first waits until every in-doubt batch has an answer (Kafka back, or failed),
  then reads the spool in chunks from the committed position, skips records that turned out to
  be delivered, sends the rest (and resends what fails, in order, until Kafka acknowledges),
  commits the position and deletes segments it no longer needs. When the spool is empty again,
  writes go straight to Kafka again.
- on start (a gateway killed with SIGKILL), a non-empty spool is replayed from its committed
  position. A torn record at the tail (crash mid-write: never acknowledged) is cut off (one log
  line with the byte count); a damaged range anywhere else is logged (segment, offset, length)
  and skipped, and reading resumes at the next intact frame of the same segment.
- a failed append (short write, ENOSPC, EIO, a failed fdatasync) is truncated back before
  anything else is appended, and the append raises `AppendError` saying how many of its records
  were durable before the failure; the spooling sink resumes the batch from there when the
  pipeline retries it (never spooling a record twice, never sending it to Kafka again), and
  nothing of the batch is acknowledged until then: a full disk is backpressure, not loss.

Guarantee: every record whose device was acknowledged reaches Kafka, per-device order kept
(one partition per device; the producer is idempotent with one batch in flight per
partition). Delivery is at least once: a crash between Kafka's ack and the commit of the
spool position, or an ack lost in an outage, may repeat records; consumers that must drop
repeats can use (device, ts_ms, seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from gateway.telemetry.filesink import (
    MAGIC,
    SUFFIX,
    PWrite,
    frame_one,
    fsync_dir,
    scan_segment,
    write_durably,
)
from gateway.telemetry.records import Record

if TYPE_CHECKING:
    from gateway.metrics import TelemetryMetrics

log = logging.getLogger("iotgw.telemetry.spool")

COMMITTED = "committed"
_COMMITTED = struct.Struct(">QI")  # position, crc32 of the position bytes

REPLAY_RETRY_DELAY = 1.0  # seconds between attempts to resend records Kafka did not take


def encode(record: Record) -> bytes:
    """The spooled form of a record: its envelope and its content type."""
    body: bytes = msgpack.packb((record.envelope(), record.content_type), use_bin_type=True)
    return body


def decode(body: bytes) -> Record:
    envelope, content_type = msgpack.unpackb(body, raw=False)
    return Record.from_envelope(envelope, content_type)


class AppendError(OSError):
    """An append failed after its first `done` records were made durable (from position
    `first` on); the rest were not written (a partial write was cut back)."""

    def __init__(self, cause: OSError, first: int, done: int) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.first = first
        self.done = done


@dataclass
class _Segment:
    first: int  # position of its first record
    path: Path
    count: int  # intact records in it
    size: int  # bytes (damaged ranges that readers skip included)
    legacy: bool = False  # version 1 framing (written by an older release)


class Spool:
    """A bounded, fsynced, append-only record log with a committed position. All file work
    happens on one thread, in call order; the event loop only waits for it."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int | None = None,
        metrics: TelemetryMetrics | None = None,
        lane: str = "low",
        pwrite: PWrite = os.pwrite,
        fdatasync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        self.directory = Path(directory)
        # The OS calls that can fail with ENOSPC/EIO, a seam for tests that inject short writes.
        self._pwrite = pwrite
        self._fdatasync = fdatasync
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(64 << 10, min(64 << 20, max_bytes // 8))
        self.metrics = metrics
        self.lane = lane
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="iotgw-spool")
        self._segments: list[_Segment] = []
        self._fd = -1  # the segment being appended to (the last one), -1: start a new one
        self._dirty = False  # a failed write left bytes past the last segment's size
        self._read_fd = -1
        self._read_segment: _Segment | None = None
        self._read_offset = 0
        self._commit_fd = -1
        self.committed = 0  # records before this position are acknowledged by Kafka
        self.end = 0  # the next record appended gets this position
        self.read_position = 0  # the next record `read` returns
        self.bytes = 0
        self.opened = False
        self._room = asyncio.Event()

    # ---- state the event loop reads ----------------------------------------------------------

    @property
    def empty(self) -> bool:
        """Nothing waits for Kafka."""
        return self.committed >= self.end

    @property
    def pending(self) -> int:
        """Records not yet acknowledged by Kafka."""
        return self.end - self.committed

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.spool_bytes.labels(self.lane).set(self.bytes)
            self.metrics.spool_records.labels(self.lane).set(self.pending)

    # ---- open --------------------------------------------------------------------------------

    async def open(self) -> None:
        if not self.opened:
            await self._run(self._open)
            self.opened = True
            self._report()

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        paths = sorted(self.directory.glob("*" + SUFFIX))
        for i, path in enumerate(paths):
            data = path.read_bytes()
            scan = scan_segment(data)
            size = len(data)
            newest = i == len(paths) - 1
            for gap in scan.skipped:
                if newest and gap.offset + gap.length == size:
                    continue  # the torn tail, cut below
                log.warning(
                    "%s: skipped %d unreadable bytes at offset %d (%s)",
                    path, gap.length, gap.offset, gap.reason,
                )
            if newest and scan.good_end < size:
                # Torn by a crash mid-append: those records were never acknowledged.
                log.warning("%s: cutting a torn tail of %d bytes", path, size - scan.good_end)
                os.truncate(path, scan.good_end)
                size = scan.good_end
            if not scan.frames:
                path.unlink()
                continue
            self._segments.append(
                _Segment(int(path.stem), path, len(scan.frames), size, scan.legacy)
            )
        if self._segments:
            last = self._segments[-1]
            self.end = last.first + last.count
            first = self._segments[0].first
        committed = self._read_committed()
        if not self._segments:
            self.end = max(self.end, committed or 0)
            first = self.end
        self.committed = min(max(committed if committed is not None else first, first), self.end)
        self.read_position = self.committed
        self.bytes = sum(s.size for s in self._segments)
        self._commit_fd = os.open(self.directory / COMMITTED, os.O_RDWR | os.O_CREAT, 0o644)
        fsync_dir(self.directory)
        # Appends always start a new segment: an existing one is never written again.

    def _read_committed(self) -> int | None:
        try:
            data = (self.directory / COMMITTED).read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < _COMMITTED.size:
            return None
        position, crc = _COMMITTED.unpack_from(data)
        if zlib.crc32(data[:8]) != crc:
            log.error("%s: bad committed position; replaying the whole spool", self.directory)
            return None
        return int(position)

    # ---- append ------------------------------------------------------------------------------

    async def append(
        self, records: Sequence[Record], on_wait: Callable[[], None] | None = None
    ) -> int:
        """Make the records durable in the spool, in order; return the position of the first.
        Waits for room while the spool is full (never drops); `on_wait` is called first (it
        makes sure something drains the spool: the replayer)."""
        await self.open()
        first = self.end
        framed = [frame_one(encode(r)) for r in records]
        i = 0
        while i < len(framed):
            room = self.max_bytes - self.bytes
            n, size = 0, 0
            for data in framed[i:]:
                need = size + len(data)
                # each segment this may start costs a header too
                if need + len(MAGIC) * (1 + need // self.segment_bytes) > room:
                    break
                size = need
                n += 1
            if n == 0:
                if not self.empty:
                    self._room.clear()
                    if on_wait is not None:
                        on_wait()
                    await self._room.wait()  # the replayer frees whole segments
                    continue
                n = 1  # one record bigger than the whole spool: accept it rather than stall
            progress = [0]
            try:
                await self._run(self._append, framed[i : i + n], progress)
            except OSError as exc:
                self._report()
                raise AppendError(exc, first, i + progress[0]) from exc
            i += n
            self._report()
        return first

    def _append(self, framed: list[bytes], progress: list[int]) -> None:
        """Fill the current segment up to `segment_bytes`, then new ones (so that space comes
        back in segment-sized steps); each written segment is fsynced before the next. A write
        that fails is cut back before this raises; `progress[0]` counts the records that are
        durable."""
        if self._dirty:
            self._cut_back()  # raises while it cannot: nothing is appended after garbage
        i = 0
        while i < len(framed):
            segment = self._segments[-1] if self._segments and self._fd >= 0 else None
            if segment is None or segment.size >= self.segment_bytes:
                segment = self._rotate()
            room = self.segment_bytes - segment.size
            j, size = i, 0
            while j < len(framed) and (j == i or size + len(framed[j]) <= room):
                size += len(framed[j])
                j += 1
            data = b"".join(framed[i:j])
            if segment.size == 0:
                data = MAGIC + data
            self._dirty = True  # until the part is durable: the next append cuts back first
            write_durably(
                self._fd, data, segment.size, self._pwrite, self._fdatasync, segment.path
            )
            self._dirty = False
            segment.count += j - i
            segment.size += len(data)
            self.bytes += len(data)
            self.end += j - i
            progress[0] += j - i
            i = j

    def _cut_back(self) -> None:
        os.ftruncate(self._fd, self._segments[-1].size)
        self._dirty = False

    def _rotate(self) -> _Segment:
        if self._fd >= 0:
            os.close(self._fd)
        path = self.directory / f"{self.end:020d}{SUFFIX}"
        # The name is free: a segment is never appended to across opens, and one left without
        # an intact record was removed by `_open` or is the failed segment of this run.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._dirty = False
        fsync_dir(self.directory)  # the new file's name is durable too
        segment = _Segment(self.end, path, 0, 0)
        self._segments.append(segment)
        return segment

    # ---- read and commit (the replayer) ------------------------------------------------------

    async def read(self, max_records: int, max_bytes: int = 4 << 20) -> tuple[int, list[Record]]:
        """The next records after the previous read (from the committed position after open):
        (position of the first, records). Empty when everything appended has been read."""
        await self.open()
        first, bodies = await self._run(self._read, max_records, max_bytes)
        return first, [decode(b) for b in bodies]

    def _read(self, max_records: int, max_bytes: int) -> tuple[int, list[bytes]]:
        bodies: list[bytes] = []
        first = self.read_position
        while len(bodies) < max_records and self.read_position < self.end:
            segment = self._read_segment
            if segment is None or self.read_position >= segment.first + segment.count:
                segment = self._seek(self.read_position)
                if segment is None:
                    break
            remaining = segment.size - self._read_offset
            if remaining <= 0:  # its intact records are all read: on to the next segment
                self.read_position = segment.first + segment.count
                continue
            # A frame may be bigger than the window: widen it until one fits (or the end).
            window = min(remaining, max_bytes)
            while True:
                data = os.pread(self._read_fd, window, self._read_offset)
                final = len(data) >= remaining
                scan = scan_segment(
                    data,
                    None if self._read_offset == 0 else 0,
                    final=final,
                    legacy=segment.legacy,
                )
                if scan.frames or final:
                    break
                window = min(remaining, 2 * window)
            # Damaged ranges were reported when the spool was opened; here they are passed.
            taken = scan.consumed
            for f in scan.frames:
                bodies.append(f.body)
                self.read_position += 1
                if len(bodies) >= max_records:
                    taken = f.end
                    break
            self._read_offset += taken
            if bodies and sum(map(len, bodies)) >= max_bytes:
                break
        return first, bodies

    def _seek(self, position: int) -> _Segment | None:
        """Open the segment holding `position` (or the next one: records lost to corruption
        leave a gap) and find the record's offset in it."""
        for segment in self._segments:
            if position < segment.first + segment.count:
                break
        else:
            return None
        if self._read_fd >= 0:
            os.close(self._read_fd)
        self._read_fd = os.open(segment.path, os.O_RDONLY)
        self._read_segment = segment
        self._read_offset = 0
        if position < segment.first:
            self.read_position = segment.first
            return segment
        skip = position - segment.first
        if skip:
            data = os.pread(self._read_fd, segment.size, 0)
            frames = scan_segment(data, legacy=segment.legacy).frames
            self._read_offset = frames[skip].offset if skip < len(frames) else segment.size
        return segment

    def rewind(self) -> None:
        """Read again from the committed position (after a failed replay chunk)."""
        self.read_position = self.committed
        self._read_segment = None

    async def commit(self, position: int) -> None:
        """Every record before `position` is acknowledged by Kafka: remember it (fsynced) and
        delete the segments that hold nothing newer."""
        await self._run(self._commit, position)
        self._report()
        self._room.set()

    def _commit(self, position: int) -> None:
        position = min(position, self.end)
        if position <= self.committed:
            return
        packed = struct.pack(">Q", position)
        os.pwrite(self._commit_fd, _COMMITTED.pack(position, zlib.crc32(packed)), 0)
        os.fdatasync(self._commit_fd)
        self.committed = position
        while self._segments:
            segment = self._segments[0]
            if segment.first + segment.count > position:
                break
            self._segments.pop(0)
            if segment is self._read_segment:
                os.close(self._read_fd)
                self._read_fd, self._read_segment = -1, None
            if not self._segments and self._fd >= 0:  # the one being appended to
                os.close(self._fd)
                self._fd = -1
            segment.path.unlink()
            self.bytes -= segment.size

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown()

    def _close(self) -> None:
        if self._dirty:
            try:
                self._cut_back()
            except OSError:
                log.error("%s: a failed write could not be cut; the next open will", self.directory)
        for fd in (self._fd, self._read_fd, self._commit_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._read_fd = self._commit_fd = -1
        self._read_segment = None


# ---- Kafka first, the spool when Kafka cannot keep up ------------------------------------------

Delivery = tuple["asyncio.Future[Any]", list[int]]  # one batch handed to Kafka: (ack, indices)


class Deliverer(Protocol):
    """What the spooling sink needs from Kafka (kafkasink.KafkaSink)."""

    async def send(self, records: Sequence[Record], out: list[Delivery]) -> None:
        """Hand the records to the producer; append one Delivery per batch to `out` as soon as
        it is queued (so that a cancelled send still tells which records are on their way)."""

    async def close(self) -> None: ...


def _delivered(out: list[Delivery]) -> set[int]:
    """Indices of the records whose batch Kafka acknowledged."""
    ok: set[int] = set()
    for future, indices in out:
        if future.done() and not future.cancelled() and future.exception() is None:
            ok.update(indices)
    return ok


async def deliver(kafka: Deliverer, records: Sequence[Record], out: list[Delivery]) -> None:
    """Send and wait for every ack; raise the first failure. `asyncio.wait`, not `gather`:
    cancelling this must not cancel the acks, which still tell what Kafka has."""
    await kafka.send(records, out)
    if out:
        await asyncio.wait([future for future, _ in out])
    for future, _ in out:
        exc = future.exception()
        if exc is not None:
            raise exc


@dataclass
class _Unfinished:
    records: list[Record]  # the pipeline's batch (the same list comes back on a retry)
    out: list[Delivery]  # what Kafka was handed of it
    rest: list[int]  # indices of the records that go to the spool
    done: int  # how many of `rest` are in the spool already
    first: int  # the spool position of rest[0] (once done > 0)


class SpoolingSink:
    """The sink of one pipeline lane with Kafka: see the module docstring."""

    counts_records_out = True  # it reports kafka / spool itself

    def __init__(
        self,
        kafka: Deliverer,
        spool: Spool,
        *,
        ack_timeout: float = 3.0,
        lane: str = "low",
        metrics: TelemetryMetrics | None = None,
        replay_records: int = 5000,
    ) -> None:
        self.kafka = kafka
        self.spool = spool
        self.ack_timeout = ack_timeout
        self.lane = lane
        self.metrics = metrics
        self.replay_records = replay_records
        self._in_doubt: dict[int, asyncio.Future[Any]] = {}  # spool position -> batch ack
        self._delivered: set[int] = set()  # spooled positions found acknowledged after all
        self._replayer: asyncio.Task[None] | None = None
        # A batch whose spooling failed part-way (disk full): resumed when it is written again.
        self._unfinished: _Unfinished | None = None
        self._closed = False
        self._failing = False
        self.replayed = 0
        self.spooled = 0

    async def start(self) -> None:
        """Open the spool and replay what a previous run left in it."""
        await self.spool.open()
        if not self.spool.empty:
            log.info(
                "%s lane: replaying %d spooled records to Kafka", self.lane, self.spool.pending
            )
            self._kick()

    @property
    def replaying(self) -> bool:
        return self._replayer is not None

    async def write(self, records: list[Record]) -> None:
        await self.spool.open()
        unfinished, self._unfinished = self._unfinished, None
        if unfinished is not None and unfinished.records is records:
            # The pipeline retries the batch whose spooling failed: go on where it stopped.
            await self._spool_rest(records, unfinished.out, unfinished)
        elif self.spool.empty:
            out: list[Delivery] = []
            started = asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(deliver(self.kafka, records, out), self.ack_timeout)
            except Exception as exc:
                log.warning(
                    "%s lane: Kafka did not acknowledge %d records within %.1fs (%s); spooling",
                    self.lane,
                    len(records),
                    self.ack_timeout,
                    type(exc).__name__ if isinstance(exc, TimeoutError) else exc,
                )
            else:
                self._count(records, "kafka")
                if self.metrics is not None:
                    elapsed = asyncio.get_running_loop().time() - started
                    self.metrics.kafka_latency.labels(self.lane).observe(elapsed)
                return
            await self._spool_rest(records, out)
        else:
            self._kick()
            await self._spool_rest(records, [])
        self._kick()

    async def _spool_rest(
        self, records: list[Record], out: list[Delivery], resume: _Unfinished | None = None
    ) -> None:
        if resume is None:
            acked = _delivered(out)
            rest = [i for i in range(len(records)) if i not in acked]
            self._count([records[i] for i in acked], "kafka")
            done, first = 0, -1
        else:
            rest, done, first = resume.rest, resume.done, resume.first
        try:
            start = await self.spool.append([records[i] for i in rest[done:]], self._kick)
        except AppendError as exc:
            if exc.done:
                self._count([records[i] for i in rest[done : done + exc.done]], "spool")
            self._unfinished = _Unfinished(
                records, out, rest, done + exc.done, first if done else exc.first
            )
            raise
        if not done:
            first = start
        self._count([records[i] for i in rest[done:]], "spool")
        # The batch's positions are consecutive: this lane's flusher is the spool's only writer.
        position = {index: first + n for n, index in enumerate(rest)}
        for future, indices in out:
            if not future.done():
                for index in indices:
                    self._in_doubt[position[index]] = future
            elif not future.cancelled():
                future.exception()  # retrieved: those records are in the spool

    def _count(self, records: Sequence[Record], where: str) -> None:
        if where == "spool":
            self.spooled += len(records)
        if self.metrics is not None and records:
            kinds: dict[str, int] = {}
            for r in records:
                kinds[r.kind] = kinds.get(r.kind, 0) + 1
            for kind, n in kinds.items():
                self.metrics.records_out.labels(kind, where).inc(n)

    def _kick(self) -> None:
        if self._replayer is None and not self._closed and not self.spool.empty:
            self._replayer = asyncio.get_running_loop().create_task(self._replay())

    async def _replay(self) -> None:
        try:
            while not self.spool.empty and not self._closed:
                await self._settle_in_doubt()
                first, chunk = await self.spool.read(self.replay_records)
                if not chunk:
                    break
                delivered = self._delivered
                pending = [n for n in range(len(chunk)) if first + n not in delivered]
                if delivered:
                    delivered.difference_update(range(first, first + len(chunk)))
                while pending:
                    out: list[Delivery] = []
                    started = asyncio.get_running_loop().time()
                    try:
                        # No timeout: the idempotent producer retries until Kafka answers.
                        await deliver(self.kafka, [chunk[n] for n in pending], out)
                    except Exception as exc:
                        if not self._failing:  # once per outage, not once a second
                            log.warning("%s lane: replay failed (%s); retrying", self.lane, exc)
                            self._failing = True
                    else:
                        if self._failing:
                            log.info("%s lane: Kafka takes the spool again", self.lane)
                            self._failing = False
                        if self.metrics is not None:
                            elapsed = asyncio.get_running_loop().time() - started
                            self.metrics.kafka_latency.labels(self.lane).observe(elapsed)
                    ok = _delivered(out)
                    pending = [n for i, n in enumerate(pending) if i not in ok]
                    if pending:
                        await asyncio.sleep(REPLAY_RETRY_DELAY)
                self.replayed += len(chunk)  # all acknowledged by Kafka
                if self.metrics is not None:
                    self.metrics.replayed.labels(self.lane).inc(len(chunk))
                await self.spool.commit(first + len(chunk))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s lane: spool replay failed; restarting it", self.lane)
            self.spool.rewind()
            await asyncio.sleep(REPLAY_RETRY_DELAY)
            self._replayer = None
            self._kick()
            return
        self._replayer = None
        if not self.spool.empty and not self._closed:
            self._kick()  # appended while we were finishing

    async def _settle_in_doubt(self) -> None:
        """Wait until every batch that was still with the producer when its records were spooled
        has an answer; the positions Kafka did take need no resend. Nothing is sent before, so
        a resend can never overtake an older send of the same partition."""
        if not self._in_doubt:
            return
        await asyncio.wait(set(self._in_doubt.values()))
        for position, future in self._in_doubt.items():
            if not future.cancelled() and future.exception() is None:
                self._delivered.add(position)
        self._in_doubt.clear()

    async def close(self, grace: float = 2.0) -> None:
        """Give the replayer `grace` seconds to empty the spool (what is left stays on disk for
        the next start), then stop it, the producer and the spool."""
        if self._replayer is not None and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._replayer), grace)
        self._closed = True
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
            self._replayer = None
        await self.kafka.close()
        await self.spool.close()
