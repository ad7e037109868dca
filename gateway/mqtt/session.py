"""Session state of one MQTT client: subscriptions, QoS flows in both directions, the offline
queue. Pure data and bookkeeping; the broker and the connection do the I/O.

Two things ride along cheaply for the rest of the broker:
- a session notes itself in its broker's `ChangeLog` the first time its saved state is reached
  (its queue, in-flight messages, incoming QoS 2 ids, subscriptions or expiry) after a save, so
  that a save looks at the sessions that may have changed and nothing else (persistence.py);
- its queue counts the payload bytes it holds, against a bound per session and a bound shared
  by every session of the broker (`QueueBudget`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Outgoing QoS states: what we wait for from the client.
AWAIT_PUBACK, AWAIT_PUBREC, AWAIT_PUBCOMP = 1, 2, 3

NEVER_EXPIRES = 0xFFFFFFFF

# Why a delivery was not queued (the `reason` label of the dropped-messages counter).
QUEUE_FULL_MESSAGES = "queue_full_messages"  # the session holds max_queued_messages
QUEUE_FULL_BYTES = "queue_full_bytes"  # the session holds max_queued_bytes of payload
QUEUE_FULL_TOTAL = "queue_full_total"  # all sessions together hold max_queued_bytes_total


@dataclass(slots=True)
class Message:
    """A routed application message. `payload` may be a view of the read buffer while the message
    is routed within that read; `own()` copies it once before anything keeps the message."""

    topic: str
    payload: bytes | memoryview
    qos: int
    retain: bool
    properties: Any = None  # mqtt.Properties with the application properties, or None
    expires_at: float | None = None  # time.monotonic() deadline from Message Expiry Interval
    origin: str = ""  # client id of the publisher (for No Local)
    stored: int = field(default=0, compare=False)  # its row in the state database, 0: none yet

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def own(self) -> None:
        if not isinstance(self.payload, bytes):
            self.payload = bytes(self.payload)


@dataclass(slots=True)
class SubOptions:
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    identifier: int | None = None


@dataclass(slots=True)
class Delivery:
    """A message bound for one session, with the QoS and flags of that subscriber."""

    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...] = ()
    state: int = 0  # AWAIT_* once sent with QoS > 0
    dup: bool = False
    seq: int = field(default=0, compare=False)  # its row in the state database, 0: none yet


class ChangeLog:
    """What a save has to look at: sessions whose state was reached since the last save,
    client ids whose stored session must go, retained topics set or deleted. Appended to on the
    event loop; taken whole by the next save (persistence.py)."""

    __slots__ = ("ended", "retained", "sessions")

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.ended: set[str] = set()
        self.retained: set[str] = set()


class QueueBudget:
    """The byte bounds of the offline queues of one broker, and the bytes they hold."""

    __slots__ = ("per_session", "queued", "total")

    def __init__(self, per_session: int, total: int) -> None:
        self.per_session = per_session
        self.total = total
        self.queued = 0  # payload bytes in every session's queue


class DeliveryQueue(deque[Delivery]):
    """A session's queue of deliveries waiting for a send slot, counting their payload bytes.
    Only `append`, `extend`, `popleft` and `clear` change it (the broker appends, the connection
    pops from the left)."""

    __slots__ = ("budget", "bytes")

    def __init__(self, budget: QueueBudget | None = None) -> None:
        super().__init__()
        self.bytes = 0
        self.budget = budget

    def append(self, delivery: Delivery) -> None:
        super().append(delivery)
        size = len(delivery.message.payload)
        self.bytes += size
        if self.budget is not None:
            self.budget.queued += size

    def extend(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            self.append(delivery)

    def popleft(self) -> Delivery:
        delivery = super().popleft()
        size = len(delivery.message.payload)
        self.bytes -= size
        if self.budget is not None:
            self.budget.queued -= size
        return delivery

    def clear(self) -> None:
        if self.budget is not None:
            self.budget.queued -= self.bytes
        self.bytes = 0
        super().clear()

    def use(self, budget: QueueBudget | None) -> None:
        """Count this queue's bytes in `budget` from now on (None: in none)."""
        if budget is self.budget:
            return
        if self.budget is not None:
            self.budget.queued -= self.bytes
        if budget is not None:
            budget.queued += self.bytes
        self.budget = budget


class PacketIds(set[int]):
    """Incoming QoS 2 packet ids: adding or discarding one notes the session for the next
    save; reading them (every QoS 1/2 PUBLISH checks how many there are) does not. Only
    `add` and `discard` change it."""

    __slots__ = ("session",)

    def __init__(self, session: Session, ids: Iterable[int] = ()) -> None:
        super().__init__(ids)
        self.session = session

    def add(self, packet_id: int) -> None:
        super().add(packet_id)
        self.session.touch()

    def discard(self, packet_id: object) -> None:
        super().discard(packet_id)
        self.session.touch()


