"""A small CoAP (RFC 7252) client on the native codec, one UDP socket per simulated device.

Requests are CON (retransmitted with exponential back-off: ACK_TIMEOUT 2 s, ACK_RANDOM_FACTOR
1.5, MAX_RETRANSMIT 4) or NON. Responses are matched by token, so piggybacked, separate (empty
ACK first, then a CON or NON response) and Observe notifications all work. Retransmissions and
timeouts are driven by one sweep per process every 100 ms, not one timer per request.

The request -> response time is recorded as (method, name), e.g. ("POST", "telemetry"); a
4.xx/5.xx response, an RST or a timeout is a failure with the reason.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from gateway._native import coap

if TYPE_CHECKING:
    from loadtest.runtime import Runtime

ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4

METHOD_NAMES = {
    coap.GET: "GET",
    coap.POST: "POST",
    coap.PUT: "PUT",
    coap.DELETE: "DELETE",
    coap.FETCH: "FETCH",
    coap.PATCH: "PATCH",
    coap.IPATCH: "iPATCH",
}
METHODS = {v: k for k, v in METHOD_NAMES.items()}
ERROR_NAMES = {
    coap.BAD_REQUEST: "Bad Request",
    coap.UNAUTHORIZED: "Unauthorized",
    coap.BAD_OPTION: "Bad Option",
    coap.FORBIDDEN: "Forbidden",
    coap.NOT_FOUND: "Not Found",
    coap.METHOD_NOT_ALLOWED: "Method Not Allowed",
    coap.NOT_ACCEPTABLE: "Not Acceptable",
    coap.REQUEST_ENTITY_INCOMPLETE: "Request Entity Incomplete",
    coap.CONFLICT: "Conflict",
    coap.PRECONDITION_FAILED: "Precondition Failed",
    coap.REQUEST_ENTITY_TOO_LARGE: "Request Entity Too Large",
    coap.UNSUPPORTED_CONTENT_FORMAT: "Unsupported Content-Format",
    coap.UNPROCESSABLE_ENTITY: "Unprocessable Entity",
    coap.INTERNAL_SERVER_ERROR: "Internal Server Error",
    coap.NOT_IMPLEMENTED: "Not Implemented",
    coap.BAD_GATEWAY: "Bad Gateway",
    coap.SERVICE_UNAVAILABLE: "Service Unavailable",
    coap.GATEWAY_TIMEOUT: "Gateway Timeout",
    coap.PROXYING_NOT_SUPPORTED: "Proxying Not Supported",
}

_now_ns = time.perf_counter_ns
_ACK = coap.ACK
_CON = coap.CON
_NON = coap.NON
_RST = coap.RST
_token = struct.Struct(">I").pack

Notification = Callable[[Any], None]


class Pending:
    __slots__ = (
        "acked",
        "callback",
        "confirmable",
        "deadline",
        "frame",
        "method",
        "mid",
        "name",
        "next_retx",
        "retransmits",
        "t0",
        "timeout",
        "token",
    )

    def __init__(
        self,
        mid: int,
        token: bytes,
        method: str,
        name: str,
        frame: bytes,
        confirmable: bool,
        callback: Notification | None,
    ) -> None:
        self.mid = mid
        self.token = token
        self.method = method
        self.name = name
        self.frame = frame
        self.confirmable = confirmable
        self.callback = callback
        self.t0 = _now_ns()
        self.acked = False
        self.retransmits = 0
        self.timeout = 0.0
        self.next_retx = float("inf")
        self.deadline = 0.0


class CoapClient(asyncio.DatagramProtocol):
    __slots__ = (
        "by_mid",
        "by_token",
        "next_mid",
        "next_token",
        "observers",
        "open",
        "rt",
        "transport",
    )

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.transport: asyncio.DatagramTransport | None = None
        self.next_mid = random.randrange(65536)
        self.next_token = random.randrange(1 << 32)
        self.by_mid: dict[int, Pending] = {}
        self.by_token: dict[bytes, Pending] = {}
        self.observers: dict[bytes, tuple[Notification, str]] | None = None
        self.open = False

    async def start(self) -> None:
        s = self.rt.settings
        src = self.rt.next_source_addr()
        await self.rt.loop.create_datagram_endpoint(
            lambda: self, remote_addr=(s.coap_host, s.coap_port), local_addr=src
        )
        self.open = True
        self.rt.connected += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self.open = False
            self.rt.connected -= 1
        self.transport = None
        self._fail_all("socket closed")

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: nothing listens there; fail what waits now.
        self._fail_all(exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))

    def _fail_all(self, reason: str) -> None:
        if not self.by_token:
            return
        for p in list(self.by_token.values()):
            self._finish(p, failure=reason)

    # ---- requests --------------------------------------------------------------------------

    def request(
        self,
        method: int,
        path: str,
        payload: bytes = b"",
        *,
        confirmable: bool = True,
        options: Iterable[tuple[int, Any]] = (),
        name: str | None = None,
        observe: Notification | None = None,
        done: Notification | None = None,
    ) -> bool:
        """Send a request; the response records (METHOD, name). With `observe`, registers for
        notifications (Observe: 0) that go to the callback as decoded messages; `done` gets a
        successful (2.xx) response of a request without Observe."""
        label = METHOD_NAMES.get(method, str(method))
        name = name or path.partition("?")[0]
        t = self.transport
        if t is None:
            self.rt.stats.failure(label, name, "socket not open")
            return False
        mid = self.next_mid = (self.next_mid + 1) & 0xFFFF
        self.next_token = (self.next_token + 1) & 0xFFFFFFFF
        token = _token(self.next_token)
        if observe is not None:
            options = [(coap.OBSERVE, 0), *options]
        try:
            frame = coap.encode_request(
                _CON if confirmable else _NON, method, mid, token, path, options, payload
            )
        except (ValueError, TypeError) as exc:
            self.rt.stats.failure(label, name, f"cannot encode request: {exc}")
            return False
        p = Pending(mid, token, label, name, frame, confirmable, observe or done)
        now = self.rt.loop.time()
        if confirmable:
            p.timeout = ACK_TIMEOUT * random.uniform(1.0, ACK_RANDOM_FACTOR)
            p.next_retx = now + p.timeout
            self.by_mid[mid] = p
        p.deadline = now + self.rt.settings.coap_timeout
        self.by_token[token] = p
        self.rt.coap_clients.add(self)
        t.sendto(frame)
        self.rt.stats.get(label, name).total_bytes += len(payload)
        return True

    def ping(self, name: str = "heartbeat") -> bool:
        """A CoAP ping: an empty CON, which the server answers with an RST; ("PING", name)."""
        t = self.transport
        if t is None:
            self.rt.stats.failure("PING", name, "socket not open")
            return False
        mid = self.next_mid = (self.next_mid + 1) & 0xFFFF
        frame = coap.encode_empty(_CON, mid)
        p = Pending(mid, b"\x00ping" + frame[2:4], "PING", name, frame, True, None)
        now = self.rt.loop.time()
        p.timeout = ACK_TIMEOUT * random.uniform(1.0, ACK_RANDOM_FACTOR)
        p.next_retx = now + p.timeout
        p.deadline = now + self.rt.settings.coap_timeout
        self.by_mid[mid] = p
        self.by_token[p.token] = p
        self.rt.coap_clients.add(self)
        t.sendto(frame)
        return True

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            msg = coap.decode(data)
        except coap.CoapError as exc:
            self.rt.stats.error("RECEIVE", "coap", f"bad datagram from server: {exc}")
            return
        mtype = msg.type
        if mtype in (_ACK, _RST):
            p = self.by_mid.pop(msg.mid, None)
            if p is None:
                return  # a duplicate or late ACK
            if mtype == _RST:
                if p.method == "PING":
                    self._finish(p, micros=(_now_ns() - p.t0) // 1000)
                else:
                    self._finish(p, failure="RST")
                return
            if msg.code == 0:
                p.acked = True  # empty ACK: a separate response will follow
                p.next_retx = float("inf")
                return
            self._response(p, msg)
            return
        # CON or NON from the server: a separate response or a notification
        t = self.transport
        token = msg.token
        p = self.by_token.get(token) if msg.code >= 64 else None
        obs = self.observers.get(token) if self.observers is not None and p is None else None
        if msg.code >= 64 and p is None and obs is None:
            # Nobody waits for it (an observation given up): RST, which also ends the
            # observation on the server (RFC 7641 3.6).
            if t is not None:
                t.sendto(coap.encode_empty(_RST, msg.mid))
            return
        if mtype == _CON and t is not None:
            t.sendto(coap.encode_empty(_ACK, msg.mid))
        if msg.code < 64:
            return  # a request or empty message to a client: ignore
        if p is not None:
            self.by_mid.pop(p.mid, None)
            self._response(p, msg)
            return
        if obs is not None:
            self.rt.stats.get("NOTIFY", obs[1]).count(1, len(msg.payload))
            obs[0](msg)

    def _response(self, p: Pending, msg: Any) -> None:
        code = msg.code
        if code >= 128:  # 4.xx, 5.xx
            text = coap.code_str(code)
            name = ERROR_NAMES.get(code)
            self._finish(p, failure=f"{text} {name}" if name else text)
            return
        self._finish(p, micros=(_now_ns() - p.t0) // 1000, size=len(msg.payload))
        if p.callback is not None:
            if msg.observe is not None:
                if self.observers is None:
                    self.observers = {}
                self.observers[p.token] = (p.callback, p.name)
            p.callback(msg)

    def _finish(self, p: Pending, *, micros: int = 0, size: int = 0, failure: str = "") -> None:
        self.by_token.pop(p.token, None)
        self.by_mid.pop(p.mid, None)
        if failure:
            self.rt.stats.failure(p.method, p.name, failure)
        else:
            e = self.rt.stats.get(p.method, p.name)
            e.num_requests += 1
            e.hist.record(micros)
        if not self.by_token:
            self.rt.coap_clients.discard(self)

    def sweep(self, now: float) -> None:
        """Retransmit CONs whose ACK is late; fail requests past MAX_RETRANSMIT or the timeout."""
        t = self.transport
        for p in list(self.by_token.values()):
            if now >= p.deadline:
                self._finish(p, failure="timeout")
            elif p.confirmable and not p.acked and now >= p.next_retx:
                if p.retransmits >= MAX_RETRANSMIT:
                    self._finish(p, failure=f"no ACK after {MAX_RETRANSMIT} retransmissions")
                    continue
                p.retransmits += 1
                p.timeout *= 2
                p.next_retx = now + p.timeout
                if t is not None:
                    t.sendto(p.frame)
                self.rt.stats.incr("coap_retransmissions")
        if not self.by_token:
            self.rt.coap_clients.discard(self)

    def forget(self, name: str) -> None:
        """Give up the observations recorded as `name`: their next notification gets an RST."""
        if self.observers:
            for token in [t for t, (_, n) in self.observers.items() if n == name]:
                del self.observers[token]

    @property
    def outstanding(self) -> int:
        return len(self.by_token)

    def close(self) -> None:
        t = self.transport
        if t is not None:
            t.close()
