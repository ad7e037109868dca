"""The native MQTT codec side by side with amqtt and paho-mqtt: the same bytes, in the same run.

    .venv/bin/pytest bench/test_bench_mqtt.py --benchmark-only \
        --benchmark-columns=min,median,mean,ops

How the peers are driven, without their event loops or sockets:

- amqtt decodes from a stream: each round makes an `asyncio.StreamReader` holding the frame and
  runs `XPacket.from_stream(reader)` with `coro.send(None)`. With every byte already buffered the
  coroutine never waits, so the first send finishes it (StopIteration); `run_to_end` checks that.
- paho-mqtt has no codec API. Decoding: `Client._handle_publish()` on a prepared `_in_packet`
  (what `_packet_read` leaves there) with a no-op on_message; for QoS 1 that includes building
  its PUBACK and paho's on_message dispatch, as in a real client. `paho.mqtt._packet.
  decode_publish` (the bare parser paho 2.2 calls there) is measured too. Encoding:
  `Client._send_publish` / `_send_connect` / `_send_subscribe`, with `_packet_queue` replaced by
  `SendQueue`, which keeps the frame paho would have queued for its socket.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import pytest
from amqtt.mqtt.connect import ConnectPacket, ConnectPayload, ConnectVariableHeader
from amqtt.mqtt.packet import MQTTPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.subscribe import SubscribePacket
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import CallbackAPIVersion

from gateway._native import mqtt

TOPIC = "devices/dev-42/tel"
PAYLOAD = bytes(range(64))
PUBLISH = mqtt.encode_publish(TOPIC, PAYLOAD, qos=1, packet_id=42)
assert len(PUBLISH) == 88

CONNECT_PACKET = mqtt.Connect(
    "dev-42", keep_alive=60, username="dev-42", password=b"token-0123456789",
    will=mqtt.Will("devices/dev-42/status", b"offline", qos=1, retain=True),
)
CONNECT = CONNECT_PACKET.encode()
FILTERS = [("devices/dev-42/commands/#", 1), ("$shadow/dev-42/update/delta", 1)]
SUBSCRIBE_PACKET = mqtt.Subscribe(7, [mqtt.Subscription(f, q) for f, q in FILTERS])
SUBSCRIBE = SUBSCRIBE_PACKET.encode(4)

FRAMER_BYTES = 64 << 20
READ_SIZE = 64 << 10


def bench(group: str) -> pytest.MarkDecorator:
    """A benchmark in `group`. Rounds of at least 0.2 ms (and a warm-up): with pytest-benchmark's
    default of 5 us, a 50 ns call is sometimes calibrated to one call per round and then timed
    with the timer's own overhead, twice its real cost."""
    return pytest.mark.benchmark(group=group, min_time=0.0002, warmup=True)


# ---- driving the peers --------------------------------------------------------------------------

