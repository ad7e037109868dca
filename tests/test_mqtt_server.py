"""The MQTT server against real clients (paho-mqtt 3.1.1 and 5.0) and raw frames."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from gateway._native import mqtt

PROTOCOLS = {"v311": paho.MQTTv311, "v5": paho.MQTTv5}
TRANSPORTS = ("tcp", "tls", "ws", "wss")


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach the MQTT server: `transport` tcp, tls, ws or wss; TLS trusts `ca`.
    RawClient and PahoClient take one wherever they take a port."""

    port: int
    transport: str = "tcp"
    ca: str | None = None
    running: Any = None  # the running gateway (tests/conftest.py), when the test needs it


class PahoClient:
    """A paho client on its own network thread, collecting what it receives."""

    def __init__(
        self, port: int | Endpoint, client_id: str, protocol: int,
        clean_session: bool | None = None, transport: str = "tcp", ca: str | None = None,
        **connect: Any,
    ) -> None:
        """`transport`: "tcp" or "websockets" (path /mqtt); `ca`: TLS, trusting this CA."""
        if isinstance(port, Endpoint):
            transport = "websockets" if port.transport in ("ws", "wss") else "tcp"
            port, ca = port.port, port.ca
        # 3.1.1 takes clean_session in the constructor, 5.0 takes clean_start in connect().
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
            clean_session=clean_session, transport=transport,  # type: ignore[arg-type]
        )
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        if ca is not None:
            self.client.tls_set(ca_certs=ca)
        self.protocol = protocol
        self.messages: list[paho.MQTTMessage] = []
        self.received = threading.Condition()
        self.connack: Any = None
        self.connected = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", port, **connect)
        self.client.loop_start()
        assert self.connected.wait(5), "no CONNACK"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = (flags, reason, props)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.received:
            self.messages.append(message)
            self.received.notify_all()

    def subscribe(self, topic_filter: str, qos: int = 0, **kw: Any) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic_filter, qos, **kw)
        assert done.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 0, **kw: Any) -> None:
        info = self.client.publish(topic, payload, qos, **kw)
        info.wait_for_publish(5)
        assert info.is_published()

    def wait_messages(self, count: int, timeout: float = 5.0) -> list[paho.MQTTMessage]:
        with self.received:
            self.received.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RawClient:
    """Frames in, packets out: for the edge cases a library client will not produce. Over TCP,
    or `transport` "tls", "ws" or "wss" (TLS trusting `ca`; WebSocket on /mqtt through
    wsproto's client side, one binary message per send)."""

    def __init__(
        self, port: int | Endpoint, version: int = 4, transport: str = "tcp",
        ca: str | None = None,
    ) -> None:
        if isinstance(port, Endpoint):
            port, transport, ca = port.port, port.transport, port.ca
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if transport in ("tls", "wss"):
            ctx = ssl.create_default_context(cafile=ca)
            sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.framer = mqtt.Framer(version=version)
        self.version = version
        self.pending: list[Any] = []
        self.ws: Any = None
        if transport in ("ws", "wss"):
            from wsproto import ConnectionType, WSConnection
            from wsproto.events import AcceptConnection, Request

            self.ws = WSConnection(ConnectionType.CLIENT)
            sock.sendall(self.ws.send(Request("127.0.0.1", "/mqtt", subprotocols=["mqtt"])))
            while not any(isinstance(e, AcceptConnection) for e in self._ws_events()):
                pass

    def _ws_events(self) -> list[Any]:
        data = self.sock.recv(65536)
        assert data, "closed during the WebSocket upgrade"
        self.ws.receive_data(data)
        return list(self.ws.events())

    def send(self, data: bytes) -> None:
        if self.ws is not None:
            from wsproto.events import Message as WsMessage

            data = self.ws.send(WsMessage(data=data))
        self.sock.sendall(data)

    def connect(self, client_id: str, **kw: Any) -> Any:
        kw.setdefault("protocol_level", self.version)
        self.send(mqtt.Connect(client_id=client_id, **kw).encode(self.version))
        return self.recv()

    def recv(self, timeout: float = 5.0) -> Any:
        """The next packet, or None when the server closed the connection."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except ssl.SSLError:  # a TLS connection cut without close_notify
                return None
            if not data:
                return None
            if self.ws is not None:
                data = self._unwrap(data)
                if data is None:
                    return None
            self.pending.extend(p.detach() for p in self.framer.feed(data))
        return self.pending.pop(0)

    def _unwrap(self, data: bytes) -> bytes | None:
        """The MQTT bytes in WebSocket data; None once the server closed the WebSocket."""
        from wsproto.events import BytesMessage, CloseConnection

        self.ws.receive_data(data)
        out = b""
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                out += event.data
            elif isinstance(event, CloseConnection) and not out:
                return None
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def open_gateway(gateway_factory: Any) -> Any:
    return gateway_factory(allow_anonymous=True, acl="open")


@pytest.fixture(params=TRANSPORTS)
def open_endpoint(request: Any, gateway_factory: Any, certificates: dict[str, str]) -> Endpoint:
    """An open gateway listening on MQTT, MQTTS, WS and WSS; the Endpoint of one of them."""
    from conftest import free_port

    gw = gateway_factory(
        allow_anonymous=True, acl="open", tls_cert=certificates["srv.pem"],
        tls_key=certificates["srv.key"], mqtts_port=0, ws_port=free_port(),
        wss_port=free_port(),
    )
    ports = {"tcp": gw.mqtt_port, "tls": gw.mqtts_port, "ws": gw.gateway.ws_port,
             "wss": gw.gateway.wss_port}
    transport = request.param
    ca = certificates["ca.pem"] if transport in ("tls", "wss") else None
    return Endpoint(ports[transport], transport, ca, gw)


@pytest.mark.parametrize("protocol", PROTOCOLS.values(), ids=PROTOCOLS.keys())
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_reaches_subscriber_at_each_qos(
    open_endpoint: Endpoint, protocol: int, qos: int
) -> None:
    sub = PahoClient(open_endpoint, "sub", protocol)
    pub = PahoClient(open_endpoint, "pub", protocol)
    sub.subscribe("plant/+/temp", qos)
    for i in range(20):
        pub.publish(f"plant/{i % 3}/temp", b"%d" % i, qos)
    got = sub.wait_messages(20)
    assert [m.payload for m in got] == [b"%d" % i for i in range(20)]
    assert {m.qos for m in got} == {qos}
    sub.close()
    pub.close()


def test_retained_message_is_delivered_on_subscribe_and_cleared_by_empty_payload(
    open_endpoint: Endpoint,
) -> None:
    pub = PahoClient(open_endpoint, "pub", paho.MQTTv311)
    pub.publish("state/lamp", b"on", 1, retain=True)
    sub = PahoClient(open_endpoint, "sub", paho.MQTTv311)
    sub.subscribe("state/#", 1)
    (msg,) = sub.wait_messages(1)
    assert (msg.topic, msg.payload, msg.retain) == ("state/lamp", b"on", True)
    pub.publish("state/lamp", b"", 1, retain=True)
    late = PahoClient(open_endpoint, "late", paho.MQTTv311)
    late.subscribe("state/#", 1)
    assert late.wait_messages(1, timeout=0.5) == []
    for c in (pub, sub, late):
        c.close()


def test_qos2_duplicate_publish_is_delivered_once(open_endpoint: Endpoint) -> None:
    sub = PahoClient(open_endpoint, "sub", paho.MQTTv311)
    sub.subscribe("q2/#", 2)
    raw = RawClient(open_endpoint)
    assert raw.connect("raw").reason_code == 0
    frame = mqtt.encode_publish("q2/x", b"once", qos=2, packet_id=7)
    raw.send(frame)
    assert raw.recv().type == mqtt.PUBREC
    raw.send(mqtt.encode_publish("q2/x", b"once", qos=2, packet_id=7, dup=True))
    assert raw.recv().type == mqtt.PUBREC
    raw.send(mqtt.encode_ack(mqtt.PUBREL, 7))
    comp = raw.recv()
    assert (comp.type, comp.packet_id) == (mqtt.PUBCOMP, 7)
    time.sleep(0.3)
    assert [m.payload for m in sub.wait_messages(1)] == [b"once"]
    raw.close()
    sub.close()


def test_will_is_published_when_keepalive_expires(open_endpoint: Endpoint) -> None:
    sub = PahoClient(open_endpoint, "watcher", paho.MQTTv311)
    sub.subscribe("wills/#", 1)
    raw = RawClient(open_endpoint)
    will = mqtt.Will("wills/dev1", b"gone", qos=1)
    assert raw.connect("dev1", keep_alive=1, will=will).reason_code == 0
    started = time.monotonic()
    (msg,) = sub.wait_messages(1, timeout=5)
    assert (msg.topic, msg.payload) == ("wills/dev1", b"gone")
    assert 1.4 <= time.monotonic() - started < 3.5  # 1.5 x keep-alive, swept twice a second
    assert raw.recv() is None  # and the silent client was disconnected
    sub.close()


def test_normal_disconnect_discards_the_will(open_endpoint: Endpoint) -> None:
    sub = PahoClient(open_endpoint, "watcher", paho.MQTTv311)
    sub.subscribe("wills/#", 1)
    raw = RawClient(open_endpoint)
    raw.connect("dev1", will=mqtt.Will("wills/dev1", b"gone"))
    raw.send(mqtt.Disconnect().encode(4))
    assert raw.recv() is None
    assert sub.wait_messages(1, timeout=0.5) == []
    sub.close()


def test_session_takeover_disconnects_the_older_connection_with_0x8e(
    open_endpoint: Endpoint,
) -> None:
    first = RawClient(open_endpoint, version=5)
    assert first.connect("same").reason_code == 0
    second = RawClient(open_endpoint, version=5)
    assert second.connect("same").reason_code == 0
    kicked = first.recv()
    assert (kicked.type, kicked.reason_code) == (mqtt.DISCONNECT, mqtt.SESSION_TAKEN_OVER)
    assert first.recv() is None
    second.send(mqtt.PINGREQ_FRAME)
    assert second.recv().type == mqtt.PINGRESP


def test_persistent_session_keeps_subscriptions_and_queues_qos1_while_offline(
    open_endpoint: Endpoint,
) -> None:
    port = open_endpoint
    dev = PahoClient(port, "dev", paho.MQTTv311, clean_session=False)
    dev.subscribe("cmd/dev", 1)
    dev.close()
    pub = PahoClient(port, "app", paho.MQTTv311)
    for i in range(3):
        pub.publish("cmd/dev", b"c%d" % i, 1)
    back = RawClient(port)
    ack = back.connect("dev", clean_start=False)
    assert ack.session_present
    got = [back.recv() for _ in range(3)]
    assert [bytes(p.payload) for p in got] == [b"c0", b"c1", b"c2"]
    pub.close()


def test_unacknowledged_qos1_is_resent_with_dup_after_reconnect(open_endpoint: Endpoint) -> None:
    port = open_endpoint
    dev = RawClient(port)
    dev.connect("dev", clean_start=False)
    dev.send(mqtt.Subscribe(1, [mqtt.Subscription("cmd/#", qos=1)]).encode(4))
    assert dev.recv().type == mqtt.SUBACK
    app = PahoClient(port, "app", paho.MQTTv311)
    app.publish("cmd/x", b"hello", 1)
    first = dev.recv()
    assert (first.dup, bytes(first.payload)) == (False, b"hello")
    dev.close()  # without PUBACK
    time.sleep(0.2)
    again = RawClient(port)
    assert again.connect("dev", clean_start=False).session_present
    resent = again.recv()
    assert (resent.dup, resent.packet_id) == (True, first.packet_id)
    assert bytes(resent.payload) == b"hello"
    app.close()


def test_malformed_frame_closes_only_its_own_connection_with_0x81(open_endpoint: Endpoint) -> None:
    bystander = PahoClient(open_endpoint, "ok", paho.MQTTv5)
    bystander.subscribe("t", 0)
    bad = RawClient(open_endpoint, version=5)
    assert bad.connect("bad").reason_code == 0
    bad.send(bytes([0x36, 0x05, 0x00, 0x01, ord("t"), 0x00, 0x01]))  # PUBLISH with QoS 3
    reply = bad.recv()
    assert (reply.type, reply.reason_code) == (mqtt.DISCONNECT, mqtt.MALFORMED_PACKET)
    assert bad.recv() is None
    other = PahoClient(open_endpoint, "pub", paho.MQTTv5)
    other.publish("t", b"still here", 0)
    assert [m.payload for m in bystander.wait_messages(1)] == [b"still here"]
    bystander.close()
    other.close()


def test_unsupported_protocol_level_gets_connack_1(open_endpoint: Endpoint) -> None:
    raw = RawClient(open_endpoint)
    frame = bytearray(mqtt.Connect(client_id="x").encode(4))
    frame[8] = 6  # protocol level byte after the fixed header and "MQTT"
    raw.send(bytes(frame))
    ack = raw.recv()
    assert (ack.type, ack.reason_code) == (mqtt.CONNACK, 1)
    assert raw.recv() is None


def test_first_packet_must_be_connect(open_endpoint: Endpoint) -> None:
    raw = RawClient(open_endpoint)
    raw.send(mqtt.PINGREQ_FRAME)
    assert raw.recv() is None


@pytest.mark.parametrize("protocol", PROTOCOLS.values(), ids=PROTOCOLS.keys())
def test_anonymous_clients_are_refused_unless_allowed(gateway_factory: Any, protocol: int) -> None:
    gw = gateway_factory()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="anon", protocol=protocol)
    result: list[Any] = []
    client.on_connect = lambda c, u, f, reason, p: result.append(reason)
    client.connect("127.0.0.1", gw.mqtt_port)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not result and time.monotonic() < deadline:
        time.sleep(0.02)
    client.loop_stop()
    assert result and result[0].is_failure
    # paho 2 reports 3.1.1's return code 5 as reason code 0x87 too; the raw check follows.
    assert result[0].value == mqtt.NOT_AUTHORIZED
    raw = RawClient(gw.mqtt_port, version=5 if protocol == paho.MQTTv5 else 4)
    ack = raw.connect("anon")
    assert ack.reason_code == (mqtt.NOT_AUTHORIZED if protocol == paho.MQTTv5 else 5)
    assert raw.recv() is None  # and the connection is closed


def test_registered_device_connects_and_is_confined_to_its_topics(gateway_factory: Any) -> None:
    gw = gateway_factory()
    gw.gateway.registry.add("dev-1", "pw1")
    gw.gateway.registry.add("dev-2", "pw2")
    dev1 = RawClient(gw.mqtt_port, version=5)
    assert dev1.connect("dev-1", username="dev-1", password=b"pw1").reason_code == 0
    dev1.send(
        mqtt.Subscribe(
            1,
            [
                mqtt.Subscription("devices/dev-1/commands/#", qos=1),
                mqtt.Subscription("devices/dev-2/commands/#", qos=1),
                mqtt.Subscription("devices/+/commands/#", qos=1),
            ],
        ).encode(5)
    )
    suback = dev1.recv()
    assert list(suback.reason_codes) == [1, mqtt.NOT_AUTHORIZED, mqtt.NOT_AUTHORIZED]
    dev1.send(mqtt.encode_publish("devices/dev-2/telemetry", b"x", qos=1, packet_id=3, version=5))
    denied = dev1.recv()
    assert (denied.type, denied.reason_code) == (mqtt.PUBACK, mqtt.NOT_AUTHORIZED)
    wrong = RawClient(gw.mqtt_port, version=5)
    ack = wrong.connect("dev-2", username="dev-2", password=b"pw1")
    assert ack.reason_code == mqtt.BAD_USER_NAME_OR_PASSWORD


def test_v5_subscription_identifiers_and_overlaps_deliver_once_at_highest_qos(
    open_endpoint: Endpoint,
) -> None:
    sub = RawClient(open_endpoint, version=5)
    sub.connect("sub")
    props = mqtt.Properties()
    props.subscription_identifiers = [42]
    sub.send(mqtt.Subscribe(1, [mqtt.Subscription("a/+", qos=0)], properties=props).encode(5))
    assert sub.recv().type == mqtt.SUBACK
    props.subscription_identifiers = [43]
    sub.send(mqtt.Subscribe(2, [mqtt.Subscription("a/#", qos=1)], properties=props).encode(5))
    assert sub.recv().type == mqtt.SUBACK
    pub = PahoClient(open_endpoint, "pub", paho.MQTTv5)
    pub.publish("a/b", b"x", 1)
    got = sub.recv()
    assert got.qos == 1
    assert sorted(got.properties.subscription_identifiers) == [42, 43]
    sub.send(mqtt.encode_ack(mqtt.PUBACK, got.packet_id, version=5))
    sub.send(mqtt.PINGREQ_FRAME)
    assert sub.recv().type == mqtt.PINGRESP  # and no second copy came before it
    pub.close()


def test_v5_properties_pass_through_to_subscribers(open_endpoint: Endpoint) -> None:
    sub = PahoClient(open_endpoint, "sub", paho.MQTTv5)
    sub.subscribe("req", 1)
    pub = PahoClient(open_endpoint, "pub", paho.MQTTv5)
    props = PahoProperties(PacketTypes.PUBLISH)
    props.ResponseTopic = "resp/1"
    props.CorrelationData = b"\x01\x02"
    props.ContentType = "application/json"
    props.UserProperty = [("k", "v")]
    pub.publish("req", b"{}", 1, properties=props)
    (msg,) = sub.wait_messages(1)
    assert msg.properties.ResponseTopic == "resp/1"
    assert msg.properties.CorrelationData == b"\x01\x02"
    assert msg.properties.ContentType == "application/json"
    assert msg.properties.UserProperty == [("k", "v")]
    sub.close()
    pub.close()


def test_no_local_suppresses_own_messages(open_endpoint: Endpoint) -> None:
    raw = RawClient(open_endpoint, version=5)
    raw.connect("me")
    raw.send(mqtt.Subscribe(1, [mqtt.Subscription("echo", qos=0, no_local=True)]).encode(5))
    assert raw.recv().type == mqtt.SUBACK
    raw.send(mqtt.encode_publish("echo", b"x", version=5))
    raw.send(mqtt.PINGREQ_FRAME)
    assert raw.recv().type == mqtt.PINGRESP


def test_topic_alias_from_client_is_resolved(open_endpoint: Endpoint) -> None:
    sub = PahoClient(open_endpoint, "sub", paho.MQTTv311)
    sub.subscribe("long/topic/name", 0)
    raw = RawClient(open_endpoint, version=5)
    raw.connect("pub")
    props = mqtt.Properties()
    props.topic_alias = 1
    raw.send(mqtt.encode_publish("long/topic/name", b"1", properties=props, version=5))
    raw.send(mqtt.encode_publish("", b"2", properties=props, version=5))
    assert [m.payload for m in sub.wait_messages(2)] == [b"1", b"2"]
    sub.close()


def test_telemetry_is_acknowledged_once_durable_and_acks_keep_publish_order(
    open_gateway: Any,
) -> None:
    from gateway.telemetry.filesink import read_records

    raw = RawClient(open_gateway.mqtt_port)
    raw.connect("d1")
    frames = b"".join(
        [
            mqtt.encode_publish("devices/d1/telemetry", b'{"t":1}', qos=1, packet_id=1),
            mqtt.encode_publish("other/topic", b"x", qos=1, packet_id=2),
            mqtt.encode_publish("devices/d1/events/boot", b"up", qos=2, packet_id=3),
            mqtt.encode_publish("devices/d1/telemetry", b'{"t":2}', qos=0),
        ]
    )
    raw.send(frames)  # one read: the batch
    acks = [raw.recv(), raw.recv(), raw.recv()]
    assert [(a.type, a.packet_id) for a in acks] == [
        (mqtt.PUBACK, 1),
        (mqtt.PUBACK, 2),
        (mqtt.PUBREC, 3),
    ]
    records = list(read_records(f"{open_gateway.config.data_dir}/telemetry"))
    # Acknowledged means durable: both QoS>0 records are on disk by the time their acks arrived.
    got = [(r.device, r.kind, r.topic_or_path, r.payload) for r in records]
    assert ("d1", "telemetry", "devices/d1/telemetry", b'{"t":1}') in got
    assert ("d1", "events", "devices/d1/events/boot", b"up") in got
    raw.send(mqtt.encode_ack(mqtt.PUBREL, 3))
    assert raw.recv().type == mqtt.PUBCOMP


def test_devices_cli_and_telemetry_tail(tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    iotgw = [sys.executable, "-m", "gateway.cli"]
    data = str(tmp_path / "data")
    added = subprocess.run(
        [*iotgw, "devices", "--data-dir", data, "add", "dev-9"], capture_output=True, text=True
    )
    assert added.returncode == 0
    device_id, password = added.stdout.split()
    assert device_id == "dev-9" and len(password) >= 16
    listed = subprocess.run([*iotgw, "devices", "--data-dir", data, "list"], capture_output=True)
    assert listed.stdout.split() == [b"dev-9"]
    dup = subprocess.run(
        [*iotgw, "devices", "--data-dir", data, "add", "dev-9"], capture_output=True, text=True
    )
    assert dup.returncode == 2 and "exists already" in dup.stderr

    import asyncio

    from gateway.telemetry.filesink import FileSink
    from gateway.telemetry.pipeline import TelemetryPipeline
    from gateway.telemetry.records import Record

    async def write() -> None:
        pipeline = TelemetryPipeline(FileSink(f"{data}/telemetry"))
        for i in range(3):
            pipeline.submit(
                Record("dev-9", "telemetry", "mqtt", "devices/dev-9/telemetry", b"%d" % i)
            )
        pipeline.submit(Record("dev-9", "events", "coap", "/events/dev-9", b"\xff"))
        await pipeline.close()

    asyncio.run(write())
    tail = subprocess.run(
        [*iotgw, "telemetry", "--data-dir", data, "tail", "-n", "2"], capture_output=True, text=True
    )
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [line.get("payload") for line in lines] == ["2", None]
    assert lines[1]["payload_base64"] == "/w==" and lines[1]["protocol"] == "coap"


def test_session_and_retained_messages_survive_gateway_restart(
    gateway_factory: Any, tmp_path: Any
) -> None:
    data = str(tmp_path / "persist")
    gw = gateway_factory(allow_anonymous=True, acl="open", data_dir=data)
    dev = RawClient(gw.mqtt_port, version=5)
    props = mqtt.Properties()
    props.session_expiry_interval = 3600
    assert dev.connect("dev", clean_start=False, properties=props).reason_code == 0
    dev.send(mqtt.Subscribe(1, [mqtt.Subscription("cmd/#", qos=1)]).encode(5))
    assert dev.recv().type == mqtt.SUBACK
    dev.send(mqtt.Disconnect().encode(5))
    assert dev.recv() is None
    app = PahoClient(gw.mqtt_port, "app", paho.MQTTv311)
    app.publish("cmd/reboot", b"now", 1)
    app.publish("cfg/interval", b"10", 1, retain=True)
    app.close()
    gw.stop()

    again = gateway_factory(allow_anonymous=True, acl="open", data_dir=data)
    back = RawClient(again.mqtt_port, version=5)
    ack = back.connect("dev", clean_start=False, properties=props)
    assert ack.session_present
    queued = back.recv()
    assert (queued.topic, bytes(queued.payload), queued.qos) == ("cmd/reboot", b"now", 1)
    back.send(mqtt.Subscribe(2, [mqtt.Subscription("cfg/#", qos=1)]).encode(5))
    assert back.recv().type == mqtt.SUBACK
    retained = back.recv()
    assert (retained.topic, bytes(retained.payload), retained.retain) == (
        "cfg/interval",
        b"10",
        True,
    )


def test_health_readiness_and_prometheus_metrics_are_served(open_gateway: Any) -> None:
    import json
    import urllib.request

    base = f"http://127.0.0.1:{open_gateway.gateway.http.port}"
    with urllib.request.urlopen(f"{base}/healthz") as r:
        assert json.load(r) == {"status": "ok"}
    with urllib.request.urlopen(f"{base}/readyz") as r:
        assert json.load(r) == {"status": "ready"}
    raw = RawClient(open_gateway.mqtt_port)
    raw.connect("m1")
    raw.send(mqtt.PINGREQ_FRAME)
    assert raw.recv().type == mqtt.PINGRESP
    with urllib.request.urlopen(f"{base}/metrics") as r:
        text = r.read().decode()
    assert "iotgw_mqtt_connections 1.0" in text
    assert 'iotgw_mqtt_packets_received_total{type="pingreq"} 1.0' in text
    with urllib.request.urlopen(f"{base}/openapi.json") as r:
        assert "/healthz" in json.load(r)["paths"]


def test_shared_subscription_delivers_each_message_to_one_member_of_the_group(
    open_endpoint: Endpoint,
) -> None:
    port = open_endpoint
    members = [PahoClient(port, f"worker{i}", paho.MQTTv5) for i in range(2)]
    for m in members:
        m.subscribe("$share/workers/jobs/#", 1)
    watcher = PahoClient(port, "watcher", paho.MQTTv5)
    watcher.subscribe("jobs/#", 1)
    pub = PahoClient(port, "pub", paho.MQTTv5)
    for i in range(10):
        pub.publish(f"jobs/{i}", b"%d" % i, 1)
    assert len(watcher.wait_messages(10)) == 10
    deadline = time.monotonic() + 5
    while sum(len(m.messages) for m in members) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    shared = sorted(bytes(msg.payload) for m in members for msg in m.messages)
    assert shared == sorted(b"%d" % i for i in range(10))  # each once, none lost
    assert all(m.messages for m in members)  # round robin: both took part
    for c in (*members, watcher, pub):
        c.close()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and client certificates for dev-7 (CA-signed)
    and rogue (self-signed), made with the openssl CLI."""
    d = tmp_path_factory.mktemp("pki")
    p = {n: str(d / n) for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem", "ext")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p["ca.key"], "-out",
             p["ca.pem"], "-days", "2", "-subj", "/CN=iotgw test CA")
    Path(p["ext"]).write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p["srv.key"], "-out",
             p["srv.csr"], "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", p["srv.csr"], "-CA", p["ca.pem"], "-CAkey", p["ca.key"],
             "-CAcreateserial", "-out", p["srv.pem"], "-days", "2", "-extfile", p["ext"])
    for cn in ("dev-7", "#"):  # "#": a CA-signed certificate whose CN is no device id
        key, csr, pem = (str(d / f"{cn}.{x}") for x in ("key", "csr", "pem"))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                 "-subj", f"/CN={cn}")
        _openssl("x509", "-req", "-in", csr, "-CA", p["ca.pem"], "-CAkey", p["ca.key"],
                 "-CAcreateserial", "-out", pem, "-days", "2")
        p[f"{cn}.key"], p[f"{cn}.pem"] = key, pem
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "rogue.key"),
             "-out", str(d / "rogue.pem"), "-days", "2", "-subj", "/CN=dev-7")
    p["rogue.key"], p["rogue.pem"] = str(d / "rogue.key"), str(d / "rogue.pem")
    return p


