"""The CoAP message layer's state (RFC 7252 4): deduplication of received requests and
retransmission of the Confirmable messages we send, with no timer or task per message.

Every structure is ordered by deadline so that one periodic sweep (endpoint.py) only looks at
what is due:

- `Deduplicator`: received requests by (peer, message id), each an `Exchange` kept for
  EXCHANGE_LIFETIME (CON) or NON_LIFETIME (NON). The lifetime is a constant per type, so
  arrival order is expiry order: two deques, popped from the head. The cache is bounded by
  entries and by cached response bytes; when full, the oldest exchanges go first (counted in
  `shed`: a duplicate of a shed exchange would be processed again).
- `Retransmitter`: our Confirmable messages (separate responses, CON notifications) by
  (peer, message id) until ACKed or reset, with a heap of retransmission deadlines
  (ACK_TIMEOUT x random 1..1.5, doubled per retransmission, MAX_RETRANSMIT times).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# RFC 7252 4.8 transmission parameters (defaults) and the derived times of 4.8.2.
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
EXCHANGE_LIFETIME = 247.0
NON_LIFETIME = 145.0

Addr = Any  # a peer's socket address: (host, port) or (host, port, flowinfo, scope_id)


@dataclass(frozen=True, slots=True)
class Timing:
    """Message-layer times (seconds). Tests shorten them; the defaults are the RFC's."""

    ack_timeout: float = ACK_TIMEOUT
    ack_random_factor: float = ACK_RANDOM_FACTOR
    max_retransmit: int = MAX_RETRANSMIT
    exchange_lifetime: float = EXCHANGE_LIFETIME
    non_lifetime: float = NON_LIFETIME
    # A CON request whose response is not ready after this long gets an empty ACK, and its
    # response goes later as a separate CON (RFC 7252 5.2.2).
    separate_after: float = 1.0


class Exchange:
    """One received request while it is being processed (afterwards the deduplication cache
    keeps only its response bytes). `response` is what a duplicate of a CON request in
    progress gets: None until the empty ACK went out (`separate`). `done` is set once the
    request has been answered (or deliberately not answered)."""

    __slots__ = (
        "addr",
        "anonymous",
        "arrived",
        "block1",
        "block2",
        "done",
        "identity",
        "key",
        "method",
        "mid",
        "no_response",
        "response",
        "separate",
        "token",
        "type",
    )

    def __init__(self, addr: Addr, mid: int, type_: int, token: bytes, now: float) -> None:
        self.addr = addr
        self.mid = mid
        self.type = type_
        self.token = token
        self.key = (addr, mid)
        self.arrived = now
        self.anonymous = False  # served without a token (--allow-anonymous)
        self.identity: str | None = None  # the device its DTLS session authenticated
        self.response: bytes | None = None
        self.done = False
        self.separate = False
        self.no_response = 0  # RFC 7967 bit mask of response classes to suppress
        self.block1: Any = None  # the Block1 option value to echo on the final response
        self.block2: tuple[int, bool, int] | None = None  # the request's Block2, if any
        self.method = 0  # the request's code, for metrics

    def __repr__(self) -> str:
        return f"<Exchange {self.addr} mid={self.mid} done={self.done}>"


Key = tuple[Addr, int]
Entry = tuple[float, "Exchange | bytes"]  # (expiry, the exchange in progress or its response)


class Deduplicator:
    """Received requests by (peer, message id), for their lifetime.

    An entry is `(expires, value)`: the `Exchange` while the request is processed, then the
    bytes a duplicate gets (the piggybacked response or empty ACK of a CON; b"" for a NON).
    What stays for minutes is therefore tuples of floats, bytes, strs and ints, which the
    garbage collector stops tracking, not objects it would traverse in every full collection:
    at tens of thousands of requests a second that difference is most of the CPU."""

    def __init__(self, timing: Timing, max_entries: int, max_bytes: int) -> None:
        self.timing = timing
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: dict[Key, Entry] = {}
        # (expires, key) in arrival order, which is expiry order within one lifetime.
        self._con: deque[tuple[float, Key]] = deque()
        self._non: deque[tuple[float, Key]] = deque()
        self.cached_bytes = 0
        self.shed = 0  # exchanges forgotten early because the cache was full

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Key, now: float) -> Exchange | bytes | None:
        entry = self.entries.get(key)
        if entry is None or entry[0] <= now:
            return None  # unknown, or expired and not swept yet (a message id reused)
        return entry[1]

    def add(self, addr: Addr, mid: int, type_: int, token: bytes, now: float) -> Exchange:
        """A new exchange (type CON = 0 or NON = 1), replacing an expired one with its key."""
        ex = Exchange(addr, mid, type_, token, now)
        key = ex.key
        if type_ == 0:
            expires = now + self.timing.exchange_lifetime
            self._con.append((expires, key))
        else:
            expires = now + self.timing.non_lifetime
            self._non.append((expires, key))
        old = self.entries.get(key)
        if old is not None:
            self._uncount(old)
        self.entries[key] = (expires, ex)
        if len(self.entries) > self.max_entries:
            self._shed_oldest()
        return ex

    def done(self, ex: Exchange, response: bytes) -> None:
        """The exchange is answered: keep only what a duplicate gets."""
        entry = self.entries.get(ex.key)
        if entry is None or entry[1] is not ex:
            return  # expired or shed meanwhile
        self.entries[ex.key] = (entry[0], response)
        if response:
            self.cached_bytes += len(response)
            while self.cached_bytes > self.max_bytes and self.entries:
                self._shed_oldest()

    def _uncount(self, entry: Entry) -> None:
        value = entry[1]
        if type(value) is bytes:
            self.cached_bytes -= len(value)

    def _drop(self, expires: float, key: Key) -> bool:
        """Forget key if its entry is still the one queued with this expiry."""
        entry = self.entries.get(key)
        if entry is None or entry[0] != expires:
            return False
        del self.entries[key]
        self._uncount(entry)
        return True

    def _shed_oldest(self) -> None:
        con, non = self._con, self._non
        lifetimes = self.timing.exchange_lifetime, self.timing.non_lifetime
        while con or non:
            # The entry that arrived first, whichever its type.
            if con and (not non or con[0][0] - lifetimes[0] <= non[0][0] - lifetimes[1]):
                expires, key = con.popleft()
            else:
                expires, key = non.popleft()
            if self._drop(expires, key):
                self.shed += 1
                return

    def expire(self, now: float) -> int:
        """Drop every entry whose lifetime is over; returns how many."""
        n = 0
        for queue in (self._con, self._non):
            while queue and queue[0][0] <= now:
                expires, key = queue.popleft()
                n += self._drop(expires, key)
        return n


