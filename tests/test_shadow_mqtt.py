"""Device shadows over MQTT: the `$shadow/{id}/...` topics (AWS IoT scheme) on a real gateway."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from test_mqtt_server import RawClient

from gateway._native import mqtt
from gateway.telemetry.filesink import read_records


class Device:
    """A registered device (device ACL) subscribed to its own `$shadow/{id}/#`."""

    def __init__(self, gw: Any, device_id: str, version: int = 5) -> None:
        gw.gateway.registry.add(device_id, "pw")
        self.id = device_id
        self.raw = RawClient(gw.mqtt_port, version=version)
        assert self.raw.connect(device_id, username=device_id, password=b"pw").reason_code == 0
        self.raw.send(mqtt.Subscribe(1, [mqtt.Subscription(f"$shadow/{device_id}/#", 1)])
                      .encode(version))
        assert self.raw.recv().type == mqtt.SUBACK
        self.pid = 10

    def request(self, operation: str, body: Any, qos: int = 1) -> None:
        self.pid += 1
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.raw.send(mqtt.encode_publish(f"$shadow/{self.id}/{operation}", payload, qos=qos,
                                          packet_id=self.pid if qos else 0,
                                          version=self.raw.version))

    def next_message(self, suffix: str) -> dict[str, Any]:
        """The next PUBLISH on `$shadow/{id}/{suffix}`, acknowledging what arrives."""
        while True:
            packet = self.raw.recv()
            assert packet is not None, "connection closed"
            if packet.type != mqtt.PUBLISH:
                continue
            if packet.qos:
                self.raw.send(mqtt.encode_ack(mqtt.PUBACK, packet.packet_id,
                                              version=self.raw.version))
            if packet.topic == f"$shadow/{self.id}/{suffix}":
                doc: dict[str, Any] = json.loads(bytes(packet.payload))
                return doc


def _service_call(gw: Any, coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, gw.loop).result(10)


def test_device_report_is_accepted_with_a_version_and_client_token(gateway_factory: Any) -> None:
    gw = gateway_factory()
    dev = Device(gw, "dev-1")
    dev.request("update", {"state": {"reported": {"temp": 21}}, "clientToken": "t1"})
    accepted = dev.next_message("update/accepted")
    assert accepted["state"] == {"reported": {"temp": 21}}
    assert accepted["version"] == 1 and accepted["clientToken"] == "t1"
    documents = dev.next_message("update/documents")
    assert documents["current"]["state"]["reported"] == {"temp": 21}
    dev.request("get", {})
    doc = dev.next_message("get/accepted")
    assert doc["state"]["reported"] == {"temp": 21} and doc["version"] == 1


def test_desired_change_from_the_service_reaches_the_device_as_a_delta(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory()
    dev = Device(gw, "dev-2")
    dev.request("update", {"state": {"reported": {"fan": "off"}}})
    dev.next_message("update/accepted")
    _service_call(gw, gw.gateway.shadows.update(
        "dev-2", {"state": {"desired": {"fan": "on"}}}, writer="app-1"))
    delta = dev.next_message("update/delta")
    assert delta["state"] == {"fan": "on"} and delta["version"] == 2
    # Resync: the changes since version 1, e.g. after a reconnect that missed the delta.
    dev.request("get", {"since": 1})
    changes = dev.next_message("get/accepted")
    assert changes["version"] == 2 and changes["complete"] is True
    assert [c["version"] for c in changes["changes"]] == [2]


def test_bad_requests_are_rejected_with_a_code(gateway_factory: Any) -> None:
    gw = gateway_factory()
    dev = Device(gw, "dev-3")
    dev.request("update", b"{not json")
    assert dev.next_message("update/rejected")["code"] == 400
    dev.request("update", {"state": {"reported": {"a": 1}}, "clientToken": "c"})
    dev.next_message("update/accepted")
    dev.request("update", {"state": {"reported": {"a": 2}}, "version": 7, "clientToken": "c"})
    rejected = dev.next_message("update/rejected")
    assert rejected["code"] == 409 and rejected["clientToken"] == "c"
    dev.request("update", {"state": {"reported": {"x": "y" * 9000}}})
    assert dev.next_message("update/rejected")["code"] == 413
    dev.request("get", {"since": -1})
    assert dev.next_message("get/rejected")["code"] == 400


def test_late_report_never_overwrites_a_newer_one(gateway_factory: Any) -> None:
    gw = gateway_factory()
    dev = Device(gw, "dev-4")
    dev.request("update", {"state": {"reported": {"temp": 25}}, "seq": 3})
    dev.next_message("update/accepted")
    dev.request("update", {"state": {"reported": {"temp": 19, "hum": 40}}, "seq": 2})
    dev.next_message("update/accepted")
    dev.request("get", {})
    assert dev.next_message("get/accepted")["state"]["reported"] == {"temp": 25, "hum": 40}


def test_reply_topics_are_the_gateways_and_other_devices_shadows_are_off_limits(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory()
    dev = Device(gw, "dev-5")
    for topic in ("$shadow/dev-5/update/accepted", "$shadow/dev-6/update"):
        dev.raw.send(mqtt.encode_publish(topic, b"{}", qos=1, packet_id=3, version=5))
        ack = dev.raw.recv()
        assert (ack.type, ack.reason_code) == (mqtt.PUBACK, mqtt.NOT_AUTHORIZED), topic


def test_qos1_shadow_request_is_acknowledged_once_stored_and_recorded(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory()
    dev = Device(gw, "dev-7", version=4)
    dev.request("update", {"state": {"reported": {"on": True}}})
    while dev.raw.recv().type != mqtt.PUBACK:
        pass
    stored = _service_call(gw, gw.gateway.shadows.store.get("dev-7"))
    assert stored is not None and stored.version == 1  # stored before the PUBACK left
    _service_call(gw, gw.gateway.telemetry.drain())
    records = [r for r in read_records(gw.gateway.data_dir / "telemetry") if r.kind == "shadow"]
    assert [r.device for r in records] == ["dev-7"]
    assert json.loads(records[0].payload)["state"] == {"reported": {"on": True}}


def test_delete_is_accepted_with_the_version_of_the_delete(gateway_factory: Any) -> None:
    gw = gateway_factory()
    dev = Device(gw, "dev-8")
    dev.request("update", {"state": {"reported": {"a": 1}}})
    assert dev.next_message("update/accepted")["version"] == 1
    dev.request("delete", {})
    assert dev.next_message("delete/accepted")["version"] == 2
    dev.request("delete", {})
    assert dev.next_message("delete/rejected")["code"] == 404
    dev.request("update", {"state": {"reported": {"a": 2}}})
    assert dev.next_message("update/accepted")["version"] == 3  # continues after the delete
