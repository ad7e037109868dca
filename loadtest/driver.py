"""Running a load test: in this process, or as a master with worker processes.

A run is described by a spec (a plain dict, so it travels to workers as msgpack):
`{"kind": "scenario" | "conn" | "pub" | "sub" | "coap", "users": N, "spawn_rate": R,
"settings": {...}, "scenario": {"file", "profile", "classes"}, "bench": {...}}`.

Worker k of W takes the devices whose global index i has i % W == k and spawns them at R / W per
second. Every second each worker sends the master the statistics recorded since its last report
(`Stats.take_delta()`: counts and histogram buckets), so the master's totals are exactly what a
single process would have recorded.

Master <-> worker messages are msgpack maps over TCP:
  worker -> master: hello {pid, host}; stats {delta, users, connected, finished};
                    error {message}; done {delta}
  master -> worker: start {spec, index, count}; stop {timeout}
`--processes N` is a master with N local worker processes (multiprocessing, spawn start method,
one uvloop event loop each) connected over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from loadtest.console import Display
from loadtest.kafka import KafkaE2E, expected_telemetry
from loadtest.runtime import Runtime, Settings, ensure_fd_limit
from loadtest.stats import Collector, Stats, current_rss

REPORT_INTERVAL = 1.0


class Workload(Protocol):
    spawned: int

    @property
    def finished(self) -> bool: ...

    def start(self) -> None: ...

    async def stop(self, timeout: float = 5.0) -> None: ...


class RunError(Exception):
    """The run could not go on (workers missing, a worker failed); exit code 3."""


def my_indices(users: int, index: int, count: int) -> list[int]:
    return list(range(index, users, count))


def load_classes(spec: dict[str, Any]) -> list[Any]:
    """The class of every global device index for a scenario spec."""
    from loadtest.profiles import profile
    from loadtest.scenario import assign_classes, load_scenario, select_classes

    sc = spec["scenario"]
    classes = load_scenario(sc["file"]) if sc.get("file") else profile(sc.get("profile") or "fleet")
    classes = select_classes(classes, sc.get("classes") or [])
    return assign_classes(classes, int(spec["users"]))


def build_workload(spec: dict[str, Any], rt: Runtime, index: int, count: int) -> Workload:
    users = int(spec["users"])
    rate = float(spec["spawn_rate"]) / count
    indices = my_indices(users, index, count)
    if spec["kind"] == "scenario":
        from loadtest.runner import Runner

        by_index = spec.get("_classes") or load_classes(spec)
        return Runner(rt, by_index, indices, rate, first_number=int(spec.get("first_number", 1)))
    from loadtest.bench import Bench, BenchSpec

    return Bench(rt, BenchSpec.from_dict({"kind": spec["kind"], **spec["bench"]}), indices, rate)


@dataclass
class RunControl:
    """How the run is driven and observed (master side)."""

    run_time: float | None = None
    stop_timeout: float = 5.0
    display: Display | None = None
    kafka: str | None = None
    kafka_topic: str = "iot.telemetry"
    kafka_drain: float = 10.0
    interval: float = REPORT_INTERVAL
    collector: Collector = field(default_factory=Collector)
    extra_stats: Stats = field(default_factory=Stats)  # master-side recordings (Kafka)
    on_tick: Callable[[], None] | None = None
    workload: Workload | None = None  # this process's, once started (run_local)


class _Stopper:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.event = asyncio.Event()
        self.loop = loop
        self.signals = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._signal)

    def _signal(self) -> None:
        self.signals += 1
        if self.signals > 1:
            os._exit(130)  # second Ctrl-C: give up at once
        self.event.set()

    def close(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self.loop.remove_signal_handler(sig)


async def _tick_until_stop(
    ctl: RunControl,
    stopper: _Stopper,
    pull: Callable[[], None],
    finished: Callable[[], bool],
) -> None:
    """Report every interval until the run time is over, a signal came, or the work finished."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    next_tick = start + ctl.interval
    end = start + ctl.run_time if ctl.run_time else float("inf")
    while True:
        timeout = max(0.0, min(next_tick, end) - loop.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopper.event.wait(), timeout)
        now = loop.time()
        if now >= next_tick or stopper.event.is_set() or now >= end:
            pull()
            row = ctl.collector.close_interval()
            if ctl.display is not None:
                ctl.display.update(ctl.collector, row)
            if ctl.on_tick is not None:
                ctl.on_tick()
            next_tick += ctl.interval
            if next_tick <= now:
                next_tick = now + ctl.interval
        if stopper.event.is_set() or now >= end or finished():
            return


