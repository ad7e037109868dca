"""iotgw-load's CoAP clients against a real CoAP server (aiocoap, started by the test)."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
from conftest import free_port
from test_loadtest_mqtt import count, iotgw_load, spawn_load, stats_csv

SCENARIOS = Path(__file__).parent / "scenarios"


class CountingResource(aiocoap.resource.Resource):  # type: ignore[misc]
    """Answers every request (2.04 to POST/PUT/PATCH, 2.05 to GET) and counts them by method
    and path; paths starting with /missing get 4.04."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.types: Counter[str] = Counter()
        self.queries: Counter[str] = Counter()

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        path = "/" + "/".join(request.opt.uri_path)
        self.requests[(str(request.code).split()[0], path)] += 1
        self.types[str(request.mtype)] += 1
        for q in request.opt.uri_query:
            self.queries[q] += 1
        if path.startswith("/missing"):
            return aiocoap.Message(code=aiocoap.NOT_FOUND)
        code = aiocoap.CONTENT if request.code == aiocoap.GET else aiocoap.CHANGED
        return aiocoap.Message(code=code, payload=b'{"ok":true}')

    def total(self, method: str, prefix: str) -> int:
        return sum(n for (m, p), n in self.requests.items() if m == method and p.startswith(prefix))


class CoapServer:
    """aiocoap on its own event loop in a thread, UDP only, on a free loopback port."""

    def __init__(self, site: Any = None, resource: CountingResource | None = None) -> None:
        self.port = free_port(kind=2)  # SOCK_DGRAM
        self.resource = resource or CountingResource()
        self.site = site or self.resource
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "aiocoap server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.context = await aiocoap.Context.create_server_context(
                self.site, bind=("127.0.0.1", self.port), transports=["udp6"]
            )
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.context.shutdown()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def coap_server() -> Iterator[CoapServer]:
    server = CoapServer()
    yield server
    server.stop()


def test_coap_bench_requests_are_counted_like_the_server_counted_them(
    coap_server: CoapServer, tmp_path: Path
) -> None:
    out = tmp_path / "coap"
    result = iotgw_load(
        tmp_path, "coap", "-H", f"coap://127.0.0.1:{coap_server.port}", "-c", "3", "-I", "20",
        "-L", "30", "-t", "/telemetry/%c", "--headless", "--csv", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stats = stats_csv(out)
    assert count(stats, "POST", "coap") == 90 == coap_server.resource.total("POST", "/telemetry/")
    assert {p for (_, p) in coap_server.resource.requests} == {
        "/telemetry/coap-1", "/telemetry/coap-2", "/telemetry/coap-3"}
    assert coap_server.resource.types == {"CON": 90}
    assert stats[("POST", "coap")]["Failure Count"] == "0"
    assert stats[("POST", "coap")]["99%"] != "N/A"


def test_coap_non_requests_get_matched_by_token(coap_server: CoapServer, tmp_path: Path) -> None:
    out = tmp_path / "non"
    result = iotgw_load(
        tmp_path, "coap", "-H", f"coap://127.0.0.1:{coap_server.port}", "-c", "2", "-I", "20",
        "-L", "25", "--non", "--method", "PUT", "--headless", "--csv", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert coap_server.resource.types == {"NON": 50}
    assert count(stats_csv(out), "PUT", "coap") == 50 == coap_server.resource.total("PUT", "/")


def test_coap_scenario_counts_match_the_server(coap_server: CoapServer, tmp_path: Path) -> None:
    out = tmp_path / "scn"
    result = iotgw_load(
        tmp_path, "-f", str(SCENARIOS / "coap_sensor.py"),
        "-H", f"coap://127.0.0.1:{coap_server.port}", "-c", "4", "-r", "100", "-d", "2s",
        "--headless", "--csv", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stats = stats_csv(out)
    res = coap_server.resource
    assert count(stats, "POST", "telemetry") == res.total("POST", "/telemetry/") > 0
    assert count(stats, "GET", "shadow get") == res.total("GET", "/shadow/") > 0
    assert count(stats, "PATCH", "shadow update") == res.total("PATCH", "/shadow/") == 4
    assert count(stats, "PING", "heartbeat") >= 4  # CoAP pings answered by RST
    assert all(r["Failure Count"] == "0" for r in stats.values())
    assert res.queries == {f"t=tok-{n}": res.queries[f"t=tok-{n}"] for n in range(1, 5)}


def test_coap_error_responses_are_failures_with_their_code(
    coap_server: CoapServer, tmp_path: Path
) -> None:
    out = tmp_path / "err"
    result = iotgw_load(
        tmp_path, "coap", "-H", f"coap://127.0.0.1:{coap_server.port}", "-c", "1", "-I", "10",
        "-L", "10", "-t", "/missing/%i", "--headless", "--csv", str(out),
    )
    assert result.returncode == 1
    with open(f"{out}_failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"Method": "POST", "Name": "coap", "Error": "4.04 Not Found",
                     "Occurrences": "10"}]


def test_coap_without_a_server_fails_fast(tmp_path: Path) -> None:
    out = tmp_path / "none"
    port = free_port(kind=2)
    result = iotgw_load(
        tmp_path, "coap", "-H", f"coap://127.0.0.1:{port}", "-c", "1", "-I", "100", "-L", "3",
        "--headless", "--csv", str(out), timeout=30,
    )
    assert result.returncode == 1
    stats = stats_csv(out)
    assert stats[("POST", "coap")]["Failure Count"] == "3"
    text = Path(f"{out}_failures.csv").read_text().lower()
    assert "refused" in text


class CommandsResource(aiocoap.resource.ObservableResource):  # type: ignore[misc]
    """GET /commands/{id} with Observe: the test pushes commands as notifications."""

    def __init__(self) -> None:
        super().__init__()
        self.body = b""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=self.body, content_format=50)

    def push(self, body: bytes) -> None:
        self.body = body
        self.updated_state()


def test_coap_devices_observe_commands_and_report_the_new_state(tmp_path: Path) -> None:
    commands = CommandsResource()
    counting = CountingResource()
    site = aiocoap.resource.Site()
    site.add_resource(["commands", "valve-1"], commands)
    site.add_resource(["commands", "valve-1", "set"], counting)  # the device's answers
    site.add_resource(["shadow", "valve-1"], counting)
    server = CoapServer(site, counting)
    scenario = tmp_path / "valve.py"
    scenario.write_text(
        "from loadtest import CoapDevice\n\n"
        "class Valve(CoapDevice):\n"
        "    def on_start(self):\n"
        "        self.observe_commands()\n"
    )
    out = tmp_path / "obs"
    proc = spawn_load(tmp_path, "-f", str(scenario), "-H", f"coap://127.0.0.1:{server.port}",
                      "-c", "1", "-d", "3s", "--headless", "--csv", str(out))
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.stdout.readline()  # one second in: the observation is registered
        for state in (True, False):  # the gateway's notification form (gateway/coap/)
            body = json.dumps({"name": "set", "payload": {"args": {"open": state}}}).encode()
            server.loop.call_soon_threadsafe(commands.push, body)
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        raise
    finally:
        server.stop()
    assert proc.returncode == 0, stdout + stderr
    stats = stats_csv(out)
    assert count(stats, "GET", "observe commands") == 1
    assert count(stats, "NOTIFY", "observe commands") == 2
    assert count(stats, "PATCH", "shadow update") == 2 == counting.total("PATCH", "/")  # under Site
    assert count(stats, "POST", "command response") == 2 == counting.total("POST", "/")
