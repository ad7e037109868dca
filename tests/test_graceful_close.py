"""When the server ends a connection for a reason, the client gets to read the reason: the
server sends its DISCONNECT (or CONNACK), stops sending, and reads and discards what the client
still sends for a short while instead of closing with unread data (which resets the connection
and can destroy the reason code before the client reads it)."""

from __future__ import annotations

import socket
import time
from typing import Any

from gateway._native import mqtt


def _read_until_closed(sock: socket.socket, version: int, timeout: float = 5.0) -> list[Any]:
    framer = mqtt.Framer(version=version)
    packets: list[Any] = []
    sock.settimeout(timeout)
    while True:
        data = sock.recv(65536)  # ConnectionResetError here: the reason code was lost
        if not data:
            return packets
        packets.extend(p.detach() for p in framer.feed(data))


def test_a_client_that_keeps_publishing_past_receive_maximum_reads_0x93(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open")
    sock = socket.create_connection(("127.0.0.1", gw.mqtt_port))
    sock.sendall(mqtt.Connect("flooder", protocol_level=5).encode(5))
    framer = mqtt.Framer(version=5)
    sock.settimeout(5)
    assert framer.feed(sock.recv(4096))[0].type == mqtt.CONNACK
    # QoS 2 PUBLISHes without ever sending PUBREL: past the server's receive maximum (1024)
    # they are a protocol violation; the client keeps sending for a while after it.
    frames = b"".join(
        mqtt.encode_publish("flood/x", b"x" * 200, qos=2, packet_id=i, version=5)
        for i in range(1, 3001)
    )
    sock.sendall(frames)
    # It goes on publishing for a second, as a client whose sending side runs on its own does:
    # the server still reads (and drops) it, so nothing resets the connection meanwhile.
    more = mqtt.encode_publish("flood/x", b"x" * 200, qos=2, packet_id=9, version=5)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        sock.sendall(more * 20)  # BrokenPipeError / ConnectionResetError: reset by the server
        time.sleep(0.01)
    sock.setblocking(True)
    packets = _read_until_closed(sock, 5)
    disconnects = [p for p in packets if p.type == mqtt.DISCONNECT]
    assert disconnects and disconnects[-1].reason_code == mqtt.RECEIVE_MAXIMUM_EXCEEDED
    sock.close()


def test_a_refused_connect_with_packets_behind_it_reads_its_connack(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory()
    gw.gateway.registry.add("dev-1", "secret-1")
    sock = socket.create_connection(("127.0.0.1", gw.mqtt_port))
    behind = b"".join(
        mqtt.encode_publish("devices/dev-1/telemetry", b"x" * 500, qos=1, packet_id=i)
        for i in range(1, 2001)
    )
    connect = mqtt.Connect("dev-1", username="dev-1", password=b"wrong", protocol_level=4)
    sock.sendall(connect.encode(4) + behind)  # a client that does not wait for its CONNACK
    packets = _read_until_closed(sock, 4)
    assert [(p.type, p.reason_code) for p in packets] == [(mqtt.CONNACK, 4)]
    sock.close()
