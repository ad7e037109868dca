"""iotgw-load against real MQTT servers (Mosquitto, the iotgw gateway): short headless runs whose
CSV/HTML outputs are checked against what a paho-mqtt subscriber saw."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import free_port, stop_process
from paho.mqtt.enums import CallbackAPIVersion

SCENARIOS = Path(__file__).parent / "scenarios"
THERMOSTAT = str(SCENARIOS / "thermostat.py")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTGW_LOAD_")}
    env["PYTHONPATH"] = str(Path(__file__).parent.parent)
    return env


def iotgw_load(cwd: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (a subprocess), in `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(),
    )


def spawn_load(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "loadtest", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )


def stats_csv(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


def count(stats: dict[tuple[str, str], dict[str, str]], type_: str, name: str) -> int:
    row = stats.get((type_, name))
    return int(row["Request Count"]) if row else 0


def classify(topic: str) -> str:
    parts = topic.split("/")
    if parts[0] == "$shadow":
        return "shadow"
    if len(parts) >= 3 and parts[2] == "telemetry":
        return "telemetry"
    if len(parts) >= 4 and parts[2] == "commands":
        return "response" if parts[-1] == "response" else "command"
    return "other"


class Subscriber:
    """A paho-mqtt client that counts what arrives, by kind of topic and by topic."""

    def __init__(self, port: int, filters: list[str], qos: int = 1) -> None:
        self.kinds: Counter[str] = Counter()
        self.topics: Counter[str] = Counter()
        self.payloads: list[tuple[str, bytes]] = []
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"counter-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(5), "subscriber: no CONNACK"
        self.client.subscribe([(f, qos) for f in filters])
        assert subscribed.wait(5), "subscriber: no SUBACK"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.kinds[classify(msg.topic)] += 1
            self.topics[msg.topic] += 1
            self.payloads.append((msg.topic, msg.payload))
            self.last = time.monotonic()

    def settle(self, quiet: float = 0.7, timeout: float = 10) -> None:
        """Wait until nothing arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and time.monotonic() - self.last < quiet:
            time.sleep(0.1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber_factory() -> Any:
    made: list[Subscriber] = []

    def make(port: int, filters: list[str], qos: int = 1) -> Subscriber:
        s = Subscriber(port, filters, qos)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _check_fleet_counts(stats: dict[tuple[str, str], dict[str, str]], sub: Subscriber) -> None:
    for row in stats.values():
        assert row["Failure Count"] == "0", row
    assert count(stats, "PUBLISH", "telemetry") == sub.kinds["telemetry"] > 0
    assert count(stats, "PUBLISH", "shadow update") == sub.kinds["shadow"] > 0
    assert count(stats, "PUBLISH", "command") == sub.kinds["command"] > 0
    assert count(stats, "PUBLISH", "command response") == sub.kinds["response"]
    assert count(stats, "COMMAND", "round trip") == sub.kinds["response"]
    assert count(stats, "RECEIVE", "command") == sub.kinds["command"]


def test_scenario_run_reports_what_a_subscriber_saw(
    mosquitto: Any, tmp_path: Path, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(mosquitto.port, ["devices/#", "$shadow/+/update"])
    out = tmp_path / "run"
    result = iotgw_load(
        tmp_path, "-f", THERMOSTAT, "-H", f"mqtt://127.0.0.1:{mosquitto.port}",
        "-c", "7", "-r", "100", "-d", "3s", "--headless", "--csv", str(out),
        "--html", str(tmp_path / "report.html"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sub.settle()
    stats = stats_csv(out)
    _check_fleet_counts(stats, sub)
    assert count(stats, "CONNECT", "connect") == 7
    assert sub.topics["devices/meter-1/telemetry/energy"] >= 20  # every 100 ms
    # one Meter (fixed_count), six Thermostats, numbered globally from 1
    assert {t.split("/")[1] for t in sub.topics if classify(t) == "telemetry"} == {
        "meter-1", *(f"thermostat-{n}" for n in range(2, 8))}
    assert count(stats, "PING", "heartbeat") > 0
    # telemetry payloads carry a per-device sequence 1..n without gaps
    seqs: dict[str, list[int]] = {}
    for topic, payload in sub.payloads:
        if classify(topic) == "telemetry":
            seqs.setdefault(topic, []).append(json.loads(payload)["seq"])
    for topic, got in seqs.items():
        assert sorted(got) == list(range(1, len(got) + 1)), topic
    # the history's last cumulative total is the aggregated total
    with open(f"{out}_stats_history.csv") as f:
        history = list(csv.DictReader(f))
    assert history[-1]["Total Request Count"] == stats[("", "Aggregated")]["Request Count"]
    assert max(int(h["Connected"]) for h in history) == 7
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 3 and "<script" not in page
    assert f">{count(stats, 'PUBLISH', 'telemetry')}<" in page
    assert "Summary" in result.stdout and "99.99%" in result.stdout


def test_two_processes_merge_into_the_counts_a_subscriber_saw(
    mosquitto: Any, tmp_path: Path, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(mosquitto.port, ["devices/#", "$shadow/+/update"])
    out = tmp_path / "mp"
    result = iotgw_load(
        tmp_path, "-f", THERMOSTAT, "-H", f"mqtt://127.0.0.1:{mosquitto.port}",
        "-c", "9", "-r", "200", "-d", "3s", "--headless", "--csv", str(out), "--processes", "2",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes" in result.stdout
    sub.settle()
    stats = stats_csv(out)
    _check_fleet_counts(stats, sub)
    assert count(stats, "CONNECT", "connect") == 9
    devices = {t.split("/")[1] for t in sub.topics if classify(t) == "telemetry"}
    assert devices == {"meter-1", *(f"thermostat-{n}" for n in range(2, 10))}


def test_master_and_workers_over_tcp_merge_exactly(
    mosquitto: Any, tmp_path: Path, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(mosquitto.port, ["devices/+/telemetry/#"])
    port = free_port()
    out = tmp_path / "dist"
    master = spawn_load(
        tmp_path, "-f", THERMOSTAT, "-H", f"mqtt://127.0.0.1:{mosquitto.port}", "-c", "6",
        "-r", "100", "-d", "3s", "--headless", "--csv", str(out), "--master",
        "--expect-workers", "2", "--master-bind-port", str(port),
    )
    workers = [spawn_load(tmp_path, "--worker", "--master-port", str(port), "-f", THERMOSTAT)
               for _ in range(2)]
    try:
        stdout, stderr = master.communicate(timeout=90)
        for w in workers:
            assert w.wait(timeout=30) == 0
    finally:
        for p in (master, *workers):
            if p.poll() is None:
                p.kill()
    assert master.returncode == 0, stdout + stderr
    sub.settle()
    stats = stats_csv(out)
    assert count(stats, "PUBLISH", "telemetry") == sub.kinds["telemetry"] > 0
    assert count(stats, "CONNECT", "connect") == 6


def test_pub_with_a_limit_sends_exactly_that_many_per_client(
    mosquitto: Any, tmp_path: Path, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(mosquitto.port, ["bench/#"])
    out = tmp_path / "pub"
    result = iotgw_load(
        tmp_path, "pub", "-H", f"mqtt://127.0.0.1:{mosquitto.port}", "-c", "3", "-I", "5",
        "-L", "40", "-q", "1", "-s", "64", "-t", "bench/%i/%c", "-C", "pubtest-%i",
        "--headless", "--csv", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"pub total=\d+ rate=\d+/sec overrun=\d+", result.stdout)
    sub.settle()
    assert sub.topics == {f"bench/{i}/pubtest-{i}": 40 for i in (1, 2, 3)}
    stats = stats_csv(out)
    assert count(stats, "PUBLISH", "pub") == 120
    assert stats[("PUBLISH", "pub")]["Failure Count"] == "0"
    # stamped payloads: 64 bytes, sequence 1..40 per client
    for topic in sub.topics:
        got = [json.loads(p)["seq"] for t, p in sub.payloads if t == topic]
        assert got == list(range(1, 41))
    assert all(len(p) == 64 for _, p in sub.payloads)


def test_qos0_pub_counts_every_message_the_broker_delivered(
    mosquitto: Any, tmp_path: Path, subscriber_factory: Any
) -> None:
    sub = subscriber_factory(mosquitto.port, ["q0/#"], qos=0)
    out = tmp_path / "q0"
    result = iotgw_load(
        tmp_path, "pub", "-H", f"mqtt://127.0.0.1:{mosquitto.port}", "-c", "4", "-I", "2",
        "-L", "200", "-q", "0", "-t", "q0/%i", "--headless", "--csv", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sub.settle()
    assert count(stats_csv(out), "PUBLISH", "pub") == 800 == sum(sub.topics.values())


def test_sub_counts_what_is_published_to_its_filter(
    mosquitto: Any, tmp_path: Path
) -> None:
    out = tmp_path / "sub"
    proc = spawn_load(
        tmp_path, "sub", "-H", f"mqtt://127.0.0.1:{mosquitto.port}", "-c", "2", "-q", "1",
        "-t", "feed/#", "-d", "4s", "--headless", "--csv", str(out),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the banner
        line = proc.stdout.readline()  # the first status line: subscribed by now
        assert "recv total=" in line, line
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="feeder")
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        from loadtest.bench import payload_template, stamp

        for i in range(50):
            buf, _ = payload_template(100)
            stamp(buf, i + 1, time.time_ns() // 1000)
            pub.publish(f"feed/{i % 5}", bytes(buf), qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    stats = stats_csv(out)
    assert count(stats, "RECEIVE", "sub") == 100  # 50 messages, 2 subscribers
    assert stats[("RECEIVE", "sub")]["99%"] != "N/A"  # publish -> receive latency measured
    assert count(stats, "SUBSCRIBE", "subscribe") == 2


def test_conn_holds_connections_and_pings_them(mosquitto: Any, tmp_path: Path) -> None:
    out = tmp_path / "conn"
    result = iotgw_load(
        tmp_path, "conn", "-H", f"mqtt://127.0.0.1:{mosquitto.port}", "-c", "50", "-r", "500",
        "-I", "250", "-d", "2.5s", "--headless", "--csv", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stats = stats_csv(out)
    assert count(stats, "CONNECT", "connect") == 50
    pings = count(stats, "PING", "heartbeat")
    assert 50 * 5 <= pings <= 50 * 11  # every 250 ms for ~2.4 s
    assert all(r["Failure Count"] == "0" for r in stats.values())
    with open(f"{out}_stats_history.csv") as f:
        assert max(int(h["Connected"]) for h in csv.DictReader(f)) == 50
    assert "Peak connected devices: 50" in result.stdout
    assert re.search(r"connect total=50 rate=\d+/sec connected=50", result.stdout)


def test_fail_on_sets_the_exit_code(mosquitto: Any, tmp_path: Path) -> None:
    base = ["pub", "-H", f"mqtt://127.0.0.1:{mosquitto.port}", "-c", "2", "-I", "10", "-L",
            "20", "-q", "1", "--headless"]
    passed = iotgw_load(tmp_path, *base, "--fail-on", "p99>10s,errors>1%")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    failed = iotgw_load(tmp_path, *base, "--fail-on", "p99>10s,rps<100000")
    assert failed.returncode == 1
    assert "fail-on 'rps<100000'" in failed.stderr
    bad = iotgw_load(tmp_path, *base, "--fail-on", "p99 is high")
    assert bad.returncode == 2 and "--fail-on" in bad.stderr


def test_failures_are_counted_and_fail_the_run_by_default(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    out = tmp_path / "refused"
    result = iotgw_load(tmp_path, "conn", "-H", f"mqtt://127.0.0.1:{port}", "-c", "5",
                        "-d", "1s", "--headless", "--csv", str(out))
    assert result.returncode == 1
    stats = stats_csv(out)
    assert stats[("CONNECT", "connect")]["Failure Count"] == "5"
    with open(f"{out}_failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["Method"] == "CONNECT" and "refused" in rows[0]["Error"].lower()
    assert rows[0]["Occurrences"] == "5"


def test_against_the_gateway_telemetry_counts_match_a_subscriber(
    gateway_factory: Any, tmp_path: Path, subscriber_factory: Any
) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open")
    sub = subscriber_factory(gw.mqtt_port, ["devices/+/telemetry", "bench/#"])
    out = tmp_path / "gw"
    result = iotgw_load(
        tmp_path, "--profile", "telemetry", "-H", f"mqtt://127.0.0.1:{gw.mqtt_port}",
        "-c", "5", "-r", "100", "-d", "3s", "--headless", "--csv", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pub = iotgw_load(
        tmp_path, "pub", "-H", f"mqtt://127.0.0.1:{gw.mqtt_port}", "-c", "2", "-I", "5",
        "-L", "30", "-q", "1", "-t", "bench/%i", "-V", "5", "--headless", "--csv",
        str(tmp_path / "gwpub"),
    )
    assert pub.returncode == 0, pub.stdout + pub.stderr
    sub.settle()
    stats = stats_csv(out)
    assert count(stats, "PUBLISH", "telemetry") == sub.kinds["telemetry"] > 0
    assert stats[("PUBLISH", "telemetry")]["Failure Count"] == "0"
    assert count(stats, "PING", "heartbeat") > 0
    assert sub.topics["bench/1"] == sub.topics["bench/2"] == 30
    assert count(stats_csv(tmp_path / "gwpub"), "PUBLISH", "pub") == 60


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_mqtts_publishes_over_tls_verified_by_a_ca(
    gateway_factory: Any, tmp_path: Path, subscriber_factory: Any
) -> None:
    p = {n: str(tmp_path / n) for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p["ca.key"], "-out",
             p["ca.pem"], "-days", "2", "-subj", "/CN=iotgw-load test CA")
    (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p["srv.key"], "-out",
             p["srv.csr"], "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", p["srv.csr"], "-CA", p["ca.pem"], "-CAkey", p["ca.key"],
             "-CAcreateserial", "-out", p["srv.pem"], "-days", "2", "-extfile",
             str(tmp_path / "ext"))
    gw = gateway_factory(tls_cert=p["srv.pem"], tls_key=p["srv.key"], mqtts_port=0,
                         allow_anonymous=True, acl="open")
    sub = subscriber_factory(gw.mqtt_port, ["tls/#"])
    out = tmp_path / "tls"
    result = iotgw_load(
        tmp_path, "pub", "-H", f"mqtts://127.0.0.1:{gw.mqtts_port}", "--cafile", p["ca.pem"],
        "-c", "2", "-I", "5", "-L", "25", "-q", "1", "-t", "tls/%i", "--headless",
        "--csv", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sub.settle()
    assert sub.topics == {"tls/1": 25, "tls/2": 25}
    assert count(stats_csv(out), "PUBLISH", "pub") == 50
    # without the CA the server certificate is not trusted: every connect fails
    untrusted = iotgw_load(
        tmp_path, "conn", "-H", f"mqtts://127.0.0.1:{gw.mqtts_port}", "-c", "2", "-d", "1s",
        "--headless", "--csv", str(tmp_path / "untrusted"),
    )
    assert untrusted.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in Path(f"{tmp_path}/untrusted_failures.csv").read_text()


def test_source_ips_spread_connections_over_local_addresses(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "mosquitto.log"
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 0.0.0.0\nallow_anonymous true\npersistence false\n"
                    "log_dest stdout\nlog_type all\nconnection_messages true\n")
    with log.open("w") as sink:
        proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        from conftest import wait_for_tcp

        wait_for_tcp(port, proc=proc)
        result = iotgw_load(
            tmp_path, "conn", "-H", f"mqtt://127.0.0.1:{port}", "-c", "6", "-d", "1s",
            "--source-ips", "127.0.0.2,127.0.0.3", "--headless", "-C", "src-%i",
        )
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        stop_process(proc, 10)
    text = log.read_text()
    froms = re.findall(r"New client connected from (127\.0\.0\.\d+):\d+ as src-(\d+)", text)
    assert sorted(froms, key=lambda f: int(f[1])) == [
        ("127.0.0.2", "1"), ("127.0.0.3", "2"), ("127.0.0.2", "3"),
        ("127.0.0.3", "4"), ("127.0.0.2", "5"), ("127.0.0.3", "6")]


def test_commands_with_an_mqtt5_response_topic_are_answered_there(
    mosquitto: Any, tmp_path: Path
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    scenario = tmp_path / "cmd.py"
    scenario.write_text(
        "from loadtest import MqttDevice\n\n"
        "class Valve(MqttDevice):\n"
        "    def on_start(self):\n"
        "        self.state = {'open': False}\n"
        "        self.answer_commands(rate=None)\n\n"
        "    def on_command(self, name, data):\n"
        "        return {'echo': name, 'open': data['args']['open']}\n"
    )
    proc = spawn_load(tmp_path, "-f", str(scenario), "-H", f"mqtt://127.0.0.1:{mosquitto.port}",
                      "-V", "5", "-c", "1", "-d", "4s", "--headless")
    replies: list[paho.MQTTMessage] = []
    app = paho.Client(CallbackAPIVersion.VERSION2, client_id="backend", protocol=paho.MQTTv5)
    app.on_message = lambda c, u, m: replies.append(m)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        assert "devices=1 connected=1" in proc.stdout.readline()
        app.connect("127.0.0.1", mosquitto.port)
        app.loop_start()
        app.subscribe("backend/replies", 1)
        time.sleep(0.3)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "backend/replies"
        props.CorrelationData = b"req-42"
        app.publish("devices/valve-1/commands/open", json.dumps({"args": {"open": True}}), 1,
                    properties=props).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not replies and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        app.loop_stop()
        app.disconnect()
        proc.communicate(timeout=30)
    assert replies, "no reply on the response topic"
    reply = replies[0]
    assert json.loads(reply.payload) == {"status": "ok", "echo": "open", "open": True}
    assert reply.properties.CorrelationData == b"req-42"


def test_user_names_and_passwords_are_filled_per_client(tmp_path: Path) -> None:
    """Against a Mosquitto with a password file: `-U dev-%i -P secret-%i` logs in every client
    with its own credentials; a wrong template is refused with the CONNACK's reason."""
    passwd = tmp_path / "passwd"
    for i in (1, 2, 3):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 1 else []), str(passwd),
                        f"dev-{i}", f"secret-{i}"], check=True, capture_output=True)
    passwd.chmod(0o644)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # user root: when started as root, Mosquitto would otherwise switch to a user that cannot
    # read the test's private temporary directory (ignored when not root)
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\nuser root\n"
                    f"password_file {passwd}\npersistence false\n")
    proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from conftest import wait_for_tcp

        wait_for_tcp(port, proc=proc)
        base = ["conn", "-H", f"mqtt://127.0.0.1:{port}", "-c", "3", "-d", "1s", "--headless"]
        ok = iotgw_load(tmp_path, *base, "-U", "dev-%i", "-P", "secret-%i",
                        "--csv", str(tmp_path / "ok"))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert count(stats_csv(tmp_path / "ok"), "CONNECT", "connect") == 3
        bad = iotgw_load(tmp_path, *base, "-U", "dev-%i", "-P", "wrong",
                         "--csv", str(tmp_path / "bad"))
        assert bad.returncode == 1
        failures = Path(f"{tmp_path}/bad_failures.csv").read_text()
        assert "refused: 5 not authorized" in failures or "refused: 4 bad user name" in failures
    finally:
        stop_process(proc, 10)


def test_kafka_end_to_end_latency_matches_every_acknowledged_telemetry_record(
    gateway_factory: Any, tmp_path: Path, kafka_broker: Any
) -> None:
    import uuid

    topic = f"lt{uuid.uuid4().hex[:8]}.telemetry"
    gw = gateway_factory(allow_anonymous=True, acl="open", kafka=kafka_broker.bootstrap,
                         kafka_topics=f"telemetry={topic}")
    out = tmp_path / "kafka"
    result = iotgw_load(
        tmp_path, "--profile", "telemetry", "-H", f"mqtt://127.0.0.1:{gw.mqtt_port}",
        "-c", "5", "-r", "100", "-d", "3s", "--headless", "--csv", str(out),
        "--kafka", kafka_broker.bootstrap, "--kafka-topic", topic,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stats = stats_csv(out)
    published = count(stats, "PUBLISH", "telemetry")
    assert published > 0 and stats[("PUBLISH", "telemetry")]["Failure Count"] == "0"
    # Every acknowledged telemetry message was seen in Kafka (else it would be a failure).
    assert count(stats, "KAFKA", "e2e telemetry") == published
    assert stats[("KAFKA", "e2e telemetry")]["Failure Count"] == "0"
