"""The MQTT protocol state machine driven with packets alone: no socket, no event loop.

Client frames are encoded with the native codec, decoded by a server-side framer as a
transport would, and handed to `MqttChannel.received`; what the channel writes to its
`ChannelIO` is decoded back with a client-side framer."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway import guard
from gateway._native import mqtt
from gateway.events import EventLog
from gateway.guard import AuthGuard
from gateway.metrics import AuthMetrics, EventMetrics, MqttMetrics
from gateway.mqtt import channel as ch
from gateway.mqtt.acl import Acl
from gateway.mqtt.broker import Broker, BrokerLimits
from gateway.mqtt.channel import MqttChannel
from gateway.mqtt.session import Message, SubOptions, monotonic


class FakeIO:
    """A transport as the channel sees it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.reading = True
        self.closed: bool | None = None  # graceful or not, once closed

    def write(self, data: bytearray) -> None:
        assert self.closed is None, "written after close"
        self.data += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self, graceful: bool) -> None:
        self.closed = graceful


class Holder:
    """A publish interceptor holding the acknowledgement of PUBLISHes to `held/...`."""

    prefix = ""  # every topic

    def __init__(self) -> None:
        self.tokens: list[Any] = []
        self.seen: list[str] = []

    def on_publish(self, channel: MqttChannel, message: Message) -> int:
        self.seen.append(message.topic)
        if message.topic.startswith("taken/"):
            return ch.TAKEN
        if message.topic.startswith("refused/"):
            return ch.REFUSED
        if message.topic.startswith("held/"):
            token = channel.hold_ack()
            if token is not None:
                self.tokens.append((channel, token))
        return ch.ROUTE

    def forget(self, channel: MqttChannel) -> None:
        self.tokens = [t for t in self.tokens if t[0] is not channel]


class Client:
    def __init__(self, broker: Broker, version: int = 5) -> None:
        self.broker = broker
        self.version = version
        self.io = FakeIO()
        self.channel = MqttChannel(broker, self.io, peer="10.0.0.1:1234", peer_host="10.0.0.1")
        self.server_framer = mqtt.Framer(max_packet_size=broker.limits.max_packet_size)
        self.client_framer = mqtt.Framer(version=version)
        self._read = 0

    def send(self, *frames: bytes) -> None:
        try:
            packets = self.server_framer.feed(b"".join(frames))
        except mqtt.MqttError as exc:
            self.channel.malformed(exc)
        else:
            self.channel.received(packets)
        self.broker.flush()

    def connect(self, client_id: str = "c1", **kwargs: Any) -> Any:
        connect = mqtt.Connect(client_id, protocol_level=self.version, **kwargs)
        self.send(connect.encode(self.version))
        (connack,) = self.packets()
        return connack

    def packets(self) -> list[Any]:
        new = bytes(self.io.data[self._read :])
        self._read = len(self.io.data)
        return [p.detach() for p in self.client_framer.feed(new)]

    def publish(self, topic: str, payload: bytes = b"x", **kwargs: Any) -> None:
        self.send(mqtt.encode_publish(topic, payload, version=self.version, **kwargs))

    def subscribe(self, topic_filter: str, qos: int = 1, **props: Any) -> Any:
        properties = mqtt.Properties(**props) if props else None
        sub = mqtt.Subscribe(1, [mqtt.Subscription(topic_filter, qos=qos)], properties)
        self.send(sub.encode(self.version))
        (suback,) = self.packets()
        return suback


def make_broker(**limits: Any) -> Broker:
    registry = CollectorRegistry()
    events = EventLog(EventMetrics(registry))
    return Broker(
        acl=Acl("open"),
        metrics=MqttMetrics(registry),
        guard=AuthGuard(AuthMetrics(registry), events),
        events=events,
        allow_anonymous=True,
        limits=BrokerLimits(**limits),
        interceptors=[Holder()],
    )


@pytest.fixture
def broker() -> Broker:
    return make_broker()


def holder(broker: Broker) -> Holder:
    found = broker.interceptors[0]
    assert isinstance(found, Holder)
    return found


# ---- CONNECT ------------------------------------------------------------------------------------


