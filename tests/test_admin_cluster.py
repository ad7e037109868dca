"""The admin API and CLI see the whole cluster, whichever node answers: two `iotgw run --cluster`
processes sharing a real redis-server, paho clients on each. Listing merges both nodes' clients,
a kick or a session lookup reaches the node holding the client, a ban placed through one node
refuses CONNECTs at the other, and a node that does not answer (SIGSTOPped) is named instead of
waited for."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import GatewayProcess, RedisProcess
from test_admin import rest_at
from test_mqtt_server import PahoClient, RawClient

from gateway._native import mqtt
from gateway.cluster import ASK_TIMEOUT

TOKEN = "adm"
CLI = [sys.executable, "-m", "gateway.cli"]


class Node:
    """One cluster node: an `iotgw run --cluster` process."""

    def __init__(self, process: GatewayProcess) -> None:
        self.process = process
        self.mqtt_port = process.mqtt_port
        self.http_port = process.http_port

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """SIGSTOP the node for the block (alive to the others for DEAD_AFTER seconds, but it
        answers nothing), SIGCONT after it, whatever happens."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)


def iotgw(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"http://127.0.0.1:{node.http_port}"
    return subprocess.run([*CLI, *args[:1], "--url", url, "--token", TOKEN, *args[1:]],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    redis = RedisProcess(tmp_path_factory.mktemp("redis"))
    root = tmp_path_factory.mktemp("admin-cluster")
    processes = [
        GatewayProcess(root / name, "--cluster", "--redis", redis.url, "--node-id", name,
                       "--api-token", TOKEN)
        for name in ("node-a", "node-b")
    ]
    try:
        with ThreadPoolExecutor(2) as pool:  # the two start-ups overlap
            list(pool.map(GatewayProcess.start, processes))
        yield Node(processes[0]), Node(processes[1])
    finally:
        for process in processes:
            process.stop()
        redis.stop()


def rest(node: Node, method: str, path: str, body: object = None) -> tuple[int, Any]:
    return rest_at(node.http_port, method, path, TOKEN, body)


def until(condition: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
    return result


def both_answer(a: Node) -> bool:
    """Node a hears node b (a list through a is complete)."""
    status, page = rest(a, "GET", "/v1/admin/clients?limit=1")
    return status == 200 and page["incomplete"] == []


def test_the_client_list_of_either_node_merges_both_nodes_by_client_id_and_pages(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    until(lambda: both_answer(a))
    clients = [PahoClient(node.mqtt_port, f"t{i}", paho.MQTTv5)
               for i, node in enumerate((a, b, a, b, b), start=1)]
    try:
        status, page = rest(a, "GET", "/v1/admin/clients?prefix=t&limit=3")
        assert status == 200, page
        assert [(c["client_id"], c["node"]) for c in page["clients"]] == [
            ("t1", "node-a"), ("t2", "node-b"), ("t3", "node-a")]
        assert (page["next"], page["incomplete"]) == ("t3", [])
        status, page = rest(a, "GET", "/v1/admin/clients?prefix=t&limit=3&after=t3")
        assert [(c["client_id"], c["node"]) for c in page["clients"]] == [
            ("t4", "node-b"), ("t5", "node-b")]
        assert page["next"] is None
        # node a has none after t3, node b has more than one: the page says there is more
        status, page = rest(a, "GET", "/v1/admin/clients?prefix=t&limit=1&after=t3")
        assert [c["client_id"] for c in page["clients"]] == ["t4"] and page["next"] == "t4"
        listed = iotgw(b, "clients", "list", "--prefix", "t")
        assert listed.returncode == 0, listed.stderr
        rows = [line.split("\t") for line in listed.stdout.splitlines()]
        assert rows[0][0] == "client_id" and rows[0][-1] == "node"
        assert [(r[0], r[1], r[-1]) for r in rows[1:]] == [
            ("t1", "mqtt5", "node-a"), ("t2", "mqtt5", "node-b"), ("t3", "mqtt5", "node-a"),
            ("t4", "mqtt5", "node-b"), ("t5", "mqtt5", "node-b")]
    finally:
        for client in clients:
            client.close()


def test_a_kick_through_one_node_disconnects_the_client_on_the_other(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    victim = PahoClient(b.mqtt_port, "victim", paho.MQTTv5)
    reasons: list[int] = []
    gone = threading.Event()

    def on_disconnect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        reasons.append(reason.value)
        gone.set()

    victim.client.on_disconnect = on_disconnect
    try:
        result = iotgw(a, "clients", "kick", "victim")
        assert result.returncode == 0 and result.stdout == "kicked victim\n", result.stderr
        assert gone.wait(5), "the client on node b was not disconnected"
        assert reasons[0] == mqtt.ADMINISTRATIVE_ACTION
    finally:
        victim.close()
    missing = iotgw(a, "clients", "kick", "nobody")
    assert missing.returncode == 2 and "404" in missing.stderr, missing.stderr


def test_a_persistent_session_on_the_other_node_is_found_and_discarded(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    sleeper = PahoClient(b.mqtt_port, "sleeper", paho.MQTTv311, clean_session=False)
    sleeper.subscribe("news/#", 1)
    sleeper.close()
    publisher = PahoClient(b.mqtt_port, "news-pub", paho.MQTTv311)
    publisher.publish("news/a", b"12345", qos=1)
    publisher.close()
    status, session = rest(a, "GET", "/v1/admin/sessions/sleeper")
    assert status == 200, session
    assert (session["node"], session["online"], session["queued"]) == ("node-b", False, 1)
    assert [s["filter"] for s in session["subscriptions"]] == ["news/#"]
    shown = iotgw(a, "clients", "show", "sleeper")
    assert json.loads(shown.stdout)["queued_bytes"] == 5, shown.stderr
    assert rest(a, "GET", "/v1/admin/sessions/nobody")[0] == 404
    # a kick without --discard-session: not connected anywhere
    assert rest(a, "DELETE", "/v1/admin/clients/sleeper")[0] == 404
    assert rest(a, "DELETE", "/v1/admin/clients/sleeper?discard_session=true")[0] == 204
    assert rest(b, "GET", "/v1/admin/sessions/sleeper")[0] == 404  # ended where it was


def test_a_ban_placed_through_one_node_kicks_and_refuses_at_the_other(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    on_b = RawClient(b.mqtt_port, version=5)
    assert on_b.connect("roamer").reason_code == 0
    status, ban = rest(a, "POST", "/v1/admin/bans", body={"kind": "client_id", "value": "roamer"})
    assert status == 201, ban
    try:
        kicked = on_b.recv(timeout=5)  # node b reads the cluster's bans every second
        assert kicked is not None and kicked.reason_code == mqtt.ADMINISTRATIVE_ACTION
        assert RawClient(b.mqtt_port, version=5).connect("roamer").reason_code == mqtt.BANNED
        assert [x["value"] for x in rest(b, "GET", "/v1/admin/bans")[1]["bans"]] == ["roamer"]
    finally:
        assert rest(a, "DELETE", "/v1/admin/bans/client_id/roamer")[0] == 204
    until(lambda: RawClient(b.mqtt_port, version=5).connect("roamer").reason_code == 0)


def test_a_node_that_does_not_answer_is_named_and_the_call_still_answers_in_time(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    until(lambda: both_answer(a))
    here = PahoClient(a.mqtt_port, "s-here", paho.MQTTv5)
    there = PahoClient(b.mqtt_port, "s-there", paho.MQTTv5)
    try:
        with b.stopped():
            started = time.monotonic()
            status, page = rest(a, "GET", "/v1/admin/clients?prefix=s-")
            took = time.monotonic() - started
        assert status == 200, page
        assert [c["client_id"] for c in page["clients"]] == ["s-here"]
        assert page["incomplete"] == ["node-b"]
        assert ASK_TIMEOUT - 0.5 < took < ASK_TIMEOUT + 3, took
        until(lambda: both_answer(a))  # node b is back
        with b.stopped():
            listed = iotgw(a, "clients", "list", "--prefix", "s-")
        assert listed.returncode == 1 and listed.stdout.splitlines()[1].startswith("s-here\t")
        assert len(listed.stdout.splitlines()) == 2
        assert listed.stderr.count("\n") == 1 and "node-b" in listed.stderr, listed.stderr
        until(lambda: both_answer(a))
        with b.stopped():
            result = iotgw(a, "clients", "kick", "s-there")
        assert result.returncode == 2, result.stderr
        assert "503" in result.stderr and "node node-b" in result.stderr
    finally:
        here.close()
        there.close()
