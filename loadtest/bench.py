"""Quick benchmarks in the spirit of emqtt-bench: `conn`, `pub`, `sub` and `coap`.

Bare clients (no scenario): `conn` connects and holds connections (optionally pinging every
`-I` ms), `pub` publishes on an absolute schedule (message n of a client is due at
`start + n * interval`; a message sent more than one interval (+ 1 ms timer resolution) late
counts as `overrun`, and the client catches up by sending everything due in one write), `sub`
subscribes and counts what arrives (with the publish -> receive latency when the payload
carries iotgw-load's timestamp),
`coap` sends CoAP requests on the same schedule.

`%i` in a topic, path or client id is the client's number, `%c` its client id.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from gateway._native import coap, mqtt
from loadtest.coap_client import METHODS, CoapClient
from loadtest.mqtt_client import PUBLISH_TYPE, RECEIVE_TYPE, ConnectError, MqttClient
from loadtest.runner import Spawner
from loadtest.runtime import Runtime

_now_ns = time.perf_counter_ns
_encode_into = mqtt.encode_publish_into

# The payload header iotgw-load writes into every benchmark message: fixed-width JSON numbers,
# so a message is stamped by overwriting two slices of a template (no JSON encoding per message).
_HEAD = b'{"seq":' + b" " * 12 + b',"ts":' + b" " * 16
SEQ_AT = 7
TS_AT = SEQ_AT + 12 + 6
MIN_STAMPED = len(_HEAD) + 2  # + '}' and a byte of slack
TIMER_SLACK = 0.001  # event-loop timers fire with millisecond resolution


def payload_template(size: int, message: bytes | None = None) -> tuple[bytearray, bool]:
    """A payload of `size` bytes; stamped (seq, ts) when big enough. `message` overrides."""
    if message is not None:
        return bytearray(message), False
    if size < MIN_STAMPED:
        return bytearray(b"x" * size), False
    pad = size - len(_HEAD) - len(b',"p":"') - len(b'"}')
    if pad >= 0:
        return bytearray(_HEAD + b',"p":"' + b"x" * pad + b'"}'), True
    return bytearray(_HEAD + b"}" + b" " * (size - len(_HEAD) - 1)), True


def stamp(buf: bytearray, seq: int, ts_us: int) -> None:
    buf[SEQ_AT : SEQ_AT + 12] = b"%12d" % seq
    buf[TS_AT : TS_AT + 16] = b"%16d" % ts_us


def read_stamp(payload: Any) -> int | None:
    """The send time (epoch µs) of a stamped payload, else None."""
    if len(payload) >= MIN_STAMPED - 1 and payload[TS_AT - 6 : TS_AT] == b',"ts":':
        try:
            return int(bytes(payload[TS_AT : TS_AT + 16]))
        except ValueError:
            return None
    return None


@dataclass
class BenchSpec:
    kind: str  # conn | pub | sub | coap
    client_id: str = "iotgw-load-%i"
    topic: str = "iotgw-load/%i"
    size: int = 256
    message: str | None = None
    qos: int = 0
    interval_ms: float = 1000.0
    limit: int = 0
    inflight: int = 64
    retain: bool = False
    method: str = "POST"
    confirmable: bool = True
    first_number: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def fill(template: str, number: int, client_id: str = "") -> str:
    return template.replace("%i", str(number)).replace("%c", client_id)


class _Client:
    """One benchmark client's state (kept small: many of these)."""

    __slots__ = ("buf", "coap", "id", "mqtt", "number", "sent", "seq", "t0", "topic")

    def __init__(self, number: int, client_id: str, topic: str) -> None:
        self.number = number
        self.id = client_id
        self.topic = topic
        self.mqtt: MqttClient | None = None
        self.coap: CoapClient | None = None
        self.sent = 0
        self.seq = 0
        self.t0 = 0.0
        self.buf: bytearray | None = None