def _tls_connect(port: int, client_id: str, ca: str, cert: str | None, key: str | None) -> Any:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
    result: list[Any] = []
    client.on_connect = lambda c, u, f, reason, p: result.append(reason)
    try:
        client.connect("127.0.0.1", port)
    except OSError as exc:  # the TLS handshake itself was refused
        return exc
    client.loop_start()
    deadline = time.monotonic() + 5
    while not result and time.monotonic() < deadline:
        time.sleep(0.02)
    client.loop_stop()
    client.disconnect()
    return result[0] if result else None


def test_device_authenticates_with_a_tls_client_certificate(
    gateway_factory: Any, certificates: dict[str, str]
) -> None:
    c = certificates
    gw = gateway_factory(
        tls_cert=c["srv.pem"], tls_key=c["srv.key"], tls_client_ca=c["ca.pem"], mqtts_port=0
    )
    port = gw.mqtts_port
    ok = _tls_connect(port, "dev-7", c["ca.pem"], c["dev-7.pem"], c["dev-7.key"])
    assert ok is not None and not ok.is_failure
    # The certificate names dev-7: it cannot connect as another device.
    other = _tls_connect(port, "dev-8", c["ca.pem"], c["dev-7.pem"], c["dev-7.key"])
    assert other is not None and other.value == mqtt.CLIENT_IDENTIFIER_NOT_VALID
    # No certificate and no password: anonymous, refused.
    anon = _tls_connect(port, "dev-7", c["ca.pem"], None, None)
    assert anon is not None and anon.value == mqtt.NOT_AUTHORIZED
    # A self-signed certificate claiming dev-7 is refused by the TLS layer: an alert or the
    # connection closed, and no CONNACK (a hang would be a failure, not a refusal).
    assert _rogue_outcome(port, c["ca.pem"], c["rogue.pem"], c["rogue.key"]) in ("alert", "eof")


