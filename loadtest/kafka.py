"""End-to-end latency into Kafka (`--kafka HOST:PORT`).

Telemetry sent by iotgw-load carries its device's sequence number and the send time (epoch µs)
in the JSON payload: `{"seq": 17, "ts": 1732450000123456, ...}`. A consumer (aiokafka, in the
master process) reads the telemetry topic from its end at the start of the run, finds each
record's device and sequence number, records `now - ts` as ("KAFKA", "e2e telemetry") and keeps
per device the highest sequence seen and the gaps below it, so that duplicates and reordering are
counted and, at the end, every telemetry message acknowledged to a device but never seen in
Kafka is a failure ("not seen in Kafka").

Records are the gateway's msgpack envelope `{device, ts_ms, seq, kind, protocol, topic_or_path,
payload}` (DESIGN.md); a record whose value is the raw JSON payload (another bridge) works too,
with the device taken from the record key.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from loadtest.stats import Stats

KAFKA_TYPE = "KAFKA"
E2E_NAME = "e2e telemetry"
_SEQ = re.compile(rb'"seq"\s*:\s*(\d+)')
_TS = re.compile(rb'"ts"\s*:\s*(\d+)')


def parse_record(key: bytes | None, value: bytes | None) -> tuple[str, int, int] | None:
    """(device, seq, ts µs) of one Kafka record, or None if it carries no iotgw-load telemetry."""
    if not value:
        return None
    device: Any = None
    payload: Any = value
    if value[:1] not in (b"{", b" "):
        try:
            env = msgpack.unpackb(value, raw=False, strict_map_key=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return None
        if not isinstance(env, dict):
            return None
        device = env.get("device")
        payload = env.get("payload")
        if isinstance(payload, str):
            payload = payload.encode()
        if not isinstance(payload, bytes | bytearray):
            return None
    if device is None and key:
        device = key.decode("utf-8", "replace")
    if not isinstance(device, str) or not device:
        return None
    m_seq = _SEQ.search(payload)
    m_ts = _TS.search(payload)
    if m_seq is None or m_ts is None:
        return None
    return device, int(m_seq[1]), int(m_ts[1])


@dataclass
class _Seen:
    high: int = 0
    gaps: set[int] = field(default_factory=set)


class SeqMatcher:
    """Per-device sequence bookkeeping over what the consumer saw."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.devices: dict[str, _Seen] = {}
        self.unique = 0
        self.duplicates = 0
        self.reordered = 0

    def observe(self, device: str, seq: int, ts_us: int, now_us: int | None = None) -> bool:
        """Count one record; True if it was new (not a duplicate)."""
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        d = self.devices.get(device)
        if d is None:
            d = self.devices[device] = _Seen()
        if seq > d.high:
            if d.high + 1 < seq <= d.high + 100_001:
                d.gaps.update(range(d.high + 1, seq))  # missing, for now
            d.high = seq
        elif seq in d.gaps:
            d.gaps.discard(seq)
            self.reordered += 1
        else:
            self.duplicates += 1
            self.stats.incr("kafka_duplicates")
            return False
        self.unique += 1
        self.stats.get(KAFKA_TYPE, E2E_NAME).record(max(0, now_us - ts_us))
        return True

    @property
    def gaps(self) -> int:
        return sum(len(d.gaps) for d in self.devices.values())

    def finish(self, expected: int) -> int:
        """At the end: `expected` telemetry messages were acknowledged to the devices; count
        the ones never seen as failures. Returns the number missing."""
        missing = max(0, expected - self.unique)
        if missing:
            self.stats.failure(KAFKA_TYPE, E2E_NAME, "not seen in Kafka", missing)
        if self.reordered:
            self.stats.incr("kafka_reordered", self.reordered)
        return missing


class KafkaE2E:
    """The consumer; start() before the devices publish, stop() after they stopped."""

    def __init__(self, bootstrap: str, topic: str, stats: Stats) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.matcher = SeqMatcher(stats)
        self.stats = stats
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 15.0) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
        )
        try:
            await asyncio.wait_for(consumer.start(), timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        partitions = await self._partitions(consumer, wait=2.0)
        if partitions:
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the end offsets now, before anything is produced
                await consumer.position(tp)
        self._consumer = consumer
        self._task = asyncio.get_running_loop().create_task(self._consume(not partitions))

    async def _partitions(self, consumer: Any, wait: float) -> set[int] | None:
        """The topic's partitions, refreshing metadata for up to `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            # Fresh metadata: the consumer's own cache (partitions_for_topic) is not refreshed
            # by topics() and would not see a topic created after it started (aiokafka 0.14).
            cluster = await consumer._client.fetch_all_metadata()
            partitions: set[int] | None = cluster.partitions_for_topic(self.topic)
            if partitions or time.monotonic() >= deadline:
                return partitions
            await asyncio.sleep(0.2)

    async def _consume(self, topic_is_new: bool) -> None:
        from aiokafka import TopicPartition

        consumer = self._consumer
        if topic_is_new:
            # The topic did not exist at the start (Kafka creates it with the first record the
            # gateway sends): everything in it is this run's, so read it from the beginning.
            partitions = None
            while not partitions:
                partitions = await self._partitions(consumer, wait=0.5)
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            now_us = time.time_ns() // 1000
            for records in batches.values():
                for r in records:
                    parsed = parse_record(r.key, r.value)
                    if parsed is not None:
                        self.matcher.observe(parsed[0], parsed[1], parsed[2], now_us)

    async def stop(self, expected: int, drain: float = 5.0) -> int:
        """Wait up to `drain` seconds for `expected` records, stop, count the missing ones."""
        deadline = time.monotonic() + drain
        while self.matcher.unique < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
        return self.matcher.finish(expected)


def expected_telemetry(entries: dict[tuple[str, str], Any]) -> int:
    """Telemetry messages that reached the server: PUBLISH telemetry acknowledged (QoS 1/2) or
    sent (QoS 0), plus CoAP POST telemetry answered."""
    total = 0
    for (typ, name), e in entries.items():
        if name in ("telemetry", "pub", "coap") and typ in ("PUBLISH", "POST"):
            total += e.num_requests - e.num_failures
    return total
