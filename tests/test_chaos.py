"""The chaos suite (iotgw-load chaos): its parts (Toxiproxy client, UDP impairment relay, fault
schedules) against the real things, and a short chaos run end to end."""

from __future__ import annotations

import asyncio
import csv
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from test_loadtest_mqtt import count, iotgw_load, spawn_load, stats_csv, subscriber_factory  # noqa: F401

from loadtest.chaos import check_shadows, judge, parse_chaos_fail_on, summarize
from loadtest.chaosfleet import Ledger
from loadtest.faults import BUILTIN, KINDS, ScheduleError, load_schedule, parse_schedule
from loadtest.stats import Collector
from loadtest.toxiproxy import Toxiproxy, ToxiproxyError, ToxiproxyServer, find_binary
from loadtest.udprelay import NONE, Impairment, UdpRelay


def test_loadtest_shadow_reports_are_accepted_by_iotgw(
    gateway_factory: Any, subscriber_factory: Any, tmp_path: Path  # noqa: F811
) -> None:
    """Shadow reports of iotgw-load devices (MQTT and CoAP) are valid iotgw shadow updates:
    accepted and stored, none rejected."""
    gw = gateway_factory(allow_anonymous=True, acl="open")
    sub = subscriber_factory(gw.mqtt_port, ["$shadow/+/update/accepted",
                                            "$shadow/+/update/rejected"])
    out = iotgw_load(tmp_path, "--profile", "shadow", "-H", f"mqtt://127.0.0.1:{gw.mqtt_port}",
                     "-c", "3", "-r", "100", "-d", "2s", "--headless", "--csv",
                     str(tmp_path / "mqtt"))
    assert out.returncode == 0, out.stderr
    out = iotgw_load(tmp_path, "--profile", "coap", "-H", f"coap://127.0.0.1:{gw.coap_port}",
                     "-c", "4", "-r", "100", "-d", "2s", "--headless", "--csv",
                     str(tmp_path / "coap"), "--fail-on", "errors>1000")
    assert out.returncode == 0, out.stderr
    sub.settle()
    assert sub.kinds["shadow"] > 0
    assert not [t for t in sub.topics if t.endswith("/rejected")], sub.payloads[:3]
    stats = stats_csv(tmp_path / "coap")
    patches = stats[("PATCH", "shadow update")]
    assert int(patches["Request Count"]) >= 1
    assert patches["Failure Count"] == "0"
    assert count(stats_csv(tmp_path / "mqtt"), "PUBLISH", "shadow update") > 0
    assert [t for t in sub.topics if t.endswith("/accepted")]


# ---- Toxiproxy -------------------------------------------------------------------------------


@pytest.fixture
def toxiproxy(tmp_path: Path) -> Iterator[Toxiproxy]:
    binary = find_binary()
    if binary is None:
        pytest.fail("toxiproxy-server is missing: scripts/test.sh builds it into .cache/go-bin")
    server = ToxiproxyServer(binary, free_port(), tmp_path / "toxiproxy.log")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP echo server on a free loopback port (a thread per connection)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield port
    listener.close()


def _round_trip(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(b"ping")
        assert s.recv(16) == b"ping"
        return time.monotonic() - t0


def test_toxiproxy_client_adds_latency_and_cuts_the_link(
    toxiproxy: Toxiproxy, echo_server: int
) -> None:
    listen = free_port()
    proxy = toxiproxy.create("echo", f"127.0.0.1:{listen}", f"127.0.0.1:{echo_server}")
    assert proxy.port == listen and proxy.enabled
    assert _round_trip(listen) < 0.2
    toxiproxy.add_toxic("echo", "slow", "latency", {"latency": 300, "jitter": 0})
    assert [t["name"] for t in toxiproxy.toxics("echo")] == ["slow"]
    assert _round_trip(listen) >= 0.3
    toxiproxy.remove_toxic("echo", "slow")
    assert _round_trip(listen) < 0.2
    toxiproxy.set_enabled("echo", False)  # a partition: new connections are refused
    with pytest.raises(OSError):
        _round_trip(listen)
    toxiproxy.reset()  # everything enabled again, no toxics
    assert toxiproxy.proxies()["echo"].enabled
    assert _round_trip(listen) < 0.2
    with pytest.raises(ToxiproxyError, match="unknown toxic type"):
        toxiproxy.add_toxic("echo", "x", "nonsense", {})
    with pytest.raises(ToxiproxyError, match="404"):
        toxiproxy.remove_toxic("no-such-proxy", "slow")


# ---- the UDP impairment relay ----------------------------------------------------------------


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[bytes, float]] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append((data, time.monotonic()))


