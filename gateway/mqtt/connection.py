"""One MQTT connection: an `asyncio.BufferedProtocol` over the native framer.

The transport reads straight into the framer's buffer (`get_buffer`), `buffer_updated` decodes
every whole frame of that read in one native call, the packets are handled in order, and all
replies of the read (to this connection and to the subscribers it published to) leave in one
write per connection. No per-message timers or tasks: timeouts are the broker's sweep.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict, deque
from typing import Any, ClassVar, cast

from gateway import guard
from gateway._native import mqtt
from gateway.auth import valid_device_id
from gateway.mqtt.broker import Broker
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
from gateway.shadows import parse_request_topic
from gateway.telemetry.records import Record, classify_topic

log = logging.getLogger("iotgw.mqtt")

# MQTT 3.1.1 CONNACK return codes (5.0 uses reason codes).
V4_REFUSED_PROTOCOL = 1
V4_REFUSED_IDENTIFIER = 2
V4_BAD_CREDENTIALS = 4
V4_SERVER_UNAVAILABLE = 3
V4_NOT_AUTHORIZED = 5

CONNECTING = "connecting"  # a reason to pause reading: the CONNECT is not decided yet
_CLIENT_DISCONNECT = "DISCONNECT from the client"
DRAIN_SECONDS = 2.0  # how long a connection the server ends is read (and dropped) at most
_DISCARD_BYTES = 16384

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


class ProtocolViolation(Exception):
    """A well-formed packet that breaks the protocol in this state: close with this reason."""

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class MqttConnection(asyncio.BufferedProtocol):
    def __init__(self, broker: Broker, arena: Any) -> None:
        self.broker = broker
        self.framer = mqtt.Framer(arena, max_packet_size=broker.limits.max_packet_size)
        self.transport: asyncio.Transport | None = None
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
        self.peer = ""
        self.peer_host = ""
        self.cert_identity: str | None = None  # device id from a verified TLS client certificate
        self.anonymous = False  # connected without credentials
        self._closing = False
        self._close_reason = ""  # why the server ended the connection, for the event log
        self._draining = False  # closing gracefully: the reason code sent, reading to drop
        self._discard = bytearray()  # where dropped bytes are read to, while draining
        self.paused = False  # the transport's write buffer is over its high-water mark
        # Why reading is paused (telemetry backlog, a cluster node behind, a CONNECT being
        # decided): reading resumes only once no reason is left.
        self._read_holds: set[str] = set()
        self.rate = PublishBucket.for_limits(broker.limits.max_publish_rate,
                                             broker.limits.max_publish_bytes_rate)
        # Acknowledgements leave in the order the PUBLISHes came (3.1.1 4.6, 5.0 4.6); one that
        # waits for its telemetry record to be durable holds back the ones behind it.
        # Entries: [packet type, packet id, reason code, ready].
        self._acks: deque[list[int]] = deque()
        # Cluster mode: packets that came behind a CONNECT still waiting for the cluster, and
        # whether a newer CONNECT of the same client id on another node won meanwhile.
        self._stash: list[Any] | None = None
        self._pending_connect: tuple[Any, str, str, bool, str] | None = None
        # Set by the cluster when a newer CONNECT elsewhere won before this one finished: the
        # (node, request, wants the session) to answer once this one's own claim is settled.
        self.taken_over: tuple[str, int, bool] | None = None

    # ---- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.peer_host = str(peer[0]) if peer else "?"
        self.cert_identity = _certificate_identity(transport.get_extra_info("peercert"))
        self.transport.set_write_buffer_limits(high=self.broker.limits.max_write_buffer)
        self.broker.connecting.add(self)
        self.broker.metrics.connections.inc()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._draining:  # what the client still sends is read and dropped
            return memoryview(self._discard)
        view: memoryview = self.framer.get_buffer(sizehint)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if self._draining:
            return
        self.last_received = monotonic()
        self.broker.metrics.bytes_in += nbytes
        try:
            packets = self.framer.buffer_updated(nbytes)
        except mqtt.MqttError as exc:
            self._handle_batch(exc.packets)
            if self.session is None and exc.reason_code == mqtt.UNSUPPORTED_PROTOCOL_VERSION:
                # Answered in the 3.1.1 form every client version can read (3.1.1 3.1.2.2).
                self._send(mqtt.Connack(reason_code=V4_REFUSED_PROTOCOL).encode(4))
            if not self._closing:
                self.close_with(exc.reason_code, str(exc))
            self.broker.flush()
            return
        self._handle_batch(packets)
        if self.rate is not None:  # per-client publish limits: may pause reading (ratelimit.py)
            self.rate.account(self, packets, nbytes)
        self.broker.flush()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.broker.metrics.connections.dec()
        session = self.session
        if session is not None:
            reason = self._close_reason or (f"lost: {exc}" if exc else "closed by the client")
            self.broker.events.disconnected("mqtt", session.client_id, self.peer, reason)
        if self.broker.telemetry is not None:
            self.broker.telemetry.forget(self)
        if self.broker.cluster is not None:
            self.broker.cluster.forget(self)
        will = self.will
        self.will = None
        self.broker.detach(self, will, self.will_delay)
        self.broker.flush()
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.session is not None:
            self._drain_queue()
            self.broker.flush()

    # ---- output ------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self.out += data
        self.broker.mark_dirty(self)

    def flush(self) -> None:
        transport = self.transport
        if self._draining:
            self.out.clear()  # our sending side is shut: nothing more goes out
            return
        if self.out and transport is not None and not transport.is_closing():
            data, self.out = self.out, bytearray()
            self.broker.metrics.bytes_out += len(data)
            transport.write(data)
        if self._closing and transport is not None:
            if self.paused:  # it is not reading: a graceful close would wait on it for ever
                transport.abort()
            elif (
                self._close_reason != _CLIENT_DISCONNECT
                and transport.can_write_eof()
                and not transport.is_closing()
            ):
                self._drain(transport)
            else:
                transport.close()

    def _drain(self, transport: asyncio.Transport) -> None:
        """Close gracefully: shut our sending side after the last reply (the reason code) and
        read and drop what the client still sends, until it closes or DRAIN_SECONDS pass.
        Closing at once with its data unread would reset the connection, and a reset can
        destroy the reason code before the client reads it."""
        self._draining = True
        self._discard = bytearray(_DISCARD_BYTES)
        will, self.will = self.will, None
        self.broker.detach(self, will, self.will_delay)  # the session ends its use of us now
        transport.write_eof()
        self._read_holds.clear()
        transport.resume_reading()
        asyncio.get_running_loop().call_later(
            DRAIN_SECONDS, lambda: None if transport.is_closing() else transport.abort()
        )

    def close_with(self, reason_code: int, why: str) -> None:
        """End the connection for a reason: MQTT 5 gets a DISCONNECT carrying it (the will is
        published, as for any close that is not a normal DISCONNECT from the client)."""
        if self._closing:
            return
        self._close_reason = f"0x{reason_code:02x} {why}"
        self.broker.metrics.protocol_errors.labels(f"0x{reason_code:02x}").inc()
        if self.version == 5 and self.session is not None:
            props = mqtt.Properties()
            props.reason_string = why[:200]
            self._send(mqtt.Disconnect(reason_code=reason_code, properties=props).encode(5))
        self._closing = True
        self.broker.mark_dirty(self)

    def abort(self, why: str) -> None:
        self._close_reason = why
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    # ---- packets -----------------------------------------------------------------------------

    def _handle_batch(self, packets: list[Any]) -> None:
        if self._stash is not None:  # CONNECT still waits for the cluster: these wait too
            self._keep(packets)
            return
        counts = self.broker.metrics.packets_in
        for packet in packets:
            if self._closing:
                return
            counts[packet.type] += 1
            try:
                if self.session is None:
                    if packet.type != mqtt.CONNECT:
                        raise ProtocolViolation(mqtt.PROTOCOL_ERROR, "first packet is not CONNECT")
                    self._on_connect(packet)
                    if self._stash is not None:
                        # Anything before a CONNECT closed the connection: it came first.
                        self._keep(packets[1:])
                        return
                    continue
                handler = self._HANDLERS.get(packet.type)
                if handler is None:
                    name = mqtt.PACKET_NAMES[packet.type]
                    raise ProtocolViolation(mqtt.PROTOCOL_ERROR, f"{name} from a client")
                handler(self, packet)
            except ProtocolViolation as exc:
                self.close_with(exc.reason_code, str(exc))

    def _keep(self, packets: list[Any]) -> None:
        """Stash packets for after CONNECT; a PUBLISH payload may be a view of the read buffer."""
        assert self._stash is not None
        self._stash.extend(p.detach() if p.type == mqtt.PUBLISH else p for p in packets)

    def _connack(self, reason: int, properties: Any = None, present: bool = False) -> None:
        self._send(
            mqtt.Connack(session_present=present, reason_code=reason, properties=properties).encode(
                self.version
            )
        )

    def _refuse(self, v5_reason: int, v4_code: int, why: str, client_id: str = "") -> None:
        self.broker.metrics.auth_failures.labels(why).inc()
        self.broker.events.refused("mqtt", client_id, self.peer, why)
        self._connack(v5_reason if self.version == 5 else v4_code)
        self._closing = True
        self.broker.mark_dirty(self)

    def _on_connect(self, c: Any) -> None:
        broker = self.broker
        self.version = 5 if c.protocol_level == 5 else 4
        client_id: str = c.client_id
        assigned = False
        if not client_id:
            if self.version == 4 and not c.clean_start:
                self._refuse(
                    mqtt.CLIENT_IDENTIFIER_NOT_VALID, V4_REFUSED_IDENTIFIER, "empty_client_id"
                )
                return
            client_id = "auto-" + secrets.token_hex(8)
            assigned = True

        if broker.guard.bans.banned((f"id:{client_id}", f"addr:{self.peer_host}")):
            self._refuse(mqtt.BANNED, V4_NOT_AUTHORIZED, "banned", client_id)  # gateway/admin.py
            return
        # Authentication: a verified client certificate, registry credentials, else anonymous
        # when allowed. Secrets are checked by the guard: at once when it knows the answer,
        # else off the event loop, while this connection's further packets wait unread.
        if self.cert_identity is not None:
            self._authenticated(c, client_id, self.cert_identity, assigned)
        elif c.username is not None and broker.registry is not None:
            user: str = c.username
            password: bytes = bytes(c.password or b"")
            verdict = broker.guard.check_device(
                "mqtt", broker.registry, user, password,
                (f"id:{client_id}", f"user:{user}", f"addr:{self.peer_host}"),
            )
            if isinstance(verdict, str):
                self._checked(c, client_id, user, assigned, verdict)
                return
            self._stash = []
            self.pause_reading(CONNECTING)
            verdict.add_done_callback(
                lambda f: self._checked_later(c, client_id, user, assigned, f.result())
            )
        elif not broker.allow_anonymous:
            self._refuse(mqtt.NOT_AUTHORIZED, V4_NOT_AUTHORIZED, "anonymous", client_id)
        else:
            self._authenticated(c, client_id, None, assigned)

    def _checked(self, c: Any, client_id: str, user: str, assigned: bool, verdict: str) -> None:
        if verdict == guard.OK:
            self._authenticated(c, client_id, user, assigned)
            return
        v5, v4 = _REFUSALS[verdict]
        self._refuse(v5, v4, _REFUSAL_NAMES[verdict], client_id)

    def _checked_later(
        self, c: Any, client_id: str, user: str, assigned: bool, verdict: str
    ) -> None:
        """The guard answered after the read that brought the CONNECT."""
        if self.transport is None or self._closing:
            return  # the client left meanwhile
        self._checked(c, client_id, user, assigned, verdict)
        if self._pending_connect is None:  # not waiting for a cluster claim now
            stash, self._stash = self._stash or [], None
            self.resume_reading(CONNECTING)
            self._handle_batch(stash)
        self.broker.flush()

    def _authenticated(
        self, c: Any, client_id: str, identity: str | None, assigned: bool
    ) -> None:
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
            self._refuse(mqtt.CLIENT_IDENTIFIER_NOT_VALID, V4_REFUSED_IDENTIFIER, why, client_id)
            return
        if anonymous or identity != client_id:
            # A client id that is not the client's own must not be someone else's either: a
            # registered device's or a service account's (taking it would kick that one).
            try:
                taken = acl.is_service(client_id) or broker.registered(client_id)
            except ValueError:  # the registry is unreadable (it says so): not the client's fault
                self._refuse(
                    mqtt.SERVER_UNAVAILABLE, V4_SERVER_UNAVAILABLE, "registry_unavailable",
                    client_id,
                )
                return
            if taken:
                self._refuse(mqtt.NOT_AUTHORIZED, V4_NOT_AUTHORIZED, "client_id_taken", client_id)
                return
        if identity != client_id and acl.mode == "device" and not acl.is_service(identity):
            self._refuse(
                mqtt.CLIENT_IDENTIFIER_NOT_VALID, V4_REFUSED_IDENTIFIER, "client_id_mismatch",
                client_id,
            )
            return

        cluster = broker.cluster
        if cluster is None:
            self._establish(c, client_id, identity, assigned, "")
            return
        # In a cluster the client id is claimed first (CONNACK waits for Redis): another node
        # may hold its connection (closed there) or its session (it moves here on resume).
        epoch = cluster.new_epoch()
        claim = cluster.claim(client_id, epoch)
        cluster.claiming[client_id] = (epoch, self)
        self._pending_connect = (c, client_id, identity, assigned, epoch)
        if self._stash is None:
            self._stash = []
            self.pause_reading(CONNECTING)
        claim.add_done_callback(self._claimed)

    def _claimed(self, claim: asyncio.Future[Any]) -> None:
        """The claim is in: finish CONNECT now, or after another node let the client go."""
        cluster = self.broker.cluster
        assert cluster is not None and self._pending_connect is not None
        c, client_id = self._pending_connect[:2]
        try:
            previous = claim.result()
        except Exception:
            self._claim_failed()
            return
        if not cluster.held_elsewhere(previous):
            self._finish_claim(None)
            return

        async def take_over() -> None:
            try:
                packed = await cluster.take_over(previous, client_id, not c.clean_start)
            except Exception:
                self._claim_failed()
                return
            self._finish_claim(packed)

        asyncio.get_running_loop().create_task(take_over())

    def _claim_failed(self) -> None:
        assert self._pending_connect is not None
        log.exception("cluster claim of %s failed", self._pending_connect[1])
        self._finish_claim(None, failed=True)

    def _finish_claim(self, packed: Any, failed: bool = False) -> None:
        broker = self.broker
        cluster = broker.cluster
        assert cluster is not None and self._pending_connect is not None
        c, client_id, identity, assigned, epoch = self._pending_connect
        self._pending_connect = None
        if cluster.claiming.get(client_id, ("", None))[0] == epoch:
            del cluster.claiming[client_id]
        if self.taken_over is not None:  # a newer CONNECT elsewhere won while this one waited
            cluster.surrender(client_id, packed, *self.taken_over)
            self.abort("session taken over on another node")
            return
        if failed:
            self._refuse(mqtt.SERVER_UNAVAILABLE, V4_SERVER_UNAVAILABLE, "cluster_unavailable")
            broker.flush()
            return
        if packed is not None:
            session = cluster.import_session(packed)
            if session is not None:
                session.cluster_epoch = epoch
        if self.transport is None or self._closing:  # the client left while it waited
            kept = broker.sessions.get(client_id)
            if kept is not None and kept.cluster_epoch == epoch:
                cluster.went_offline(client_id, epoch)
            else:
                cluster.released(client_id, epoch)
            return
        stash, self._stash = self._stash or [], None
        self._establish(c, client_id, identity, assigned, epoch)
        self.resume_reading(CONNECTING)
        self._handle_batch(stash)
        broker.flush()

    def _establish(
        self, c: Any, client_id: str, identity: str, assigned: bool, epoch: str
    ) -> None:
        """The rest of CONNECT once the client id is ours: takeover, session, CONNACK."""
        broker = self.broker
        props = c.properties if self.version == 5 else None
        # Session takeover: the older connection goes (its will is published).
        previous = broker.online.get(client_id)
        if previous is not None:
            previous.close_with(mqtt.SESSION_TAKEN_OVER, "session taken over")
            broker.detach(previous, previous.will, 0)
            previous.will = None

        expiry = 0
        if self.version == 5:
            expiry = (props.session_expiry_interval or 0) if props is not None else 0
        elif not c.clean_start:
            expiry = NEVER_EXPIRES
        session = broker.sessions.get(client_id)
        present = False
        anonymous = self.anonymous
        if session is not None and (
            c.clean_start
            or session.identity != identity
            or session.anonymous not in (anonymous, None)
        ):
            broker.end_session(session)
            session = None
        if session is None:
            session = Session(client_id, self.version, identity, anonymous=anonymous)
            session.max_queue = broker.limits.max_queued_messages
        else:
            present = True
        session.version = self.version
        session.anonymous = anonymous
        session.expiry_interval = expiry
        session.send_quota = 65535
        if props is not None:
            if props.receive_maximum:
                session.send_quota = props.receive_maximum
            self.client_max_packet = props.maximum_packet_size or 0
            self.alias_max_out = props.topic_alias_maximum or 0
        self.session = session
        self.keep_alive = c.keep_alive
        server_keep_alive = None
        limit = broker.limits.max_keep_alive
        if limit < 65535 and (c.keep_alive == 0 or c.keep_alive > limit):
            self.keep_alive = limit
            if self.version == 5:  # Server Keep Alive (5.0 3.2.2.3.14); 3.1.1 cannot be told
                server_keep_alive = limit
        if c.will is not None:
            self.will = self._will_message(c.will, client_id)
            will_props = c.will.properties
            if will_props is not None:
                self.will_delay = will_props.will_delay_interval or 0

        session.cluster_epoch = epoch
        broker.attach(self, session)
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
            if assigned:
                ack_props.assigned_client_identifier = client_id
            if server_keep_alive is not None:
                ack_props.server_keep_alive = server_keep_alive
        self._connack(mqtt.SUCCESS, ack_props, present)
        broker.events.connected(
            "mqtt", client_id, self.peer, identity=identity, version=self.version,
            session_present=present, keep_alive=self.keep_alive,
        )
        self._resume_session()

    def _will_message(self, will: Any, client_id: str) -> Message | None:
        if not self.broker.acl.can_publish(
            self.session.identity if self.session else client_id, will.topic
        ):
            self.broker.metrics.acl_denials.labels("will").inc()
            self.broker.events.denied("mqtt", client_id, self.peer, "will", will.topic)
            return None
        return Message(
            will.topic,
            bytes(will.payload),
            will.qos,
            will.retain,
            _application_properties(will.properties),
            _expiry(will.properties),
            client_id,
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
            del self.out[
                start:
            ]  # larger than the client accepts: it must not be sent (5.0 3.1.2.25)
            self.broker.metrics.dropped.labels("too_large_for_client").inc()
            if packet_id and self.session is not None:
                self.session.outgoing.pop(packet_id, None)
                self.broker.metrics.inflight.dec()
            return
        self.broker.metrics.packets_out[mqtt.PUBLISH] += 1
        self.broker.mark_dirty(self)

    def _alias(self, topic: str, props: Any) -> tuple[str, Any]:
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

    def _on_publish(self, p: Any) -> None:
        session = self.session
        assert session is not None
        props = p.properties if self.version == 5 else None
        topic: str = p.topic
        if props is not None and props.topic_alias is not None:
            alias = props.topic_alias
            if alias > self.broker.limits.topic_alias_maximum:
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
        if (
            qos
            and len(session.incoming_qos2) + len(self._acks) >= self.broker.limits.receive_maximum
        ):
            raise ProtocolViolation(mqtt.RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded")
        shadow = topic.startswith("$shadow/")
        if not self.broker.acl.can_publish(session.identity, topic) or (
            shadow and not self._shadow_request(topic, p, qos, packet_id)
        ):
            self.broker.metrics.acl_denials.labels("publish").inc()
            self.broker.events.denied("mqtt", session.client_id, self.peer, "publish", topic)
            reason = mqtt.NOT_AUTHORIZED if self.version == 5 else 0
            if qos:
                self._ack(mqtt.PUBACK if qos == 1 else mqtt.PUBREC, packet_id, reason)
            return
        if shadow:
            return  # a shadow request, handed to the shadow service
        if props is None:
            message = Message(topic, p.payload, qos, p.retain, None, None, session.client_id)
        else:
            message = Message(
                topic,
                p.payload,
                qos,
                p.retain,
                _application_properties(props),
                _expiry(props),
                session.client_id,
            )
        reached = self.broker.publish(message)
        cluster = self.broker.cluster
        if cluster is not None and cluster.blocked:  # another node is behind: wait for it
            cluster.hold(self)
        reason = mqtt.SUCCESS if reached or self.version == 4 else mqtt.NO_MATCHING_SUBSCRIBERS
        ack_type = mqtt.PUBACK if qos == 1 else mqtt.PUBREC
        if qos == 2:
            session.incoming_qos2.add(packet_id)
        pipeline = self.broker.telemetry
        kind = classify_topic(topic) if pipeline is not None else None
        if kind is None:
            if qos:
                self._ack(ack_type, packet_id, reason)
            return
        # Telemetry: acknowledged only once its record is durable (DESIGN.md).
        assert pipeline is not None
        message.own()
        record = Record(kind[1], kind[0], "mqtt", topic, bytes(message.payload))
        if props is not None:
            record.content_type = props.content_type
        if qos:
            entry = [ack_type, packet_id, mqtt.SUCCESS, 0]
            self._acks.append(entry)
            pipeline.submit(record, self, entry)
        else:
            pipeline.submit(record)
        pipeline.over_high_water(self)

    def _shadow_request(self, topic: str, p: Any, qos: int, packet_id: int) -> bool:
        """Hand `$shadow/{id}/update|get|delete` to the shadow service; its QoS 1/2
        acknowledgement waits until the store has it. False for the other `$shadow/` topics:
        the replies are the gateway's to publish."""
        shadows = self.broker.shadows
        request = parse_request_topic(topic)
        if shadows is None or request is None:
            return False
        entry: list[int] | None = None
        if qos:
            assert self.session is not None
            ack_type = mqtt.PUBACK if qos == 1 else mqtt.PUBREC
            if qos == 2:
                self.session.incoming_qos2.add(packet_id)
            entry = [ack_type, packet_id, mqtt.SUCCESS, 0]
            self._acks.append(entry)

        def done() -> None:
            if entry is not None and self.transport is not None:
                self.records_durable([entry])

        shadows.submit_mqtt(request[0], request[1], bytes(p.payload), done)
        return True

    def _ack(self, packet_type: int, packet_id: int, reason: int) -> None:
        if self._acks:  # behind one that waits for durability: keep the order
            self._acks.append([packet_type, packet_id, reason, 1])
        else:
            mqtt.encode_ack_into(self.out, packet_type, packet_id, reason, self.version)
            self.broker.mark_dirty(self)

    def records_durable(self, tokens: list[Any]) -> None:
        """The pipeline made these records durable: release their acknowledgements, in order."""
        for entry in tokens:
            entry[3] = 1
        acks = self._acks
        while acks and acks[0][3]:
            packet_type, packet_id, reason, _ = acks.popleft()
            mqtt.encode_ack_into(self.out, packet_type, packet_id, reason, self.version)
        self.broker.mark_dirty(self)
        self.broker.flush()

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client until `resume_reading(reason)`: the one place that
        pauses this transport, so that no owner of a reason undoes another's."""
        if not self._read_holds and self.transport is not None:
            self.transport.pause_reading()
        self._read_holds.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._read_holds:
            return
        self._read_holds.discard(reason)
        if (
            not self._read_holds
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.transport.resume_reading()

    def _on_pubrel(self, p: Any) -> None:
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

    def _on_puback(self, p: Any) -> None:
        self._release(p.packet_id)

    def _on_pubrec(self, p: Any) -> None:
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

    def _on_pubcomp(self, p: Any) -> None:
        self._release(p.packet_id)

    # -- subscriptions

    def _on_subscribe(self, p: Any) -> None:
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

    def _on_unsubscribe(self, p: Any) -> None:
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

    def _on_pingreq(self, p: Any) -> None:
        self._send(mqtt.PINGRESP_FRAME)

    def _on_disconnect(self, p: Any) -> None:
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
        self._close_reason = _CLIENT_DISCONNECT  # it closes its side itself: nothing to drain
        self._closing = True
        self.broker.mark_dirty(self)

    def _on_auth(self, p: Any) -> None:
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


def _application_properties(props: Any) -> Any:
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


def _expiry(props: Any) -> float | None:
    if props is None or props.message_expiry_interval is None:
        return None
    return monotonic() + float(props.message_expiry_interval)


def _outgoing_properties(message: Message, subscription_ids: tuple[int, ...]) -> Any:
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


def _certificate_identity(cert: Any) -> str | None:
    """The subject common name of a client certificate the TLS layer verified, or None."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
