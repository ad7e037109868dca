"""Gateway nodes sharing one Redis act as one MQTT broker (gateway/cluster.py): two nodes in
this process (each on its own event loop) with real clients on each, and `iotgw run --workers`
as separate processes on one port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiocoap
import paho.mqtt.client as paho
import pytest
import redis
from conftest import free_port, free_ports, wait_for_tcp, worker_pids
from test_coap_endpoint import _base, _coap
from test_mqtt_server import PahoClient, RawClient

from gateway._native import mqtt
from gateway.mqtt.session import Message


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def nodes(gateway_factory: Any, redis_server: Any) -> tuple[Any, Any]:
    url = f"redis://{redis_server.url}"
    redis.Redis.from_url(url).flushall()
    settings = {"allow_anonymous": True, "acl": "open", "redis": url, "cluster": True}
    a = gateway_factory(node_id="node-a", **settings)
    b = gateway_factory(node_id="node-b", **settings)
    return a, b


def knows_route(node: Any, topic: str, holder: str) -> bool:
    """Whether `node` has heard that `holder` subscribes to something matching `topic`."""
    cluster = node.gateway.cluster
    return bool(node.call(lambda: any(n == holder for n, _ in cluster.routes.match(topic))))


def park_session(node: Any, client_id: str = "dev") -> Any:
    """Leave a persistent session subscribed to cmd/# offline on `node`; returns the CONNECT
    properties to resume it with."""
    props = mqtt.Properties(session_expiry_interval=300)
    dev = RawClient(node.mqtt_port, version=5)
    assert dev.connect(client_id, properties=props).reason_code == 0
    dev.send(mqtt.Subscribe(1, [mqtt.Subscription("cmd/#", 1)]).encode(5))
    assert dev.recv().type == mqtt.SUBACK
    dev.send(mqtt.Disconnect().encode(5))
    dev.close()
    return props


def news_subscriber(node: Any, seen_by: Any) -> PahoClient:
    """A client on `node` subscribed to news/#, once the node `seen_by` has heard of it."""
    sub = PahoClient(node.mqtt_port, "sub", paho.MQTTv5)
    sub.subscribe("news/#", 1)
    holder = node.gateway.cluster.node_id
    wait_until(lambda: knows_route(seen_by, "news/x", holder))
    return sub


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_on_one_node_reaches_a_subscriber_on_the_other(nodes: Any, qos: int) -> None:
    a, b = nodes
    sub = PahoClient(b.mqtt_port, "sub", paho.MQTTv5)
    sub.subscribe("plant/+/temp", qos)
    wait_until(lambda: knows_route(a, "plant/1/temp", "node-b"))
    pub = PahoClient(a.mqtt_port, "pub", paho.MQTTv311)
    for i in range(20):
        pub.publish(f"plant/{i % 3}/temp", b"%d" % i, qos)
    got = sub.wait_messages(20)
    assert [m.payload for m in got] == [b"%d" % i for i in range(20)]
    assert {m.qos for m in got} == {qos}
    assert b.call(lambda: b.gateway.metrics.cluster.received._value.get()) == 20
    sub.close()
    pub.close()


