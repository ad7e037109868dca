"""MqttChannel: the MQTT 3.1.1/5.0 protocol state machine of one client.

Decoded packets come in (`received`); frames to send collect in `out` and leave through the
channel's `ChannelIO` (a transport: TCP, TLS or WebSocket) when the broker flushes; the other
effects are calls on the broker, the session lifecycle (`gateway/mqtt/sessions.py`) and the
publish interceptors `app.py` registers. There is no socket, task, future or timer in here:
waiting (for a secret check, a cluster claim, a durable record) is a state, and whoever the
channel waits for calls it back. Timeouts are the sessions' sweep.

States: AWAITING_CONNECT -> AUTHENTICATING (a secret checked off the loop) -> CLAIMING (the
client id claimed, in a cluster) -> CONNECTED -> CLOSING (the last frames are queued) -> CLOSED
(the transport closes or closed; nothing more goes out). Packets that arrive while the CONNECT
is being decided wait in the channel, and reading from the client is paused meanwhile.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from gateway import guard
from gateway._native import mqtt
from gateway.auth import valid_device_id
from gateway.mqtt.ratelimit import PublishBucket
from gateway.mqtt.session import (
    AWAIT_PUBACK,
    AWAIT_PUBCOMP,
    AWAIT_PUBREC,
    NEVER_EXPIRES,
    Delivery,
    Message,
    Session,
    SubOptions,
    monotonic,
)

if TYPE_CHECKING:
    from gateway.mqtt.broker import Broker

# The channel's states.
AWAITING_CONNECT = 0
AUTHENTICATING = 1
CLAIMING = 2
CONNECTED = 3
CLOSING = 4
CLOSED = 5
STATE_NAMES = {
    AWAITING_CONNECT: "awaiting CONNECT",
    AUTHENTICATING: "authenticating",
    CLAIMING: "claiming",
    CONNECTED: "connected",
    CLOSING: "closing",
    CLOSED: "closed",
}

# MQTT 3.1.1 CONNACK return codes (5.0 uses reason codes).
V4_REFUSED_PROTOCOL = 1
V4_REFUSED_IDENTIFIER = 2
V4_SERVER_UNAVAILABLE = 3
V4_BAD_CREDENTIALS = 4
V4_NOT_AUTHORIZED = 5

CONNECTING = "connecting"  # a reason to pause reading: the CONNECT is not decided yet
CLIENT_DISCONNECT = "DISCONNECT from the client"

# What a publish interceptor decides about a PUBLISH.
ROUTE = 0  # route it to subscribers as usual
TAKEN = 1  # the interceptor took it: it is not routed
REFUSED = 2  # not allowed: refused like an ACL denial

# A guard's verdict -> (MQTT 5 reason code, 3.1.1 return code), and its name in metrics.
_REFUSALS = {
    guard.DENIED: (mqtt.BAD_USER_NAME_OR_PASSWORD, V4_BAD_CREDENTIALS),
    guard.THROTTLED: (mqtt.BANNED, V4_NOT_AUTHORIZED),
    guard.BUSY: (mqtt.SERVER_BUSY, V4_SERVER_UNAVAILABLE),
    guard.UNAVAILABLE: (mqtt.SERVER_UNAVAILABLE, V4_SERVER_UNAVAILABLE),
    guard.DISABLED: (mqtt.NOT_AUTHORIZED, V4_NOT_AUTHORIZED),
}
_REFUSAL_NAMES = {
    guard.DENIED: "bad_credentials",
    guard.THROTTLED: "throttled",
    guard.BUSY: "busy",
    guard.UNAVAILABLE: "registry_unavailable",
    guard.DISABLED: "device_disabled",
}


class ChannelIO(Protocol):
    """What a channel needs of its transport."""

    def write(self, data: bytearray) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self, graceful: bool) -> None:
        """Close after what was written. `graceful`: the server ends the connection with a
        reason code: shut the sending side and read and drop what the client still sends for
        a short time, so that it reads the reason instead of a reset."""


class PublishInterceptor(Protocol):
    """Something that sees every allowed PUBLISH before it is routed (telemetry, shadows).
    It may hold the PUBLISH's acknowledgement (`channel.hold_ack()`) until it calls
    `channel.records_durable([token])`."""

    # The topics it looks at start with this (the others skip it: no call per PUBLISH).
    prefix: str

    def on_publish(self, channel: MqttChannel, message: Message) -> int:
        """ROUTE, TAKEN or REFUSED."""

    def forget(self, channel: MqttChannel) -> None:
        """The channel is closed: drop any reference to it."""


class ProtocolViolation(Exception):
    """A well-formed packet that breaks the protocol in this state: close with this reason."""

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


@dataclass(slots=True)
class OpenRequest:
    """A CONNECT whose client id and identity are settled: what the session lifecycle needs."""

    client_id: str
    identity: str
    anonymous: bool
    clean_start: bool
    expiry: int
    version: int


class MqttChannel:
    def __init__(
        self,
        broker: Broker,
        io: ChannelIO,
        *,
        peer: str = "?",
        peer_host: str = "?",
        cert_identity: str | None = None,
    ) -> None:
        self.broker = broker
        self.io = io
        self.peer = peer
        self.peer_host = peer_host
        self.cert_identity = cert_identity  # device id from a verified TLS client certificate
        self.state = AWAITING_CONNECT
        self.session: Session | None = None
        self.version = 0
        self.keep_alive = 0
        self.accepted_at = monotonic()
        self.last_received = self.accepted_at
        self.out = bytearray()
        self.will: Message | None = None
        self.will_delay = 0
        self.client_max_packet = 0  # 0: no limit announced
        self.aliases_in: dict[int, str] = {}
        # Topic aliases we assign to outgoing topics, up to the client's Topic Alias Maximum,
        # least recently used first to be re-mapped when they run out (5.0 3.3.2.3.4).
        self.alias_max_out = 0
        self.aliases_out: OrderedDict[str, int] = OrderedDict()
        self.anonymous = False  # connected without credentials
        self.close_reason = ""  # why the connection ended, for the event log
        self.paused = False  # the transport's write buffer is over its high-water mark
        # Why reading is paused (telemetry backlog, a cluster node behind, a CONNECT being
        # decided, ...): reading resumes only once no reason is left.
        self._read_holds: set[str] = set()
        # Per-client publish limits (ratelimit.py; None: no limit).
        self.rate = PublishBucket.for_limits(
            broker.limits.max_publish_rate, broker.limits.max_publish_bytes_rate
        )
        # Acknowledgements leave in the order the PUBLISHes came (3.1.1 4.6, 5.0 4.6); one an
        # interceptor holds (until its record is durable) holds back the ones behind it.
        # Entries: [packet type, packet id, reason code, ready].
        self._acks: deque[list[int]] = deque()
        self._incoming = 0  # packet id of the QoS 1/2 PUBLISH at hand, until acknowledged
        self._incoming_qos = 0
        self._waiting: list[Any] = []  # packets behind a CONNECT that is being decided
        self._connect: mqtt.Connect | None = None  # that CONNECT
        self._assigned = False  # its client id was assigned by us
        broker.connecting.add(self)

    def __repr__(self) -> str:
        client = self.session.client_id if self.session is not None else "-"
        return f"<MqttChannel {client} {self.peer} {STATE_NAMES[self.state]}>"

    # ---- input -------------------------------------------------------------------------------

    def received(self, packets: list[Any]) -> None:
        """The packets of one read, in order."""
        self.last_received = monotonic()
        state = self.state
        if state == CONNECTED:
            self._handle(packets)
        elif state in (AUTHENTICATING, CLAIMING):
            self._keep(packets)
        elif state == AWAITING_CONNECT:
            self._handle(packets)

    def malformed(self, exc: mqtt.MqttError) -> None:
        """The framer refused the stream; `exc.packets` are the whole packets before the fault."""
        self.received(exc.packets)
        if self.state == AWAITING_CONNECT and exc.reason_code == mqtt.UNSUPPORTED_PROTOCOL_VERSION:
            # Answered in the 3.1.1 form every client version can read (3.1.1 3.1.2.2).
            self._send(mqtt.Connack(reason_code=V4_REFUSED_PROTOCOL).encode(4))
        self.close_with(exc.reason_code, str(exc))

    def connection_lost(self, why: str) -> None:
        """The transport is gone."""
        broker = self.broker
        if self.session is not None:
            reason = self.close_reason or why
            broker.events.disconnected("mqtt", self.session.client_id, self.peer, reason)
        self.state = CLOSED
        self.out.clear()
        for interceptor in broker.interceptors:
            interceptor.forget(self)
        if broker.cluster is not None:
            broker.cluster.forget(self)
        will, self.will = self.will, None
        broker.lifecycle.detach(self, will, self.will_delay)
        broker.flush()

    def writing_paused(self) -> None:
        self.paused = True

    def writing_resumed(self) -> None:
        self.paused = False
        if self.state == CONNECTED:
            self._drain_queue()
            self.broker.flush()

    # ---- flow control: the one owner of pausing reading from this client ------------------

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client until `resume_reading(reason)`; no owner of a reason
        undoes another's."""
        if not self._read_holds and self.state != CLOSED:
            self.io.pause_reading()
        self._read_holds.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._read_holds:
            return
        self._read_holds.discard(reason)
        if not self._read_holds and self.state != CLOSED:
            self.io.resume_reading()

    @property
    def read_holds(self) -> frozenset[str]:
        return frozenset(self._read_holds)

    # ---- output ------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self.out += data
        self.broker.mark_dirty(self)

    def flush(self) -> None:
        """Hand what collected to the transport (the broker calls this once per read)."""
        if self.state == CLOSED:
            self.out.clear()
            return
        if self.out:
            data, self.out = self.out, bytearray()
            self.broker.metrics.bytes_out += len(data)
            self.io.write(data)
        if self.state == CLOSING:
            self._closed()
            self.io.close(self.close_reason != CLIENT_DISCONNECT)

    def _closed(self) -> None:
        """Nothing more goes out. The session ends its use of this connection now (the will,
        if any is left, is published), not once the transport has closed: a TLS transport
        lingers for the close_notify exchange, and a client may never close its side."""
        self.state = CLOSED
        self.out.clear()
        will, self.will = self.will, None
        self.broker.lifecycle.detach(self, will, self.will_delay)

    def close_with(self, reason_code: int, why: str) -> None:
        """End the connection for a reason: MQTT 5 gets a DISCONNECT carrying it (the will is
        published, as for any close that is not a normal DISCONNECT from the client)."""
        if self.state >= CLOSING:
            return
        self.close_reason = f"0x{reason_code:02x} {why}"
        self.broker.metrics.protocol_errors.labels(f"0x{reason_code:02x}").inc()
        if self.version == 5 and self.state == CONNECTED:
            props = mqtt.Properties()
            props.reason_string = why[:200]
            self._send(mqtt.Disconnect(reason_code=reason_code, properties=props).encode(5))
        self._closing()

    def abort(self, why: str) -> None:
        """Close at once, without a reason code (no CONNECT in time, taken over meanwhile)."""
        if self.state == CLOSED:
            return
        self.close_reason = why
        self._closed()
        self.io.close(False)

    def _closing(self) -> None:
        self.state = CLOSING
        self._waiting.clear()
        self.broker.mark_dirty(self)

    # ---- packets -----------------------------------------------------------------------------

    def _handle(self, packets: list[Any]) -> None:
        counts = self.broker.metrics.packets_in
        handlers = self._HANDLERS
        for i, packet in enumerate(packets):
            state = self.state
            if state != CONNECTED:
                if state == AWAITING_CONNECT:
                    counts[packet.type] += 1
                    if packet.type != mqtt.CONNECT:
                        self.close_with(mqtt.PROTOCOL_ERROR, "first packet is not CONNECT")
                        return
                    self._on_connect(packet)
                    continue
                if state in (AUTHENTICATING, CLAIMING):
                    self._keep(packets[i:])
                return  # closing: the rest is not read
            counts[packet.type] += 1
            handler = handlers.get(packet.type)
            try:
                if handler is None:
                    name = mqtt.PACKET_NAMES[packet.type]
                    raise ProtocolViolation(mqtt.PROTOCOL_ERROR, f"{name} from a client")
                handler(self, packet)
            except ProtocolViolation as exc:
                self.close_with(exc.reason_code, str(exc))

    def _keep(self, packets: list[Any]) -> None:
        """Keep packets for after CONNECT; a PUBLISH payload may be a view of the read buffer."""
        self._waiting.extend(p.detach() if p.type == mqtt.PUBLISH else p for p in packets)

    # -- CONNECT

    def _connack(self, reason: int, properties: Any = None, present: bool = False) -> None:
        self._send(
            mqtt.Connack(session_present=present, reason_code=reason, properties=properties).encode(
                self.version
            )
        )

    def refuse(self, v5_reason: int, v4_code: int, why: str, client_id: str = "") -> None:
        """Answer the CONNECT with a refusal and close."""
        if self.state >= CLOSING:
            return
        self.broker.metrics.auth_failures.labels(why).inc()
        self.broker.events.refused("mqtt", client_id, self.peer, why)
        self._connack(v5_reason if self.version == 5 else v4_code)
        self.close_reason = f"refused: {why}"
        self._closing()

    def _on_connect(self, c: mqtt.Connect) -> None:
        broker = self.broker
        self.version = 5 if c.protocol_level == 5 else 4
        client_id: str = c.client_id
        self._assigned = False
        if not client_id:
            if self.version == 4 and not c.clean_start:
                self.refuse(
                    mqtt.CLIENT_IDENTIFIER_NOT_VALID, V4_REFUSED_IDENTIFIER, "empty_client_id"
                )
                return
            client_id = "auto-" + secrets.token_hex(8)
            self._assigned = True
        self._connect = c
        if broker.guard.bans.banned((f"id:{client_id}", f"addr:{self.peer_host}")):
            self.refuse(mqtt.BANNED, V4_NOT_AUTHORIZED, "banned", client_id)  # gateway/admin.py
            return

        # Authentication: a verified client certificate, registry credentials, else anonymous
        # when allowed. Secrets are checked by the guard: at once when it knows the answer,
        # else off the event loop, while this client's further packets wait unread.
        if self.cert_identity is not None:
            self._authenticated(client_id, self.cert_identity)
        elif c.username is not None and broker.registry is not None:
            user: str = c.username
            password = bytes(c.password or b"")
            keys = (f"id:{client_id}", f"user:{user}", f"addr:{self.peer_host}")
            verdict = broker.lifecycle.check_secret(
                user, password, keys, lambda v: self.checked(client_id, user, v)
            )
            if verdict is None:
                self.state = AUTHENTICATING
                self.pause_reading(CONNECTING)
            else:
                self.checked(client_id, user, verdict)
        elif not broker.allow_anonymous:
            self.refuse(mqtt.NOT_AUTHORIZED, V4_NOT_AUTHORIZED, "anonymous", client_id)
        else:
            self._authenticated(client_id, None)

    def checked(self, client_id: str, user: str, verdict: str) -> None:
        """The guard's verdict on the CONNECT's secret (now, or after the read that brought it)."""
        if self.state >= CLOSING:
            return  # the client left meanwhile
        if verdict == guard.OK:
            self._authenticated(client_id, user)
        else:
            v5, v4 = _REFUSALS[verdict]
            self.refuse(v5, v4, _REFUSAL_NAMES[verdict], client_id)
        self._continue()

    def _authenticated(self, client_id: str, identity: str | None) -> None:
        """`identity`: the device or service account the client proved to be; None for an
        anonymous client, which acts as the device its client id names, unless that is a
        registered device or a service account: no one acts as those without their secret."""
        broker = self.broker
        acl = broker.acl
        anonymous = self.anonymous = identity is None
        if identity is None:
            identity = client_id
        if acl.mode == "device" and not valid_device_id(identity):
            why = "client_id_invalid" if anonymous else "identity_invalid"
            self.refuse(mqtt.CLIENT_IDENTIFIER_NOT_VALID, V4_REFUSED_IDENTIFIER, why, client_id)
            return
        if anonymous or identity != client_id:
            # A client id that is not the client's own must not be someone else's either: a
            # registered device's or a service account's (taking it would kick that one).
            try:
                taken = acl.is_service(client_id) or broker.registered(client_id)
            except ValueError:  # the registry is unreadable (it says so): not the client's fault
                self.refuse(
                    mqtt.SERVER_UNAVAILABLE, V4_SERVER_UNAVAILABLE, "registry_unavailable",
                    client_id,
                )
                return
            if taken:
                self.refuse(mqtt.NOT_AUTHORIZED, V4_NOT_AUTHORIZED, "client_id_taken", client_id)
                return
        if identity != client_id and acl.mode == "device" and not acl.is_service(identity):
            self.refuse(
                mqtt.CLIENT_IDENTIFIER_NOT_VALID, V4_REFUSED_IDENTIFIER, "client_id_mismatch",
                client_id,
            )
            return
        c = self._connect
        assert c is not None
        expiry = 0
        if self.version == 5:
            expiry = (c.properties.session_expiry_interval or 0) if c.properties else 0
        elif not c.clean_start:
            expiry = NEVER_EXPIRES
        request = OpenRequest(client_id, identity, anonymous, c.clean_start, expiry, self.version)
        if broker.lifecycle.open(self, request):
            return  # opened (or refused) already
        # In a cluster the client id is claimed first: CONNACK waits for the other nodes.
        self.state = CLAIMING
        self.pause_reading(CONNECTING)

    def claim_failed(self) -> None:
        self.refuse(mqtt.SERVER_UNAVAILABLE, V4_SERVER_UNAVAILABLE, "cluster_unavailable")
        self._continue()

    def opened(self, session: Session, present: bool) -> None:
        """The session lifecycle gave this client its session: the rest of CONNECT."""
        broker = self.broker
        c = self._connect
        assert c is not None
        self._connect = None
        self.session = session
        props = c.properties if self.version == 5 else None
        if props is not None:
            if props.receive_maximum:
                session.send_quota = props.receive_maximum
            self.client_max_packet = props.maximum_packet_size or 0
            self.alias_max_out = props.topic_alias_maximum or 0
        self.keep_alive = c.keep_alive
        server_keep_alive = None
        limit = broker.limits.max_keep_alive
        if limit < 65535 and (c.keep_alive == 0 or c.keep_alive > limit):
            self.keep_alive = limit
            if self.version == 5:  # Server Keep Alive (5.0 3.2.2.3.14); 3.1.1 cannot be told
                server_keep_alive = limit
        if c.will is not None:
            self.will = self._will_message(c.will, session)
            if c.will.properties is not None:
                self.will_delay = c.will.properties.will_delay_interval or 0
        self.state = CONNECTED
        broker.metrics.connects.inc()
        ack_props = None
        if self.version == 5:
            ack_props = mqtt.Properties()
            ack_props.receive_maximum = broker.limits.receive_maximum
            ack_props.maximum_packet_size = broker.limits.max_packet_size
            ack_props.topic_alias_maximum = broker.limits.topic_alias_maximum
            ack_props.retain_available = 1
            ack_props.wildcard_subscription_available = 1
            ack_props.subscription_identifier_available = 1
            ack_props.shared_subscription_available = 1
            if self._assigned:
                ack_props.assigned_client_identifier = session.client_id
            if server_keep_alive is not None:
                ack_props.server_keep_alive = server_keep_alive
        self._connack(mqtt.SUCCESS, ack_props, present)
        broker.events.connected(
            "mqtt", session.client_id, self.peer, identity=session.identity,
            version=self.version, session_present=present, keep_alive=self.keep_alive,
        )
        self._resume_session()
        self._continue()

    def _continue(self) -> None:
        """After a CONNECT decided later than its read: handle what came behind it."""
        if self.state in (AUTHENTICATING, CLAIMING):
            return  # still deciding
        waiting, self._waiting = self._waiting, []
        self.resume_reading(CONNECTING)
        if waiting and self.state == CONNECTED:
            self._handle(waiting)
        self.broker.mark_dirty(self)

    def _will_message(self, will: mqtt.Will, session: Session) -> Message | None:
        if not self.broker.acl.can_publish(session.identity, will.topic):
            self.broker.metrics.acl_denials.labels("will").inc()
            self.broker.events.denied("mqtt", session.client_id, self.peer, "will", will.topic)
            return None
        return Message(
            will.topic,
            bytes(will.payload),
            will.qos,
            will.retain,
            application_properties(will.properties),
            _expiry(will.properties),
            session.client_id,
        )

    def _resume_session(self) -> None:
        """Resend what was in flight (PUBLISH with DUP, or PUBREL), then drain the queue."""
        session = self.session
        assert session is not None
        for packet_id, delivery in session.outgoing.items():
            if delivery.state == AWAIT_PUBCOMP:
                self._send(mqtt.encode_ack(mqtt.PUBREL, packet_id, 0, self.version))
            else:
                delivery.dup = True
                self._write_publish(delivery, packet_id)
        self._drain_queue()

    # -- messages to the client

    def _drain_queue(self) -> None:
        session = self.session
        assert session is not None
        now = monotonic()
        while session.queue and session.can_send_now() and not self.paused:
            delivery = session.queue.popleft()
            if delivery.message.expired(now):
                self.broker.metrics.dropped.labels("expired").inc()
                continue
            self.send_publish(delivery)

    def send_publish(self, delivery: Delivery) -> None:
        """Send one delivery now (the broker checked the send quota for QoS > 0)."""
        session = self.session
        assert session is not None
        if delivery.qos == 0:
            if self.paused:  # slow consumer: shed QoS 0, never buffer without bound
                self.broker.metrics.dropped.labels("slow_consumer_qos0").inc()
                return
            self._write_publish(delivery, 0)
            return
        packet_id = session.next_packet_id()
        delivery.state = AWAIT_PUBACK if delivery.qos == 1 else AWAIT_PUBREC
        session.outgoing[packet_id] = delivery
        self.broker.metrics.inflight.inc()
        self._write_publish(delivery, packet_id)

    def _write_publish(self, delivery: Delivery, packet_id: int) -> None:
        message = delivery.message
        props = None
        topic = message.topic
        if self.version == 5:
            props = _outgoing_properties(message, delivery.subscription_ids)
            if self.alias_max_out:
                topic, props = self._alias(topic, props)
        start = len(self.out)
        mqtt.encode_publish_into(
            self.out,
            topic,
            message.payload,
            qos=delivery.qos,
            retain=delivery.retain,
            dup=delivery.dup,
            packet_id=packet_id,
            properties=props,
            version=self.version,
        )
        if self.client_max_packet and len(self.out) - start > self.client_max_packet:
            # Larger than the client accepts: it must not be sent (5.0 3.1.2.25).
            del self.out[start:]
            self.broker.metrics.dropped.labels("too_large_for_client").inc()
            if packet_id and self.session is not None:
                self.session.outgoing.pop(packet_id, None)
                self.broker.metrics.inflight.dec()
            return
        self.broker.metrics.packets_out[mqtt.PUBLISH] += 1
        self.broker.mark_dirty(self)

    def _alias(self, topic: str, props: mqtt.Properties | None) -> tuple[str, mqtt.Properties]:
        """(topic to send, properties) with a topic alias: the topic itself goes only with
        the first use of an alias, later messages carry the alias and an empty topic."""
        if props is None:
            props = mqtt.Properties()
        aliases = self.aliases_out
        alias = aliases.get(topic)
        if alias is not None:
            aliases.move_to_end(topic)
            props.topic_alias = alias
            return "", props
        if len(aliases) < self.alias_max_out:
            alias = len(aliases) + 1
        else:
            _, alias = aliases.popitem(last=False)
        aliases[topic] = alias
        props.topic_alias = alias
        return topic, props

    # -- PUBLISH from the client

    def _on_publish(self, p: mqtt.Publish) -> None:
        session = self.session
        assert session is not None
        broker = self.broker
        props = p.properties if self.version == 5 else None
        topic: str = p.topic
        if props is not None and props.topic_alias is not None:
            alias = props.topic_alias
            if alias > broker.limits.topic_alias_maximum:
                raise ProtocolViolation(mqtt.TOPIC_ALIAS_INVALID, f"topic alias {alias} too big")
            if topic:
                self.aliases_in[alias] = topic
            else:
                known = self.aliases_in.get(alias)
                if known is None:
                    raise ProtocolViolation(mqtt.PROTOCOL_ERROR, f"unknown topic alias {alias}")
                topic = known
        qos = p.qos
        packet_id = p.packet_id
        if qos == 2 and packet_id in session.incoming_qos2:
            # A resent QoS 2 PUBLISH we already have: acknowledge again, deliver nothing.
            self._ack(mqtt.PUBREC, packet_id, 0)
            return
        if qos and len(session.incoming_qos2) + len(self._acks) >= broker.limits.receive_maximum:
            raise ProtocolViolation(mqtt.RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded")
        verdict = REFUSED
        if broker.acl.can_publish(session.identity, topic):
            if props is None:
                message = Message(topic, p.payload, qos, p.retain, None, None, session.client_id)
            else:
                message = Message(
                    topic, p.payload, qos, p.retain, application_properties(props),
                    _expiry(props), session.client_id,
                )
            verdict = ROUTE
            self._incoming = packet_id if qos else 0
            self._incoming_qos = qos
            if topic.startswith(broker.intercepted):
                for interceptor in broker.interceptors:
                    if topic.startswith(interceptor.prefix):
                        verdict = interceptor.on_publish(self, message)
                        if verdict != ROUTE:
                            break
        if verdict == REFUSED:
            self._incoming = 0
            broker.metrics.acl_denials.labels("publish").inc()
            broker.events.denied("mqtt", session.client_id, self.peer, "publish", topic)
            if qos:
                reason = mqtt.NOT_AUTHORIZED if self.version == 5 else 0
                self._ack(mqtt.PUBACK if qos == 1 else mqtt.PUBREC, packet_id, reason)
            return
        if qos == 2:
            session.incoming_qos2.add(packet_id)
        reason = mqtt.SUCCESS
        if verdict == ROUTE:
            reached = broker.publish(message)
            cluster = broker.cluster
            if cluster is not None and cluster.blocked:  # another node is behind: wait for it
                cluster.hold(self)
            if not reached and self.version == 5:
                reason = mqtt.NO_MATCHING_SUBSCRIBERS
        if self._incoming:  # no interceptor holds the acknowledgement
            self._incoming = 0
            self._ack(mqtt.PUBACK if qos == 1 else mqtt.PUBREC, packet_id, reason)

    def hold_ack(self) -> list[int] | None:
        """For an interceptor, during `on_publish`: hold the acknowledgement of the PUBLISH at
        hand until `records_durable([token])`; None for QoS 0 (nothing to acknowledge)."""
        packet_id, self._incoming = self._incoming, 0
        if not packet_id:
            return None
        ack_type = mqtt.PUBACK if self._incoming_qos == 1 else mqtt.PUBREC
        entry = [ack_type, packet_id, mqtt.SUCCESS, 0]
        self._acks.append(entry)
        return entry

    def _ack(self, packet_type: int, packet_id: int, reason: int) -> None:
        if self._acks:  # behind one that is held: keep the order
            self._acks.append([packet_type, packet_id, reason, 1])
        else:
            mqtt.encode_ack_into(self.out, packet_type, packet_id, reason, self.version)
            self.broker.mark_dirty(self)

    def records_durable(self, tokens: list[Any]) -> None:
        """Held acknowledgements may go (their records are durable): release them, in order."""
        for entry in tokens:
            entry[3] = 1
        if self.state == CLOSED:
            return
        acks = self._acks
        while acks and acks[0][3]:
            packet_type, packet_id, reason, _ = acks.popleft()
            mqtt.encode_ack_into(self.out, packet_type, packet_id, reason, self.version)
        self.broker.mark_dirty(self)
        self.broker.flush()

    def _on_pubrel(self, p: mqtt.Ack) -> None:
        assert self.session is not None
        if p.packet_id in self.session.incoming_qos2:
            self.session.incoming_qos2.discard(p.packet_id)
            reason = mqtt.SUCCESS
        else:
            reason = mqtt.PACKET_IDENTIFIER_NOT_FOUND if self.version == 5 else 0
        self._ack(mqtt.PUBCOMP, p.packet_id, reason)

    # -- acknowledgements of what we sent

    def _release(self, packet_id: int) -> None:
        assert self.session is not None
        if self.session.outgoing.pop(packet_id, None) is not None:
            self.broker.metrics.inflight.dec()
            self.broker.changed()
            self._drain_queue()

    def _on_puback(self, p: mqtt.Ack) -> None:
        self._release(p.packet_id)

    def _on_pubrec(self, p: mqtt.Ack) -> None:
        assert self.session is not None
        delivery = self.session.outgoing.get(p.packet_id)
        if delivery is None:
            if self.version == 5:
                self._send(
                    mqtt.encode_ack(mqtt.PUBREL, p.packet_id, mqtt.PACKET_IDENTIFIER_NOT_FOUND, 5)
                )
            return
        if p.reason_code >= 0x80:  # the client refused it: the flow ends here (5.0 4.3.3)
            self._release(p.packet_id)
            return
        delivery.state = AWAIT_PUBCOMP
        self._send(mqtt.encode_ack(mqtt.PUBREL, p.packet_id, 0, self.version))

    def _on_pubcomp(self, p: mqtt.Ack) -> None:
        self._release(p.packet_id)

    # -- subscriptions

    def _on_subscribe(self, p: mqtt.Subscribe) -> None:
        session = self.session
        assert session is not None
        broker = self.broker
        identifier = None
        if self.version == 5 and p.properties is not None and p.properties.subscription_identifiers:
            identifier = p.properties.subscription_identifiers[0]
        codes: list[int] = []
        retained: list[tuple[Message, SubOptions]] = []
        for sub in p.subscriptions:
            topic_filter: str = sub.topic_filter
            shared = mqtt.parse_shared(topic_filter)
            acl_filter = topic_filter if shared is None else shared[1]
            if not broker.acl.can_subscribe(session.identity, acl_filter):
                broker.metrics.acl_denials.labels("subscribe").inc()
                broker.events.denied(
                    "mqtt", session.client_id, self.peer, "subscribe", topic_filter
                )
                codes.append(mqtt.NOT_AUTHORIZED if self.version == 5 else 0x80)
                continue
            opts = SubOptions(
                min(sub.qos, 2),
                sub.no_local,
                sub.retain_as_published,
                sub.retain_handling,
                identifier,
            )
            is_new = broker.add_subscription(session.client_id, topic_filter, opts)
            session.subscriptions[topic_filter] = opts
            codes.append(opts.qos)
            if shared is not None:
                continue  # no retained messages for a shared subscription (5.0 4.8.2)
            if opts.retain_handling == 0 or (opts.retain_handling == 1 and is_new):
                retained.extend((m, opts) for m in broker.retained_for(topic_filter))
        broker.changed()
        self._send(mqtt.Suback(packet_id=p.packet_id, reason_codes=codes).encode(self.version))
        for message, opts in retained:
            ids = (opts.identifier,) if opts.identifier else ()
            broker.deliver(session, Delivery(message, min(opts.qos, message.qos), True, ids))

    def _on_unsubscribe(self, p: mqtt.Unsubscribe) -> None:
        session = self.session
        assert session is not None
        codes = []
        for topic_filter in p.topic_filters:
            removed = self.broker.remove_subscription(session.client_id, topic_filter)
            session.subscriptions.pop(topic_filter, None)
            codes.append(mqtt.SUCCESS if removed else mqtt.NO_SUBSCRIPTION_EXISTED)
        self.broker.changed()
        ack = mqtt.Unsuback(packet_id=p.packet_id, reason_codes=codes if self.version == 5 else [])
        self._send(ack.encode(self.version))

    # -- the rest

    def _on_pingreq(self, p: mqtt.Packet) -> None:
        self._send(mqtt.PINGRESP_FRAME)

    def _on_disconnect(self, p: mqtt.Disconnect) -> None:
        session = self.session
        assert session is not None
        if self.version == 5:
            props = p.properties
            if props is not None and props.session_expiry_interval is not None:
                if session.expiry_interval == 0 and props.session_expiry_interval != 0:
                    raise ProtocolViolation(
                        mqtt.PROTOCOL_ERROR, "session expiry set at DISCONNECT after 0 at CONNECT"
                    )
                session.expiry_interval = props.session_expiry_interval
        if not (self.version == 5 and p.reason_code == mqtt.DISCONNECT_WITH_WILL_MESSAGE):
            self.will = None  # a normal DISCONNECT discards the will
        self.close_reason = CLIENT_DISCONNECT  # it closes its side itself: nothing to drain
        self._closing()

    def _on_auth(self, p: mqtt.Auth) -> None:
        raise ProtocolViolation(
            mqtt.BAD_AUTHENTICATION_METHOD, "enhanced authentication unsupported"
        )

    _HANDLERS: ClassVar[dict[int, Any]] = {
        mqtt.PUBLISH: _on_publish,
        mqtt.PUBACK: _on_puback,
        mqtt.PUBREC: _on_pubrec,
        mqtt.PUBREL: _on_pubrel,
        mqtt.PUBCOMP: _on_pubcomp,
        mqtt.SUBSCRIBE: _on_subscribe,
        mqtt.UNSUBSCRIBE: _on_unsubscribe,
        mqtt.PINGREQ: _on_pingreq,
        mqtt.DISCONNECT: _on_disconnect,
        mqtt.AUTH: _on_auth,
    }


_FORWARDED = (
    "payload_format_indicator",
    "content_type",
    "response_topic",
    "correlation_data",
)


def application_properties(props: mqtt.Properties | None) -> mqtt.Properties | None:
    """The properties a subscriber must receive unchanged (5.0 3.3.2.3), or None."""
    if props is None:
        return None
    if not props.user_properties and all(getattr(props, n) is None for n in _FORWARDED):
        return None
    kept = mqtt.Properties()
    for name in _FORWARDED:
        setattr(kept, name, getattr(props, name))
    kept.user_properties = list(props.user_properties or ())
    return kept


def _expiry(props: mqtt.Properties | None) -> float | None:
    if props is None or props.message_expiry_interval is None:
        return None
    return monotonic() + float(props.message_expiry_interval)


def _outgoing_properties(
    message: Message, subscription_ids: tuple[int, ...]
) -> mqtt.Properties | None:
    if message.properties is None and not subscription_ids and message.expires_at is None:
        return None
    props = mqtt.Properties()
    if message.properties is not None:
        for name in _FORWARDED:
            setattr(props, name, getattr(message.properties, name))
        props.user_properties = list(message.properties.user_properties)
    if subscription_ids:
        props.subscription_identifiers = list(subscription_ids)
    if message.expires_at is not None:
        props.message_expiry_interval = max(0, int(message.expires_at - monotonic()))
    return props
