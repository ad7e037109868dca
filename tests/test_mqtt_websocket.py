"""MQTT over WebSocket (--ws-port, --wss-port): real clients (paho-mqtt's websockets transport,
MQTT.js under Node) and a raw socket speaking WebSocket through wsproto's client side, for the
edge cases: frames and MQTT packets split anywhere, fragments, control frames, refusals."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import free_port
from test_mqtt_server import PROTOCOLS, PahoClient, RawClient, certificates  # noqa: F401  (a fixture)
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from gateway._native import mqtt

ROOT = Path(__file__).parent.parent


@pytest.fixture
def ws_gateway(gateway_factory: Any) -> Any:
    return gateway_factory(allow_anonymous=True, acl="open", ws_port=free_port())


@pytest.fixture
def wss_gateway(gateway_factory: Any, certificates: dict[str, str]) -> Any:  # noqa: F811
    return gateway_factory(
        allow_anonymous=True, acl="open", tls_cert=certificates["srv.pem"],
        tls_key=certificates["srv.key"], mqtts_port=0, wss_port=free_port(),
    )


class WsClient:
    """A raw socket speaking WebSocket (wsproto, client side) and MQTT (the native codec)."""

    def __init__(self, port: int, path: str = "/mqtt", subprotocols: tuple[str, ...] = ("mqtt",),
                 version: int = 5, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:  # a client that reads slowly: its socket fills fast
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.framer = mqtt.Framer(version=version)
        self.version = version
        self.events: list[Event] = []
        self.packets: list[Any] = []
        self.closed_by_server = False
        self.sock.sendall(self.ws.send(Request(host="127.0.0.1", target=path,
                                               subprotocols=list(subprotocols))))
        self.handshake = self.next_event()

    def _read(self, timeout: float) -> bool:
        """Read once; False when the server closed TCP."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed_by_server = True
            return False
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                self.packets.extend(p.detach() for p in self.framer.feed(event.data))
            else:
                self.events.append(event)
        return True

    def next_event(self, timeout: float = 5.0) -> Event | None:
        deadline = time.monotonic() + timeout
        while not self.events:
            if not self._read(max(0.01, deadline - time.monotonic())):
                return None
        return self.events.pop(0)

    def recv(self, timeout: float = 5.0) -> Any:
        """The next MQTT packet, or None when the connection closed."""
        deadline = time.monotonic() + timeout
        while not self.packets:
            if self.closed_by_server or any(isinstance(e, CloseConnection) for e in self.events):
                return None
            if not self._read(max(0.01, deadline - time.monotonic())):
                return None
        return self.packets.pop(0)

    def frame(self, data: bytes, finished: bool = True) -> bytes:
        """The bytes of one binary frame (masked, as a client must)."""
        return self.ws.send(Message(data=data, message_finished=finished))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, client_id: str, **kw: Any) -> Any:
        kw.setdefault("protocol_level", self.version)
        self.send(self.frame(mqtt.Connect(client_id=client_id, **kw).encode(self.version)))
        return self.recv()

    def close(self) -> None:
        self.sock.close()


# ---- real clients ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS.values(), ids=PROTOCOLS.keys())
def test_paho_over_websocket_publishes_and_receives_at_each_qos(
    ws_gateway: Any, protocol: int
) -> None:
    port = ws_gateway.gateway.ws_port
    sub = PahoClient(port, "sub", protocol, transport="websockets")
    pub = PahoClient(port, "pub", protocol, transport="websockets")
    for qos in (0, 1, 2):
        sub.subscribe(f"ws/{qos}", qos)
    for qos in (0, 1, 2):
        for i in range(5):
            pub.publish(f"ws/{qos}", b"%d-%d" % (qos, i), qos)
    got = sub.wait_messages(15)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == sorted(
        (f"ws/{q}", b"%d-%d" % (q, i), q) for q in (0, 1, 2) for i in range(5))
    sub.close()
    pub.close()