class Bench(Spawner):
    """conn / pub / sub / coap over this process's share of client numbers."""

    def __init__(self, rt: Runtime, spec: BenchSpec, indices: list[int], spawn_rate: float) -> None:
        super().__init__(rt, indices, spawn_rate)
        self.spec = spec
        self.clients: list[_Client] = []
        self.done_clients = 0
        self.interval = spec.interval_ms / 1000.0
        self.message = spec.message.encode() if spec.message is not None else None
        self.entry_name = spec.kind

    @property
    def finished(self) -> bool:
        return (
            self.spec.limit > 0
            and self.spec.kind in ("pub", "coap")
            and self.spawned == len(self.indices)
            and self.done_clients >= len(self.indices)
            and not self.outstanding()
        )

    def _start_one(self, index: int) -> Any:
        number = index + self.spec.first_number
        cid = fill(self.spec.client_id, number)
        c = _Client(number, cid, fill(self.spec.topic, number, cid))
        self.clients.append(c)
        if self.spec.kind == "coap":
            return self._start_coap(c)
        return self._start_mqtt(c)

    async def _start_mqtt(self, c: _Client) -> None:
        client = MqttClient(self.rt, c.id, self)
        c.mqtt = client
        s = self.rt.settings
        try:
            await client.connect(
                name="connect",
                username=fill(s.username, c.number, c.id) if s.username else None,
                password=fill(s.password, c.number, c.id) if s.password else None,
            )
        except ConnectError:
            self.done_clients += 1
            return
        kind = self.spec.kind
        if kind == "conn":
            if self.interval > 0 and self.spec.interval_ms > 0 and self._pinging:
                self.rt.scheduler.at(
                    self.rt.loop.time() + random.uniform(0, self.interval), self._ping, c
                )
        elif kind == "sub":
            try:
                await client.subscribe([(c.topic, self.spec.qos)], name="subscribe")
            except ConnectError:
                return
        elif kind == "pub":
            self._begin(c)

    @property
    def _pinging(self) -> bool:
        return bool(self.spec.kind == "conn" and self.spec.interval_ms > 0)

    async def _start_coap(self, c: _Client) -> None:
        client = CoapClient(self.rt)
        c.coap = client
        try:
            await client.start()
        except OSError as exc:
            self.rt.stats.failure(self.spec.method, self.entry_name, f"socket: {exc}")
            self.done_clients += 1
            return
        self._begin(c)

    def _begin(self, c: _Client) -> None:
        c.buf, stamped = payload_template(self.spec.size, self.message)
        if not stamped:
            c.seq = -1
        c.t0 = self.rt.loop.time()
        if self.interval <= 0:
            self.rt.loop.call_soon(self._unpaced, c)
        else:
            self.rt.scheduler.at(c.t0, self._tick, c)

    # ---- conn ------------------------------------------------------------------------------

    def _ping(self, c: _Client, due: float) -> None:
        if self.stopping or c.mqtt is None or not c.mqtt.connected:
            return
        c.mqtt.ping("heartbeat")
        now = self.rt.loop.time()
        nxt = due + self.interval
        if nxt < now:
            self.rt.stats.incr("overrun")
            nxt = now + self.interval
        self.rt.scheduler.at(nxt, self._ping, c)

    # ---- pub / coap: absolute schedule ---------------------------------------------------------

    def _tick(self, c: _Client, due: float) -> None:
        if self.stopping:
            return
        now = self.rt.loop.time()
        spec = self.spec
        k = int((now - c.t0) / self.interval) + 1 - c.sent
        if spec.limit:
            k = min(k, spec.limit - c.sent)
        # overrun: messages going out more than one interval (plus the loop's 1 ms timer
        # resolution) after they were due
        late = int((now - c.t0 - self.interval - TIMER_SLACK) / self.interval) + 1 - c.sent
        if late > 0:
            self.rt.stats.incr("overrun", min(late, k))
        if k > 0:
            sent = self._send(c, k)
            c.sent += sent
            if sent < k:
                # back-pressure (inflight window full, or the socket buffer): try again soon
                if self._more(c):
                    self.rt.scheduler.at(now + 0.001, self._tick, c)
                return
        if self._more(c):
            self.rt.scheduler.at(c.t0 + c.sent * self.interval, self._tick, c)

    def _more(self, c: _Client) -> bool:
        if self.spec.limit and c.sent >= self.spec.limit:
            self.done_clients += 1
            return False
        if c.mqtt is not None and c.mqtt.transport is None:
            self.done_clients += 1
            return False
        return True

    def _unpaced(self, c: _Client) -> None:
        """-I 0: as fast as the connection takes them, 64 messages per loop iteration."""
        if self.stopping:
            return
        k = 64
        if self.spec.limit:
            k = min(k, self.spec.limit - c.sent)
        c.sent += self._send(c, k)
        if self._more(c):
            if c.mqtt is not None and (c.mqtt.paused or self._window_full(c.mqtt)):
                self.rt.scheduler.after(0.001, lambda cl, _: self._unpaced(cl), c)
            else:
                self.rt.loop.call_soon(self._unpaced, c)

    def _window_full(self, client: MqttClient) -> bool:
        return self.spec.qos > 0 and client.inflight is not None and len(
            client.inflight
        ) >= self.spec.inflight

    def _send(self, c: _Client, k: int) -> int:
        """Send up to k messages in one write; returns how many went."""
        if c.coap is not None:
            return self._send_coap(c, k)
        client = c.mqtt
        if client is None or not client.connected or client.transport is None:
            return 0
        if client.paused:
            return 0
        spec = self.spec
        qos = spec.qos
        buf = c.buf
        assert buf is not None
        inflight = client.inflight
        if qos:
            if inflight is None:
                inflight = client.inflight = {}
            k = min(k, spec.inflight - len(inflight))
            if k <= 0:
                return 0
        out = bytearray()
        topic = c.topic
        version = client.version
        retain = spec.retain
        ts = time.time_ns() // 1000
        t0 = _now_ns()
        name = self.entry_name
        for _ in range(k):
            if c.seq >= 0:
                c.seq += 1
                stamp(buf, c.seq, ts)
            if qos:
                pid = client._next_pid()
                _encode_into(out, topic, buf, qos, retain, False, pid, None, version)
                inflight[pid] = (t0, name)  # type: ignore[index]
            else:
                _encode_into(out, topic, buf, 0, retain, False, 0, None, version)
        client.transport.write(out)
        client.last_tx = self.rt.loop.time()
        e = self.rt.stats.get(PUBLISH_TYPE, name)
        if qos:
            e.total_bytes += k * len(buf)
        else:
            e.count(k, k * len(buf))
        return k

    def _send_coap(self, c: _Client, k: int) -> int:
        client = c.coap
        assert client is not None and c.buf is not None
        code = METHODS[self.spec.method.upper()]
        for _ in range(k):
            if c.seq >= 0:
                c.seq += 1
                stamp(c.buf, c.seq, time.time_ns() // 1000)
            client.request(
                code,
                c.topic,
                bytes(c.buf),
                confirmable=self.spec.confirmable,
                options=[(coap.CONTENT_FORMAT, coap.JSON)] if c.seq >= 0 else [],
                name=self.entry_name,
            )
        return k

    # ---- MessageSink (sub) ---------------------------------------------------------------------

    def on_publish(self, client: MqttClient, packet: Any) -> None:
        payload = packet.payload
        e = self.rt.stats.get(RECEIVE_TYPE, self.entry_name)
        ts = read_stamp(payload)
        if ts is not None:
            e.record(max(0, time.time_ns() // 1000 - ts), len(payload))
        else:
            e.count(1, len(payload))

    def on_connection_lost(self, client: MqttClient, reason: str | None) -> None:
        pass

    def outstanding(self) -> int:
        n = 0
        for c in self.clients:
            if c.mqtt is not None and c.mqtt.inflight:
                n += len(c.mqtt.inflight)
            elif c.coap is not None:
                n += c.coap.outstanding
        return n

    async def stop(self, timeout: float = 5.0) -> None:
        self._cancel_connects()
        await self._wait_outstanding(timeout)
        for c in self.clients:
            if c.mqtt is not None:
                c.mqtt.close()
            if c.coap is not None:
                c.coap.close()
        self.rt.users = 0
        await asyncio.sleep(0.05)
        self.rt.close()
