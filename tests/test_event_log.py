"""Operators see connects, disconnects, authentication failures, bans and ACL denials in the
log, with client id, peer address, protocol and reason, and a flood does not flood the log."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from test_mqtt_server import RawClient

from gateway._native import mqtt
from gateway.events import EventLog
from gateway.metrics import EventMetrics


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def _wait_for(caplog: pytest.LogCaptureFixture, event: str, count: int = 1) -> None:
    deadline = time.monotonic() + 5
    while len(_events(caplog, event)) < count:
        assert time.monotonic() < deadline, f"no {event} logged"
        time.sleep(0.01)


def test_mqtt_connects_refusals_denials_and_disconnects_are_logged(
    gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iotgw.events")
    gw = gateway_factory()
    gw.gateway.registry.add("dev-1", "secret-1")
    bad = RawClient(gw.mqtt_port, version=5)
    assert bad.connect("dev-1", username="dev-1", password=b"nope").reason_code == 0x86
    bad.close()
    dev = RawClient(gw.mqtt_port, version=5)
    assert dev.connect("dev-1", username="dev-1", password=b"secret-1").reason_code == 0
    dev.send(mqtt.Subscribe(1, [mqtt.Subscription("devices/dev-2/commands/#", 1)]).encode(5))
    assert dev.recv().type == mqtt.SUBACK
    dev.send(mqtt.Disconnect().encode(5))
    dev.close()
    _wait_for(caplog, "disconnect")

    (refused,) = _events(caplog, "auth_failure")
    assert (refused.protocol, refused.client_id, refused.reason) == (  # type: ignore[attr-defined]
        "mqtt", "dev-1", "bad_credentials")
    assert refused.peer.startswith("127.0.0.1:")  # type: ignore[attr-defined]
    (connected,) = _events(caplog, "connect")
    assert connected.client_id == "dev-1"  # type: ignore[attr-defined]
    (denied,) = _events(caplog, "acl_denial")
    assert (denied.action, denied.topic) == (  # type: ignore[attr-defined]
        "subscribe", "devices/dev-2/commands/#")
    (gone,) = _events(caplog, "disconnect")
    assert gone.reason == "DISCONNECT from the client"  # type: ignore[attr-defined]
    assert "client_id=dev-1" in gone.getMessage()


def test_a_flood_of_one_event_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iotgw.events")
    now = [0.0]
    metrics = EventMetrics(CollectorRegistry())
    events = EventLog(metrics, rate=10, burst=20, clock=lambda: now[0])
    for i in range(1000):  # a thousand refusals within one second
        now[0] = i / 1000
        events.refused("coap", f"dev-{i}", "127.0.0.2:5000", "denied")
    lines = _events(caplog, "auth_failure")
    assert 20 <= len(lines) <= 31
    assert metrics.suppressed.labels("auth_failure")._value.get() == 1000 - len(lines)
    now[0] = 10.0
    events.refused("coap", "dev-x", "127.0.0.2:5000", "denied")
    # Each line says how many of its kind were left out since the line before it.
    said = sum(getattr(r, "suppressed", 0) for r in _events(caplog, "auth_failure"))
    assert said == 1000 - len(lines)
