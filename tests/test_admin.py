"""The admin API (`/v1/admin`, scope admin) and its CLI (`iotgw clients|bans|retained`) against a
live gateway: clients listed and kicked, sessions inspected, bans honoured by MQTT, CoAP and
REST, retained messages listed and deleted (for good: across a restart)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import paho.mqtt.client as paho
import pytest
from test_mqtt_server import PahoClient, RawClient

from gateway._native import coap, mqtt

TOKEN = "adm"
CLI = [sys.executable, "-m", "gateway.cli"]


def iotgw(gw: Any, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    url = f"http://127.0.0.1:{gw.gateway.http.port}"
    return subprocess.run([*CLI, *args[:1], "--url", url, "--token", token, *args[1:]],
                          capture_output=True, text=True, timeout=60)


def rest(gw: Any, method: str, path: str, token: str = TOKEN,
         body: object = None) -> tuple[int, Any]:
    return rest_at(gw.gateway.http.port, method, path, token, body)


def rest_at(port: int, method: str, path: str, token: str = TOKEN,
            body: object = None) -> tuple[int, Any]:
    """An admin call to the REST API on `port`: (status, JSON body or None)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read()
            return response.status, json.loads(data) if data else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def gw(gateway_factory: Any) -> Any:
    return gateway_factory(allow_anonymous=True, acl="open", api_token=TOKEN)


def test_clients_list_shows_each_connection_and_pages(gw: Any) -> None:
    a = PahoClient(gw.mqtt_port, "plant-a", paho.MQTTv311, keepalive=30)
    a.subscribe("x/#", 1)
    a.subscribe("y", 0)
    b = RawClient(gw.mqtt_port, version=5)
    assert b.connect("plant-b", keep_alive=45).reason_code == 0
    other = PahoClient(gw.mqtt_port, "zz-other", paho.MQTTv311)
    result = iotgw(gw, "clients", "list", "--prefix", "plant-")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0][:4] == ["client_id", "protocol", "peer", "keep_alive"]
    assert [r[0] for r in rows[1:]] == ["plant-a", "plant-b"]
    assert rows[1][1:2] == ["mqtt3.1.1"] and rows[1][3:5] == ["30", "2"]
    assert rows[2][1] == "mqtt5" and rows[2][3] == "45" and rows[2][2].startswith("127.0.0.1:")
    status, page = rest(gw, "GET", "/v1/admin/clients?limit=2")
    assert status == 200 and [c["client_id"] for c in page["clients"]] == ["plant-a", "plant-b"]
    status, page = rest(gw, "GET", f"/v1/admin/clients?limit=2&after={page['next']}")
    assert [c["client_id"] for c in page["clients"]] == ["zz-other"] and page["next"] is None
    for client in (a, other):
        client.close()
    b.close()


def test_kick_disconnects_with_administrative_action_and_unknown_is_one_line(gw: Any) -> None:
    victim = RawClient(gw.mqtt_port, version=5)
    assert victim.connect("victim").reason_code == 0
    result = iotgw(gw, "clients", "kick", "victim")
    assert result.returncode == 0 and result.stdout == "kicked victim\n", result.stderr
    packet = victim.recv()
    assert packet.type == mqtt.DISCONNECT and packet.reason_code == mqtt.ADMINISTRATIVE_ACTION
    assert victim.recv() is None  # and the socket closes
    result = iotgw(gw, "clients", "kick", "victim")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "404" in result.stderr and "no client 'victim'" in result.stderr


def test_show_inspects_an_offline_persistent_session(gw: Any) -> None:
    sleeper = PahoClient(gw.mqtt_port, "sleeper", paho.MQTTv311, clean_session=False)
    sleeper.subscribe("news/#", 1)
    sleeper.close()
    publisher = PahoClient(gw.mqtt_port, "pub", paho.MQTTv311)
    publisher.publish("news/a", b"12345", qos=1)
    publisher.close()
    result = iotgw(gw, "clients", "show", "sleeper")
    assert result.returncode == 0, result.stderr
    session = json.loads(result.stdout)
    assert session["online"] is False and session["queued"] == 1
    assert session["queued_bytes"] == 5
    assert [s["filter"] for s in session["subscriptions"]] == ["news/#"]
    # kick --discard-session ends an offline session; then there is nothing to show
    assert iotgw(gw, "clients", "kick", "sleeper", "--discard-session").returncode == 0
    assert rest(gw, "GET", "/v1/admin/sessions/sleeper")[0] == 404


