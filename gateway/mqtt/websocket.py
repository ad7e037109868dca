"""MQTT over WebSocket (RFC 6455; MQTT 5.0 6.0, 3.1.1 6.0): a transport in front of an
`MqttChannel`, as the TCP/TLS one is (gateway/mqtt/connection.py).

The WebSocket protocol is picows's (a Cython implementation; README says why not wsproto): it
answers the HTTP upgrade, times out upgrades that do not finish, unmasks frames, answers pings
and bounds the frame size. `WebSocketListener` routes an upgrade request: path `/mqtt` only,
subprotocol `mqtt` or the legacy `mqttv3.1`. `MqttWebSocket` is one upgraded connection: the
binary data of every frame of one read goes through the MQTT framer to the channel in one pass,
as a TCP read does (MQTT packets and frames split anywhere: the framer reassembles), so replies
still leave in one write per read, each write one binary message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

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

from gateway._native import mqtt
from gateway.mqtt.broker import Broker
from gateway.mqtt.channel import MqttChannel
from gateway.mqtt.connection import framed, open_channel

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
    """One upgraded connection, a transport in front of an `MqttChannel` (`ChannelIO`): the
    binary data of a read goes through the MQTT framer to the channel; each write of the
    channel is one binary message."""

    def __init__(self, broker: Broker, arena: Any) -> None:
        self.broker = broker
        self.framer = mqtt.Framer(arena, max_packet_size=broker.limits.max_packet_size)
        self.channel: MqttChannel | None = None
        self.ws: WSTransport | None = None
        self.socket: asyncio.Transport | None = None
        self.pending = bytearray()  # binary data of this read, not yet handed on
        self.message_bytes = 0  # of the binary message being received, so far
        self.fragmented = False  # a binary message continues in the next frame
        self.closing = False  # our close frame is sent: what comes until the client's is dropped
        self.plain = True  # neither of the two: whole binary messages take the short path
        self.writing_paused = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        self.socket = socket = transport.underlying_transport
        socket.set_write_buffer_limits(high=self.broker.limits.max_write_buffer)
        self.channel = open_channel(self.broker, self, socket)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is _BINARY and frame.fin and self.plain:
            # The common case: a whole message (picows bounds a frame's size).
            data = frame.get_payload_as_memoryview()
            if self.pending or not frame.last_in_buffer:
                self.pending += data  # handed on with the read's last frame
            else:  # alone in its read: straight into the MQTT framer
                self._deliver(data)
                return
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
            self._deliver_pending()  # the frames before it were good
            self._close_ws(WSCloseCode.UNSUPPORTED_DATA, b"MQTT takes binary frames only")
        # PONG: nothing to do; PING is answered by picows
        if frame.last_in_buffer:
            self._deliver_pending()

    def _fragment(self, frame: WSFrame, continuation: bool) -> None:
        """A frame of a message in several frames (RFC 6455 5.4)."""
        if continuation != self.fragmented:
            self._deliver_pending()  # the frames before it were good
            self._close_ws(WSCloseCode.PROTOCOL_ERROR, b"continuation frame out of place")
            return
        size = frame.payload_size
        self.message_bytes = size + (self.message_bytes if continuation else 0)
        if self.message_bytes > self.broker.limits.max_packet_size:
            self._deliver_pending()
            self._close_ws(WSCloseCode.MESSAGE_TOO_BIG, b"message larger than the maximum packet")
            return
        self.fragmented = not frame.fin
        self.plain = not self.fragmented
        if size:
            self.pending += frame.get_payload_as_memoryview()

    def _deliver_pending(self) -> None:
        if self.pending:
            data, self.pending = self.pending, bytearray()
            self._deliver(memoryview(data))

    def _deliver(self, data: memoryview) -> None:
        """Copy MQTT bytes into the framer's buffer: as much as it takes per call."""
        channel, framer = self.channel, self.framer
        assert channel is not None
        while data and not self.closing:
            n = len(data)
            buffer = framer.get_buffer(n)
            if len(buffer) >= n:  # nearly always: all of it at once
                buffer[:n] = data
                framed(self.broker, framer, channel, n)
                return
            n = len(buffer)
            buffer[:] = data[:n]
            framed(self.broker, framer, channel, n)
            data = data[n:]

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.channel is not None:
            self.broker.metrics.connections.dec()
            self.channel.connection_lost("closed by the client")
        self.ws = self.socket = None

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.channel is not None:
            self.channel.writing_paused()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.channel is not None:
            self.channel.writing_resumed()

    # ---- the channel's side (ChannelIO) ----------------------------------------------------

    def write(self, data: bytearray) -> None:
        if self.ws is not None and not self.closing:
            self.ws.send(_BINARY, data)

    def pause_reading(self) -> None:
        if self.socket is not None and not self.closing:
            self.socket.pause_reading()

    def resume_reading(self) -> None:
        if self.socket is not None and not self.socket.is_closing():
            self.socket.resume_reading()

    def close(self, graceful: bool) -> None:
        socket = self.socket
        if socket is None or socket.is_closing():
            return
        if self.writing_paused:  # it is not reading: a close frame would wait on it for ever
            socket.abort()
            return
        self._close_ws()
        if not graceful:
            socket.close()

    def _close_ws(self, code: WSCloseCode = WSCloseCode.OK, reason: bytes | None = None) -> None:
        """Send a close frame after what is pending, then drop what the client still sends
        until its close frame comes (TCP is closed then), or CLOSE_SECONDS pass."""
        ws, socket = self.ws, self.socket
        if self.closing or ws is None or socket is None:
            return
        self.closing = True
        self.plain = False
        self.pending.clear()  # what came after the reason to close
        ws.send_close(code, reason)
        socket.resume_reading()  # the client's close frame must be read
        asyncio.get_running_loop().call_later(
            CLOSE_SECONDS, lambda: None if socket.is_closing() else socket.abort()
        )
