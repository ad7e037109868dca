"""What operators must see: connects, disconnects, authentication failures, bans and ACL
denials, one log line each on the `iotgw.events` logger, for every protocol.

A flood (a thousand wrong passwords a second) must not turn into a thousand log lines a second:
each kind of event has a token bucket; lines over it are left out, counted in
`iotgw_log_suppressed_lines{event}`, and the next line of that kind says how many were left out.
The fields travel as `extra` on the record too (`event`, `protocol`, `client_id`, `peer`,
`reason`, ...), so a JSON formatter shows them as keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.metrics import EventMetrics

_LOGGER = "iotgw.events"


class _Bucket:
    __slots__ = ("stamp", "suppressed", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.suppressed = 0


class EventLog:
    def __init__(
        self,
        metrics: EventMetrics,
        *,
        rate: float = 10.0,
        burst: float = 50.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """At most `burst` lines of one kind at once, then `rate` a second."""
        self.metrics = metrics
        self.rate = rate
        self.burst = burst
        self.log = logger or logging.getLogger(_LOGGER)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def connected(self, protocol: str, client_id: str, peer: str, **fields: Any) -> None:
        self._emit(logging.INFO, "connect", "connected", protocol=protocol, client_id=client_id,
                   peer=peer, **fields)

    def disconnected(self, protocol: str, client_id: str, peer: str, reason: str) -> None:
        self._emit(logging.INFO, "disconnect", "disconnected", protocol=protocol,
                   client_id=client_id, peer=peer, reason=reason)

    def refused(self, protocol: str, client_id: str, peer: str, reason: str,
                **fields: Any) -> None:
        """A connection or request refused for its credentials (or lack of them)."""
        self._emit(logging.WARNING, "auth_failure", "authentication refused", protocol=protocol,
                   client_id=client_id, peer=peer, reason=reason, **fields)

    def banned(self, protocol: str, key: str, seconds: float) -> None:
        self._emit(logging.WARNING, "ban", "banned after repeated authentication failures",
                   protocol=protocol, key=key, seconds=round(seconds, 1))

    def denied(self, protocol: str, client_id: str, peer: str, action: str,
               topic: str) -> None:
        """An ACL denial: a publish, subscription, will or request outside what is allowed."""
        self._emit(logging.WARNING, "acl_denial", "denied", protocol=protocol,
                   client_id=client_id, peer=peer, action=action, topic=topic)

    def _emit(self, level: int, event: str, text: str, **fields: Any) -> None:
        if not self.log.isEnabledFor(level):
            return
        now = self._clock()
        bucket = self._buckets.get(event)
        if bucket is None:
            bucket = self._buckets[event] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            self.metrics.suppressed.labels(event).inc()
            return
        bucket.tokens -= 1.0
        if bucket.suppressed:
            fields["suppressed"] = bucket.suppressed
            bucket.suppressed = 0
        shown = " ".join(f"{k}={v}" for k, v in fields.items())
        self.log.log(level, "%s %s", text, shown, extra={"event": event, **fields})
