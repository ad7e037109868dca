"""A raw-socket MQTT load generator for broker benchmarks (any MQTT 3.1.1 broker).

Built on the native codec so the generator is never the bottleneck of a comparison; meant to
run on its own core (`taskset -c 1`) while the broker runs on another. Modes:

- `qos1`: C connections each keep W QoS 1 PUBLISHes in flight; counts PUBACKs.
- `qos0`: P publishers send QoS 0 as fast as the socket takes them; 1 subscriber counts them.
- `connect`: opens C connections (CONNECT/CONNACK) and holds them; connections per second.

`--websocket`: MQTT over WebSocket (path /mqtt, subprotocol mqtt) instead of TCP, qos1 only:
each write is one masked binary frame, as a browser or MQTT.js sends it. The framing here is
a few lines of its own (no library), so that the generator stays cheaper than any server.

`python bench/brokerload.py qos1 --port 1883 --connections 100 --window 10 --seconds 5`
prints one JSON line. The broker's CPU time and RSS are read from /proc when `--pid` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway._native import mqtt
from loadtest.mqtt_client import connected_socket

PAYLOAD = b"x" * 64


@dataclass
class Stats:
    acked: int = 0
    received: int = 0
    connected: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


class Client(asyncio.BufferedProtocol):
    """One MQTT 3.1.1 connection: CONNECT on connect, then the mode's callbacks."""

    def __init__(self, arena: mqtt.ReadArena, client_id: str, on_packet: Callable[..., None]):
        self.framer = mqtt.Framer(arena, version=4)
        self.client_id = client_id
        self.on_packet = on_packet
        self.transport: asyncio.Transport | None = None
        self.connack = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(mqtt.Connect(self.client_id, keep_alive=0).encode())

    def write(self, data: bytes | bytearray) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framer.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        for packet in self.framer.buffer_updated(nbytes):
            if packet.type == mqtt.CONNACK:
                if not self.connack.done():
                    self.connack.set_result(packet.reason_code)
            else:
                self.on_packet(self, packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)