async def _start_kafka(ctl: RunControl) -> KafkaE2E | None:
    if not ctl.kafka:
        return None
    e2e = KafkaE2E(ctl.kafka, ctl.kafka_topic, ctl.extra_stats)
    try:
        await e2e.start()
    except Exception as exc:
        raise RunError(f"--kafka {ctl.kafka}: cannot consume {ctl.kafka_topic!r}: {exc}") from exc
    return e2e


async def _finish_kafka(ctl: RunControl, e2e: KafkaE2E | None) -> None:
    if e2e is None:
        return
    await e2e.stop(expected_telemetry(ctl.collector.entries), ctl.kafka_drain)
    ctl.collector.add_delta(ctl.extra_stats.take_delta())


# ---- in one process ------------------------------------------------------------------------------


async def run_local(spec: dict[str, Any], ctl: RunControl) -> None:
    """The whole run in this process (one event loop)."""
    ensure_fd_limit(int(spec["users"]))
    loop = asyncio.get_running_loop()
    rss_base = current_rss()
    rt = Runtime(Settings.from_dict(spec["settings"]), loop, 0, 1)
    workload = build_workload(spec, rt, 0, 1)
    ctl.workload = workload
    e2e = await _start_kafka(ctl)
    collector = ctl.collector
    stopper = _Stopper(loop)

    def pull() -> None:
        collector.add_delta(rt.stats.take_delta())
        collector.add_delta(ctl.extra_stats.take_delta())
        collector.set_gauges(
            "local", rt.users, rt.connected, current_rss(), rss_base, time.process_time()
        )

    if ctl.display is not None:
        ctl.display.start()
    collector.started = time.time()
    try:
        workload.start()
        await _tick_until_stop(ctl, stopper, pull, lambda: workload.finished)
        collector.ended = time.time()
        await workload.stop(ctl.stop_timeout)
        pull()
        await _finish_kafka(ctl, e2e)
        if collector._window:
            collector.close_interval()
    finally:
        stopper.close()
        if ctl.display is not None:
            ctl.display.stop()


# ---- master --------------------------------------------------------------------------------------


class _WorkerConn:
    def __init__(
        self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.name = name
        self.reader = reader
        self.writer = writer
        self.finished = False
        self.done = asyncio.Event()
        self.error: str | None = None

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(msgpack.packb(msg, use_bin_type=True))


class Master:
    def __init__(self, ctl: RunControl, expect: int) -> None:
        self.ctl = ctl
        self.expect = expect
        self.workers: list[_WorkerConn] = []
        self.joined = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.failed: str | None = None
        self.failure_event = asyncio.Event()

    async def listen(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._accept, host, port)
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        w: _WorkerConn | None = None
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                unpacker.feed(data)
                for msg in unpacker:
                    kind = msg.get("t")
                    if kind == "hello":
                        if len(self.workers) >= self.expect:
                            writer.close()  # a worker too many
                            return
                        w = _WorkerConn(f"{msg.get('host')}:{msg.get('pid')}", reader, writer)
                        self.workers.append(w)
                        if len(self.workers) >= self.expect:
                            self.joined.set()
                    elif w is None:
                        continue
                    elif kind == "stats":
                        self.ctl.collector.add_delta(msg["delta"])
                        self.ctl.collector.set_gauges(
                            w.name, msg["users"], msg["connected"], int(msg.get("rss", 0)),
                            int(msg.get("rss_base", 0)), float(msg.get("cpu", 0.0)),
                        )
                        w.finished = bool(msg.get("finished"))
                    elif kind == "done":
                        self.ctl.collector.add_delta(msg["delta"])
                        self.ctl.collector.set_gauges(w.name, 0, 0)
                        w.done.set()
                    elif kind == "error":
                        w.error = str(msg.get("message"))
                        self.failed = f"worker {w.name}: {w.error}"
                        self.failure_event.set()
                        w.done.set()
        except (ConnectionError, ValueError) as exc:
            if w is not None and not w.done.is_set():
                self.failed = f"worker {w.name}: {exc}"
        finally:
            if w is not None and not w.done.is_set():
                if self.failed is None:
                    self.failed = f"worker {w.name} went away"
                w.done.set()
                self.failure_event.set()

    async def run(self, spec: dict[str, Any], wait_workers: float) -> None:
        ctl = self.ctl
        loop = asyncio.get_running_loop()
        stopper = _Stopper(loop)
        try:
            try:
                await asyncio.wait_for(self.joined.wait(), wait_workers)
            except TimeoutError:
                raise RunError(
                    f"{len(self.workers)} of {self.expect} workers connected within "
                    f"{wait_workers:.0f} s"
                ) from None
            e2e = await _start_kafka(ctl)
            collector = ctl.collector
            collector.started = time.time()
            if ctl.display is not None:
                ctl.display.start()
            wire_spec = {k: v for k, v in spec.items() if not k.startswith("_")}
            for i, w in enumerate(self.workers):
                w.send({"t": "start", "spec": wire_spec, "index": i, "count": len(self.workers)})

            def pull() -> None:
                collector.add_delta(ctl.extra_stats.take_delta())

            def finished() -> bool:
                if self.failure_event.is_set():
                    return True
                return all(w.finished for w in self.workers)

            await _tick_until_stop(ctl, stopper, pull, finished)
            collector.ended = time.time()
            for w in self.workers:
                w.send({"t": "stop", "timeout": ctl.stop_timeout})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(w.done.wait() for w in self.workers)),
                    ctl.stop_timeout + 30,
                )
            await _finish_kafka(ctl, e2e)
            if collector._window:
                collector.close_interval()
            if self.failed:
                raise RunError(self.failed)
        finally:
            stopper.close()
            if ctl.display is not None:
                ctl.display.stop()
            for w in self.workers:
                w.writer.close()
            if self.server is not None:
                self.server.close()


