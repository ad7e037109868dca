"""The chaos suite (iotgw-load chaos): its parts (Toxiproxy client, UDP impairment relay, fault
schedules) against the real things, and a short chaos run end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_loadtest_mqtt import count, iotgw_load, stats_csv, subscriber_factory  # noqa: F401


def test_loadtest_shadow_reports_are_accepted_by_iotgw(
    gateway_factory: Any, subscriber_factory: Any, tmp_path: Path  # noqa: F811
) -> None:
    """Shadow reports of iotgw-load devices (MQTT and CoAP) are valid iotgw shadow updates:
    accepted and stored, none rejected."""
    gw = gateway_factory(allow_anonymous=True, acl="open")
    sub = subscriber_factory(gw.mqtt_port, ["$shadow/+/update/accepted",
                                            "$shadow/+/update/rejected"])
    out = iotgw_load(tmp_path, "--profile", "shadow", "-H", f"mqtt://127.0.0.1:{gw.mqtt_port}",
                     "-c", "3", "-r", "100", "-d", "3s", "--headless", "--csv",
                     str(tmp_path / "mqtt"))
    assert out.returncode == 0, out.stderr
    out = iotgw_load(tmp_path, "--profile", "coap", "-H", f"coap://127.0.0.1:{gw.coap_port}",
                     "-c", "4", "-r", "100", "-d", "3s", "--headless", "--csv",
                     str(tmp_path / "coap"), "--fail-on", "errors>1000")
    assert out.returncode == 0, out.stderr
    sub.settle()
    assert sub.kinds["shadow"] > 0
    assert not [t for t in sub.topics if t.endswith("/rejected")], sub.payloads[:3]
    stats = stats_csv(tmp_path / "coap")
    patches = stats[("PATCH", "shadow update")]
    assert int(patches["Request Count"]) >= 1
    assert patches["Failure Count"] == "0"
    assert count(stats_csv(tmp_path / "mqtt"), "PUBLISH", "shadow update") > 0
    assert [t for t in sub.topics if t.endswith("/accepted")]
