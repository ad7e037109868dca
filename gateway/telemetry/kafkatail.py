"""A consumer of the gateway's Kafka topics (`iot.*`) in a consumer group, for
`iotgw telemetry tail --kafka`: it survives a partition rebalance without reprocessing out of
order.

Records are fetched into a local buffer per partition and handed to `process` one at a time, in
offset order. Only offsets of processed records are committed (after each batch, and when
partitions are revoked). When a rebalance takes partitions away, their buffered records are
dropped (the next owner starts from the committed offset: each record is processed once more at
most if it was processed but its commit failed, never before an older one of its partition), and
a record is processed only while its partition is still assigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.telemetry.records import Record

Process = Callable[[Record, Any], Awaitable[None] | None]  # (record, the Kafka record)


class KafkaTail:
    def __init__(self, bootstrap: str, topics: Sequence[str], group: str, process: Process,
                 *, from_beginning: bool = True) -> None:
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.group = group
        self.process = process
        self.from_beginning = from_beginning
        self.buffers: dict[Any, deque[Any]] = {}  # TopicPartition -> fetched, not processed
        self.processed: dict[Any, int] = {}  # TopicPartition -> next offset to commit
        self.assigned: set[Any] = set()
        self.skipped = 0  # records that are not gateway envelopes
        self.dropped_on_revoke = 0
        self._consumer: Any = None

    async def run(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener  # type: ignore[import-untyped]

        tail = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await tail._revoked(set(revoked))

            async def on_partitions_assigned(self, assigned: Any) -> None:
                tail.assigned |= set(assigned)

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="earliest" if self.from_beginning else "latest",
        )
        self._consumer = consumer
        await consumer.start()
        try:
            consumer.subscribe(self.topics, listener=Listener())
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=1000)
                for tp, records in batches.items():
                    if tp in self.assigned:
                        self.buffers.setdefault(tp, deque()).extend(records)
                await self._drain(stop)
                await self._commit(self.assigned)
        finally:
            with contextlib.suppress(Exception):
                await self._commit(self.assigned)
            await consumer.stop()
            self._consumer = None

    async def _drain(self, stop: asyncio.Event) -> None:
        for tp in list(self.buffers):
            buf = self.buffers.get(tp)
            while buf and not stop.is_set():
                if tp not in self.assigned or self.buffers.get(tp) is not buf:
                    break  # revoked while we were processing: the rest is not ours
                msg = buf.popleft()
                try:
                    record = Record.from_envelope(msg.value)
                except Exception:
                    self.skipped += 1
                else:
                    result = self.process(record, msg)
                    if inspect.isawaitable(result):
                        await result
                if tp in self.assigned and self.buffers.get(tp) is buf:
                    self.processed[tp] = msg.offset + 1

    async def _revoked(self, revoked: set[Any]) -> None:
        # Let go first, commit after: while the commit is on its way, processing must not go
        # on past the offsets it commits.
        self.assigned -= revoked
        offsets = {tp: off for tp, off in self.processed.items() if tp in revoked}
        for tp in revoked:
            buf = self.buffers.pop(tp, None)
            if buf:
                self.dropped_on_revoke += len(buf)
            self.processed.pop(tp, None)
        if offsets and self._consumer is not None:
            await self._consumer.commit(offsets)

    async def _commit(self, partitions: set[Any]) -> None:
        offsets = {tp: off for tp, off in self.processed.items() if tp in partitions}
        if offsets and self._consumer is not None:
            await self._consumer.commit(offsets)
