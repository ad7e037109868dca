"""Telemetry to a real Kafka broker (tests/kafka_broker.py): the Kafka sink, durable acknowledgement
(PUBACK only once Kafka or the disk spool has the record), Kafka stopped and restarted
mid-stream, the gateway SIGKILLed mid-stream, and priority lanes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import free_port, stop_process, wait_for_tcp
from kafka_broker import KafkaBroker, end_offsets, read_topic
from test_mqtt_server import RawClient

from gateway._native import mqtt
from gateway.telemetry.filesink import FileSink
from gateway.telemetry.kafkasink import KafkaSink, parse_topics
from gateway.telemetry.lanes import HIGH, LOW
from gateway.telemetry.pipeline import TelemetryPipeline
from gateway.telemetry.records import SHADOW, TELEMETRY, Record
from gateway.telemetry.spool import Spool, SpoolingSink

ROOT = Path(__file__).resolve().parent.parent


def _topics() -> dict[str, str]:
    """Topics of one test alone (auto-created by the broker)."""
    tag = uuid.uuid4().hex[:8]
    return {kind: f"t{tag}.{kind}" for kind in ("telemetry", "events", "shadow", "commands")}


def _spec(topics: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in topics.items())


def _record(device: str, i: int, kind: str = TELEMETRY) -> Record:
    return Record(device, kind, "mqtt", f"devices/{device}/{kind}", f"{device}:{i}".encode())


class Collector:
    def __init__(self) -> None:
        self.tokens: list[Any] = []

    def records_durable(self, tokens: list[Any]) -> None:
        self.tokens.extend(tokens)


def per_device(records: list[Any]) -> dict[str, list[int]]:
    """device -> message numbers in Kafka order, from payloads `device:number[ padding]`."""
    seen: dict[str, list[int]] = {}
    for _, _, key, value, _ in records:
        envelope = msgpack.unpackb(value, raw=False)
        device, number = envelope["payload"].split(b" ")[0].decode().split(":")
        assert key == device.encode() == envelope["device"].encode()
        seen.setdefault(device, []).append(int(number))
    return seen


def all_acked_in(records: list[Any], acked: dict[str, list[int]]) -> bool:
    seen = per_device(records)
    return all(set(numbers) <= set(seen.get(device, ())) for device, numbers in acked.items())


def check_delivery(records: list[Any], acked: dict[str, list[int]]) -> int:
    """Every acknowledged message is in Kafka, each device's in the order sent; returns the
    number of repeats (at-least-once: a repeat may follow an outage, never reorder)."""
    seen = per_device(records)
    repeats = 0
    for device, numbers in acked.items():
        got = seen.get(device, [])
        first: list[int] = []
        known: set[int] = set()
        for n in got:
            if n in known:
                repeats += 1
            else:
                known.add(n)
                first.append(n)
        missing = sorted(set(numbers) - known)
        assert not missing, f"{device}: {len(missing)} acknowledged messages lost: {missing[:10]}"
        assert first == sorted(first), f"{device}: out of order"
    return repeats


# ---- a device on a raw socket -------------------------------------------------------------------


class Device:
    """An MQTT 3.1.1 device publishing QoS 1 telemetry with a window of PUBLISHes in flight;
    remembers which message numbers were acknowledged (PUBACK), in order."""

    def __init__(self, port: int, device_id: str, window: int = 32, size: int = 64) -> None:
        self.device_id = device_id
        self.window = window
        self.size = size
        self.topic = f"devices/{device_id}/telemetry"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.framer = mqtt.Framer(version=4)
        self.sock.sendall(mqtt.Connect(client_id=device_id, protocol_level=4).encode(4))
        packets = self._read(5.0)
        assert packets and packets[0].type == mqtt.CONNACK and packets[0].reason_code == 0
        self.acked: list[int] = []
        self.ack_times: list[float] = []
        self.sent = 0
        self.inflight: dict[int, int] = {}
        self._next_id = 0
        self.closed = False

    def _read(self, timeout: float) -> list[Any]:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        except OSError:
            self.closed = True
            return []
        if not data:
            self.closed = True
            return []
        return [p.detach() for p in self.framer.feed(data)]

    def payload(self, n: int) -> bytes:
        return f"{self.device_id}:{n} ".encode().ljust(self.size, b".")

    def publish(self, n: int) -> None:
        self._next_id = self._next_id % 65535 + 1
        self.inflight[self._next_id] = n
        frame = mqtt.encode_publish(self.topic, self.payload(n), qos=1, packet_id=self._next_id)
        self.sock.sendall(frame)
        self.sent += 1

    def pump(self, timeout: float) -> None:
        for packet in self._read(timeout):
            if packet.type == mqtt.PUBACK:
                self.acked.append(self.inflight.pop(packet.packet_id))
                self.ack_times.append(time.monotonic())

    def run(self, stop: threading.Event, rate: float, start: int = 0) -> None:
        """Publish start, start+1, ... at `rate` per second until `stop`, then collect the
        outstanding acks. Returns early if the gateway goes away."""
        began = time.monotonic()
        n = start
        try:
            while not stop.is_set() and not self.closed:
                due = start + int((time.monotonic() - began) * rate) + 1
                while len(self.inflight) < self.window and n < due:
                    self.publish(n)
                    n += 1
                self.pump(0.005)
            deadline = time.monotonic() + 15
            while self.inflight and not self.closed and time.monotonic() < deadline:
                self.pump(0.2)
        except OSError:
            self.closed = True

    def close(self) -> None:
        self.sock.close()


def stream(devices: list[Device], rate: float) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    threads = [threading.Thread(target=d.run, args=(stop, rate), daemon=True) for d in devices]
    for t in threads:
        t.start()
    return stop, threads


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- the sink on its own ------------------------------------------------------------------------


def test_kafka_sink_writes_keyed_envelopes_per_kind_topic_in_device_order(
    kafka_broker: KafkaBroker,
) -> None:
    topics = _topics()

    async def main() -> None:
        sink = KafkaSink(kafka_broker.bootstrap, topics=topics)
        pipeline = TelemetryPipeline(sink)
        for i in range(600):
            record = _record(f"d{i % 6}", i, kind="events" if i % 10 == 0 else TELEMETRY)
            if i == 7:
                record.content_type = "application/json"
            pipeline.submit(record)
            if i % 100 == 0:
                await asyncio.sleep(0.01)  # several group commits
        await pipeline.close()

    asyncio.run(main())
    telemetry = read_topic(kafka_broker.bootstrap, topics["telemetry"], 540)
    events = read_topic(kafka_broker.bootstrap, topics["events"], 60)
    assert (len(telemetry), len(events)) == (540, 60)
    in_events = per_device(events)
    for device, numbers in per_device(telemetry).items():
        assert numbers == sorted(numbers), device
        assert len(numbers) + len(in_events.get(device, [])) == 100
    envelope = msgpack.unpackb(telemetry[0][3], raw=False)
    assert set(envelope) == {
        "device", "ts_ms", "seq", "kind", "protocol", "topic_or_path", "payload"
    }
    by_payload = {msgpack.unpackb(r[3], raw=False)["payload"]: r for r in telemetry}
    headers = dict(by_payload[b"d1:7"][4])
    assert headers == {
        "content-type": b"application/msgpack",
        "payload-content-type": b"application/json",
    }
    assert dict(by_payload[b"d1:1"][4]) == {"content-type": b"application/msgpack"}
    # seq is per device, in submission order
    seqs = [msgpack.unpackb(r[3], raw=False)["seq"] for r in telemetry + events if r[2] == b"d0"]
    assert sorted(seqs) == list(range(1, 101))


def test_topics_are_configurable_per_kind() -> None:
    topics = parse_topics("telemetry=plant.t, events = plant.e")
    assert topics == {
        "telemetry": "plant.t",
        "events": "plant.e",
        "shadow": "iot.shadow",
        "commands": "iot.commands",
    }
    with pytest.raises(ValueError):
        parse_topics("telemetry")


# ---- device -> gateway -> Kafka -----------------------------------------------------------------


def test_mqtt_qos1_telemetry_reaches_kafka_in_device_order_and_puback_follows_kafka_ack(
    gateway_factory: Any, kafka_broker: KafkaBroker
) -> None:
    topics = _topics()
    gw = gateway_factory(
        allow_anonymous=True,
        acl="open",
        kafka=kafka_broker.bootstrap,
        kafka_topics=_spec(topics),
        kafka_ack_timeout_ms=10_000,
    )
    # One at a time: when the PUBACK arrives, Kafka already counts the record.
    probe = Device(gw.mqtt_port, "probe")
    for n in range(5):
        probe.publish(n)
        while probe.inflight:
            probe.pump(5)
        assert end_offsets(kafka_broker.bootstrap, topics["telemetry"]) == n + 1
    # A broker that answers nothing: no PUBACK until it answers again.
    kafka_broker.pause()
    try:
        probe.publish(5)
        probe.pump(1.5)
        assert probe.acked == [0, 1, 2, 3, 4], gw.gateway.metrics.render().decode()
    finally:
        kafka_broker.resume()
    while probe.inflight:
        probe.pump(5)
    assert probe.acked[-1] == 5
    probe.close()

    devices = [Device(gw.mqtt_port, f"dev{i}") for i in range(4)]
    stop, threads = stream(devices, rate=1500)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(30)
    acked = {d.device_id: d.acked for d in devices}
    total = sum(map(len, acked.values()))
    assert total > 1000 and all(d.acked == list(range(d.sent)) for d in devices)
    records = read_topic(kafka_broker.bootstrap, topics["telemetry"], total + 6)
    assert len(records) == total + 6  # nothing repeated, nothing lost
    assert check_delivery(records, acked) == 0
    one = msgpack.unpackb(records[-1][3], raw=False)
    assert one["kind"] == "telemetry" and one["protocol"] == "mqtt"
    assert one["topic_or_path"].startswith("devices/") and len(one["payload"]) == 64
    metrics = gw.gateway.metrics.render().decode()
    assert 'iotgw_telemetry_records_out_total{kind="telemetry",sink="kafka"}' in metrics
    assert 'sink="spool"' not in metrics  # a healthy Kafka: nothing went to the spool
    for d in devices:
        d.close()


def test_shadow_changes_go_to_the_shadow_topic_through_the_high_lane(
    gateway_factory: Any, kafka_broker: KafkaBroker
) -> None:
    topics = _topics()
    gw = gateway_factory(
        allow_anonymous=True, acl="open", kafka=kafka_broker.bootstrap, kafka_topics=_spec(topics)
    )
    device = Device(gw.mqtt_port, "dev-s")
    body = json.dumps({"state": {"reported": {"on": True}}}).encode()
    device.sock.sendall(mqtt.encode_publish("$shadow/dev-s/update", body, qos=1, packet_id=1))
    (record,) = read_topic(kafka_broker.bootstrap, topics["shadow"], 1)
    envelope = msgpack.unpackb(record[3], raw=False)
    assert (record[2], envelope["kind"], envelope["device"]) == (b"dev-s", "shadow", "dev-s")
    assert json.loads(envelope["payload"])["state"] == {"reported": {"on": True}}
    assert dict(record[4])["payload-content-type"] == b"application/json"
    high = gw.gateway.telemetry.lanes[HIGH].sink
    assert high.spool.directory.name == "high" and high.spooled == 0
    device.close()


def test_kafka_stopped_and_restarted_mid_stream_loses_no_acknowledged_record(
    gateway_factory: Any, kafka_broker: KafkaBroker
) -> None:
    topics = _topics()
    gw = gateway_factory(
        allow_anonymous=True,
        acl="open",
        kafka=kafka_broker.bootstrap,
        kafka_topics=_spec(topics),
        kafka_ack_timeout_ms=1000,
    )
    devices = [Device(gw.mqtt_port, f"dev{i}") for i in range(4)]
    stop, threads = stream(devices, rate=400)
    try:
        time.sleep(1.5)
        kafka_broker.stop()
        acked_before = sum(len(d.acked) for d in devices)
        time.sleep(3.0)  # Kafka down: acknowledged from the spool
        acked_during = sum(len(d.acked) for d in devices) - acked_before
        kafka_broker.start()
        time.sleep(2.0)
    finally:
        kafka_broker.start()
        stop.set()
        for t in threads:
            t.join(30)
    assert acked_during > 0  # devices kept being acknowledged while Kafka was down
    low = gw.gateway.telemetry.lanes[LOW].sink
    wait_until(lambda: low.spool.empty, 30, "the spool to drain")
    acked = {d.device_id: d.acked for d in devices}
    assert all(d.acked == list(range(d.sent)) for d in devices)
    total = sum(map(len, acked.values()))
    records = read_topic(kafka_broker.bootstrap, topics["telemetry"], total)
    repeats = check_delivery(records, acked)
    assert low.spooled > 0 and low.replayed > 0
    print(
        f"\nacked {total} ({acked_during} while Kafka was down), spooled {low.spooled}, "
        f"replayed {low.replayed}, repeats in Kafka {repeats}"
    )
    for d in devices:
        d.close()


def _spooled_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "spool").rglob("*.seg"))


def _run_gateway(data_dir: Path, port: int, bootstrap: str, topics: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--kafka",
            bootstrap,
            "--kafka-topics",
            topics,
            "--kafka-ack-timeout-ms",
            "1000",
            "--data-dir",
            str(data_dir),
            "--mqtt-port",
            str(port),
            "--http-port",
            "0",
            "--allow-anonymous",
            "--acl",
            "open",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir.parent / f"gateway-{port}.log", "ab"),  # noqa: SIM115
    )
    wait_for_tcp(port, timeout=20, proc=proc)
    return proc


def test_gateway_sigkilled_mid_stream_replays_its_spool_on_restart(
    tmp_path: Path, kafka_broker: KafkaBroker
) -> None:
    topics = _topics()
    data_dir = tmp_path / "gw"
    port = free_port()
    gateway = _run_gateway(data_dir, port, kafka_broker.bootstrap, _spec(topics))
    devices = [Device(port, f"dev{i}") for i in range(3)]
    stop, threads = stream(devices, rate=400)
    try:
        time.sleep(1.5)  # to Kafka directly
        kafka_broker.stop()
        deadline = time.monotonic() + 30  # into the spool (sooner or later on a busy machine)
        while not _spooled_bytes(data_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        for t in threads:
            t.join(20)
        kafka_broker.start()
    finally:
        stop.set()
        kafka_broker.start()
        if gateway.poll() is None:
            gateway.kill()
    acked = {d.device_id: list(d.acked) for d in devices}
    total = sum(map(len, acked.values()))
    assert _spooled_bytes(data_dir) > 0  # acknowledged records were in the spool when it died
    for d in devices:
        d.close()

    port = free_port()
    gateway = _run_gateway(data_dir, port, kafka_broker.bootstrap, _spec(topics))
    try:
        # The restarted gateway replays on its own; a device goes on where it was, and its new
        # records land after its replayed ones.
        device = Device(port, "dev0")
        for n in range(devices[0].sent + 1000, devices[0].sent + 1010):
            device.publish(n)
        while device.inflight and not device.closed:
            device.pump(5)
        acked["dev0"] += device.acked
        total += len(device.acked)
        # The new records were acknowledged once in the spool, behind the replay: they reach
        # Kafka when the replay does, which may be after a first read.
        deadline = time.monotonic() + 60
        while True:
            records = read_topic(kafka_broker.bootstrap, topics["telemetry"], total, timeout=30)
            if all_acked_in(records, acked) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        repeats = check_delivery(records, acked)
        print(f"\nacked {total} before the kill; repeats in Kafka {repeats}")
        device.close()
    finally:
        stop_process(gateway, 20)


def test_a_spool_left_behind_is_replayed_in_order_on_start(
    tmp_path: Path, kafka_broker: KafkaBroker
) -> None:
    topics = _topics()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: Kafka unreachable

    async def spool_while_unreachable() -> None:
        sink = SpoolingSink(KafkaSink(dead, topics=topics), Spool(tmp_path), ack_timeout=0.5)
        pipeline = TelemetryPipeline(sink)
        await pipeline.start()
        target = Collector()
        for i in range(2000):
            pipeline.submit(_record(f"d{i % 5}", i), target, i)
        await pipeline.drain()
        assert target.tokens == list(range(2000))  # acknowledged: durable in the spool
        assert sink.spool.pending == 2000
        await pipeline.close()

    async def replay() -> int:
        sink = SpoolingSink(KafkaSink(kafka_broker.bootstrap, topics=topics), Spool(tmp_path))
        pipeline = TelemetryPipeline(sink)
        await pipeline.start()
        deadline = time.monotonic() + 20
        while not sink.spool.empty and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sink.spool.empty and sink.spool.bytes == 0
        await pipeline.close()
        return sink.replayed

    asyncio.run(spool_while_unreachable())
    assert asyncio.run(replay()) == 2000
    records = read_topic(kafka_broker.bootstrap, topics["telemetry"], 2000)
    assert len(records) == 2000
    check_delivery(records, {f"d{k}": list(range(k, 2000, 5)) for k in range(5)})
    assert not list(tmp_path.glob("*.seg"))  # every segment deleted once acknowledged


def test_a_batch_kafka_acknowledges_late_is_spooled_and_not_sent_again(
    tmp_path: Path, kafka_broker: KafkaBroker
) -> None:
    """Kafka hangs (SIGSTOP) with a batch in flight: after `ack_timeout` the batch is spooled
    and acknowledged; when Kafka answers, the replayer finds it delivered: exactly once."""
    topics = _topics()

    async def main() -> SpoolingSink:
        sink = SpoolingSink(
            KafkaSink(kafka_broker.bootstrap, topics=topics), Spool(tmp_path), ack_timeout=0.5
        )
        pipeline = TelemetryPipeline(sink)
        await pipeline.start()
        target = Collector()
        pipeline.submit(_record("d0", 0), target, 0)
        await pipeline.drain()  # the producer is connected, the topic exists
        kafka_broker.pause()
        try:
            for i in range(1, 301):
                pipeline.submit(_record(f"d{i % 3}", i), target, i)
            await asyncio.wait_for(pipeline.drain(), 10)
            assert target.tokens == list(range(301))  # durable in the spool: acknowledged
            assert sink.spooled == 300 and not sink.spool.empty
        finally:
            kafka_broker.resume()
        await asyncio.wait_for(_until(lambda: sink.spool.empty), 20)
        await pipeline.close()
        return sink

    sink = asyncio.run(main())
    assert sink.replayed == 300
    records = read_topic(kafka_broker.bootstrap, topics["telemetry"], 301)
    assert len(records) == 301  # found delivered, not sent twice
    check_delivery(records, {f"d{k}": list(range(k, 301, 3)) for k in range(3)})


def test_full_spool_withholds_acks_and_pauses_reading_until_kafka_returns(
    tmp_path: Path, kafka_broker: KafkaBroker
) -> None:
    topics = _topics()

    class Flow:
        def __init__(self) -> None:
            self.paused = 0
            self.resumed = 0

        def pause_reading(self, reason: str) -> None:
            self.paused += 1

        def resume_reading(self, reason: str) -> None:
            self.resumed += 1

    async def main() -> tuple[Collector, Flow, SpoolingSink]:
        spool = Spool(tmp_path, max_bytes=64 << 10, segment_bytes=8 << 10)
        sink = SpoolingSink(
            KafkaSink(kafka_broker.bootstrap, topics=topics), spool, ack_timeout=0.5
        )
        pipeline = TelemetryPipeline(sink, high_water=2000, low_water=100)
        await pipeline.start()
        target, flow = Collector(), Flow()
        kafka_broker.stop()
        try:
            for i in range(3000):  # ~70 bytes each: about three times what the spool holds
                pipeline.submit(_record(f"d{i % 3}", i), target, i)
                if pipeline.over_high_water(flow):
                    break
                if i % 50 == 0:
                    await asyncio.sleep(0)
            submitted = i + 1
            await asyncio.sleep(2.0)
            assert flow.paused == 1 and flow.resumed == 0  # backpressure: reading paused
            assert 0 < len(target.tokens) < submitted  # what fits is acknowledged...
            assert target.tokens == list(range(len(target.tokens)))  # ...in order
            assert spool.bytes <= spool.max_bytes
        finally:
            kafka_broker.start()  # from the main thread (see tests/kafka_broker.py)
        await asyncio.wait_for(pipeline.drain(), 30)
        assert target.tokens == list(range(submitted)) and flow.resumed == 1
        await asyncio.wait_for(_until(lambda: spool.empty), 20)  # all replayed to Kafka
        await pipeline.close()
        return target, flow, sink

    target, _, sink = asyncio.run(main())
    total = len(target.tokens)
    records = read_topic(kafka_broker.bootstrap, topics["telemetry"], total)
    check_delivery(records, {f"d{k}": list(range(k, total, 3)) for k in range(3)})
    assert sink.spooled > 0


# ---- priority lanes -----------------------------------------------------------------------------


def test_shadow_records_are_not_held_behind_a_saturated_telemetry_lane(tmp_path: Path) -> None:
    """The low lane's sink is stuck (a test double holding telemetry writes until released):
    shadow records still become durable, and the same records put in the low lane wait."""

    class StuckTelemetry:
        def __init__(self, inner: FileSink) -> None:
            self.inner = inner
            self.release = asyncio.Event()

        async def write(self, records: list[Record]) -> None:
            await self.release.wait()
            await self.inner.write(records)

        async def close(self) -> None:
            pass

    async def main() -> None:
        files = FileSink(tmp_path)
        stuck = StuckTelemetry(files)
        pipeline = TelemetryPipeline({HIGH: files, LOW: stuck})
        telemetry, shadow, misfiled = Collector(), Collector(), Collector()
        for i in range(10_000):
            pipeline.submit(_record(f"d{i % 50}", i), telemetry, i)
        for i in range(20):
            pipeline.submit(_record("d1", i, kind=SHADOW), shadow, i)
            pipeline.submit(_record("d1", i, kind=SHADOW), misfiled, i, lane=LOW)
            await asyncio.sleep(0.001)
        await asyncio.wait_for(_until(lambda: len(shadow.tokens) == 20), 5)
        assert telemetry.tokens == [] and misfiled.tokens == []
        stuck.release.set()
        await pipeline.close()
        assert len(telemetry.tokens) == 10_000 and misfiled.tokens == list(range(20))

    asyncio.run(main())


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


def test_qos0_records_are_shed_and_counted_when_their_lane_is_overloaded(tmp_path: Path) -> None:
    from gateway.metrics import Metrics

    async def main() -> tuple[TelemetryPipeline, Metrics]:
        metrics = Metrics()
        pipeline = TelemetryPipeline(
            FileSink(tmp_path), high_water=100, low_water=10, shed_water=200,
            metrics=metrics.telemetry,
        )
        target = Collector()
        for i in range(300):
            pipeline.submit(_record("d", i), None)  # QoS 0
        for i in range(50):
            pipeline.submit(_record("d", i), target, i)  # QoS 1: never shed
        await pipeline.close()
        assert target.tokens == list(range(50))
        return pipeline, metrics

    pipeline, metrics = asyncio.run(main())
    assert pipeline.shed == 100
    assert 'iotgw_telemetry_shed_total{kind="telemetry"} 100.0' in metrics.render().decode()


def test_coap_telemetry_reaches_kafka_and_is_acknowledged_after_kafka(
    gateway_factory: Any, kafka_broker: KafkaBroker
) -> None:
    from gateway._native import coap

    topics = _topics()
    gw = gateway_factory(
        allow_anonymous=True, acl="open", kafka=kafka_broker.bootstrap, kafka_topics=_spec(topics)
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(10)
    for i in range(1, 6):
        sock.sendto(
            coap.encode_request(coap.CON, coap.POST, i, b"t%d" % i, "telemetry/dev-c",
                                [(coap.CONTENT_FORMAT, coap.JSON)], b'{"i":%d}' % i),
            ("127.0.0.1", gw.coap_port),
        )
        reply = coap.decode(sock.recv(2048))
        assert (reply.mid, reply.code) == (i, coap.CHANGED)
        # 2.04 left only after Kafka's acknowledgement: the record is already there.
        assert end_offsets(kafka_broker.bootstrap, topics["telemetry"]) == i
    records = read_topic(kafka_broker.bootstrap, topics["telemetry"], 5)
    envelopes = [msgpack.unpackb(r[3], raw=False) for r in records]
    assert [(e["device"], e["protocol"], e["topic_or_path"]) for e in envelopes] == [
        ("dev-c", "coap", "/telemetry/dev-c")
    ] * 5
    assert [json.loads(e["payload"])["i"] for e in envelopes] == [1, 2, 3, 4, 5]
    sock.close()


def test_a_full_spool_stops_reading_from_device_sockets_and_withholds_their_pubacks(
    tmp_path: Path, gateway_factory: Any, kafka_broker: KafkaBroker
) -> None:
    """End to end through device sockets: Kafka stops answering, the spool holds 64 KiB. What
    fits is acknowledged in order; then PUBACKs stop, and once the pipeline's backlog reaches
    its high-water mark the gateway stops reading (a flooding device's socket blocks, the
    received-bytes counter stands still). When Kafka answers again everything is
    acknowledged and every acknowledged record is in Kafka, in order."""
    topics = _topics()
    gw = gateway_factory(
        data_dir=str(tmp_path / "data"), allow_anonymous=True, acl="open",
        kafka=kafka_broker.bootstrap, kafka_topics=_spec(topics), kafka_ack_timeout_ms=200,
        spool_max_bytes=64 << 10,
    )
    registry = gw.gateway.metrics.registry

    def metric(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    count = 500  # about 150 KB of records: more than the spool holds, within receive maximum
    dev = RawClient(gw.mqtt_port)
    assert dev.connect("dev").type == mqtt.CONNACK
    acked: list[int] = []
    reader = threading.Thread(target=_collect_pubacks, args=(dev, acked), daemon=True)
    reader.start()
    flood = socket.create_connection(("127.0.0.1", gw.mqtt_port))
    flood.sendall(mqtt.Connect("flood", protocol_level=4).encode(4))
    kafka_broker.pause()
    try:
        def publish(numbers: range) -> None:
            dev.send(b"".join(
                mqtt.encode_publish("devices/dev/telemetry", b"dev:%d " % i + b"." * 200,
                                    qos=1, packet_id=i + 1) for i in numbers
            ))

        first = 100  # about 30 KB: these fit in the spool and are acknowledged from there
        publish(range(first))
        deadline = time.monotonic() + 30
        while len(acked) < first:
            assert time.monotonic() < deadline, f"{len(acked)} of {first} acknowledged"
            time.sleep(0.05)
        publish(range(first, count))
        flood.setblocking(False)
        chunk = b"".join(mqtt.encode_publish("devices/flood/telemetry", b"flood:0", qos=0)
                         for _ in range(1000))
        deadline = time.monotonic() + 60
        blocked_since = None
        while blocked_since is None or time.monotonic() - blocked_since < 2.0:
            assert time.monotonic() < deadline, "the gateway kept reading from the flood"
            try:
                flood.send(chunk)
                blocked_since = None
            except BlockingIOError:  # the kernel's buffers are full: nobody reads
                blocked_since = blocked_since or time.monotonic()
                time.sleep(0.05)
        before = metric("iotgw_mqtt_received_bytes_total")
        time.sleep(1.0)
        assert metric("iotgw_mqtt_received_bytes_total") == before, "it still reads"
        # It stopped at the high-water mark, not for some other reason.
        read = metric("iotgw_mqtt_packets_received_total", type="publish")
        assert read >= gw.gateway.telemetry.high_water
        assert metric("iotgw_telemetry_spool_bytes", lane="low") > 0
        held = list(acked)
        assert first <= len(held) < count, len(held)  # what fitted in the spool, no more
        assert held == list(range(1, len(held) + 1))  # in publish order
    finally:
        kafka_broker.resume()
    deadline = time.monotonic() + 60
    while len(acked) < count:
        assert time.monotonic() < deadline, f"only {len(acked)} of {count} acknowledged"
        time.sleep(0.05)
    assert acked == list(range(1, count + 1))
    dev.close()
    flood.close()
    while metric("iotgw_telemetry_spool_records", lane="low") or metric(
        "iotgw_telemetry_backlog_records", lane="low"
    ):  # the spool replayed, the flood sent
        assert time.monotonic() < deadline, "the spool was not replayed"
        time.sleep(0.1)
    records = read_topic(kafka_broker.bootstrap, topics["telemetry"], count, timeout=60)
    check_delivery([r for r in records if r[2] == b"dev"], {"dev": list(range(count))})


def _collect_pubacks(client: RawClient, acked: list[int]) -> None:
    try:
        while (packet := client.recv(timeout=120)) is not None:
            if packet.type == mqtt.PUBACK:
                acked.append(packet.packet_id)
    except OSError:
        return
