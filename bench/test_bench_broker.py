"""iotgw's MQTT server side by side with Mosquitto and amqtt's broker, in one run: each broker
pinned to core 0, the raw-socket load generator (bench/brokerload.py, native codec) pinned to
core 1, a fresh broker process per scenario. The figures are in each benchmark's extra_info
(msg/s, broker CPU microseconds per message, connections/s, RSS per connection); the timing
itself is only the scenario's fixed length. Under --benchmark-disable every scenario runs
briefly, so it cannot rot.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import free_port, pinned, wait_for_tcp

HERE = Path(__file__).parent
# Connections one process can hold: the hard limit on open files (20,000 in this sandbox, which
# drops CAP_SYS_RESOURCE so it cannot be raised), less some for listeners, logs and the loop.
HOLD = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 200


class Broker:
    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.port = free_port()
        if kind == "mosquitto":
            conf = tmp / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 100000\nmax_connections -1\n"
            )
            binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            cmd = [binary, "-c", str(conf)]
        elif kind == "amqtt":  # lean: the anonymous-auth plugin only
            conf = tmp / "amqtt.yaml"
            conf.write_text(
                f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
                "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                "    allow_anonymous: true\n"
            )
            cmd = [str(Path(sys.executable).parent / "amqtt"), "-c", str(conf)]
        elif kind == "amqtt-default":  # the configuration amqtt ships (loggers, $SYS plugin)
            import amqtt.scripts

            shipped = (Path(amqtt.scripts.__file__).parent / "default_broker.yaml").read_text()
            conf = tmp / "amqtt-default.yaml"
            conf.write_text(shipped.replace("0.0.0.0:1883", f"127.0.0.1:{self.port}"))
            cmd = [str(Path(sys.executable).parent / "amqtt"), "-c", str(conf)]
        else:
            cmd = [
                sys.executable, "-m", "gateway.cli", "run", "--mqtt-port", str(self.port),
                "--http-port", "0", "--coap-port", "0", "--allow-anonymous", "--acl", "open",
                "--data-dir", str(tmp / "iotgw"), "--log-level", "warning",
            ]
        self.proc = subprocess.Popen(
            [*pinned(0), *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_tcp(self.port, proc=self.proc)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Any]:
    started: list[Broker] = []

    def start(kind: str) -> Broker:
        broker = Broker(kind, tmp_path)
        started.append(broker)
        return broker

    yield start
    for b in started:
        b.stop()


def _load(mode: str, broker: Broker, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [*pinned(1), sys.executable, str(HERE / "brokerload.py"), mode,
         "--port", str(broker.port), "--pid", str(broker.proc.pid), *args],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _scenario(benchmark: Any, start_broker: Any, kind: str, mode: str, *args: str) -> None:
    broker = start_broker(kind)
    holder: dict[str, Any] = {}
    benchmark.pedantic(lambda: holder.update(_load(mode, broker, *args)), rounds=1, iterations=1)
    assert broker.proc.poll() is None, f"{kind} died"
    if not (kind.startswith("amqtt") and mode == "qos0"):  # amqtt delivers next to nothing
        assert holder["rate"] > 0, holder  # real work: messages or connections went through
    benchmark.extra_info.update(holder)
    print(kind, json.dumps(holder))


BROKERS = ["mosquitto", "amqtt", "amqtt-default", "iotgw"]


@pytest.mark.benchmark(group="broker-qos1-100conn-window10")
@pytest.mark.parametrize("kind", BROKERS)
def test_qos1_publish_puback_throughput(benchmark: Any, start_broker: Any, kind: str) -> None:
    seconds = "0.5" if benchmark.disabled else "5"
    _scenario(benchmark, start_broker, kind, "qos1", "--connections", "100", "--window", "10",
              "--seconds", seconds)


@pytest.mark.benchmark(group="broker-qos0-10pub-1sub")
@pytest.mark.parametrize("kind", BROKERS)
def test_qos0_fan_in_delivery_throughput(benchmark: Any, start_broker: Any, kind: str) -> None:
    seconds = "0.5" if benchmark.disabled else "5"
    _scenario(benchmark, start_broker, kind, "qos0", "--publishers", "10", "--seconds", seconds)


@pytest.mark.benchmark(group="broker-connect-2000")
@pytest.mark.parametrize("kind", BROKERS)
def test_connection_rate_and_memory(benchmark: Any, start_broker: Any, kind: str) -> None:
    count = "200" if benchmark.disabled else "2000"
    _scenario(benchmark, start_broker, kind, "connect", "--connections", count)


@pytest.mark.benchmark(group="broker-hold-idle")
@pytest.mark.parametrize("kind", ["mosquitto", "iotgw"])  # amqtt: ~50 KB each, too slow
def test_hold_idle_connections(benchmark: Any, start_broker: Any, kind: str) -> None:
    """As many concurrent connections as one process may open (HOLD), from five loopback source
    addresses; extra_info has the broker's RSS per idle connection. (The issue asks for 100k: one
    process here is capped at 20,000 descriptors.)"""
    count = "500" if benchmark.disabled else str(HOLD)
    sources = ",".join(f"127.0.0.{i}" for i in range(1, 6))
    _scenario(benchmark, start_broker, kind, "connect", "--connections", count,
              "--sources", sources, "--hold", "2")
