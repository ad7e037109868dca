"""MQTT over TCP and TLS: an `asyncio.BufferedProtocol` in front of an `MqttChannel`.

The transport reads straight into the framer's buffer (`get_buffer`), `buffer_updated` decodes
every whole frame of that read in one native call and hands the packets to the channel, and the
broker's flush writes every channel's output of that read once. This class holds no protocol
state: only the framer, the transport and how to close it.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from gateway._native import mqtt
from gateway.mqtt import ratelimit
from gateway.mqtt.broker import Broker
from gateway.mqtt.channel import ChannelIO, MqttChannel

DRAIN_SECONDS = 2.0  # how long a connection the server ends is read (and dropped) at most
_DISCARD_BYTES = 16384


class MqttConnection(asyncio.BufferedProtocol):
    def __init__(self, broker: Broker, arena: Any) -> None:
        self.broker = broker
        self.framer = mqtt.Framer(arena, max_packet_size=broker.limits.max_packet_size)
        self.transport: asyncio.Transport | None = None
        self.channel: MqttChannel | None = None
        self._draining = False  # closing gracefully: the reason code sent, reading to drop
        self._discard = bytearray()  # where dropped bytes are read to, while draining
        self._writing_paused = False

    # ---- asyncio's side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.broker.limits.max_write_buffer)
        self.channel = open_channel(self.broker, self, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._draining:  # what the client still sends is read and dropped
            return memoryview(self._discard)
        view: memoryview = self.framer.get_buffer(sizehint)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if self._draining:
            return
        assert self.channel is not None
        framed(self.broker, self.framer, self.channel, nbytes)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.broker.metrics.connections.dec()
        if self.channel is not None:
            self.channel.connection_lost(f"lost: {exc}" if exc else "closed by the client")
        self.transport = None

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.channel is not None:
            self.channel.writing_paused()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.channel is not None:
            self.channel.writing_resumed()

    # ---- the channel's side (ChannelIO) ----------------------------------------------------

    def write(self, data: bytearray) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self._draining:
            transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._draining:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def close(self, graceful: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._writing_paused:  # it is not reading: a graceful close would wait on it for ever
            transport.abort()
        elif graceful and transport.can_write_eof():
            self._drain(transport)
        else:
            transport.close()

    def _drain(self, transport: asyncio.Transport) -> None:
        """Shut our sending side after the last reply (the reason code) and read and drop what
        the client still sends, until it closes or DRAIN_SECONDS pass. Closing at once with its
        data unread would reset the connection, and a reset can destroy the reason code before
        the client reads it."""
        self._draining = True
        self._discard = bytearray(_DISCARD_BYTES)
        transport.write_eof()
        transport.resume_reading()
        asyncio.get_running_loop().call_later(
            DRAIN_SECONDS, lambda: None if transport.is_closing() else transport.abort()
        )


def framed(broker: Broker, framer: Any, channel: MqttChannel, nbytes: int) -> None:
    """`nbytes` more were read into the framer's buffer: its whole packets go to the channel,
    then every channel's output of this read is written (one write each)."""
    broker.metrics.bytes_in += nbytes
    try:
        packets = framer.buffer_updated(nbytes)
    except mqtt.MqttError as exc:
        channel.malformed(exc)
    else:
        channel.received(packets)
        if channel.rate is not None:
            ratelimit.account(channel, packets, nbytes)
    broker.flush()


def open_channel(broker: Broker, io: ChannelIO, transport: asyncio.BaseTransport) -> MqttChannel:
    """The channel of a connection whose transport is `transport` (its peer, its certificate)."""
    peer = transport.get_extra_info("peername")
    broker.metrics.connections.inc()
    return MqttChannel(
        broker,
        io,
        peer=f"{peer[0]}:{peer[1]}" if peer else "?",
        peer_host=str(peer[0]) if peer else "?",
        cert_identity=certificate_identity(transport.get_extra_info("peercert")),
    )


def certificate_identity(cert: Any) -> str | None:
    """The subject common name of a client certificate the TLS layer verified, or None."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
