"""One owner of flow control per MQTT connection: several reasons may pause reading (telemetry
backlog, a cluster node that is behind, a CONNECT still being decided), and reading resumes
only once every one of them has ended."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from test_cluster import knows_route, nodes, wait_until  # noqa: F401  (nodes: a fixture)
from test_mqtt_server import RawClient

from gateway._native import mqtt

HIGH = 128 << 10


@pytest.fixture
def held_nodes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """test_cluster.py's two nodes, with lower flow-control marks (set before they start)."""
    import gateway.cluster

    monkeypatch.setattr(gateway.cluster, "HIGH_WATER", HIGH)
    monkeypatch.setattr(gateway.cluster, "LOW_WATER", HIGH // 4)
    return request.getfixturevalue("nodes")


def _outstanding(node: Any, peer: str) -> int:
    """Bytes `node` forwarded to `peer` that `peer` has not confirmed handling."""
    cluster = node.gateway.cluster
    return int(node.call(lambda: cluster._sent.get(peer, 0) - cluster._confirmed.get(peer, 0)))


def test_telemetry_backpressure_never_resumes_a_publisher_the_cluster_holds(
    held_nodes: Any,
) -> None:
    a, b = held_nodes
    # The telemetry pipeline of node a pauses its publisher after every record and lets it go
    # after every batch: it resumes reading all the time while node b stalls.
    pipeline = a.gateway.telemetry
    a.call(lambda: (setattr(pipeline, "high_water", 1), setattr(pipeline, "low_water", 0)))
    sub = RawClient(b.mqtt_port, version=4)
    assert sub.connect("sub").type == mqtt.CONNACK
    sub.send(mqtt.Subscribe(1, [mqtt.Subscription("devices/+/telemetry", 1)]).encode(4))
    assert sub.recv().type == mqtt.SUBACK
    wait_until(lambda: knows_route(a, "devices/d1/telemetry", "node-b"))

    count = 20_000
    frames = [
        mqtt.encode_publish(
            "devices/d1/telemetry", b'{"i":%d}' % i, qos=1, packet_id=i % 60000 + 1
        )
        for i in range(count)
    ]
    pub = RawClient(a.mqtt_port, version=4)
    assert pub.connect("d1").type == mqtt.CONNACK

    # Node b's event loop stops for 3 s: it reads nothing from Redis, confirms nothing.
    stalled = threading.Event()
    b.loop.call_soon_threadsafe(lambda: (stalled.set(), time.sleep(3.0)))
    assert stalled.wait(5)
    acks: list[int] = []
    reader = threading.Thread(target=_read_acks, args=(pub, count, acks), daemon=True)
    reader.start()
    # Publish as fast as the gateway's receive maximum (1024 unacknowledged) allows.
    sent = 0
    most = 0
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline and sent < count:
        if sent - len(acks) < 900:
            pub.sock.sendall(b"".join(frames[sent : sent + 100]))
            sent += 100
        else:
            time.sleep(0.001)
        most = max(most, _outstanding(a, "node-b"))
    most = max(most, _outstanding(a, "node-b"))
    # Held by the cluster, node a reads no more than about one read past the high water mark,
    # whatever the telemetry pipeline does meanwhile.
    assert sent > 2000, "the publisher did not get going"
    assert most <= HIGH + (256 << 10), f"{most} bytes forwarded ahead of node b"

    while sent < count:  # the rest, once node b is back: nothing is lost
        if sent - len(acks) < 900:
            pub.sock.sendall(b"".join(frames[sent : sent + 100]))
            sent += 100
        else:
            time.sleep(0.001)
    reader.join(30)
    assert len(acks) == count
    got = 0
    while got < count:
        packet = sub.recv(10)
        assert packet is not None
        if packet.type == mqtt.PUBLISH:
            got += 1
            sub.send(mqtt.encode_ack(mqtt.PUBACK, packet.packet_id, 0, 4))
    pub.close()
    sub.close()


def _read_acks(client: RawClient, count: int, ids: list[int]) -> None:
    framer = mqtt.Framer(version=4)
    sock = client.sock.dup()
    sock.settimeout(30)
    while len(ids) < count:
        data = sock.recv(65536)
        if not data:
            break
        ids.extend(p.packet_id for p in framer.feed(data) if p.type == mqtt.PUBACK)
    sock.close()


def test_forwards_redis_drops_are_counted_and_do_not_hold_publishers_for_ever(
    held_nodes: Any, redis_server: Any
) -> None:
    """Redis drops a subscriber whose output buffer passes its limit: the messages it held are
    gone. The node they were for counts them, and the node that sent them is not left waiting
    for confirmations of messages that will never arrive."""
    a, b = held_nodes
    admin = redis.Redis.from_url(f"redis://{redis_server.url}")
    default = admin.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
    admin.config_set("client-output-buffer-limit", "pubsub 32kb 16kb 1")
    try:
        sub = RawClient(b.mqtt_port, version=4)
        assert sub.connect("sub").type == mqtt.CONNACK
        sub.send(mqtt.Subscribe(1, [mqtt.Subscription("news/#", 0)]).encode(4))
        assert sub.recv().type == mqtt.SUBACK
        wait_until(lambda: knows_route(a, "news/x", "node-b"))
        received: list[int] = []
        reader = threading.Thread(target=_count_publishes, args=(sub, received), daemon=True)
        reader.start()

        count = 5000
        data = b"".join(mqtt.encode_publish("news/x", b"x" * 100, qos=0) for _ in range(count))
        pub = RawClient(a.mqtt_port, version=4)
        assert pub.connect("pub").type == mqtt.CONNACK
        stalled = threading.Event()
        b.loop.call_soon_threadsafe(lambda: (stalled.set(), time.sleep(2.0)))
        assert stalled.wait(5)
        pub.sock.sendall(data)  # blocks while node a holds its publisher

        def settled() -> bool:
            lost = b.call(lambda: b.gateway.metrics.cluster.lost_forwards._value.get())
            shed = b.call(
                lambda: b.gateway.metrics.mqtt.dropped.labels("slow_consumer_qos0")._value.get()
            )
            return received[0] + lost + shed == count

        wait_until(settled, timeout=20)
        lost = b.call(lambda: b.gateway.metrics.cluster.lost_forwards._value.get())
        assert lost > 0, "Redis dropped nothing: the scenario did not happen"
        assert b.call(lambda: b.gateway.metrics.cluster.resubscribes._value.get()) >= 1
        # Node a is not held any more: a message published now reaches node b.
        before = received[0]
        pub.send(mqtt.encode_publish("news/x", b"after", qos=0))
        wait_until(lambda: received[0] > before, timeout=10)
        pub.close()
        sub.close()
    finally:
        admin.config_set("client-output-buffer-limit", default)


def _count_publishes(client: RawClient, received: list[int]) -> None:
    received.append(0)
    framer = mqtt.Framer(version=4)
    sock = client.sock.dup()
    sock.settimeout(60)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            received[0] += sum(1 for p in framer.feed(data) if p.type == mqtt.PUBLISH)
    except OSError:
        return
    finally:
        sock.close()
