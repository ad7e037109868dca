"""The telemetry pipeline: records in, batches to a sink, acknowledgements out once durable.

Group commit: while the sink writes one batch, new records gather into the next, so one fsync
(or one Kafka round trip) covers everything that arrived meanwhile. There is one flusher task at
a time, never a task or future per message. Acknowledgements go back grouped per target
(a connection), in submission order, so a connection can send its PUBACKs in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Any, Protocol

from gateway.telemetry.records import Record, now_ms

log = logging.getLogger("iotgw.telemetry")

RETRY_DELAY = 1.0  # seconds before a failed batch is written again


class Sink(Protocol):
    async def write(self, records: list[Record]) -> None:
        """Return only once every record is durable; raise if not (the batch is retried)."""

    async def close(self) -> None: ...


class AckTarget(Protocol):
    def records_durable(self, tokens: list[Any]) -> None:
        """The records submitted with these tokens are durable (called in submission order)."""


class Flow(Protocol, Hashable):
    """Something that reads from the network and can stop and resume (a connection)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class TelemetryPipeline:
    def __init__(self, sink: Sink, *, high_water: int = 50_000, low_water: int = 10_000) -> None:
        self.sink = sink
        self.high_water = high_water
        self.low_water = low_water
        self._records: list[Record] = []
        self._acks: list[tuple[AckTarget, Any]] = []
        self._in_flight = 0
        self._flusher: asyncio.Task[None] | None = None
        self._seq: dict[str, int] = {}
        self._paused: set[Flow] = set()
        self.written = 0
        self.failures = 0

    @property
    def backlog(self) -> int:
        """Records accepted but not yet durable."""
        return len(self._records) + self._in_flight

    def submit(self, record: Record, target: AckTarget | None = None, token: Any = None) -> None:
        if not record.ts_ms:
            record.ts_ms = now_ms()
        seq = self._seq.get(record.device, 0) + 1
        self._seq[record.device] = seq
        record.seq = seq
        self._records.append(record)
        if target is not None:
            self._acks.append((target, token))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    def over_high_water(self, flow: Flow) -> bool:
        """After a submit: True (and the flow is paused) when the backlog is too long."""
        if self.backlog < self.high_water:
            return False
        flow.pause_reading()
        self._paused.add(flow)
        return True

    def forget(self, flow: Flow) -> None:
        self._paused.discard(flow)

    async def _flush_loop(self) -> None:
        try:
            while self._records:
                records, acks = self._records, self._acks
                self._records, self._acks = [], []
                self._in_flight = len(records)
                while True:
                    try:
                        await self.sink.write(records)
                        break
                    except Exception:
                        # Not durable: nothing is acknowledged; keep the batch and try again.
                        self.failures += 1
                        log.exception("telemetry sink failed; retrying in %ss", RETRY_DELAY)
                        await asyncio.sleep(RETRY_DELAY)
                self._in_flight = 0
                self.written += len(records)
                self._acknowledge(acks)
                if self._paused and self.backlog <= self.low_water:
                    paused, self._paused = self._paused, set()
                    for flow in paused:
                        flow.resume_reading()
        finally:
            self._flusher = None

    @staticmethod
    def _acknowledge(acks: list[tuple[AckTarget, Any]]) -> None:
        grouped: dict[AckTarget, list[Any]] = {}
        for target, token in acks:
            grouped.setdefault(target, []).append(token)
        for target, tokens in grouped.items():
            target.records_durable(tokens)

    async def drain(self) -> None:
        """Wait until everything submitted so far is durable (graceful stop)."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def close(self) -> None:
        await self.drain()
        await self.sink.close()
