"""A small MQTT 3.1.1/5.0 client on the native codec, one per simulated device.

`asyncio.BufferedProtocol`: the transport reads straight into the process's shared `ReadArena`
and `Framer.buffer_updated` decodes every frame of a read in one native call. A client keeps only
its framer's partial-frame remainder, a few integers, and (while QoS 1/2 publishes await their
acknowledgement) a dict of packet id -> send time. Writes are single `transport.write` calls;
acknowledgements for a whole read leave in one write.

Latencies are measured with `time.perf_counter_ns()` and recorded in whole microseconds:
CONNECT -> CONNACK, PUBLISH -> PUBACK (QoS 1) or PUBCOMP (QoS 2), SUBSCRIBE -> SUBACK,
PINGREQ -> PINGRESP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from gateway._native import mqtt

if TYPE_CHECKING:
    from loadtest.runtime import Runtime

_now_ns = time.perf_counter_ns
_PUBLISH = mqtt.PUBLISH
_PUBACK = mqtt.PUBACK
_PUBREC = mqtt.PUBREC
_PUBREL = mqtt.PUBREL
_PUBCOMP = mqtt.PUBCOMP
_PINGRESP = mqtt.PINGRESP
_CONNACK = mqtt.CONNACK
_SUBACK = mqtt.SUBACK
_DISCONNECT = mqtt.DISCONNECT
_PING = mqtt.PINGREQ_FRAME

CONNECT_TYPE = "CONNECT"
PUBLISH_TYPE = "PUBLISH"
SUBSCRIBE_TYPE = "SUBSCRIBE"
PING_TYPE = "PING"
RECEIVE_TYPE = "RECEIVE"



# Linux: bind() to a source address leaves the port to connect(), which picks one free for this
# destination; a plain bind(ip, 0) searches for a port free for every destination, which grows
# slow when tens of thousands are taken (or in TIME_WAIT).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def connected_socket(
    host: str, port: int, source: tuple[str, int] | None = None
) -> socket.socket:
    """A TCP socket connected to host:port, from `source` (an address, port 0) if given."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind(source)
        await loop.sock_connect(sock, (host, port))
    except OSError as exc:
        sock.close()
        if exc.errno:  # say why ("Connection refused"), as the system words it
            raise type(exc)(exc.errno, f"{os.strerror(exc.errno)}: {host}:{port}") from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock

class ConnectError(Exception):
    """The connection or the CONNECT handshake failed; str() is the reason for the report."""


class MessageSink(Protocol):
    """Who gets what a client receives (a device, a bench subscriber, the command issuer)."""

    def on_publish(self, client: MqttClient, packet: Any) -> None: ...

    def on_connection_lost(self, client: MqttClient, reason: str | None) -> None: ...


