"""Per-client publish limits (--max-publish-rate, --max-publish-bytes-rate): a client that sends
faster is read more slowly (its acknowledgements come at the allowed rate), nothing it sent is
lost, the pauses are counted, and other clients are not slowed."""

from __future__ import annotations

import time
from typing import Any

from test_mqtt_server import RawClient

from gateway._native import mqtt


def _flood(gw: Any, client_id: str, count: int, size: int) -> float:
    """Send `count` QoS 1 PUBLISHes of `size` bytes as fast as the socket takes them, then one
    more once all are acknowledged; seconds until that last PUBACK. (A read is handled whole,
    however much it overdraws: the pause comes after it, so the last message shows the debt.)"""
    client = RawClient(gw.mqtt_port, version=4)
    assert client.connect(client_id).reason_code == 0
    frames = b"".join(mqtt.encode_publish(f"load/{client_id}", b"x" * size, qos=1,
                                          packet_id=i + 1) for i in range(count))
    started = time.monotonic()
    client.send(frames)
    for _ in range(count):
        packet = client.recv(timeout=20)
        assert packet is not None and packet.type == mqtt.PUBACK
    client.send(mqtt.encode_publish(f"load/{client_id}", b"last", qos=1, packet_id=count + 1))
    packet = client.recv(timeout=20)
    assert packet is not None and packet.packet_id == count + 1
    took = time.monotonic() - started
    client.close()
    return took


def _subscriber(gw: Any) -> RawClient:
    sub = RawClient(gw.mqtt_port, version=4)
    assert sub.connect("watcher").reason_code == 0
    sub.send(mqtt.Subscribe(1, [mqtt.Subscription("load/#", qos=1)]).encode(4))
    assert sub.recv().type == mqtt.SUBACK
    return sub


def _received(sub: RawClient, count: int) -> int:
    got = 0
    while got < count:
        packet = sub.recv(timeout=10)
        if packet is None:
            break
        if packet.type == mqtt.PUBLISH:
            got += 1
            sub.send(mqtt.encode_ack(mqtt.PUBACK, packet.packet_id, 0))
    return got


def _rate_limited(gw: Any) -> float:
    return float(gw.gateway.metrics.registry.get_sample_value("iotgw_mqtt_rate_limited_total"))


def test_a_client_over_its_message_rate_is_slowed_and_loses_nothing(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open", max_publish_rate=200)
    sub = _subscriber(gw)
    # 500 at once against 200/s with a one-second burst: at least (500 - 200) / 200 = 1.5 s
    took = _flood(gw, "fast", 500, 16)
    assert took >= 1.3, took
    assert _received(sub, 501) == 501
    assert _rate_limited(gw) >= 1
    sub.close()


def test_a_client_over_its_byte_rate_is_slowed(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open", max_publish_bytes_rate=100_000)
    # 100 x 2.5 KB = 250 KB against 100 KB/s with a one-second burst: at least 1.5 s
    took = _flood(gw, "big", 100, 2500)
    assert took >= 1.3, took
    assert _rate_limited(gw) >= 1


def test_without_limits_the_same_flood_is_not_slowed(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open")
    assert _flood(gw, "fast", 500, 16) < 1.0
    assert _rate_limited(gw) == 0