async def _relay_exchange(impairment: Impairment, n: int = 40) -> tuple[list[bytes], UdpRelay,
                                                                        float]:
    """Send n datagrams through a relay to a UDP echo server: (what came back in order, relay,
    seconds from the first send to the first answer)."""
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    relay = UdpRelay(echo.get_extra_info("sockname"), impairment)
    port = await relay.start()
    client = _Client()
    transport, _ = await loop.create_datagram_endpoint(lambda: client,
                                                       remote_addr=("127.0.0.1", port))
    t0 = time.monotonic()
    for i in range(n):
        transport.sendto(b"%03d" % i)
    await asyncio.sleep(0.6)
    transport.close()
    relay.close()
    echo.close()
    first = client.got[0][1] - t0 if client.got else float("inf")
    return [d for d, _ in client.got], relay, first


def test_udp_relay_impairs_datagrams_as_told() -> None:
    async def main() -> None:
        got, relay, first = await _relay_exchange(NONE)
        assert got == [b"%03d" % i for i in range(40)]
        got, relay, _ = await _relay_exchange(Impairment(drop=1.0))
        assert got == [] and relay.counters["dropped"] == 40
        got, relay, _ = await _relay_exchange(Impairment(duplicate=1.0))
        assert sorted(got) == sorted([b"%03d" % i for i in range(40)] * 4)  # both ways
        got, relay, first = await _relay_exchange(Impairment(delay_ms=100))
        assert len(got) == 40 and first >= 0.2  # 100 ms each way
        got, relay, _ = await _relay_exchange(Impairment(reorder=0.5, reorder_ms=50))
        assert sorted(got) == [b"%03d" % i for i in range(40)] and got != sorted(got)
        assert relay.counters["reordered"] > 0
        got, relay, _ = await _relay_exchange(Impairment(drop=0.5), n=200)
        assert 20 < len(got) < 120  # 0.25 of 200 expected back (dropped either way)

    asyncio.run(main())
    with pytest.raises(ValueError, match="share from 0 to 1"):
        Impairment(drop=1.5)
    with pytest.raises(ValueError, match="unknown impairment"):
        Impairment.from_dict({"loss": 0.1})


# ---- schedules and the verdict -------------------------------------------------------------


def test_schedules_parse_and_bad_ones_are_one_line_errors(tmp_path: Path) -> None:
    for name in BUILTIN:
        s = load_schedule(name)
        assert s.faults and all(f.end <= s.duration for f in s.faults)
    full = load_schedule("full")
    kinds = {f.kind for f in full.faults}
    assert kinds == set(KINDS)  # every kind of fault
    partitions = [f for f in full.faults if f.kind == "partition" and f.link == "device"]
    assert [f.at for f in partitions] == [80, 110, 140]  # every 30 s, 3 times
    bad = {
        'duration = "10s"\n[[fault]]\nkind = "explode"\nat = "1s"\n': "kind 'explode'",
        'duration = "10s"\n[[fault]]\nkind = "latency"\nat = "1s"\n': "needs link",
        'duration = "10s"\n[[fault]]\nkind = "latency"\nlink = "device"\nat = "8s"\nfor = "5s"'
        "\n": "after the run",
        'duration = "10s"\n[[fault]]\nkind = "impair"\nlink = "device"\nat = "1s"\n':
            "coap link only",
        'duration = "10s"\n[[fault]]\nkind = "latency"\nlink = "kafka"\nat = "1s"\nrate = 3\n':
            "unknown setting 'rate'",
        '[[fault]]\nkind = "flood"\nat = "1s"\n': "no duration",
        "duration = ": "Invalid",
    }
    for text, message in bad.items():
        with pytest.raises(ScheduleError, match=message):
            parse_schedule(text, "x.toml")
    path = tmp_path / "bad.toml"
    path.write_text('duration = "10s"\n[[fault]]\nkind = "explode"\nat = "1s"\n')
    out = iotgw_load(tmp_path, "chaos", "--schedule", str(path))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "kind 'explode'" in out.stderr
    out = iotgw_load(tmp_path, "chaos", "--fail-on", "p99:nothing>3ms")
    assert out.returncode == 2 and "no traffic kind 'nothing'" in out.stderr


