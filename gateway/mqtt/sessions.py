"""The session lifecycle: open (with the cluster's claim and a takeover), kick, detach, end,
revoke and expiry, in one place.

The broker keeps the tables (`broker.sessions`: client id -> Session, `broker.online`: client
id -> its channel, `broker.connecting`, `broker.pending_wills`) because routing reads them on
every message; only this module changes them. Channels call in (`open`, `detach`), and so do
the app (`revoke`, `sweep`) and the cluster (`kick`, `drop`, `end`, `taken_over_while_claiming`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway._native import mqtt
from gateway.auth import ADDED, DISABLED
from gateway.mqtt.channel import CLOSING, MqttChannel, OpenRequest
from gateway.mqtt.session import Message, Session, monotonic

if TYPE_CHECKING:
    from gateway.mqtt.broker import Broker

log = logging.getLogger("iotgw.mqtt")


@dataclass(slots=True)
class PendingWill:
    due: float
    message: Message


@dataclass(slots=True)
class _Claim:
    """A CONNECT waiting for its cluster claim."""

    channel: MqttChannel
    request: OpenRequest
    epoch: str
    # A newer CONNECT of the same client id on another node won meanwhile: (node, request,
    # wants the session), answered once this claim is settled.
    taken_over: tuple[str, int, bool] | None = None


class Sessions:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.claiming: dict[str, _Claim] = {}

    # ---- CONNECT -----------------------------------------------------------------------------

    def check_secret(
        self, user: str, password: bytes, keys: tuple[str, ...], later: Callable[[str], None]
    ) -> str | None:
        """The guard's verdict on a device secret now, or None and `later(verdict)` once the
        check ran off the loop."""
        broker = self.broker
        assert broker.registry is not None
        verdict = broker.guard.check_device("mqtt", broker.registry, user, password, keys)
        if isinstance(verdict, str):
            return verdict
        def answered(future: asyncio.Future[str]) -> None:
            later(future.result())
            broker.flush()  # outside any read: nothing else would write the answer now

        verdict.add_done_callback(answered)
        return None

    def open(self, channel: MqttChannel, request: OpenRequest) -> bool:
        """Give the channel its session (`channel.opened`), taking the client id over from an
        older connection. In a cluster the client id is claimed first: False, and the channel
        is called back once the claim is settled."""
        cluster = self.broker.cluster
        if cluster is None:
            self._open_here(channel, request, "")
            return True
        epoch = cluster.new_epoch()
        claim = _Claim(channel, request, epoch)
        self.claiming[request.client_id] = claim
        cluster.claim(request.client_id, epoch).add_done_callback(
            lambda f: self._claimed(claim, f)
        )
        return False

    def _claimed(self, claim: _Claim, future: asyncio.Future[Any]) -> None:
        """The claim is in: open now, or after another node let the client go."""
        cluster = self.broker.cluster
        assert cluster is not None
        client_id = claim.request.client_id
        try:
            previous = future.result()
        except Exception:
            log.exception("cluster claim of %s failed", client_id)
            self._settle(claim, None, failed=True)
            return
        if not cluster.held_elsewhere(previous):
            self._settle(claim, None)
            return

        async def take_over() -> None:
            try:
                packed = await cluster.take_over(
                    previous, client_id, not claim.request.clean_start
                )
            except Exception:
                log.exception("cluster takeover of %s failed", client_id)
                self._settle(claim, None, failed=True)
                return
            self._settle(claim, packed)

        asyncio.get_running_loop().create_task(take_over())

    def _settle(self, claim: _Claim, packed: Any, failed: bool = False) -> None:
        broker = self.broker
        cluster = broker.cluster
        assert cluster is not None
        channel, client_id, epoch = claim.channel, claim.request.client_id, claim.epoch
        if self.claiming.get(client_id) is claim:
            del self.claiming[client_id]
        if claim.taken_over is not None:  # a newer CONNECT elsewhere won while this one waited
            cluster.surrender(client_id, packed, *claim.taken_over)
            channel.abort("session taken over on another node")
            return
        if failed:
            channel.claim_failed()
            broker.flush()
            return
        if packed is not None:
            session = cluster.import_session(packed)
            if session is not None:
                session.cluster_epoch = epoch
        if channel.state >= CLOSING:  # closing or closed: the client left while it waited
            kept = broker.sessions.get(client_id)
            if kept is not None and kept.cluster_epoch == epoch:
                cluster.went_offline(client_id, epoch)
            else:
                cluster.released(client_id, epoch)
            return
        self._open_here(channel, claim.request, epoch)
        broker.flush()

    def taken_over_while_claiming(
        self, client_id: str, epoch: str, origin: str, request: int, want: bool
    ) -> bool:
        """A newer claim on another node names our `epoch` while our CONNECT still waits for
        its own claim: that CONNECT loses (answered once its claim is settled). False when no
        such CONNECT waits here."""
        claim = self.claiming.get(client_id)
        if claim is None or claim.epoch != epoch:
            return False
        claim.taken_over = (origin, request, want)
        return True

    def _open_here(self, channel: MqttChannel, request: OpenRequest, epoch: str) -> None:
        """The client id is ours: take it over from an older connection, resume or start the
        session, attach the channel."""
        broker = self.broker
        client_id = request.client_id
        previous = broker.online.get(client_id)
        if previous is not None:
            self.kick(previous, mqtt.SESSION_TAKEN_OVER, "session taken over")
        session = broker.sessions.get(client_id)
        present = False
        if session is not None and (
            request.clean_start
            or session.identity != request.identity
            or session.anonymous not in (request.anonymous, None)
        ):
            self.end(session)
            session = None
        if session is None:
            session = Session(
                client_id, request.version, request.identity, anonymous=request.anonymous
            )
            session.max_queue = broker.limits.max_queued_messages
        else:
            present = True
        session.version = request.version
        session.anonymous = request.anonymous
        session.expiry_interval = request.expiry
        session.send_quota = 65535
        session.cluster_epoch = epoch
        self.attach(channel, session)
        channel.opened(session, present)

    # ---- attach, detach, kick, end -------------------------------------------------------------

    def attach(self, channel: MqttChannel, session: Session) -> None:
        broker = self.broker
        broker.changes += 1
        broker.connecting.discard(channel)
        broker.online[session.client_id] = channel
        broker.sessions[session.client_id] = session
        broker.pending_wills.pop(session.client_id, None)  # a delayed will is off
        session.disconnected_at = None
        session.join(broker.journal, broker.budget)

    def detach(self, channel: MqttChannel, will: Message | None, will_delay: int) -> None:
        """The channel is done with its session: keep or end the session, publish or schedule
        the will."""
        broker = self.broker
        broker.connecting.discard(channel)
        session = channel.session
        if session is None or broker.online.get(session.client_id) is not channel:
            return  # never connected, or taken over by a newer connection
        del broker.online[session.client_id]
        now = monotonic()
        session.disconnected_at = now
        session.touch()
        if will is not None:
            delay = min(will_delay, session.expiry_interval)
            if delay <= 0:
                broker.publish(will)
            else:
                broker.pending_wills[session.client_id] = PendingWill(now + delay, will)
        if session.expiry_interval == 0:
            self.end(session)
        elif broker.cluster is not None:
            broker.cluster.went_offline(session.client_id, session.cluster_epoch)

    def kick(self, channel: MqttChannel, reason_code: int, why: str) -> None:
        """End a connected client's connection for a reason (taken over, revoked): the client
        reads the reason (MQTT 5), its will is published, its session is free at once."""
        channel.close_with(reason_code, why)
        will, channel.will = channel.will, None
        self.detach(channel, will, 0)

    def end(self, session: Session) -> None:
        pending = self.drop(session)
        if pending is not None:  # the will is published at the latest when the session ends
            self.broker.publish(pending.message)
        if self.broker.cluster is not None:
            self.broker.cluster.released(session.client_id, session.cluster_epoch)

    def drop(self, session: Session) -> PendingWill | None:
        """Forget a session here (it ended, or moved to another cluster node); returns its
        pending will, which the caller publishes or not."""
        broker = self.broker
        broker.changes += 1
        for topic_filter in session.subscriptions:
            broker.remove_subscription(session.client_id, topic_filter)
        if broker.sessions.get(session.client_id) is session:
            del broker.sessions[session.client_id]
            broker.journal.ended.add(session.client_id)
            session.leave()
        return broker.pending_wills.pop(session.client_id, None)

    def revoke(self, changes: dict[str, str]) -> int:
        """Devices removed, disabled or added in the registry (gateway/auth.py's REMOVED,
        DISABLED, ADDED): the connections of a removed or disabled device close (MQTT 5:
        DISCONNECT 0x98 Administrative action; 3.1.1: the socket closes) and a removed device's
        sessions end; an anonymous client acting as an id just registered goes, session and all.
        Matched by identity, so that it works whatever client id a device used. Returns the
        connections closed."""
        broker = self.broker
        closed = 0
        broker.forget_unregistered(changes)
        for session in [s for s in broker.sessions.values() if s.identity in changes]:
            op = changes[session.identity]
            if (op == ADDED) != session.anonymous:
                continue  # a registered device stays when its id is added again elsewhere
            channel = broker.online.get(session.client_id)
            if channel is not None:
                self.kick(channel, mqtt.ADMINISTRATIVE_ACTION, f"device {op}")
                closed += 1
            if op != DISABLED and broker.sessions.get(session.client_id) is session:
                self.end(session)
        if closed:
            broker.flush()
        return closed

    # ---- the sweep -----------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> None:
        """Every timeout of connections and sessions in one pass; called by the app twice a
        second. Then the broker's own sweep."""
        broker = self.broker
        now = monotonic() if now is None else now
        for channel in list(broker.connecting):
            if now - channel.accepted_at > broker.limits.connect_timeout:
                channel.abort("no CONNECT in time")
        for channel in list(broker.online.values()):
            if channel.keep_alive and now - channel.last_received > 1.5 * channel.keep_alive:
                channel.close_with(mqtt.KEEP_ALIVE_TIMEOUT, "keep-alive timeout")
        for client_id, pending in list(broker.pending_wills.items()):
            if now >= pending.due:
                del broker.pending_wills[client_id]
                broker.publish(pending.message)
        for session in list(broker.sessions.values()):
            if session.expired(now):
                self.end(session)
        broker.sweep(now)
