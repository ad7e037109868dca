"""--max-keepalive: the longest keep-alive a client may have. MQTT 5 clients are told (Server
Keep Alive in CONNACK); MQTT 3.1.1 clients cannot be told, and are held to it: silent for 1.5
times the maximum, they are disconnected, whatever they asked for (0, "never", included)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from test_mqtt_server import RawClient


def test_mqtt5_clients_are_told_the_servers_keep_alive(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, max_keepalive=60)
    for asked in (0, 600):
        client = RawClient(gw.mqtt_port, version=5)
        ack = client.connect(f"c{asked}", keep_alive=asked)
        assert ack.reason_code == 0 and ack.properties.server_keep_alive == 60
        client.close()
    client = RawClient(gw.mqtt_port, version=5)
    ack = client.connect("c30", keep_alive=30)  # within the maximum: its own
    assert ack.properties is None or ack.properties.server_keep_alive is None
    client.close()


@pytest.mark.parametrize("asked", [0, 600])
def test_silent_mqtt311_clients_are_held_to_the_maximum(
    gateway_factory: Any, asked: int
) -> None:
    gw = gateway_factory(allow_anonymous=True, max_keepalive=1)
    client = RawClient(gw.mqtt_port, version=4)
    assert client.connect("quiet", keep_alive=asked).reason_code == 0
    started = time.monotonic()
    assert client.recv(timeout=5) is None  # closed by the server
    assert time.monotonic() - started < 4


def test_a_keep_alive_over_65535_or_under_1_is_a_config_error() -> None:
    from gateway.config import Config, ConfigError

    for bad in (0, 65536):
        with pytest.raises(ConfigError, match="--max-keepalive"):
            Config(max_keepalive=bad)
