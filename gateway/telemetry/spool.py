"""The disk spool in front of Kafka: records are durable (and devices acknowledged) while Kafka
is unreachable or slower than ingest, and reach Kafka later, in order, without loss.

`Spool` is an append-only log of records in segment files, in the framing of filesink.py
(`[u32 length][u32 crc32][body]`, fsynced per append), plus a committed position: everything
before it has been acknowledged by Kafka. Each record has a position (0, 1, 2, ... for the life
of the directory); a segment is named after its first position (`{first:020d}.seg`) and is
deleted whole once every record in it is committed. The committed position lives in the file
`committed` (8 bytes + CRC, fsynced). Total size is bounded (`max_bytes`): an append that does
not fit waits for the replayer to free whole segments, which stalls the pipeline lane, which
withholds acknowledgements and pauses reading from sockets (backpressure, never loss).

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
  position. A torn record at the tail (crash mid-write: never acknowledged) is cut off.

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

from gateway.telemetry.filesink import HEADER, SUFFIX, frame, scan_frames, write_all
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


@dataclass
class _Segment:
    first: int  # position of its first record
    path: Path
    count: int  # records in it
    size: int  # bytes, all of them intact


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
        pwrite: Callable[[int, bytes | memoryview, int], int] = os.pwrite,
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
            count, size = 0, 0
            for _, size in scan_frames(data):  # noqa: B007 - the last offset is the intact size
                count += 1
            if size < len(data):
                if i == len(paths) - 1:
                    # Torn by a crash mid-append: those records were never acknowledged.
                    log.warning("%s: cutting a torn tail of %d bytes", path, len(data) - size)
                else:
                    log.error("%s: corrupt after %d intact records; skipping the rest", path, count)
                os.truncate(path, size)
            if count == 0:
                path.unlink()
                continue
            self._segments.append(_Segment(int(path.stem), path, count, size))
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
        self._fsync_dir()
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

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- append ------------------------------------------------------------------------------

    async def append(
        self, records: Sequence[Record], on_wait: Callable[[], None] | None = None
    ) -> int:
        """Make the records durable in the spool, in order; return the position of the first.
        Waits for room while the spool is full (never drops); `on_wait` is called first (it
        makes sure something drains the spool: the replayer)."""
        await self.open()
        first = self.end
        bodies = [encode(r) for r in records]
        i = 0
        while i < len(bodies):
            room = self.max_bytes - self.bytes
            n, size = 0, 0
            for body in bodies[i:]:
                need = HEADER.size + len(body)
                if size + need > room:
                    break
                size += need
                n += 1
            if n == 0:
                if not self.empty:
                    self._room.clear()
                    if on_wait is not None:
                        on_wait()
                    await self._room.wait()  # the replayer frees whole segments
                    continue
                n = 1  # one record bigger than the whole spool: accept it rather than stall
            await self._run(self._append, bodies[i : i + n])
            i += n
            self._report()
        return first

    def _append(self, bodies: list[bytes]) -> None:
        """Fill the current segment up to `segment_bytes`, then new ones (so that space comes
        back in segment-sized steps); each written segment is fsynced before returning."""
        i = 0
        while i < len(bodies):
            segment = self._segments[-1] if self._segments and self._fd >= 0 else None
            if segment is None or segment.size >= self.segment_bytes:
                segment = self._rotate()
            room = self.segment_bytes - segment.size
            j, size = i, 0
            while j < len(bodies) and (j == i or size + HEADER.size + len(bodies[j]) <= room):
                size += HEADER.size + len(bodies[j])
                j += 1
            data = frame(bodies[i:j])
            write_all(self._fd, data, segment.size, self._pwrite)
            self._fdatasync(self._fd)
            segment.count += j - i
            segment.size += len(data)
            self.bytes += len(data)
            self.end += j - i
            i = j

    def _rotate(self) -> _Segment:
        if self._fd >= 0:
            os.close(self._fd)
        path = self.directory / f"{self.end:020d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self._fsync_dir()  # the new file's name is durable too
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
            if remaining <= 0:
                break
            data = os.pread(self._read_fd, min(remaining, max_bytes), self._read_offset)
            if len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
                length = HEADER.unpack_from(data)[0]  # one record bigger than max_bytes
                data = os.pread(self._read_fd, HEADER.size + length, self._read_offset)
            offset = 0
            for body, offset in scan_frames(data):  # noqa: B007
                bodies.append(body)
                self.read_position += 1
                if len(bodies) >= max_records:
                    break
            if offset == 0:  # cannot happen: segments hold intact records only
                raise OSError(f"{segment.path}: unreadable record at {self._read_offset}")
            self._read_offset += offset
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
            for n, (_, offset) in enumerate(scan_frames(data), 1):
                if n == skip:
                    self._read_offset = offset
                    break
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
        if self.spool.empty:
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
            await self.spool.append(records, self._kick)
            self._count(records, "spool")
        self._kick()

    async def _spool_rest(self, records: list[Record], out: list[Delivery]) -> None:
        acked = _delivered(out)
        rest = [i for i in range(len(records)) if i not in acked]
        self._count([records[i] for i in acked], "kafka")
        first = await self.spool.append([records[i] for i in rest], self._kick)
        self._count([records[i] for i in rest], "spool")
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
