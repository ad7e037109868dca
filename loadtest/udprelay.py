"""A UDP impairment relay for CoAP: what Toxiproxy is for TCP, for datagrams.

Clients send to the relay's port; the relay forwards each datagram to the upstream (one upstream
socket per client address, so the server's answers find their way back) and impairs both
directions as `Impairment` says: drop a share, delay (with jitter), duplicate a share, reorder a
share (held back `reorder_ms` so later datagrams overtake it). `drop=1.0` is a partition.
The impairment can be changed at any time (`relay.impairment = ...`); counters say what it did.

    relay = UdpRelay(("127.0.0.1", 5683))
    port = await relay.start(("127.0.0.1", 0))
    relay.impairment = Impairment(drop=0.2, delay_ms=100, jitter_ms=20)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, fields
from typing import Any

Address = tuple[str, int]


@dataclass(frozen=True)
class Impairment:
    drop: float = 0.0  # share of datagrams dropped, 0..1
    delay_ms: float = 0.0
    jitter_ms: float = 0.0  # +- uniformly around delay_ms
    duplicate: float = 0.0  # share sent twice
    reorder: float = 0.0  # share held back by reorder_ms
    reorder_ms: float = 30.0

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} = {v}: a share from 0 to 1")
        for name in ("delay_ms", "jitter_ms", "reorder_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Impairment:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown impairment {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(known))})")
        return cls(**{k: float(v) for k, v in data.items()})

    @property
    def none(self) -> bool:
        return self == Impairment()


NONE = Impairment()


class _Upstream(asyncio.DatagramProtocol):
    """The relay's socket towards the server for one client."""

    def __init__(self, relay: UdpRelay, client: Address) -> None:
        self.relay = relay
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        front = self.relay.front
        if front is not None:
            client = self.client
            self.relay._pass(data, lambda d: front.sendto(d, client))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable while the server is down: the datagram is lost, as on a net


class _Front(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class UdpRelay:
    def __init__(self, upstream: Address, impairment: Impairment = NONE) -> None:
        self.upstream = upstream
        self.impairment = impairment
        self.front: asyncio.DatagramTransport | None = None
        self._clients: dict[Address, _Upstream] = {}
        self._opening: dict[Address, list[bytes]] = {}
        self.counters = {"forwarded": 0, "dropped": 0, "duplicated": 0, "reordered": 0}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, listen: Address = ("127.0.0.1", 0)) -> int:
        """Listen; returns the port."""
        self._loop = asyncio.get_running_loop()
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=listen
        )
        self.front = transport
        return int(transport.get_extra_info("sockname")[1])

    def _from_client(self, data: bytes, addr: Address) -> None:
        up = self._clients.get(addr)
        if up is not None and up.transport is not None:
            transport = up.transport
            self._pass(data, lambda d: transport.sendto(d))
            return
        waiting = self._opening.get(addr)
        if waiting is not None:
            waiting.append(data)
            return
        self._opening[addr] = [data]
        assert self._loop is not None
        self._loop.create_task(self._open(addr))

    async def _open(self, addr: Address) -> None:
        assert self._loop is not None
        try:
            transport, proto = await self._loop.create_datagram_endpoint(
                lambda: _Upstream(self, addr), remote_addr=self.upstream
            )
        except OSError:
            self._opening.pop(addr, None)
            return
        self._clients[addr] = proto
        for data in self._opening.pop(addr, []):
            self._pass(data, lambda d: transport.sendto(d))

    def _pass(self, data: bytes, send: Any) -> None:
        """Impair one datagram on its way: drop, delay, duplicate, reorder."""
        imp = self.impairment
        if imp.none:
            self.counters["forwarded"] += 1
            send(data)
            return
        if imp.drop and random.random() < imp.drop:
            self.counters["dropped"] += 1
            return
        copies = 1
        if imp.duplicate and random.random() < imp.duplicate:
            copies = 2
            self.counters["duplicated"] += 1
        for _ in range(copies):
            delay = imp.delay_ms + (random.uniform(-imp.jitter_ms, imp.jitter_ms)
                                    if imp.jitter_ms else 0.0)
            if imp.reorder and random.random() < imp.reorder:
                delay += imp.reorder_ms
                self.counters["reordered"] += 1
            self.counters["forwarded"] += 1
            if delay <= 0:
                send(data)
            else:
                assert self._loop is not None
                self._loop.call_later(delay / 1000.0, _send_safely, send, data)

    def close(self) -> None:
        for up in self._clients.values():
            if up.transport is not None:
                up.transport.close()
        self._clients.clear()
        if self.front is not None:
            self.front.close()
            self.front = None


def _send_safely(send: Any, data: bytes) -> None:
    with contextlib.suppress(OSError, AttributeError, RuntimeError):
        send(data)  # fails when the socket closed while the datagram was delayed
