"""The load generator itself, side by side with a library MQTT client (paho-mqtt), against
Mosquitto: QoS 0 publishes per second and per CPU second of the generator, and the memory and CPU
of holding connections with a 1 Hz heartbeat. The figures are in each benchmark's extra_info (the
timing itself is only the scenario's fixed length). The broker is pinned to core 0 and the
generator to core 1 when `taskset` exists. Under --benchmark-disable every scenario runs briefly.
"""

from __future__ import annotations

import csv
import os
import resource
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import free_port, pinned, wait_for_tcp

ROOT = Path(__file__).parent.parent


@pytest.fixture
def mosquitto_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "set_tcp_nodelay true\nmax_connections -1\n")
    proc = subprocess.Popen([*pinned(0), "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_tcp(port, proc=proc)  # type: ignore[arg-type]
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], timeout: float = 300) -> tuple[str, float]:
    """Run the generator pinned to core 1; returns its stdout and CPU seconds."""
    before = _child_cpu()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTGW_LOAD_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([*pinned(1), *cmd], capture_output=True, text=True, timeout=timeout,
                         env=env, cwd=ROOT)
    # 1 means the generator counted failures: a run with failures measured nothing useful.
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, _child_cpu() - before


def _stats(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


@pytest.mark.benchmark(group="generator-qos0-publish")
def test_iotgw_load_qos0_publish_rate(benchmark: Any, mosquitto_port: int,
                                      tmp_path: Path) -> None:
    seconds = 1.0 if benchmark.disabled else 10.0
    info: dict[str, Any] = {}

    def run() -> None:
        _, cpu = _run([sys.executable, "-m", "loadtest", "pub", "-H",
                         f"mqtt://127.0.0.1:{mosquitto_port}", "-c", "10", "-I", "0", "-q", "0",
                         "-s", "64", "-d", f"{seconds}s", "--headless", "--csv",
                         str(tmp_path / "pub")])
        sent = int(_stats(tmp_path / "pub")[("PUBLISH", "pub")]["Request Count"])
        info.update(messages=sent, seconds=seconds, msgs_per_s=round(sent / seconds),
                    generator_cpu_s=round(cpu, 2), msgs_per_cpu_s=round(sent / max(cpu, 1e-9)))

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert info["messages"] > 0
    benchmark.extra_info.update(info)
    print("iotgw-load", info)


_PAHO = textwrap.dedent(
    """
    import sys, time
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="paho-bench")
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", int(sys.argv[1]))
    c.loop_start()
    end = time.monotonic() + float(sys.argv[2])
    n = 0
    payload = b"x" * 64
    while time.monotonic() < end:
        for _ in range(100):
            c.publish("paho/bench", payload, qos=0)
        n += 100
    c.loop_stop()
    print(n)
    """
)


@pytest.mark.benchmark(group="generator-qos0-publish")
def test_paho_qos0_publish_rate(benchmark: Any, mosquitto_port: int) -> None:
    seconds = 1.0 if benchmark.disabled else 10.0
    info: dict[str, Any] = {}

    def run() -> None:
        out, cpu = _run([sys.executable, "-c", _PAHO, str(mosquitto_port), str(seconds)])
        sent = int(out.strip().splitlines()[-1])
        info.update(messages=sent, seconds=seconds, msgs_per_s=round(sent / seconds),
                    generator_cpu_s=round(cpu, 2), msgs_per_cpu_s=round(sent / max(cpu, 1e-9)))

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert info["messages"] > 0
    benchmark.extra_info.update(info)
    print("paho-mqtt", info)


@pytest.mark.benchmark(group="generator-hold-heartbeat")
def test_iotgw_load_holds_devices_with_1hz_heartbeats(benchmark: Any, mosquitto_port: int,
                                                       tmp_path: Path) -> None:
    devices = 500 if benchmark.disabled else 10_000
    info: dict[str, Any] = {}

    def run() -> None:
        out, cpu = _run([sys.executable, "-m", "loadtest", "conn", "-H",
                         f"mqtt://127.0.0.1:{mosquitto_port}", "-c", str(devices), "-r", "2000",
                         "-I", "1000", "-d", "4s" if benchmark.disabled else "20s",
                         "--headless", "--csv", str(tmp_path / "conn")])
        stats = _stats(tmp_path / "conn")
        per_conn = [line for line in out.splitlines() if "KiB/conn" in line]
        info.update(devices=devices,
                    connected=int(stats[("CONNECT", "connect")]["Request Count"]),
                    pings=int(stats[("PING", "heartbeat")]["Request Count"]),
                    ping_p99_ms=stats[("PING", "heartbeat")]["99%"],
                    generator_cpu_s=round(cpu, 2),
                    last_status=per_conn[-1] if per_conn else "")

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert info["connected"] == devices and info["pings"] > 0, info
    benchmark.extra_info.update(info)
    print("iotgw-load conn", info)
