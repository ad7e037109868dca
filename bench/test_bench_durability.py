"""The file sink through a full disk, in one run: QoS 1 telemetry from raw MQTT devices into a
gateway (in process, its own uvloop thread) whose telemetry dir is a real size-limited tmpfs.

- phase `unloaded`: plenty of space. Records/s acknowledged, PUBACK latency p50/p99.
- phase `fill_free`: a ballast file leaves a little space; the load fills it mid-stream; the sink
  blocks (writes fail with ENOSPC, nothing is acknowledged); after `hold` seconds the ballast is
  deleted and the sink catches up. Records/s over the whole phase, PUBACK p50/p99/max, how long
  the sink was blocked, the first PUBACK after space returned, and the write errors counted.

Afterwards every acknowledged record must be on disk exactly once, with no skipped range.
Needs root (`mount -t tmpfs`); skipped otherwise. Under --benchmark-disable each phase runs for
a fraction of a second, so it cannot rot. Run for figures:

    .venv/bin/pytest bench/test_bench_durability.py --benchmark-only -s
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import RunningGateway

from gateway._native import mqtt
from gateway.telemetry.filesink import read_records


def percentiles(values: list[float]) -> dict[str, float]:
    """Milliseconds at p50, p99 and the maximum (nearest rank)."""
    if not values:
        return {}
    ordered = sorted(values)

    def at(p: float) -> float:
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return round(ordered[index] * 1000, 2)

    return {"p50_ms": at(50), "p99_ms": at(99), "max_ms": round(ordered[-1] * 1000, 2)}


class Load:
    """Devices on raw sockets, each keeping `window` QoS 1 PUBLISHes in flight; every PUBACK is
    logged as (ack time, latency, device index, message number)."""

    def __init__(self, port: int, devices: int, window: int, size: int) -> None:
        self.port = port
        self.devices = devices
        self.window = window
        self.size = size
        self.acks: list[tuple[float, float, int, int]] = []
        self.running = True

    async def device(self, index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        framer = mqtt.Framer(version=4)
        writer.write(mqtt.Connect(client_id=f"bench{index}", protocol_level=4).encode(4))
        packets: list[Any] = []
        while not packets:
            packets = [p.detach() for p in framer.feed(await reader.read(65536))]
        assert packets[0].type == mqtt.CONNACK and packets[0].reason_code == 0
        topic = f"devices/bench{index}/telemetry"
        inflight: dict[int, tuple[float, int]] = {}
        number = 0
        clock = time.perf_counter

        def top_up() -> None:
            nonlocal number
            while self.running and len(inflight) < self.window:
                packet_id = number % 65535 + 1
                payload = (b"%d:%d " % (index, number)).ljust(self.size, b".")
                inflight[packet_id] = (clock(), number)
                writer.write(mqtt.encode_publish(topic, payload, qos=1, packet_id=packet_id))
                number += 1

        top_up()
        while inflight:
            data = await reader.read(65536)
            if not data:
                return
            now = clock()
            for packet in framer.feed(data):
                if packet.type == mqtt.PUBACK:
                    sent, n = inflight.pop(packet.packet_id)
                    self.acks.append((now, now - sent, index, n))
            top_up()
        writer.close()

    def between(self, start: float, end: float) -> list[tuple[float, float, int, int]]:
        return [a for a in self.acks if start <= a[0] < end]


def _mount(directory: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _free(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


@pytest.mark.benchmark(group="durability")
def test_file_sink_through_a_full_disk(benchmark: Any, tmp_path: Path) -> None:
    quick = benchmark.disabled
    devices, window, size = (4, 16, 200) if quick else (8, 32, 200)
    unloaded_s, hold_s, after_s = (0.5, 0.5, 0.5) if quick else (5.0, 2.0, 5.0)
    data = tmp_path / "data"
    telemetry = data / "telemetry"
    if not _mount(telemetry, "256m"):
        pytest.skip("needs root and `mount -t tmpfs` for a real size-limited file system")
    gw: RunningGateway | None = None
    results: dict[str, Any] = {}
    try:
        gw = RunningGateway(
            data_dir=str(data), mqtt_port=0, http_port=0, coap_port=0,
            allow_anonymous=True, acl="open",
        )
        registry = gw.gateway.metrics.registry

        def blocked() -> bool:
            return registry.get_sample_value("iotgw_telemetry_sink_blocked", {"lane": "low"}) == 1

        load = Load(gw.mqtt_port, devices, window, size)
        marks: dict[str, float] = {}

        async def scenario() -> None:
            clock = time.perf_counter
            tasks = [asyncio.create_task(load.device(i)) for i in range(devices)]
            marks["start"] = clock()
            await asyncio.sleep(unloaded_s)
            marks["fill"] = clock()
            ballast = telemetry / "ballast"
            ballast.write_bytes(b"\0" * max(0, _free(telemetry) - (256 << 10)))
            deadline = clock() + 30
            while not blocked():
                assert clock() < deadline, "the disk never filled"
                await asyncio.sleep(0.005)
            marks["blocked"] = clock()
            await asyncio.sleep(hold_s)
            ballast.unlink()
            marks["free"] = clock()
            while blocked():
                assert clock() < deadline + 30, "the sink never recovered"
                await asyncio.sleep(0.005)
            marks["recovered"] = clock()
            await asyncio.sleep(after_s)
            load.running = False
            marks["end"] = clock()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)

        benchmark.pedantic(lambda: asyncio.run(scenario()), rounds=1, iterations=1)

        unloaded = load.between(marks["start"], marks["fill"])
        cycle = load.between(marks["fill"], marks["end"])
        during_block = load.between(marks["blocked"] + 0.05, marks["free"])
        after_free = load.between(marks["free"], marks["end"])
        errors = registry.get_sample_value(
            "iotgw_telemetry_write_errors_total", {"lane": "low", "reason": "ENOSPC"}
        )
        results = {
            "devices": devices,
            "window": window,
            "payload_bytes": size,
            "unloaded": {
                "records_per_s": round(len(unloaded) / (marks["fill"] - marks["start"])),
                **percentiles([a[1] for a in unloaded]),
            },
            "fill_free": {
                "records_per_s": round(len(cycle) / (marks["end"] - marks["fill"])),
                **percentiles([a[1] for a in cycle]),
                "blocked_s": round(marks["free"] - marks["blocked"], 2),
                "pubacks_while_blocked": len(during_block),
                "first_puback_after_free_ms": round(
                    (after_free[0][0] - marks["free"]) * 1000, 1
                ) if after_free else None,
                "enospc_write_errors": errors,
            },
        }
    finally:
        if gw is not None:
            gw.stop()

    benchmark.extra_info.update(results)
    print("\ndurability", json.dumps(results))
    assert results["fill_free"]["pubacks_while_blocked"] == 0
    skipped: list[Any] = []
    stored = [r.payload.split(b" ")[0] for r in read_records(telemetry, on_skip=skipped.append)]
    assert not skipped and len(stored) == len(set(stored))  # nothing torn, nothing twice
    acked = {b"%d:%d" % (a[2], a[3]) for a in load.acks}
    assert acked <= set(stored)  # every acknowledged record is on disk


@pytest.fixture(autouse=True)
def _unmount(tmp_path: Path) -> Any:
    yield
    telemetry = tmp_path / "data" / "telemetry"
    if os.path.ismount(telemetry):
        subprocess.run(["umount", "-l", str(telemetry)], check=False)