def run_to_end(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that does not wait (its reader holds every byte) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine waited: its reader ran out of data")


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """Never run: an asyncio.StreamReader only needs a loop to belong to."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def amqtt_read(
    loop: asyncio.AbstractEventLoop, cls: type[MQTTPacket[Any, Any, Any]], frame: bytes
) -> Any:
    reader = asyncio.StreamReader(loop=loop)
    reader.feed_data(frame)
    return run_to_end(cls.from_stream(reader))  # type: ignore[arg-type]


@dataclass
class SendQueue:
    """Stands in for paho's `_packet_queue`: keeps the last frame paho built for the socket."""

    frame: bytes | bytearray = b""

    def __call__(self, _command: int, packet: bytes | bytearray, *_: Any) -> int:
        self.frame = packet
        return paho.MQTT_ERR_SUCCESS


class _NoSocket:
    def close(self) -> None:
        pass


@pytest.fixture
def paho_out() -> Iterator[tuple[paho.Client, SendQueue]]:
    """A 3.1.1 paho Client whose frames go to a SendQueue instead of a socket."""
    queue = SendQueue()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-42")
    client._sock = _NoSocket()  # _send_publish refuses to build a frame without a socket
    client._packet_queue = queue  # type: ignore[method-assign]
    yield client, queue
    client._sock = None


# ---- PUBLISH decode -----------------------------------------------------------------------------


@bench("publish-decode")
def test_publish_decode_ours(benchmark: Any) -> None:
    p = benchmark(mqtt.decode, PUBLISH)
    assert (p.packet_id, p.payload_size) == (42, 64)


@bench("publish-decode")
def test_publish_decode_ours_with_topic_and_payload(benchmark: Any) -> None:
    def decode() -> tuple[str, Any]:
        p = mqtt.decode(PUBLISH)
        return p.topic, p.payload

    topic, payload = benchmark(decode)
    assert (topic, bytes(payload)) == (TOPIC, PAYLOAD)


@bench("publish-decode")
def test_publish_decode_amqtt(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    p = benchmark(amqtt_read, loop, PublishPacket, PUBLISH)
    assert (p.topic_name, p.data, p.packet_id) == (TOPIC, PAYLOAD, 42)


@bench("publish-decode")
def test_publish_decode_paho_client(benchmark: Any, paho_out: Any) -> None:
    client, queue = paho_out
    got: list[paho.MQTTMessage] = []
    client.on_message = lambda _c, _u, msg: got.append(msg) if not got else None
    client._in_packet = {
        "command": PUBLISH[0], "have_remaining": 1, "remaining_count": [PUBLISH[1]],
        "remaining_mult": 1, "remaining_length": len(PUBLISH) - 2, "packet": PUBLISH[2:],
        "to_process": 0, "pos": 0,
    }
    benchmark(client._handle_publish)
    assert (got[0].topic, got[0].payload, got[0].mid) == (TOPIC, PAYLOAD, 42)
    assert queue.frame == mqtt.encode_ack(mqtt.PUBACK, 42)


@bench("publish-decode")
def test_publish_decode_paho_parser(benchmark: Any) -> None:
    body = PUBLISH[2:]
    p = benchmark(paho_packet.decode_publish, PUBLISH[0], body, paho.MQTTv311)
    assert (p.topic, p.payload, p.mid) == (TOPIC.encode(), PAYLOAD, 42)


# ---- PUBLISH encode -----------------------------------------------------------------------------


@bench("publish-encode")
def test_publish_encode_ours(benchmark: Any) -> None:
    frame = benchmark(mqtt.encode_publish, TOPIC, PAYLOAD, 1, False, False, 42)
    assert frame == PUBLISH


@bench("publish-encode")
def test_publish_encode_ours_into_a_reused_buffer(benchmark: Any) -> None:
    out = bytearray()  # a connection's output buffer, written to the socket per 64 KiB

    def encode() -> int:
        if len(out) >= 65536:
            out.clear()
        return mqtt.encode_publish_into(out, TOPIC, PAYLOAD, 1, False, False, 42)

    assert benchmark(encode) == 88
    assert out[-88:] == PUBLISH


@bench("publish-encode")
def test_publish_encode_amqtt(benchmark: Any) -> None:
    def encode() -> bytes:
        return PublishPacket.build(TOPIC, PAYLOAD, 42, False, 1, False).to_bytes()

    assert benchmark(encode) == PUBLISH


@bench("publish-encode")
def test_publish_encode_paho(benchmark: Any, paho_out: Any) -> None:
    client, queue = paho_out
    topic = TOPIC.encode()  # paho encodes the topic in publish(), before _send_publish
    benchmark(client._send_publish, 42, topic, PAYLOAD, 1)
    assert queue.frame == PUBLISH


# ---- CONNECT and SUBSCRIBE ----------------------------------------------------------------------


def amqtt_connect() -> ConnectPacket:
    header = ConnectVariableHeader(keep_alive=60, proto_level=4)
    header.clean_session_flag = header.username_flag = header.password_flag = True
    header.will_flag = header.will_retain_flag = True
    header.will_qos = 1
    payload = ConnectPayload("dev-42", "devices/dev-42/status", b"offline", "dev-42",
                             "token-0123456789")
    return ConnectPacket(variable_header=header, payload=payload)


@bench("connect-decode")
def test_connect_decode_ours(benchmark: Any) -> None:
    assert benchmark(mqtt.decode, CONNECT) == CONNECT_PACKET


@bench("connect-decode")
def test_connect_decode_amqtt(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    p = benchmark(amqtt_read, loop, ConnectPacket, CONNECT)
    assert (p.client_id, p.will_topic, p.password) == ("dev-42", "devices/dev-42/status",
                                                       "token-0123456789")


@bench("connect-encode")
def test_connect_encode_ours(benchmark: Any) -> None:
    assert benchmark(CONNECT_PACKET.encode) == CONNECT


@bench("connect-encode")
def test_connect_encode_amqtt(benchmark: Any) -> None:
    packet = amqtt_connect()
    assert benchmark(packet.to_bytes) == CONNECT


@bench("connect-encode")
def test_connect_encode_paho(benchmark: Any, paho_out: Any) -> None:
    client, queue = paho_out
    client.will_set("devices/dev-42/status", b"offline", qos=1, retain=True)
    client.username_pw_set("dev-42", "token-0123456789")
    benchmark(client._send_connect, 60)
    assert queue.frame == CONNECT


@bench("subscribe-decode")
def test_subscribe_decode_ours(benchmark: Any) -> None:
    assert benchmark(mqtt.decode, SUBSCRIBE) == SUBSCRIBE_PACKET


@bench("subscribe-decode")
def test_subscribe_decode_amqtt(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    p = benchmark(amqtt_read, loop, SubscribePacket, SUBSCRIBE)
    assert p.payload.topics == FILTERS


@bench("subscribe-encode")
def test_subscribe_encode_ours(benchmark: Any) -> None:
    assert benchmark(SUBSCRIBE_PACKET.encode, 4) == SUBSCRIBE


@bench("subscribe-encode")
def test_subscribe_encode_amqtt(benchmark: Any) -> None:
    packet = SubscribePacket.build(FILTERS, 7)
    assert benchmark(packet.to_bytes) == SUBSCRIBE


@bench("subscribe-encode")
def test_subscribe_encode_paho(benchmark: Any, paho_out: Any) -> None:
    client, queue = paho_out
    topics = [(f.encode(), q) for f, q in FILTERS]

    def encode() -> None:
        client._last_mid = 6  # paho numbers each SUBSCRIBE itself: make it 7 again
        client._send_subscribe(0, topics)

    benchmark(encode)
    assert queue.frame == SUBSCRIBE


# ---- the framer on a stream ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def publish_stream() -> tuple[bytes, int]:
    """A CONNECT, then mixed PUBLISH frames (QoS 0/1, topics of 6 to 60 bytes, payloads of 16 to
    256 bytes) up to 64 MiB; and the number of frames."""
    rng = random.Random(42)
    topics = [
        "/".join(["devices", f"dev-{i}", *rng.choices(["telemetry", "temp", "t", "events",
                                                         "status", "x" * 12], k=rng.randint(0, 6))])
        for i in range(500)
    ]
    out = bytearray(CONNECT)
    frames = 1
    while len(out) < FRAMER_BYTES - 512:
        qos = rng.randint(0, 1)
        mqtt.encode_publish_into(out, rng.choice(topics), rng.randbytes(rng.randint(16, 256)),
                                 qos, packet_id=rng.randint(1, 65535) if qos else 0)
        frames += 1
    return bytes(out), frames


@pytest.mark.benchmark(group="framer-64MiB")
def test_framer_64_mib_in_64_kib_reads(benchmark: Any, publish_stream: tuple[bytes, int]) -> None:
    data, frames = publish_stream
    source = memoryview(data)

    def read_all() -> int:
        framer = mqtt.Framer(mqtt.ReadArena())  # a server's framer: version from the CONNECT
        count = 0
        for at in range(0, len(data), READ_SIZE):
            chunk = source[at : at + READ_SIZE]
            framer.get_buffer(-1)[: len(chunk)] = chunk  # what the kernel's recv does
            count += len(framer.buffer_updated(len(chunk)))
        assert framer.pending == 0
        return count

    assert benchmark.pedantic(read_all, rounds=3, iterations=1) == frames
    benchmark.extra_info["frames"] = frames
    benchmark.extra_info["bytes"] = len(data)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["frames_per_s"] = round(frames / median)
        benchmark.extra_info["MiB_per_s"] = round(len(data) / median / (1 << 20))