def test_paho_over_secure_websocket_with_the_test_ca(
    wss_gateway: Any, certificates: dict[str, str]  # noqa: F811
) -> None:
    port = wss_gateway.gateway.wss_port
    ca = certificates["ca.pem"]
    sub = PahoClient(port, "sub", paho.MQTTv5, transport="websockets", ca=ca)
    pub = PahoClient(port, "pub", paho.MQTTv311, transport="websockets", ca=ca)
    sub.subscribe("wss/#", 2)
    for qos in (0, 1, 2):
        pub.publish(f"wss/{qos}", b"secret %d" % qos, qos)
    got = sub.wait_messages(3)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        (f"wss/{q}", b"secret %d" % q, q) for q in (0, 1, 2)]
    # TCP/TLS and WSS are one broker: a TLS client sees the same messages.
    tls = PahoClient(wss_gateway.mqtts_port, "tls", paho.MQTTv5, ca=ca)
    tls.subscribe("wss/#", 1)
    pub.publish("wss/1", b"to both", 1)
    assert tls.wait_messages(1)[0].payload == b"to both"
    for c in (sub, pub, tls):
        c.close()


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (ROOT / ".cache/node/node_modules/mqtt").is_dir():
        pytest.fail("node or MQTT.js (.cache/node) is missing: scripts/test.sh installs them")
    return node


