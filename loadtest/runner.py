"""Spawns and stops the simulated devices of one process.

`Spawner` starts this process's share of the devices (given by their global indices) at the
spawn rate, on the process scheduler: the device with global index i is started at
`t0 + position / rate`, so N processes that each take every N-th index together spawn at the
total rate in the same order. `Runner` does this for scenario device classes; the quick
benchmarks (bench.py) reuse the spawner for their bare clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

from loadtest.device import Device
from loadtest.runtime import Runtime

# Connects not finished yet; beyond this the spawner waits, so a slow or dead server does not
# pile up tens of thousands of pending connects.
MAX_CONNECTING = 2000


class Spawner:
    def __init__(self, rt: Runtime, indices: Sequence[int], spawn_rate: float) -> None:
        self.rt = rt
        self.indices = indices
        self.spawn_rate = spawn_rate if spawn_rate > 0 else float("inf")
        self.spawned = 0
        self.connecting = 0
        self.stopping = False
        self._t0 = 0.0
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def finished(self) -> bool:
        """True when there is nothing more to do (a benchmark that reached its limit)."""
        return False

    def start(self) -> None:
        self.rt.start_sweeps()
        self._t0 = self.rt.loop.time()
        if self.indices:
            self.rt.scheduler.at(self._t0, self._spawn_due, None)

    def _spawn_due(self, _: object, due: float) -> None:
        if self.stopping:
            return
        now = self.rt.loop.time()
        rate = self.spawn_rate
        n = len(self.indices)
        while self.spawned < n:
            if self.connecting >= MAX_CONNECTING:
                self.rt.scheduler.at(now + 0.01, self._spawn_due, None)
                return
            if rate != float("inf") and self._t0 + self.spawned / rate > now:
                self.rt.scheduler.at(self._t0 + self.spawned / rate, self._spawn_due, None)
                return
            index = self.indices[self.spawned]
            self.spawned += 1
            self.rt.users += 1
            self.connecting += 1
            task = self.rt.loop.create_task(self._start_one(index))
            self._tasks.add(task)
            task.add_done_callback(self._started)

    def _start_one(self, index: int) -> Coroutine[Any, Any, object]:
        raise NotImplementedError

    def _started(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        self.connecting -= 1

    def outstanding(self) -> int:
        return 0

    async def _wait_outstanding(self, timeout: float) -> None:
        loop = self.rt.loop
        deadline = loop.time() + timeout
        while self.outstanding() and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def _cancel_connects(self) -> None:
        self.stopping = True
        for t in list(self._tasks):
            t.cancel()


class Runner(Spawner):
    """Runs scenario devices: `classes[i]` is the class of the device with global index i."""

    def __init__(
        self,
        rt: Runtime,
        classes: Sequence[type[Device]],
        indices: Sequence[int],
        spawn_rate: float,
        first_number: int = 1,
    ) -> None:
        super().__init__(rt, indices, spawn_rate)
        self.classes = classes
        self.first_number = first_number
        self.devices: list[Device] = []

    def _start_one(self, index: int) -> Coroutine[Any, Any, object]:
        device = self.classes[index](self.rt, index + self.first_number)
        self.devices.append(device)
        return device._start()

    def outstanding(self) -> int:
        n = sum(d.outstanding() for d in self.devices)
        if self.rt.commander is not None:
            n += len(self.rt.commander.pending)
        return n

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the tasks, run on_stop, wait up to `timeout` for outstanding acknowledgements and
        responses, then disconnect every device."""
        self._cancel_connects()
        if self.rt.commander is not None:
            self.rt.commander.stop()
        for d in self.devices:
            d.stopped = True  # no more tasks or periodic jobs
        for i in range(0, len(self.devices), 500):
            await asyncio.gather(*(_halt(d) for d in self.devices[i : i + 500]))
        await self._wait_outstanding(timeout)
        if self.rt.commander is not None:
            self.rt.commander.close()
        for d in self.devices:
            d._disconnect()
        self.rt.users = 0
        await asyncio.sleep(0.05)  # let the DISCONNECTs and closes go out
        self.rt.close()


async def _halt(device: Device) -> None:
    if not device.running:
        return
    device.running = False
    try:
        result = device.on_stop()
        if asyncio.iscoroutine(result):
            await result
    except Exception as exc:
        device.stats.error("TASK", "on_stop", f"{type(exc).__name__}: {exc}"[:300])
