"""Prometheus metrics. Each gateway builds its own `CollectorRegistry` (no module-level state),
so several gateways can live in one process (tests) without clashing."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class MqttMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "iotgw_mqtt_connections", "Open MQTT connections", registry=registry
        )
        self.connects = Counter("iotgw_mqtt_connects", "Accepted CONNECTs", registry=registry)
        # Per-packet counts are plain integers bumped on the hot path and read at scrape time
        # (a prometheus_client child .inc() costs more than handling a PUBACK).
        self.packets_in = [0] * 16  # by packet type
        self.packets_out = [0] * 16
        self.bytes_in = 0
        self.bytes_out = 0
        registry.register(_MqttCounters(self))
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


class TelemetryMetrics:
    """The telemetry pipeline and its sinks (gateway/telemetry/). Labels: `kind` (telemetry,
    events, shadow, commands), `lane` (high, low), `sink` (kafka, spool, file)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records_in = Counter(
            "iotgw_telemetry_records_in", "Records accepted by the pipeline", ["kind"],
            registry=registry,
        )
        self.records_out = Counter(
            "iotgw_telemetry_records_out",
            "Records made durable, by where: acknowledged by Kafka, fsynced to the spool or file",
            ["kind", "sink"],
            registry=registry,
        )
        self.shed = Counter(
            "iotgw_telemetry_shed",
            "QoS 0 records dropped because their lane was overloaded",
            ["kind"],
            registry=registry,
        )
        self.backlog = Gauge(
            "iotgw_telemetry_backlog_records", "Records accepted, not yet durable", ["lane"],
            registry=registry,
        )
        self.batch_records = Histogram(
            "iotgw_telemetry_batch_records",
            "Records per sink write (group commit)",
            ["lane"],
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536),
            registry=registry,
        )
        self.sink_failures = Counter(
            "iotgw_telemetry_sink_failures", "Sink writes that failed and were retried", ["lane"],
            registry=registry,
        )
        self.kafka_latency = Histogram(
            "iotgw_telemetry_kafka_latency_seconds",
            "From handing a batch to the Kafka producer to its acknowledgement (acks=all)",
            ["lane"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "iotgw_telemetry_spool_bytes", "Bytes in the disk spool", ["lane"], registry=registry
        )
        self.spool_records = Gauge(
            "iotgw_telemetry_spool_records",
            "Records in the disk spool not yet acknowledged by Kafka",
            ["lane"],
            registry=registry,
        )
        self.replayed = Counter(
            "iotgw_telemetry_replayed",
            "Spooled records acknowledged by Kafka (sent by the replayer, or found delivered)",
            ["lane"],
            registry=registry,
        )


class _MqttCounters(Collector):
    """Exports MqttMetrics' plain counters."""

    def __init__(self, m: MqttMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        for name, doc, counts in (
            ("iotgw_mqtt_packets_received", "Packets received", self.m.packets_in),
            ("iotgw_mqtt_packets_sent", "Packets sent", self.m.packets_out),
        ):
            family = CounterMetricFamily(name, doc, labels=["type"])
            for ptype, count in enumerate(counts):
                if count:
                    family.add_metric([_PACKET_NAMES[ptype]], count)
            yield family
        yield CounterMetricFamily(
            "iotgw_mqtt_received_bytes", "Bytes received", value=self.m.bytes_in
        )
        yield CounterMetricFamily("iotgw_mqtt_sent_bytes", "Bytes sent", value=self.m.bytes_out)


_PACKET_NAMES = ["reserved", "connect", "connack", "publish", "puback", "pubrec", "pubrel",
                 "pubcomp", "subscribe", "suback", "unsubscribe", "unsuback", "pingreq",
                 "pingresp", "disconnect", "auth"]


class Metrics:
    """All of one gateway's metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.mqtt = MqttMetrics(self.registry)
        self.telemetry = TelemetryMetrics(self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