def _mqttjs(url: str, ca: str | None = None, version: int = 5) -> dict[str, Any]:
    env = {**os.environ, "NODE_PATH": str(ROOT / ".cache/node/node_modules"),
           "MQTT_VERSION": str(version)}
    out = subprocess.run(
        [_node(), str(ROOT / "tests/js/mqttjs_client.js"), url, *([ca] if ca else [])],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _check_mqttjs(result: dict[str, Any]) -> None:
    assert result["version"].startswith("5.")
    assert result["connected"] and not result["errors"]
    assert result["granted"] == [2]
    assert sorted((m["topic"], m["qos"], m["payload"]) for m in result["received"]) == [
        ("js/0", 0, "hello 0"), ("js/1", 1, "hello 1"), ("js/2", 2, "hello 2"),
        ("js/big", 1, f"{200 * 1024} bytes"),
    ]


def test_mqttjs_over_websocket(ws_gateway: Any) -> None:
    _check_mqttjs(_mqttjs(f"ws://127.0.0.1:{ws_gateway.gateway.ws_port}/mqtt", version=5))
    _check_mqttjs(_mqttjs(f"ws://127.0.0.1:{ws_gateway.gateway.ws_port}/mqtt", version=4))


def test_mqttjs_over_secure_websocket(
    wss_gateway: Any, certificates: dict[str, str]  # noqa: F811
) -> None:
    _check_mqttjs(_mqttjs(f"wss://127.0.0.1:{wss_gateway.gateway.wss_port}/mqtt",
                          ca=certificates["ca.pem"]))


# ---- the upgrade -----------------------------------------------------------------------------


def test_upgrade_on_another_path_gets_404_and_is_closed(ws_gateway: Any) -> None:
    client = WsClient(ws_gateway.gateway.ws_port, path="/")
    assert isinstance(client.handshake, RejectConnection)
    assert client.handshake.status_code == 404
    assert client.next_event() is not None or client.closed_by_server  # the body, then EOF
    while client.next_event() is not None:
        pass
    assert client.closed_by_server


def test_upgrade_without_the_mqtt_subprotocol_gets_400(ws_gateway: Any) -> None:
    for offered in ((), ("chat", "mqtt5x")):
        client = WsClient(ws_gateway.gateway.ws_port, subprotocols=offered)
        assert isinstance(client.handshake, RejectConnection)
        assert client.handshake.status_code == 400
        body = b""
        while (event := client.next_event()) is not None:
            body += getattr(event, "data", b"")
        assert b"subprotocol mqtt" in body
        assert client.closed_by_server


@pytest.mark.parametrize("offered", [("mqtt",), ("mqttv3.1",), ("chat", "mqttv3.1", "mqtt")])
def test_subprotocol_mqtt_is_chosen_and_legacy_mqttv31_accepted(
    ws_gateway: Any, offered: tuple[str, ...]
) -> None:
    client = WsClient(ws_gateway.gateway.ws_port, subprotocols=offered, version=4)
    assert isinstance(client.handshake, AcceptConnection)
    assert client.handshake.subprotocol == ("mqtt" if "mqtt" in offered else "mqttv3.1")
    assert client.connect("c").reason_code == 0
    client.close()


def test_a_client_that_never_finishes_the_upgrade_is_closed(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, ws_port=free_port(), ws_handshake_timeout=1)
    slow = socket.create_connection(("127.0.0.1", gw.gateway.ws_port), timeout=5)
    slow.sendall(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    silent = socket.create_connection(("127.0.0.1", gw.gateway.ws_port), timeout=5)
    started = time.monotonic()
    for sock in (slow, silent):
        with contextlib.suppress(ConnectionResetError):  # closed, or reset: either way gone
            assert sock.recv(1024) == b""
    assert time.monotonic() - started < 4
    # An upgrade that does finish is not affected.
    client = WsClient(gw.gateway.ws_port)
    time.sleep(1.5)
    assert client.connect("in-time").reason_code == 0


# ---- frames ----------------------------------------------------------------------------------


def _subscribed(client: WsClient, topic: str) -> None:
    client.send(client.frame(mqtt.Subscribe(1, [mqtt.Subscription(topic, 1)]).encode(5)))
    assert client.recv().type == mqtt.SUBACK


def test_frames_split_byte_by_byte(ws_gateway: Any) -> None:
    client = WsClient(ws_gateway.gateway.ws_port)
    data = client.frame(mqtt.Connect(client_id="bytes", protocol_level=5).encode(5))
    data += client.frame(mqtt.Subscribe(1, [mqtt.Subscription("b/#", 1)]).encode(5))
    for i in range(len(data)):
        client.send(data[i:i + 1])
        time.sleep(0.002)  # its own TCP segment, most likely its own read
    assert client.recv().type == mqtt.CONNACK
    assert client.recv().type == mqtt.SUBACK
    client.close()


def test_several_mqtt_packets_in_one_frame_and_one_packet_over_several_frames(
    ws_gateway: Any
) -> None:
    client = WsClient(ws_gateway.gateway.ws_port)
    publish = mqtt.encode_publish("many/1", b"m" * 300, qos=1, packet_id=7, version=5)
    packets = (mqtt.Connect(client_id="many", protocol_level=5).encode(5)
               + mqtt.Subscribe(1, [mqtt.Subscription("many/#", 1)]).encode(5) + publish)
    client.send(client.frame(packets))  # CONNECT, SUBSCRIBE and PUBLISH in one frame
    got = [client.recv() for _ in range(4)]
    assert sorted(p.type for p in got) == sorted(
        [mqtt.CONNACK, mqtt.SUBACK, mqtt.PUBACK, mqtt.PUBLISH])
    # One PUBLISH in three whole messages, then in one message of three fragments.
    pieces = (publish[:1], publish[1:100], publish[100:])
    client.send(b"".join(client.frame(p) for p in pieces))
    client.send(b"".join(client.frame(p, finished=i == 2) for i, p in enumerate(pieces)))
    got = [client.recv() for _ in range(4)]
    delivered = [p for p in got if p.type == mqtt.PUBLISH]
    assert len(delivered) == 2 and all(bytes(p.payload) == b"m" * 300 for p in delivered)
    assert sum(p.type == mqtt.PUBACK for p in got) == 2
    client.close()


def test_ping_is_answered_and_the_connection_goes_on(ws_gateway: Any) -> None:
    client = WsClient(ws_gateway.gateway.ws_port)
    assert client.connect("pinger").reason_code == 0
    client.send(client.ws.send(Ping(payload=b"are you there")))
    event = client.next_event()
    assert isinstance(event, Pong) and event.payload == b"are you there"
    client.send(client.frame(mqtt.PINGREQ_FRAME))
    assert client.recv().type == mqtt.PINGRESP
    client.close()


def test_text_frame_is_closed_with_1003(ws_gateway: Any) -> None:
    client = WsClient(ws_gateway.gateway.ws_port)
    assert client.connect("texter").reason_code == 0
    client.send(client.ws.send(TextMessage(data="hello")))
    event = client.next_event()
    assert isinstance(event, CloseConnection) and event.code == 1003
    client.send(client.ws.send(event.response()))  # our half of the close handshake
    assert client.next_event() is None and client.closed_by_server


def test_close_handshake_is_answered(ws_gateway: Any) -> None:
    client = WsClient(ws_gateway.gateway.ws_port)
    assert client.connect("closer").reason_code == 0
    client.send(client.ws.send(CloseConnection(code=1000, reason="bye")))
    event = client.next_event()
    assert isinstance(event, CloseConnection) and event.code == 1000
    assert client.next_event() is None and client.closed_by_server


def test_message_larger_than_the_maximum_packet_is_closed_with_1009(
    gateway_factory: Any
) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open", ws_port=free_port(),
                         max_packet_size=1000)
    for fragmented in (False, True):
        client = WsClient(gw.gateway.ws_port)
        assert client.connect("big").reason_code == 0
        publish = mqtt.encode_publish("big", b"x" * 1500, version=5)
        if fragmented:  # each frame small, the message too big
            client.send(client.frame(publish[:700], finished=False) + client.frame(publish[700:]))
        else:
            client.send(client.frame(publish))
        event = client.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1009


def test_malformed_mqtt_inside_websocket_closes_with_0x81_as_on_tcp(ws_gateway: Any) -> None:
    bystander = PahoClient(ws_gateway.gateway.ws_port, "ok", paho.MQTTv5, transport="websockets")
    bystander.subscribe("t", 0)
    bad = WsClient(ws_gateway.gateway.ws_port)
    assert bad.connect("bad").reason_code == 0
    bad.send(bad.frame(bytes([0x36, 0x05, 0x00, 0x01, ord("t"), 0x00, 0x01])))  # QoS 3
    reply = bad.recv()
    assert (reply.type, reply.reason_code) == (mqtt.DISCONNECT, mqtt.MALFORMED_PACKET)
    event = bad.next_event()  # then the WebSocket close, as TCP's FIN
    assert isinstance(event, CloseConnection) and event.code == 1000
    other = PahoClient(ws_gateway.gateway.ws_port, "pub", paho.MQTTv5, transport="websockets")
    other.publish("t", b"still here", 0)
    assert [m.payload for m in bystander.wait_messages(1)] == [b"still here"]
    bystander.close()
    other.close()


# ---- MQTT features over WebSocket --------------------------------------------------------------


def test_will_is_published_when_a_websocket_client_vanishes(ws_gateway: Any) -> None:
    port = ws_gateway.gateway.ws_port
    watcher = PahoClient(port, "watcher", paho.MQTTv311, transport="websockets")
    watcher.subscribe("wills/#", 1)
    client = WsClient(port, version=4)
    will = mqtt.Will("wills/dev", b"gone", qos=1)
    assert client.connect("doomed", will=will).reason_code == 0
    client.sock.close()  # no DISCONNECT, no close frame
    assert [m.payload for m in watcher.wait_messages(1)] == [b"gone"]
    watcher.close()


def test_session_takeover_across_transports(ws_gateway: Any) -> None:
    """The same client id over TCP takes over its WebSocket session (0x8E to the old one),
    with the QoS 1 messages queued while it was away."""
    port = ws_gateway.gateway.ws_port
    old = WsClient(port)
    assert old.connect("roamer", clean_start=False,
                       properties=mqtt.Properties(session_expiry_interval=60)).reason_code == 0
    _subscribed(old, "roam/#")
    new = RawClient(ws_gateway.mqtt_port, version=5)
    assert new.connect("roamer", clean_start=False,
                       properties=mqtt.Properties(session_expiry_interval=60)).session_present
    reply = old.recv()
    assert (reply.type, reply.reason_code) == (mqtt.DISCONNECT, mqtt.SESSION_TAKEN_OVER)
    new.close()  # away, its session kept
    pub = PahoClient(port, "pub", paho.MQTTv5, transport="websockets")
    pub.publish("roam/1", b"queued", 1)
    back = WsClient(port)
    ack = back.connect("roamer", clean_start=False,
                       properties=mqtt.Properties(session_expiry_interval=60))
    assert ack.session_present
    message = back.recv()
    assert (message.type, bytes(message.payload)) == (mqtt.PUBLISH, b"queued")
    pub.close()


def test_device_authenticates_with_a_client_certificate_over_wss(
    gateway_factory: Any, certificates: dict[str, str]  # noqa: F811
) -> None:
    c = certificates
    gw = gateway_factory(tls_cert=c["srv.pem"], tls_key=c["srv.key"], tls_client_ca=c["ca.pem"],
                         mqtts_port=0, wss_port=free_port())
    ctx = ssl.create_default_context(cafile=c["ca.pem"])
    ctx.load_cert_chain(c["dev-7.pem"], c["dev-7.key"])
    results = {}
    for client_id in ("dev-7", "dev-8"):
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv5, transport="websockets")
        client.ws_set_options(path="/mqtt")
        client.tls_set_context(ctx)
        got: list[Any] = []
        client.on_connect = lambda cl, u, f, reason, p, got=got: got.append(reason)
        client.connect("127.0.0.1", gw.gateway.wss_port)
        client.loop_start()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        client.loop_stop()
        client.disconnect()
        results[client_id] = got[0].value if got else None
    # The certificate names dev-7 (as on the TLS listener): it cannot be another device.
    assert results == {"dev-7": 0, "dev-8": mqtt.CLIENT_IDENTIFIER_NOT_VALID}