def test_a_node_ahead_of_another_holds_its_publishers_and_loses_nothing(
    nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.cluster

    monkeypatch.setattr(gateway.cluster, "HIGH_WATER", 2000)  # a few dozen messages ahead
    monkeypatch.setattr(gateway.cluster, "LOW_WATER", 1000)
    a, b = nodes
    sub = RawClient(b.mqtt_port, version=4)
    assert sub.connect("sub").type == mqtt.CONNACK
    sub.send(mqtt.Subscribe(1, [mqtt.Subscription("flood/#", 1)]).encode(4))
    assert sub.recv().type == mqtt.SUBACK
    wait_until(lambda: knows_route(a, "flood/x", "node-b"))
    pub = RawClient(a.mqtt_port, version=4)
    pub.connect("pub")
    frames = b"".join(
        mqtt.encode_publish(f"flood/{i}", b"%d" % i, qos=1, packet_id=i + 1) for i in range(500)
    )
    pub.send(frames)  # in one go: node a reads them faster than node b is told of them
    got = [sub.recv() for _ in range(500)]
    assert [bytes(p.payload) for p in got] == [b"%d" % i for i in range(500)]
    assert a.call(lambda: a.gateway.metrics.cluster.held_publishers._value.get()) > 0
    acks = {pub.recv().packet_id for _ in range(500)}
    assert acks == set(range(1, 501))
    sub.close()
    pub.close()


def test_unsubscribe_withdraws_the_route_and_nothing_more_is_forwarded(nodes: Any) -> None:
    a, b = nodes
    sub = news_subscriber(b, seen_by=a)
    sub.client.unsubscribe("news/#")
    wait_until(lambda: not knows_route(a, "news/x", "node-b"))
    pub = PahoClient(a.mqtt_port, "pub", paho.MQTTv5)
    pub.publish("news/x", b"late", 1)
    assert a.call(lambda: a.gateway.metrics.cluster.forwarded._value.get()) == 0
    sub.close()
    pub.close()


def test_shared_subscription_spans_nodes_and_each_message_goes_to_one_member(
    nodes: Any,
) -> None:
    a, b = nodes
    member_a = PahoClient(a.mqtt_port, "worker-a", paho.MQTTv5)
    member_b = PahoClient(b.mqtt_port, "worker-b", paho.MQTTv5)
    member_a.subscribe("$share/workers/jobs/#", 1)
    member_b.subscribe("$share/workers/jobs/#", 1)
    for member in (member_a, member_b):
        member.subscribe("marker", 1)  # a plain subscription: a barrier after the jobs
    wait_until(lambda: a.call(lambda: len(a.gateway.cluster.shared_routes)) == 1)
    wait_until(lambda: knows_route(a, "marker", "node-b"))
    pub = PahoClient(a.mqtt_port, "pub", paho.MQTTv5)
    for i in range(20):
        pub.publish(f"jobs/{i}", b"%d" % i, 1)
    pub.publish("marker", b"-1", 1)  # behind every job on each path (local, and over Redis)
    for member in (member_a, member_b):
        wait_until(lambda member=member: any(m.topic == "marker" for m in member.messages))
    jobs = [m for m in member_a.messages + member_b.messages if m.topic != "marker"]
    got = sorted(int(m.payload) for m in jobs)
    assert got == list(range(20))
    assert all(any(m.topic != "marker" for m in member.messages)
               for member in (member_a, member_b))  # the nodes took turns
    for c in (member_a, member_b, pub):
        c.close()


def test_retained_message_set_on_one_node_is_served_by_every_node(
    nodes: Any, gateway_factory: Any, redis_server: Any
) -> None:
    a, b = nodes
    pub = PahoClient(a.mqtt_port, "pub", paho.MQTTv311)
    pub.publish("state/lamp", b"on", 1, retain=True)
    wait_until(lambda: b.call(lambda: len(b.gateway.broker.retained)) == 1)
    sub = PahoClient(b.mqtt_port, "sub", paho.MQTTv311)
    sub.subscribe("state/#", 1)
    (msg,) = sub.wait_messages(1)
    assert (msg.topic, msg.payload, msg.retain) == ("state/lamp", b"on", True)
    # A node that joins later loads them from Redis.
    c = gateway_factory(node_id="node-c", allow_anonymous=True, acl="open",
                        redis=f"redis://{redis_server.url}", cluster=True)
    late = PahoClient(c.mqtt_port, "late", paho.MQTTv311)
    late.subscribe("state/#", 1)
    assert [m.payload for m in late.wait_messages(1)] == [b"on"]
    # An empty retained message clears it everywhere.
    pub.publish("state/lamp", b"", 1, retain=True)
    for node in (a, b, c):
        wait_until(lambda node=node: node.call(lambda: len(node.gateway.broker.retained)) == 0)
    for client in (pub, sub, late):
        client.close()


def test_connecting_on_another_node_takes_the_session_over_with_0x8e(nodes: Any) -> None:
    a, b = nodes
    watcher = PahoClient(a.mqtt_port, "watcher", paho.MQTTv5)
    watcher.subscribe("wills/#", 1)
    first = RawClient(a.mqtt_port, version=5)
    assert first.connect("dev", will=mqtt.Will("wills/dev", b"gone", 1)).reason_code == 0
    second = RawClient(b.mqtt_port, version=5)
    assert second.connect("dev").reason_code == 0
    kicked = first.recv()
    assert kicked.type == mqtt.DISCONNECT and kicked.reason_code == mqtt.SESSION_TAKEN_OVER
    assert [m.payload for m in watcher.wait_messages(1)] == [b"gone"]  # as on one node
    wait_until(lambda: a.call(lambda: "dev" not in a.gateway.broker.sessions))
    assert b.call(lambda: "dev" in b.gateway.broker.online)
    second.close()
    watcher.close()


def test_persistent_session_moves_with_its_queued_messages_to_the_node_it_resumes_on(
    nodes: Any,
) -> None:
    a, b = nodes
    props = park_session(a)
    wait_until(lambda: knows_route(b, "cmd/x", "node-a"))
    pub = PahoClient(b.mqtt_port, "pub", paho.MQTTv5)
    pub.publish("cmd/reboot", b"now", 1)  # routed to node a, queued in the offline session
    wait_until(lambda: a.call(lambda: len(a.gateway.broker.sessions["dev"].queue)) == 1)

    back = RawClient(b.mqtt_port, version=5)
    # CONNECT and a PUBLISH right behind it, before the CONNACK (allowed: 5.0 3.1.4).
    back.send(
        mqtt.Connect(
            client_id="dev", clean_start=False, properties=props, protocol_level=5
        ).encode(5)
        + mqtt.Publish("cmd/self", b"x" * 2000, 0).encode(5)
    )
    connack = back.recv()
    assert connack.type == mqtt.CONNACK and connack.session_present
    queued = back.recv()
    assert (queued.topic, bytes(queued.payload)) == ("cmd/reboot", b"now")
    own = back.recv()  # its own early PUBLISH, through the subscription that moved with it
    assert (own.topic, bytes(own.payload)) == ("cmd/self", b"x" * 2000)
    assert a.call(lambda: "dev" not in a.gateway.broker.sessions)
    # The subscription moved too: node a now forwards cmd/# to node b.
    wait_until(lambda: knows_route(a, "cmd/x", "node-b") and not knows_route(b, "cmd/x", "node-a"))
    pub2 = PahoClient(a.mqtt_port, "pub2", paho.MQTTv5)
    pub2.publish("cmd/again", b"2", 1)
    msg = back.recv()
    assert (msg.topic, bytes(msg.payload)) == ("cmd/again", b"2")
    for c in (pub, pub2):
        c.close()
    back.close()


def test_simultaneous_connects_of_one_client_id_on_two_nodes_leave_one_connection(
    nodes: Any,
) -> None:
    a, b = nodes
    for attempt in range(10):
        client_id = f"twin-{attempt}"
        first, second = RawClient(a.mqtt_port, version=5), RawClient(b.mqtt_port, version=5)
        connect = mqtt.Connect(client_id=client_id, protocol_level=5).encode(5)
        first.send(connect)
        second.send(connect)

        def holders(client_id: str = client_id) -> int:
            return sum(
                n.call(lambda n=n: client_id in n.gateway.broker.online) for n in (a, b)
            )

        wait_until(lambda: holders() == 1)
        time.sleep(0.05)
        assert holders() == 1
        first.close()
        second.close()


def _drain(client: RawClient, quiet: float = 1.5) -> list[Any]:
    """Every packet until the server closes (the list then ends with None) or goes quiet."""
    got: list[Any] = []
    try:
        while (packet := client.recv(timeout=quiet)) is not None:
            got.append(packet)
        got.append(None)
    except TimeoutError:
        pass
    return got


def test_racing_resumes_on_two_nodes_leave_one_connection_with_the_session(nodes: Any) -> None:
    a, b = nodes
    props = park_session(a)
    resume = mqtt.Connect(
        client_id="dev", clean_start=False, properties=props, protocol_level=5
    ).encode(5)
    for attempt in range(5):
        wait_until(lambda: not any(n.call(lambda n=n: "dev" in n.gateway.broker.online)
                                   for n in (a, b)))
        (holder,) = [n for n in (a, b) if n.call(lambda n=n: "dev" in n.gateway.broker.sessions)]

        def queue(holder: Any = holder, attempt: int = attempt) -> None:
            holder.gateway.broker.publish(Message(f"cmd/{attempt}", b"%d" % attempt, 1, False))
            holder.gateway.broker.flush()

        holder.call(queue)
        first, second = RawClient(a.mqtt_port, version=5), RawClient(b.mqtt_port, version=5)
        first.send(resume)
        second.send(resume)
        seen = [_drain(first), _drain(second)]
        open_ones = [packets for packets in seen if not packets or packets[-1] is not None]
        assert len(open_ones) == 1, seen  # one connection stays, the other was closed
        (winner,) = open_ones
        assert winner[0].type == mqtt.CONNACK and winner[0].session_present, (attempt, seen)
        payloads = {bytes(p.payload) for p in winner[1:] if p.type == mqtt.PUBLISH}
        assert b"%d" % attempt in payloads  # the message queued in the session came along
        client = first if seen[0] is winner else second
        client.send(mqtt.Disconnect().encode(5))
        first.close()
        second.close()


def test_restarted_node_keeps_its_persistent_sessions_and_hands_them_over(
    gateway_factory: Any, redis_server: Any, tmp_path: Path
) -> None:
    url = f"redis://{redis_server.url}"
    redis.Redis.from_url(url).flushall()
    settings = {"allow_anonymous": True, "acl": "open", "redis": url, "cluster": True}
    a = gateway_factory(node_id="node-a", data_dir=str(tmp_path / "a"), **settings)
    b = gateway_factory(node_id="node-b", **settings)
    props = park_session(a)
    wait_until(lambda: a.call(lambda: "dev" not in a.gateway.broker.online))
    a.stop()  # snapshot written; its routes withdrawn
    wait_until(lambda: not knows_route(b, "cmd/x", "node-a"))
    a2 = gateway_factory(node_id="node-a", data_dir=str(tmp_path / "a"), **settings)
    assert a2.call(lambda: "dev" in a2.gateway.broker.sessions)
    wait_until(lambda: knows_route(b, "cmd/x", "node-a"))  # announced again
    pub = PahoClient(b.mqtt_port, "pub", paho.MQTTv5)
    pub.publish("cmd/one", b"1", 1)
    wait_until(lambda: a2.call(lambda: len(a2.gateway.broker.sessions["dev"].queue)) == 1)
    back = RawClient(b.mqtt_port, version=5)
    assert back.connect("dev", clean_start=False, properties=props).session_present
    msg = back.recv()
    assert (msg.topic, bytes(msg.payload)) == ("cmd/one", b"1")
    pub.close()
    back.close()


def test_a_node_that_stops_takes_its_routes_with_it(nodes: Any) -> None:
    a, b = nodes
    sub = news_subscriber(b, seen_by=a)
    b.stop()
    wait_until(lambda: not knows_route(a, "news/x", "node-b"))
    assert a.call(lambda: len(a.gateway.cluster.routes)) == 0
    sub.client.loop_stop()


def test_a_node_that_dies_is_forgotten_and_its_clients_can_connect_elsewhere(
    gateway_factory: Any, redis_server: Any, tmp_path: Path
) -> None:
    url = f"redis://{redis_server.url}"
    redis.Redis.from_url(url).flushall()
    a = gateway_factory(node_id="node-a", allow_anonymous=True, acl="open", redis=url,
                        cluster=True)
    port = free_port()
    b = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--cluster", "--node-id", "node-b",
         "--redis", url, "--mqtt-port", str(port), "--http-port", "0", "--coap-port", "0",
         "--data-dir", str(tmp_path / "b"), "--allow-anonymous", "--acl", "open"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_tcp(port, proc=b, timeout=30)
        dev = RawClient(port, version=5)
        props = mqtt.Properties(session_expiry_interval=300)
        assert dev.connect("dev", properties=props).reason_code == 0
        dev.send(mqtt.Subscribe(1, [mqtt.Subscription("cmd/#", 1)]).encode(5))
        assert dev.recv().type == mqtt.SUBACK
        wait_until(lambda: knows_route(a, "cmd/x", "node-b"))
        b.send_signal(signal.SIGKILL)  # no goodbye: only its silence tells
        b.wait()
        dev.close()
        wait_until(lambda: not knows_route(a, "cmd/x", "node-b"), timeout=10)
        started = time.monotonic()
        back = RawClient(a.mqtt_port, version=5)
        connack = back.connect("dev", clean_start=False, properties=props)
        assert connack.reason_code == 0 and not connack.session_present  # it died with node b
        assert time.monotonic() - started < 1.0  # nobody waited for the dead node
        back.close()
    finally:
        if b.poll() is None:
            b.kill()
            b.wait()


def test_nodes_recover_when_redis_restarts_empty(gateway_factory: Any, own_redis: Any) -> None:
    settings = {"allow_anonymous": True, "acl": "open", "redis": own_redis.url, "cluster": True}
    a = gateway_factory(node_id="node-a", **settings)
    b = gateway_factory(node_id="node-b", **settings)
    sub = news_subscriber(b, seen_by=a)
    own_redis.stop()
    # Meanwhile a CONNECT cannot claim its client id: refused as Server unavailable.
    lonely = RawClient(a.mqtt_port, version=5)
    assert lonely.connect("lonely").reason_code == mqtt.SERVER_UNAVAILABLE
    lonely.close()
    own_redis.start()
    _until_resubscribed(a, b)
    pub = PahoClient(a.mqtt_port, "pub", paho.MQTTv5)
    assert pub.connack[1] == 0  # the client registry works again
    pub.publish("news/x", b"after", 1)
    assert [m.payload for m in sub.wait_messages(1)] == [b"after"]
    pub.close()
    sub.close()


def _until_resubscribed(*nodes: Any) -> None:
    """Each node noticed Redis came back, subscribed again and announced its routes whole."""
    for node in nodes:
        cluster = node.gateway.cluster
        wait_until(lambda node=node, cluster=cluster: node.call(
            lambda: cluster.metrics.resubscribes._value.get() >= 1 and cluster.subscribed
        ), timeout=10)
    wait_until(lambda: knows_route(nodes[0], "news/x", "node-b"), timeout=10)


def test_while_redis_is_away_each_node_serves_its_own_clients_and_counts_lost_forwards(
    gateway_factory: Any, own_redis: Any
) -> None:
    settings = {"allow_anonymous": True, "acl": "open", "redis": own_redis.url, "cluster": True}
    a = gateway_factory(node_id="node-a", **settings)
    b = gateway_factory(node_id="node-b", **settings)
    remote = news_subscriber(b, seen_by=a)
    local = RawClient(a.mqtt_port)
    assert local.connect("local").type == mqtt.CONNACK
    local.send(mqtt.Subscribe(1, [mqtt.Subscription("news/#", 1)]).encode(4))
    assert local.recv().type == mqtt.SUBACK
    pub = RawClient(a.mqtt_port)
    assert pub.connect("pub").type == mqtt.CONNACK
    pub.send(mqtt.encode_publish("news/x", b"before", qos=1, packet_id=1))
    assert pub.recv().type == mqtt.PUBACK
    assert [m.payload for m in remote.wait_messages(1)] == [b"before"]
    assert bytes(local.recv().payload) == b"before"

    own_redis.stop()
    lost = 5
    for i in range(lost):  # node a serves its clients: acknowledged and delivered locally
        pub.send(mqtt.encode_publish("news/x", b"during %d" % i, qos=1, packet_id=i + 2))
        assert pub.recv().type == mqtt.PUBACK
        got = local.recv()
        assert bytes(got.payload) == b"during %d" % i
        local.send(mqtt.encode_ack(mqtt.PUBACK, got.packet_id))
    own_redis.start()
    _until_resubscribed(a, b)
    pub.send(mqtt.encode_publish("news/x", b"after", qos=1, packet_id=100))
    assert pub.recv().type == mqtt.PUBACK
    assert [m.payload for m in remote.wait_messages(2)] == [b"before", b"after"]
    counted = b.call(lambda: b.gateway.metrics.cluster.lost_forwards._value.get())
    assert counted == lost
    for client in (pub, local):
        client.close()
    remote.close()


def test_coap_observer_on_one_node_hears_of_a_shadow_write_on_the_other(nodes: Any) -> None:
    a, b = nodes

    def write_on_a(state: dict[str, Any]) -> Any:
        update = a.gateway.shadows.update("lamp", {"state": {"desired": state}})
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(update, a.loop))

    async def run(ctx: Any) -> tuple[Any, Any]:
        await write_on_a({"on": False})
        msg = aiocoap.Message(code=aiocoap.GET, uri=f"{_base(b)}/shadow/lamp", observe=0)
        pr = ctx.request(msg)
        first = await asyncio.wait_for(pr.response, 10)
        notifications = pr.observation.__aiter__()
        await write_on_a({"on": True})
        note = await asyncio.wait_for(notifications.__anext__(), 10)
        pr.observation.cancel()
        return first, note

    first, note = _coap(run)
    assert first.code == aiocoap.CONTENT and first.opt.observe is not None
    assert json.loads(first.payload)["state"]["desired"] == {"on": False}
    assert note.code == aiocoap.CONTENT
    assert json.loads(note.payload)["state"]["desired"] == {"on": True}


