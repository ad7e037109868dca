"""What an operator does to a running gateway (REST `/v1/admin`, `iotgw clients|bans|retained`):
list and kick connected clients, inspect a session, ban client ids and source addresses, list
and delete retained messages. It works on the broker's public state (`online`, `sessions`,
`retained`) and the guard's operator bans; nothing here is on a client's path.

In a cluster (`--cluster`, `--workers`) every call sees the whole cluster, whichever node's REST
API answers it. Bans are kept in a Redis hash that each node reads every second
(`sync_forever`). The client list is asked of every live node and merged; a kick or a session
lookup goes to the node the cluster's client registry names (`Nodes.locate`); the other nodes
answer through `answer`. A node that does not answer in time is named (`incomplete`, or
NodeUnavailable) rather than waited for. A retained message deleted here is deleted on every
node (through the cluster's retained store)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway._native import mqtt
from gateway.guard import AuthGuard, OperatorBan
from gateway.mqtt.broker import Broker
from gateway.mqtt.session import Message, Session

log = logging.getLogger("iotgw.admin")

# HDEL of a hash field only if it still holds the value read: an expired ban is not deleted
# over one placed again under its key in the meantime.
_DELETE_IF_UNCHANGED = (
    "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then "
    "return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0"
)
BANS_KEY = "iotgw:bans"  # Redis hash: ban key -> {"until", "reason"} (a cluster's bans)
BAN_SYNC_INTERVAL = 1.0  # seconds between two reads of the cluster's bans

CLIENT_ID = "client_id"
ADDRESS = "address"
_PREFIX = {CLIENT_ID: "id:", ADDRESS: "addr:"}


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None  # pass as `after` for the next page; None: this was the last
    incomplete: list[str] = field(default_factory=list)  # nodes that did not answer


class Nodes(Protocol):
    """The cluster, as the admin needs it (gateway/cluster.py): questions to other nodes (each
    answers with its Admin.answer) and where a client id is held."""

    async def ask(
        self, question: Any, nodes: list[str] | None = None
    ) -> tuple[dict[str, Any], list[str]]:
        """Answers by node from `nodes` (None: every other live node), and the nodes that
        gave none in time."""
        ...

    async def locate(self, client_ids: list[str]) -> dict[str, tuple[str, bool]]:
        """The node holding each client id's connection or session (and whether online)."""
        ...


class NodeUnavailable(Exception):
    """The node holding a client did not answer in time."""

    def __init__(self, node: str) -> None:
        super().__init__(f"node {node} holds it and did not answer in time")
        self.node = node


def _page(keys: list[str], after: str | None, limit: int) -> tuple[list[str], str | None]:
    keys = sorted(k for k in keys if after is None or k > after)
    shown = keys[:limit]
    return shown, (shown[-1] if len(keys) > limit else None)


