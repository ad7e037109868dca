"""MQTT 5 features and limits of the server, one test each, with raw frames (the edge cases) and
real clients (paho-mqtt, amqtt); the ones on the `gw` fixture run over TCP, TLS, WebSocket and
WebSocket with TLS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import paho.mqtt.client as paho
import pytest
from test_mqtt_server import (  # noqa: F401  (fixtures)
    Endpoint,
    PahoClient,
    RawClient,
    certificates,
    open_endpoint,
)

from gateway._native import mqtt


class _Over:
    """The gateway as the tests see it: `mqtt_port` is the Endpoint of one transport."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.mqtt_port = endpoint
        self.gateway = endpoint.running.gateway


@pytest.fixture
def gw(open_endpoint: Endpoint) -> Any:  # noqa: F811
    return _Over(open_endpoint)


def _subscriber(port: int | Endpoint, topic_filter: str, qos: int = 1, **opts: Any) -> RawClient:
    sub = RawClient(port, version=5)
    assert sub.connect("sub-" + topic_filter.replace("/", "_")).reason_code == 0
    sub.send(mqtt.Subscribe(1, [mqtt.Subscription(topic_filter, qos, **opts)]).encode(5))
    assert sub.recv().type == mqtt.SUBACK
    return sub


def _publisher(port: int | Endpoint, client_id: str = "pub") -> RawClient:
    pub = RawClient(port, version=5)
    assert pub.connect(client_id).reason_code == 0
    return pub


def test_will_delay_holds_the_will_until_the_interval_passes(gw: Any) -> None:
    watcher = PahoClient(gw.mqtt_port, "watcher", paho.MQTTv5)
    watcher.subscribe("wills/#", 1)
    dev = RawClient(gw.mqtt_port, version=5)
    will = mqtt.Will("wills/d", b"gone", 1, properties=mqtt.Properties(will_delay_interval=2))
    dev.connect("d", will=will, properties=mqtt.Properties(session_expiry_interval=60))
    dev.close()  # dropped without DISCONNECT: the will is due, after its delay
    started = time.monotonic()
    (msg,) = watcher.wait_messages(1, timeout=5)
    assert msg.payload == b"gone"
    assert time.monotonic() - started >= 1.5
    watcher.close()


def test_reconnect_within_will_delay_cancels_the_will(gw: Any) -> None:
    watcher = PahoClient(gw.mqtt_port, "watcher", paho.MQTTv5)
    watcher.subscribe("wills/#", 1)
    dev = RawClient(gw.mqtt_port, version=5)
    will = mqtt.Will("wills/d", b"gone", 1, properties=mqtt.Properties(will_delay_interval=2))
    props = mqtt.Properties(session_expiry_interval=60)
    dev.connect("d", will=will, properties=props)
    dev.close()
    back = RawClient(gw.mqtt_port, version=5)
    assert back.connect("d", clean_start=False, properties=props).session_present
    assert watcher.wait_messages(1, timeout=3) == []
    watcher.close()


def test_session_expires_after_its_interval(gw: Any) -> None:
    props = mqtt.Properties(session_expiry_interval=1)

    def visit() -> bool:
        dev = RawClient(gw.mqtt_port, version=5)
        present = bool(dev.connect("d", clean_start=False, properties=props).session_present)
        dev.send(mqtt.Disconnect().encode(5))
        assert dev.recv() is None
        return present

    assert not visit()
    time.sleep(0.3)
    assert visit()  # back within the interval: the session is still there
    time.sleep(2.2)
    assert not visit()  # the interval passed: it was ended


def test_client_exceeding_our_receive_maximum_is_disconnected_with_0x93(gw: Any) -> None:
    pub = _publisher(gw.mqtt_port)
    receive_maximum = gw.gateway.broker.limits.receive_maximum
    frames = b"".join(
        mqtt.encode_publish("q2", b"", qos=2, packet_id=i, version=5)
        for i in range(1, receive_maximum + 2)
    )
    pub.send(frames)  # QoS 2 flows never released with PUBREL: all stay unacknowledged
    last = None
    while (packet := pub.recv()) is not None:
        last = packet
    assert last is not None
    assert (last.type, last.reason_code) == (mqtt.DISCONNECT, mqtt.RECEIVE_MAXIMUM_EXCEEDED)