class WsClient(asyncio.Protocol):
    """The same client over WebSocket: the HTTP upgrade, then one masked binary frame per
    write; the server's frames (unmasked, any split) are unwrapped into the MQTT framer."""

    def __init__(self, arena: mqtt.ReadArena, client_id: str, on_packet: Callable[..., None]):
        self.framer = mqtt.Framer(version=4)
        self.client_id = client_id
        self.on_packet = on_packet
        self.transport: asyncio.Transport | None = None
        self.connack = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.key = os.urandom(4)
        self.upgraded = False
        self.buffer = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        nonce = base64.b64encode(os.urandom(16))
        transport.write(
            b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + nonce + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        )

    def write(self, data: bytes | bytearray) -> None:
        n = len(data)
        if n < 126:
            header = bytes((0x82, 0x80 | n))
        elif n < 65536:
            header = bytes((0x82, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            header = bytes((0x82, 0x80 | 127)) + n.to_bytes(8, "big")
        key = (self.key * (n // 4 + 1))[:n]
        masked = (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little")
        assert self.transport is not None
        self.transport.write(header + self.key + masked)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.connack.set_exception(ConnectionError(bytes(buf[:end]).decode()))
                return
            del buf[:end + 4]
            self.upgraded = True
            self.write(mqtt.Connect(self.client_id, keep_alive=0).encode())
        payload = bytearray()
        while len(buf) >= 2:
            length, start = buf[1] & 0x7F, 2
            if length == 126:
                length, start = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                length, start = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < start + length:
                break
            if buf[0] & 0x0F in (0, 2):  # binary or continuation
                payload += buf[start:start + length]
            del buf[:start + length]
        if payload:
            for packet in self.framer.feed(payload):
                if packet.type == mqtt.CONNACK:
                    if not self.connack.done():
                        self.connack.set_result(packet.reason_code)
                else:
                    self.on_packet(self, packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)


async def _connect(
    port: int, client_id: str, arena: mqtt.ReadArena, on_packet: Callable[..., None],
    host: str = "127.0.0.1", source: str | None = None, websocket: bool = False,
) -> Any:
    loop = asyncio.get_running_loop()
    sock = await connected_socket(host, port, (source, 0) if source else None)
    kind = WsClient if websocket else Client
    _, client = await loop.create_connection(lambda: kind(arena, client_id, on_packet), sock=sock)
    code = await client.connack
    if code != 0:
        raise ConnectionError(f"CONNACK {code}")
    return client


async def run_qos1(
    port: int, connections: int, window: int, seconds: float, websocket: bool = False
) -> dict[str, Any]:
    arena = mqtt.ReadArena()
    stats = Stats()
    running = True
    next_id: dict[Client, int] = {}

    def send(c: Client, n: int) -> None:
        out = bytearray()
        pid = next_id[c]
        for _ in range(n):
            pid = pid % 65535 + 1
            mqtt.encode_publish_into(out, "bench/qos1", PAYLOAD, qos=1, packet_id=pid)
        next_id[c] = pid
        c.write(out)  # over WebSocket one frame: then each PUBACK brings one frame of one

    def on_packet(c: Client, p: Any) -> None:
        if p.type == mqtt.PUBACK:
            stats.acked += 1
            if running:
                send(c, 1)

    clients = [await _connect(port, f"q1-{i}", arena, on_packet, websocket=websocket)
               for i in range(connections)]
    for c in clients:
        next_id[c] = 0
    started = time.perf_counter()
    base = stats.acked
    for c in clients:
        send(c, window)
    await asyncio.sleep(seconds)
    running = False
    elapsed = time.perf_counter() - started
    done = stats.acked - base
    for c in clients:
        assert c.transport is not None
        c.transport.close()
    mode = "qos1-ws" if websocket else "qos1"
    return {"mode": mode, "messages": done, "seconds": elapsed, "rate": done / elapsed}


async def run_qos0(
    port: int, publishers: int, seconds: float, sub_port: int | None = None
) -> dict[str, Any]:
    """P publishers -> 1 subscriber (on `sub_port`: another node of a cluster); the rate is
    what the subscriber receives."""
    arena = mqtt.ReadArena()
    stats = Stats()

    def count(c: Client, p: Any) -> None:
        if p.type == mqtt.PUBLISH:
            stats.received += 1

    sub = await _connect(sub_port or port, "q0-sub", arena, count)
    assert sub.transport is not None
    sub.transport.write(mqtt.Subscribe(1, [mqtt.Subscription("bench/qos0", 0)]).encode())
    await asyncio.sleep(0.5)  # the subscription (and, in a cluster, its route) is in place
    pubs = [await _connect(port, f"q0-pub{i}", arena, lambda c, p: None) for i in range(publishers)]
    batch = bytearray()
    for _ in range(100):
        mqtt.encode_publish_into(batch, "bench/qos0", PAYLOAD)
    frames = bytes(batch)
    stop = time.perf_counter() + seconds

    async def pump(c: Client) -> None:
        assert c.transport is not None
        t = c.transport
        while time.perf_counter() < stop:
            # Keep the kernel buffer fed without letting our own buffer grow.
            if t.get_write_buffer_size() < 256 * 1024:
                t.write(frames)
            else:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0)

    base = stats.received
    started = time.perf_counter()
    await asyncio.gather(*(pump(c) for c in pubs))
    elapsed = time.perf_counter() - started
    received = stats.received - base
    for c in [*pubs, sub]:
        assert c.transport is not None
        c.transport.close()
    return {"mode": "qos0", "messages": received, "seconds": elapsed, "rate": received / elapsed}


async def run_connect(
    port: int, connections: int, concurrency: int = 200, hold: float = 1.0,
    sources: list[str] | None = None, pid: int | None = None, id_prefix: str = "c-",
    until_stdin_closes: bool = False,
) -> dict[str, Any]:
    arena = mqtt.ReadArena()
    sem = asyncio.Semaphore(concurrency)
    clients: list[Client] = []
    rss_before = _rss_kb(pid) if pid else None

    async def one(i: int) -> None:
        async with sem:
            source = sources[i % len(sources)] if sources else None
            clients.append(await _connect(port, f"{id_prefix}{i}", arena, lambda c, p: None,
                                          source=source))

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(connections)))
    elapsed = time.perf_counter() - started
    if until_stdin_closes:  # several generators hold at once: the caller says when to let go
        print(json.dumps({"ready": len(clients), "seconds": elapsed}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.sleep(hold)
    result: dict[str, Any] = {
        "mode": "connect", "connections": len(clients), "seconds": elapsed,
        "rate": len(clients) / elapsed,
    }
    if pid and rss_before is not None:
        rss_after = _rss_kb(pid)
        result["rss_kb_before"] = rss_before
        result["rss_kb_after"] = rss_after
        result["kb_per_connection"] = (rss_after - rss_before) / max(1, len(clients))
    for c in clients:
        assert c.transport is not None
        c.transport.close()
    await asyncio.sleep(0.2)
    return result


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def run(mode: str, port: int, pid: int | None = None, **kw: Any) -> dict[str, Any]:
    import uvloop

    cpu0 = cpu_seconds(pid) if pid else None
    if mode == "qos1":
        result = uvloop.run(run_qos1(port, kw["connections"], kw["window"], kw["seconds"],
                                     kw.get("websocket", False)))
    elif mode == "qos0":
        result = uvloop.run(run_qos0(port, kw["publishers"], kw["seconds"], kw.get("sub_port")))
    else:
        result = uvloop.run(run_connect(port, kw["connections"], hold=kw.get("hold", 1.0),
                                        sources=kw.get("sources"), pid=pid,
                                        id_prefix=kw.get("id_prefix", "c-"),
                                        until_stdin_closes=kw.get("until_stdin_closes", False)))
    if pid and cpu0 is not None:
        cpu = cpu_seconds(pid) - cpu0
        result["broker_cpu_s"] = cpu
        count = result.get("messages") or result.get("connections") or 1
        result["broker_cpu_us_per_op"] = cpu / count * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["qos1", "qos0", "connect"])
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--pid", type=int, help="broker pid, for its CPU time and RSS")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--publishers", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--hold", type=float, default=1.0)
    parser.add_argument("--sources", help="comma-separated local addresses (127.0.0.x)")
    parser.add_argument("--sub-port", type=int, help="qos0: the subscriber's port (another node)")
    parser.add_argument("--id-prefix", default="c-", help="client ids: {prefix}{i}")
    parser.add_argument("--websocket", action="store_true",
                        help="qos1: MQTT over WebSocket (path /mqtt) instead of TCP")
    parser.add_argument("--until-stdin-closes", action="store_true",
                        help="connect: print a ready line, hold until stdin closes")
    args = parser.parse_args()
    sources = args.sources.split(",") if args.sources else None
    print(json.dumps(run(args.mode, args.port, args.pid, connections=args.connections,
                         window=args.window, publishers=args.publishers, seconds=args.seconds,
                         hold=args.hold, sources=sources, id_prefix=args.id_prefix,
                         until_stdin_closes=args.until_stdin_closes, sub_port=args.sub_port,
                         websocket=args.websocket)))


if __name__ == "__main__":
    main()
