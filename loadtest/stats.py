"""Request statistics: one entry per (type, name), failures by error, and the deltas that
workers ship to the master once a second.

A worker records into a `Stats`, and `Stats.take_delta()` hands over everything recorded since
the last call (and starts afresh). The master's `Collector` merges deltas into totals and into
one history row per reporting interval. Every number is a count or a histogram, so merging is
exact whatever the number of processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loadtest.histogram import PERCENTILES, Histogram

AGGREGATED = ("", "Aggregated")


class StatsEntry:
    """Counts for one (type, name). `num_requests` includes requests whose response time is
    not measured (QoS 0 publishes); `hist` holds the measured ones."""

    __slots__ = ("hist", "name", "num_failures", "num_requests", "total_bytes", "type")

    def __init__(self, type_: str, name: str) -> None:
        self.type = type_
        self.name = name
        self.num_requests = 0
        self.num_failures = 0
        self.total_bytes = 0
        self.hist = Histogram()

    def record(self, micros: int, size: int = 0) -> None:
        """A request answered after `micros` µs."""
        self.num_requests += 1
        self.total_bytes += size
        self.hist.record(micros)

    def count(self, n: int = 1, size: int = 0) -> None:
        """`n` requests without a response time (fire and forget)."""
        self.num_requests += n
        self.total_bytes += size

    def fail(self, n: int = 1) -> None:
        """A request that failed: counted as a request and as a failure."""
        self.num_requests += n
        self.num_failures += n

    def merge(self, other: StatsEntry) -> None:
        self.num_requests += other.num_requests
        self.num_failures += other.num_failures
        self.total_bytes += other.total_bytes
        self.hist.merge(other.hist)

    @property
    def is_empty(self) -> bool:
        return self.num_requests == 0 and self.hist.count == 0

    def to_wire(self) -> list[Any]:
        return [
            self.type,
            self.name,
            self.num_requests,
            self.num_failures,
            self.total_bytes,
            self.hist.to_wire(),
        ]

    @classmethod
    def from_wire(cls, data: Any) -> StatsEntry:
        type_, name, reqs, fails, size, hist = data
        e = cls(str(type_), str(name))
        e.num_requests, e.num_failures, e.total_bytes = int(reqs), int(fails), int(size)
        e.hist = Histogram.from_wire(hist)
        return e


class Stats:
    """What one process recorded since the last `take_delta()`."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], StatsEntry] = {}
        self.failures: dict[tuple[str, str, str], int] = {}
        self.counters: dict[str, int] = {}

    def get(self, type_: str, name: str) -> StatsEntry:
        key = (type_, name)
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = StatsEntry(type_, name)
        return e

    def failure(self, type_: str, name: str, error: str, n: int = 1) -> None:
        """Count `n` failed requests of (type, name) with the error text `error`."""
        self.get(type_, name).fail(n)
        key = (type_, name, error)
        self.failures[key] = self.failures.get(key, 0) + n

    def error(self, type_: str, name: str, error: str, n: int = 1) -> None:
        """An error that is not a request (a lost connection, a task that raised)."""
        key = (type_, name, error)
        self.failures[key] = self.failures.get(key, 0) + n

    def incr(self, counter: str, n: int = 1) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + n

    def take_delta(self) -> dict[str, Any]:
        """Everything recorded since the previous call, in wire form; resets."""
        delta = {
            "entries": [e.to_wire() for e in self.entries.values() if not e.is_empty],
            "failures": [[t, n, err, c] for (t, n, err), c in self.failures.items()],
            "counters": dict(self.counters),
        }
        self.entries = {}
        self.failures = {}
        self.counters = {}
        return delta


@dataclass
class HistoryRow:
    """One reporting interval as the master saw it."""

    timestamp: float
    users: int
    connected: int
    interval: float
    entries: dict[tuple[str, str], StatsEntry]
    total: StatsEntry
    totals_snapshot: StatsEntry  # cumulative aggregated totals at the end of the interval
    cpu: float = 0.0  # CPU time of the load generators / wall time (1.0 = one core busy)


