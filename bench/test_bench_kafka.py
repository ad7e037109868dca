"""Telemetry into a real Kafka broker on this machine (tests/kafka_broker.py), PUBACK only after
Kafka's ack (acks=all), in one run:

- `test_mqtt_qos1_to_kafka_end_to_end`: devices (a load generator in its own process: this file
  run as a script) publish QoS 1 telemetry of 64-256 bytes to a gateway process started with
  `--kafka`; a consumer in this process reads the topic live. extra_info: msgs/s acknowledged,
  PUBACK latency p50/p99/p999, end-to-end latency (device send -> consumer) p50/p99, and how
  many records went through the disk spool instead of straight to Kafka.
- `test_shadow_latency_under_a_telemetry_flood`: the pipeline with the `--kafka` sinks, in
  process: shadow records' time to durable (Kafka ack) p50/p99 alone, under a telemetry flood
  that saturates the low lane, and, for contrast, the same records put in the low lane.

Everything shares the machine's two cores with the Kafka JVM: the figures are for this box, not
for the gateway alone. Under --benchmark-disable each scenario runs briefly, so it cannot rot.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import re
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import free_port, wait_for_tcp
from kafka_broker import KafkaBroker, kafka_broker_fixture  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parent.parent


def percentiles(
    values: list[float], points: tuple[float, ...] = (50, 99, 99.9)
) -> dict[str, float]:
    """Milliseconds at each percentile (nearest rank)."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for p in points:
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        out[f"p{p:g}"] = round(ordered[index] * 1000, 2)
    return out


def _same(obj: Any) -> Any:
    return obj


# ---- the load generator (a separate process: `python bench/test_bench_kafka.py ...`) -----------


async def generate(
    port: int, devices: int, window: int, seconds: float, warmup: float, rate: float = 0
) -> dict[str, Any]:
    """`devices` MQTT connections (client id = device id), each keeping up to `window` QoS 1
    telemetry PUBLISHes in flight: as fast as the acks come back, or, with `rate`, that many
    messages a second in all on a fixed schedule. Payload = 8-byte send time (epoch seconds,
    double) + filler, 64-256 bytes in all. PUBACK latencies are counted after `warmup`."""
    from gateway._native import mqtt

    loop = asyncio.get_running_loop()
    arena = mqtt.ReadArena()
    rng = random.Random(7)
    fillers = [b"x" * (rng.randint(64, 256) - 8) for _ in range(64)]
    latencies: list[float] = []
    counts = {"acked": 0, "sent": 0, "acked_all": 0}
    clock = time.perf_counter
    began = clock()
    measure_from = began + warmup
    stop_at = measure_from + seconds

    class Device(asyncio.BufferedProtocol):
        def __init__(self, device_id: str) -> None:
            self.topic = f"devices/{device_id}/telemetry"
            self.client_id = device_id
            self.framer = mqtt.Framer(arena, version=4)
            self.transport: Any = None
            self.sent_at: dict[int, float] = {}
            self.next_id = 0
            self.ready = loop.create_future()
            self.idle = loop.create_future()

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            transport.write(mqtt.Connect(self.client_id, keep_alive=0).encode())

        def get_buffer(self, sizehint: int) -> memoryview:
            view: memoryview = self.framer.get_buffer(sizehint)
            return view

        def _publish(self, out: bytearray, now: float) -> None:
            self.next_id = self.next_id % 65535 + 1
            self.sent_at[self.next_id] = now
            payload = struct.pack(">d", time.time()) + fillers[self.next_id & 63]
            mqtt.encode_publish_into(out, self.topic, payload, qos=1, packet_id=self.next_id)
            counts["sent"] += 1

        def start(self) -> None:
            out = bytearray()
            now = clock()
            for _ in range(window):
                self._publish(out, now)
            self.transport.write(out)

        def buffer_updated(self, nbytes: int) -> None:
            now = clock()
            out = bytearray()
            for packet in self.framer.buffer_updated(nbytes):
                if packet.type == mqtt.PUBACK:
                    sent = self.sent_at.pop(packet.packet_id)
                    counts["acked_all"] += 1
                    if now >= measure_from:
                        latencies.append(now - sent)
                        counts["acked"] += 1
                    if now < stop_at and not rate:
                        self._publish(out, now)
                elif packet.type == mqtt.CONNACK and not self.ready.done():
                    self.ready.set_result(None)
            if out:
                self.transport.write(out)
            if not self.sent_at and now >= stop_at and not self.idle.done():
                self.idle.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.idle.done():
                self.idle.set_exception(ConnectionError("gateway closed the connection"))

    clients: list[Device] = []
    for i in range(devices):
        device = Device(f"dev{i}")
        await loop.create_connection(functools.partial(_same, device), "127.0.0.1", port)
        clients.append(device)
    await asyncio.gather(*(c.ready for c in clients))
    began = clock()
    measure_from = began + warmup
    stop_at = measure_from + seconds
    if rate:
        due = 0.0
        turn = 0
        last = clock()
        while (now := clock()) < stop_at:
            due = min(due + rate * (now - last), devices * window)
            last = now
            while due >= 1:
                client = clients[turn % devices]
                turn += 1
                if len(client.sent_at) < window:
                    out = bytearray()
                    client._publish(out, now)
                    client.transport.write(out)
                    due -= 1
                elif all(len(c.sent_at) >= window for c in clients):
                    break  # everyone's window is full: the gateway is behind the schedule
            await asyncio.sleep(0.002)
        for c in clients:
            if not c.sent_at and not c.idle.done():
                c.idle.set_result(None)
    else:
        for c in clients:
            c.start()
    await asyncio.wait_for(asyncio.gather(*(c.idle for c in clients)), seconds + warmup + 60)
    for c in clients:
        c.transport.close()
    return {
        "acked": counts["acked"],
        "acked_all": counts["acked_all"],
        "sent": counts["sent"],
        "seconds": seconds,
        "rate": counts["acked"] / seconds,
        "puback_ms": percentiles(latencies),
    }