class Outgoing:
    """A Confirmable message we sent and retransmit until it is acknowledged or reset.
    `owner` is told (`on_acked`/`on_failed`) when that happens (an observer, or None)."""

    __slots__ = ("addr", "data", "deadline", "done", "key", "mid", "owner", "retries", "timeout")

    def __init__(self, addr: Addr, mid: int, data: bytes, timeout: float, now: float) -> None:
        self.addr = addr
        self.mid = mid
        self.key = (addr, mid)
        self.data = data
        self.timeout = timeout
        self.deadline = now + timeout
        self.retries = 0
        self.done = False
        self.owner: Any = None


class Retransmitter:
    def __init__(self, timing: Timing, send: Callable[[bytes, Addr], None]) -> None:
        self.timing = timing
        self.send = send
        self.pending: dict[tuple[Addr, int], Outgoing] = {}
        self._heap: list[tuple[float, int, Outgoing]] = []
        self._order = itertools.count()
        self._mid = random.randrange(0x10000)
        self.retransmissions = 0
        self.failures = 0  # messages given up after MAX_RETRANSMIT

    def __len__(self) -> int:
        return len(self.pending)

    def next_mid(self, addr: Addr) -> int:
        """A message id not in flight to this peer (a counter from a random start)."""
        for _ in range(0x10000):
            self._mid = (self._mid + 1) & 0xFFFF
            if (addr, self._mid) not in self.pending:
                return self._mid
        raise RuntimeError("every message id is in flight to this peer")

    def initial_timeout(self) -> float:
        t = self.timing
        return t.ack_timeout * random.uniform(1.0, t.ack_random_factor)

    def send_con(
        self, addr: Addr, mid: int, data: bytes, now: float, owner: Any = None
    ) -> Outgoing:
        out = Outgoing(addr, mid, data, self.initial_timeout(), now)
        out.owner = owner
        self.pending[out.key] = out
        heapq.heappush(self._heap, (out.deadline, next(self._order), out))
        self.send(data, addr)
        return out

    def replace(self, out: Outgoing, mid: int, data: bytes) -> None:
        """Send `data` (a newer notification, new message id) in place of the message in
        flight, carrying its retransmission counter and timeout over (RFC 7641 4.5.2)."""
        self.pending.pop(out.key, None)
        out.mid = mid
        out.key = (out.addr, mid)
        out.data = data
        self.pending[out.key] = out
        self.send(data, out.addr)

    def acknowledge(self, addr: Addr, mid: int) -> Outgoing | None:
        """An ACK or RST for (addr, mid): the message is no longer retransmitted."""
        out = self.pending.pop((addr, mid), None)
        if out is not None:
            out.done = True
        return out

    def due(self, now: float) -> list[Outgoing]:
        """Retransmit what is due; returns the messages given up (MAX_RETRANSMIT reached)."""
        failed: list[Outgoing] = []
        heap = self._heap
        max_retransmit = self.timing.max_retransmit
        while heap and heap[0][0] <= now:
            _, _, out = heapq.heappop(heap)
            if out.done:
                continue
            if out.retries >= max_retransmit:
                out.done = True
                self.pending.pop(out.key, None)
                self.failures += 1
                failed.append(out)
                continue
            out.retries += 1
            out.timeout *= 2
            out.deadline = now + out.timeout
            heapq.heappush(heap, (out.deadline, next(self._order), out))
            self.retransmissions += 1
            self.send(out.data, out.addr)
        return failed

    def clear(self) -> None:
        for out in self.pending.values():
            out.done = True
        self.pending.clear()
        self._heap.clear()