def _rogue_outcome(port: int, ca: str, cert: str, key: str) -> str:
    """What a client presenting `cert` gets after sending CONNECT: "alert" (a TLS alert),
    "eof" (closed), or the bytes it received. TimeoutError when nothing comes at all."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(mqtt.Connect("dev-7", protocol_level=5).encode(5))
                data = tls.recv(1024)
        except ssl.SSLError:
            return "alert"
        except ConnectionResetError:
            return "eof"
    return "eof" if data == b"" else repr(data)


def test_server_assigns_topic_aliases_within_the_clients_maximum(open_endpoint: Endpoint) -> None:
    sub = RawClient(open_endpoint, version=5)
    ack = sub.connect("sub", properties=mqtt.Properties(topic_alias_maximum=2))
    assert ack.reason_code == 0
    sub.send(mqtt.Subscribe(1, [mqtt.Subscription("al/#", 0)]).encode(5))
    assert sub.recv().type == mqtt.SUBACK
    pub = RawClient(open_endpoint, version=5)
    pub.connect("pub")
    topics = ["al/one", "al/one", "al/two", "al/one", "al/three", "al/three", "al/two"]
    for i, t in enumerate(topics):
        pub.send(mqtt.encode_publish(t, b"%d" % i, version=5))
    known: dict[int, str] = {}
    got, sent = [], []
    for _ in topics:
        p = sub.recv()
        alias = p.properties.topic_alias if p.properties else None
        assert alias is not None and 1 <= alias <= 2
        if p.topic:
            known[alias] = p.topic  # a new or re-mapped alias comes with its topic
        got.append(known[alias])
        sent.append(p.topic)
    assert got == topics
    # Repeats carry the alias alone; al/three and the last al/two re-map the least recently
    # used alias.
    assert sent == ["al/one", "", "al/two", "", "al/three", "", "al/two"]


def test_service_account_gets_its_acl_file_patterns_and_deny_rules_win(
    gateway_factory: Any, tmp_path: Path
) -> None:
    acl = tmp_path / "acl.toml"
    acl.write_text(
        'deny_publish = ["devices/+/commands/factory-reset"]\n'
        "[[service]]\n"
        'name = "billing"\n'
        'publish = ["devices/+/commands/#"]\n'
        'subscribe = ["devices/+/telemetry/#"]\n'
    )
    gw = gateway_factory(acl_file=str(acl))
    gw.gateway.registry.add("billing", "pw")
    app = RawClient(gw.mqtt_port, version=5)
    assert app.connect("billing-1", username="billing", password=b"pw").reason_code == 0
    app.send(mqtt.Subscribe(1, [
        mqtt.Subscription("devices/+/telemetry/#", 0),
        mqtt.Subscription("devices/d1/telemetry/temp", 0),
        mqtt.Subscription("devices/#", 0),
    ]).encode(5))
    assert list(app.recv().reason_codes) == [0, 0, mqtt.NOT_AUTHORIZED]
    for topic, reason in [
        ("devices/d1/commands/reboot", mqtt.NO_MATCHING_SUBSCRIBERS),
        ("devices/d1/commands/factory-reset", mqtt.NOT_AUTHORIZED),
        ("devices/d1/telemetry", mqtt.NOT_AUTHORIZED),
    ]:
        app.send(mqtt.encode_publish(topic, b"{}", qos=1, packet_id=2, version=5))
        ack = app.recv()
        assert (ack.type, ack.reason_code) == (mqtt.PUBACK, reason), topic


def test_slow_consumer_is_disconnected_with_quota_exceeded(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open", max_queued_messages=5)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast, never read
    slow.connect(("127.0.0.1", gw.mqtt_port))
    slow.sendall(mqtt.Connect("slow", protocol_level=5).encode())
    slow.sendall(mqtt.Subscribe(1, [mqtt.Subscription("flood", 1)]).encode(5))
    time.sleep(0.2)
    pub = RawClient(gw.mqtt_port, version=5)
    pub.connect("pub")
    payload = b"x" * 65536
    for i in range(400):  # 26 MB: more than the socket and the write buffer hold
        pub.send(mqtt.encode_publish("flood", payload, qos=1, packet_id=i % 65535 + 1,
                                     version=5))
        if i % 50 == 49 and "slow" not in gw.call(lambda: set(gw.gateway.broker.online)):
            break
    deadline = time.monotonic() + 5
    while "slow" in gw.call(lambda: set(gw.gateway.broker.online)):
        assert time.monotonic() < deadline, "the slow consumer was never disconnected"
        time.sleep(0.05)
    metrics = gw.gateway.metrics.render().decode()
    assert 'iotgw_mqtt_protocol_errors_total{reason_code="0x97"} 1.0' in metrics
    slow.close()
    pub.close()


def test_internal_subscribers_see_routed_messages_until_they_unsubscribe(
    open_gateway: Any,
) -> None:
    seen: list[tuple[str, bytes]] = []
    broker = open_gateway.gateway.broker
    stop = open_gateway.call(
        broker.subscribe_internal, "devices/+/commands/#",
        lambda m: seen.append((m.topic, bytes(m.payload))),
    )
    pub = PahoClient(open_gateway.mqtt_port, "app", paho.MQTTv5)
    pub.publish("devices/d1/commands/reboot", b"now", 1)
    open_gateway.call(stop)
    pub.publish("devices/d1/commands/reboot", b"again", 1)
    pub.close()
    assert seen == [("devices/d1/commands/reboot", b"now")]