class MqttClient(asyncio.BufferedProtocol):
    __slots__ = (
        "_connack",
        "_sub_waiters",
        "client_id",
        "closing",
        "connected",
        "device",
        "framer",
        "inflight",
        "last_tx",
        "next_pid",
        "on_ack",
        "paused",
        "ping_name",
        "ping_t0",
        "qos2_in",
        "rt",
        "sink",
        "transport",
        "version",
    )

    def __init__(self, rt: Runtime, client_id: str, sink: MessageSink | None = None) -> None:
        self.rt = rt
        self.client_id = client_id
        self.sink = sink
        self.version = rt.settings.mqtt_version
        self.framer = mqtt.Framer(rt.arena, version=self.version)
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.device = True  # counts in the "connected" gauge (helpers set False)
        self.closing = False
        self.paused = False
        # packet id -> (send time ns, stats name)
        self.inflight: dict[int, tuple[int, str]] | None = None
        self.next_pid = 0
        self.on_ack: Callable[[int], None] | None = None  # packet id of a successful PUBACK
        self.ping_t0 = 0
        self.ping_name = "keepalive"
        self.last_tx = 0.0
        self.qos2_in: set[int] | None = None
        self._connack: asyncio.Future[Any] | None = None
        self._sub_waiters: dict[int, tuple[asyncio.Future[list[int]], int]] | None = None

    # ---- asyncio.BufferedProtocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framer.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            packets = self.framer.buffer_updated(nbytes)
        except mqtt.MqttError as exc:
            self._handle(exc.packets)
            self.rt.stats.error(RECEIVE_TYPE, "protocol", f"malformed packet from server: {exc}")
            self.abort()
            return
        self._handle(packets)

    def _handle(self, packets: list[Any]) -> None:
        acks: bytearray | None = None
        inflight = self.inflight
        for p in packets:
            t = p.type
            if t in (_PUBACK, _PUBCOMP):
                entry = inflight.pop(p.packet_id, None) if inflight is not None else None
                if entry is not None:
                    t0, name = entry
                    stats = self.rt.stats.get(PUBLISH_TYPE, name)
                    if p.reason_code >= 0x80:
                        self.rt.stats.failure(
                            PUBLISH_TYPE, name, f"{mqtt.PACKET_NAMES[t]} {_reason(p.reason_code)}"
                        )
                    else:
                        stats.record((_now_ns() - t0) // 1000)
                        if self.on_ack is not None:
                            self.on_ack(p.packet_id)
            elif t == _PUBLISH:
                qos = p.qos
                if qos == 1:
                    if acks is None:
                        acks = bytearray()
                    mqtt.encode_ack_into(acks, _PUBACK, p.packet_id, 0, self.version)
                elif qos == 2:
                    if acks is None:
                        acks = bytearray()
                    mqtt.encode_ack_into(acks, _PUBREC, p.packet_id, 0, self.version)
                    if self.qos2_in is None:
                        self.qos2_in = set()
                    if p.packet_id in self.qos2_in:
                        continue  # a duplicate of a QoS 2 message already delivered
                    self.qos2_in.add(p.packet_id)
                if self.sink is not None:
                    self.sink.on_publish(self, p)
            elif t == _PUBREC:
                entry = inflight.get(p.packet_id) if inflight is not None else None
                if entry is not None and p.reason_code >= 0x80:
                    del inflight[p.packet_id]  # type: ignore[union-attr]
                    text = f"PUBREC {_reason(p.reason_code)}"
                    self.rt.stats.failure(PUBLISH_TYPE, entry[1], text)
                    continue
                if acks is None:
                    acks = bytearray()
                mqtt.encode_ack_into(acks, _PUBREL, p.packet_id, 0, self.version)
            elif t == _PUBREL:
                if acks is None:
                    acks = bytearray()
                mqtt.encode_ack_into(acks, _PUBCOMP, p.packet_id, 0, self.version)
                if self.qos2_in is not None:
                    self.qos2_in.discard(p.packet_id)
            elif t == _PINGRESP:
                if self.ping_t0:
                    self.rt.stats.get(PING_TYPE, self.ping_name).record(
                        (_now_ns() - self.ping_t0) // 1000
                    )
                    self.ping_t0 = 0
            elif t == _CONNACK:
                fut = self._connack
                if fut is not None and not fut.done():
                    fut.set_result(p)
            elif t == _SUBACK:
                waiters = self._sub_waiters
                w = waiters.pop(p.packet_id, None) if waiters is not None else None
                if w is not None and not w[0].done():
                    w[0].set_result(list(p.reason_codes))
            elif t == _DISCONNECT:
                self.rt.stats.error(
                    RECEIVE_TYPE, "disconnect", f"DISCONNECT from server: {_reason(p.reason_code)}"
                )
        if acks is not None and self.transport is not None:
            self.transport.write(acks)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        was_connected = self.connected
        self.connected = False
        self.transport = None
        self.rt.mqtt_clients.discard(self)
        if was_connected and self.device:
            self.rt.connected -= 1
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_exception(ConnectError(_exc_text(exc) if exc else "closed before CONNACK"))
        if self._sub_waiters:
            for f, _ in self._sub_waiters.values():
                if not f.done():
                    f.set_exception(ConnectError("connection lost"))
            self._sub_waiters = None
        if self.inflight:
            lost: dict[str, int] = {}
            for _, name in self.inflight.values():
                lost[name] = lost.get(name, 0) + 1
            why = "no acknowledgement before the run ended" if self.closing else (
                "connection lost before the acknowledgement")
            for name, n in lost.items():
                self.rt.stats.failure(PUBLISH_TYPE, name, why, n)
            self.inflight = None
        if not self.closing:
            reason = _exc_text(exc) if exc else "closed by server"
            if was_connected:
                self.rt.stats.error(CONNECT_TYPE, "connection", f"connection lost: {reason}")
            if self.sink is not None:
                self.sink.on_connection_lost(self, reason)

    # ---- connecting --------------------------------------------------------------------------

    async def connect(
        self,
        *,
        clean_start: bool = True,
        keepalive: int | None = None,
        username: str | None = None,
        password: str | None = None,
        will: mqtt.Will | None = None,
        properties: mqtt.Properties | None = None,
        name: str = "connect",
    ) -> Any:
        """Open the connection and complete the CONNECT handshake; returns the CONNACK.
        Records CONNECT -> CONNACK in ("CONNECT", name); raises ConnectError."""
        rt = self.rt
        s = rt.settings
        loop = rt.loop
        t0 = _now_ns()
        self._connack = loop.create_future()
        try:
            async with asyncio.timeout(s.connect_timeout):
                source = rt.next_source_addr()
                await loop.create_connection(
                    lambda: self,
                    ssl=rt.ssl_context,
                    server_hostname=s.mqtt_host if rt.ssl_context is not None else None,
                    sock=await connected_socket(s.mqtt_host, s.mqtt_port, source),
                )
                assert self.transport is not None
                frame = mqtt.Connect(
                    self.client_id,
                    protocol_level=self.version,
                    clean_start=clean_start,
                    keep_alive=s.keepalive if keepalive is None else keepalive,
                    username=s.username if username is None else username,
                    password=s.password if password is None else password,
                    will=will,
                    properties=properties,
                ).encode()
                self.transport.write(frame)
                connack = await self._connack
        except TimeoutError:
            self.abort()
            rt.stats.failure(CONNECT_TYPE, name, "timeout")
            raise ConnectError("timeout") from None
        except ConnectError as exc:
            self.abort()
            rt.stats.failure(CONNECT_TYPE, name, str(exc))
            raise
        except (OSError, ssl.SSLError) as exc:
            self.abort()
            text = _exc_text(exc)
            rt.stats.failure(CONNECT_TYPE, name, text)
            raise ConnectError(text) from None
        finally:
            self._connack = None
        if connack.reason_code != 0:
            self.abort()
            text = f"refused: {_connack_reason(connack.reason_code, self.version)}"
            rt.stats.failure(CONNECT_TYPE, name, text)
            raise ConnectError(text)
        rt.stats.get(CONNECT_TYPE, name).record((_now_ns() - t0) // 1000)
        self.connected = True
        self.last_tx = loop.time()
        if self.device:
            rt.connected += 1
        rt.mqtt_clients.add(self)
        return connack

    async def subscribe(
        self, filters: Iterable[tuple[str, int]], name: str = "subscribe"
    ) -> list[int]:
        """SUBSCRIBE and wait for the SUBACK; records the round trip, returns the reason codes.
        A refused filter (code >= 0x80) counts as a failure."""
        if not self.connected or self.transport is None:
            self.rt.stats.failure(SUBSCRIBE_TYPE, name, "not connected")
            raise ConnectError("not connected")
        pid = self._next_pid()
        subs = [mqtt.Subscription(f, q) for f, q in filters]
        fut: asyncio.Future[list[int]] = self.rt.loop.create_future()
        if self._sub_waiters is None:
            self._sub_waiters = {}
        t0 = _now_ns()
        self._sub_waiters[pid] = (fut, t0)
        self.transport.write(mqtt.Subscribe(pid, subs).encode(self.version))
        try:
            async with asyncio.timeout(self.rt.settings.ack_timeout):
                codes = await fut
        except TimeoutError:
            self.rt.stats.failure(SUBSCRIBE_TYPE, name, "SUBACK timeout")
            raise ConnectError("SUBACK timeout") from None
        except ConnectError:
            self.rt.stats.failure(SUBSCRIBE_TYPE, name, "connection lost")
            raise
        bad = [c for c in codes if c >= 0x80]
        if bad:
            self.rt.stats.failure(SUBSCRIBE_TYPE, name, f"refused: {_reason(bad[0])}")
        else:
            self.rt.stats.get(SUBSCRIBE_TYPE, name).record((_now_ns() - t0) // 1000)
        return codes

    # ---- sending -----------------------------------------------------------------------------

    def _next_pid(self) -> int:
        pid = self.next_pid + 1
        inflight = self.inflight
        while True:
            if pid > 65535:
                pid = 1
            if inflight is None or pid not in inflight:
                break
            pid += 1
        self.next_pid = pid
        return pid

    def publish(
        self,
        topic: str,
        payload: Any,
        qos: int = 0,
        name: str = "publish",
        retain: bool = False,
        properties: mqtt.Properties | None = None,
    ) -> bool:
        """Send one PUBLISH. QoS 0 counts a request at once; QoS 1/2 record the round trip when
        the acknowledgement arrives. False (and a failure) when it cannot be sent."""
        transport = self.transport
        if not self.connected or transport is None:
            self.rt.stats.failure(PUBLISH_TYPE, name, "not connected")
            return False
        if qos == 0:
            frame = mqtt.encode_publish(
                topic, payload, 0, retain, False, 0, properties, self.version
            )
            transport.write(frame)
            self.rt.stats.get(PUBLISH_TYPE, name).count(1, len(payload))
        else:
            inflight = self.inflight
            if inflight is None:
                inflight = self.inflight = {}
            elif len(inflight) >= self.rt.settings.max_inflight:
                self.rt.stats.failure(PUBLISH_TYPE, name, "inflight window full")
                return False
            pid = self._next_pid()
            frame = mqtt.encode_publish(
                topic, payload, qos, retain, False, pid, properties, self.version
            )
            inflight[pid] = (_now_ns(), name)
            transport.write(frame)
            self.rt.stats.get(PUBLISH_TYPE, name).total_bytes += len(payload)
        self.last_tx = self.rt.loop.time()
        return True

    def ping(self, name: str = "heartbeat") -> None:
        """PINGREQ; the PINGRESP records ("PING", name). While a ping is unanswered no other is
        sent (counted as `ping_skipped`); one unanswered for --ack-timeout is a failure."""
        transport = self.transport
        if not self.connected or transport is None:
            self.rt.stats.failure(PING_TYPE, name, "not connected")
            return
        if self.ping_t0:
            self.rt.stats.incr("ping_skipped")
            return
        self.ping_t0 = _now_ns()
        self.ping_name = name
        transport.write(_PING)
        self.last_tx = self.rt.loop.time()

    def sweep(self, now: float, ack_deadline_ns: int) -> None:
        """Periodic upkeep (one sweep per process): keep-alive ping, expired acknowledgements."""
        if not self.connected:
            return
        ka = self.rt.settings.keepalive
        if self.ping_t0 and self.ping_t0 < ack_deadline_ns:
            self.rt.stats.failure(PING_TYPE, self.ping_name, "no PINGRESP (timeout)")
            self.ping_t0 = 0
        if ka and now - self.last_tx >= ka * 0.75 and not self.ping_t0:
            self.ping("keepalive")
        inflight = self.inflight
        if inflight:
            expired = [pid for pid, (t0, _) in inflight.items() if t0 < ack_deadline_ns]
            for pid in expired:
                _, name = inflight.pop(pid)
                self.rt.stats.failure(PUBLISH_TYPE, name, "no acknowledgement (timeout)")

    def close(self, send_disconnect: bool = True) -> None:
        self.closing = True
        t = self.transport
        if t is None:
            return
        if send_disconnect and self.connected:
            with contextlib.suppress(Exception):  # the socket may be gone already
                t.write(mqtt.Disconnect().encode(self.version))
        t.close()

    def abort(self) -> None:
        self.closing = True
        t = self.transport
        if t is not None:
            t.abort()


def _reason(code: int) -> str:
    name = mqtt.REASON_NAMES.get(code)
    return f"0x{code:02X} {name}" if name else f"0x{code:02X}"


_V311_CONNACK = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


def _connack_reason(code: int, version: int) -> str:
    if version == 5:
        return _reason(code)
    return f"{code} {_V311_CONNACK.get(code, 'unknown')}"


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