def test_rest_sees_and_commands_a_device_connected_to_another_node(
    gateway_factory: Any, redis_server: Any
) -> None:
    redis.Redis.from_url(f"redis://{redis_server.url}").flushall()
    settings = {"allow_anonymous": True, "acl": "open", "redis": f"redis://{redis_server.url}",
                "cluster": True, "api_token": "secret"}
    a = gateway_factory(node_id="node-a", **settings)
    b = gateway_factory(node_id="node-b", **settings)
    dev = PahoClient(b.mqtt_port, "dev-1", paho.MQTTv5)
    dev.subscribe("devices/dev-1/commands/#", 1)
    wait_until(lambda: knows_route(a, "devices/dev-1/commands/x", "node-b"))

    def api(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{a.gateway.http.port}{path}", data=data, method=method,
            headers={"Authorization": "Bearer secret", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())

    status, info = api("GET", "/v1/devices/dev-1")
    assert (status, info["online"], info["node"]) == (200, True, "node-b")
    status, sent = api("POST", "/v1/devices/dev-1/commands",
                       {"name": "reboot", "payload": {"delay": 1}, "timeout_s": 0})
    assert (status, sent["status"]) == (202, "delivered")
    (msg,) = dev.wait_messages(1)
    assert msg.topic == "devices/dev-1/commands/reboot"
    assert json.loads(msg.payload) == {"delay": 1}
    dev.close()


def test_workers_share_one_port_as_one_broker(tmp_path: Path, redis_server: Any) -> None:
    redis.Redis.from_url(f"redis://{redis_server.url}").flushall()
    port, http_port, coap_port = free_port(), free_ports(2), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--workers", "2", "--redis", f"redis://{redis_server.url}",
         "--mqtt-port", str(port), "--http-port", str(http_port), "--coap-port", str(coap_port),
         "--data-dir", str(tmp_path / "data"), "--allow-anonymous", "--acl", "open",
         "--node-id", "box"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_tcp(port, proc=proc, timeout=30)
        for p in (http_port, http_port + 1):  # each worker serves the API on its own port
            wait_for_tcp(p, proc=proc, timeout=30)
        r = redis.Redis.from_url(f"redis://{redis_server.url}")
        wait_until(lambda: r.hlen("iotgw:nodes") == 2, timeout=15)
        # Many subscribers: SO_REUSEPORT spreads them over both workers.
        subs = [PahoClient(port, f"s{i}", paho.MQTTv311) for i in range(16)]
        for s in subs:
            s.subscribe("fleet/#", 1)
        nodes = {r.get(f"iotgw:client:s{i}").decode().split("|")[0] for i in range(16)}
        assert nodes == {"box-w0", "box-w1"}
        time.sleep(0.3)  # routes announced
        pub = PahoClient(port, "pub", paho.MQTTv311)
        for i in range(10):
            pub.publish(f"fleet/{i}", b"%d" % i, 1)
        for s in subs:
            assert [m.payload for m in s.wait_messages(10)] == [b"%d" % i for i in range(10)]
        # Telemetry from devices on both workers: each worker has its own store, tail reads all.
        for i, s in enumerate(subs[:4]):
            s.publish(f"devices/s{i}/telemetry", b'{"t": %d}' % i, 1)
        tail = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "telemetry", "--data-dir", str(tmp_path / "data"),
             "tail", "-n", "0"], capture_output=True, text=True, timeout=30,
        )
        devices = sorted(json.loads(line)["device"] for line in tail.stdout.splitlines())
        assert devices == ["s0", "s1", "s2", "s3"], tail.stderr
        for c in [*subs, pub]:
            c.close()
        # A worker that dies is started again by the supervisor, and rejoins.
        before = worker_pids(proc.pid)
        os.kill(before[1], signal.SIGKILL)
        wait_until(lambda: len(set(worker_pids(proc.pid)) - set(before)) == 1, timeout=15)
        wait_for_tcp(http_port + 1, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
    assert sorted(os.listdir(tmp_path / "data" / "workers")) == ["0", "1"]


def test_packets_sent_behind_a_connect_wait_for_the_cluster_claim(nodes: Any) -> None:
    """In a cluster the CONNACK waits for the client id's claim in Redis: what the client sent
    in the same write behind its CONNECT is handled after it, in order (and the client that
    held the id on the other node is taken over first)."""
    a, b = nodes
    old = RawClient(b.mqtt_port, version=5)
    assert old.connect("dev", properties=mqtt.Properties(session_expiry_interval=60)) \
        .reason_code == 0
    new = RawClient(a.mqtt_port, version=5)
    new.send(
        mqtt.Connect("dev", protocol_level=5, clean_start=False,
                     properties=mqtt.Properties(session_expiry_interval=60)).encode(5)
        + mqtt.Subscribe(1, [mqtt.Subscription("behind/#", 1)]).encode(5)
        + mqtt.encode_publish("behind/x", b"1", qos=1, packet_id=7, version=5)
        + mqtt.PINGREQ_FRAME
    )
    got = [new.recv() for _ in range(5)]
    types = [p.type for p in got]
    assert types[0] == mqtt.CONNACK and got[0].reason_code == 0
    assert mqtt.SUBACK in types and mqtt.PUBACK in types and types[-1] == mqtt.PINGRESP
    assert types.index(mqtt.SUBACK) < types.index(mqtt.PUBACK)  # in the order sent
    (delivered,) = [p for p in got if p.type == mqtt.PUBLISH]
    assert bytes(delivered.payload) == b"1"  # its own subscription, made before the PUBLISH
    kicked = old.recv()
    assert kicked is not None and kicked.reason_code == mqtt.SESSION_TAKEN_OVER


def test_a_node_that_joins_later_loads_the_routes_the_others_hold(
    gateway_factory: Any, redis_server: Any
) -> None:
    url = f"redis://{redis_server.url}"
    redis.Redis.from_url(url).flushall()
    settings = {"allow_anonymous": True, "acl": "open", "redis": url, "cluster": True}
    a = gateway_factory(node_id="node-a", **settings)
    sub = PahoClient(a.mqtt_port, "sub", paho.MQTTv5)
    sub.subscribe("late/#", 1)
    b = gateway_factory(node_id="node-b", **settings)  # joins after the subscription
    assert knows_route(b, "late/x", "node-a")  # from the tables, before any announcement
    pub = PahoClient(b.mqtt_port, "pub", paho.MQTTv5)
    pub.publish("late/x", b"hello", 1)
    (msg,) = sub.wait_messages(1)
    assert msg.payload == b"hello"
    sub.close()
    pub.close()
