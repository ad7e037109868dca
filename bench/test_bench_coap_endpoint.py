"""The CoAP endpoint under load: CON POST /telemetry/{id}?t=... with a 64-byte JSON payload,
answered 2.04 once the record is durable (the default file sink: one fdatasync per batch).

    .venv/bin/pytest bench/test_bench_coap_endpoint.py --benchmark-only -s

The gateway runs as its own process (`python -m gateway.cli run`, pinned to core 0 when
taskset exists); the load generator is a raw-socket UDP client on the native codec in this
process (pinned to core 1): SOCKETS sockets with WINDOW requests in flight each, a new request
for every answer. The figures are in extra_info: requests/s, the gateway's CPU microseconds
per request (whole process, and its event-loop thread alone: the file sink's writer thread
does the fsyncs) and the client's retransmissions (2 s without an answer). The timing itself
is only the fixed length of the run. Under --benchmark-disable the run lasts 0.5 s.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import free_port, pinned, stop_process

from gateway._native import coap
from gateway.auth import DeviceRegistry

SOCKETS = 32
WINDOW = 32
PAYLOAD = b'{"seq":1,"temp":21.5,"hum":40.2,"pressure":1013.25,"battery":97.1}'[:64].ljust(64)
assert len(PAYLOAD) == 64


def _cpu_seconds(path: str) -> float:
    """User + system CPU of a process (/proc/{pid}/stat) or thread (/proc/{pid}/task/{tid})."""
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Client(asyncio.DatagramProtocol):
    """One device socket: WINDOW CON POSTs in flight, a new one for each 2.04."""

    def __init__(self, device: str, token: str, stats: dict[str, int],
                 anchor: bool = False) -> None:
        self.method = coap.POST
        self.options = [
            (coap.URI_PATH, "telemetry"), (coap.URI_PATH, device),
            (coap.CONTENT_FORMAT, coap.JSON), (coap.URI_QUERY, f"t={token}"),
        ]
        if anchor:  # libcoap's coap-server: a PUT its example resource stores and answers 2.04
            self.method = coap.PUT
            self.options = [(coap.URI_PATH, "example_data"), (coap.CONTENT_FORMAT, coap.JSON)]
        self.stats = stats
        self.transport: Any = None
        self.mid = 0
        self.pending: dict[bytes, tuple[float, bytes]] = {}  # token -> (sent at, datagram)
        self.running = True

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send_one(self) -> None:
        if not self.running or self.mid >= 0xFFFF:  # message ids are not reused in one run
            return
        self.mid += 1
        token = self.mid.to_bytes(2, "big")
        data = coap.encode(coap.CON, self.method, self.mid, token, self.options, PAYLOAD)
        self.pending[token] = (time.monotonic(), data)
        self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        msg = coap.decode(data)
        if msg.type == coap.CON:  # a separate response: acknowledge it
            self.transport.sendto(coap.encode_empty(coap.ACK, msg.mid))
        if msg.code == coap.EMPTY:
            return
        if self.pending.pop(msg.token, None) is None:
            return  # a duplicate answer to a retransmission
        if msg.code == coap.CHANGED:
            self.stats["ok"] += 1
        elif msg.code == coap.SERVICE_UNAVAILABLE:  # telemetry over high water: shed, by design
            self.stats["shed"] += 1
        else:
            self.stats["errors"] += 1
            self.stats[f"code_{msg.code}"] = self.stats.get(f"code_{msg.code}", 0) + 1
        self.send_one()

    def retransmit(self, now: float) -> None:
        for token, (sent, data) in list(self.pending.items()):
            if now - sent > 2.0:
                self.pending[token] = (now, data)
                self.stats["retransmissions"] += 1
                self.transport.sendto(data)


async def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """A CoAP ping (empty CON) is answered with RST once the endpoint listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the gateway exited"
            sock.sendto(coap.encode_empty(coap.CON, 1), ("127.0.0.1", port))
            try:
                if coap.decode(sock.recv(64)).type == coap.RST:
                    return
            except TimeoutError:
                await asyncio.sleep(0.1)
    finally:
        sock.close()
    raise TimeoutError("the CoAP endpoint did not answer a ping")


