"""MQTT over WebSocket: iotgw's --ws-port against Mosquitto's websockets listener, side by side
in one run. Each server is pinned to core 0 and the load generator (bench/brokerload.py qos1
--websocket: 100 connections, 10 QoS 1 PUBLISHes in flight each, one masked frame per PUBLISH)
to core 1, a fresh server per round; rounds alternate between the two servers so that the
noise of the shared machine falls on both. extra_info has each round, the medians and the
ratio (iotgw / Mosquitto, messages per second on one core). Under --benchmark-disable one
short round each, so that it cannot rot.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import free_port, pinned, wait_for_tcp

HERE = Path(__file__).parent


def _server(kind: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "mosquitto":
        conf = tmp / "mosquitto-ws.conf"
        # Mosquitto 2.0.11 starts no websockets listener unless a plain one exists too; its
        # websockets listener takes no address (libwebsockets binds every interface).
        conf.write_text(
            f"listener {free_port()} 127.0.0.1\nlistener {port}\nprotocol websockets\n"
            "socket_domain ipv4\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\nmax_connections -1\n"
        )
        cmd = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
    else:
        cmd = [
            sys.executable, "-m", "gateway.cli", "run", "--mqtt-port", "0", "--ws-port",
            str(port), "--http-port", "0", "--coap-port", "0", "--allow-anonymous", "--acl",
            "open", "--data-dir", str(tmp / "iotgw"), "--log-level", "warning",
        ]
    proc = subprocess.Popen([*pinned(0), *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_tcp(port, proc=proc)  # type: ignore[arg-type]
    return proc, port


def _round(kind: str, tmp: Path, seconds: str) -> dict[str, Any]:
    proc, port = _server(kind, tmp)
    try:
        out = subprocess.run(
            [*pinned(1), sys.executable, str(HERE / "brokerload.py"), "qos1", "--websocket",
             "--port", str(port), "--pid", str(proc.pid), "--connections", "100",
             "--window", "10", "--seconds", seconds],
            capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert proc.poll() is None, f"{kind} died"
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["messages"] > 0, f"{kind}: no PUBACK over WebSocket"
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_websocket_qos1_publish_throughput_vs_mosquitto(benchmark: Any, tmp_path: Path) -> None:
    rounds, seconds = (1, "0.5") if benchmark.disabled else (3, "5")
    results: dict[str, list[dict[str, Any]]] = {"iotgw": [], "mosquitto": []}

    def run() -> None:
        for _ in range(rounds):
            for kind in ("mosquitto", "iotgw"):
                results[kind].append(_round(kind, tmp_path, seconds))

    benchmark.pedantic(run, rounds=1, iterations=1)
    info: dict[str, Any] = {}
    for kind, runs in results.items():
        info[f"{kind}_rates"] = [round(r["rate"]) for r in runs]
        info[f"{kind}_rate_median"] = statistics.median(r["rate"] for r in runs)
        info[f"{kind}_cpu_us_per_msg_median"] = statistics.median(
            r["broker_cpu_us_per_op"] for r in runs)
    info["ratio_rate"] = info["iotgw_rate_median"] / info["mosquitto_rate_median"]
    info["ratio_cpu_per_msg"] = (
        info["mosquitto_cpu_us_per_msg_median"] / info["iotgw_cpu_us_per_msg_median"])
    benchmark.extra_info.update(info)
    print(json.dumps(info))
