"""The registry seen from a running gateway: REST provisioning, removed or disabled devices
lose their MQTT connection, session and CoAP observations (whether the change came from the
CLI in another process or from the REST API), and an unreadable registry file is answered with
"try later" (CONNACK 0x88 / 3.1.1 rc 3, REST 503), logged once, until it is readable again."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiocoap
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from test_mqtt_server import RawClient
from test_rest_api import ADMIN, Api, assert_error

from gateway._native import mqtt

V4_SERVER_UNAVAILABLE, V4_NOT_AUTHORIZED = 3, 5


class Device:
    """A paho MQTT 5 device that records its CONNACK and the server's DISCONNECT."""

    def __init__(self, port: int, device: str, password: str, persistent: bool = True) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5
        )
        self.client.username_pw_set(device, password)
        self.connack: Any = None
        self.disconnect_reason: Any = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        props = PahoProperties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.connected.wait(5), "no CONNACK"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason
        self.connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _connack_v4(port: int, device: str, password: bytes) -> int:
    raw = RawClient(port, version=4)
    try:
        return int(raw.connect(device, username=device, password=password).reason_code)
    finally:
        raw.close()


@pytest.fixture
def gw(gateway_factory: Any) -> Any:
    return gateway_factory(api_token=ADMIN)


def test_rest_provisioning_creates_removes_disables_and_enables_devices(gw: Any) -> None:
    api = Api(gw)
    made = api("POST", "/v1/devices", {"id": "rest-1"})
    assert made.status == 201, made.raw
    assert made.body["id"] == "rest-1" and made.headers["location"] == "/v1/devices/rest-1"
    password = made.body["password"]
    dev = Device(gw.mqtt_port, "rest-1", password)  # the returned password works at once
    assert dev.connack == 0
    dev.close()
    given = api("POST", "/v1/devices", {"id": "rest-2", "password": "mine"})
    assert given.status == 201 and given.body == {"id": "rest-2", "password": None}
    assert gw.gateway.registry.verify("rest-2", b"mine")
    assert_error(api("POST", "/v1/devices", {"id": "rest-2"}), 409, "device_exists")
    assert_error(api("POST", "/v1/devices", {"id": "a/b"}), 400, "invalid_device_id")
    # bodies that do not fit the schema: 400 with the problems listed, as everywhere in /v1
    for bad in ({"id": ""}, {"id": "x", "password": 5}, {"id": "x", "root": True}, [1]):
        assert_error(api("POST", "/v1/devices", bad), 400, "invalid_request")
    assert gw.gateway.registry.get("x") is None
    assert api("POST", "/v1/devices/rest-2/disable").status == 204
    assert not gw.gateway.registry.verify("rest-2", b"mine")
    assert api("POST", "/v1/devices/rest-2/enable").status == 204
    assert gw.gateway.registry.verify("rest-2", b"mine")
    assert api("DELETE", "/v1/devices/rest-2").status == 204
    assert_error(api("DELETE", "/v1/devices/rest-2"), 404, "unknown_device")
    assert_error(api("POST", "/v1/devices/nobody/disable"), 404, "unknown_device")
    listed = api("GET", "/v1/devices").body["devices"]
    assert [(d["id"], d["registered"]) for d in listed] == [("rest-1", True)]


def test_provisioning_takes_any_unicode_id_and_refuses_unpaired_surrogates(gw: Any) -> None:
    api = Api(gw)
    made = api("POST", "/v1/devices", {"id": "ключ 1"})
    assert made.status == 201, made.raw
    assert made.headers["location"] == "/v1/devices/%D0%BA%D0%BB%D1%8E%D1%87%201"
    assert gw.gateway.registry.verify("ключ 1", made.body["password"].encode())
    # JSON may carry a lone surrogate, which no topic or UTF-8 file can hold
    assert_error(api("POST", "/v1/devices", b'{"id": "x\\udc00"}'), 400, "invalid_request")


def test_provisioning_needs_the_devices_write_scope(gw: Any) -> None:
    reader = gw.gateway.tokens.create("dash", "devices:read")
    writer = gw.gateway.tokens.create("provisioner", "devices:write")
    api = Api(gw)
    assert_error(api("POST", "/v1/devices", {"id": "d"}, token=reader), 403, "insufficient_scope")
    assert_error(api("DELETE", "/v1/devices/d", token=reader), 403, "insufficient_scope")
    assert api("POST", "/v1/devices", {"id": "d"}, token=writer).status == 201
    assert api("DELETE", "/v1/devices/d", token=writer).status == 204


def test_removing_a_device_from_the_cli_disconnects_it_and_ends_its_session(gw: Any) -> None:
    gw.gateway.registry.add("dev-1", "pw1")
    gw.gateway.registry.add("dev-2", "pw2")
    dev = Device(gw.mqtt_port, "dev-1", "pw1")
    other = Device(gw.mqtt_port, "dev-2", "pw2")
    assert dev.connack == 0 and gw.call(lambda: "dev-1" in gw.gateway.broker.sessions)
    removed = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "devices", "--data-dir", str(gw.gateway.data_dir),
         "remove", "dev-1"],
        capture_output=True, text=True, timeout=60,
    )
    assert removed.returncode == 0, removed.stderr
    assert dev.disconnected.wait(5), "the removed device is still connected"  # the sweep
    assert dev.disconnect_reason == mqtt.ADMINISTRATIVE_ACTION
    dev.client.loop_stop()
    assert not gw.call(lambda: "dev-1" in gw.gateway.broker.sessions)  # persistent: ended
    assert gw.call(lambda: "dev-2" in gw.gateway.broker.online)  # the others stay
    assert not other.disconnected.is_set()
    other.close()
    assert _connack_v4(gw.mqtt_port, "dev-1", b"pw1") == 4  # bad credentials now