async def _load(port: int, pid: int, seconds: float, anchor: bool = False) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats = {"ok": 0, "errors": 0, "shed": 0, "retransmissions": 0}
    clients: list[Client] = []
    for i in range(SOCKETS):
        _, client = await loop.create_datagram_endpoint(
            lambda i=i: Client(f"dev-{i}", f"tok-{i}", stats, anchor),
            remote_addr=("127.0.0.1", port),
        )
        clients.append(client)
    # Warm-up: the first request of each device pays its PBKDF2 token check once (one at a
    # time: a check that finds others of the same address waiting may answer 5.03 busy).
    for c in clients:
        before = stats["ok"]
        while stats["ok"] == before:
            c.send_one()
            await asyncio.sleep(0.02)
    stats.update(ok=0, errors=0, shed=0, retransmissions=0)
    proc_stat, loop_stat = f"/proc/{pid}/stat", f"/proc/{pid}/task/{pid}/stat"
    cpu0, loop_cpu0 = _cpu_seconds(proc_stat), _cpu_seconds(loop_stat)
    start = time.monotonic()
    for c in clients:
        for _ in range(WINDOW):
            c.send_one()
    end = start + seconds
    while (now := time.monotonic()) < end:
        await asyncio.sleep(min(0.25, end - now))
        for c in clients:
            c.retransmit(time.monotonic())
    elapsed = time.monotonic() - start
    done = stats["ok"]
    cpu, loop_cpu = _cpu_seconds(proc_stat) - cpu0, _cpu_seconds(loop_stat) - loop_cpu0
    for c in clients:
        c.running = False
    await asyncio.sleep(0.2)
    for c in clients:
        c.transport.close()
    return {
        "requests": done,
        "errors": stats["errors"],
        "shed_5_03": stats["shed"],
        **{k: v for k, v in stats.items() if k.startswith("code_")},
        "client_retransmissions": stats["retransmissions"],
        "seconds": round(elapsed, 3),
        "requests_per_s": round(done / elapsed),
        "in_flight": SOCKETS * WINDOW,
        "gateway_cpu_us_per_request": round(cpu / max(1, done) * 1e6, 2),
        "loop_thread_cpu_us_per_request": round(loop_cpu / max(1, done) * 1e6, 2),
    }


@pytest.mark.benchmark(group="coap-endpoint-con-post-telemetry")
def test_con_post_telemetry_throughput(benchmark: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "iotgw"
    registry = DeviceRegistry(data_dir)
    for i in range(SOCKETS):
        registry.add(f"dev-{i}", f"tok-{i}")
    port = free_port(socket.SOCK_DGRAM)
    cmd = [
        sys.executable, "-m", "gateway.cli", "run", "--mqtt-port", "0", "--http-port", "0",
        "--coap-port", str(port), "--data-dir", str(data_dir), "--log-level", "warning",
    ]
    proc = subprocess.Popen([*pinned(0), *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    affinity = os.sched_getaffinity(0)
    if len(affinity) > 1:
        os.sched_setaffinity(0, {sorted(affinity)[1]})
    result: dict[str, Any] = {}
    seconds = 0.5 if benchmark.disabled else 5.0

    async def run() -> None:
        await _wait_ready(port, proc)
        result.update(await _load(port, proc.pid, seconds))

    try:
        import uvloop

        benchmark.pedantic(lambda: uvloop.run(run()), rounds=1, iterations=1)
    finally:
        os.sched_setaffinity(0, affinity)
        alive = proc.poll() is None
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert alive, stderr.decode(errors="replace")
    assert result["requests"] > 0 and result["errors"] == 0, result
    anchor = _coap_server_anchor(seconds)
    assert anchor["requests"] > 0 and anchor["errors"] == 0, anchor
    result["coap_server_requests_per_s"] = anchor["requests_per_s"]
    result["coap_server_cpu_us_per_request"] = anchor["gateway_cpu_us_per_request"]
    result["vs_coap_server"] = round(result["requests_per_s"] / anchor["requests_per_s"], 3)
    benchmark.extra_info.update(result)
    print("coap endpoint", result)


def _coap_server_anchor(seconds: float) -> dict[str, Any]:
    """The same load against libcoap's coap-server (Debian's libcoap3-bin), same cores: a
    CON PUT /example_data with the same payload, stored in memory and answered 2.04
    piggybacked. What it does not do: authenticate, or wait for a disk."""
    binary = shutil.which("coap-server-notls") or shutil.which("coap-server")
    if binary is None:
        pytest.fail("libcoap3-bin is not installed: scripts/test.sh installs it")
    port = free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen([*pinned(0), binary, "-A", "127.0.0.1", "-p", str(port), "-v", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    affinity = os.sched_getaffinity(0)
    if len(affinity) > 1:
        os.sched_setaffinity(0, {sorted(affinity)[1]})
    try:
        import uvloop

        async def run() -> dict[str, Any]:
            await _wait_ready(port, proc)
            return await _load(port, proc.pid, seconds, anchor=True)

        return uvloop.run(run())
    finally:
        os.sched_setaffinity(0, affinity)
        stop_process(proc, 10)