class Session:
    """One client's session. The state a restart must restore is reached through properties
    that note the session in its change log once per save (a flag test after that)."""

    __slots__ = (
        "_expiry_interval",
        "_incoming_qos2",
        "_log",
        "_next_id",
        "_outgoing",
        "_queue",
        "_subscriptions",
        "_touched",
        "anonymous",
        "client_id",
        "cluster_epoch",
        "disconnected_at",
        "dropped",
        "identity",
        "max_queue",
        "saved",
        "saved_meta",
        "send_quota",
        "version",
    )

    def __init__(
        self, client_id: str, version: int, identity: str, expiry_interval: int = 0,
        anonymous: bool | None = False,
    ) -> None:
        self.client_id = client_id
        self.version = version
        self.identity = identity  # authenticated device id (or the client id if anonymous)
        # Connected without credentials (acting as its client id); None: restored from a
        # snapshot of a version that did not record it.
        self.anonymous = anonymous
        self._expiry_interval = expiry_interval  # seconds after disconnect; NEVER_EXPIRES
        self._subscriptions: dict[str, SubOptions] = {}
        self._outgoing: dict[int, Delivery] = {}  # in flight, by packet id
        self._queue = DeliveryQueue()  # waiting for a send slot
        self._incoming_qos2 = PacketIds(self)  # PUBREC sent, PUBREL awaited
        self.send_quota = 65535  # the client's Receive Maximum
        self.max_queue = 1000
        self.disconnected_at: float | None = None
        self.dropped = 0
        self.cluster_epoch = ""  # the claim in the cluster's client registry (gateway/cluster.py)
        self._next_id = 0
        self._log: ChangeLog | None = None
        self._touched = False
        # What the state database holds for this session (persistence.py): its deliveries by
        # seq as (packet id, state, message row), and its packed subscriptions and expiry.
        self.saved: dict[int, tuple[int, int, int]] = {}
        self.saved_meta: bytes | None = None

    def __repr__(self) -> str:
        return f"Session({self.client_id!r}, expiry={self._expiry_interval})"

    # ---- change tracking ---------------------------------------------------------------------

    def touch(self) -> None:
        """Note this session for the next save (once until that save takes it). A session
        that is not persistent and has nothing saved is not noted: it costs a save nothing."""
        if not self._touched:
            self._touched = True
            if self._log is not None and (self._expiry_interval or self.saved_meta is not None):
                self._log.sessions.append(self)

    def untouch(self) -> None:
        self._touched = False

    def join(self, log: ChangeLog, budget: QueueBudget) -> None:
        """The session belongs to a broker now: its changes go to `log`, its queue's bytes
        count in `budget`."""
        self._queue.use(budget)
        if self._log is not log:
            self._log = log
            self._touched = False
        self.touch()

    def leave(self) -> None:
        """The broker forgot this session: it counts in no budget any more."""
        self._queue.use(None)
        self._log = None

    def state(
        self,
    ) -> tuple[dict[int, Delivery], DeliveryQueue, dict[str, SubOptions], set[int]]:
        """In flight, queue, subscriptions, incoming QoS 2 ids: read by a save without noting
        the session as changed."""
        return self._outgoing, self._queue, self._subscriptions, self._incoming_qos2

    @property
    def outgoing(self) -> dict[int, Delivery]:
        if not self._touched:
            self.touch()
        return self._outgoing

    @property
    def queue(self) -> DeliveryQueue:
        if not self._touched:
            self.touch()
        return self._queue

    @property
    def incoming_qos2(self) -> PacketIds:
        return self._incoming_qos2

    @incoming_qos2.setter
    def incoming_qos2(self, ids: Iterable[int]) -> None:
        self.touch()
        self._incoming_qos2 = PacketIds(self, ids)

    @property
    def subscriptions(self) -> dict[str, SubOptions]:
        if not self._touched:
            self.touch()
        return self._subscriptions

    @property
    def expiry_interval(self) -> int:
        return self._expiry_interval

    @expiry_interval.setter
    def expiry_interval(self, seconds: int) -> None:
        self._expiry_interval = seconds
        self._touched = False  # noted again: it may have become persistent
        self.touch()

    # ---- QoS bookkeeping ----------------------------------------------------------------------

    def next_packet_id(self) -> int:
        outgoing = self._outgoing
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in outgoing:
                return self._next_id
        raise RuntimeError("all 65535 packet identifiers are in flight")

    def can_send_now(self) -> bool:
        return len(self._outgoing) < self.send_quota

    def expired(self, now: float) -> bool:
        if self.disconnected_at is None or self._expiry_interval == NEVER_EXPIRES:
            return False
        return now - self.disconnected_at >= self._expiry_interval

    def enqueue(self, delivery: Delivery) -> str | None:
        """Queue for later; the reason it was not (QUEUE_FULL_*) when a bound is reached. The
        newest message is the one refused: what is queued keeps its order and nothing queued
        disappears (as Mosquitto and EMQX do)."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return QUEUE_FULL_MESSAGES
        budget = queue.budget
        if budget is not None:
            size = len(delivery.message.payload)
            if queue.bytes + size > budget.per_session:
                self.dropped += 1
                return QUEUE_FULL_BYTES
            if budget.queued + size > budget.total:
                self.dropped += 1
                return QUEUE_FULL_TOTAL
        self.touch()
        queue.append(delivery)
        return None


def monotonic() -> float:
    return time.monotonic()
