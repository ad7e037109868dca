"""Priority lanes: shadow changes and commands never queue behind telemetry.

The pipeline keeps one lane per priority, each with its own queue, its own flusher task and
(with Kafka) its own sink: its own producer connection and its own disk spool. A telemetry
flood that saturates the low lane's sink therefore never delays a shadow record: the high
lane's batch does not wait for the low lane's batch, its records do not wait in the low
lane's spool, and its produce requests do not queue behind a megabyte of telemetry on the
same connection. The lane of a record follows from its kind (`lane_of`); a caller may name it.
"""

from __future__ import annotations

from gateway.telemetry.records import COMMANDS, SHADOW

HIGH = "high"
LOW = "low"
LANES = (HIGH, LOW)  # flushed in this order when both are ready

_HIGH_KINDS = frozenset((SHADOW, COMMANDS))


def lane_of(kind: str) -> str:
    """HIGH for shadow changes and commands, LOW for telemetry, events and anything else."""
    return HIGH if kind in _HIGH_KINDS else LOW
