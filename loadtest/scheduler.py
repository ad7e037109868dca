"""One timer for a whole process: a heap of (when, seq, callback, argument).

Every simulated device's next task, every periodic heartbeat and every spawn is an entry here; the
event loop holds a single TimerHandle for the earliest one. That keeps a sleeping device at one
heap entry (a tuple) instead of one suspended task and one loop timer each.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

# Entries due within this much of the earliest one run in the same wake-up (loop timers have
# millisecond resolution anyway).
SLACK = 0.0005


class Scheduler:
    __slots__ = ("_armed_at", "_closed", "_heap", "_loop", "_seq", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Callable[[Any, float], None], Any]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = float("inf")
        self._closed = False

    def time(self) -> float:
        return self._loop.time()

    def at(self, when: float, callback: Callable[[Any, float], None], arg: Any = None) -> None:
        """Call `callback(arg, when)` at loop time `when` (or as soon as possible after)."""
        if self._closed:
            return
        heapq.heappush(self._heap, (when, next(self._seq), callback, arg))
        if when < self._armed_at:
            self._arm(when)

    def after(self, delay: float, callback: Callable[[Any, float], None], arg: Any = None) -> None:
        self.at(self._loop.time() + delay, callback, arg)

    def __len__(self) -> int:
        return len(self._heap)

    def close(self) -> None:
        self._closed = True
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = float("inf")
        heap = self._heap
        limit = self._loop.time() + SLACK
        pop = heapq.heappop
        while heap and heap[0][0] <= limit:
            when, _, callback, arg = pop(heap)
            try:
                callback(arg, when)
            except Exception as exc:  # a broken callback must not stop every other device
                self._loop.call_exception_handler(
                    {"message": "scheduled callback failed", "exception": exc}
                )
            if self._closed:
                return
        if heap and heap[0][0] < self._armed_at:
            self._arm(heap[0][0])
