"""$SYS/brokers/{node}/...: broker statistics every --sys-interval seconds, readable by a service
account the ACL file allows, not by devices; nobody publishes under $SYS/ but the gateway."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from test_mqtt_server import RawClient

from gateway import __version__
from gateway._native import mqtt
from gateway.config import ConfigError, parse


def test_a_service_account_reads_the_statistics_and_a_device_may_not(
    gateway_factory: Any, tmp_path: Path
) -> None:
    acl = tmp_path / "acl.toml"
    acl.write_text('[[service]]\nname = "monitor"\nsubscribe = ["$SYS/#"]\n')
    gw = gateway_factory(acl_file=str(acl), sys_interval=1, node_id="gw-a")
    gw.gateway.registry.add("monitor", "m-pw")
    gw.gateway.registry.add("dev-1", "d-pw")
    device = RawClient(gw.mqtt_port, version=5)
    assert device.connect("dev-1", username="dev-1", password=b"d-pw").reason_code == 0
    device.send(mqtt.Subscribe(1, [mqtt.Subscription("$SYS/#")]).encode(5))
    assert device.recv().reason_codes == [mqtt.NOT_AUTHORIZED]
    for _ in range(10):  # some traffic to count (its own topic: allowed)
        device.send(mqtt.encode_publish("devices/dev-1/telemetry", b"0123456789", qos=0,
                                        version=5))
    device.send(mqtt.encode_publish("$SYS/brokers/gw-a/version", b"fake", qos=1,
                                    packet_id=2, version=5))
    assert device.recv().reason_code == mqtt.NOT_AUTHORIZED  # PUBACK 0x87: $SYS is the gateway's

    received: dict[str, list[str]] = {}
    monitor = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="mon")
    monitor.username_pw_set("monitor", "m-pw")
    monitor.on_message = lambda c, u, m: received.setdefault(m.topic, []).append(
        m.payload.decode())
    monitor.connect("127.0.0.1", gw.mqtt_port)
    monitor.subscribe("$SYS/#", 0)
    monitor.loop_start()
    prefix = "$SYS/brokers/gw-a/"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(received.get(prefix + "uptime", [])) < 2:
            time.sleep(0.05)
    finally:
        monitor.loop_stop()
        monitor.disconnect()
    assert received[prefix + "version"][-1] == __version__
    assert [int(v) for v in received[prefix + "uptime"]][-2:] == sorted(
        int(v) for v in received[prefix + "uptime"][-2:])
    assert int(received[prefix + "clients/connected"][-1]) == 2  # the device and the monitor
    assert int(received[prefix + "messages/received"][-1]) >= 10
    assert int(received[prefix + "bytes/received"][-1]) > 100
    assert float(received[prefix + "bytes/sent/per_second"][-1]) > 0  # the round before
    device.close()


def test_sys_interval_0_publishes_nothing_and_a_negative_one_is_refused(
    gateway_factory: Any
) -> None:
    gw = gateway_factory(sys_interval=0)
    assert gw.call(gw.gateway.sys_topics.tick, 1e12) is False
    with pytest.raises(ConfigError, match="--sys-interval"):
        parse(["--sys-interval", "-1"])