def test_packet_over_the_maximum_size_closes_the_connection_with_0x95(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open", max_packet_size=1000)
    pub = RawClient(gw.mqtt_port, version=5)
    ack = pub.connect("big")
    assert ack.properties.maximum_packet_size == 1000  # announced in CONNACK
    pub.send(mqtt.encode_publish("t", b"x" * 2000, version=5))
    reply = pub.recv()
    assert (reply.type, reply.reason_code) == (mqtt.DISCONNECT, mqtt.PACKET_TOO_LARGE)
    assert pub.recv() is None


def test_message_larger_than_the_clients_maximum_is_not_sent_to_it(gw: Any) -> None:
    sub = RawClient(gw.mqtt_port, version=5)
    sub.connect("small", properties=mqtt.Properties(maximum_packet_size=100))
    sub.send(mqtt.Subscribe(1, [mqtt.Subscription("m", 0)]).encode(5))
    sub.recv()
    pub = _publisher(gw.mqtt_port)
    pub.send(mqtt.encode_publish("m", b"x" * 500, version=5))
    pub.send(mqtt.encode_publish("m", b"small", version=5))
    assert bytes(sub.recv().payload) == b"small"  # the large one was dropped, not sent


def test_expired_message_is_not_delivered_from_the_offline_queue(gw: Any) -> None:
    dev = RawClient(gw.mqtt_port, version=5)
    props = mqtt.Properties(session_expiry_interval=60)
    dev.connect("d", clean_start=False, properties=props)
    dev.send(mqtt.Subscribe(1, [mqtt.Subscription("e/#", 1)]).encode(5))
    dev.recv()
    dev.send(mqtt.Disconnect().encode(5))
    dev.recv()
    pub = _publisher(gw.mqtt_port)
    for topic, expiry in (("e/short", 1), ("e/long", 60)):
        pub.send(mqtt.encode_publish(
            topic, b"x", qos=1, packet_id=1, version=5,
            properties=mqtt.Properties(message_expiry_interval=expiry),
        ))
        pub.recv()
    time.sleep(1.5)
    back = RawClient(gw.mqtt_port, version=5)
    back.connect("d", clean_start=False, properties=props)
    got = back.recv()
    assert got.topic == "e/long"
    assert 0 < got.properties.message_expiry_interval <= 59  # the time it waited is taken off


def test_retain_handling_1_and_2_and_retain_as_published(gw: Any) -> None:
    pub = _publisher(gw.mqtt_port)
    pub.send(mqtt.encode_publish("r/a", b"kept", qos=1, packet_id=1, retain=True, version=5))
    pub.recv()
    sub = RawClient(gw.mqtt_port, version=5)
    sub.connect("s")
    # Retain handling 2: no retained messages at subscribe time.
    sub.send(mqtt.Subscribe(1, [mqtt.Subscription("r/#", 1, retain_handling=2)]).encode(5))
    assert sub.recv().type == mqtt.SUBACK
    # Retain handling 1: retained messages only for a new subscription; this one exists.
    sub.send(mqtt.Subscribe(2, [mqtt.Subscription("r/#", 1, retain_handling=1)]).encode(5))
    assert sub.recv().type == mqtt.SUBACK
    sub.send(mqtt.Subscribe(3, [mqtt.Subscription("r/+", 1, retain_handling=1,
                                                  retain_as_published=True)]).encode(5))
    assert sub.recv().type == mqtt.SUBACK
    retained = sub.recv()  # the new filter r/+ gets it, with RETAIN set (sent as retained)
    assert (retained.topic, retained.retain) == ("r/a", True)
    sub.send(mqtt.encode_ack(mqtt.PUBACK, retained.packet_id, version=5))
    pub.send(mqtt.encode_publish("r/a", b"live", qos=1, packet_id=2, retain=True, version=5))
    live = sub.recv()
    # r/# (without retain-as-published) and r/+ (with it) overlap: one delivery; the
    # retain-as-published subscription keeps the flag.
    assert (bytes(live.payload), live.retain) == (b"live", True)
    sub.send(mqtt.PINGREQ_FRAME)
    assert sub.recv().type == mqtt.PINGRESP


def test_live_message_loses_retain_without_retain_as_published(gw: Any) -> None:
    sub = _subscriber(gw.mqtt_port, "rp/#")
    pub = _publisher(gw.mqtt_port)
    pub.send(mqtt.encode_publish("rp/x", b"1", qos=1, packet_id=1, retain=True, version=5))
    assert sub.recv().retain is False


def test_server_keep_alive_caps_what_the_client_asked_for(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open")
    broker = gw.gateway.broker
    broker.limits = type(broker.limits)(max_keep_alive=30)
    raw = RawClient(gw.mqtt_port, version=5)
    ack = raw.connect("k", keep_alive=0)  # 0 would mean "never"; the server says 30
    assert ack.properties.server_keep_alive == 30


def test_empty_client_id_is_assigned_in_5_and_refused_without_clean_session_in_311(
    gw: Any,
) -> None:
    v5 = RawClient(gw.mqtt_port, version=5)
    ack = v5.connect("")
    assert ack.reason_code == 0 and ack.properties.assigned_client_identifier
    v4 = RawClient(gw.mqtt_port, version=4)
    assert v4.connect("", clean_start=False).reason_code == 2  # identifier rejected
    ok = RawClient(gw.mqtt_port, version=4)
    assert ok.connect("", clean_start=True).reason_code == 0


def test_protocol_error_gets_a_disconnect_with_reason_string(gw: Any) -> None:
    raw = _publisher(gw.mqtt_port)
    raw.send(mqtt.Connect("again", protocol_level=5).encode())  # a second CONNECT
    reply = raw.recv()
    assert (reply.type, reply.reason_code) == (mqtt.DISCONNECT, mqtt.PROTOCOL_ERROR)
    assert reply.properties.reason_string


def test_request_response_properties_reach_the_responder(gw: Any) -> None:
    responder = _subscriber(gw.mqtt_port, "svc/req")
    requester = _subscriber(gw.mqtt_port, "svc/resp/me")
    props = mqtt.Properties(response_topic="svc/resp/me", correlation_data=b"\x01\x02")
    requester.send(mqtt.encode_publish("svc/req", b"ping", qos=1, packet_id=5, version=5,
                                       properties=props))
    request = responder.recv()
    assert request.properties.response_topic == "svc/resp/me"
    assert request.properties.correlation_data == b"\x01\x02"
    responder.send(mqtt.encode_publish(
        request.properties.response_topic, b"pong", qos=1, packet_id=1, version=5,
        properties=mqtt.Properties(correlation_data=request.properties.correlation_data),
    ))
    while (reply := requester.recv()).type != mqtt.PUBLISH:
        pass
    assert bytes(reply.payload) == b"pong"
    assert reply.properties.correlation_data == b"\x01\x02"


def test_amqtt_client_publishes_and_receives_through_the_gateway(gateway_factory: Any) -> None:
    from amqtt.client import MQTTClient

    gw = gateway_factory(allow_anonymous=True, acl="open")

    async def scenario() -> list[tuple[str, bytes]]:
        sub, pub = MQTTClient(client_id="amqtt-sub"), MQTTClient(client_id="amqtt-pub")
        url = f"mqtt://127.0.0.1:{gw.mqtt_port}/"
        await sub.connect(url)
        await pub.connect(url)
        await sub.subscribe([("am/#", 1)])
        for i in range(5):
            await pub.publish(f"am/{i}", b"%d" % i, qos=1)
        got = []
        for _ in range(5):
            message = await asyncio.wait_for(sub.deliver_message(), 5)
            assert message is not None
            got.append((message.topic, bytes(message.data)))
        await pub.disconnect()
        await sub.disconnect()
        return got

    assert asyncio.run(scenario()) == [(f"am/{i}", b"%d" % i) for i in range(5)]