class _Dev:
    def __init__(self, device_id: str, acked: list[int]) -> None:
        self.id = device_id
        self.ledger = Ledger()
        self.ledger.telemetry_acked = [(seq, 0.0) for seq in acked]


def test_an_acknowledged_message_missing_from_kafka_is_lost_and_fails_the_run() -> None:
    collector = Collector()
    devices = [_Dev("a", [1, 2, 3]), _Dev("b", [1, 2])]
    shadows = {"devices": 0, "converged": True, "diverged": []}
    seen = {("a", 1): 1, ("a", 2): 2, ("a", 3): 1, ("b", 1): 1, ("b", 2): 1, ("b", 9): 1}
    summary = summarize(collector, [], devices, seen, shadows, {})
    assert summary["lost"] == 0 and summary["duplicates"] == 1
    assert summary["kinds"]["telemetry"]["acknowledged"] == 5
    assert judge(summary, parse_chaos_fail_on(None)) == []
    assert judge(summary, parse_chaos_fail_on("duplicates>0")) == ["duplicates = 1 > 0"]
    del seen[("b", 2)]
    summary = summarize(collector, [], devices, seen, shadows, {})
    assert summary["lost"] == 1
    assert judge(summary, parse_chaos_fail_on(None)) == ["lost = 1 > 0"]
    shadows = {"devices": 1, "converged": False, "diverged": [{"device": "c", "problem": "x"}]}
    summary = summarize(collector, [], devices[:1], {("a", s): 1 for s in (1, 2, 3)}, shadows,
                        {})
    assert judge(summary, []) == ["shadows did not converge: 1 devices"]


# ---- end to end ------------------------------------------------------------------------------


@pytest.mark.chaos
def test_chaos_smoke_run_loses_nothing_acknowledged_and_converges(tmp_path: Path) -> None:
    """`iotgw-load chaos --schedule smoke`: two gateway workers, Redis, Kafka and Toxiproxy
    started by the command; MQTT delayed and CoAP lossy, Kafka stopped, a worker SIGKILLed,
    telemetry flooding while Kafka is slow. Every acknowledged telemetry message is in Kafka,
    every shadow holds its last acknowledged report, urgent traffic keeps its priority."""
    out = iotgw_load(tmp_path, "chaos", "--schedule", "smoke", "-c", "10", "--json",
                     str(tmp_path / "chaos.json"), "--html", str(tmp_path / "chaos.html"),
                     "--fail-on", "priority>3", "-q", timeout=240)
    s = json.loads((tmp_path / "chaos.json").read_text())
    assert out.returncode == 0, (out.stdout, out.stderr[-3000:])
    assert s["passed"] and s["failed"] == []
    assert s["lost"] == 0 and s["converged"]
    assert s["kinds"]["telemetry"]["acknowledged"] > 300
    assert s["kinds"]["flood"]["acknowledged"] > 300
    assert s["shadow"]["devices"] >= 2
    assert s["commands"]["answered"] > 0
    for kind in ("heartbeat", "telemetry", "command", "shadow"):
        assert s["p99_ms"][kind] is not None
    windows = {w["name"]: w for w in s["windows"]}
    assert all(w["error"] is None for w in s["windows"])
    # each fault bit: the delay is seen, the relay impaired, acks waited for the spool,
    # the devices of the killed worker reconnected
    assert windows["latency device (latency_ms=200, jitter_ms=50)"]["kinds"]["heartbeat"][
        "p50_ms"] >= 150
    assert s["coap_relay"]["dropped"] > 0 and s["coap_relay"]["duplicated"] > 0
    assert windows["kafka-stop"]["kinds"]["telemetry"]["max_ms"] >= 1000
    assert windows["worker-kill"]["reconnects"]["count"] >= 1
    assert s["reconnects"]["p99_ms"] is not None
    for urgent in ("command", "shadow"):
        assert s["priority"][urgent]["within_bound"], s["priority"]
    report = (tmp_path / "chaos.html").read_text()
    assert "<title>kafka-stop</title>" in report and "Chaos summary" in report


