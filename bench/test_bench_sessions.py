"""Offline persistent sessions holding large queues, and what they cost a healthy publisher.

The scenario of the review that found snapshots growing without bound: N offline persistent
sessions with M queued 64 KB messages each, while a healthy QoS 1 publisher (its messages
consumed at QoS 1 by an online subscriber) measures PUBACK latency one message at a time and
a trickle of new messages reaches the offline sessions, so that every save has work. The
same gateway process is measured unloaded first (the baseline), then loaded; extra_info has
PUBACK p50/p99/max for both, the gateway's RSS (and peak) for both, the queued payload and
the state database's size.

    .venv/bin/pytest bench/test_bench_sessions.py --benchmark-only -s      # 10 x 1000 x 64 KB
    .venv/bin/pytest bench/test_bench_sessions.py --benchmark-disable      # a short smoke run

The gateway runs from this tree, or from IOTGW_BENCH_SRC (another checkout with its compiled
modules: the version before, side by side). Bounds are given as IOTGW_* variables, which an
older version without them ignores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import free_port, pinned, wait_for_tcp

from gateway._native import mqtt

PAYLOAD = 64 * 1024


class Raw:
    """A blocking MQTT 3.1.1 client on a plain socket (native codec)."""

    def __init__(self, port: int, client_id: str, clean: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.framer = mqtt.Framer(version=4)
        self.pending: list[Any] = []
        self.sock.sendall(mqtt.Connect(client_id, clean_start=clean, keep_alive=0).encode(4))
        assert self.recv().type == mqtt.CONNACK

    def recv(self) -> Any:
        while not self.pending:
            data = self.sock.recv(1 << 16)
            assert data, "the gateway closed the connection"
            self.pending.extend(p.detach() for p in self.framer.feed(data))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.sendall(mqtt.Disconnect().encode(4))
        self.sock.close()


def rss_kb(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def park(port: int, sessions: int) -> None:
    for i in range(sessions):
        dev = Raw(port, f"offline-{i}", clean=False)
        dev.sock.sendall(mqtt.Subscribe(1, [mqtt.Subscription(f"queue/{i}", 1)]).encode(4))
        assert dev.recv().type == mqtt.SUBACK
        dev.close()


def fill(port: int, sessions: int, messages: int) -> None:
    """M messages of 64 KB for each offline session, 50 in flight at a time."""
    pub = Raw(port, "filler")
    payload = os.urandom(PAYLOAD)
    for i in range(sessions):
        for start in range(0, messages, 50):
            n = min(50, messages - start)
            pub.sock.sendall(b"".join(
                mqtt.encode_publish(f"queue/{i}", payload, qos=1, packet_id=k + 1)
                for k in range(n)
            ))
            for _ in range(n):
                assert pub.recv().type == mqtt.PUBACK
    pub.close()


def measure(port: int, seconds: float, sessions: int) -> dict[str, Any]:
    """PUBACK latency of a healthy QoS 1 publisher sending one message every 5 ms on a fixed
    schedule, one at a time: a message's latency counts from when it was due, so a stall of the
    gateway counts for every message it held back (no coordinated omission). Beside it, a
    trickle of one 64 KB message every 0.5 s to the offline sessions gives every save work."""
    pub = Raw(port, "healthy")
    trickle = Raw(port, "trickle")
    payload = b"t" * 64
    latencies: list[float] = []
    interval = 0.005
    start = time.perf_counter()
    end = start + seconds
    due = start
    next_trickle = start
    pid = 0
    trickled = 0
    while due < end:
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        pid = pid % 65535 + 1
        pub.sock.sendall(mqtt.encode_publish("healthy/t", payload, qos=1, packet_id=pid))
        assert pub.recv().type == mqtt.PUBACK
        latencies.append(time.perf_counter() - due)
        due += interval
        if time.perf_counter() >= next_trickle:
            next_trickle += 0.5
            trickle.sock.sendall(mqtt.encode_publish(
                f"queue/{pid % sessions}", os.urandom(PAYLOAD), qos=1, packet_id=pid
            ))
            assert trickle.recv().type == mqtt.PUBACK
            trickled += 1
    pub.close()
    trickle.close()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "count": len(ms), "p50_ms": round(ms[len(ms) // 2], 3),
        "p99_ms": round(ms[int(len(ms) * 0.99)], 3), "max_ms": round(ms[-1], 3),
        "trickled": trickled,
    }


class Consumer:
    """The healthy publisher's subscriber, online at QoS 1 (paho acknowledges each message)."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="consumer")
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = lambda *a: setattr(self, "count", self.count + 1)
        self.client.on_connect = lambda c, *a: c.subscribe("healthy/#", 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(tmp: Path, sessions: int, messages: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    data = tmp / "data"
    env = dict(os.environ)
    src = os.environ.get("IOTGW_BENCH_SRC")
    if src:
        env["PYTHONPATH"] = src
    env["IOTGW_MAX_QUEUED_MESSAGES"] = str(messages + 1000)
    env["IOTGW_MAX_QUEUED_BYTES"] = str((messages + 1000) * PAYLOAD)
    env["IOTGW_MAX_QUEUED_BYTES_TOTAL"] = str(sessions * (messages + 1000) * PAYLOAD)
    proc = subprocess.Popen(
        [*pinned(0), sys.executable, "-m", "gateway.cli", "run", "--mqtt-port", str(port),
         "--http-port", "0", "--coap-port", "0", "--allow-anonymous", "--acl", "open",
         "--data-dir", str(data), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
        cwd=src or None,  # `-m` puts the working directory first on the path
    )
    result: dict[str, Any] = {"sessions": sessions, "messages": messages, "payload": PAYLOAD}
    try:
        wait_for_tcp(port, proc=proc)  # type: ignore[arg-type]
        consumer = Consumer(port)
        park(port, sessions)
        base = measure(port, seconds, sessions)
        result.update({f"baseline_{k}": v for k, v in base.items()})
        result["baseline_rss_mb"] = round(rss_kb(proc.pid)["VmRSS"] / 1024, 1)
        started = time.monotonic()
        fill(port, sessions, messages)
        result["fill_s"] = round(time.monotonic() - started, 2)
        loaded = measure(port, seconds, sessions)
        result.update({f"loaded_{k}": v for k, v in loaded.items()})
        mem = rss_kb(proc.pid)
        result["loaded_rss_mb"] = round(mem["VmRSS"] / 1024, 1)
        result["peak_rss_mb"] = round(mem["VmHWM"] / 1024, 1)
        trickled = base["trickled"] + loaded["trickled"]
        queued = (sessions * messages + trickled) * PAYLOAD
        result["queued_payload_mb"] = round(queued / (1 << 20), 1)
        result["loaded_rss_over_queued"] = round(mem["VmRSS"] * 1024 / queued, 2)
        result["state_files_mb"] = round(
            sum(f.stat().st_size for f in data.glob("mqtt-state*")) / (1 << 20), 1
        )
        consumer.close()
        assert proc.poll() is None, "the gateway died"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    result["stderr_tail"] = err.decode()[-500:]
    return result


@pytest.mark.benchmark(group="sessions-offline-queues")
def test_offline_queues_do_not_slow_a_healthy_publisher(benchmark: Any, tmp_path: Path) -> None:
    if benchmark.disabled:
        sessions, messages, seconds = 2, 20, 1.5
    else:
        sessions = int(os.environ.get("IOTGW_BENCH_SESSIONS", "10"))
        messages = int(os.environ.get("IOTGW_BENCH_MESSAGES", "1000"))
        seconds = float(os.environ.get("IOTGW_BENCH_SECONDS", "15"))
    holder: dict[str, Any] = {}
    benchmark.pedantic(
        lambda: holder.update(run(tmp_path, sessions, messages, seconds)), rounds=1, iterations=1
    )
    benchmark.extra_info.update(holder)
    print(json.dumps(holder))
    assert holder["loaded_count"] > 0 and holder["baseline_count"] > 0