# ---- the consumer (this process) ---------------------------------------------------------------


async def consume(
    bootstrap: str, topic: str, done: asyncio.Event, results: dict[str, Any]
) -> None:
    """Read the topic live until `done` and nothing more arrives; end-to-end latency from the
    device's send time in the payload to the moment the consumer holds the record."""
    import msgpack
    from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped]

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        fetch_max_bytes=32 << 20,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    latencies: list[float] = []
    count = 0
    quiet = 0
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=50_000)
            now = time.time()
            got = 0
            for messages in batches.values():
                for m in messages:
                    payload = msgpack.unpackb(m.value)["payload"]
                    latencies.append(now - struct.unpack_from(">d", payload)[0])
                    got += 1
            count += got
            quiet = quiet + 1 if got == 0 else 0
            if done.is_set() and quiet >= 10:  # two seconds without a record after the load
                break
    finally:
        await consumer.stop()
    results["consumed"] = count
    results["end_to_end_ms"] = percentiles(latencies)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.benchmark(group="kafka-e2e")
@pytest.mark.parametrize(
    ("compression", "rate"),
    [("none", 0), ("gzip", 0), ("none", 20_000)],
    ids=["max-rate", "max-rate-gzip", "paced-20k"],
)
def test_mqtt_qos1_to_kafka_end_to_end(
    benchmark: Any, kafka_broker: KafkaBroker, tmp_path: Path, compression: str, rate: int
) -> None:
    """Max rate: every device refills its window as acks come back (throughput). Paced: 20,000
    messages a second in all on a schedule (latency when the gateway is not saturated)."""
    quick = benchmark.disabled
    devices, window = (10, 20) if quick else (100, 40)
    seconds, warmup = (1.0, 0.5) if quick else (10.0, 3.0)
    topic = f"bench.{uuid.uuid4().hex[:8]}.telemetry"
    kafka_broker.create_topic(topic, partitions=4)
    port, http_port = free_port(), free_port()
    gateway = subprocess.Popen(
        [
            sys.executable, "-m", "gateway.cli", "run", "--kafka", kafka_broker.bootstrap,
            "--kafka-topics", f"telemetry={topic}", "--mqtt-port", str(port),
            "--http-port", str(http_port), "--coap-port", "0", "--allow-anonymous",
            "--acl", "open", "--data-dir", str(tmp_path / "gw"), "--log-level", "warning",
            "--kafka-compression", compression,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "gateway.log", "wb"),  # noqa: SIM115
    )
    results: dict[str, Any] = {}

    async def scenario() -> None:
        done = asyncio.Event()
        reader = asyncio.create_task(consume(kafka_broker.bootstrap, topic, done, results))
        load = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--port", str(port), "--devices", str(devices),
            "--window", str(window), "--seconds", str(seconds), "--warmup", str(warmup),
            "--rate", str(rate / 10 if quick else rate),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await load.communicate()
        assert load.returncode == 0
        results.update(json.loads(out.decode().strip().splitlines()[-1]))
        done.set()
        await reader

    try:
        wait_for_tcp(port, timeout=20, proc=gateway)
        benchmark.pedantic(lambda: asyncio.run(scenario()), rounds=1, iterations=1)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
    finally:
        gateway.terminate()
        try:
            gateway.wait(20)
        except subprocess.TimeoutExpired:
            gateway.kill()
    assert gateway.returncode == 0, (tmp_path / "gateway.log").read_text()[-2000:]
    assert results["consumed"] >= results["acked_all"]  # every acknowledged message is in Kafka
    out_kafka = _metric(metrics, "iotgw_telemetry_records_out_total", sink="kafka")
    out_spool = _metric(metrics, "iotgw_telemetry_records_out_total", sink="spool")
    batches = _metric(metrics, "iotgw_telemetry_batch_records_count", lane="low")
    records = _metric(metrics, "iotgw_telemetry_batch_records_sum", lane="low")
    results.update(
        compression=compression,
        offered_rate=rate or "max",
        devices=devices,
        window=window,
        payload_bytes="64-256",
        to_kafka_directly=out_kafka,
        through_spool=out_spool,
        mean_batch_records=round(records / batches, 1) if batches else 0,
    )
    assert results["rate"] > 0 and results["acked_all"] > 0
    if rate == 0 and compression == "none":
        # The anchor: Kafka's own producer benchmark on the same broker, acks=all, records of
        # the size of the gateway's envelopes, right after.
        size = _envelope_bytes()
        perf = _producer_performance(kafka_broker, 20_000 if quick else 1_000_000, size)
        results.update(producer_perf_record_bytes=size, **perf)
        results["vs_producer_perf"] = round(results["rate"] / perf["producer_perf_per_s"], 3)
    benchmark.extra_info.update(results)
    print("\nkafka e2e", json.dumps(results))


