"""Prometheus metrics. Each gateway builds its own `CollectorRegistry` (no module-level state),
so several gateways can live in one process (tests) without clashing."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class MqttMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "iotgw_mqtt_connections", "Open MQTT connections", registry=registry
        )
        self.connects = Counter("iotgw_mqtt_connects", "Accepted CONNECTs", registry=registry)
        self.packets_in = Counter(
            "iotgw_mqtt_packets_received", "Packets received", ["type"], registry=registry
        )
        self.packets_out = Counter(
            "iotgw_mqtt_packets_sent", "Packets sent", ["type"], registry=registry
        )
        self.bytes_in = Counter("iotgw_mqtt_received_bytes", "Bytes received", registry=registry)
        self.bytes_out = Counter("iotgw_mqtt_sent_bytes", "Bytes sent", registry=registry)
        self.auth_failures = Counter(
            "iotgw_mqtt_auth_failures", "Rejected CONNECTs", ["reason"], registry=registry
        )
        self.acl_denials = Counter(
            "iotgw_mqtt_acl_denials",
            "Publishes or subscriptions refused by the ACL",
            ["action"],
            registry=registry,
        )
        self.dropped = Counter(
            "iotgw_mqtt_dropped_messages",
            "Messages not delivered, by reason",
            ["reason"],
            registry=registry,
        )
        self.protocol_errors = Counter(
            "iotgw_mqtt_protocol_errors",
            "Connections closed for bad packets, by reason code",
            ["reason_code"],
            registry=registry,
        )
        self.inflight = Gauge(
            "iotgw_mqtt_inflight_messages",
            "Outgoing QoS 1/2 messages awaiting acknowledgement",
            registry=registry,
        )
        self.retained = Gauge(
            "iotgw_mqtt_retained_messages", "Retained messages", registry=registry
        )
        self.sessions = Gauge(
            "iotgw_mqtt_sessions", "Sessions, online and offline", registry=registry
        )


class Metrics:
    """All of one gateway's metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.mqtt = MqttMetrics(self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
