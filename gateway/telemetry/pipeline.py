"""The telemetry pipeline: records in, batches to a sink, acknowledgements out once durable.

Group commit: while the sink writes one batch, new records gather into the next, so one fsync
(or one Kafka round trip) covers everything that arrived meanwhile. There is one flusher task
per lane at a time, never a task or future per message. Acknowledgements go back grouped per
target (a connection), in submission order within a lane, so a connection can send its
PUBACKs in order (it holds back an acknowledgement until those before it are released).

Priority lanes (lanes.py): shadow changes and commands go to the high lane, telemetry and
events to the low lane. Each lane has its own queue, flusher and sink (the same sink object may
serve both), so a slow telemetry batch never delays a shadow record. Backpressure is per lane:
a connection whose submission pushes its lane past `high_water` records is paused (stops
reading its socket) until that lane is back under `low_water`. QoS 0 records (no ack target)
are shed, and counted, once their lane holds `shed_water` records: never silently.

A sink that cannot write (a full disk, an I/O error, Kafka down with a full spool) raises; the
batch is kept and written again with back-off (from `RETRY_FIRST` doubling up to `RETRY_DELAY`
seconds), and nothing of it is acknowledged until a write succeeds. The lane's backlog keeps
growing meanwhile, so the high-water pause above applies: no second flow-control mechanism.
Failures are counted by cause (`iotgw_telemetry_write_errors_total{lane,reason}`), the lane is
shown blocked (`iotgw_telemetry_sink_blocked{lane}` = 1) until a write succeeds again, and the
log gets one line when a lane blocks, at most one per `LOG_EVERY` seconds while it stays
blocked, and one when it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import Counter
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from gateway.telemetry.lanes import LANES, lane_of
from gateway.telemetry.records import Record, now_ms

if TYPE_CHECKING:
    from gateway.metrics import TelemetryMetrics

log = logging.getLogger("iotgw.telemetry")

RETRY_FIRST = 0.05  # seconds before a failed batch is first written again
RETRY_DELAY = 1.0  # the longest wait between two attempts (the back-off's cap)
LOG_EVERY = 30.0  # seconds between two log lines about a lane that stays blocked


class Sink(Protocol):
    async def write(self, records: list[Record]) -> None:
        """Return only once every record is durable; raise if not (the batch is retried)."""

    async def close(self) -> None: ...


class AckTarget(Protocol):
    def records_durable(self, tokens: list[Any]) -> None:
        """The records submitted with these tokens are durable (called in submission order
        within a lane; tokens of different lanes may interleave)."""


class Flow(Protocol, Hashable):
    """Something that reads from the network and can stop and resume (a connection). It may be
    paused for other reasons too: it resumes only once no reason is left."""

    def pause_reading(self, reason: str) -> None: ...

    def resume_reading(self, reason: str) -> None: ...


PAUSE_REASON = "telemetry"  # the pipeline's reason to pause a Flow


class _Lane:
    __slots__ = ("acks", "flusher", "in_flight", "name", "paused", "records", "sink")

    def __init__(self, name: str, sink: Sink) -> None:
        self.name = name
        self.sink = sink
        self.records: list[Record] = []
        self.acks: list[tuple[AckTarget, Any]] = []
        self.in_flight = 0
        self.flusher: asyncio.Task[None] | None = None
        self.paused: set[Flow] = set()

    @property
    def backlog(self) -> int:
        return len(self.records) + self.in_flight


class TelemetryPipeline:
    def __init__(
        self,
        sink: Sink | Mapping[str, Sink],
        *,
        high_water: int = 50_000,
        low_water: int = 10_000,
        shed_water: int | None = None,
        metrics: TelemetryMetrics | None = None,
    ) -> None:
        sinks: Mapping[str, Sink] = (
            sink if isinstance(sink, Mapping) else dict.fromkeys(LANES, sink)
        )
        self.lanes = {name: _Lane(name, sinks[name]) for name in LANES}
        self.sink = sinks[LANES[-1]]  # the low (telemetry) lane's sink
        self.high_water = high_water
        self.low_water = low_water
        self.shed_water = 2 * high_water if shed_water is None else shed_water
        self.metrics = metrics
        self._seq: dict[str, int] = {}
        self._last = self.lanes[LANES[-1]]  # the lane of the latest submission
        self.written = 0
        self.failures = 0
        self.shed = 0

    @property
    def backlog(self) -> int:
        """Records accepted but not yet durable, all lanes."""
        return sum(lane.backlog for lane in self.lanes.values())

    def _sinks(self) -> list[Sink]:
        unique: dict[int, Sink] = {}
        for lane in self.lanes.values():
            unique.setdefault(id(lane.sink), lane.sink)
        return list(unique.values())

    async def start(self) -> None:
        """Start sinks that have work of their own (a spool to replay after a crash)."""
        for sink in self._sinks():
            start = getattr(sink, "start", None)
            if start is not None:
                await start()

    def submit(
        self,
        record: Record,
        target: AckTarget | None = None,
        token: Any = None,
        lane: str | None = None,
    ) -> None:
        """Queue a record on its lane (by default `lane_of(record.kind)`). With a target, the
        target's `records_durable` gets the token once the record is durable."""
        chosen = self.lanes[lane or lane_of(record.kind)]
        self._last = chosen
        if target is None and chosen.backlog >= self.shed_water:
            self.shed += 1  # QoS 0 under overload: best effort, but counted
            if self.metrics is not None:
                self.metrics.shed.labels(record.kind).inc()
            return
        if not record.ts_ms:
            record.ts_ms = now_ms()
        seq = self._seq.get(record.device, 0) + 1
        self._seq[record.device] = seq
        record.seq = seq
        chosen.records.append(record)
        if target is not None:
            chosen.acks.append((target, token))
        if chosen.flusher is None:
            chosen.flusher = asyncio.get_running_loop().create_task(self._flush_loop(chosen))

    def over_high_water(self, flow: Flow) -> bool:
        """After a submit: True (and the flow is paused) when the lane of that submission holds
        too many records that are not durable yet."""
        lane = self._last
        if lane.backlog < self.high_water:
            return False
        flow.pause_reading(PAUSE_REASON)
        lane.paused.add(flow)
        return True

    def forget(self, flow: Flow) -> None:
        for lane in self.lanes.values():
            lane.paused.discard(flow)

    async def _flush_loop(self, lane: _Lane) -> None:
        metrics = self.metrics
        try:
            while lane.records:
                records, acks = lane.records, lane.acks
                lane.records, lane.acks = [], []
                lane.in_flight = len(records)
                if metrics is not None:
                    for kind, n in Counter(r.kind for r in records).items():
                        metrics.records_in.labels(kind).inc(n)
                    metrics.batch_records.labels(lane.name).observe(len(records))
                    metrics.backlog.labels(lane.name).set(lane.backlog)
                await self._write(lane, records)
                lane.in_flight = 0
                self.written += len(records)
                if metrics is not None:
                    if not getattr(lane.sink, "counts_records_out", False):
                        label = getattr(lane.sink, "label", "file")
                        for kind, n in Counter(r.kind for r in records).items():
                            metrics.records_out.labels(kind, label).inc(n)
                    metrics.backlog.labels(lane.name).set(lane.backlog)
                self._acknowledge(acks)
                if lane.paused and lane.backlog <= self.low_water:
                    self._release(lane)
        finally:
            lane.flusher = None

    async def _write(self, lane: _Lane, records: list[Record]) -> None:
        """Write until the sink takes the batch. The same list goes back each time: a sink
        that failed half-way has undone its part (or knows what it kept)."""
        metrics = self.metrics
        attempt = 0
        blocked_at = logged_at = 0.0
        while True:
            try:
                await lane.sink.write(records)
                break
            except Exception as exc:
                # Not durable: nothing is acknowledged; keep the batch and try again.
                self.failures += 1
                reason = _reason(exc)
                now = asyncio.get_running_loop().time()
                if metrics is not None:
                    metrics.sink_failures.labels(lane.name).inc()
                    metrics.write_errors.labels(lane.name, reason).inc()
                    metrics.sink_blocked.labels(lane.name).set(1)
                if attempt == 0:
                    blocked_at = logged_at = now
                    log.error(
                        "telemetry sink failed (%s lane: %s); holding %d records, retrying",
                        lane.name, exc, len(records), exc_info=reason == "other",
                    )
                elif now - logged_at >= LOG_EVERY:
                    logged_at = now
                    log.error(
                        "telemetry sink still failing (%s lane: %s) after %d attempts in %.0fs",
                        lane.name, exc, attempt + 1, now - blocked_at,
                    )
                delay = min(RETRY_DELAY, RETRY_FIRST * 2 ** min(attempt, 30))  # no overflow
                attempt += 1
                await asyncio.sleep(delay)
        if attempt:
            if metrics is not None:
                metrics.sink_blocked.labels(lane.name).set(0)
            log.warning(
                "telemetry sink writes again (%s lane) after %d failed attempts in %.1fs",
                lane.name, attempt, asyncio.get_running_loop().time() - blocked_at,
            )

    def _release(self, lane: _Lane) -> None:
        paused, lane.paused = lane.paused, set()
        for flow in paused:
            if not any(flow in other.paused for other in self.lanes.values()):
                flow.resume_reading(PAUSE_REASON)

    @staticmethod
    def _acknowledge(acks: list[tuple[AckTarget, Any]]) -> None:
        grouped: dict[AckTarget, list[Any]] = {}
        for target, token in acks:
            grouped.setdefault(target, []).append(token)
        for target, tokens in grouped.items():
            target.records_durable(tokens)

    async def drain(self) -> None:
        """Wait until everything submitted so far is durable (graceful stop)."""
        while True:
            flushers = [lane.flusher for lane in self.lanes.values() if lane.flusher is not None]
            if not flushers:
                return
            for flusher in flushers:
                await asyncio.shield(flusher)

    async def close(self, drain_timeout: float | None = 30.0) -> None:
        """Drain (for at most `drain_timeout` seconds: a sink that cannot make records durable,
        Kafka down with a full spool, must not hold a stop forever; what is left was never
        acknowledged), then close the sinks."""
        try:
            await asyncio.wait_for(self.drain(), drain_timeout)
        except TimeoutError:
            log.error(
                "stopping with %d telemetry records not durable (never acknowledged)",
                self.backlog,
            )
            for lane in self.lanes.values():
                if lane.flusher is not None:
                    lane.flusher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await lane.flusher
        for sink in self._sinks():
            await sink.close()


def _reason(exc: BaseException) -> str:
    """The metric label of a failed write: the errno's name (ENOSPC, EIO, EDQUOT...)."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return "other"
