"""Ratios of each benchmark to its anchor, computed at the end of the run that measured both and
stored in the benchmark's `extra_info` of the JSON output (`--benchmark-json`): a pytest
plugin, loaded by pyproject's `addopts` (`-p anchors`).

Benchmarks that run their anchor inside the same test (the shadow store against
`redis-benchmark`, REST against a bare endpoint, a cluster against one node) compute their
ratios themselves; this plugin pairs benchmarks that are separate tests of one run.

A pair is (ours, anchor, figure, label): `ours` and `anchor` are benchmark full names (a
`*` matches anything), `figure` the extra_info key compared (a rate: ours / anchor), or
None for the median time (ours is faster by anchor / ours). Either way a ratio above 1 means
iotgw did better. A pair whose two sides did not both run is left out."""

from __future__ import annotations

import fnmatch
from typing import Any

MQTT = "bench/test_bench_mqtt.py::"
COAP = "bench/test_bench_coap.py::"
BROKER = "bench/test_bench_broker.py::"
LOAD = "bench/test_bench_loadtest.py::"

PAIRS: list[tuple[str, str, str | None, str]] = [
    (MQTT + "test_publish_decode_ours", MQTT + "test_publish_decode_amqtt", None, "amqtt"),
    (MQTT + "test_publish_decode_ours", MQTT + "test_publish_decode_paho_client", None, "paho"),
    (MQTT + "test_publish_decode_ours_with_topic_and_payload",
     MQTT + "test_publish_decode_amqtt", None, "amqtt"),
    (MQTT + "test_publish_encode_ours", MQTT + "test_publish_encode_amqtt", None, "amqtt"),
    (MQTT + "test_publish_encode_ours", MQTT + "test_publish_encode_paho", None, "paho"),
    (MQTT + "test_connect_decode_ours", MQTT + "test_connect_decode_amqtt", None, "amqtt"),
    (MQTT + "test_connect_encode_ours", MQTT + "test_connect_encode_amqtt", None, "amqtt"),
    (MQTT + "test_subscribe_decode_ours", MQTT + "test_subscribe_decode_amqtt", None, "amqtt"),
    (MQTT + "test_subscribe_encode_ours", MQTT + "test_subscribe_encode_amqtt", None, "amqtt"),
    (COAP + "test_decode[ours-post]", COAP + "test_decode[aiocoap-post]", None, "aiocoap"),
    (COAP + "test_decode[ours-ack]", COAP + "test_decode[aiocoap-ack]", None, "aiocoap"),
    (COAP + "test_encode_ours_prebuilt_message[post]",
     COAP + "test_encode_aiocoap_prebuilt_message[post]", None, "aiocoap"),
    (COAP + "test_encode_ours_prebuilt_message[ack]",
     COAP + "test_encode_aiocoap_prebuilt_message[ack]", None, "aiocoap"),
    (LOAD + "test_iotgw_load_qos0_publish_rate", LOAD + "test_paho_qos0_publish_rate",
     "msgs_per_s", "paho"),
]
for _test in ("test_qos1_publish_puback_throughput", "test_qos0_fan_in_delivery_throughput",
              "test_connection_rate_and_memory"):
    for _other in ("mosquitto", "amqtt", "amqtt-default"):
        PAIRS.append((f"{BROKER}{_test}[iotgw]", f"{BROKER}{_test}[{_other}]", "rate", _other))
PAIRS.append((f"{BROKER}test_hold_idle_connections[iotgw]",
              f"{BROKER}test_hold_idle_connections[mosquitto]", "rate", "mosquitto"))
# Connects/s of 6 workers in a cluster against one gateway process holding idle connections.
PAIRS.append(("bench/test_bench_cluster.py::test_hold_100k_connections_on_workers",
              f"{BROKER}test_hold_idle_connections[iotgw]", "rate", "single_node"))


def ratios(benchmarks: list[dict[str, Any]]) -> None:
    """Add `vs_{label}` (and `vs_{label}_figure`) to the extra_info of every `ours` whose
    anchor ran too."""
    named = {b["fullname"]: b for b in benchmarks}
    for ours_pattern, anchor_pattern, figure, label in PAIRS:
        for name in fnmatch.filter(named, _literal_brackets(ours_pattern)):
            anchors = fnmatch.filter(named, _literal_brackets(anchor_pattern))
            if len(anchors) != 1:
                continue
            ours, anchor = named[name], named[anchors[0]]
            if figure is None:
                mine, theirs = ours["stats"]["median"], anchor["stats"]["median"]
                ratio = theirs / mine if mine else None
            else:
                mine, theirs = ours["extra_info"].get(figure), anchor["extra_info"].get(figure)
                ratio = mine / theirs if mine and theirs else None
            if ratio is not None:
                ours["extra_info"][f"vs_{label}"] = round(ratio, 3)
                ours["extra_info"][f"vs_{label}_figure"] = figure or "median time"


def _literal_brackets(pattern: str) -> str:
    """Parameter ids are in brackets, which fnmatch reads as a character class."""
    return pattern.replace("[", "[[]")


def pytest_benchmark_update_json(config: Any, benchmarks: Any, output_json: dict[str, Any]) -> None:
    ratios(output_json["benchmarks"])
