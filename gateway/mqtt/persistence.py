"""Snapshots of what must survive a restart: persistent sessions (subscriptions, queued and
in-flight QoS 1/2 messages) and retained messages, in one msgpack file in the data dir.

Like Mosquitto's autosave, the broker state is written whole: at a graceful stop and every few
seconds while something changed, atomically (write, fsync, rename). A crash loses at most the
changes since the last snapshot; acknowledged telemetry never depends on it (that is the sink's).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack

from gateway._native import mqtt
from gateway.mqtt.broker import Broker
from gateway.mqtt.session import Delivery, Message, Session, SubOptions, monotonic

FORMAT = 1
_PROPS = ("payload_format_indicator", "content_type", "response_topic", "correlation_data")


def _props_out(props: Any) -> dict[str, Any] | None:
    if props is None:
        return None
    d = {name: getattr(props, name) for name in _PROPS}
    d["user_properties"] = [list(p) for p in props.user_properties or ()]
    return d


def _props_in(d: dict[str, Any] | None) -> Any:
    if d is None:
        return None
    props = mqtt.Properties()
    for name in _PROPS:
        setattr(props, name, d.get(name))
    props.user_properties = [tuple(p) for p in d.get("user_properties", ())]
    return props


def pack_message(m: Message, now: float) -> list[Any]:
    """A message as msgpack-able data; its expiry travels as seconds left (from `now`)."""
    left = None if m.expires_at is None else max(0.0, m.expires_at - now)
    return [m.topic, bytes(m.payload), m.qos, m.retain, _props_out(m.properties), left, m.origin]


def unpack_message(d: list[Any], now: float) -> Message:
    topic, payload, qos, retain, props, left, origin = d
    return Message(
        topic, payload, qos, retain, _props_in(props), None if left is None else now + left, origin
    )


def _delivery_out(d: Delivery, now: float) -> list[Any]:
    return [pack_message(d.message, now), d.qos, d.retain, list(d.subscription_ids), d.state]


def _delivery_in(d: list[Any], now: float) -> Delivery:
    message, qos, retain, ids, state = d
    return Delivery(unpack_message(message, now), qos, retain, tuple(ids), state, dup=state != 0)


def pack_session(s: Session, now: float, wall: float) -> dict[str, Any]:
    """A persistent session as msgpack-able data (snapshots, and moves between cluster nodes)."""
    offline_for = 0.0 if s.disconnected_at is None else now - s.disconnected_at
    return {
        "client_id": s.client_id,
        "version": s.version,
        "identity": s.identity,
        "anonymous": s.anonymous,
        "expiry": s.expiry_interval,
        "offline_since": wall - offline_for,
        "subscriptions": {
            f: [o.qos, o.no_local, o.retain_as_published, o.retain_handling, o.identifier]
            for f, o in s.subscriptions.items()
        },
        "outgoing": {str(pid): _delivery_out(d, now) for pid, d in s.outgoing.items()},
        "queue": [_delivery_out(d, now) for d in s.queue],
        "incoming_qos2": sorted(s.incoming_qos2),
    }


def unpack_session(broker: Broker, d: dict[str, Any], now: float, wall: float) -> Session | None:
    """Install a packed session (with its subscriptions) in the broker; None if it expired."""
    session = Session(d["client_id"], d["version"], d["identity"], d["expiry"])
    session.anonymous = d.get("anonymous")  # None: from a version that did not say
    session.max_queue = broker.limits.max_queued_messages
    session.disconnected_at = now - max(0.0, wall - d["offline_since"])
    if session.expired(now):
        return None
    for topic_filter, (qos, no_local, rap, rh, ident) in d["subscriptions"].items():
        opts = SubOptions(qos, no_local, rap, rh, ident)
        session.subscriptions[topic_filter] = opts
        broker.add_subscription(session.client_id, topic_filter, opts)
    session.outgoing = {int(pid): _delivery_in(x, now) for pid, x in d["outgoing"].items()}
    session.queue.extend(_delivery_in(x, now) for x in d["queue"])
    session.incoming_qos2 = set(d["incoming_qos2"])
    broker.sessions[session.client_id] = session
    return session


def snapshot(broker: Broker) -> bytes:
    now = monotonic()
    wall = time.time()
    sessions = [pack_session(s, now, wall) for s in broker.sessions.values() if s.expiry_interval]
    # In a cluster the retained messages live in Redis (gateway/cluster.py), not here.
    retained = [] if broker.cluster else [pack_message(m, now) for _, m in broker.retained.items()]
    packed: bytes = msgpack.packb(
        {"format": FORMAT, "saved_at": wall, "sessions": sessions, "retained": retained},
        use_bin_type=True,
    )
    return packed


def load(broker: Broker, path: Path) -> int:
    """Restore a snapshot into an empty broker; returns the sessions restored."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    doc = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown snapshot format {doc.get('format')!r}")
    now = monotonic()
    wall = time.time()
    for d in doc["retained"]:
        message = unpack_message(d, now)
        if not message.expired(now):
            broker.retained.set(message.topic, message)
    restored = 0
    for d in doc["sessions"]:
        if unpack_session(broker, d, now, wall) is not None:
            restored += 1
    return restored
