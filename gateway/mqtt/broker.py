"""The broker: routing through the subscription trie, shared groups, internal subscribers,
retained messages, the offline queues' bounds, and output batching.

It holds no sockets: channels (gateway/mqtt/channel.py) call in with what their clients
publish and subscribe, and the broker calls back `channel.send_publish(...)`. Replies for one
read are batched per channel and written once, by `flush()` at the end of that read. The
tables of sessions and online clients live here because routing reads them; their lifecycle
(open, takeover, kick, expiry) is `gateway/mqtt/sessions.py`'s.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway._native import mqtt
from gateway.auth import DeviceRegistry
from gateway.events import EventLog
from gateway.guard import AuthGuard
from gateway.metrics import MqttMetrics
from gateway.mqtt.acl import Acl
from gateway.mqtt.clusterlink import ClusterLink
from gateway.mqtt.session import (
    QUEUE_FULL_TOTAL,
    ChangeLog,
    Delivery,
    Message,
    QueueBudget,
    Session,
    SubOptions,
    monotonic,
)
from gateway.mqtt.sessions import PendingWill, Sessions
from gateway.mqtt.topics import SubscriptionTrie, TopicTree

if TYPE_CHECKING:
    from gateway.mqtt.channel import MqttChannel, PublishInterceptor

log = logging.getLogger("iotgw.mqtt")

SHED_LOG_INTERVAL = 10.0  # seconds: at most one log line about shed messages per interval


@dataclass(frozen=True)
class BrokerLimits:
    max_packet_size: int = 1 << 20
    receive_maximum: int = 1024  # QoS 1/2 publishes a client may have unacknowledged with us
    topic_alias_maximum: int = 64
    max_queued_messages: int = 1000  # per offline or slow session
    max_queued_bytes: int = 16 << 20  # payload bytes queued per offline or slow session
    max_queued_bytes_total: int = 256 << 20  # payload bytes queued by all sessions together
    max_write_buffer: int = 1 << 20  # bytes buffered for a slow subscriber before shedding QoS 0
    connect_timeout: float = 10.0  # seconds from TCP accept to CONNECT
    max_keep_alive: int = 65535
    max_publish_rate: float = 0  # PUBLISH packets per second per client (0: no limit)
    max_publish_bytes_rate: float = 0  # bytes read per second per client (0: no limit)


InternalSubscriber = Callable[[Message], None]
MAX_UNREGISTERED = 100_000  # client ids remembered as unregistered (then forgotten at once)


class SharedGroup:
    """The members of one `$share/{group}/{filter}`: each message goes to one of them, round
    robin, preferring members that are online (5.0 4.8.2)."""

    __slots__ = ("_turn", "filter", "members")

    def __init__(self, topic_filter: str) -> None:
        self.filter = topic_filter  # the whole `$share/{group}/{filter}`
        self.members: dict[str, SubOptions] = {}
        self._turn = 0

    def pick(self, online: dict[str, MqttChannel]) -> tuple[str, SubOptions] | None:
        members = list(self.members.items())
        if not members:
            return None
        self._turn += 1
        for i in range(len(members)):
            client_id, opts = members[(self._turn + i) % len(members)]
            if client_id in online:
                return client_id, opts
        return members[self._turn % len(members)]  # all offline: queued in one session


class Broker:
    def __init__(
        self,
        *,
        acl: Acl,
        metrics: MqttMetrics,
        guard: AuthGuard,
        events: EventLog,
        registry: DeviceRegistry | None = None,
        allow_anonymous: bool = False,
        limits: BrokerLimits | None = None,
        interceptors: Sequence[PublishInterceptor] = (),
        cluster: Callable[[Broker], ClusterLink] | None = None,
    ) -> None:
        """`interceptors`: see every allowed PUBLISH before it is routed (telemetry, shadows),
        in this order. `cluster`: builds the link to the other nodes sharing a Redis, given
        this broker (the cluster delivers to it what other nodes route here)."""
        self.acl = acl
        self.metrics = metrics
        self.guard = guard
        self.events = events
        self.registry = registry
        self.allow_anonymous = allow_anonymous
        self.limits = limits or BrokerLimits()
        self.interceptors = tuple(interceptors)
        self.intercepted = tuple(i.prefix for i in self.interceptors)  # topics they look at
        # The tables routing reads; only the session lifecycle (sessions.py) changes them.
        self.sessions: dict[str, Session] = {}
        self._unregistered: set[str] = set()  # client ids found in no registry entry
        self.online: dict[str, MqttChannel] = {}
        self.connecting: set[MqttChannel] = set()  # accepted, no CONNECT yet
        self.subscriptions: SubscriptionTrie[str, SubOptions] = SubscriptionTrie()
        # Shared subscriptions: the trie maps the inner filter to the group's name.
        self.shared: SubscriptionTrie[str, SharedGroup] = SubscriptionTrie()
        # Subscribers inside the gateway (CoAP observers, REST waiting for a command reply).
        self.internal: SubscriptionTrie[int, InternalSubscriber] = SubscriptionTrie()
        self._internal_ids = itertools.count(1)
        self.retained: TopicTree[Message] = TopicTree()
        self.pending_wills: dict[str, PendingWill] = {}
        self._dirty: set[MqttChannel] = set()
        self.changes = 0  # bumped by changes to routing and sessions
        # What changed since the last save (persistence.py), and the queues' byte bounds.
        self.journal = ChangeLog()
        self.budget = QueueBudget(
            self.limits.max_queued_bytes, self.limits.max_queued_bytes_total
        )
        self._shed: dict[str, int] = {}  # messages shed since the last log line, by reason
        self._shed_logged = 0.0
        # Counted when scraped: a gauge's set() on every CONNECT costs more than it tells.
        metrics.sessions.set_function(lambda: len(self.sessions))
        metrics.retained.set_function(lambda: len(self.retained))
        metrics.queued_bytes.set_function(lambda: self.budget.queued)
        self.lifecycle = Sessions(self)
        self.cluster: ClusterLink | None = cluster(self) if cluster is not None else None

    # ---- output batching -------------------------------------------------------------------

    def mark_dirty(self, conn: MqttChannel) -> None:
        self._dirty.add(conn)

    def flush(self) -> None:
        """Write every connection's batched output in one write each."""
        while self._dirty:  # a channel that closes may publish its will to others
            dirty, self._dirty = self._dirty, set()
            for channel in dirty:
                channel.flush()

    # ---- sessions (their lifecycle is sessions.py's) ------------------------------------------

    def registered(self, client_id: str) -> bool:
        """Whether a device of this id is registered. An id found unregistered is remembered
        (a registry read per anonymous CONNECT was a quarter of its cost) until the registry
        reports an addition (`revoke`), which also ends an anonymous client using the id.
        Raises the registry's error when it cannot be read."""
        if self.registry is None or client_id in self._unregistered:
            return False
        if self.registry.get(client_id) is not None:
            return True
        if len(self._unregistered) >= MAX_UNREGISTERED:
            self._unregistered.clear()
        self._unregistered.add(client_id)
        return False

    def forget_unregistered(self, client_ids: Iterable[str]) -> None:
        """These ids changed in the registry: look them up again."""
        self._unregistered.difference_update(client_ids)

    # ---- subscriptions -------------------------------------------------------------------------

    def add_subscription(self, client_id: str, topic_filter: str, opts: SubOptions) -> bool:
        """Subscribe (ordinary or `$share/...`); True when the session had no such filter."""
        self.changes += 1
        shared = mqtt.parse_shared(topic_filter)
        if shared is None:
            is_new = self.subscriptions.add(topic_filter, client_id, opts)
        else:
            group_name, inner = shared
            group = self.shared.get(inner, group_name)
            if group is None:
                group = SharedGroup(topic_filter)
                self.shared.add(inner, group_name, group)
            is_new = client_id not in group.members
            group.members[client_id] = opts
        if is_new and self.cluster is not None:
            self.cluster.route_added(topic_filter)
        return is_new

    def remove_subscription(self, client_id: str, topic_filter: str) -> bool:
        self.changes += 1
        shared = mqtt.parse_shared(topic_filter)
        if shared is None:
            removed = self.subscriptions.remove(topic_filter, client_id)
        else:
            group_name, inner = shared
            group = self.shared.get(inner, group_name)
            removed = group is not None and group.members.pop(client_id, None) is not None
            if group is not None and not group.members:
                self.shared.remove(inner, group_name)
        if removed and self.cluster is not None:
            self.cluster.route_removed(topic_filter)
        return removed

    def subscribe_internal(
        self, topic_filter: str, callback: InternalSubscriber
    ) -> Callable[[], None]:
        """Call `callback(message)` for every message routed to a matching topic, until the
        returned function is called. The message's payload may be a view of the read buffer:
        a callback that keeps it must copy it (`bytes(message.payload)`)."""
        key = next(self._internal_ids)
        self.internal.add(topic_filter, key, callback)
        if self.cluster is not None:
            self.cluster.route_added(topic_filter)

        def unsubscribe() -> None:
            if self.internal.remove(topic_filter, key) and self.cluster is not None:
                self.cluster.route_removed(topic_filter)

        return unsubscribe

    # ---- routing -----------------------------------------------------------------------------

    def reaches_anyone(self, topic: str) -> bool:
        """Whether a message (not retained) on `topic` could reach a subscriber, here or on
        another node: a caller that builds a message only to publish it may skip the work."""
        return (
            self.cluster is not None
            or bool(self.subscriptions.size and self.subscriptions.match(topic))
            or bool(self.internal.size and self.internal.match(topic))
            or bool(self.shared.size and self.shared.match(topic))
        )

    def publish(self, message: Message) -> int:
        """Route one message to every matching subscription, here and on other cluster nodes;
        returns the sessions (and nodes) it reached."""
        if message.retain:
            self._retain(message)
            if self.cluster is not None:
                self.cluster.retain(message)
        if self.cluster is None:
            return self._route_here(message, None)
        nodes, shared_here = self.cluster.forward(message)
        return nodes + self._route_here(message, shared_here)

    def deliver_forwarded(self, message: Message, shared_here: set[str]) -> None:
        """A message another cluster node routed to us, with the shared groups it picked us for."""
        self._route_here(message, shared_here)

    def _route_here(self, message: Message, shared_here: set[str] | None) -> int:
        """Deliver to this node's subscribers; `shared_here`: only these share groups (the
        cluster's pick), None: every matching one."""
        reached = self._publish_shared(message, shared_here) if self.shared.size else 0
        if self.internal.size:
            for _, callback in self.internal.match(message.topic):
                callback(message)
                reached += 1
        matches = self.subscriptions.match(message.topic)
        if not matches:
            return reached
        if len(matches) == 1:
            client_id, opts = matches[0]
            if opts.no_local and client_id == message.origin:
                return reached
            ids = (opts.identifier,) if opts.identifier else ()
            self._deliver(client_id, message, opts.qos, opts.retain_as_published, ids)
            return reached + 1
        # Overlapping subscriptions of one session: one delivery, highest QoS, every identifier.
        merged: dict[str, tuple[int, bool, list[int]]] = {}
        for client_id, opts in matches:
            if opts.no_local and client_id == message.origin:
                continue
            qos, rap, id_list = merged.get(client_id, (0, False, []))
            if opts.identifier:
                id_list.append(opts.identifier)
            merged[client_id] = (max(qos, opts.qos), rap or opts.retain_as_published, id_list)
        for client_id, (qos, rap, id_list) in merged.items():
            self._deliver(client_id, message, qos, rap, tuple(id_list))
        return reached + len(merged)

    def _publish_shared(self, message: Message, only: set[str] | None) -> int:
        """One delivery per matching share group, to one member of it."""
        reached = 0
        for _, group in self.shared.match(message.topic):
            if only is not None and group.filter not in only:
                continue
            chosen = group.pick(self.online)
            if chosen is not None:
                client_id, opts = chosen
                ids = (opts.identifier,) if opts.identifier else ()
                self._deliver(client_id, message, opts.qos, opts.retain_as_published, ids)
                reached += 1
        return reached

    def changed(self) -> None:
        self.changes += 1

    def _retain(self, message: Message) -> None:
        self.changes += 1
        if self.cluster is None:  # a cluster keeps its retained messages in Redis
            self.journal.retained.add(message.topic)
        if message.payload:
            message.own()
            self.retained.set(message.topic, message)
        else:  # a retained message with an empty payload deletes the retained one
            self.retained.delete(message.topic)

    def _deliver(
        self, client_id: str, message: Message, sub_qos: int, rap: bool, ids: tuple[int, ...]
    ) -> None:
        session = self.sessions.get(client_id)
        if session is None:
            return
        qos = min(sub_qos, message.qos)
        delivery = Delivery(message, qos, message.retain and rap, ids)
        self.deliver(session, delivery)

    def deliver(self, session: Session, delivery: Delivery) -> None:
        conn = self.online.get(session.client_id)
        if delivery.qos == 0:
            if conn is None:
                self.metrics.dropped.labels("offline_qos0").inc()
            else:
                conn.send_publish(delivery)
            return
        delivery.message.own()  # it may be resent later: it must own its bytes
        self.changes += 1
        if conn is not None and not session.queue and session.can_send_now() and not conn.paused:
            conn.send_publish(delivery)
        else:
            reason = session.enqueue(delivery)
            if reason is not None:
                self._shed_one(reason)
                if conn is not None and reason != QUEUE_FULL_TOTAL:
                    # A slow consumer: it cannot keep up, so it goes. (When all queues together
                    # are full, this one is not to blame.)
                    conn.close_with(mqtt.QUOTA_EXCEEDED, f"slow consumer: {reason}")

    def _shed_one(self, reason: str) -> None:
        self.metrics.dropped.labels(reason).inc()
        self._shed[reason] = self._shed.get(reason, 0) + 1

    def _log_shed(self, now: float) -> None:
        """One line per interval at most, however many messages were shed."""
        if self._shed and now - self._shed_logged >= SHED_LOG_INTERVAL:
            self._shed_logged = now
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self._shed.items()))
            self._shed.clear()
            log.warning(
                "queued QoS 1/2 messages shed (newest refused): %s (bounds: %d messages, "
                "%d bytes per session, %d bytes in all)", counts,
                self.limits.max_queued_messages, self.budget.per_session, self.budget.total,
            )

    def replace_retained(self, messages: dict[str, Message]) -> None:
        """Every retained message, as the cluster keeps them (in Redis): ours are replaced."""
        self.retained = TopicTree()
        for topic, message in messages.items():
            self.retained.set(topic, message)

    def set_retained(self, topic: str, message: Message | None) -> None:
        """A retained message another cluster node set (None: deleted)."""
        if message is None:
            self.retained.delete(topic)
        else:
            self.retained.set(topic, message)

    def retained_for(self, topic_filter: str) -> list[Message]:
        """Retained messages a new subscription receives; expired ones are deleted here."""
        now = monotonic()
        found = list(self.retained.match(topic_filter))
        for topic, message in found:
            if message.expired(now):
                self.retained.delete(topic)
                if self.cluster is None:
                    self.journal.retained.add(topic)
        return [m for _, m in found if not m.expired(now)]

    # ---- the sweep ---------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """The broker's part of the sweep (after the sessions' part, gateway/mqtt/sessions.py)."""
        self._log_shed(now)
        self.flush()
