"""The Grafana dashboard and the Prometheus alerting rules shipped in deploy/, checked with
Debian's `prometheus` package (installed by scripts/test.sh): `promtool check rules` and
`promtool test rules`, and a real Prometheus scraping a gateway (with a real Kafka) under a
little load of every kind, where every panel's query must return data."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import free_port, wait_for_tcp
from kafka_broker import KafkaBroker
from test_mqtt_server import PahoClient, RawClient

from gateway._native import coap

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "iotgw-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "iotgw-alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "iotgw-alerts-test.yml"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/test.sh installs Debian's prometheus")
    return path


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with the dashboard's variables filled in as
    Grafana would: the job chosen is `iotgw`, the rate window 30 s."""
    doc = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", "30s")
         .replace('"$job"', '"iotgw"'))
        for panel in doc["panels"]
        for target in panel["targets"]
    ]


def test_dashboard_covers_what_operators_watch() -> None:
    titles = {title for title, _ in panel_queries()}
    for wanted in ("MQTT connections", "Connect rate", "Messages in by protocol",
                   "Messages out by protocol", "Drops by reason", "Auth failures", "ACL denials",
                   "Shadow writes and conflicts", "Telemetry backlog", "Spool bytes",
                   "Kafka latency", "CoAP requests by code", "Process CPU", "Process memory",
                   "REST requests by route and status"):
        assert wanted in titles


def test_alert_rules_are_valid_and_fire_on_their_conditions() -> None:
    promtool = _binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


class Prometheus:
    """A real Prometheus server scraping one target every second, with the alerting rules."""

    def __init__(self, target_port: int, workdir: Path) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            "  - job_name: iotgw\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        self.proc = subprocess.Popen(
            [_binary("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_tcp(self.port, timeout=30, proc=self.proc)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while True:  # 503 until its storage is open
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5):
                    break
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Any]:
        result: list[Any] = self.get("/api/v1/query", query=expr)["result"]
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def gateway(gateway_factory: Any, kafka_broker: KafkaBroker, tmp_path: Path) -> Any:
    """A gateway with telemetry to Kafka and an ACL file denying `forbidden/#`."""
    acl = tmp_path / "acl.toml"
    acl.write_text('deny_publish = ["forbidden/#"]\n')
    gw = gateway_factory(allow_anonymous=True, acl="open", acl_file=str(acl), api_token="adm",
                         kafka=kafka_broker.bootstrap, kafka_ack_timeout_ms=10_000)
    gw.gateway.registry.add("d1", "right")
    return gw


@pytest.fixture
def prometheus(gateway: Any, tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(gateway.gateway.http.port, tmp_path)
    yield server
    server.stop()


@pytest.fixture
def traffic(gateway: Any, prometheus: Prometheus) -> Iterator[None]:
    """While the test runs, a little of every kind of traffic the panels show, a round every
    0.2 s: MQTT publishes in and out, a QoS 0 message dropped for an offline session, an ACL
    denial, a refused CONNECT, shadow writes and a conflict, CoAP requests."""
    http = gateway.gateway.http.port

    def rest(method: str, path: str, body: object, **headers: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{http}{path}", method=method, data=json.dumps(body).encode(),
            headers={"Authorization": "Bearer adm", "Content-Type": "application/json",
                     **headers})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    sleeper = PahoClient(gateway.mqtt_port, "sleeper", paho.MQTTv311, clean_session=False)
    sleeper.subscribe("news/#", 1)
    sleeper.close()  # its session stays: a QoS 0 message for it is dropped (offline_qos0)
    listener = PahoClient(gateway.mqtt_port, "listener", paho.MQTTv311)
    listener.subscribe("devices/+/telemetry", 0)
    device = PahoClient(gateway.mqtt_port, "pub1", paho.MQTTv311)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    stop = threading.Event()
    failures: list[BaseException] = []

    def round_(n: int) -> None:
        device.publish("devices/pub1/telemetry", json.dumps({"n": n}).encode(), qos=1)
        device.publish("news/today", b"x", qos=0)
        device.publish("forbidden/x", b"x", qos=0)  # denied by the ACL file (3.1.1: dropped)
        wrong = RawClient(gateway.mqtt_port)  # wrong password for a registered id
        assert wrong.connect("d1", username="d1", password=b"wrong").reason_code != 0
        wrong.close()
        assert rest("PATCH", "/v1/devices/d1/shadow", {"state": {"desired": {"n": n}}}) == 200
        assert rest("PATCH", "/v1/devices/d1/shadow", {"state": {"desired": {"n": -1}}},
                    **{"If-Match": '"0"'}) == 412  # a stale version: a conflict
        udp.sendto(coap.encode_request(coap.CON, coap.POST, n % 65536, b"t", "/telemetry/d2",
                                       [], b"{}"), ("127.0.0.1", gateway.coap_port))
        assert coap.decode(udp.recv(2048)).code == coap.CHANGED

    def run() -> None:
        n = 0
        try:
            while not stop.wait(0.2):
                round_(n)
                n += 1
        except BaseException as exc:  # surfaced by the test
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(30)
    for client in (device, listener):
        client.close()
    udp.close()
    assert not failures, failures


def test_every_panel_query_returns_data_from_a_real_prometheus(
    prometheus: Prometheus, traffic: None
) -> None:
    queries = panel_queries()
    missing: dict[str, str] = {}
    deadline = time.monotonic() + 30  # a rate needs two scrapes in its window
    for title, expr in queries:
        while True:
            result = prometheus.query(expr)
            values = [float(series["value"][1]) for series in result]
            if any(math.isfinite(v) for v in values) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not any(math.isfinite(v) for v in values):
            missing[title] = expr
    assert not missing, missing
    # The traffic shows as what it was, not only as some series:
    assert prometheus.query('iotgw_mqtt_dropped_messages_total{reason="offline_qos0"} > 0')
    assert prometheus.query("iotgw_mqtt_auth_failures_total > 0")
    assert prometheus.query('iotgw_coap_requests_total{code="2.04"} >= 5')
    assert prometheus.query("iotgw_telemetry_kafka_latency_seconds_count > 0")
    # Every alerting rule evaluates without error against a live gateway.
    groups = prometheus.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 8 and all(rule["health"] == "ok" for rule in rules), rules