class Admin:
    def __init__(
        self, broker: Broker, guard: AuthGuard, node_id: str, redis: Redis | None = None,
        nodes: Nodes | None = None,
    ) -> None:
        """`redis`, `nodes`: the cluster's, when there is one: bans are shared through Redis,
        clients and sessions are looked for on every node."""
        self.broker = broker
        self.guard = guard
        self.node_id = node_id
        self.redis = redis
        self.nodes = nodes
        self._sync_failed = False
        self._unstored: dict[str, OperatorBan] = {}  # bans Redis could not take yet
        self._unremoved: set[str] = set()  # lifted bans Redis could not forget yet

    # ---- clients and sessions ---------------------------------------------------------------

    async def clients(self, prefix: str = "", after: str | None = None, limit: int = 100) -> Page:
        """Connected MQTT clients, by client id, of every node: each node gives its first
        `limit` after `after`, the merge is cut at `limit`."""
        items, following = self.answer(["clients", prefix, after, limit])
        if self.nodes is None:
            return Page(items, following)
        answers, incomplete = await self.nodes.ask(["clients", prefix, after, limit])
        more = following is not None
        for node_items, node_following in answers.values():
            items.extend(node_items)
            more = more or node_following is not None
        items.sort(key=lambda c: (c["client_id"], c["node"]))
        shown = items[:limit]
        last = shown[-1]["client_id"] if shown and (more or len(items) > limit) else None
        return Page(shown, last, incomplete)

    async def kick(self, client_id: str, discard_session: bool = False) -> bool:
        """Disconnect a client (MQTT 5: DISCONNECT 0x98 Administrative action) on the node
        holding it, and end its session if asked; False if it is neither connected nor has a
        session to discard."""
        return bool(await self._ask_holder(client_id, ["kick", client_id, discard_session]))

    async def session(self, client_id: str) -> dict[str, Any] | None:
        """A session, online or persistent and offline, on whichever node holds it; None if
        there is none."""
        found: dict[str, Any] | None = await self._ask_holder(client_id, ["session", client_id])
        return found

    async def _ask_holder(self, client_id: str, question: list[Any]) -> Any:
        """`question` answered by the node holding `client_id` (this one when no node does,
        or without a cluster). NodeUnavailable if that node does not answer in time; a
        RedisError if the cluster's registry cannot be read."""
        if self.nodes is not None:
            node = (await self.nodes.locate([client_id])).get(client_id, (self.node_id,))[0]
            if node != self.node_id:
                answers, _ = await self.nodes.ask(question, [node])
                if node not in answers:
                    raise NodeUnavailable(node)
                return answers[node]
        return self.answer(question)

    def answer(self, question: list[Any]) -> Any:
        """This node's answer to an admin question (asked here, or by another node through
        the cluster): ["clients", prefix, after, limit] -> [items, next];
        ["kick", client_id, discard_session] -> bool; ["session", client_id] -> dict | None."""
        match question:
            case ["clients", str(prefix), after, int(limit)]:
                online = self.broker.online
                ids, following = _page([c for c in online if c.startswith(prefix)], after, limit)
                return [[self._client(online[c], self.broker.sessions.get(c)) for c in ids],
                        following]
            case ["kick", str(client_id), bool(discard_session)]:
                return self._kick_here(client_id, discard_session)
            case ["session", str(client_id)]:
                return self._session_here(client_id)
        raise ValueError(f"not an admin question: {question!r}")

    def _client(self, conn: Any, session: Session | None) -> dict[str, Any]:
        outgoing, queue, subscriptions, _ = session.state() if session else ({}, [], {}, set())
        return {
            "client_id": session.client_id if session else "",
            "node": self.node_id,
            "identity": session.identity if session else None,
            "protocol": "mqtt5" if conn.version == 5 else "mqtt3.1.1",
            "peer": conn.peer,
            "keep_alive": conn.keep_alive,
            "subscriptions": len(subscriptions),
            "inflight": len(outgoing),
            "queued": len(queue),
        }

    def _session_here(self, client_id: str) -> dict[str, Any] | None:
        session = self.broker.sessions.get(client_id)
        if session is None:
            return None
        outgoing, queue, subscriptions, incoming = session.state()
        conn = self.broker.online.get(client_id)
        return {
            "client_id": client_id,
            "node": self.node_id,
            "identity": session.identity,
            "anonymous": bool(session.anonymous),
            "online": conn is not None,
            "peer": conn.peer if conn is not None else None,
            "protocol": "mqtt5" if session.version == 5 else "mqtt3.1.1",
            "expiry_interval": session.expiry_interval,
            "subscriptions": [
                {"filter": f, "qos": o.qos, "no_local": o.no_local,
                 "retain_as_published": o.retain_as_published,
                 "retain_handling": o.retain_handling, "identifier": o.identifier}
                for f, o in sorted(subscriptions.items())
            ],
            "inflight": len(outgoing),
            "queued": len(queue),
            "queued_bytes": queue.bytes,
            "awaiting_pubrel": len(incoming),
            "dropped": session.dropped,
        }

    def _kick_here(self, client_id: str, discard_session: bool = False) -> bool:
        broker = self.broker
        conn = broker.online.get(client_id)
        if conn is not None:  # as a close: its will goes out
            broker.lifecycle.kick(conn, mqtt.ADMINISTRATIVE_ACTION, "kicked by an operator")
        session = broker.sessions.get(client_id)
        if discard_session and session is not None:
            broker.lifecycle.end(session)
        broker.flush()
        return conn is not None or (discard_session and session is not None)

    # ---- bans ---------------------------------------------------------------------------------

    async def ban(
        self, kind: str, value: str, seconds: float | None, reason: str = ""
    ) -> OperatorBan:
        """Refuse a client id or a source address from now on (`seconds`: for that long), on
        every node of a cluster, and kick the connected clients it matches. ValueError for a
        kind or address that is not; RedisError when a cluster's Redis cannot store it."""
        key = ban_key(kind, value)
        ban = self.guard.bans.add(key, seconds, reason)
        self._unremoved.discard(key)
        self._kick_banned([ban])
        if self.redis is not None:
            try:
                await self._store(ban)
            except (RedisError, OSError):
                self._unstored[key] = ban  # the next sync that reaches Redis stores it
                raise
        return ban

    async def _store(self, ban: OperatorBan) -> None:
        assert self.redis is not None
        await self.redis.hset(BANS_KEY, ban.key, json.dumps(
            {"until": ban.until, "reason": ban.reason}))

    async def unban(self, kind: str, value: str) -> bool:
        key = ban_key(kind, value)
        self._unstored.pop(key, None)
        removed = self.guard.bans.remove(key)
        if self.redis is not None:
            try:
                removed = bool(await self.redis.hdel(BANS_KEY, key)) or removed
            except (RedisError, OSError):
                self._unremoved.add(key)  # the next sync that reaches Redis removes it
                raise
        return removed

    def _kick_banned(self, bans: list[OperatorBan]) -> None:
        keys = {b.key for b in bans}
        for client_id, conn in list(self.broker.online.items()):
            if keys & {f"id:{client_id}", f"addr:{conn.peer_host}"}:
                self._kick_here(client_id)

    async def sync_forever(self) -> None:
        """A cluster node: hold the cluster's bans, read every BAN_SYNC_INTERVAL seconds."""
        while True:
            await asyncio.sleep(BAN_SYNC_INTERVAL)
            try:
                await self.sync()
            except Exception:  # a bug here must not end the synchronisation for good
                log.exception("synchronising the cluster's bans failed")

    async def sync(self) -> None:
        assert self.redis is not None
        try:
            # What an operator changed here while Redis was away goes there first.
            for key, ban in list(self._unstored.items()):
                if ban.until is None or ban.until > time.time():
                    await self._store(ban)
                del self._unstored[key]
            for key in list(self._unremoved):
                await self.redis.hdel(BANS_KEY, key)
                self._unremoved.discard(key)
            stored: dict[bytes | str, bytes | str] = await self.redis.hgetall(BANS_KEY)
        except (RedisError, OSError) as exc:  # keep the bans we have; say so once
            if not self._sync_failed:
                log.warning("cannot read the cluster's bans from Redis (%s): keeping the %d "
                            "known here", exc, len(self.guard.bans.list()))
            self._sync_failed = True
            return
        if self._sync_failed:
            log.info("reading the cluster's bans from Redis again")
        self._sync_failed = False
        now = time.time()
        bans = []
        expired = []
        for raw_key, raw in stored.items():
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            try:
                doc = json.loads(raw)
                ban = OperatorBan(key, doc["until"], str(doc.get("reason", "")))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable ban in Redis: %r", raw_key)
                continue
            if ban.until is not None and ban.until <= now:
                expired.append((key, raw))
                continue
            bans.append(ban)
        self._kick_banned(self.guard.bans.replace(bans))
        for key, raw in expired:  # off the hash too (any node may), unless placed again since
            with contextlib.suppress(RedisError, OSError):
                await self.redis.eval(_DELETE_IF_UNCHANGED, 1, BANS_KEY, key, raw)

    def bans(self) -> list[dict[str, Any]]:
        return [ban_json(b) for b in self.guard.bans.list()]

    # ---- retained messages --------------------------------------------------------------------

    def retained(self, prefix: str = "", after: str | None = None, limit: int = 100) -> Page:
        found = {t: m for t, m in self.broker.retained.items() if t.startswith(prefix)}
        topics, following = _page(list(found), after, limit)
        return Page([{"topic": t, "bytes": len(found[t].payload), "qos": found[t].qos}
                     for t in topics], following)

    def delete_retained(self, topic: str) -> bool:
        broker = self.broker
        if not broker.retained.delete(topic):
            return False
        if broker.cluster is not None:  # its retained store tells every node
            broker.cluster.retain(Message(topic, b"", 0, True, origin="$admin"))
        else:
            broker.journal.retained.add(topic)  # the next save deletes it from the file
        broker.changed()
        return True


def ban_key(kind: str, value: str) -> str:
    if kind not in _PREFIX:
        raise ValueError(f"a ban is by {CLIENT_ID} or {ADDRESS}, not {kind!r}")
    if not value:
        raise ValueError(f"give the {kind} to ban")
    if kind == ADDRESS:
        try:
            value = str(ipaddress.ip_address(value))  # one spelling per address
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
    return _PREFIX[kind] + value


def ban_json(ban: OperatorBan) -> dict[str, Any]:
    kind, value = (CLIENT_ID, ban.key[3:]) if ban.key.startswith("id:") else (ADDRESS, ban.key[5:])
    return {"kind": kind, "value": value, "until": ban.until, "reason": ban.reason}