def test_disabling_a_device_disconnects_it_and_refuses_its_connects_until_enabled(
    gw: Any,
) -> None:
    gw.gateway.registry.add("dev-3", "pw3")
    api = Api(gw)
    raw = RawClient(gw.mqtt_port, version=4)  # MQTT 3.1.1: no DISCONNECT, the socket closes
    assert raw.connect("dev-3", username="dev-3", password=b"pw3", clean_start=False,
                       keep_alive=60).reason_code == 0
    assert api("POST", "/v1/devices/dev-3/disable").status == 204
    assert raw.recv() is None  # closed at once (the REST call acted, not the next sweep)
    raw.close()
    assert gw.call(lambda: "dev-3" in gw.gateway.broker.sessions)  # disabled: session kept
    assert _connack_v4(gw.mqtt_port, "dev-3", b"pw3") == V4_NOT_AUTHORIZED
    v5 = RawClient(gw.mqtt_port, version=5)
    assert v5.connect("dev-3", username="dev-3", password=b"pw3").reason_code == (
        mqtt.NOT_AUTHORIZED
    )
    v5.close()
    assert api("POST", "/v1/devices/dev-3/enable").status == 204
    assert _connack_v4(gw.mqtt_port, "dev-3", b"pw3") == 0


def test_removing_a_device_ends_its_coap_observation_and_its_token(gw: Any) -> None:
    gw.gateway.registry.add("dev-4", "pw4")
    api = Api(gw)
    base = f"coap://127.0.0.1:{gw.coap_port}"

    async def run() -> tuple[Any, Any, Any]:
        ctx = await aiocoap.Context.create_client_context()
        try:
            msg = aiocoap.Message(code=aiocoap.GET, uri=f"{base}/shadow/dev-4/delta?t=pw4",
                                  observe=0)
            pr = ctx.request(msg)
            first = await asyncio.wait_for(pr.response, 10)
            notifications = pr.observation.__aiter__()
            status = await asyncio.to_thread(lambda: api("DELETE", "/v1/devices/dev-4").status)
            assert status == 204
            try:
                ended: Any = await asyncio.wait_for(notifications.__anext__(), 5)
            except (StopAsyncIteration, aiocoap.error.Error) as exc:
                ended = exc
            post = aiocoap.Message(code=aiocoap.POST, uri=f"{base}/telemetry/dev-4?t=pw4",
                                   payload=b"1")
            after = await asyncio.wait_for(ctx.request(post).response, 10)
            return first, ended, after
        finally:
            await ctx.shutdown()

    first, ended, after = asyncio.run(run())
    assert first.code == aiocoap.CONTENT and first.opt.observe is not None
    # the server ended the observation (a final 4.01, which aiocoap takes as the end; a silent
    # server would have been a TimeoutError above)
    assert isinstance(ended, StopAsyncIteration | aiocoap.error.Error), ended
    assert gw.call(lambda: len(gw.gateway.coap.observers)) == 0
    assert after.code == aiocoap.UNAUTHORIZED  # no remembered token check lets it in


def test_an_unreadable_registry_refuses_connects_and_rest_with_try_later_then_recovers(
    gw: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "iotgw")
    registry = gw.gateway.registry
    registry.add("dev-5", "pw5")
    path = gw.gateway.data_dir / "registry.sqlite"
    good = tmp_path / "good.sqlite"
    with sqlite3.connect(path) as src, sqlite3.connect(good) as dst:
        src.backup(dst)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00garbage" * 4096)
    os.replace(garbage, path)
    gw.call(gw.gateway.registry_changed)  # what the sweep does every half second
    api = Api(gw)
    for _ in range(3):
        assert _connack_v4(gw.mqtt_port, "dev-5", b"pw5") == V4_SERVER_UNAVAILABLE
        v5 = RawClient(gw.mqtt_port, version=5)
        assert v5.connect("dev-5", username="dev-5", password=b"pw5").reason_code == (
            mqtt.SERVER_UNAVAILABLE
        )
        v5.close()
        assert_error(api("GET", "/v1/devices"), 503, "registry_unavailable")
        assert_error(api("GET", "/v1/devices/dev-5"), 503, "registry_unavailable")
        assert_error(api("POST", "/v1/devices", {"id": "x"}), 503, "registry_unavailable")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "registry.sqlite is unreadable" in errors[0].getMessage(), [
        r.getMessage() for r in errors
    ]
    os.replace(good, path)  # the operator restores it
    gw.call(gw.gateway.registry_changed)
    assert _connack_v4(gw.mqtt_port, "dev-5", b"pw5") == 0
    assert api("GET", "/v1/devices/dev-5").status == 200
