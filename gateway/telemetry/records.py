"""Which traffic is telemetry, and the envelope every sink stores (DESIGN.md):
msgpack `{device, ts_ms, seq, kind, protocol, topic_or_path, payload}`, keyed by device id."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack

from gateway._native import envelope as _native

TELEMETRY = "telemetry"
EVENTS = "events"
SHADOW = "shadow"
COMMANDS = "commands"  # command deliveries and responses (audit trail)
KINDS = (TELEMETRY, EVENTS, SHADOW, COMMANDS)


def classify_topic(topic: str) -> tuple[str, str] | None:
    """(kind, device id) for `devices/{id}/telemetry[/...]` and `devices/{id}/events[/...]`."""
    if not topic.startswith("devices/"):
        return None
    parts = topic.split("/", 3)
    if len(parts) < 3 or not parts[1]:
        return None
    if parts[2] == TELEMETRY:
        return TELEMETRY, parts[1]
    if parts[2] == EVENTS:
        return EVENTS, parts[1]
    return None


@dataclass(slots=True)
class Record:
    device: str
    kind: str
    protocol: str
    topic_or_path: str
    payload: bytes
    ts_ms: int = 0
    seq: int = 0
    content_type: str | None = None

    def envelope(self) -> bytes:
        """The record as stored and sent (packed natively: gateway/_native/envelope.pyx)."""
        return _native.envelope(self, Record.packed_in_python)

    def packed_in_python(self) -> bytes:
        """The envelope, packed by msgpack itself: what the native packer falls back to (and
        is tested against)."""
        packed: bytes = msgpack.packb(
            {
                "device": self.device,
                "ts_ms": self.ts_ms,
                "seq": self.seq,
                "kind": self.kind,
                "protocol": self.protocol,
                "topic_or_path": self.topic_or_path,
                "payload": self.payload,
            },
            use_bin_type=True,
        )
        return packed

    @staticmethod
    def from_envelope(data: bytes, content_type: str | None = None) -> Record:
        d: dict[str, Any] = msgpack.unpackb(data, raw=False)
        return Record(
            d["device"],
            d["kind"],
            d["protocol"],
            d["topic_or_path"],
            d["payload"],
            d["ts_ms"],
            d["seq"],
            content_type,
        )


def now_ms() -> int:
    return time.time_ns() // 1_000_000