def test_devices_reconnect_once_each_after_connections_are_reset(
    gateway_factory: Any, toxiproxy: Toxiproxy, tmp_path: Path
) -> None:
    """Connections reset (also while connecting) must leave one connection per device: a
    device that scheduled two reconnects ran two clients with one client id, which took each
    other's session over, again and again."""
    gw = gateway_factory(allow_anonymous=True, acl="open")
    listen = free_port()
    toxiproxy.create("gw", f"127.0.0.1:{listen}", f"127.0.0.1:{gw.mqtt_port}")
    load = spawn_load(tmp_path, "--profile", "commands", "-H", f"mqtt://127.0.0.1:{listen}",
                      "-c", "4", "-r", "100", "-d", "10s", "--headless", "--csv",
                      str(tmp_path / "run"), "--fail-on", "errors>100000")
    time.sleep(2.5)
    toxiproxy.add_toxic("gw", "reset-down", "reset_peer", {"timeout": 0})
    toxiproxy.add_toxic("gw", "reset-up", "reset_peer", {"timeout": 0}, stream="upstream")
    time.sleep(2.5)
    toxiproxy.reset()
    _, err = load.communicate(timeout=60)
    assert load.returncode == 0, err
    with open(tmp_path / "run_failures.csv") as f:
        lost = sum(int(r["Occurrences"]) for r in csv.DictReader(f)
                   if r["Method"] == "CONNECT" and r["Name"] == "connection")
    # each device lost its connection at the reset (4), and none after it came back
    assert lost <= 8, lost
    stats = stats_csv(tmp_path / "run")
    assert count(stats, "COMMAND", "round trip") > 0
    connects = int(stats[("CONNECT", "connect")]["Request Count"]) - int(
        stats[("CONNECT", "connect")]["Failure Count"])
    assert connects <= 4 * 2 + 1  # the devices, once more each, and the command issuer


