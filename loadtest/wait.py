"""`wait_time` functions for device classes, named as in locust.

A device's `wait_time` decides when its next task runs. The runner asks
`next_run(device, due, now)` for the loop time of the next task: `due` is when the task that just
ran was due, `now` is when it finished. A plain callable `wait_time(device) -> seconds` is accepted
too (as in locust) and means "wait that long after the task".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


class ScenarioError(Exception):
    """A scenario file or device class is not usable; the message says why."""


@runtime_checkable
class WaitTime(Protocol):
    def next_run(self, device: Any, due: float, now: float) -> float: ...


def _number(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{name}: expected a number of seconds, got {value!r}")
    v = float(value)
    if v < 0 or (positive and v == 0) or v != v:
        raise ScenarioError(f"{name}: {value!r} must be {'>' if positive else '>='} 0")
    return v


class between:
    """Wait a random time between `low` and `high` seconds after each task."""

    __slots__ = ("high", "low")

    def __init__(self, low: float, high: float) -> None:
        self.low = _number("between(low, high)", low)
        self.high = _number("between(low, high)", high)
        if self.high < self.low:
            raise ScenarioError(f"between({low}, {high}): high is smaller than low")

    def next_run(self, device: Any, due: float, now: float) -> float:
        return now + random.uniform(self.low, self.high)

    def __call__(self, device: Any = None) -> float:
        return random.uniform(self.low, self.high)

    def __repr__(self) -> str:
        return f"between({self.low}, {self.high})"


class constant:
    """Wait exactly `seconds` after each task."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = _number("constant(seconds)", seconds)

    def next_run(self, device: Any, due: float, now: float) -> float:
        return now + self.seconds

    def __call__(self, device: Any = None) -> float:
        return self.seconds

    def __repr__(self) -> str:
        return f"constant({self.seconds})"


class constant_pacing:
    """Start a task every `seconds` on an absolute schedule, however long the tasks take.

    `constant_pacing(low, high)` draws each device's period once, uniformly in [low, high].
    A device that falls more than one period behind skips the missed runs (counted as
    `overrun`) instead of bursting to catch up."""

    __slots__ = ("high", "low")

    def __init__(self, seconds: float, high: float | None = None) -> None:
        self.low = _number("constant_pacing(seconds)", seconds, positive=True)
        self.high = self.low if high is None else _number("constant_pacing", high, positive=True)
        if self.high < self.low:
            raise ScenarioError(f"constant_pacing({seconds}, {high}): high is smaller than low")

    def period(self, device: Any) -> float:
        p: float | None = getattr(device, "_pacing", None)
        if p is None:
            p = self.low if self.high == self.low else random.uniform(self.low, self.high)
            device._pacing = p
        return p

    def next_run(self, device: Any, due: float, now: float) -> float:
        p = self.period(device)
        nxt = due + p
        if nxt < now - p:
            stats = getattr(device, "stats", None)
            if stats is not None:
                stats.incr("overrun", int((now - nxt) / p))
            return now
        return nxt

    def __call__(self, device: Any = None) -> float:
        return self.low

    def __repr__(self) -> str:
        return f"constant_pacing({self.low}, {self.high})"


class constant_throughput(constant_pacing):
    """Run `rate` tasks per second per device (constant_pacing(1 / rate)).

    `constant_throughput(5, 20)` draws each device's rate once, uniformly in [5, 20]/s."""

    __slots__ = ("_rates",)

    def __init__(self, rate: float, high: float | None = None) -> None:
        lo = _number("constant_throughput(rate)", rate, positive=True)
        hi = lo if high is None else _number("constant_throughput", high, positive=True)
        if hi < lo:
            raise ScenarioError(f"constant_throughput({rate}, {high}): high is smaller than low")
        self.low, self.high = 1.0 / hi, 1.0 / lo
        self._rates = (lo, hi)

    def period(self, device: Any) -> float:
        p: float | None = getattr(device, "_pacing", None)
        if p is None:
            lo, hi = self._rates
            p = 1.0 / (lo if lo == hi else random.uniform(lo, hi))
            device._pacing = p
        return p

    def __repr__(self) -> str:
        return f"constant_throughput{self._rates}"


class _CallableWait:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], float]) -> None:
        self.fn = fn

    def next_run(self, device: Any, due: float, now: float) -> float:
        return now + float(self.fn(device))


def as_wait_time(owner: str, value: object) -> WaitTime | None:
    """Check a class's `wait_time` and give it the `next_run` form."""
    if value is None:
        return None
    if isinstance(value, WaitTime):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return constant(value)
    if callable(value):
        return _CallableWait(value)
    raise ScenarioError(
        f"{owner}.wait_time = {value!r} is not a wait time: use between(a, b), constant(s), "
        "constant_pacing(s), constant_throughput(n) or a function of the device"
    )
