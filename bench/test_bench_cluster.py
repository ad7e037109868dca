"""100k concurrent MQTT connections on this machine: `iotgw run --workers N --redis ...`.

One process here may open at most 20,000 descriptors (a hard limit this sandbox will not
raise), so 100k connections need several processes on each side: N gateway workers sharing
the port by SO_REUSEPORT (a cluster over one Redis, gateway/cluster.py), and N raw-socket load
generators (bench/brokerload.py), each from four loopback source addresses of its own. The
workers and Redis are pinned to core 0, the generators to core 1. Every generator connects its
share, reports ready and holds; once all are ready the test reads each worker's
`iotgw_mqtt_connections`, the workers' RSS and CPU, and lets go. extra_info: connections
held, connections/s, RSS KB per connection (workers' growth over the run), CPU microseconds
per connect (workers + Redis).
Under --benchmark-disable it runs with 2 workers and 600 connections.

Also: QoS 0 from 10 publishers on one node to a subscriber on another (every message crosses
Redis pub/sub), with the CPU of both nodes and Redis per delivered message.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from brokerload import _rss_kb, cpu_seconds
from conftest import free_port, free_ports, pinned, wait_for_ready, wait_for_tcp, worker_pids

HERE = Path(__file__).parent


def _connections(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    match = re.search(r"^iotgw_mqtt_connections (\S+)$", text, re.M)
    assert match, "no iotgw_mqtt_connections"
    return int(float(match.group(1)))


def _start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    """A server on core 0, once it listens on `port`."""
    proc = subprocess.Popen(
        [*pinned(0), *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_tcp(port, proc=proc, timeout=60)
    return proc


def _redis(port: int) -> list[str]:
    return [shutil.which("redis-server") or "redis-server", "--port", str(port),
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def _node(redis_port: int, port: int, node: str, data: Path) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", "run", "--cluster", "--node-id", node,
            "--redis", f"redis://127.0.0.1:{redis_port}", "--mqtt-port", str(port),
            "--http-port", "0", "--coap-port", "0", "--allow-anonymous", "--acl", "open",
            "--data-dir", str(data), "--log-level", "warning"]


def _single(port: int, data: Path) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", "run", "--mqtt-port", str(port),
            "--http-port", "0", "--coap-port", "0", "--allow-anonymous", "--acl", "open",
            "--data-dir", str(data), "--log-level", "warning"]


@pytest.mark.benchmark(group="cluster-qos0-cross-node")
def test_qos0_from_one_node_to_a_subscriber_on_another(benchmark: Any, tmp_path: Path) -> None:
    redis_port, port_a, port_b = free_port(), free_port(), free_port()
    procs = [_start(_redis(redis_port), redis_port)]
    try:
        procs.append(_start(_node(redis_port, port_a, "a", tmp_path / "a"), port_a))
        procs.append(_start(_node(redis_port, port_b, "b", tmp_path / "b"), port_b))
        seconds = "0.5" if benchmark.disabled else "5"
        result: dict[str, Any] = {}

        def qos0(servers: list[subprocess.Popen[bytes]], *ports: str) -> dict[str, Any]:
            cpu0 = sum(cpu_seconds(p.pid) for p in servers)
            out = subprocess.run(
                [*pinned(1), sys.executable, str(HERE / "brokerload.py"), "qos0", *ports,
                 "--publishers", "10", "--seconds", seconds],
                capture_output=True, text=True, timeout=300,
            )
            assert out.returncode == 0, out.stderr
            figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
            cpu = sum(cpu_seconds(p.pid) for p in servers) - cpu0
            figures["cpu_us_per_msg"] = cpu / max(1, figures["messages"]) * 1e6
            return figures

        def run() -> None:
            result.update(qos0(procs, "--port", str(port_a), "--sub-port", str(port_b)))
            result["cpu_us_per_msg_nodes_and_redis"] = result.pop("cpu_us_per_msg")
            # The anchor: the same load on one gateway that is not in a cluster, same core.
            port = free_port()
            single = _start(_single(port, tmp_path / "single"), port)
            try:
                alone = qos0([single], "--port", str(port))
            finally:
                single.terminate()
                single.wait(60)
            result["single_node_rate"] = alone["rate"]
            result["single_node_cpu_us_per_msg"] = alone["cpu_us_per_msg"]

        benchmark.pedantic(run, rounds=1, iterations=1)
        assert result["messages"] > 0 and result["single_node_rate"] > 0
        result["vs_single_node"] = round(result["rate"] / result["single_node_rate"], 3)
        benchmark.extra_info.update(result)
        print(json.dumps(result))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(60)


@pytest.mark.benchmark(group="broker-hold-100k")
def test_hold_100k_connections_on_workers(benchmark: Any, tmp_path: Path) -> None:
    workers, per_generator = (2, 300) if benchmark.disabled else (6, 16_700)
    redis_port, port, http_port = free_port(), free_port(), free_ports(workers)
    redis = _start(_redis(redis_port), redis_port)
    procs = [redis]
    result: dict[str, Any] = {}
    try:
        gateway = _start(
            [sys.executable, "-m", "gateway.cli", "run", "--workers", str(workers),
             "--redis", f"redis://127.0.0.1:{redis_port}", "--mqtt-port", str(port),
             "--http-port", str(http_port), "--coap-port", str(free_port()),
             "--allow-anonymous", "--acl", "open", "--data-dir", str(tmp_path / "data"),
             "--log-level", "warning", "--node-id", "bench"],
            port,
        )
        procs.append(gateway)
        for i in range(workers):
            wait_for_ready(http_port + i, proc=gateway, timeout=60)
        pids = worker_pids(gateway.pid)
        assert len(pids) == workers
        rss_before = sum(_rss_kb(p) for p in pids)
        cpu_before = sum(cpu_seconds(p) for p in [*pids, redis.pid])

        def hold() -> None:
            generators = [
                subprocess.Popen(
                    [*pinned(1), sys.executable, str(HERE / "brokerload.py"), "connect",
                     "--port", str(port), "--connections", str(per_generator),
                     "--id-prefix", f"g{g}-", "--until-stdin-closes", "--hold", "0",
                     "--sources", ",".join(f"127.0.{g + 1}.{i}" for i in range(1, 5))],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )
                for g in range(workers)
            ]
            procs.extend(generators)
            started = time.perf_counter()
            ready = []
            for g in generators:
                assert g.stdout is not None
                line = g.stdout.readline()
                assert line, g.stderr.read().decode() if g.stderr else "generator died"
                ready.append(json.loads(line))
            elapsed = time.perf_counter() - started
            held = sum(_connections(http_port + i) for i in range(workers))
            rss_after = sum(_rss_kb(p) for p in pids)
            cpu = sum(cpu_seconds(p) for p in [*pids, redis.pid]) - cpu_before
            for g in generators:
                g.communicate(b"", timeout=120)
                assert g.returncode == 0
            result.update(
                workers=workers,
                connections_held=held,
                generators_connected=sum(r["ready"] for r in ready),
                seconds=elapsed,
                connections_per_s=held / elapsed,
                rate=held / elapsed,  # the name bench/anchors.py compares with one process
                rss_kb_per_connection=(rss_after - rss_before) / max(1, held),
                workers_rss_mb=rss_after / 1024,
                cpu_us_per_connect=cpu / max(1, held) * 1e6,
            )

        benchmark.pedantic(hold, rounds=1, iterations=1)
        assert result["connections_held"] == workers * per_generator
        benchmark.extra_info.update(result)
        print(json.dumps(result))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