def test_connect_is_accepted_with_the_servers_limits(broker: Broker) -> None:
    c = Client(broker)
    assert c.channel.state == ch.AWAITING_CONNECT
    connack = c.connect("", clean_start=True)
    assert connack.type == mqtt.CONNACK and connack.reason_code == mqtt.SUCCESS
    assert connack.properties.receive_maximum == broker.limits.receive_maximum
    assigned = connack.properties.assigned_client_identifier
    assert assigned and assigned.startswith("auto-")
    assert c.channel.state == ch.CONNECTED
    assert broker.online[assigned] is c.channel


def test_first_packet_not_connect_closes_without_answer(broker: Broker) -> None:
    c = Client(broker)
    c.send(mqtt.PINGREQ_FRAME)
    assert c.packets() == []
    assert c.channel.state == ch.CLOSED and c.io.closed is True


def test_anonymous_refused_when_not_allowed() -> None:
    broker = make_broker()
    broker.allow_anonymous = False
    for version, code in ((5, mqtt.NOT_AUTHORIZED), (4, ch.V4_NOT_AUTHORIZED)):
        c = Client(broker, version)
        assert c.connect("dev").reason_code == code
        assert c.channel.state == ch.CLOSED and "dev" not in broker.online


class Devices:
    """A registry with one device whose password is `secret`."""

    def get(self, device_id: str) -> Any:
        return None

    def verify(self, device_id: str, secret: bytes) -> bool:
        return False


def test_unknown_device_refused_at_once_with_0x86() -> None:
    broker = make_broker()
    broker.registry = Devices()  # type: ignore[assignment]
    c = Client(broker)
    assert c.connect("dev", username="dev", password=b"nope").reason_code == (
        mqtt.BAD_USER_NAME_OR_PASSWORD
    )
    assert c.channel.state == ch.CLOSED