async def run_master(
    spec: dict[str, Any],
    ctl: RunControl,
    *,
    bind_host: str = "127.0.0.1",
    bind_port: int = 5557,
    expect: int = 1,
    processes: int = 0,
    scenario_file: str | None = None,
    wait_workers: float = 60.0,
) -> None:
    """Run as master: with `processes`, start that many local workers; otherwise wait for
    `expect` workers started elsewhere (`iotgw-load --worker --master-host ...`)."""
    master = Master(ctl, processes or expect)
    port = await master.listen(bind_host if not processes else "127.0.0.1",
                               0 if processes else bind_port)
    procs: list[Any] = []
    if processes:
        ctx = multiprocessing.get_context("spawn")
        for _ in range(processes):
            p = ctx.Process(
                target=process_worker_main, args=("127.0.0.1", port, scenario_file), daemon=True
            )
            p.start()
            procs.append(p)
    try:
        await master.run(spec, wait_workers)
    finally:
        for p in procs:
            await asyncio.get_running_loop().run_in_executor(None, p.join, 10)
            if p.is_alive():
                p.kill()


# ---- worker --------------------------------------------------------------------------------------


async def run_worker(master_host: str, master_port: int, scenario_file: str | None = None,
                     connect_timeout: float = 60.0) -> int:
    """Connect to the master, run what it says, report every second. Returns an exit code."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(master_host, master_port)
            break
        except OSError:
            if loop.time() > deadline:
                print(f"iotgw-load worker: no master at {master_host}:{master_port}",
                      file=sys.stderr)
                return 3
            await asyncio.sleep(0.5)

    def send(msg: dict[str, Any]) -> None:
        writer.write(msgpack.packb(msg, use_bin_type=True))

    send({"t": "hello", "pid": os.getpid(), "host": socket.gethostname()})
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    rt: Runtime | None = None
    rss_base = current_rss()
    workload: Workload | None = None
    reporter: asyncio.Task[None] | None = None

    async def report() -> None:
        assert rt is not None and workload is not None
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            send({"t": "stats", "delta": rt.stats.take_delta(), "users": rt.users,
                  "connected": rt.connected, "finished": workload.finished,
                  "rss": current_rss(), "rss_base": rss_base, "cpu": time.process_time()})

    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break  # the master went away
            unpacker.feed(data)
            for msg in unpacker:
                kind = msg.get("t")
                if kind == "start" and workload is None:
                    spec = dict(msg["spec"])
                    if scenario_file and spec["kind"] == "scenario":
                        spec["scenario"] = {**spec["scenario"], "file": scenario_file}
                    try:
                        ensure_fd_limit(-(-int(spec["users"]) // int(msg["count"])))
                        rt = Runtime(Settings.from_dict(spec["settings"]), loop,
                                     int(msg["index"]), int(msg["count"]))
                        workload = build_workload(spec, rt, int(msg["index"]), int(msg["count"]))
                    except Exception as exc:
                        send({"t": "error", "message": f"{type(exc).__name__}: {exc}"})
                        await writer.drain()
                        return 2
                    workload.start()
                    reporter = loop.create_task(report())
                elif kind == "stop":
                    if reporter is not None:
                        reporter.cancel()
                    if workload is not None and rt is not None:
                        await workload.stop(float(msg.get("timeout", 5.0)))
                        send({"t": "done", "delta": rt.stats.take_delta()})
                    else:
                        send({"t": "done", "delta": Stats().take_delta()})
                    await writer.drain()
                    writer.close()
                    return 0
    finally:
        if reporter is not None:
            reporter.cancel()
    if workload is not None:
        await workload.stop(1.0)
    return 0


def process_worker_main(master_host: str, master_port: int, scenario_file: str | None) -> None:
    """Entry point of a local worker process (--processes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master handles Ctrl-C
    import uvloop

    code = uvloop.run(run_worker(master_host, master_port, scenario_file))
    sys.exit(code)
