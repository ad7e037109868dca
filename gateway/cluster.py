"""Gateway nodes sharing one Redis: the MQTT broker as a cluster (DESIGN.md, "Scaling past one
machine"). Every node (a process: `iotgw run --workers N` starts N of them on one machine, and
machines add more) is a whole broker for the clients connected to it; Redis carries what crosses
nodes:

- Routes. Each node announces the topic filters it has subscribers for (MQTT sessions, shared
  groups, the gateway's own internal subscribers) when a filter gains its first or loses its last
  subscriber. Every node keeps the others' filters in a trie, so a PUBLISH is forwarded only to
  the nodes with a matching filter, once per node, over that node's Redis pub/sub channel.
  Announcements are ordered per node by a sequence number, so a node that joins loads the
  current tables and then applies only newer changes. Route changes travel in milliseconds:
  a message published elsewhere in the instant after a SUBACK may miss the new subscriber
  (eventual consistency, as in EMQX's route replication).
- Shared subscriptions. `$share/{group}/{filter}` is a route too; the publishing node picks one
  node among those with members (round robin) and that node picks one member.
- Client ids. `iotgw:client:{id}` names the node (and connection epoch) holding a client's
  connection or persistent session. A CONNECT claims it (`SET ... GET`); if another node held
  it, that node is told to take the old connection down (0x8E) and, when the client asked to
  resume its session, to hand the session over (subscriptions, in-flight and queued messages).
- Retained messages live in a Redis hash; every change is applied by a script that also
  broadcasts it, so every node's copy sees the changes in one order.
- Liveness. Nodes write a heartbeat; a node silent for `DEAD_AFTER` seconds is treated as gone
  (its routes are dropped, no one waits for it to answer a takeover).

- Flow control. A node confirms now and then how many bytes of forwarded messages it has
  handled from each other node; a node with too much unconfirmed towards another stops reading
  from its publishing clients until the other catches up (pub/sub has no backpressure).
  Forwarded messages carry a number and the bytes sent before them, so a receiver counts the
  ones Redis dropped (it drops a subscriber that falls too far behind) and confirms past them;
  a node held back probes the lagging node once a beat, so a loss cannot hold it for ever.
- Questions. A node may ask others a question (ASK) and gather their answers (ANSWER) for a
  bounded time: the admin API's cluster-wide client list, kick and session lookup. The
  cluster only carries them; `answer` (the admin's, wired in app.py) says what they mean.

Redis is spoken in RESP directly (`shadow/resp.py`): one pipeline of commands per event-loop
turn, one subscriber connection whose messages are handled a read at a time. Wire format:
msgpack arrays on `iotgw:node:{node}` (PUB, KICK, KICKED, CREDIT, PROBE, ASK, ANSWER),
`iotgw:routes` and `iotgw:retained`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import hiredis
import msgpack
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway._native import mqtt
from gateway.mqtt import persistence
from gateway.mqtt.session import Message, Session, monotonic
from gateway.mqtt.topics import SubscriptionTrie
from shadow import resp

if TYPE_CHECKING:
    from gateway.metrics import ClusterMetrics
    from gateway.mqtt.broker import Broker
    from gateway.mqtt.channel import MqttChannel

log = logging.getLogger("iotgw.cluster")

PREFIX = "iotgw:"
ROUTES_CHANNEL = PREFIX + "routes"
RETAINED_CHANNEL = PREFIX + "retained"
RETAINED_KEY = PREFIX + "retained"
NODES_KEY = PREFIX + "nodes"  # hash: node -> last heartbeat, ms since the epoch
HEARTBEAT = 1.0  # seconds
DEAD_AFTER = 5.0  # seconds without a heartbeat
TAKEOVER_TIMEOUT = 3.0  # seconds a CONNECT waits for another node to hand a session over
# Flow control: bytes sent to one node that it has not yet confirmed handling. Above the high
# mark the connections publishing here stop being read until it is below the low one (Redis
# would otherwise buffer without bound, and at 32 MB drop the slow node's subscription).
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20
PAUSE_REASON = "cluster"  # why a held publisher's connection does not read
CREDIT_EVERY = 256 << 10  # confirm after handling this many bytes from one node (or a beat)
ASK_TIMEOUT = 3.0  # seconds a question waits for the other nodes' answers

PUB, KICK, KICKED, CREDIT, PROBE, ASK, ANSWER = 0, 1, 2, 3, 4, 5, 6

# Routes of one node: a hash of filters and a sequence number, changed and announced atomically.
_ROUTES_SCRIPT = """
local change = cmsgpack.unpack(ARGV[1])
if ARGV[4] == '1' then redis.call('DEL', KEYS[1]) end
for _, f in ipairs(change[1]) do redis.call('HSET', KEYS[1], f, 1) end
for _, f in ipairs(change[2]) do redis.call('HDEL', KEYS[1], f) end
local seq = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[2], seq .. ' ' .. ARGV[3])
return seq
"""
# Heartbeats in Redis's clock, so that nodes on machines whose clocks differ agree on who is alive.
_HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now)
return {now, redis.call('HGETALL', KEYS[1])}
"""
_ROUTES_READ_SCRIPT = """
return {redis.call('GET', KEYS[2]) or '0', redis.call('HKEYS', KEYS[1])}
"""
_RETAIN_SCRIPT = """
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
# The client registry's value is "{node}|{epoch}|{1 online, 0 offline session}".
_RELEASE_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
  return 1
end
return 0
"""
_RECLAIM_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


