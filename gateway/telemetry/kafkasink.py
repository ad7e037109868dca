"""The Kafka sink: telemetry records to Kafka topics through aiokafka, acknowledged with acks=all.

One record per Kafka message: key = device id (so one device's records share a partition and
keep their order), value = the msgpack envelope (records.py), headers `content-type:
application/msgpack` and, when the device said what its payload is (MQTT 5 content type),
`payload-content-type`. Topic per kind (`iot.telemetry`, `iot.events`, `iot.shadow`,
`iot.commands`; `--kafka-topics kind=topic,...` renames them).

The producer is idempotent (which implies acks=all and at most one batch in flight per
partition in aiokafka), so a retried batch is neither duplicated nor reordered. Records are
handed over through aiokafka's batch API: the sink groups a pipeline batch per partition (the
Java client's murmur2 partitioner, so other clients agree on which partition a device is in)
and queues each group as one record batch with one future, instead of a coroutine and a future
per record. `write` returns once every record is acknowledged and raises otherwise; the
spooling sink (spool.py) uses the lower-level `send` to know which records are on their way.

`kafka_sinks` builds what `--kafka` means: per lane (lanes.py) its own producer and its own disk
spool in the data dir, so shadow traffic never waits behind telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.partitioner import murmur2  # type: ignore[import-untyped]

from gateway.telemetry.lanes import HIGH, LANES
from gateway.telemetry.records import COMMANDS, EVENTS, SHADOW, TELEMETRY, Record
from gateway.telemetry.spool import Delivery, Spool, SpoolingSink, deliver

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.metrics import TelemetryMetrics
    from gateway.telemetry.pipeline import Sink

log = logging.getLogger("iotgw.telemetry.kafka")

DEFAULT_TOPICS = {
    TELEMETRY: "iot.telemetry",
    EVENTS: "iot.events",
    SHADOW: "iot.shadow",
    COMMANDS: "iot.commands",
}
ENVELOPE_CONTENT_TYPE = b"application/msgpack"
RECONNECT_DELAY = 1.0  # seconds between attempts to start a producer
YIELD_EVERY = 1000  # records encoded between two chances for other tasks to run


class KafkaUnavailable(ConnectionError):
    """No producer could be started (the brokers do not answer); try again later."""


def parse_topics(spec: str | None) -> dict[str, str]:
    """`kind=topic[,kind=topic...]` over the defaults: `telemetry=plant.telemetry`."""
    topics = dict(DEFAULT_TOPICS)
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind, sep, topic = item.partition("=")
        if not sep or not kind.strip() or not topic.strip():
            raise ValueError(f"kafka topics: {item!r} is not kind=topic")
        topics[kind.strip()] = topic.strip()
    return topics


def compression_type(setting: str) -> str | None:
    """The producer's compression for `--kafka-compression`. Default none: with the broker on
    the same host, none gave 147k msg/s end to end, lz4 74k (aiokafka compresses at level 9)
    and gzip 51k (bench/test_bench_kafka.py); the gateway's CPU, not the link, is the limit.
    A codec whose library is missing is a configuration error, found at start."""
    from aiokafka import codec

    if setting == "none":
        return None
    available = {
        "gzip": codec.has_gzip,
        "lz4": codec.has_lz4,
        "zstd": codec.has_zstd,
        "snappy": codec.has_snappy,
    }
    if setting not in available:
        raise ValueError(f"kafka compression: unknown codec {setting!r}")
    if not available[setting]():
        raise ValueError(f"kafka compression {setting}: its library (cramjam) is not installed")
    return setting


class KafkaSink:
    label = "kafka"

    def __init__(
        self,
        bootstrap: str,
        *,
        topics: Mapping[str, str] | None = None,
        compression: str | None = None,
        batch_bytes: int = 512 << 10,
        request_timeout_ms: int = 30_000,
        start_timeout: float = 5.0,
        client_id: str = "iotgw",
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = dict(topics or DEFAULT_TOPICS)
        self.compression = compression
        self.batch_bytes = batch_bytes
        self.request_timeout_ms = request_timeout_ms
        self.start_timeout = start_timeout
        self.client_id = client_id
        self._producer: Any = None
        self._starting: asyncio.Future[Any] | None = None
        self._retry_at = 0.0
        # device -> (key bytes, partition), per topic; rebuilt when the partition count changes
        self._partitions: dict[str, tuple[int, dict[str, tuple[bytes, int]]]] = {}
        self._headers: dict[str | None, list[tuple[str, bytes]]] = {
            None: [("content-type", ENVELOPE_CONTENT_TYPE)]
        }

    # ---- the producer ------------------------------------------------------------------------

    async def _ready(self) -> Any:
        producer = self._producer
        if producer is not None:
            task = producer._sender.sender_task
            if task is None or not task.done():
                return producer
            # The sender died on a fatal error (its batches have failed): start a new producer.
            log.error("Kafka producer failed; starting a new one")
            self._producer = None
            await self._stop(producer)
        loop = asyncio.get_running_loop()
        if self._starting is not None:
            return await asyncio.shield(self._starting)
        if loop.time() < self._retry_at:
            raise KafkaUnavailable(f"Kafka at {self.bootstrap} is unreachable")
        self._starting = loop.create_future()
        producer = None
        try:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                enable_idempotence=True,
                acks="all",
                compression_type=self.compression,
                max_batch_size=self.batch_bytes,
                max_request_size=max(1 << 20, 2 * self.batch_bytes),
                linger_ms=0,  # the pipeline batches (group commit); nothing gains from waiting
                request_timeout_ms=self.request_timeout_ms,
                retry_backoff_ms=100,
            )
            await asyncio.wait_for(producer.start(), self.start_timeout)
        except BaseException as exc:
            self._retry_at = loop.time() + RECONNECT_DELAY
            if producer is not None:
                await self._stop(producer)
            self._starting.set_exception(KafkaUnavailable(str(exc)))
            self._starting.exception()
            self._starting = None
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise KafkaUnavailable(f"Kafka at {self.bootstrap}: {exc!r}") from exc
        self._producer = producer
        self._starting.set_result(producer)
        self._starting = None
        log.info("Kafka producer connected to %s", self.bootstrap)
        return producer

    async def _stop(self, producer: Any, timeout: float = 5.0) -> None:
        """Stop a producer; if Kafka does not answer, abandon what it still holds (whoever
        handed it records has them in the spool or has not acknowledged them)."""
        try:
            await asyncio.wait_for(producer.stop(), timeout)
        except (TimeoutError, Exception) as exc:
            log.warning("Kafka producer did not stop cleanly: %r", exc)
            sender = producer._sender
            if sender.sender_task is not None and not sender.sender_task.done():
                sender.sender_task.cancel()
                with contextlib.suppress(BaseException):
                    await sender.sender_task
            with contextlib.suppress(Exception):
                await producer.client.close()

    def _partition_table(self, producer: Any, topic: str) -> dict[str, tuple[bytes, int]]:
        partitions = producer.client.cluster.partitions_for_topic(topic)
        count = len(partitions) if partitions else 0
        cached = self._partitions.get(topic)
        if cached is None or cached[0] != count:
            cached = (count, {})
            self._partitions[topic] = cached
        return cached[1]

    # ---- sending -----------------------------------------------------------------------------

    async def send(self, records: Sequence[Record], out: list[Delivery]) -> None:
        """Queue the records with the producer, one record batch per partition (more if one
        grows past `batch_bytes`); each queued batch is appended to `out` right away."""
        producer = await self._ready()
        topics = self.topics
        headers_by_type = self._headers
        tables: dict[str, tuple[dict[str, tuple[bytes, int]], list[int]]] = {}
        open_batches: dict[tuple[str, int], tuple[Any, list[int]]] = {}
        for i, record in enumerate(records):
            if i and not i % YIELD_EVERY:
                await asyncio.sleep(0)  # a big batch must not hold the loop (other lanes, sockets)
            topic = topics.get(record.kind) or f"iot.{record.kind}"
            table = tables.get(topic)
            if table is None:
                await producer.partitions_for(topic)  # metadata (creates the topic if allowed)
                table = (
                    self._partition_table(producer, topic),
                    sorted(producer.client.cluster.partitions_for_topic(topic)),
                )
                tables[topic] = table
            keyed = table[0].get(record.device)
            if keyed is None:
                key = record.device.encode()
                all_partitions = table[1]
                partition = all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]
                keyed = table[0][record.device] = (key, partition)
            key, partition = keyed
            headers = headers_by_type.get(record.content_type)
            if headers is None:
                headers = headers_by_type[record.content_type] = [
                    ("content-type", ENVELOPE_CONTENT_TYPE),
                    ("payload-content-type", (record.content_type or "").encode()),
                ]
            value = record.envelope()
            batch = open_batches.get((topic, partition))
            if batch is None:
                batch = open_batches[(topic, partition)] = (producer.create_batch(), [])
            ts = record.ts_ms
            if batch[0].append(timestamp=ts, key=key, value=value, headers=headers) is None:
                # Full: queue it and start the next one for this partition.
                del open_batches[(topic, partition)]
                await self._queue(producer, batch, topic, partition, out)
                batch = open_batches[(topic, partition)] = (producer.create_batch(), [])
                batch[0].append(timestamp=ts, key=key, value=value, headers=headers)
            batch[1].append(i)
        for (topic, partition), batch in open_batches.items():
            await self._queue(producer, batch, topic, partition, out)

    @staticmethod
    async def _queue(
        producer: Any, batch: tuple[Any, list[int]], topic: str, partition: int, out: list[Delivery]
    ) -> None:
        builder, indices = batch
        builder.close()  # complete: the sender takes it at once (no linger)
        future = await producer.send_batch(builder, topic, partition=partition)
        out.append((future, indices))

    async def write(self, records: list[Record]) -> None:
        """Return once Kafka acknowledged every record (acks=all); raise if it did not."""
        await deliver(self, records, [])

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await self._stop(producer)


def kafka_sinks(
    config: Config, data_dir: Path, metrics: TelemetryMetrics | None
) -> dict[str, Sink]:
    """`--kafka`: per lane a Kafka producer and a disk spool (data_dir/spool/{lane})."""
    topics = parse_topics(config.kafka_topics)
    compression = compression_type(config.kafka_compression)
    assert config.kafka
    sinks: dict[str, Sink] = {}
    for lane in LANES:
        kafka = KafkaSink(
            config.kafka,
            topics=topics,
            compression=compression,
            batch_bytes=64 << 10 if lane == HIGH else 512 << 10,
            client_id=f"iotgw-{lane}",
        )
        spool = Spool(
            data_dir / "spool" / lane,
            max_bytes=config.spool_max_bytes,
            metrics=metrics,
            lane=lane,
        )
        sinks[lane] = SpoolingSink(
            kafka,
            spool,
            ack_timeout=config.kafka_ack_timeout_ms / 1000,
            lane=lane,
            metrics=metrics,
        )
    return sinks
