"""Device shadow throughput, side by side with its anchors in one run.

1. CAS updates per second through the store API against Redis (`RedisShadowStore.update` and
   `update_many` batches, 16 concurrent writers), next to `redis-benchmark` running the store's
   own compare-and-set script with EVALSHA at the same concurrency, unpipelined and at pipeline
   16. The anchor runs the script's success path (each key is new, so the compare holds and the
   document, its change record and the history trim are written), with arguments of the sizes
   the store sends (the document and change record are stand-ins of the same length: msgpack's
   NUL bytes cannot go through argv). extra_info has updates/s of each, the ratios to the
   anchors (the issue's target: >= 0.5x of the ceiling by batching) and the client's CPU
   microseconds per update.
2. REST `GET /v1/devices/{id}/shadow` with wrk (1 thread, 32 connections), against a gateway
   process on the SQLite (default) and the Redis store: requests/s and latency percentiles.

Redis and the gateway are pinned to core 0, the load (redis-benchmark, the store client, wrk)
to core 1. The store client runs with the gateway's garbage-collector settings. No timed
assertions; under --benchmark-disable every scenario runs briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gc
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import free_port, pinned, stop_process, wait_for_tcp

from shadow import UpdateRequest
from shadow.model import apply_update
from shadow.redis import _CAS_SCRIPT, _CAS_SHA, RedisShadowStore

CONCURRENCY = 16
BATCH = 64
TOKEN = "bench-token"


@contextlib.contextmanager
def _this_thread_on(core: int) -> Iterator[None]:
    try:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or one core
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, 10)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-benchmark") is None:
        pytest.fail("redis-server / redis-benchmark are not installed: scripts/test.sh does it")
    port = free_port()
    proc = subprocess.Popen(
        [*pinned(0), binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis-bench"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_tcp(port, proc=proc)
        yield port
    finally:
        _stop(proc)


def _redis(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


# --------------------------------------------------------------------------- store vs EVALSHA


def _sample_write() -> tuple[str, str]:
    """Stand-ins as long as the document and change record the store writes for the
    benchmark's updates (what Redis does with them depends only on their length)."""
    result = apply_update(None, {"state": {"reported": {"temp": 21.5, "hum": 40}}},
                          writer="bench-node", ts_ms=1_700_000_000_000, seq=1)
    return "d" * len(result.shadow.to_bytes()), "c" * len(result.change.to_bytes())


def _redis_benchmark(port: int, requests: int, pipeline: int) -> float:
    """EVALSHA of the store's CAS script, each call on two fresh keys (the success path)."""
    doc, change = _sample_write()
    token = "0123456789ab.00000000000003e8"  # as long as the store's write tokens
    _redis(port, "SCRIPT", "LOAD", _CAS_SCRIPT)
    cmd = [
        *pinned(1), "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(requests),
        "-c", str(CONCURRENCY), "-P", str(pipeline), "-r", "1000000000", "--csv",
        "EVALSHA", _CAS_SHA, "2", "rb:shadow:{__rand_int__}", "rb:shadow:{__rand_int__}:changes",
        "", token, "0", doc, change, "100",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    rows = list(csv.reader(io.StringIO(out.stdout)))
    header, values = rows[0], rows[-1]
    # the test name (the command, JSON and all) is not quoted for CSV: count from the end
    rps = float(values[header.index("rps") - len(header)])
    written = int(_redis(port, "DBSIZE"))
    _redis(port, "FLUSHALL")
    assert written > requests  # the script wrote (two keys per call): the success path ran
    return rps


async def _store_rate(port: int, updates: int, batched: bool) -> dict[str, float]:
    prefix = f"bench{time.monotonic_ns()}"
    devices = [f"dev-{i}" for i in range(4096)]
    store = RedisShadowStore(f"127.0.0.1:{port}", prefix=prefix)
    counter = itertools.count()

    def request(i: int) -> UpdateRequest:
        doc = {"state": {"reported": {"temp": 20 + i % 10, "hum": 40}}}
        return UpdateRequest(devices[i % len(devices)], doc, "bench-node", seq=i)

    async def single() -> None:
        while (i := next(counter)) < updates:
            r = request(i)
            await store.update(r.device, r.update, writer=r.writer, seq=r.seq)

    async def batches() -> None:
        while (start := next(counter) * BATCH) < updates:
            outcomes = await store.update_many(
                [request(i) for i in range(start, min(updates, start + BATCH))]
            )
            assert not any(isinstance(o, Exception) for o in outcomes)

    try:
        await store.update(devices[0], {"state": {}}, writer="warm-up")  # connect, load script
        began, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(batches() if batched else single() for _ in range(CONCURRENCY)))
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
        return {
            "updates_per_s": updates / elapsed,
            "cpu_us_per_update": round(cpu / updates * 1e6, 1),
            "cas_retries": store.stats.cas_retries,
        }
    finally:
        await store.close()


