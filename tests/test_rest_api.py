"""The REST API (`/v1`) over real HTTP against a running gateway: shadows with ETag / If-Match /
If-None-Match, devices, commands answered by a real MQTT 5 client, bearer tokens and scopes,
errors as JSON with the right 4xx, and the shadow metrics."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from test_shadow_mqtt import Device

from gateway import cli

ADMIN = "t0"


class Reply:
    def __init__(self, status: int, headers: dict[str, str], raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw

    @property
    def body(self) -> Any:
        return json.loads(self.raw) if self.raw else None

    @property
    def etag(self) -> str | None:
        return self.headers.get("etag")


class Api:
    """A REST client on http.client (one connection per request: threads may share it)."""

    def __init__(self, gw: Any, token: str | None = ADMIN) -> None:
        assert gw.gateway.http is not None
        self.port: int = gw.gateway.http.port
        self.token = token

    def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        token: str | None = "",
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = dict(headers or {})
        token = self.token if token == "" else token
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, data, h)
            response = conn.getresponse()
            raw = response.read()
            headers_ = {k.lower(): v for k, v in response.getheaders()}
            return Reply(response.status, headers_, raw)
        finally:
            conn.close()


def assert_error(reply: Reply, status: int, error: str | None = None) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.raw)
    body: dict[str, Any] = reply.body
    assert set(body) >= {"error", "detail"}, body
    if error is not None:
        assert body["error"] == error, body
    return body


@pytest.fixture
def gw(gateway_factory: Any) -> Any:
    return gateway_factory(api_token=ADMIN)


@pytest.fixture
def api(gw: Any) -> Api:
    return Api(gw)


SHADOW = "/v1/devices/d1/shadow"


# --------------------------------------------------------------------------- shadows


def test_missing_shadow_is_404_with_a_json_error(api: Api) -> None:
    assert_error(api("GET", SHADOW), 404, "no_shadow")
    assert_error(api("GET", SHADOW + "/changes?since=0"), 404, "no_shadow")
    assert_error(api("DELETE", SHADOW), 404, "no_shadow")
    assert_error(api("GET", "/v1/nothing-here"), 404)


def test_patch_creates_the_shadow_and_get_returns_it_with_its_version_as_etag(api: Api) -> None:
    r = api("PATCH", SHADOW, {"state": {"desired": {"color": "red"}, "reported": {"on": True}}})
    assert r.status == 200 and r.etag == '"1"'
    doc = r.body
    assert doc["state"] == {
        "desired": {"color": "red"}, "reported": {"on": True}, "delta": {"color": "red"}
    }
    assert doc["version"] == 1 and doc["vv"] == {"admin": 1}  # the token's name is the writer
    assert doc["write"]["concurrent"] is False
    got = api("GET", SHADOW)
    assert got.status == 200 and got.etag == '"1"'
    assert {k: v for k, v in doc.items() if k != "write"} == got.body
    # merge semantics: null deletes, objects merge
    r = api("PATCH", SHADOW, {"state": {"desired": {"color": None, "mode": {"a": 1}}}})
    assert r.body["state"]["desired"] == {"mode": {"a": 1}} and r.etag == '"2"'


def test_if_none_match_answers_304_when_the_version_is_current(api: Api) -> None:
    api("PATCH", SHADOW, {"state": {"reported": {"t": 1}}})
    for tag in ('"1"', 'W/"1"', '"7", "1"', "*"):
        r = api("GET", SHADOW, headers={"If-None-Match": tag})
        assert (r.status, r.raw, r.etag) == (304, b"", '"1"'), tag
    assert api("GET", SHADOW, headers={"If-None-Match": '"0"'}).status == 200
    assert_error(api("GET", SHADOW, headers={"If-None-Match": "garbage"}), 400, "invalid_header")


def test_if_match_on_a_stale_version_is_412_with_the_current_document(api: Api) -> None:
    api("PATCH", SHADOW, {"state": {"desired": {"n": 1}}})
    api("PATCH", SHADOW, {"state": {"desired": {"n": 2}}})
    stale = api("PATCH", SHADOW, {"state": {"desired": {"n": 3}}}, headers={"If-Match": '"1"'})
    body = assert_error(stale, 412, "precondition_failed")
    assert body["version"] == 2 and body["current"]["state"]["desired"] == {"n": 2}
    assert stale.etag == '"2"'
    ok = api("PATCH", SHADOW, {"state": {"desired": {"n": 3}}}, headers={"If-Match": '"2"'})
    assert ok.status == 200 and ok.body["version"] == 3
    # lists and `*`: one of them must be current
    ok = api("PATCH", SHADOW, {"state": {"desired": {"n": 4}}}, headers={"If-Match": '"1", "3"'})
    assert ok.status == 200 and ok.body["version"] == 4
    assert api("PATCH", SHADOW, {"state": {}}, headers={"If-Match": "*"}).status == 200
    # weak tags never match If-Match
    assert_error(api("PATCH", SHADOW, {"state": {}}, headers={"If-Match": 'W/"5"'}), 412)
    # `*` on a missing shadow fails; If-None-Match: * creates only
    missing = "/v1/devices/d2/shadow"
    assert_error(api("PATCH", missing, {"state": {}}, headers={"If-Match": "*"}), 412)
    created = api("PUT", missing, {"state": {"desired": {"x": 1}}}, headers={"If-None-Match": "*"})
    assert created.status == 200 and created.body["version"] == 1
    again = api("PUT", missing, {"state": {"desired": {"x": 2}}}, headers={"If-None-Match": "*"})
    assert assert_error(again, 412)["current"]["state"]["desired"] == {"x": 1}
    # If-Match "0": only if there is no shadow yet
    assert api("PATCH", "/v1/devices/d3/shadow", {"state": {}}, headers={"If-Match": '"0"'}
               ).status == 200
    assert_error(api("PATCH", SHADOW, {"state": {}}, headers={"If-Match": "nope"}), 400)


def test_version_in_the_body_that_is_not_current_is_409_with_the_current_document(
    api: Api,
) -> None:
    api("PATCH", SHADOW, {"state": {"reported": {"a": 1}}})
    r = api("PATCH", SHADOW, {"state": {"reported": {"a": 2}}, "version": 5})
    body = assert_error(r, 409, "version_conflict")
    assert body["version"] == 1 and body["current"]["state"]["reported"] == {"a": 1}
    ok = api("PATCH", SHADOW, {"state": {"reported": {"a": 2}}, "version": 1, "clientToken": "c"})
    assert ok.status == 200 and ok.body["write"]["clientToken"] == "c"
    # If-Match and a body version that disagree: the request is malformed
    bad = api("PATCH", SHADOW, {"state": {}, "version": 1}, headers={"If-Match": '"2"'})
    assert_error(bad, 400, "invalid_update")


def test_put_replaces_both_sections(api: Api) -> None:
    api("PATCH", SHADOW, {"state": {"desired": {"a": 1}, "reported": {"b": 2}}})
    r = api("PUT", SHADOW, {"state": {"reported": {"c": 3}}}, headers={"If-Match": '"1"'})
    assert r.status == 200 and r.etag == '"2"'
    assert r.body["state"] == {"reported": {"c": 3}}
    assert_error(api("PUT", SHADOW, {"state": {}}, headers={"If-Match": '"1"'}), 412)
    assert_error(api("PUT", SHADOW, {"state": {"reported": {"c": None}}}), 400, "invalid_update")
    assert_error(api("PUT", SHADOW, {"state": {}, "version": 9}), 409)


def test_delete_with_if_match_and_recreation_continues_the_numbering(api: Api) -> None:
    api("PATCH", SHADOW, {"state": {"desired": {"a": 1}}})
    api("PATCH", SHADOW, {"state": {"desired": {"a": 2}}})
    assert_error(api("DELETE", SHADOW, headers={"If-Match": '"1"'}), 412)
    r = api("DELETE", SHADOW, headers={"If-Match": '"2"'})
    assert (r.status, r.raw) == (204, b"")
    assert_error(api("GET", SHADOW), 404)
    assert_error(api("DELETE", SHADOW), 404)
    assert_error(api("DELETE", SHADOW, headers={"If-Match": "*"}), 404)
    again = api("PATCH", SHADOW, {"state": {"desired": {"a": 3}}})
    assert again.body["version"] == 4  # 2 writes, the delete, this write
    # a conditional create after the delete: If-None-Match: * works on the tombstone too
    api("DELETE", SHADOW)
    created = api("PATCH", SHADOW, {"state": {"desired": {"b": 1}}},
                  headers={"If-None-Match": "*"})
    assert created.status == 200 and created.body["version"] == 6


def test_changes_since_a_version_resyncs_and_falls_back_to_the_document(api: Api) -> None:
    for i in range(3):
        api("PATCH", SHADOW, {"state": {"desired": {"i": i}}})
    r = api("GET", SHADOW + "/changes?since=1")
    assert r.status == 200 and r.etag == '"3"'
    assert r.body["complete"] is True and [c["version"] for c in r.body["changes"]] == [2, 3]
    assert r.body["changes"][0]["writer"] == "admin"
    assert r.body["changes"][1]["state"] == {"desired": {"i": 2}}
    current = api("GET", SHADOW + "/changes?since=3").body
    assert current["complete"] is True and current["changes"] == []
    ahead = api("GET", SHADOW + "/changes?since=10").body
    assert ahead["complete"] is False and ahead["document"]["version"] == 3
    assert_error(api("GET", SHADOW + "/changes?since=-1"), 400, "invalid_request")
    assert_error(api("GET", SHADOW + "/changes?since=x"), 400, "invalid_request")


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "invalid_request"),
        (b"", 400, "invalid_request"),
        (b"[1, 2]", 400, "invalid_request"),
        (b'{"state": {"desired": {"a": NaN}}}', 400, "invalid_update"),
        ({"state": {"other": {}}}, 400, "invalid_request"),
        ({"state": {"desired": {}}, "extra": 1}, 400, "invalid_request"),
        ({"state": {"desired": {"a": 1}}, "version": "3"}, 400, "invalid_request"),
        ({"state": {"desired": {"a": 1}}, "version": True}, 400, "invalid_request"),
        ({"nostate": 1}, 400, "invalid_request"),
        ({"state": {"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}}, 400,
         "invalid_update"),
        ({"state": {"desired": {"k" * 200: 1}}}, 400, "invalid_update"),
        ({"state": {"desired": {"big": "x" * 9000}}}, 413, "shadow_too_large"),
        (b'{"state": {"desired": {"a": "' + b"x" * 70_000 + b'"}}}', 413, "payload_too_large"),
        (b"[" * 50_000, 400, None),
    ],
)
def test_bad_updates_get_a_json_4xx_and_change_nothing(
    api: Api, body: Any, status: int, error: str | None
) -> None:
    assert_error(api("PATCH", SHADOW, body), status, error)
    assert_error(api("GET", SHADOW), 404)


def test_bad_device_ids_and_headers_are_400(api: Api) -> None:
    assert_error(api("GET", "/v1/devices/%24sys/shadow"), 400, "invalid_device_id")
    assert_error(api("GET", "/v1/devices/a%2Bb/shadow"), 400, "invalid_device_id")
    assert_error(api("GET", "/v1/devices/" + "x" * 129 + "/shadow"), 400, "invalid_device_id")
    assert_error(api("GET", "/v1/devices/x%00/shadow"), 400, "invalid_device_id")
    assert_error(api("PATCH", SHADOW, b"{}", headers={"Content-Type": "text/plain"}), 400)


def test_ids_with_escapes_that_are_not_utf8_are_400_not_a_replacement_character(
    api: Api,
) -> None:
    update = {"state": {"desired": {"on": True}}}
    for path in ("/v1/devices/%FF%FE/shadow", "/v1/devices/a%C3/shadow",
                 "/v1/devices/%ED%A0%80/shadow"):  # the last: a UTF-16 surrogate
        assert_error(api("PATCH", path, update), 400, "invalid_path")
        assert_error(api("GET", path), 400, "invalid_path")
    assert_error(api("GET", "/v1/devices/%FF"), 400, "invalid_path")
    assert_error(api("POST", "/v1/devices/%FF/commands", {"name": "x"}), 400, "invalid_path")
    # Nothing was made under U+FFFD, and a proper escape of a non-ASCII id still works.
    assert api("GET", "/v1/devices/%EF%BF%BD%EF%BF%BD/shadow").status == 404
    assert api("PATCH", "/v1/devices/caf%C3%A9/shadow", update).status == 200
    assert api("GET", "/v1/devices/caf%C3%A9/shadow").body["state"]["desired"] == {"on": True}


# --------------------------------------------------------------------------- MQTT and REST


def test_desired_change_over_rest_reaches_the_mqtt_device_as_a_delta(gw: Any, api: Api) -> None:
    dev = Device(gw, "dev-r1")
    dev.request("update", {"state": {"reported": {"fan": "off"}}})
    dev.next_message("update/accepted")
    r = api("PATCH", "/v1/devices/dev-r1/shadow", {"state": {"desired": {"fan": "on"}}},
            headers={"If-Match": '"1"'})
    assert r.status == 200
    delta = dev.next_message("update/delta")
    assert delta["state"] == {"fan": "on"} and delta["version"] == 2
    # the device reports the change; REST and MQTT show the same document
    dev.request("update", {"state": {"reported": {"fan": "on"}}})
    dev.next_message("update/accepted")
    dev.request("get", {})
    over_mqtt = dev.next_message("get/accepted")
    over_rest = api("GET", "/v1/devices/dev-r1/shadow")
    assert over_rest.body == over_mqtt
    assert over_rest.etag == f'"{over_mqtt["version"]}"' and "delta" not in over_rest.body["state"]
    assert set(over_rest.body["vv"]) == {gw.gateway.node_id, "admin"}


def test_concurrent_rest_writers_with_if_match_retries_lose_no_update(api: Api) -> None:
    path = "/v1/devices/counter/shadow"
    assert api("PATCH", path, {"state": {"desired": {"n": 0}}}).status == 200
    conflicts = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def increment() -> None:
        current = api("GET", path)
        for _ in range(1000):
            assert current.status == 200, current.raw
            doc = current.body if "state" in current.body else current.body["current"]
            n = doc["state"]["desired"]["n"]
            r = api("PATCH", path, {"state": {"desired": {"n": n + 1}}},
                    headers={"If-Match": f'"{doc["version"]}"'})
            if r.status == 200:
                return
            if r.status != 412:
                errors.append(f"{r.status} {r.raw!r}")
                return
            with lock:
                conflicts[0] += 1
            current = Reply(200, {}, json.dumps(r.body["current"]).encode())
        errors.append("gave up")

    threads = [threading.Thread(target=increment) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    final = api("GET", path).body
    assert final["state"]["desired"]["n"] == 50 and final["version"] == 51
    assert conflicts[0] > 0  # they did race
    metrics = api("GET", "/metrics", token=None).raw.decode()
    assert _metric(metrics, "iotgw_shadow_writes_total") == 51
    assert _metric(metrics, "iotgw_shadow_conflicts_total") == conflicts[0]


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m is not None, name
    return float(m.group(1))


def test_shadow_metrics_count_writes_invalid_and_latency_by_operation(api: Api) -> None:
    api("PATCH", SHADOW, {"state": {"desired": {"a": 1}}})
    api("PATCH", SHADOW, {"state": {"desired": {"a": 2}}, "version": 7})
    api("PATCH", SHADOW, {"state": {"desired": {"a": "x" * 9000}}})
    api("GET", SHADOW)
    text = api("GET", "/metrics", token=None).raw.decode()
    assert _metric(text, "iotgw_shadow_writes_total") == 1
    assert _metric(text, "iotgw_shadow_conflicts_total") == 1
    assert _metric(text, "iotgw_shadow_invalid_total") == 1
    assert _metric(
        text, "iotgw_shadow_request_duration_seconds_count",
        '{operation="update",protocol="rest"}',
    ) == 3
    assert _metric(
        text, "iotgw_shadow_request_duration_seconds_count", '{operation="get",protocol="rest"}'
    ) == 1


# --------------------------------------------------------------------------- tokens


def test_requests_without_a_valid_token_are_401_with_a_bearer_challenge(api: Api) -> None:
    for token in (None, "wrong", "iotgw_000000000000_" + "x" * 43):
        r = api("GET", SHADOW, token=token)
        assert_error(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = api("GET", SHADOW, token=None, headers={"Authorization": "Basic dTpw"})
    assert_error(r, 401, "invalid_request")
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert api("GET", path, token=None).status == 200, path


def test_a_gateway_without_any_token_refuses_and_says_how_to_make_one(
    gateway_factory: Any,
) -> None:
    api = Api(gateway_factory(), token=None)
    body = assert_error(api("GET", SHADOW), 401, "no_api_tokens")
    assert "iotgw tokens create" in body["detail"] and "--api-token" in body["detail"]
    assert_error(api("GET", SHADOW, token="anything"), 401, "no_api_tokens")


def test_tokens_cli_creates_lists_and_revokes_scoped_tokens(
    gw: Any, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = str(gw.gateway.data_dir)

    def run(*args: str) -> tuple[int, str]:
        code = cli.main(["tokens", "--data-dir", data_dir, *args])
        return code, capsys.readouterr().out.strip()

    code, reader = run("create", "--name", "dash", "--scope", "shadow:read,devices:read")
    assert code == 0 and reader.startswith("iotgw_")
    code, writer = run("create", "--name", "app1", "--scope", "shadow:read,shadow:write")
    assert code == 0
    assert run("create", "--name", "app1", "--scope", "shadow:read")[0] == 2  # duplicate
    assert run("create", "--name", "x", "--scope", "root")[0] == 2  # unknown scope
    code, listing = run("list")
    lines = [line.split("\t") for line in listing.splitlines()]
    assert [(n, s) for n, s, _ in lines] == [
        ("app1", "shadow:read,shadow:write"), ("dash", "devices:read,shadow:read")
    ]
    stored = b"".join(p.read_bytes() for p in gw.gateway.data_dir.glob("registry.sqlite*"))
    assert reader.split("_")[-1].encode() not in stored  # only hashes

    # the running gateway takes them at once; the token's name is its writer id
    r = api("PATCH", SHADOW, {"state": {"desired": {"a": 1}}}, token=writer)
    assert r.status == 200 and r.body["vv"] == {"app1": 1}
    assert api("GET", SHADOW, token=reader).status == 200
    assert api("GET", "/v1/devices", token=reader).status == 200
    denied = api("PATCH", SHADOW, {"state": {}}, token=reader)
    assert_error(denied, 403, "insufficient_scope")
    assert 'error="insufficient_scope"' in denied.headers["www-authenticate"]
    assert_error(api("GET", "/v1/devices", token=writer), 403)
    assert_error(api("POST", "/v1/devices/d1/commands", {"name": "x"}, token=writer), 403)

    assert run("revoke", "app1")[0] == 0
    assert_error(api("GET", SHADOW, token=writer), 401, "invalid_token")
    assert api("GET", SHADOW, token=reader).status == 200
    assert run("revoke", "app1")[0] == 2


# --------------------------------------------------------------------------- devices


def test_device_status_shows_connection_protocol_peer_and_last_seen(gw: Any, api: Api) -> None:
    v5 = Device(gw, "dev-a", version=5)
    v4 = Device(gw, "dev-b", version=4)
    v5.request("update", {"state": {"reported": {"x": 1}}})
    v5.next_message("update/accepted")
    r = api("GET", "/v1/devices/dev-a")
    assert r.status == 200, r.raw
    info = r.body
    assert info["registered"] is True and info["online"] is True
    assert info["protocol"] == "mqtt5.0" and info["node"] == gw.gateway.node_id
    assert info["peer"].startswith("127.0.0.1:") and info["shadow_version"] == 1
    seen = datetime.fromisoformat(info["last_seen"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - seen).total_seconds()) < 10
    assert info["session"]["subscriptions"] == ["$shadow/dev-a/#"]
    b = api("GET", "/v1/devices/dev-b").body
    assert b["protocol"] == "mqtt3.1.1" and b["shadow_version"] is None and b["online"]
    v4.raw.close()
    gw.gateway.registry.add("only-registered", "pw")
    offline = api("GET", "/v1/devices/only-registered").body
    assert offline["online"] is False and offline["last_seen"] is None
    assert offline["node"] is None and offline["session"] is None
    assert_error(api("GET", "/v1/devices/nobody"), 404, "unknown_device")


def test_device_list_is_the_union_of_registry_sessions_and_shadows_in_pages(
    gw: Any, api: Api
) -> None:
    for d in ("a1", "c3"):
        gw.gateway.registry.add(d, "pw")
    for d in ("b2", "c3", "e5"):
        api("PATCH", f"/v1/devices/{d}/shadow", {"state": {"reported": {"x": 1}}})
    online = Device(gw, "d4")  # registered by the helper, and online
    everything = api("GET", "/v1/devices").body
    assert [d["id"] for d in everything["devices"]] == ["a1", "b2", "c3", "d4", "e5"]
    assert everything["next"] is None
    by_id = {d["id"]: d for d in everything["devices"]}
    assert by_id["c3"] == {"id": "c3", "registered": True, "online": False, "shadow": True}
    assert by_id["d4"]["online"] is True and by_id["b2"]["registered"] is False
    seen: list[str] = []
    after: str | None = None
    while True:
        query = f"?limit=2&after={after}" if after else "?limit=2"
        page = api("GET", "/v1/devices" + query).body
        seen += [d["id"] for d in page["devices"]]
        after = page["next"]
        if after is None:
            break
    assert seen == ["a1", "b2", "c3", "d4", "e5"]
    assert_error(api("GET", "/v1/devices?limit=0"), 400)
    assert_error(api("GET", "/v1/devices?limit=5000"), 400)
    online.raw.close()


# --------------------------------------------------------------------------- commands


class CommandDevice:
    """A registered device on paho-mqtt that answers each command on its response topic with
    the correlation data (MQTT 5), or not at all (answer=False)."""

    def __init__(self, gw: Any, device_id: str, *, answer: bool = True,
                 protocol: int = paho.MQTTv5, persistent: bool = False) -> None:
        if gw.gateway.registry.get(device_id) is None:
            gw.gateway.registry.add(device_id, "pw")
        self.id = device_id
        self.answer = answer
        self.received: list[paho.MQTTMessage] = []
        self.got = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id,
                                  protocol=protocol,
                                  clean_session=None if protocol == paho.MQTTv5 else True)
        self.client.username_pw_set(device_id, "pw")
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        kw: dict[str, Any] = {}
        if protocol == paho.MQTTv5:
            props = PahoProperties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if persistent else 0
            kw = {"clean_start": not persistent, "properties": props}
        self.client.connect("127.0.0.1", gw.mqtt_port, **kw)
        self.client.loop_start()
        assert connected.wait(5)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.subscribe(f"devices/{device_id}/commands/+", 1)
        assert subscribed.wait(5)

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.got:
            self.received.append(msg)
            self.got.notify_all()
        if not self.answer:
            return
        request = json.loads(msg.payload)
        reply = json.dumps({"ok": True, "echo": request}).encode()
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) or f"{msg.topic}/response"
        out = PahoProperties(PacketTypes.PUBLISH)
        if props is not None and hasattr(props, "CorrelationData"):
            out.CorrelationData = props.CorrelationData
            out.ContentType = "application/json"
            client.publish(response_topic, reply, 1, properties=out)
        else:
            client.publish(response_topic, reply, 1)

    def wait(self, count: int) -> list[paho.MQTTMessage]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.received) >= count, 5)
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_command_round_trip_returns_the_devices_reply(gw: Any, api: Api) -> None:
    dev = CommandDevice(gw, "cmd-1")
    r = api("POST", "/v1/devices/cmd-1/commands",
            {"name": "reboot", "payload": {"delay": 5}, "timeout_s": 5})
    assert r.status == 200, r.raw
    assert r.body["status"] == "answered" and r.body["content_type"] == "application/json"
    assert r.body["response"] == {"ok": True, "echo": {"delay": 5}}
    (msg,) = dev.wait(1)
    assert msg.topic == "devices/cmd-1/commands/reboot"
    assert msg.properties.ResponseTopic == "devices/cmd-1/commands/reboot/response"
    assert msg.properties.CorrelationData == r.body["id"].encode()
    # several commands in flight at once each get their own reply
    results: list[Reply] = []

    def send(i: int) -> None:
        results.append(api("POST", "/v1/devices/cmd-1/commands",
                           {"name": "n", "payload": i, "timeout_s": 5}))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.body["response"]["echo"] for r in results) == [0, 1, 2, 3, 4]
    dev.close()


def test_mqtt311_device_reply_without_correlation_data_answers_the_waiting_command(
    gw: Any, api: Api
) -> None:
    dev = CommandDevice(gw, "cmd-4", protocol=paho.MQTTv311)
    r = api("POST", "/v1/devices/cmd-4/commands", {"name": "ping", "payload": 1, "timeout_s": 5})
    assert r.status == 200 and r.body["response"]["echo"] == 1
    dev.close()


def test_command_without_waiting_or_without_a_reply_is_202_with_its_id(
    gw: Any, api: Api
) -> None:
    dev = CommandDevice(gw, "cmd-2", answer=False)
    r = api("POST", "/v1/devices/cmd-2/commands", {"name": "blink", "payload": "fast"})
    assert r.status == 202 and r.body["status"] == "delivered" and len(r.body["id"]) == 32
    (msg,) = dev.wait(1)
    assert msg.payload == b"fast"  # a string goes as text
    start = time.monotonic()
    late = api("POST", "/v1/devices/cmd-2/commands", {"name": "x", "timeout_s": 0.3})
    assert late.status == 202 and late.body["status"] == "delivered"
    assert time.monotonic() - start >= 0.3
    dev.close()


def test_command_to_an_offline_device_is_404_or_queued_in_its_persistent_session(
    gw: Any, api: Api
) -> None:
    assert_error(api("POST", "/v1/devices/ghost/commands", {"name": "x"}), 404, "device_offline")
    dev = CommandDevice(gw, "cmd-3", answer=False, persistent=True)
    dev.close()
    deadline = time.monotonic() + 5
    while api("GET", "/v1/devices/cmd-3").body["online"] and time.monotonic() < deadline:
        time.sleep(0.05)
    r = api("POST", "/v1/devices/cmd-3/commands", {"name": "update", "payload": [1, 2],
                                                   "timeout_s": 2})
    assert r.status == 202 and r.body["status"] == "queued"
    assert api("GET", "/v1/devices/cmd-3").body["session"]["queued_messages"] == 1
    back = CommandDevice(gw, "cmd-3", answer=False, persistent=True)
    assert json.loads(back.wait(1)[0].payload) == [1, 2]
    back.close()


def test_bad_commands_are_400_and_unsubscribed_devices_409(gw: Any, api: Api) -> None:
    plain = Device(gw, "plain")  # online, subscribed only to its shadow topics
    assert_error(api("POST", "/v1/devices/plain/commands", {"name": "x"}), 409, "not_subscribed")
    for body in ({"name": "a/b"}, {"name": ""}, {"name": "x", "timeout_s": 31},
                 {"payload": 1}, {"name": "x", "other": 1}, {"name": "#"}):
        assert_error(api("POST", "/v1/devices/plain/commands", body), 400, "invalid_request")
    plain.raw.close()


def test_metrics_have_no_created_series_and_answer_head(api: Api) -> None:
    """Prometheus keeps a `_created` series per counter as a separate time series: clutter
    that doubles the counters a scrape carries. HEAD is how probes check the endpoint."""
    got = api("GET", "/metrics", token=None)
    assert got.status == 200 and got.headers["content-type"].startswith("text/plain")
    text = got.raw.decode()
    assert "iotgw_mqtt_connects_total" in text
    assert "_created" not in text
    head = api("HEAD", "/metrics", token=None)
    assert head.status == 200 and head.raw == b""
    assert head.headers["content-type"] == got.headers["content-type"]