def _later_auth(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Secret checks answered later, by the test: what the guard's worker thread does."""
    pending: list[Any] = []

    def check_secret(user: str, password: bytes, keys: Any, later: Any) -> str | None:
        pending.append(later)
        return None

    broker.registry = Devices()  # type: ignore[assignment]
    monkeypatch.setattr(broker.lifecycle, "check_secret", check_secret)
    return pending


def test_packets_behind_a_connect_being_decided_wait_and_reading_pauses(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = _later_auth(broker, monkeypatch)
    c = Client(broker)
    c.send(
        mqtt.Connect("dev", protocol_level=5, username="dev", password=b"pw").encode(5),
        mqtt.encode_publish("a/b", b"1", qos=1, packet_id=7, version=5),
    )
    assert c.channel.state == ch.AUTHENTICATING and not c.io.reading
    assert c.packets() == []
    c.publish("a/b", b"2", qos=1, packet_id=8)  # read before the pause took effect
    pending[0](guard.OK)
    broker.flush()
    got = c.packets()
    assert [p.type for p in got] == [mqtt.CONNACK, mqtt.PUBACK, mqtt.PUBACK]
    assert [p.packet_id for p in got[1:]] == [7, 8]
    assert c.channel.state == ch.CONNECTED and c.io.reading


@pytest.mark.parametrize(
    ("verdict", "code"),
    [
        (guard.DENIED, mqtt.BAD_USER_NAME_OR_PASSWORD),
        (guard.THROTTLED, mqtt.BANNED),
        (guard.BUSY, mqtt.SERVER_BUSY),
        (guard.UNAVAILABLE, mqtt.SERVER_UNAVAILABLE),
        (guard.DISABLED, mqtt.NOT_AUTHORIZED),
    ],
)
def test_a_late_refusal_answers_the_connect_and_drops_what_waited(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, verdict: str, code: int
) -> None:
    pending = _later_auth(broker, monkeypatch)
    c = Client(broker)
    c.send(
        mqtt.Connect("dev", protocol_level=5, username="dev", password=b"pw").encode(5),
        mqtt.encode_publish("a/b", b"1", qos=1, packet_id=7, version=5),
    )
    pending[0](verdict)
    broker.flush()
    (connack,) = c.packets()
    assert connack.reason_code == code
    assert c.channel.state == ch.CLOSED and c.io.closed is True
    assert "dev" not in broker.sessions


def test_a_verdict_after_the_client_left_does_nothing(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = _later_auth(broker, monkeypatch)
    c = Client(broker)
    c.send(mqtt.Connect("dev", protocol_level=5, username="dev", password=b"pw").encode(5))
    c.channel.connection_lost("closed by the client")
    pending[0](guard.OK)
    assert "dev" not in broker.online and c.packets() == []


# ---- QoS both ways ------------------------------------------------------------------------------


def test_qos2_from_the_client_is_delivered_once(broker: Broker) -> None:
    sub, pub = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("t/#", qos=2)
    pub.connect("pub")
    pub.publish("t/1", b"once", qos=2, packet_id=5)
    assert [p.type for p in pub.packets()] == [mqtt.PUBREC]
    pub.publish("t/1", b"once", qos=2, packet_id=5, dup=True)  # resent before PUBREL
    assert [p.type for p in pub.packets()] == [mqtt.PUBREC]
    pub.send(mqtt.encode_ack(mqtt.PUBREL, 5, 0, 5))
    (comp,) = pub.packets()
    assert comp.type == mqtt.PUBCOMP and comp.reason_code == mqtt.SUCCESS
    pub.send(mqtt.encode_ack(mqtt.PUBREL, 5, 0, 5))  # again: unknown now
    assert pub.packets()[0].reason_code == mqtt.PACKET_IDENTIFIER_NOT_FOUND
    delivered = [p for p in sub.packets() if p.type == mqtt.PUBLISH]
    assert [bytes(p.payload) for p in delivered] == [b"once"]


def test_qos2_to_the_client_completes(broker: Broker) -> None:
    sub, pub = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("t/#", qos=2)
    pub.connect("pub")
    pub.publish("t/1", b"m", qos=2, packet_id=1)
    (publish,) = sub.packets()
    assert publish.qos == 2 and publish.packet_id
    session = broker.sessions["sub"]
    assert publish.packet_id in session.outgoing
    sub.send(mqtt.encode_ack(mqtt.PUBREC, publish.packet_id, 0, 5))
    (rel,) = sub.packets()
    assert rel.type == mqtt.PUBREL
    sub.send(mqtt.encode_ack(mqtt.PUBCOMP, publish.packet_id, 0, 5))
    assert not session.outgoing


def test_the_clients_receive_maximum_bounds_what_is_in_flight(broker: Broker) -> None:
    sub, pub = Client(broker), Client(broker)
    sub.connect("sub", properties=mqtt.Properties(receive_maximum=2))
    sub.subscribe("t/#", qos=1)
    pub.connect("pub")
    for i in range(1, 6):
        pub.publish("t/x", str(i).encode(), qos=1, packet_id=i)
    first = sub.packets()
    assert [bytes(p.payload) for p in first] == [b"1", b"2"]  # two in flight, three queued
    assert len(broker.sessions["sub"].queue) == 3
    sub.send(mqtt.encode_ack(mqtt.PUBACK, first[0].packet_id, 0, 5))
    assert [bytes(p.payload) for p in sub.packets()] == [b"3"]


def test_past_the_servers_receive_maximum_the_client_is_disconnected_0x93() -> None:
    broker = make_broker(receive_maximum=3)
    c = Client(broker)
    c.connect("c")
    for i in range(1, 4):  # held: unacknowledged
        c.publish("held/x", b"x", qos=1, packet_id=i)
    assert c.packets() == []
    c.publish("held/x", b"x", qos=1, packet_id=4)
    (disconnect,) = c.packets()
    assert disconnect.type == mqtt.DISCONNECT
    assert disconnect.reason_code == mqtt.RECEIVE_MAXIMUM_EXCEEDED
    assert c.channel.state == ch.CLOSED and c.io.closed is True


# ---- interceptors and held acknowledgements -----------------------------------------------------


def test_acknowledgements_keep_the_order_behind_a_held_one(broker: Broker) -> None:
    c = Client(broker)
    c.connect("c")
    c.send(
        mqtt.encode_publish("held/1", b"a", qos=1, packet_id=1, version=5),
        mqtt.encode_publish("plain/2", b"b", qos=1, packet_id=2, version=5),
        mqtt.encode_publish("held/3", b"c", qos=1, packet_id=3, version=5),
    )
    assert c.packets() == []  # 2 is ready, but behind 1
    tokens = holder(broker).tokens
    c.channel.records_durable([tokens[1][1]])  # 3 is durable first: still behind 1
    assert c.packets() == []
    c.channel.records_durable([tokens[0][1]])
    assert [p.packet_id for p in c.packets()] == [1, 2, 3]


def test_taken_publishes_are_not_routed_and_refused_ones_are_denied(broker: Broker) -> None:
    sub, c = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("#", qos=1)
    c.connect("c")
    c.publish("taken/x", qos=1, packet_id=1)
    c.publish("refused/x", qos=1, packet_id=2)
    c.publish("plain/x", qos=1, packet_id=3)
    acks = c.packets()
    assert [(a.packet_id, a.reason_code) for a in acks] == [
        (1, mqtt.SUCCESS), (2, mqtt.NOT_AUTHORIZED), (3, mqtt.SUCCESS),
    ]
    assert [p.topic for p in sub.packets()] == ["plain/x"]


# ---- topic aliases ------------------------------------------------------------------------------


def test_topic_aliases_from_the_client(broker: Broker) -> None:
    sub, c = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("a/#", qos=0)
    c.connect("c")
    c.publish("a/long/topic", b"1", properties=mqtt.Properties(topic_alias=3))
    c.publish("", b"2", properties=mqtt.Properties(topic_alias=3))
    assert [(p.topic, bytes(p.payload)) for p in sub.packets()] == [
        ("a/long/topic", b"1"), ("a/long/topic", b"2"),
    ]
    c.publish("", b"3", properties=mqtt.Properties(topic_alias=4))  # never set
    (disconnect,) = c.packets()
    assert disconnect.reason_code == mqtt.PROTOCOL_ERROR


def test_a_topic_alias_over_the_maximum_is_0x94(broker: Broker) -> None:
    c = Client(broker)
    c.connect("c")
    big = broker.limits.topic_alias_maximum + 1
    c.publish("a/b", properties=mqtt.Properties(topic_alias=big))
    (disconnect,) = c.packets()
    assert disconnect.reason_code == mqtt.TOPIC_ALIAS_INVALID


def test_topic_aliases_to_the_client(broker: Broker) -> None:
    sub, c = Client(broker), Client(broker)
    sub.connect("sub", properties=mqtt.Properties(topic_alias_maximum=1))
    sub.subscribe("a/#", qos=0)
    c.connect("c")
    for topic in ("a/one", "a/one", "a/two"):
        c.publish(topic)
    got = [(p.topic, p.properties.topic_alias) for p in sub.packets()]
    assert got == [("a/one", 1), ("", 1), ("a/two", 1)]  # one alias: re-mapped


# ---- will, will delay, takeover -----------------------------------------------------------------


def _will(delay: int = 0) -> mqtt.Will:
    props = mqtt.Properties(will_delay_interval=delay) if delay else None
    return mqtt.Will("wills/c", b"gone", qos=1, properties=props)


def test_the_will_is_published_when_the_connection_is_lost(broker: Broker) -> None:
    sub, c = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("wills/#")
    c.connect("c", will=_will())
    c.channel.connection_lost("lost: reset")
    assert [bytes(p.payload) for p in sub.packets()] == [b"gone"]


def test_a_normal_disconnect_discards_the_will(broker: Broker) -> None:
    sub, c = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("wills/#")
    c.connect("c", will=_will())
    c.send(mqtt.Disconnect().encode(5))
    assert c.io.closed is False  # the client closes its side: nothing to drain
    c.channel.connection_lost("closed by the client")
    assert sub.packets() == []


def test_a_delayed_will_waits_for_the_sweep(broker: Broker) -> None:
    sub, c = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("wills/#")
    c.connect(
        "c", clean_start=False, will=_will(delay=5),
        properties=mqtt.Properties(session_expiry_interval=60),
    )
    c.channel.connection_lost("lost")
    broker.lifecycle.sweep(monotonic() + 1)
    assert sub.packets() == []
    broker.lifecycle.sweep(monotonic() + 6)
    assert [bytes(p.payload) for p in sub.packets()] == [b"gone"]


def test_a_reconnect_within_the_will_delay_cancels_the_will(broker: Broker) -> None:
    sub, c = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("wills/#")
    props = mqtt.Properties(session_expiry_interval=60)
    c.connect("c", clean_start=False, will=_will(delay=5), properties=props)
    c.channel.connection_lost("lost")
    again = Client(broker)
    assert again.connect("c", clean_start=False, properties=props).session_present
    broker.lifecycle.sweep(monotonic() + 6)
    assert sub.packets() == []


def test_takeover_disconnects_the_older_connection_with_0x8e(broker: Broker) -> None:
    sub, old = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("wills/#")
    props = mqtt.Properties(session_expiry_interval=60)
    old.connect("c", clean_start=False, will=_will(), properties=props)
    old.subscribe("x/#")
    new = Client(broker)
    connack = new.connect("c", clean_start=False, properties=props)
    assert connack.session_present
    (disconnect,) = old.packets()
    assert disconnect.reason_code == mqtt.SESSION_TAKEN_OVER
    assert old.channel.state == ch.CLOSED and old.io.closed is True
    assert [bytes(p.payload) for p in sub.packets()] == [b"gone"]  # its will
    assert broker.online["c"] is new.channel
    old.channel.connection_lost("closed")  # later: changes nothing for the new one
    assert broker.online["c"] is new.channel and "x/#" in broker.sessions["c"].subscriptions


# ---- malformed input ----------------------------------------------------------------------------


def test_a_malformed_packet_closes_with_0x81_and_keeps_what_came_before(broker: Broker) -> None:
    sub, c = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("t/#", qos=0)
    c.connect("c")
    # A whole PUBLISH, then a SUBSCRIBE with reserved flag bits wrong (malformed).
    c.send(mqtt.encode_publish("t/1", b"ok", version=5), b"\x80\x06\x00\x01\x00\x01t\x00")
    (disconnect,) = c.packets()
    assert disconnect.type == mqtt.DISCONNECT and disconnect.reason_code == mqtt.MALFORMED_PACKET
    assert [bytes(p.payload) for p in sub.packets()] == [b"ok"]
    assert c.channel.state == ch.CLOSED


def test_an_unsupported_protocol_version_gets_the_3_1_1_refusal(broker: Broker) -> None:
    c = Client(broker, version=4)
    frame = bytearray(mqtt.Connect("c", protocol_level=4).encode(4))
    frame[8] = 9  # protocol level 9
    c.send(bytes(frame))
    (connack,) = c.packets()
    assert connack.reason_code == ch.V4_REFUSED_PROTOCOL
    assert c.channel.state == ch.CLOSED


def test_a_second_connect_is_a_protocol_error(broker: Broker) -> None:
    c = Client(broker)
    c.connect("c")
    c.send(mqtt.Connect("c", protocol_level=5).encode(5))
    (disconnect,) = c.packets()
    assert disconnect.reason_code == mqtt.PROTOCOL_ERROR


# ---- flow control -------------------------------------------------------------------------------


def test_reading_resumes_only_when_every_reason_is_gone(broker: Broker) -> None:
    c = Client(broker)
    c.connect("c")
    c.channel.pause_reading("telemetry")
    c.channel.pause_reading("cluster")
    c.channel.resume_reading("telemetry")
    assert not c.io.reading and c.channel.read_holds == {"cluster"}
    c.channel.resume_reading("telemetry")  # again: no effect
    assert not c.io.reading
    c.channel.resume_reading("cluster")
    assert c.io.reading


def test_a_slow_subscriber_sheds_qos0_while_its_writes_are_paused(broker: Broker) -> None:
    sub, pub = Client(broker), Client(broker)
    sub.connect("sub")
    sub.subscribe("t/#", qos=1)
    pub.connect("pub")
    sub.channel.writing_paused()
    pub.publish("t/0", b"dropped", qos=0)
    pub.publish("t/1", b"kept", qos=1, packet_id=1)
    assert sub.packets() == []
    assert len(broker.sessions["sub"].queue) == 1
    sub.channel.writing_resumed()
    assert [bytes(p.payload) for p in sub.packets()] == [b"kept"]


def test_a_connection_the_client_ends_is_offline_before_its_transport_has_closed(
    broker: Broker,
) -> None:
    """A TLS transport lingers after close (close_notify both ways): messages routed meanwhile
    must queue in the session, not go to the closing connection (where a QoS 0 message is lost
    and a QoS 1 one counts as sent, to be resent later even when it has expired)."""
    sub, pub = Client(broker), Client(broker)
    props = mqtt.Properties(session_expiry_interval=60)
    sub.connect("sub", clean_start=False, properties=props)
    sub.subscribe("t/#", qos=1)
    sub.send(mqtt.Disconnect().encode(5))
    assert sub.io.closed is False  # closing; connection_lost comes later
    assert "sub" not in broker.online
    pub.connect("pub")
    pub.publish("t/1", b"queued", qos=1, packet_id=1)
    assert len(broker.sessions["sub"].queue) == 1 and not broker.sessions["sub"].outgoing


def test_a_connection_the_server_aborts_is_offline_at_once(broker: Broker) -> None:
    c = Client(broker)
    c.connect("c", clean_start=False, properties=mqtt.Properties(session_expiry_interval=60))
    c.channel.abort("test")
    assert "c" not in broker.online and "c" in broker.sessions


class SlowDevices:
    """A registry whose secret check blocks (as PBKDF2 does): the guard runs it on its thread."""

    def get(self, device_id: str) -> Any:
        return SimpleNamespace(password_hash=b"h-" + device_id.encode(), disabled=False)

    def verify(self, device_id: str, secret: bytes) -> bool:
        time.sleep(0.05)
        return secret == b"right"


@pytest.mark.parametrize(("password", "code"), [
    (b"right", mqtt.SUCCESS), (b"wrong", mqtt.BAD_USER_NAME_OR_PASSWORD),
])
def test_a_verdict_from_the_guards_thread_leaves_without_waiting_for_another_read(
    password: bytes, code: int
) -> None:
    """The CONNACK of a CONNECT decided off the loop goes out when the verdict comes, not at
    the next read of some other connection or the next sweep (up to half a second later)."""

    async def scenario() -> None:
        broker = make_broker()
        broker.registry = SlowDevices()  # type: ignore[assignment]
        try:
            c = Client(broker)
            c.send(mqtt.Connect("dev", protocol_level=5, username="dev",
                                password=password).encode(5))
            assert c.channel.state == ch.AUTHENTICATING
            for _ in range(200):
                await asyncio.sleep(0.005)
                if c.io.data:
                    break
            (connack,) = c.packets()  # no broker.flush() here: the verdict's own
            assert connack.reason_code == code
        finally:
            broker.guard.close()

    asyncio.run(scenario())


def test_reaches_anyone_says_whether_a_topic_has_a_subscriber_here(broker: Broker) -> None:
    """CoAP telemetry skips building an MQTT message when it would reach no one; it must not
    skip one that some subscription (exact, wildcard, shared, internal) would receive."""
    topic = "devices/d1/telemetry"
    assert not broker.reaches_anyone(topic)
    for topic_filter in ("devices/d1/telemetry", "devices/+/telemetry", "devices/#", "#",
                         "$share/g/devices/+/telemetry"):
        broker.add_subscription("c1", topic_filter, SubOptions(qos=1))
        assert broker.reaches_anyone(topic), topic_filter
        assert not broker.reaches_anyone("$SYS/x")  # wildcards do not match $ topics
        broker.remove_subscription("c1", topic_filter)
        assert not broker.reaches_anyone(topic), topic_filter
    unsubscribe = broker.subscribe_internal("devices/+/telemetry", lambda message: None)
    assert broker.reaches_anyone(topic)
    unsubscribe()
    assert not broker.reaches_anyone(topic)
    broker.add_subscription("c1", "devices/d2/telemetry", SubOptions(qos=1))
    assert not broker.reaches_anyone(topic)
