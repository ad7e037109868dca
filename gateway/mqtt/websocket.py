"""MQTT over WebSocket (RFC 6455; MQTT 5.0 6.0, 3.1.1 6.0): a transport in front of an unchanged
`MqttConnection`, which holds all MQTT state.

The WebSocket protocol is picows's (a Cython implementation; README says why not wsproto): it
answers the HTTP upgrade, times out upgrades that do not finish, unmasks frames, answers pings
and bounds the frame size. `WebSocketListener` routes an upgrade request: path `/mqtt` only,
subprotocol `mqtt` or the legacy `mqttv3.1`. `MqttWebSocket` is one upgraded connection: the
binary data of every frame of one read is handed to the inner `MqttConnection` in one
`buffer_updated`, as a TCP read is (MQTT packets and frames split anywhere: the MQTT framer
reassembles), so replies still leave in one write per read. The inner connection sees a
`WebSocketTransport`, on which each write is one binary message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from gateway.mqtt.broker import Broker
from gateway.mqtt.connection import MqttConnection

PATH = b"/mqtt"
# Preferred first: `mqtt` is the name MQTT 3.1.1 and 5.0 register; `mqttv3.1` is older clients'.
SUBPROTOCOLS = ("mqtt", "mqttv3.1")
CLOSE_SECONDS = 2.0  # how long a close we started waits for the client's close frame

_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE
_TEXT = WSMsgType.TEXT

# picows logs each accepted connection at INFO and a client's protocol error at ERROR: one
# misbehaving device must not fill the gateway's log.
_picows_log = logging.getLogger("iotgw.mqtt.websocket")
_picows_log.setLevel(logging.CRITICAL)


class WebSocketListener:
    """Routes the upgrade requests of a WS or WSS listener."""

    def __init__(self, broker: Broker, arena: Any, handshake_timeout: float) -> None:
        self.broker = broker
        self.arena = arena
        self.handshake_timeout = handshake_timeout

    async def serve(self, sock: Any, ctx: ssl.SSLContext | None) -> asyncio.Server:
        return await ws_create_server(
            self.route, sock=sock, ssl=ctx, backlog=4096,
            websocket_handshake_timeout=self.handshake_timeout,
            max_frame_size=self.broker.limits.max_packet_size,
            logger_name=_picows_log, use_aiofastnet=False,
        )

    def route(self, request: WSUpgradeRequest) -> Any:
        if request.path.partition(b"?")[0] != PATH:
            return None  # picows answers 404
        header = request.headers.get("Sec-WebSocket-Protocol", "")
        offered = [p.strip().lower() for p in header.split(",")]
        chosen = next((p for p in SUBPROTOCOLS if p in offered), None)
        if chosen is None:
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                400, b"offer the WebSocket subprotocol mqtt (Sec-WebSocket-Protocol)\n"
            ), None)
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": chosen}),
            MqttWebSocket(self.broker, self.arena),
        )


class MqttWebSocket(WSListener):
    """One upgraded connection: frames in, MQTT bytes to the inner connection."""

    def __init__(self, broker: Broker, arena: Any) -> None:
        self.max_message = broker.limits.max_packet_size
        self.inner = MqttConnection(broker, arena)
        self.ws: WSTransport | None = None
        self.socket: asyncio.Transport | None = None
        self.pending = bytearray()  # binary data of this read, not yet handed on
        self.message_bytes = 0  # of the binary message being received, so far
        self.fragmented = False  # a binary message continues in the next frame
        self.closing = False  # our close frame is sent: what comes until the client's is dropped

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        self.socket = transport.underlying_transport
        self.inner.connection_made(cast(asyncio.Transport, WebSocketTransport(self, transport)))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is _BINARY and frame.fin and not self.fragmented and not self.closing:
            # The common case: a whole message (picows bounds a frame's size). Alone in its
            # read, it goes straight to MQTT.
            if frame.last_in_buffer and not self.pending:
                self._deliver(frame.get_payload_as_memoryview())
                return
            else:
                self.pending += frame.get_payload_as_memoryview()
        elif kind is _BINARY or kind is _CONTINUATION:
            if not self.closing:
                self._fragment(frame, kind is _CONTINUATION)
        elif kind is _CLOSE:  # the client's close, or its answer to ours
            self._deliver_pending()
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()  # the server closes TCP first (RFC 6455 7.1.1)
            return
        elif kind is _TEXT:
            self.close(WSCloseCode.UNSUPPORTED_DATA, b"MQTT takes binary frames only")
        # PONG: nothing to do; PING is answered by picows
        if frame.last_in_buffer:
            self._deliver_pending()

    def _fragment(self, frame: WSFrame, continuation: bool) -> None:
        """A frame of a message in several frames (RFC 6455 5.4)."""
        if continuation != self.fragmented:
            self.close(WSCloseCode.PROTOCOL_ERROR, b"continuation frame out of place")
            return
        size = frame.payload_size
        self.message_bytes = size + (self.message_bytes if continuation else 0)
        if self.message_bytes > self.max_message:
            self.close(WSCloseCode.MESSAGE_TOO_BIG, b"message larger than the maximum packet")
            return
        self.fragmented = not frame.fin
        if size:
            self.pending += frame.get_payload_as_memoryview()

    def _deliver_pending(self) -> None:
        if self.pending:
            data, self.pending = self.pending, bytearray()
            self._deliver(memoryview(data))

    def _deliver(self, data: memoryview) -> None:
        """Copy MQTT bytes into the inner connection's buffer: as much as it takes per call."""
        inner = self.inner
        while data:
            buffer = inner.get_buffer(len(data))
            n = min(len(buffer), len(data))
            buffer[:n] = data[:n]
            inner.buffer_updated(n)
            data = data[n:]

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.inner.connection_lost(None)
        self.ws = self.socket = None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def close(self, code: WSCloseCode = WSCloseCode.OK, reason: bytes | None = None) -> None:
        """Send a close frame after what is pending, then drop what the client still sends
        until its close frame comes (TCP is closed then), or CLOSE_SECONDS pass."""
        ws, socket = self.ws, self.socket
        if self.closing or ws is None or socket is None:
            return
        self.closing = True
        self.pending.clear()
        ws.send_close(code, reason)
        socket.resume_reading()  # the client's close frame must be read
        asyncio.get_running_loop().call_later(
            CLOSE_SECONDS, lambda: None if socket.is_closing() else socket.abort()
        )


class WebSocketTransport:
    """What `MqttConnection` uses of its transport, over WebSocket: each write is one binary
    message; write_eof sends a close frame (input is then dropped until the client's close
    frame); reading is paused and resumed on the socket itself."""

    def __init__(self, protocol: MqttWebSocket, ws: WSTransport) -> None:
        self.protocol = protocol
        # One binary message per write (picows drops what comes after our close frame).
        self.write: Callable[[bytes | bytearray | memoryview], None] = partial(ws.send, _BINARY)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.protocol.close()

    def close(self) -> None:
        self.protocol.close()
        if self.protocol.socket is not None:
            self.protocol.socket.close()

    def abort(self) -> None:
        if self.protocol.socket is not None:
            self.protocol.socket.abort()

    def is_closing(self) -> bool:
        socket = self.protocol.socket
        return socket is None or socket.is_closing()

    def pause_reading(self) -> None:
        if self.protocol.socket is not None:
            self.protocol.socket.pause_reading()

    def resume_reading(self) -> None:
        if self.protocol.socket is not None:
            self.protocol.socket.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.protocol.socket is not None:
            self.protocol.socket.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        socket = self.protocol.socket
        return default if socket is None else socket.get_extra_info(name, default)