def test_a_client_that_keeps_publishing_past_receive_maximum_reads_0x93(
    ws_gateway: Any,
) -> None:
    """Graceful close over WebSocket: the DISCONNECT, then a close frame; what the client still
    sends is read and dropped until its own close frame, so nothing resets the connection."""
    client = WsClient(ws_gateway.gateway.ws_port)
    assert client.connect("flooder").reason_code == 0
    client.send(b"".join(  # QoS 2 without PUBREL: past the receive maximum (1024)
        client.frame(mqtt.encode_publish("flood/x", b"x" * 200, qos=2, packet_id=i, version=5))
        for i in range(1, 3001)
    ))
    more = client.frame(mqtt.encode_publish("flood/x", b"x" * 200, qos=2, packet_id=9, version=5))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        client.send(more * 20)  # BrokenPipeError / ConnectionResetError: reset by the server
        time.sleep(0.01)
    packets = []
    while (packet := client.recv()) is not None:
        packets.append(packet)
    disconnects = [p for p in packets if p.type == mqtt.DISCONNECT]
    assert disconnects and disconnects[-1].reason_code == mqtt.RECEIVE_MAXIMUM_EXCEEDED
    close = client.next_event()
    assert isinstance(close, CloseConnection) and close.code == 1000
    client.send(client.ws.send(close.response()))
    assert client.next_event() is None and client.closed_by_server


def test_slow_websocket_consumer_is_disconnected_with_quota_exceeded(
    gateway_factory: Any,
) -> None:
    """The socket's write backpressure reaches the MQTT connection through the WebSocket
    layer (pause_writing): a subscriber that never reads is shed, not buffered for ever."""
    gw = gateway_factory(allow_anonymous=True, acl="open", max_queued_messages=5,
                         ws_port=free_port())
    slow = WsClient(gw.gateway.ws_port, rcvbuf=4096)
    assert slow.connect("slow").reason_code == 0
    slow.send(slow.frame(mqtt.Subscribe(1, [mqtt.Subscription("flood", 1)]).encode(5)))
    time.sleep(0.2)  # never read from here on
    pub = WsClient(gw.gateway.ws_port)
    assert pub.connect("pub").reason_code == 0
    payload = b"x" * 65536
    for i in range(400):  # 26 MB: more than the socket and the write buffer hold
        pub.send(pub.frame(mqtt.encode_publish("flood", payload, qos=1,
                                               packet_id=i % 65535 + 1, version=5)))
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
