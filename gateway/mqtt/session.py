"""Session state of one MQTT client: subscriptions, QoS flows in both directions, the offline
queue. Pure data and bookkeeping; the broker and the connection do the I/O."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Outgoing QoS states: what we wait for from the client.
AWAIT_PUBACK, AWAIT_PUBREC, AWAIT_PUBCOMP = 1, 2, 3

NEVER_EXPIRES = 0xFFFFFFFF


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


@dataclass(eq=False)
class Session:
    client_id: str
    version: int
    identity: str  # authenticated device id (or the client id if anonymous)
    expiry_interval: int = 0  # seconds after disconnect; NEVER_EXPIRES for ever
    subscriptions: dict[str, SubOptions] = field(default_factory=dict)
    outgoing: dict[int, Delivery] = field(default_factory=dict)  # in flight, by packet id
    queue: deque[Delivery] = field(default_factory=deque)  # waiting for a send slot
    incoming_qos2: set[int] = field(default_factory=set)  # PUBREC sent, PUBREL awaited
    send_quota: int = 65535  # the client's Receive Maximum
    max_queue: int = 1000
    disconnected_at: float | None = None
    dropped: int = 0
    cluster_epoch: str = ""  # the claim in the cluster's client registry (gateway/cluster.py)
    # Connected without credentials (acting as its client id); None: restored from a snapshot
    # of a version that did not record it.
    anonymous: bool | None = False
    _next_id: int = 0

    def next_packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.outgoing:
                return self._next_id
        raise RuntimeError("all 65535 packet identifiers are in flight")

    def can_send_now(self) -> bool:
        return len(self.outgoing) < self.send_quota

    def expired(self, now: float) -> bool:
        if self.disconnected_at is None or self.expiry_interval == NEVER_EXPIRES:
            return False
        return now - self.disconnected_at >= self.expiry_interval

    def enqueue(self, delivery: Delivery) -> bool:
        """Queue for later; False (and counted) when the bounded queue is full."""
        if len(self.queue) >= self.max_queue:
            self.dropped += 1
            return False
        self.queue.append(delivery)
        return True


def monotonic() -> float:
    return time.monotonic()
