"""Observe (RFC 7641): who observes what, and how notifications go out.

An observer is (peer, token) on one resource: `("shadow", id)`, `("delta", id)` or
`("commands", id)`. Registering again with the same (peer, token) replaces the entry, keeping
its Observe sequence so that the numbers keep increasing. Notifications carry the observer's
next 24-bit Observe number.

Notification type: NON by default; CON for every `con_every`-th notification, when the last
CON is `con_interval` seconds old (24 h), and whenever the caller asks (commands published
with QoS >= 1). One CON at a time per observer (RFC 7641 4.5.2): a newer state notification
takes the place of the one in flight (same retransmission counter and timeout, new message
id), while events (commands) queue behind it (bounded; overflow counted) so that none is
lost or reordered. An observer goes when a CON notification is not acknowledged after
MAX_RETRANSMIT retransmissions, when the client answers a notification with RST, when it
sends Observe 1 or when the resource goes away (a 4.04 notification, without Observe).

Observers that hear nothing for `con_interval` are probed: the sweep asks the resource layer
(`probe`) to send them their current state as a CON, so that observers of peers that went
away are noticed even on a resource that never changes.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from gateway._native import coap
from gateway.coap.blockwise import block2_slice
from gateway.coap.exchanges import Addr, Outgoing, Retransmitter

SHADOW = "shadow"
DELTA = "delta"
COMMANDS = "commands"

OBSERVE_MASK = 0xFFFFFF
NON_NOTIFICATION_MEMORY = 60.0  # seconds an RST to a NON notification still deregisters
MAX_NON_REMEMBERED = 65536  # NON notifications remembered for that


class Observer:
    __slots__ = (
        "addr",
        "anonymous",
        "device",
        "inflight",
        "key",
        "kind",
        "last_con",
        "last_delta",
        "last_version",
        "queue",
        "ready",
        "seq",
        "since_con",
        "token",
    )

    def __init__(self, kind: str, device: str, addr: Addr, token: bytes, now: float) -> None:
        self.kind = kind
        self.device = device
        self.addr = addr
        self.token = token
        self.key = (addr, token)
        self.anonymous = False  # registered without a token
        self.seq = 2  # the registration response carries the next number
        self.ready = False  # the registration response has gone out
        self.last_version: int | None = None
        self.last_delta: Any = None
        self.inflight: Outgoing | None = None
        self.queue: deque[tuple[int, list[tuple[int, Any]], bytes]] | None = None
        self.since_con = 0
        self.last_con = now

    @property
    def resource(self) -> tuple[str, str]:
        return self.kind, self.device

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & OBSERVE_MASK
        return self.seq

    def __repr__(self) -> str:
        return f"<Observer {self.kind}/{self.device} {self.addr} token={self.token.hex()}>"


class ObserveRegistry:
    def __init__(
        self,
        retransmitter: Retransmitter,
        send: Callable[[bytes, Addr], None],
        *,
        max_observers: int,
        max_per_resource: int,
        con_every: int,
        con_interval: float,
        max_queued: int = 32,
    ) -> None:
        self.rt = retransmitter
        self.send = send
        self.max_observers = max_observers
        self.max_per_resource = max_per_resource
        self.con_every = con_every
        self.con_interval = con_interval
        self.max_queued = max_queued
        self.by_key: dict[tuple[Addr, bytes], Observer] = {}
        self.by_resource: dict[tuple[str, str], dict[tuple[Addr, bytes], Observer]] = {}
        self._non_sent: dict[tuple[Addr, int], Observer] = {}
        self._non_deadlines: deque[tuple[float, tuple[Addr, int]]] = deque()
        self._probes: list[tuple[float, int, Observer]] = []
        self._order = itertools.count()
        # Hooks set by the resource layer.
        self.on_removed: Callable[[Observer], None] = lambda obs: None
        self.probe: Callable[[Observer], None] = lambda obs: None
        self.notifications = 0
        self.refused = 0  # registrations over the limits (answered without Observe)
        self.dropped = 0  # observers removed because a CON notification failed
        self.queue_overflow = 0  # events dropped from a full per-observer queue

    def __len__(self) -> int:
        return len(self.by_key)

    # ---- registration --------------------------------------------------------------------

    def register(
        self, kind: str, device: str, addr: Addr, token: bytes, now: float
    ) -> Observer | None:
        """The observer for (addr, token) on this resource (replacing an earlier one), or None
        when a limit is reached: the request is then answered without Observe."""
        old = self.by_key.get((addr, token))
        members = self.by_resource.get((kind, device))
        if old is None and (
            len(self.by_key) >= self.max_observers
            or (members is not None and len(members) >= self.max_per_resource)
        ):
            self.refused += 1
            return None
        obs = Observer(kind, device, addr, token, now)
        if old is not None:
            obs.seq = old.seq
            self.remove(old)
        if members is None:
            members = self.by_resource[(kind, device)] = {}
        members[obs.key] = obs
        self.by_key[obs.key] = obs
        heapq.heappush(self._probes, (now + self.con_interval, next(self._order), obs))
        return obs

    def lookup(self, addr: Addr, token: bytes) -> Observer | None:
        return self.by_key.get((addr, token))

    def remove(self, obs: Observer) -> None:
        if self.by_key.get(obs.key) is not obs:
            return
        del self.by_key[obs.key]
        members = self.by_resource.get(obs.resource)
        if members is not None:
            members.pop(obs.key, None)
            if not members:
                del self.by_resource[obs.resource]
        if obs.inflight is not None:
            self.rt.acknowledge(obs.inflight.addr, obs.inflight.mid)
            obs.inflight = None
        obs.queue = None
        self.on_removed(obs)

    def end_device(
        self, device: str, code: int, reason: bytes, now: float, anonymous_only: bool = False
    ) -> int:
        """End every observation of one device's resources (only those made without a token,
        with `anonymous_only`) with a final `code` notification (the device was removed or
        disabled, or registered); returns how many ended."""
        ended = 0
        for kind in (SHADOW, DELTA, COMMANDS):
            for obs in self.observers(kind, device):
                if obs.anonymous or not anonymous_only:
                    self.notify(obs, code, (), reason, now)
                    ended += 1
        return ended

    def end_peers(self, peers: set[Addr]) -> int:
        """Forget every observation of these peers (their DTLS sessions ended): no final
        notification, there is no session to send it in."""
        gone = [obs for obs in self.by_key.values() if obs.addr in peers]
        for obs in gone:
            self.remove(obs)
        return len(gone)

    def observers(self, kind: str, device: str) -> list[Observer]:
        members = self.by_resource.get((kind, device))
        return list(members.values()) if members else []

    def observes(self, kind: str, device: str) -> bool:
        return (kind, device) in self.by_resource

    def alive(self, obs: Observer) -> bool:
        return self.by_key.get(obs.key) is obs

    # ---- notifications -------------------------------------------------------------------

    def notify(
        self,
        obs: Observer,
        code: int,
        options: Sequence[tuple[int, Any]],
        payload: bytes,
        now: float,
        *,
        confirmable: bool = False,
        event: bool = False,
    ) -> None:
        """Send one notification. A code other than 2.xx ends the observation: it goes
        without Observe and the observer is removed."""
        if not self.alive(obs):
            return
        final = code >> 5 != 2
        if event and obs.inflight is not None:
            if obs.queue is None:
                obs.queue = deque()
            if len(obs.queue) >= self.max_queued:
                obs.queue.popleft()
                self.queue_overflow += 1
            obs.queue.append((code, list(options), payload))
            return
        opts = list(options)
        if not final:
            opts.append((coap.OBSERVE, obs.next_seq()))
        sliced = block2_slice(opts, payload, None)
        assert sliced is not None  # block 0 always exists
        opts, payload = sliced
        self.notifications += 1
        obs.since_con += 1
        con = (
            confirmable
            or obs.inflight is not None
            or obs.since_con >= self.con_every
            or now - obs.last_con >= self.con_interval
        )
        addr = obs.addr
        if con and not final:
            mid = self.rt.next_mid(addr)
            data = coap.encode(coap.CON, code, mid, obs.token, opts, payload)
            obs.since_con = 0
            obs.last_con = now
            if obs.inflight is not None and not obs.inflight.done:
                self.rt.replace(obs.inflight, mid, data)
            else:
                obs.inflight = self.rt.send_con(addr, mid, data, now, owner=obs)
            return
        mid = self.rt.next_mid(addr)
        self.send(coap.encode(coap.NON, code, mid, obs.token, opts, payload), addr)
        if final:
            self.remove(obs)
            return
        key = (addr, mid)
        self._non_sent[key] = obs
        deadlines = self._non_deadlines
        deadlines.append((now + NON_NOTIFICATION_MEMORY, key))
        if len(deadlines) > MAX_NON_REMEMBERED:  # bounded: the oldest are forgotten first
            self._non_sent.pop(deadlines.popleft()[1], None)

    # ---- what comes back -------------------------------------------------------------------

    def acknowledged(self, out: Outgoing, now: float) -> None:
        """The client ACKed a CON notification: send the next queued event, if any."""
        obs = out.owner
        if not isinstance(obs, Observer) or obs.inflight is not out:
            return
        obs.inflight = None
        if obs.queue:
            code, options, payload = obs.queue.popleft()
            self.notify(obs, code, options, payload, now, confirmable=True, event=True)

    def reset(self, addr: Addr, mid: int, out: Outgoing | None) -> bool:
        """An RST for (addr, mid): if it answers a notification, that observation ends."""
        obs = out.owner if out is not None else self._non_sent.pop((addr, mid), None)
        if isinstance(obs, Observer):
            self.remove(obs)
            return True
        return False

    def failed(self, out: Outgoing) -> None:
        """A CON notification was never acknowledged: the client is gone."""
        obs = out.owner
        if isinstance(obs, Observer) and obs.inflight is out:
            obs.inflight = None
            self.dropped += 1
            self.remove(obs)

    # ---- sweep ---------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        queue = self._non_deadlines
        while queue and queue[0][0] <= now:
            _, key = queue.popleft()
            self._non_sent.pop(key, None)
        probes = self._probes
        while probes and probes[0][0] <= now:
            _, _, obs = heapq.heappop(probes)
            if not self.alive(obs):
                continue
            due = obs.last_con + self.con_interval
            if due <= now and obs.inflight is None:
                obs.since_con = self.con_every  # the next notification goes as CON
                self.probe(obs)
                due = now + self.con_interval
            heapq.heappush(probes, (max(due, now + 1.0), next(self._order), obs))

    def clear(self) -> None:
        for obs in list(self.by_key.values()):
            self.remove(obs)
        self._non_sent.clear()
        self._non_deadlines.clear()
        self._probes.clear()