@pytest.mark.chaos
def test_chaos_against_a_deployment_it_did_not_start(
    gateway_factory: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    """`--host ...`: the fleet against a gateway started elsewhere (here: by the test, with the
    session's Kafka and SQLite shadows), CoAP impaired by the relay; the same verdict."""
    gw = gateway_factory(allow_anonymous=True, acl="open", kafka=kafka_broker.bootstrap,
                         api_token="chaos-test-token")
    schedule = tmp_path / "coap.toml"
    schedule.write_text('duration = "12s"\n[[fault]]\nkind = "impair"\nlink = "coap"\n'
                        'at = "4s"\nfor = "4s"\ndrop = 0.3\nduplicate = 0.2\n')
    args = ["chaos", "--schedule", str(schedule), "-c", "6", "-H",
            f"mqtt://127.0.0.1:{gw.mqtt_port}", "--coap-host", f"coap://127.0.0.1:{gw.coap_port}",
            "--kafka", kafka_broker.bootstrap, "--http",
            f"http://127.0.0.1:{gw.gateway.http.port}", "--api-token", "chaos-test-token"]
    out = iotgw_load(tmp_path, *args, "--json", str(tmp_path / "out.json"), "-q", timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr[-3000:])
    s = json.loads((tmp_path / "out.json").read_text())
    assert s["lost"] == 0 and s["converged"] and s["shadow"]["devices"] >= 1
    assert s["kinds"]["telemetry"]["acknowledged"] > 50
    assert s["coap_relay"]["dropped"] > 0
    # process faults and unproxied links need what only a started deployment has
    out = iotgw_load(tmp_path, *args, "--schedule", "smoke", timeout=30)
    assert out.returncode == 2 and "needs the deployment this command starts" in out.stderr
    out = iotgw_load(tmp_path, "chaos", "-H", "mqtt://127.0.0.1:1", timeout=30)
    assert out.returncode == 2 and "--host needs --coap-host, --kafka, --http, --api-token" \
        in out.stderr


def test_shadow_check_finds_stale_and_lost_writes(gateway_factory: Any) -> None:
    """check_shadows against a real gateway's REST API: a stored report that is not the last
    acknowledged one, and fewer writes than acknowledged, are both divergence."""
    import urllib.request

    gw = gateway_factory(allow_anonymous=True, acl="open", api_token="t0k")
    url = f"http://127.0.0.1:{gw.gateway.http.port}"
    for n in (1, 2):  # two writes: version 2
        req = urllib.request.Request(
            f"{url}/v1/devices/dev-{n}/shadow", method="PATCH",
            data=json.dumps({"state": {"reported": {"n": n}}}).encode(),
            headers={"Authorization": "Bearer t0k", "Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()
    req = urllib.request.Request(
        f"{url}/v1/devices/dev-1/shadow", method="PATCH",
        data=json.dumps({"state": {"reported": {"n": 5}}}).encode(),
        headers={"Authorization": "Bearer t0k", "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()

    def device(device_id: str, reports: list[dict[str, Any]], acked: int) -> Any:
        d = _Dev(device_id, [])
        d.ledger.reports = [(i + 1, r) for i, r in enumerate(reports)]
        d.ledger.report_acked = d.ledger.reports_acked = acked
        return d

    ok = device("dev-1", [{"n": 1}, {"n": 5}], 2)
    later = device("dev-1", [{"n": 1}, {"n": 5}], 1)  # the last one sent, never acknowledged
    stale = device("dev-2", [{"n": 2}, {"n": 3}], 2)  # acknowledged {"n": 3}, stored {"n": 2}
    lost = device("dev-1", [{"n": 1}, {"n": 2}, {"n": 5}], 3)  # 3 acknowledged, version 2
    result = check_shadows([url], [ok, later], "t0k")
    assert result["converged"] and result["devices"] == 2
    result = check_shadows([url], [stale, lost], "t0k")
    problems = {x["device"]: x["problem"] for x in result["diverged"]}
    assert not result["converged"]
    assert "not the last acknowledged report" in problems["dev-2"]
    assert "a lost write" in problems["dev-1"]


def test_coap_client_ends_an_observation_it_gave_up_with_rst(gateway_factory: Any) -> None:
    """The chaos fleet renews its command observations; the one given up must end on the
    gateway (its next notification answered with RST), not linger and notify forever."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from loadtest.coap_client import CoapClient
    from loadtest.runtime import Runtime, Settings

    gw = gateway_factory(allow_anonymous=True, acl="open")
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="backend")
    pub.connect("127.0.0.1", gw.mqtt_port)
    pub.loop_start()

    def observers() -> int:
        return int(gw.call(lambda: len(gw.gateway.coap.observers)))

    async def main() -> list[Any]:
        rt = Runtime(Settings(coap_host="127.0.0.1", coap_port=gw.coap_port))
        rt.start_sweeps()
        client = CoapClient(rt)
        await client.start()
        got: list[Any] = []
        client.request(1, "/commands/dev-1", name="obs", observe=got.append)  # GET

        async def until(cond: Any) -> None:
            for _ in range(100):
                if cond():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("timed out")

        await until(lambda: observers() == 1 and got)
        pub.publish("devices/dev-1/commands/open", b'{"a":1}', qos=1).wait_for_publish(5)
        await until(lambda: len(got) == 2)  # the GET's answer, then the notification
        client.forget("obs")
        pub.publish("devices/dev-1/commands/open", b'{"a":2}', qos=1).wait_for_publish(5)
        await until(lambda: observers() == 0)
        client.close()
        rt.close()
        return got

    try:
        got = asyncio.run(main())
    finally:
        pub.loop_stop()
        pub.disconnect()
    assert len(got) == 2