@contextlib.contextmanager
def _gateway_gc() -> Iterator[None]:
    """The collector as a gateway process runs it (``gateway.app.serve``): what exists at
    start is frozen (here: pytest and its plugins), the young generation collected less often."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _store_benchmark(port: int, updates: int, batched: bool) -> dict[str, float]:
    import uvloop

    with _this_thread_on(1), _gateway_gc():
        result = uvloop.run(_store_rate(port, updates, batched))
    _redis(port, "FLUSHALL")
    return result


@pytest.mark.benchmark(group="shadow-cas-redis-c16")
def test_cas_updates_per_second_through_the_store_vs_redis_benchmark_evalsha(
    benchmark: Any, redis_port: int
) -> None:
    quick = benchmark.disabled
    figures: dict[str, Any] = {"concurrency": CONCURRENCY, "batch": BATCH}

    def run() -> None:
        figures["redis_benchmark_evalsha_p1_per_s"] = _redis_benchmark(
            redis_port, 2_000 if quick else 150_000, 1
        )
        figures["redis_benchmark_evalsha_p16_per_s"] = _redis_benchmark(
            redis_port, 2_000 if quick else 400_000, 16
        )
        single = _store_benchmark(redis_port, 300 if quick else 20_000, batched=False)
        many = _store_benchmark(redis_port, 1_000 if quick else 60_000, batched=True)
        for name, result in (("store_update", single), ("store_update_many", many)):
            figures[f"{name}_per_s"] = result["updates_per_s"]
            figures[f"{name}_cpu_us"] = result["cpu_us_per_update"]
            figures[f"{name}_cas_retries"] = result["cas_retries"]

    benchmark.pedantic(run, rounds=1, iterations=1)
    p1 = figures["redis_benchmark_evalsha_p1_per_s"]
    p16 = figures["redis_benchmark_evalsha_p16_per_s"]
    for name in ("store_update", "store_update_many"):
        figures[f"{name}_vs_evalsha_p1"] = round(figures[f"{name}_per_s"] / p1, 3)
        figures[f"{name}_vs_evalsha_p16"] = round(figures[f"{name}_per_s"] / p16, 3)
    benchmark.extra_info.update(figures)
    print(json.dumps(figures))


# --------------------------------------------------------------------------- REST with wrk


class GatewayProcess:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "gateway.cli", "run", "--http-port", str(self.port),
            "--mqtt-port", "0", "--coap-port", "0", "--api-token", TOKEN,
            "--data-dir", str(tmp / "iotgw"), "--log-level", "warning", *extra,
        ]
        self.proc = subprocess.Popen([*pinned(0), *cmd], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_tcp(self.port, proc=self.proc)  # type: ignore[arg-type]

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        _stop(self.proc)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m is not None, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def _wrk(port: int, seconds: int, path: str = "/v1/devices/d1/shadow") -> dict[str, Any]:
    cmd = [
        *pinned(1), "wrk", "-t1", "-c32", f"-d{seconds}s", "--latency",
        "-H", f"Authorization: Bearer {TOKEN}", f"http://127.0.0.1:{port}{path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    text = out.stdout
    assert "Non-2xx" not in text and "Socket errors" not in text, text
    figures: dict[str, Any] = {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore[union-attr]
    }
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)$", text, re.M)
        assert m is not None, text
        figures[f"p{pct}_ms"] = round(_ms(m.group(1)), 3)
    return figures


@pytest.mark.benchmark(group="shadow-rest-get-wrk-c32")
@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_rest_get_shadow_with_wrk(
    benchmark: Any, tmp_path: Path, redis_port: int, store: str
) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: scripts/test.sh installs it")
    extra = ("--redis", f"redis://127.0.0.1:{redis_port}") if store == "redis" else ()
    gw = GatewayProcess(tmp_path, *extra)
    try:
        gw.request("PATCH", "/v1/devices/d1/shadow", {
            "state": {"desired": {"color": "red", "fan": {"speed": 3, "mode": "auto"}},
                      "reported": {"color": "blue", "temp": 21.5, "fan": {"speed": 2}}},
        })
        figures: dict[str, Any] = {"store": store, "connections": 32}
        seconds = 1 if benchmark.disabled else 5

        def run() -> None:
            figures.update(_wrk(gw.port, seconds))
            # The anchor: the same server, HTTP stack and wrk on its bare endpoint (/healthz:
            # no token, no store), right after; what the shadow read adds is the difference.
            bare = _wrk(gw.port, seconds, "/healthz")
            figures["bare_endpoint_requests_per_s"] = bare["requests_per_s"]
            figures["bare_endpoint_p99_ms"] = bare["p99_ms"]

        benchmark.pedantic(run, rounds=1, iterations=1)
        assert gw.proc.poll() is None, "the gateway died"
    finally:
        gw.stop()
    assert figures["requests_per_s"] > 0 and figures["bare_endpoint_requests_per_s"] > 0
    figures["vs_bare_endpoint"] = round(
        figures["requests_per_s"] / figures["bare_endpoint_requests_per_s"], 3
    )
    benchmark.extra_info.update(figures)
    print(json.dumps(figures))
