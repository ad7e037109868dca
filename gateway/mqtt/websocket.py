"""MQTT over WebSocket (RFC 6455; MQTT 5.0 6.0, 3.1.1 6.0): a transport in front of an unchanged
`MqttConnection`, which holds all MQTT state.

`MqttWebSocket` is the asyncio protocol of one accepted socket. It owns the sans-IO `wsproto`
connection: the HTTP upgrade (path `/mqtt`, subprotocol `mqtt` or the legacy `mqttv3.1`), then
frames. The binary data of every frame of one read is handed to the inner `MqttConnection`
in one `buffer_updated`, as a TCP read is (MQTT packets and frames split anywhere: the MQTT
framer reassembles), so replies still leave in one write per read. The inner connection sees a
`WebSocketTransport` that turns each write into one binary message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import RemoteProtocolError

from gateway.mqtt.broker import Broker
from gateway.mqtt.connection import MqttConnection

log = logging.getLogger("iotgw.mqtt")

PATH = "/mqtt"
# Preferred first: `mqtt` is the name MQTT 3.1.1 and 5.0 register; `mqttv3.1` is older clients'.
SUBPROTOCOLS = ("mqtt", "mqttv3.1")
CLOSE_SECONDS = 2.0  # how long a close we started waits for the client's close frame
_CAN_CLOSE = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)  # a close frame may be sent


class WebSocketListener:
    """The protocol factory of a WS or WSS listener; it knows the connections still upgrading
    (the gateway's stop ends them: they have no MQTT connection to close)."""

    def __init__(self, broker: Broker, arena: Any, handshake_timeout: float) -> None:
        self.broker = broker
        self.arena = arena
        self.handshake_timeout = handshake_timeout
        self.upgrading: set[MqttWebSocket] = set()

    def __call__(self) -> MqttWebSocket:
        return MqttWebSocket(self)

    def close(self) -> None:
        for protocol in list(self.upgrading):
            protocol.abort()


class MqttWebSocket(asyncio.Protocol):
    def __init__(self, listener: WebSocketListener) -> None:
        self.listener = listener
        self.ws = WSConnection(ConnectionType.SERVER)
        self.frames: Connection | None = None  # wsproto's connection once upgraded
        self.transport: asyncio.Transport | None = None
        self.inner: MqttConnection | None = None
        self.adapter = WebSocketTransport(self)
        self._timer: asyncio.TimerHandle | None = None
        self._message_bytes = 0  # of the binary message being received, so far

    # ---- the socket's callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.listener.upgrading.add(self)
        # Slow-loris: an upgrade not done in time is dropped (MQTT's own CONNECT timeout
        # starts once the inner connection exists).
        self._timer = asyncio.get_running_loop().call_later(
            self.listener.handshake_timeout, self.abort
        )

    def data_received(self, data: bytes) -> None:
        frames = self.frames
        if frames is None:
            self._upgrade(data)
            return
        if frames.state is ConnectionState.CLOSED:
            return  # after the close handshake: dropped
        frames.receive_data(data)
        self._receive(frames)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.listener.upgrading.discard(self)
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connection_lost(exc)
        self.transport = None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # ---- the upgrade -------------------------------------------------------------------------

    def _upgrade(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Request):
                    self._request(event)
                    break
        except RemoteProtocolError as exc:  # not an upgrade request: answered and closed
            hint = exc.event_hint if isinstance(exc.event_hint, RejectConnection) else None
            self._reject(hint.status_code if hint else 400, f"{exc}\n")
            return
        frames = self.frames
        if frames is not None:
            self._receive(frames)  # frames that came with the request

    def _request(self, request: Request) -> None:
        path = request.target.partition("?")[0]
        if path != PATH:
            self._reject(404, f"MQTT over WebSocket is served on {PATH} only\n")
            return
        offered = [p.strip().lower() for p in request.subprotocols]
        chosen = next((p for p in SUBPROTOCOLS if p in offered), None)
        if chosen is None:
            self._reject(400, "offer the WebSocket subprotocol mqtt (Sec-WebSocket-Protocol)\n")
            return
        assert self.transport is not None
        self.transport.write(self.ws.send(AcceptConnection(subprotocol=chosen)))
        self.frames = self.ws.connection
        self._cancel_timer()
        self.listener.upgrading.discard(self)
        self.inner = MqttConnection(self.listener.broker, self.listener.arena)
        self.inner.connection_made(cast(asyncio.Transport, self.adapter))

    def _reject(self, status: int, body: str) -> None:
        transport = self.transport
        if transport is None:
            return
        data = body.encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(data))]
        try:
            transport.write(self.ws.send(RejectConnection(status, headers, has_body=True)))
            transport.write(self.ws.send(RejectData(data)))
        except Exception:  # wsproto refuses to answer in its state: nothing more to say
            log.debug("WebSocket upgrade refused without a response", exc_info=True)
        transport.close()

    # ---- frames ------------------------------------------------------------------------------

    def _receive(self, frames: Connection) -> None:
        """Every event of what was read: the binary data of the whole read reaches MQTT in one
        piece, control frames are answered, anything else closes."""
        parts: list[bytes | bytearray] = []
        limit = self.listener.broker.limits.max_packet_size
        for event in frames.events():
            if isinstance(event, BytesMessage):
                if frames.state is not ConnectionState.OPEN:
                    continue  # we are closing: what still comes is dropped
                self._message_bytes += len(event.data)
                if self._message_bytes > limit:
                    self._deliver(parts)
                    self.close(CloseReason.MESSAGE_TOO_BIG,
                               f"a message is larger than {limit} bytes")
                    return
                if event.message_finished:
                    self._message_bytes = 0
                parts.append(event.data)
            elif isinstance(event, Ping):
                if frames.state is ConnectionState.OPEN:
                    self._write(frames.send(event.response()))
            elif isinstance(event, CloseConnection):  # or a frame wsproto found malformed
                self._deliver(parts)
                if frames.state in _CAN_CLOSE:
                    self._write(frames.send(event.response()))
                if self.transport is not None:
                    self.transport.close()  # the server closes TCP first (RFC 6455 7.1.1)
                return
            elif isinstance(event, TextMessage):
                self._deliver(parts)
                self.close(CloseReason.UNSUPPORTED_DATA, "MQTT takes binary frames only")
                return
        self._deliver(parts)

    def _deliver(self, parts: list[bytes | bytearray]) -> None:
        """Copy MQTT bytes into the inner connection's buffer: as much as it takes per call."""
        inner = self.inner
        if not parts or inner is None:
            return
        data = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
        while data:
            buffer = inner.get_buffer(len(data))
            n = min(len(buffer), len(data))
            buffer[:n] = data[:n]
            inner.buffer_updated(n)
            data = data[n:]
        parts.clear()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """One binary message; dropped once a close frame is sent (nothing may follow it)."""
        frames = self.frames
        if frames is not None and frames.state is ConnectionState.OPEN:
            self._write(frames.send(Message(data=bytes(data))))

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str | None = None) -> None:
        """Send a close frame after what is pending and drop what the client still sends until
        its close frame comes (then TCP is closed), or CLOSE_SECONDS pass."""
        frames = self.frames
        if frames is None or frames.state is not ConnectionState.OPEN:
            return
        self._write(frames.send(CloseConnection(code=code, reason=reason)))
        transport = self.transport
        if transport is not None:
            transport.resume_reading()  # its close frame must be read
            asyncio.get_running_loop().call_later(
                CLOSE_SECONDS, lambda: None if transport.is_closing() else transport.abort()
            )

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class WebSocketTransport:
    """What `MqttConnection` uses of its transport, over WebSocket: each write is one binary
    message; write_eof sends a close frame (then input is dropped until the client's close
    frame); reading is paused and resumed on the socket itself."""

    def __init__(self, protocol: MqttWebSocket) -> None:
        self.protocol = protocol

    def _transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.protocol.send(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.protocol.close()

    def close(self) -> None:
        self.protocol.close()
        transport = self._transport()
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        self.protocol.abort()

    def is_closing(self) -> bool:
        transport = self._transport()
        return transport is None or transport.is_closing()

    def pause_reading(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        transport = self._transport()
        if transport is not None:
            transport.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self._transport()
        return default if transport is None else transport.get_extra_info(name, default)