def _envelope_bytes() -> int:
    """The mean size of a record value the gateway sends here: the envelope of a 64-256 byte
    payload (160 on average) from a load-generator device."""
    from gateway.telemetry.records import Record

    record = Record("d-42", "telemetry", "mqtt", "devices/d-42/telemetry", b"x" * 160,
                    ts_ms=int(time.time() * 1000), seq=123_456)
    return len(record.envelope())


def _producer_performance(kafka_broker: KafkaBroker, records: int, size: int) -> dict[str, Any]:
    """kafka-producer-perf-test (org.apache.kafka.tools.ProducerPerformance, from the broker's
    jars) at full speed with acks=all, no compression, on a topic of 4 partitions."""
    topic = f"bench.{uuid.uuid4().hex[:8]}.perf"
    kafka_broker.create_topic(topic, partitions=4)
    out = subprocess.run(
        kafka_broker._java(
            "org.apache.kafka.tools.ProducerPerformance", "--topic", topic,
            "--num-records", str(records), "--record-size", str(size), "--throughput", "-1",
            "--producer-props", f"bootstrap.servers={kafka_broker.bootstrap}", "acks=all",
            "compression.type=none",
        ),
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # "N records sent, R records/sec (M MB/sec), A ms avg latency, X ms max latency, ..."
    last = [line for line in out.stdout.splitlines() if "records sent" in line][-1]
    m = re.search(r"(\d+) records sent, ([\d.]+) records/sec .*?([\d.]+) ms avg latency, "
                  r"([\d.]+) ms max latency(?:, (\d+) ms 50th, (\d+) ms 95th, (\d+) ms 99th)?",
                  last)
    assert m is not None, last
    assert int(m.group(1)) == records
    figures: dict[str, Any] = {"producer_perf_per_s": float(m.group(2)),
                               "producer_perf_avg_latency_ms": float(m.group(3))}
    if m.group(7):
        figures["producer_perf_p99_ms"] = int(m.group(7))
    return figures


# ---- shadow latency under a telemetry flood (in process, real Kafka) ---------------------------


@pytest.mark.benchmark(group="kafka-lanes")
def test_shadow_latency_under_a_telemetry_flood(
    benchmark: Any, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    from gateway.config import Config
    from gateway.telemetry.kafkasink import kafka_sinks
    from gateway.telemetry.lanes import LOW
    from gateway.telemetry.pipeline import TelemetryPipeline
    from gateway.telemetry.records import SHADOW, TELEMETRY, Record

    quick = benchmark.disabled
    seconds = 1.0 if quick else 5.0
    tag = uuid.uuid4().hex[:8]
    config = Config(
        kafka=kafka_broker.bootstrap,
        kafka_topics=f"telemetry=lanes.{tag}.telemetry,shadow=lanes.{tag}.shadow",
        data_dir=str(tmp_path),
    )
    results: dict[str, Any] = {}

    class Timer:
        def __init__(self) -> None:
            self.latencies: list[float] = []

        def records_durable(self, tokens: list[Any]) -> None:
            now = time.perf_counter()
            self.latencies.extend(now - t for t in tokens)

    async def shadows(pipeline: TelemetryPipeline, lane: str | None, until: float) -> Timer:
        timer = Timer()
        n = 0
        while time.perf_counter() < until:
            record = Record(f"dev{n % 20}", SHADOW, "shadow", "$shadow/x", b'{"v":%d}' % n)
            pipeline.submit(record, timer, time.perf_counter(), lane=lane)
            n += 1
            await asyncio.sleep(0.01)  # 100 shadow changes a second
        await pipeline.drain()
        return timer

    async def flood(pipeline: TelemetryPipeline, until: float, flow: Any) -> int:
        """Telemetry as fast as the pipeline takes it (pausing when it says so)."""
        sent = 0
        payload = b"x" * 128
        while time.perf_counter() < until:
            if flow.paused:
                await asyncio.sleep(0.005)
                continue
            for _ in range(500):
                record = Record(f"dev{sent % 1000}", TELEMETRY, "mqtt", "devices/x/telemetry",
                                payload)
                pipeline.submit(record)
                sent += 1
            pipeline.over_high_water(flow)
            await asyncio.sleep(0)
        return sent

    class Flow:
        paused = False

        def pause_reading(self, reason: str) -> None:
            self.paused = True

        def resume_reading(self, reason: str) -> None:
            self.paused = False

    async def scenario() -> None:
        # The gateway's defaults (high water 50,000 records per lane), nothing shed.
        pipeline = TelemetryPipeline(kafka_sinks(config, tmp_path, None), shed_water=1 << 30)
        await pipeline.start()
        warm = Record("dev0", TELEMETRY, "mqtt", "t", b"x")
        pipeline.submit(warm)
        pipeline.submit(Record("dev0", SHADOW, "shadow", "s", b"x"))
        await pipeline.drain()
        loop_time = time.perf_counter
        idle = await shadows(pipeline, None, loop_time() + seconds)
        results["shadow_alone_ms"] = percentiles(idle.latencies)
        for name, lane in (("shadow_under_flood_ms", None), ("shadow_in_low_lane_ms", LOW)):
            flow = Flow()
            until = loop_time() + seconds
            timer, sent = await asyncio.gather(
                shadows(pipeline, lane, until), flood(pipeline, until, flow)
            )
            results[name] = percentiles(timer.latencies)
            results[name.replace("_ms", "_telemetry_per_s")] = round(sent / seconds)
            await pipeline.drain()
        await pipeline.close()

    benchmark.pedantic(lambda: asyncio.run(scenario()), rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    print("\nkafka lanes", json.dumps(results))
    assert results["shadow_under_flood_ms"] and results["shadow_in_low_lane_ms"]


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description="QoS 1 telemetry load for bench_kafka")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--window", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=0, help="messages/s in all (0: max)")
    args = parser.parse_args()
    result = uvloop.run(
        generate(args.port, args.devices, args.window, args.seconds, args.warmup, args.rate)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
