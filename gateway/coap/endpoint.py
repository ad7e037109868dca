"""The CoAP server endpoint: one UDP socket (an `asyncio.DatagramProtocol` on uvloop), the
message layer of RFC 7252 and one periodic sweep for every timeout.

A datagram arrives as `bytes` and is decoded in place (the payload is a memoryview of it).
Then, per RFC 7252 4:

- a message format error in a CON is rejected with RST (when its id and type are readable);
  anything else unreadable is dropped silently. An empty CON (a ping) gets an RST.
- ACK / RST end the retransmission of our CON (separate responses, CON notifications); an RST
  to a notification also ends that observation.
- a request is deduplicated by (peer, message id): a duplicate CON gets the cached response
  again (the piggybacked response, or the empty ACK if the response went separately) and is
  ignored while the request is still being processed; a duplicate NON is ignored.
- a new request goes to the resources (resources.py), which answer through `respond()`: a CON
  request answered at once gets its response piggybacked on the ACK; one that is not answered
  within `Timing.separate_after` (~1 s: e.g. telemetry waiting to be durable) gets an empty ACK
  from the sweep and its response later as a separate CON, retransmitted with exponential
  back-off until ACKed or reset. A NON request gets a NON response.

No timer, task or future per message: the sweep (every `CoapLimits.sweep_interval` s, one task)
pops what is due from deques and a heap ordered by deadline (exchanges.py). Memory is bounded:
deduplication entries and cached response bytes, Block1 transfers and observers have limits,
and whatever is shed is counted in `iotgw_coap_*` metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import CollectorRegistry

from gateway._native import coap
from gateway.auth import ADDED, REKEYED
from gateway.coap.blockwise import Block1Assembler, block2_slice
from gateway.coap.dtls import DtlsServer, DtlsSession
from gateway.coap.exchanges import Addr, Deduplicator, Exchange, Retransmitter, Timing
from gateway.coap.observe import ObserveRegistry
from gateway.coap.resources import Resources
from gateway.events import EventLog
from gateway.guard import AuthGuard
from gateway.metrics import AuthMetrics, CoapMetrics, EventMetrics

if TYPE_CHECKING:
    from gateway.auth import DeviceRegistry
    from gateway.mqtt.broker import Broker
    from gateway.shadows import ShadowService
    from gateway.telemetry.pipeline import TelemetryPipeline

log = logging.getLogger("iotgw.coap")

_CON, _NON, _ACK, _RST = coap.CON, coap.NON, coap.ACK, coap.RST
_decode = coap.decode
_encode = coap.encode
_encode_empty = coap.encode_empty
_FormatError = coap.CoapFormatError
_monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class CoapLimits:
    max_exchanges: int = 100_000  # deduplication entries (requests of the last 247 s)
    max_cached_bytes: int = 32 << 20  # responses kept for duplicates
    max_body: int = 64 << 10  # a request body, Block1 reassembled
    max_transfers: int = 1024  # Block1 transfers in progress
    transfer_lifetime: float = 60.0  # seconds without a block before a transfer is dropped
    max_observers: int = 100_000
    max_observers_per_resource: int = 8
    con_every: int = 16  # every n-th notification to an observer is CON
    con_interval: float = 24 * 3600.0  # ... and at least one CON this often (RFC 7641 4.5)
    overload_max_age: int = 5  # Max-Age of the 5.03 sent while telemetry is over high water
    sweep_interval: float = 0.25
    preferred_szx: int = 6  # Block2 size when the client names none: 1024 bytes
    socket_buffer: int = 4 << 20  # SO_RCVBUF / SO_SNDBUF asked for (bytes)


class CoapEndpoint(asyncio.DatagramProtocol):
    def __init__(
        self,
        *,
        shadows: ShadowService | None,
        pipeline: TelemetryPipeline | None,
        broker: Broker | None,
        registry: DeviceRegistry | None,
        guard: AuthGuard | None = None,
        events: EventLog | None = None,
        allow_anonymous: bool = False,
        metrics: CoapMetrics | None = None,
        limits: CoapLimits | None = None,
        timing: Timing | None = None,
        dtls: Callable[..., DtlsServer] | None = None,
    ) -> None:
        self.limits = limits = limits or CoapLimits()
        self.timing = timing = timing or Timing()
        self.metrics = metrics if metrics is not None else CoapMetrics(CollectorRegistry())
        if events is None:
            events = EventLog(EventMetrics(CollectorRegistry()))
        if guard is None:  # an endpoint without a registry checks no secrets
            guard = AuthGuard(AuthMetrics(CollectorRegistry()), events)
        self.events = events
        self.guard = guard
        self.transport: asyncio.DatagramTransport | None = None
        self.port: int | None = None
        self.dedup = Deduplicator(timing, limits.max_exchanges, limits.max_cached_bytes)
        self.retransmitter = Retransmitter(timing, self.send)
        self.observers = ObserveRegistry(
            self.retransmitter,
            self.send,
            max_observers=limits.max_observers,
            max_per_resource=limits.max_observers_per_resource,
            con_every=limits.con_every,
            con_interval=limits.con_interval,
        )
        self.blocks = Block1Assembler(
            limits.max_body, limits.max_transfers, limits.transfer_lifetime
        )
        self.resources = Resources(
            self,
            shadows=shadows,
            pipeline=pipeline,
            broker=broker,
            registry=registry,
            allow_anonymous=allow_anonymous,
        )
        # CON requests still being processed, in arrival order: the sweep sends an empty ACK
        # to those not answered within Timing.separate_after.
        self._awaiting: deque[tuple[float, Exchange]] = deque()  # (arrived, request)
        # One tuple per peer address (uvloop makes a new one per datagram): the entries that
        # live for minutes share it instead of each holding a copy.
        self._peers: dict[Addr, Addr] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.closing = False
        # coaps: the DTLS layer, built with where it hands each decrypted message (its session
        # as the peer) and the sessions that ended.
        self.dtls: DtlsServer | None = None
        if dtls is not None:
            self.dtls = dtls(deliver=self.datagram_received, on_closed=self._sessions_closed)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(
        self, host: str, port: int | None, sock: socket.socket | None = None
    ) -> int | None:
        """Bind the UDP socket (or serve `sock`, bound already), start the sweep; returns the
        port (useful with port 0). Port None and no sock: no plain CoAP (coaps only)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        elif port is not None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=(host, port), family=family
            )
        else:
            self._sweeper = loop.create_task(self._sweep_forever())
            return None
        sock = transport.get_extra_info("socket")
        # Bursts of small datagrams: the default buffer (~200 KB) holds only ~200 of them
        # (each costs ~1 KB of kernel accounting). The kernel caps this at net.core.rmem_max.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.limits.socket_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.socket_buffer)
        self.port = int(sock.getsockname()[1])
        self._sweeper = loop.create_task(self._sweep_forever())
        return self.port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport is not an asyncio.DatagramTransport subclass, but is one.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) of earlier sends: the retransmission gives up in time.
        log.debug("CoAP socket error: %s", exc)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop taking requests; answer those waiting for telemetry durability (for at most
        `drain_timeout` s) and the shadow requests in progress; close the socket."""
        self.closing = True
        self.resources.close()
        await self.resources.drain(drain_timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self.observers.clear()
        self.retransmitter.clear()
        if self.dtls is not None:
            self.dtls.stop()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # ---- I/O ---------------------------------------------------------------------------------

    def send(self, data: bytes, addr: Addr) -> None:
        if type(addr) is DtlsSession:
            addr.send(data)
            return
        transport = self.transport
        if transport is not None:
            transport.sendto(data, addr)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        try:
            msg = _decode(data)
        except _FormatError as exc:
            self.metrics.format_errors += 1
            if exc.type == _CON and exc.mid is not None:
                self._reset(exc.mid, addr)
            return
        code = msg.code
        mtype = msg.type
        if 0 < code < 32:  # a request
            if mtype > _NON:  # an ACK or RST cannot carry a request: a format error
                self.metrics.format_errors += 1
                return
            if self.closing:
                return  # shutting down: the client retransmits elsewhere or later
            now = _monotonic()
            mid = msg.mid
            addr = self._peers.setdefault(addr, addr)
            dedup = self.dedup
            found = dedup.get((addr, mid), now)
            if found is not None:
                self._duplicate(found, mtype, addr)
                return
            ex = dedup.add(addr, mid, mtype, msg.token, now)
            if type(addr) is DtlsSession:
                ex.identity = addr.device
            try:
                self.resources.handle(ex, msg, code, now)
            except Exception:  # a bug must cost this request only
                log.exception("CoAP request %s %s failed", coap.code_str(code), msg.path)
                self.respond(ex, coap.INTERNAL_SERVER_ERROR, (), b"internal error")
            if not ex.done and mtype == _CON:
                self._awaiting.append((now, ex))
            return
        if code == 0:
            if mtype == _CON:  # a ping (or a CON we cannot handle): RST
                self._reset(msg.mid, addr)
            elif mtype == _ACK:
                out = self.retransmitter.acknowledge(addr, msg.mid)
                if out is not None and out.owner is not None:
                    self.observers.acknowledged(out, _monotonic())
            elif mtype == _RST:
                self.metrics.rst_received += 1
                out = self.retransmitter.acknowledge(addr, msg.mid)
                self.observers.reset(addr, msg.mid, out)
            return
        if code >= 64:  # a response: we send no requests, so it matches nothing of ours
            if mtype == _CON:
                self._reset(msg.mid, addr)
            elif mtype == _ACK:
                # A piggybacked response can only answer a request: not ours. But an ACK
                # still acknowledges the message id, as an empty one would.
                self.retransmitter.acknowledge(addr, msg.mid)
            return
        self.metrics.format_errors += 1  # a reserved code class, decoded but unusable

    def _sessions_closed(self, sessions: list[DtlsSession]) -> None:
        """DTLS sessions ended: their observations end with them (RFC 7252 9.1)."""
        self.observers.end_peers(set(sessions))

    def revoke(self, changes: dict[str, str]) -> None:
        """Devices removed, disabled, added or given a new PSK: the DTLS sessions of those
        removed, disabled or rekeyed end (and their observations with them); observations over
        plain CoAP end as resources.py says (for them a new PSK is what "added" is: the id
        stays registered)."""
        self.resources.revoke(
            {d: ADDED if op == REKEYED else op for d, op in changes.items()}
        )
        if self.dtls is not None:
            for device, op in changes.items():
                if op != ADDED:
                    self.dtls.close_device(device)

    def _reset(self, mid: int, addr: Addr) -> None:
        self.metrics.rst_sent += 1
        self.send(_encode_empty(_RST, mid), addr)

    def _duplicate(self, found: Exchange | bytes, mtype: int, addr: Addr) -> None:
        m = self.metrics
        if mtype == _CON:
            m.duplicates_con += 1
            # Answered: the same bytes again. In progress: the empty ACK if it went out,
            # else nothing (the sweep empty-ACKs it if it takes long).
            again = found if isinstance(found, bytes) else found.response
            if again:
                self.send(again, addr)
        else:
            m.duplicates_non += 1  # RFC 7252 4.5: silently ignored

    # ---- responses ---------------------------------------------------------------------------

    def respond(
        self,
        ex: Exchange,
        code: int,
        options: list[tuple[int, Any]] | tuple[()] = (),
        payload: bytes = b"",
    ) -> None:
        """Answer a request (once; later calls are ignored): piggybacked on the ACK, as a
        separate CON after the empty ACK, or NON. Large payloads go block-wise (Block2)."""
        if ex.done:
            return
        ex.done = True
        m = self.metrics
        key = (ex.method, code)
        requests = m.requests
        requests[key] = requests.get(key, 0) + 1
        if ex.no_response and _suppressed(ex.no_response, code):
            if ex.type == _CON and not ex.separate:
                ex.response = _encode_empty(_ACK, ex.mid)
                self.send(ex.response, ex.addr)
            self.dedup.done(ex, ex.response or b"")
            return
        if ex.block1 is not None:
            options = [*options, (coap.BLOCK1, ex.block1)]
        if (
            payload
            and code >> 5 == 2  # a representation, not a diagnostic
            and (ex.block2 is not None or len(payload) > 16 << self.limits.preferred_szx)
        ):
            sliced = block2_slice(options, payload, ex.block2, self.limits.preferred_szx)
            if sliced is None:
                code, options, payload = coap.BAD_OPTION, (), b"Block2 beyond the end"
            else:
                options, payload = sliced
        addr = ex.addr
        if ex.type == _CON:
            if not ex.separate:
                data = _encode(_ACK, code, ex.mid, ex.token, options, payload)
                self.dedup.done(ex, data)
                self.send(data, addr)
            else:
                m.separate_responses += 1
                rt = self.retransmitter
                mid = rt.next_mid(addr)
                data = _encode(_CON, code, mid, ex.token, options, payload)
                rt.send_con(addr, mid, data, _monotonic())
                self.dedup.done(ex, ex.response or b"")  # duplicates: the empty ACK again
        else:
            mid = self.retransmitter.next_mid(addr)
            self.send(_encode(_NON, code, mid, ex.token, options, payload), addr)
            self.dedup.done(ex, b"")

    def records_durable(self, tokens: list[Any]) -> None:
        """The telemetry pipeline made these records durable: 2.04 Changed to each request."""
        respond = self.respond
        changed = coap.CHANGED
        for ex in tokens:
            respond(ex, changed)

    # ---- the sweep ---------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        interval = self.limits.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:  # a bug in one sweep must not stop every timeout for good
                log.exception("CoAP sweep failed")

    def sweep(self, now: float | None = None) -> None:
        """Every timeout of the endpoint, in one pass over what is due."""
        now = _monotonic() if now is None else now
        self._separate_acks(now)
        observers = self.observers
        for out in self.retransmitter.due(now):
            if out.owner is not None:
                observers.failed(out)
        self.dedup.expire(now)
        if len(self._peers) > 65536:
            self._peers.clear()
        self.blocks.expire(now)
        observers.sweep(now)
        self.resources.sweep(now)
        if self.dtls is not None:
            self.dtls.sweep(now)
        m = self.metrics
        m.retransmissions = self.retransmitter.retransmissions
        m.transmit_failures = self.retransmitter.failures
        m.dedup_shed = self.dedup.shed
        m.exchanges = len(self.dedup)
        m.observers = len(observers)
        m.notifications = observers.notifications
        m.observers_dropped = observers.dropped
        m.block1_dropped = self.blocks.dropped

    def _separate_acks(self, now: float) -> None:
        awaiting = self._awaiting
        limit = now - self.timing.separate_after
        while awaiting and awaiting[0][0] <= limit:
            ex = awaiting.popleft()[1]
            if not ex.done and not ex.separate:
                ex.separate = True
                ex.response = _encode_empty(_ACK, ex.mid)
                self.send(ex.response, ex.addr)


def _suppressed(mask: int, code: int) -> bool:
    """RFC 7967: bit 2 suppresses 2.xx, bit 8 4.xx, bit 16 5.xx."""
    cls = code >> 5
    return bool(mask & (2 if cls == 2 else 8 if cls == 4 else 16 if cls == 5 else 0))