_SCRIPTS = {
    "heartbeat": _HEARTBEAT_SCRIPT,
    "routes": _ROUTES_SCRIPT,
    "routes_read": _ROUTES_READ_SCRIPT,
    "retain": _RETAIN_SCRIPT,
    "release": _RELEASE_SCRIPT,
    "reclaim": _RECLAIM_SCRIPT,
}


def _noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def _routes_key(node: str) -> str:
    return f"{PREFIX}routes:{{{node}}}"


def _routes_seq_key(node: str) -> str:
    return f"{PREFIX}routes-seq:{{{node}}}"


def _client_key(client_id: str) -> str:
    return f"{PREFIX}client:{client_id}"


def _node_channel(node: str) -> str:
    return f"{PREFIX}node:{node}"


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


class Cluster:
    def __init__(
        self, broker: Broker, redis_url: str, node_id: str, metrics: ClusterMetrics,
        answer: Callable[[Any], Any] | None = None,
    ) -> None:
        """`answer`: what this node answers to another's question (msgpack-able both)."""
        if "|" in node_id:
            raise ValueError("a node id must not contain '|'")
        self.broker = broker
        self.node_id = node_id
        self.metrics = metrics
        # A connection Redis closed (a restart) is retried on a new one, a few times.
        self.redis: Redis = Redis.from_url(
            redis_url,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[RedisConnectionError, ConnectionError, TimeoutError],
        )
        self._pipe = resp.Pipe(self.redis)
        self._subscriber = resp.Subscriber(
            self.redis, [_node_channel(self.node_id), ROUTES_CHANNEL, RETAINED_CHANNEL]
        )
        # Flow control (bytes): sent to / confirmed by each node; handled from / confirmed to.
        self._sent: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        self._handled: dict[str, int] = {}
        self._credited: dict[str, int] = {}
        # Forwarded messages are numbered per receiving node, so that a receiver can count the
        # ones Redis dropped (pub/sub delivers at most once and says nothing when it drops).
        self._pub_numbers: dict[str, int] = {}  # node -> number of the last message sent to it
        self._pub_seen: dict[str, int] = {}  # origin -> number of the last message from it
        self.blocked = False  # some node is over HIGH_WATER
        self.subscribed = False  # the Redis subscription is up (notes are coming in)
        self._held: set[MqttChannel] = set()
        # Other nodes' routes: ordinary filters keyed by node; shared ones keyed by
        # (node, "$share/g/f") under the inner filter.
        self.routes: SubscriptionTrie[str, bool] = SubscriptionTrie()
        self.shared_routes: SubscriptionTrie[tuple[str, str], str] = SubscriptionTrie()
        self._node_filters: dict[str, set[str]] = {}
        self._node_seq: dict[str, int] = {}
        self.alive: dict[str, float] = {}  # node -> last heartbeat (Redis clock, seconds)
        self._clock_offset = 0.0  # Redis's clock minus ours
        # Our routes: subscriber count per filter, and the changes not yet announced.
        self._local: dict[str, int] = {}
        self._adds: set[str] = set()
        self._removes: set[str] = set()
        self._turns: dict[str, int] = {}
        # Redis commands go out in order, batched per loop turn: (args, future or None).
        self._outbox: list[tuple[bytes, asyncio.Future[Any] | None]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._incarnation = secrets.token_hex(4)
        self._epochs = itertools.count(1)
        self._requests = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._answer = answer
        self._questions: dict[int, dict[str, asyncio.Future[Any]]] = {}  # request -> by node
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scripts: dict[str, Any] = {}

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._load_scripts()
        await self._subscriber.subscribe()
        self.subscribed = True
        await self._heartbeat()
        await self._set_routes([])  # a restarted node then announces what it restores
        await self._load_routes()
        await self._load_retained()
        self._spawn(self._read_forever())
        self._spawn(self._heartbeat_forever())
        log.info("cluster node %s joined (%d other nodes)", self.node_id, len(self._node_filters))

    async def stop(self) -> None:
        """Leave: our routes go, and other nodes stop counting on us."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self._flush_now()
        try:
            await self._set_routes([])
            await self.redis.hdel(NODES_KEY, self.node_id)
        except Exception:  # Redis is away: the others will notice our silence instead
            log.warning("cluster: could not say goodbye to Redis", exc_info=True)
        finally:
            self._subscriber.close()
            self._pipe.close()
            await self.redis.aclose()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat(self) -> None:
        now_ms, flat = await self.redis.evalsha(
            self._scripts["heartbeat"], 1, NODES_KEY, self.node_id
        )
        now = int(now_ms) / 1000
        self._clock_offset = now - time.time()
        beats = {flat[i].decode(): int(flat[i + 1]) / 1000 for i in range(0, len(flat), 2)}
        self.alive = {node: beat for node, beat in beats.items() if now - beat < DEAD_AFTER}
        for node in list(self._node_filters):
            if node not in self.alive:
                log.warning("cluster node %s is gone: dropping its routes", node)
                self._replace_routes(node, set())
        for node in list(self._sent):
            if node not in self.alive:  # what it did not confirm will not be confirmed
                del self._sent[node]
                self._confirmed.pop(node, None)
        self._send_credits(0)
        self._check_flow()
        self._probe_laggards()
        self.metrics.nodes.set(len(self.alive))

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self._heartbeat()
            except Exception:  # Redis away for a moment: try again at the next beat
                log.exception("cluster heartbeat failed")

    def wall(self) -> float:
        """Now in Redis's clock (the nodes' shared time: heartbeats, times in shared state)."""
        return time.time() + self._clock_offset

    def is_alive(self, node: str) -> bool:
        seen = self.alive.get(node)
        return seen is not None and self.wall() - seen < DEAD_AFTER

    # ---- sending: one pipeline per loop turn, in order ----------------------------------------

    def _send(self, *args: Any, reply: bool = False) -> asyncio.Future[Any] | None:
        if self._adds or self._removes:  # routes first: what follows may depend on them
            self._announce_routes()
        future = asyncio.get_running_loop().create_future() if reply else None
        self._outbox.append((resp.pack(*args), future))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush_loop())
        return future

    async def _flush_loop(self) -> None:
        try:
            while self._outbox or self._adds or self._removes:
                await self._flush_now()
        finally:
            self._flushing = None

    async def _flush_now(self) -> None:
        if self._adds or self._removes:
            self._announce_routes()
        batch, self._outbox = self._outbox, []
        if not batch:
            return
        try:
            replies = await self._pipe.execute([command for command, _ in batch])
            if any(_noscript(r) for r in replies):  # Redis restarted: load them and resend
                await self._load_scripts()
                again = [i for i, r in enumerate(replies) if _noscript(r)]
                for i, r in zip(again, await self._pipe.execute([batch[i][0] for i in again]),
                                strict=True):
                    replies[i] = r
        except Exception as exc:
            log.exception("cluster: a batch of %d Redis commands failed", len(batch))
            replies = [exc] * len(batch)
        for (_, future), reply in zip(batch, replies, strict=True):
            if future is not None and not future.done():
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _load_scripts(self) -> None:
        for name, source in _SCRIPTS.items():
            self._scripts[name] = await self.redis.script_load(source)

    # ---- routes ------------------------------------------------------------------------------

    def route_added(self, topic_filter: str) -> None:
        count = self._local.get(topic_filter, 0)
        self._local[topic_filter] = count + 1
        if count == 0:
            if topic_filter in self._removes:
                self._removes.discard(topic_filter)
            else:
                self._adds.add(topic_filter)
            self._wake()

    def route_removed(self, topic_filter: str) -> None:
        count = self._local.get(topic_filter, 0)
        if count <= 1:
            self._local.pop(topic_filter, None)
            if count == 1:
                if topic_filter in self._adds:
                    self._adds.discard(topic_filter)
                else:
                    self._removes.add(topic_filter)
                self._wake()
        else:
            self._local[topic_filter] = count - 1

    def _wake(self) -> None:
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush_loop())

    def _announce_routes(self) -> None:
        adds, removes = sorted(self._adds), sorted(self._removes)
        self._adds.clear()
        self._removes.clear()
        self.metrics.route_changes.inc(len(adds) + len(removes))
        command = resp.pack(
            "EVALSHA", self._scripts["routes"], 2, _routes_key(self.node_id),
            _routes_seq_key(self.node_id), _pack([adds, removes]), ROUTES_CHANNEL,
            _pack([self.node_id, adds, removes, False]), "0",
        )
        self._outbox.append((command, None))

    async def _set_routes(self, filters: list[str]) -> None:
        """Replace our whole route table in Redis (and tell the others), at once."""
        self._adds.clear()
        self._removes.clear()
        await self.redis.evalsha(
            self._scripts["routes"], 2, _routes_key(self.node_id), _routes_seq_key(self.node_id),
            _pack([filters, []]), ROUTES_CHANNEL, _pack([self.node_id, filters, [], True]), "1",
        )

    async def _load_routes(self) -> None:
        for node in self.alive:
            if node == self.node_id:
                continue
            seq, filters = await self.redis.evalsha(
                self._scripts["routes_read"], 2, _routes_key(node), _routes_seq_key(node)
            )
            self._replace_routes(node, {f.decode() for f in filters})
            self._node_seq[node] = int(seq)

    def _on_routes(self, data: bytes) -> None:
        seq_text, _, body = data.partition(b" ")
        node, adds, removes, reset = msgpack.unpackb(body, raw=False)
        if node == self.node_id:
            return
        seq = int(seq_text)
        if seq <= self._node_seq.get(node, 0):
            return  # already in the table we loaded
        self._node_seq[node] = seq
        self.alive.setdefault(node, self.wall())
        if reset:
            self._replace_routes(node, set())
        filters = self._node_filters.setdefault(node, set())
        for f in adds:
            if f not in filters:
                filters.add(f)
                self._add_route(node, f)
        for f in removes:
            if f in filters:
                filters.discard(f)
                self._remove_route(node, f)

    def _replace_routes(self, node: str, filters: set[str]) -> None:
        for f in self._node_filters.pop(node, set()):
            self._remove_route(node, f)
        if filters:
            self._node_filters[node] = filters
            for f in filters:
                self._add_route(node, f)

    def _add_route(self, node: str, topic_filter: str) -> None:
        shared = mqtt.parse_shared(topic_filter)
        if shared is None:
            self.routes.add(topic_filter, node, True)
        else:
            self.shared_routes.add(shared[1], (node, topic_filter), topic_filter)

    def _remove_route(self, node: str, topic_filter: str) -> None:
        shared = mqtt.parse_shared(topic_filter)
        if shared is None:
            self.routes.remove(topic_filter, node)
        else:
            self.shared_routes.remove(shared[1], (node, topic_filter))

    # ---- publishing across nodes -------------------------------------------------------------

    def forward(self, message: Message) -> tuple[int, set[str] | None]:
        """Send the message to every other node with a matching route. Returns the number of
        nodes it went to and which of our shared groups (full `$share/...` filters) were
        picked to deliver it here (None: no shared groups involved)."""
        nodes: set[str] = set()
        if len(self.routes):
            nodes.update(node for node, _ in self.routes.match(message.topic))
        mine: set[str] | None = None
        picked: dict[str, list[str]] = {}
        if len(self.shared_routes) or len(self.broker.shared):
            candidates: dict[str, list[str]] = {}
            for (node, full), _ in self.shared_routes.match(message.topic):
                candidates.setdefault(full, []).append(node)
            for _, group in self.broker.shared.match(message.topic):
                if group.members:
                    candidates.setdefault(group.filter, []).append(self.node_id)
            mine = set()
            for full, among in candidates.items():
                turn = self._turns[full] = self._turns.get(full, -1) + 1
                chosen = sorted(among)[turn % len(among)]
                if chosen == self.node_id:
                    mine.add(full)
                else:
                    picked.setdefault(chosen, []).append(full)
            nodes.update(picked)
        if nodes:
            wire = persistence.pack_message(message, monotonic())
            sent = self._sent
            numbers = self._pub_numbers
            for node in nodes:
                number = numbers[node] = numbers.get(node, 0) + 1
                before = sent.get(node, 0)
                note = _pack([PUB, wire, picked.get(node, []), self.node_id, number, before])
                self._send("PUBLISH", _node_channel(node), note)
                total = sent[node] = before + len(note)
                if total - self._confirmed.get(node, 0) > HIGH_WATER:
                    self.blocked = True
            self.metrics.forwarded.inc(len(nodes))
        return len(nodes), mine

    # ---- flow control ------------------------------------------------------------------------

    def hold(self, conn: MqttChannel) -> None:
        """A publisher while some node is behind: stop reading it until it caught up."""
        if conn not in self._held:
            self._held.add(conn)
            self.metrics.held_publishers.inc()
            conn.pause_reading(PAUSE_REASON)

    def forget(self, conn: MqttChannel) -> None:
        self._held.discard(conn)

    def _check_flow(self) -> None:
        if not self.blocked:
            return
        confirmed = self._confirmed
        behind = max((n - confirmed.get(node, 0) for node, n in self._sent.items()), default=0)
        if behind < LOW_WATER:
            self.blocked = False
            held, self._held = self._held, set()
            for conn in held:
                conn.resume_reading(PAUSE_REASON)

    def _came_from(self, origin: str, number: int, previous: int, handled: int) -> None:
        """Bookkeeping of a note from `origin`: its messages up to `number` have passed, the one
        before should have been `previous`, and `handled` bytes of its notes to us are behind
        us (lost ones included: they will never come)."""
        last = self._pub_seen.get(origin, 0)
        if previous > last and last:
            self.metrics.lost_forwards.inc(previous - last)
            log.error("cluster: %d messages forwarded by %s were lost", previous - last, origin)
        self._pub_seen[origin] = number  # lower than last: the origin started again
        self._handled[origin] = handled

    def _probe_laggards(self) -> None:
        """While held back, ask the nodes we wait for how far they got: a note Redis dropped is
        never confirmed by itself, and nothing new is sent while we hold our publishers."""
        if not self.blocked:
            return
        for node, total in self._sent.items():
            if total - self._confirmed.get(node, 0) >= LOW_WATER:
                probe = [PROBE, self.node_id, self._pub_numbers.get(node, 0), total]
                self._send("PUBLISH", _node_channel(node), _pack(probe))

    def _send_credits(self, threshold: int) -> None:
        """Tell the nodes whose messages we handled how far we got (totals: a lost note is
        made good by the next)."""
        for origin, handled in self._handled.items():
            # Lower than last time: the origin started again and counts from zero.
            if abs(handled - self._credited.get(origin, 0)) > threshold:
                self._credited[origin] = handled
                self._send("PUBLISH", _node_channel(origin), _pack([CREDIT, self.node_id, handled]))

    def retain(self, message: Message) -> None:
        """A retained message set (or deleted, empty payload) here: store and broadcast it."""
        wire = b""
        if message.payload:
            wire = _pack([persistence.pack_message(message, monotonic()), self.wall()])
        note = _pack([message.topic, wire])
        self._send(
            "EVALSHA", self._scripts["retain"], 1, RETAINED_KEY, message.topic, wire,
            RETAINED_CHANNEL, note,
        )

    async def _load_retained(self) -> None:
        stored: dict[Any, Any] = await self.redis.hgetall(RETAINED_KEY)
        messages = {topic.decode(): self._retained_message(wire) for topic, wire in stored.items()}
        self.broker.replace_retained({t: m for t, m in messages.items() if m is not None})

    def _apply_retained(self, topic: str, wire: bytes) -> None:
        self.broker.set_retained(topic, self._retained_message(wire))

    def _retained_message(self, wire: bytes) -> Message | None:
        """A retained message as stored in Redis; None for a deleted or expired one."""
        if not wire:
            return None
        packed, saved_at = msgpack.unpackb(wire, raw=False)
        message = persistence.unpack_message(packed, monotonic() - (self.wall() - saved_at))
        return None if message.expired(monotonic()) else message

    # ---- client ids: claims and takeovers -----------------------------------------------------

    def new_epoch(self) -> str:
        return f"{self._incarnation}.{next(self._epochs)}"

    def claim(self, client_id: str, epoch: str) -> asyncio.Future[Any]:
        """Register this node as the holder of `client_id`; resolves to the previous holder's
        registry value (bytes) or None."""
        future = self._send(
            "SET", _client_key(client_id), f"{self.node_id}|{epoch}|1", "GET", reply=True
        )
        assert future is not None
        return future

    def went_offline(self, client_id: str, epoch: str) -> None:
        """The connection is gone, its persistent session stays here."""
        mine = f"{self.node_id}|{epoch}|"
        self._send("EVALSHA", self._scripts["release"], 1, _client_key(client_id), mine, mine + "0")

    def released(self, client_id: str, epoch: str) -> None:
        """The session ended: the registry forgets it (unless another node holds it now)."""
        mine = f"{self.node_id}|{epoch}|"
        self._send("EVALSHA", self._scripts["release"], 1, _client_key(client_id), mine, "")

    def reclaim(self, session: Session) -> None:
        """A session restored from our snapshot: ours again unless another node has it now."""
        session.cluster_epoch = epoch = self.new_epoch()
        future = self._send(
            "EVALSHA", self._scripts["reclaim"], 1, _client_key(session.client_id),
            f"{self.node_id}|", f"{self.node_id}|{epoch}|0", reply=True,
        )
        assert future is not None

        def done(f: asyncio.Future[Any]) -> None:
            if f.exception() is None and f.result() == 0 and session.cluster_epoch == epoch:
                self.broker.lifecycle.drop(session)  # it moved on while we were down

        future.add_done_callback(done)

    def held_elsewhere(self, previous: bytes | None) -> bool:
        """Whether a claim's previous registry value names another node that is alive."""
        if previous is None:
            return False
        node = previous.decode().split("|", 1)[0]
        return node != self.node_id and self.is_alive(node)

    async def take_over(self, previous: bytes | None, client_id: str, want_session: bool) -> Any:
        """After a claim: if another live node held the client, have it close the old connection
        and (when `want_session`) hand over the session. Returns the packed session or None."""
        if previous is None:
            return None
        node, epoch, _ = previous.decode().split("|")
        if node == self.node_id:
            return None  # ours: the broker takes over locally
        if not self.is_alive(node):
            log.warning("client %s was on node %s, which is gone", client_id, node)
            return None
        self.metrics.takeovers.inc()
        request = next(self._requests)
        note = _pack([KICK, client_id, epoch, self.node_id, request, want_session])
        if not want_session:
            self._send("PUBLISH", _node_channel(node), note)
            return None
        future = asyncio.get_running_loop().create_future()
        self._waiting[request] = future
        self._send("PUBLISH", _node_channel(node), note)
        try:
            return await asyncio.wait_for(future, TAKEOVER_TIMEOUT)
        except TimeoutError:
            log.warning("node %s did not hand over the session of %s in time", node, client_id)
            return None
        finally:
            self._waiting.pop(request, None)

    def _on_kick(self, client_id: str, epoch: str, origin: str, request: int, want: bool) -> None:
        """A newer claim elsewhere names ours (epoch): our connection goes, and the session
        goes with the client (`want`) or ends."""
        if self.broker.lifecycle.taken_over_while_claiming(client_id, epoch, origin, request, want):
            return  # our CONNECT still waiting for its claim lost: it answers once settled
        session = self.broker.sessions.get(client_id)
        if session is not None and session.cluster_epoch == epoch:
            self.surrender(client_id, None, origin, request, want)
        elif want:
            self._send("PUBLISH", _node_channel(origin), _pack([KICKED, request, None]))

    def surrender(
        self, client_id: str, packed: Any, origin: str, request: int, want: bool
    ) -> None:
        """Let a client go to the node that claimed it last: close its connection here (0x8E,
        its will published), and hand over its session (`want`) or end it. `packed`: a session
        that was on its way here (it goes on to the winner; one held here is stale then)."""
        broker = self.broker
        sessions = broker.lifecycle
        channel = broker.online.get(client_id)
        if channel is not None:
            sessions.kick(channel, mqtt.SESSION_TAKEN_OVER, "session taken over on another node")
        session = broker.sessions.get(client_id)
        if session is not None:
            if packed is None and want and session.expiry_interval:
                packed = persistence.pack_session(session, monotonic(), self.wall())
                sessions.drop(session)
            elif packed is not None:
                sessions.drop(session)
            else:
                sessions.end(session)
        broker.flush()
        if want:
            self._send("PUBLISH", _node_channel(origin), _pack([KICKED, request, packed]))

    def import_session(self, packed: Any) -> Session | None:
        existing = self.broker.sessions.get(packed["client_id"])
        if existing is not None:
            self.broker.lifecycle.drop(existing)
        return persistence.unpack_session(self.broker, packed, monotonic(), self.wall())

    # ---- receiving ----------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        subscriber = self._subscriber
        while True:
            async for batch in subscriber.messages():
                for channel, data in batch:
                    try:
                        self._dispatch(channel, data)
                    except Exception:  # one bad note must not stop the cluster
                        log.exception("cluster: a note could not be handled")
                self.broker.flush()
                self._send_credits(CREDIT_EVERY)
            # The subscription was lost: what was published meanwhile is gone. Subscribe again,
            # announce our routes whole (Redis may have restarted empty) and reload what the
            # notes would have told (the others' routes, retained messages).
            self.subscribed = False
            self.metrics.resubscribes.inc()
            log.error("cluster: the Redis subscription was lost; subscribing again")
            while True:
                try:
                    await subscriber.subscribe()
                    await self._load_scripts()
                    await self._heartbeat()
                    await self._set_routes(sorted(self._local))
                    self._node_seq.clear()  # a restarted Redis numbers announcements anew
                    await self._load_routes()
                    await self._load_retained()
                    self.subscribed = True
                    break
                except Exception:
                    log.exception("cluster: subscribing again failed; retrying")
                    await asyncio.sleep(1.0)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == b"iotgw:routes":
            self._on_routes(data)
            return
        if channel == b"iotgw:retained":
            topic, wire = msgpack.unpackb(data, raw=False)
            self._apply_retained(topic, wire)
            return
        note = msgpack.unpackb(data, raw=False)
        kind = note[0]
        if kind == PUB:
            self.metrics.received.inc()
            message = persistence.unpack_message(note[1], monotonic())
            self.broker.deliver_forwarded(message, set(note[2]))
            self._came_from(note[3], note[4], note[4] - 1, note[5] + len(data))
        elif kind == PROBE:
            origin, handled = note[1], note[3]
            self._came_from(origin, note[2], note[2], handled)
            self._credited[origin] = handled
            self._send("PUBLISH", _node_channel(origin), _pack([CREDIT, self.node_id, handled]))
        elif kind == CREDIT:
            node, handled = note[1], note[2]
            if handled > self._confirmed.get(node, 0):
                self._confirmed[node] = handled
                self._check_flow()
        elif kind == KICK:
            self._on_kick(*note[1:])
        elif kind == KICKED:
            future = self._waiting.get(note[1])
            if future is not None and not future.done():
                future.set_result(note[2])
        elif kind == ASK:
            self._on_ask(note[1], note[2], note[3])
        elif kind == ANSWER:
            _, request, node, ok, answer = note
            future = self._questions.get(request, {}).get(node)
            if future is not None and not future.done():
                if ok:
                    future.set_result(answer)
                else:
                    future.set_exception(RuntimeError(answer))

    # ---- questions between nodes --------------------------------------------------------------

    async def ask(
        self, question: Any, nodes: list[str] | None = None, timeout: float = ASK_TIMEOUT
    ) -> tuple[dict[str, Any], list[str]]:
        """Put `question` to `nodes` (None: every other live node) and wait at most `timeout`
        seconds for their answers. Returns the answers by node, and the nodes that gave none
        (gone, too slow, or failing to answer), sorted."""
        if nodes is None:
            nodes = [n for n in self.alive if n != self.node_id]
        request = next(self._requests)
        loop = asyncio.get_running_loop()
        pending = {n: loop.create_future() for n in nodes if self.is_alive(n)}
        self._questions[request] = pending
        note = _pack([ASK, self.node_id, request, question])
        for node in pending:
            self._send("PUBLISH", _node_channel(node), note)
        try:
            if pending:
                await asyncio.wait(pending.values(), timeout=timeout)
        finally:
            del self._questions[request]
        answers: dict[str, Any] = {}
        for node, future in pending.items():
            if not future.done():
                future.cancel()
            elif future.exception() is not None:
                log.warning("cluster: node %s could not answer: %s", node, future.exception())
            else:
                answers[node] = future.result()
        return answers, sorted(n for n in nodes if n not in answers)

    def _on_ask(self, origin: str, request: int, question: Any) -> None:
        try:
            if self._answer is None:
                raise RuntimeError("this node answers no questions")
            note = _pack([ANSWER, request, self.node_id, True, self._answer(question)])
        except Exception as exc:  # the asker hears why, and reports us as not answering
            log.exception("cluster: could not answer a question of %s", origin)
            note = _pack([ANSWER, request, self.node_id, False, f"{type(exc).__name__}: {exc}"])
        self._send("PUBLISH", _node_channel(origin), note)

    # ---- queries for the REST API -------------------------------------------------------------

    async def locate(self, client_ids: list[str]) -> dict[str, tuple[str, bool]]:
        """Where each client is held: (node, online). Clients nowhere are left out."""
        if not client_ids:
            return {}
        values: list[Any] = await self.redis.mget([_client_key(c) for c in client_ids])
        found: dict[str, tuple[str, bool]] = {}
        for client_id, value in zip(client_ids, values, strict=True):
            if value is not None:
                node, _, flag = value.decode().split("|")
                found[client_id] = (node, flag == "1" and self.is_alive(node))
        return found