@dataclass
class Collector:
    """Merges worker deltas into run totals and per-interval history (master side)."""

    started: float = field(default_factory=time.time)
    ended: float | None = None
    entries: dict[tuple[str, str], StatsEntry] = field(default_factory=dict)
    failures: dict[tuple[str, str, str], int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    history: list[HistoryRow] = field(default_factory=list)
    users: dict[str, int] = field(default_factory=dict)  # per worker
    connected: dict[str, int] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    rss_base: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds used, per worker
    peak_connected: int = 0
    _cpu_seen: float = 0.0
    peak_rss_per_connection: float = 0.0
    _window: dict[tuple[str, str], StatsEntry] = field(default_factory=dict)
    _window_started: float = field(default_factory=time.monotonic)

    def add_delta(self, delta: Mapping[str, Any]) -> None:
        for wire in delta.get("entries", ()):
            e = StatsEntry.from_wire(wire)
            key = (e.type, e.name)
            for target in (self.entries, self._window):
                mine = target.get(key)
                if mine is None:
                    mine = target[key] = StatsEntry(*key)
                mine.merge(e)
        for t, n, err, c in delta.get("failures", ()):
            key3 = (str(t), str(n), str(err))
            self.failures[key3] = self.failures.get(key3, 0) + int(c)
        for k, v in delta.get("counters", {}).items():
            self.counters[str(k)] = self.counters.get(str(k), 0) + int(v)

    def set_gauges(
        self,
        worker: str,
        users: int,
        connected: int,
        rss: int = 0,
        rss_base: int = 0,
        cpu: float = 0.0,
    ) -> None:
        self.users[worker] = users
        self.connected[worker] = connected
        if cpu:
            self.cpu[worker] = cpu
        if rss:
            self.rss[worker] = rss
        if rss_base:
            self.rss_base[worker] = rss_base

    @property
    def rss_per_connection(self) -> float:
        """Resident memory added per connected device (bytes): (RSS - RSS before the first
        device) / connected, over all processes."""
        conn = self.connected_count
        if not conn or not self.rss:
            return 0.0
        return (self.rss_total - sum(self.rss_base.values())) / conn

    @property
    def rss_total(self) -> int:
        """Resident memory of the load-generating processes, bytes (last report)."""
        return sum(self.rss.values())

    @property
    def user_count(self) -> int:
        return sum(self.users.values())

    @property
    def connected_count(self) -> int:
        return sum(self.connected.values())

    def close_interval(self) -> HistoryRow:
        """End the current reporting interval: one history row."""
        now = time.monotonic()
        interval = max(now - self._window_started, 1e-6)
        window, self._window = self._window, {}
        self._window_started = now
        if self.connected_count and self.connected_count >= self.peak_connected:
            self.peak_connected = self.connected_count
            self.peak_rss_per_connection = self.rss_per_connection
        cpu_now = sum(self.cpu.values())
        cpu_share = (cpu_now - self._cpu_seen) / interval
        self._cpu_seen = cpu_now
        row = HistoryRow(
            cpu=cpu_share,
            timestamp=time.time(),
            users=self.user_count,
            connected=self.connected_count,
            interval=interval,
            entries=window,
            total=aggregate(window.values()),
            totals_snapshot=self.total,
        )
        self.history.append(row)
        return row

    @property
    def total(self) -> StatsEntry:
        return aggregate(self.entries.values())

    @property
    def duration(self) -> float:
        end = self.ended if self.ended is not None else time.time()
        return max(end - self.started, 1e-6)

    def sorted_entries(self) -> list[StatsEntry]:
        return [self.entries[k] for k in sorted(self.entries)]


def aggregate(entries: Iterable[StatsEntry]) -> StatsEntry:
    total = StatsEntry(*AGGREGATED)
    for e in entries:
        total.merge(e)
    return total


def percentile_labels() -> list[str]:
    return [_pct_label(p) for p in PERCENTILES]


def _pct_label(p: float) -> str:
    text = f"{p * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def current_rss() -> int:
    """This process's resident set size in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


try:
    import os as _os

    _PAGE = _os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):  # pragma: no cover
    _PAGE = 4096
