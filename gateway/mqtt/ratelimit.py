"""Per-client publish rate limits (`--max-publish-rate` messages/s, `--max-publish-bytes-rate`
bytes/s): token buckets, one per channel, holding one second of each rate. A read that
overdraws them is still handled whole (nothing is dropped, QoS 1/2 least of all); reading then
pauses, through the channel's own `pause_reading("rate")`, until the debt is paid. The bucket
is plain data on the channel; the timer that ends the pause is the transport's (`account`,
called after each read by gateway/mqtt/connection.py's `framed`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway._native import mqtt

if TYPE_CHECKING:
    from gateway.mqtt.channel import MqttChannel

RATE = "rate"  # the connection's read-hold reason


class PublishBucket:
    __slots__ = ("_bytes", "_last", "_messages", "bytes_rate", "message_rate", "waiting")

    def __init__(self, message_rate: float, bytes_rate: float) -> None:
        self.message_rate = message_rate  # 0: no limit
        self.bytes_rate = bytes_rate
        self._messages = message_rate  # a full bucket: one second's worth
        self._bytes = bytes_rate
        self._last = time.monotonic()
        self.waiting = False  # reading is paused until the debt is paid

    @classmethod
    def for_limits(cls, message_rate: float, bytes_rate: float) -> PublishBucket | None:
        return cls(message_rate, bytes_rate) if message_rate or bytes_rate else None

    def spend(self, messages: int, nbytes: int, now: float) -> float:
        """Take from the buckets; the seconds until they are out of debt (0: they are not)."""
        elapsed = now - self._last
        self._last = now
        wait = 0.0
        if self.message_rate:
            self._messages = min(self.message_rate,
                                 self._messages + elapsed * self.message_rate) - messages
            wait = max(wait, -self._messages / self.message_rate)
        if self.bytes_rate:
            self._bytes = min(self.bytes_rate, self._bytes + elapsed * self.bytes_rate) - nbytes
            wait = max(wait, -self._bytes / self.bytes_rate)
        return wait



def account(channel: MqttChannel, packets: Sequence[Any], nbytes: int) -> None:
    """A read of `nbytes` bringing `packets` was handled: pause reading if it overdrew."""
    bucket = channel.rate
    if bucket is None:
        return
    publishes = sum(1 for p in packets if p.type == mqtt.PUBLISH)
    wait = bucket.spend(publishes, nbytes, time.monotonic())
    if wait > 0 and not bucket.waiting:
        bucket.waiting = True
        channel.broker.metrics.rate_limited.inc()
        channel.pause_reading(RATE)
        asyncio.get_running_loop().call_later(wait, _paid, channel, bucket)


def _paid(channel: MqttChannel, bucket: PublishBucket) -> None:
    bucket.waiting = False
    channel.resume_reading(RATE)