def test_a_client_id_ban_kicks_refuses_and_expires(gw: Any) -> None:
    dev = RawClient(gw.mqtt_port, version=5)
    assert dev.connect("bad-dev").reason_code == 0
    result = iotgw(gw, "bans", "add", "--client-id", "bad-dev", "--for", "1.5",
                   "--reason", "flapping")
    assert result.returncode == 0, result.stderr
    assert dev.recv().reason_code == mqtt.ADMINISTRATIVE_ACTION  # kicked at once
    again = RawClient(gw.mqtt_port, version=5)
    assert again.connect("bad-dev").reason_code == mqtt.BANNED
    listed = iotgw(gw, "bans", "list").stdout.splitlines()
    assert listed[1].startswith("client_id\tbad-dev\t") and listed[1].endswith("\tflapping")
    time.sleep(1.6)
    later = RawClient(gw.mqtt_port, version=5)
    assert later.connect("bad-dev").reason_code == 0  # the ban expired
    assert rest(gw, "GET", "/v1/admin/bans")[1] == {"bans": []}
    later.close()


def test_an_address_ban_holds_for_mqtt_coap_and_rest_until_removed(gw: Any) -> None:
    reader = subprocess.run(
        [*CLI, "tokens", "--data-dir", gw.config.data_dir, "create", "--name", "app",
         "--scope", "devices:read"], capture_output=True, text=True, timeout=60)
    app_token = reader.stdout.strip()
    assert iotgw(gw, "bans", "add", "--address", "127.0.0.1").returncode == 0
    assert RawClient(gw.mqtt_port, version=5).connect("anyone").reason_code == mqtt.BANNED
    v4 = RawClient(gw.mqtt_port, version=4)
    assert v4.connect("anyone4").reason_code == 5  # 3.1.1: not authorized
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    udp.sendto(coap.encode_request(coap.CON, coap.POST, 1, b"t", "/telemetry/d1", [], b"{}"),
               ("127.0.0.1", gw.coap_port))
    assert coap.decode(udp.recv(2048)).code == coap.FORBIDDEN
    status, body = rest(gw, "GET", "/v1/devices", token=app_token)
    assert (status, body["error"]) == (403, "banned")
    # an admin token still gets through: the ban can be lifted
    result = iotgw(gw, "bans", "remove", "--address", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert RawClient(gw.mqtt_port, version=5).connect("anyone").reason_code == 0
    udp.sendto(coap.encode_request(coap.CON, coap.POST, 2, b"t", "/telemetry/d1", [], b"{}"),
               ("127.0.0.1", gw.coap_port))
    assert coap.decode(udp.recv(2048)).code == coap.CHANGED
    assert rest(gw, "GET", "/v1/devices", token=app_token)[0] == 200
    bad = iotgw(gw, "bans", "add", "--address", "not-an-ip")
    assert bad.returncode == 2 and "not an IP address" in bad.stderr and bad.stderr.count(
        "\n") == 1


def test_retained_list_and_rm_and_the_deletion_survives_a_restart(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open", api_token=TOKEN)
    data_dir = gw.config.data_dir
    pub = PahoClient(gw.mqtt_port, "pub", paho.MQTTv311)
    pub.publish("site/1/temp", b"21.5", qos=1, retain=True)
    pub.publish("site/2/temp", b"19", qos=0, retain=True)
    pub.close()
    listed = iotgw(gw, "retained", "list", "--prefix", "site/")
    assert listed.stdout.splitlines() == ["topic\tbytes\tqos", "site/1/temp\t4\t1",
                                          "site/2/temp\t2\t0"], listed.stderr
    assert iotgw(gw, "retained", "rm", "site/1/temp").returncode == 0
    missing = iotgw(gw, "retained", "rm", "site/1/temp")
    assert missing.returncode == 2 and "404" in missing.stderr
    gw.stop()  # saves its state
    again = gateway_factory(allow_anonymous=True, acl="open", api_token=TOKEN,
                            data_dir=data_dir)
    assert iotgw(again, "retained", "list").stdout.splitlines()[1:] == ["site/2/temp\t2\t0"]
    sub = PahoClient(again.mqtt_port, "sub", paho.MQTTv311)
    sub.subscribe("site/#", 1)
    assert [m.topic for m in sub.wait_messages(2, timeout=1)] == ["site/2/temp"]
    sub.close()


def test_admin_needs_the_admin_scope_and_the_cli_says_so_in_one_line(gw: Any) -> None:
    made = subprocess.run(
        [*CLI, "tokens", "--data-dir", gw.config.data_dir, "create", "--name", "viewer",
         "--scope", "devices:read,shadow:read"], capture_output=True, text=True, timeout=60)
    viewer = made.stdout.strip()
    assert rest(gw, "GET", "/v1/admin/clients", token=viewer)[0] == 403
    result = iotgw(gw, "clients", "list", token=viewer)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "403" in result.stderr and "admin" in result.stderr
    down = subprocess.run([*CLI, "clients", "--url", "http://127.0.0.1:1", "--token", "x",
                           "list"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 2 and "no gateway answers at http://127.0.0.1:1" in down.stderr


def test_a_ban_holds_on_every_cluster_node_and_lifting_it_too(
    gateway_factory: Any, redis_server: Any
) -> None:
    import redis

    url = f"redis://{redis_server.url}"
    redis.Redis.from_url(url).flushall()
    settings = {"allow_anonymous": True, "acl": "open", "redis": url, "cluster": True,
                "api_token": TOKEN}
    a = gateway_factory(node_id="node-a", **settings)
    b = gateway_factory(node_id="node-b", **settings)
    on_b = RawClient(b.mqtt_port, version=5)
    assert on_b.connect("roamer").reason_code == 0
    try:
        assert iotgw(a, "bans", "add", "--client-id", "roamer").returncode == 0
        # node b reads the cluster's bans within a second: its client goes, and stays out
        packet = on_b.recv(timeout=5)
        assert packet is not None and packet.reason_code == mqtt.ADMINISTRATIVE_ACTION
        assert RawClient(b.mqtt_port, version=5).connect("roamer").reason_code == mqtt.BANNED
        assert iotgw(b, "bans", "list").stdout.splitlines()[1:] == ["client_id\troamer\t-\t"]
        assert iotgw(b, "bans", "remove", "--client-id", "roamer").returncode == 0
        deadline = time.monotonic() + 5
        while RawClient(a.mqtt_port, version=5).connect("roamer").reason_code != 0:
            assert time.monotonic() < deadline, "node a still refuses after the ban was lifted"
            time.sleep(0.2)
    finally:
        redis.Redis.from_url(url).delete("iotgw:bans")


def test_an_expired_ban_leaves_the_clusters_hash_and_a_live_one_stays(
    gateway_factory: Any, redis_server: Any
) -> None:
    import redis

    url = f"redis://{redis_server.url}"
    store = redis.Redis.from_url(url)
    store.flushall()
    gateway_factory(node_id="node-a", allow_anonymous=True, acl="open", redis=url, cluster=True,
                    api_token=TOKEN)
    try:
        store.hset("iotgw:bans", "id:old", json.dumps({"until": time.time() - 1, "reason": ""}))
        store.hset("iotgw:bans", "id:live", json.dumps({"until": time.time() + 600,
                                                         "reason": ""}))
        deadline = time.monotonic() + 5
        while store.hexists("iotgw:bans", "id:old"):
            assert time.monotonic() < deadline, "an expired ban stays in Redis for ever"
            time.sleep(0.1)
        assert store.hexists("iotgw:bans", "id:live")
    finally:
        store.delete("iotgw:bans")


def test_a_ban_placed_while_redis_is_down_holds_and_reaches_redis_when_it_is_back(
    gateway_factory: Any, own_redis: Any
) -> None:
    """503 says the ban holds on this node only for now: it must hold there (the client is
    kicked and refused), and the first sync after Redis is back must store it rather than
    replace it with Redis's (empty) list. A ban lifted while Redis is down likewise."""
    import redis

    # Redis keeps its data over the outage (append-only file), as a production one would.
    own_redis.stop()
    own_redis.command[own_redis.command.index("--appendonly") + 1] = "yes"
    own_redis.start()
    gw = gateway_factory(node_id="node-a", allow_anonymous=True, acl="open",
                         redis=own_redis.url, cluster=True, api_token=TOKEN)
    client = RawClient(gw.mqtt_port, version=5)
    assert client.connect("rogue").reason_code == 0
    store = redis.Redis.from_url(own_redis.url)
    store.hset("iotgw:bans", "id:old", json.dumps({"until": None, "reason": ""}))
    deadline = time.monotonic() + 5
    while RawClient(gw.mqtt_port, version=5).connect("old").reason_code != mqtt.BANNED:
        assert time.monotonic() < deadline, "the ban in Redis did not reach the node"
        time.sleep(0.2)
    own_redis.stop()
    status, body = rest(gw, "POST", "/v1/admin/bans", body={"kind": "client_id",
                                                            "value": "rogue"})
    assert status == 503 and body["error"] == "cluster_unavailable", body
    packet = client.recv(timeout=5)
    assert packet is not None and packet.reason_code == mqtt.ADMINISTRATIVE_ACTION
    status, body = rest(gw, "DELETE", "/v1/admin/bans/client_id/old")
    assert status == 503, body
    own_redis.start()
    assert store.hexists("iotgw:bans", "id:old")  # Redis kept the ban lifted meanwhile
    deadline = time.monotonic() + 10
    while not store.hexists("iotgw:bans", "id:rogue"):
        assert time.monotonic() < deadline, "the ban placed during the outage never reached Redis"
        time.sleep(0.2)
    time.sleep(1.5)  # a sync or two more
    assert RawClient(gw.mqtt_port, version=5).connect("rogue").reason_code == mqtt.BANNED
    assert RawClient(gw.mqtt_port, version=5).connect("old").reason_code == 0
    assert not store.hexists("iotgw:bans", "id:old")
