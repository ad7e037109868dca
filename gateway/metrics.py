"""Prometheus metrics. Each gateway builds its own `CollectorRegistry` (no module-level state),
so several gateways can live in one process (tests) without clashing."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


def build_info() -> tuple[str, str, str, str]:
    """(iotgw, Python, uvloop, Cython) versions. Cython is the one that compiled the native
    codecs: its runtime module is named `_cython_X_Y_Z` (Cython itself is not installed)."""
    import platform
    from importlib.metadata import version

    from gateway import __version__
    from gateway._native import mqtt  # noqa: F401  (loads the Cython runtime module)

    cython = next((name.removeprefix("_cython_").replace("_", ".")
                   for name in sys.modules if name.startswith("_cython_")), "unknown")
    return __version__, platform.python_version(), version("uvloop"), cython


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
        self.rate_limited = Counter(
            "iotgw_mqtt_rate_limited",
            "Times reading from a client paused for --max-publish-rate/--max-publish-bytes-rate",
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
        self.queued_bytes = Gauge(
            "iotgw_mqtt_queued_bytes",
            "Payload bytes queued for offline or slow sessions, all sessions together",
            registry=registry,
        )
        self.state_save_failures = Counter(
            "iotgw_mqtt_state_save_failures",
            "Saves of sessions and retained messages that failed (retried at the next save)",
            registry=registry,
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
        for kind in ("telemetry", "events", "shadow", "commands"):
            self.shed.labels(kind)  # 0 until something is shed: dashboards and alerts see it
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
        self.write_errors = Counter(
            "iotgw_telemetry_write_errors",
            "Failed sink writes by cause (ENOSPC: disk full, EIO, ...; other: not an OS error)",
            ["lane", "reason"],
            registry=registry,
        )
        self.sink_blocked = Gauge(
            "iotgw_telemetry_sink_blocked",
            "1 while a lane's sink cannot make records durable (nothing is acknowledged)",
            ["lane"],
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


class ClusterMetrics:
    """`iotgw_cluster_*`: what crosses between gateway nodes (gateway/cluster.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.nodes = Gauge("iotgw_cluster_nodes", "Live gateway nodes, this one included",
                           registry=registry)
        self.forwarded = Counter("iotgw_cluster_forwarded_messages",
                                 "Messages sent to other nodes (one per node)", registry=registry)
        self.received = Counter("iotgw_cluster_received_messages",
                                "Messages other nodes routed here", registry=registry)
        self.route_changes = Counter("iotgw_cluster_route_changes",
                                     "Topic filters announced or withdrawn", registry=registry)
        self.takeovers = Counter("iotgw_cluster_takeovers",
                                 "CONNECTs of a client id another node held", registry=registry)
        self.held_publishers = Counter(
            "iotgw_cluster_held_publishers",
            "Times a publishing connection stopped being read while another node caught up",
            registry=registry,
        )
        self.resubscribes = Counter(
            "iotgw_cluster_resubscribes",
            "Times the Redis subscription was lost (what was published meanwhile is lost)",
            registry=registry,
        )
        self.lost_forwards = Counter(
            "iotgw_cluster_lost_forwards",
            "Messages other nodes forwarded here that never arrived (gaps in their numbering, "
            "as when Redis drops a subscriber that fell behind)",
            registry=registry,
        )


class AuthMetrics:
    """`iotgw_auth_*`: the credential checks of every protocol (gateway/guard.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(
            "iotgw_auth_checks",
            "Credential checks by protocol and verdict (ok, denied, throttled, busy, unavailable)",
            ["protocol", "verdict"],
            registry=registry,
        )
        self.verifications = Counter(
            "iotgw_auth_verifications",
            "Secrets verified the slow way (PBKDF2), off the event loop",
            registry=registry,
        )
        self.remembered_failures = Counter(
            "iotgw_auth_remembered_failures",
            "Wrong secrets refused from memory, without verifying them again",
            registry=registry,
        )
        self.bans = Counter(
            "iotgw_auth_bans",
            "Keys banned for too many failures, by kind (id, user, addr, token)",
            ["kind"],
            registry=registry,
        )
        self.pending = Gauge(
            "iotgw_auth_pending", "Credential checks waiting for or running on a thread",
            registry=registry,
        )
        self.banned = Gauge("iotgw_auth_banned_keys", "Keys banned now", registry=registry)
        self.forgotten_keys = Counter(
            "iotgw_auth_forgotten_keys",
            "Failure records dropped because more keys failed than are tracked",
            registry=registry,
        )


class EventMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.suppressed = Counter(
            "iotgw_log_suppressed_lines",
            "Event log lines left out by rate limiting, by event",
            ["event"],
            registry=registry,
        )


class HttpMetrics:
    """`iotgw_http_*`: REST requests by route template (not the path: bounded labels), method
    and status; counted by gateway/http/api.py's RequestMetrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "iotgw_http_requests", "REST requests answered, by route, method and status",
            ["route", "method", "status"], registry=registry,
        )
        self.duration = Histogram(
            "iotgw_http_request_duration_seconds", "Time to answer a REST request, by route",
            ["route", "method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=registry,
        )


class Metrics:
    """All of one gateway's metrics."""

    def __init__(self) -> None:
        # No `_created` series: one more time series per counter, for a start time that
        # process_start_time_seconds already gives. (A process-wide switch of the library.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.mqtt = MqttMetrics(self.registry)
        self.telemetry = TelemetryMetrics(self.registry)
        self.cluster = ClusterMetrics(self.registry)
        self.auth = AuthMetrics(self.registry)
        self.events = EventMetrics(self.registry)
        self.http = HttpMetrics(self.registry)
        # process_cpu_seconds_total, _resident_memory_bytes, _open_fds, ... (from /proc)
        ProcessCollector(registry=self.registry)
        build = Gauge(
            "iotgw_build_info", "Always 1: what this gateway runs on, as labels",
            ["version", "python", "uvloop", "cython"], registry=self.registry,
        )
        build.labels(*build_info()).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---- device shadows (appended for the REST/shadow work; gateway/app.py creates it) ----------


class ShadowMetrics:
    """`iotgw_shadow_*`. The store's counters (shadow.store.StoreStats) are read at scrape time
    by a custom collector, so a write pays nothing for them; `source` is the ShadowStore (read
    as `source.stats` at each scrape). The request latency histogram is observed per request,
    by operation (get, update, replace, delete, changes) and protocol (rest, mqtt, coap)."""

    def __init__(self, registry: CollectorRegistry, source: object) -> None:
        self.request_seconds = Histogram(
            "iotgw_shadow_request_duration_seconds",
            "Time to serve a shadow request, by operation and protocol",
            ["operation", "protocol"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1, 2.5),
            registry=registry,
        )
        registry.register(_ShadowStoreCollector(source))

    def observe(self, operation: str, protocol: str, seconds: float) -> None:
        self.request_seconds.labels(operation, protocol).observe(seconds)


_SHADOW_COUNTERS = (
    ("writes", "Accepted shadow writes (updates, replaces, deletes)"),
    ("conflicts", "Shadow writes refused by compare-and-set (a stale version)"),
    ("concurrent_writes", "Accepted writes whose version vector did not dominate the stored one"),
    ("conflicting_fields", "Fields hit by concurrent writes, resolved by the deterministic rule"),
    ("cas_retries", "Optimistic writes redone because the document changed under them"),
    ("stale_fields_dropped", "Reported fields not applied: a newer device seq was stored"),
    ("invalid", "Shadow writes refused as malformed or too large"),
)


class _ShadowStoreCollector(Collector):
    def __init__(self, source: object) -> None:
        self.source = source

    def describe(self) -> Iterator[Metric]:
        for name, text in _SHADOW_COUNTERS:
            yield CounterMetricFamily(f"iotgw_shadow_{name}", text, value=0)

    def collect(self) -> Iterator[Metric]:
        stats = getattr(self.source, "stats", None)
        for name, text in _SHADOW_COUNTERS:
            value = getattr(stats, name, 0)
            yield CounterMetricFamily(f"iotgw_shadow_{name}", text, value=value)


# ---- CoAP (appended for the CoAP endpoint, gateway/coap/; gateway/app.py creates it) ---------


class CoapMetrics:
    """`iotgw_coap_*`. Plain integers bumped by the endpoint (a prometheus_client child .inc()
    would cost more than answering a request) and read at scrape time. `requests` counts the
    answered requests by (method code, response code); the gauges and the sweep-driven
    counters are refreshed by the endpoint's sweep."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests: dict[tuple[int, int], int] = {}
        self.duplicates_con = 0
        self.duplicates_non = 0
        self.retransmissions = 0
        self.transmit_failures = 0
        self.separate_responses = 0
        self.rst_received = 0
        self.rst_sent = 0
        self.format_errors = 0
        self.dedup_shed = 0
        self.overloaded = 0
        self.notifications = 0
        self.observers_dropped = 0
        self.block1_dropped = 0
        self.observers = 0
        self.exchanges = 0
        self.ipatch_repeats = 0
        registry.register(_CoapCollector(self))


_COAP_METHODS = {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE", 5: "FETCH", 6: "PATCH", 7: "iPATCH"}

_COAP_COUNTERS = (
    ("retransmissions", "CON messages we sent again (separate responses, notifications)"),
    ("transmit_failures", "CON messages never acknowledged after MAX_RETRANSMIT"),
    ("separate_responses", "Responses sent as a separate CON after an empty ACK"),
    ("rst_received", "RST messages received"),
    ("rst_sent", "RST messages sent (format errors, pings, unknown CON responses)"),
    ("format_errors", "Datagrams rejected as malformed"),
    ("dedup_shed", "Exchanges forgotten before their lifetime because the cache was full"),
    ("overloaded", "Telemetry requests answered 5.03 while the pipeline was over high water"),
    ("notifications", "Observe notifications sent"),
    ("observers_dropped", "Observers removed because a CON notification was never ACKed"),
    ("block1_dropped", "Block1 uploads dropped unfinished (expired, restarted or pushed out)"),
    ("ipatch_repeats", "iPATCH requests answered from an earlier identical one, not applied"),
)


class _CoapCollector(Collector):
    def __init__(self, m: CoapMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily  # kept local: appended section

        m = self.m
        requests = CounterMetricFamily(
            "iotgw_coap_requests", "Requests answered, by method and response code",
            labels=["method", "code"],
        )
        for (method, code), count in sorted(m.requests.items()):
            requests.add_metric(
                [_COAP_METHODS.get(method, str(method)), f"{code >> 5}.{code & 31:02d}"], count
            )
        yield requests
        duplicates = CounterMetricFamily(
            "iotgw_coap_duplicates", "Duplicate requests (by message id), by type",
            labels=["type"],
        )
        duplicates.add_metric(["CON"], m.duplicates_con)
        duplicates.add_metric(["NON"], m.duplicates_non)
        yield duplicates
        for name, text in _COAP_COUNTERS:
            yield CounterMetricFamily(f"iotgw_coap_{name}", text, value=getattr(m, name))
        yield GaugeMetricFamily("iotgw_coap_observers", "Registered observers", value=m.observers)
        yield GaugeMetricFamily(
            "iotgw_coap_exchanges", "Requests remembered for deduplication", value=m.exchanges
        )


class DtlsMetrics:
    """`iotgw_coaps_*`: the DTLS layer under CoAP (gateway/coap/dtls.py). Plain integers like
    CoapMetrics; the gauges are refreshed by the sweep."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handshakes_ok = 0
        self.failures: dict[str, int] = {}
        self.hello_verify = 0
        self.cookies_rejected = 0
        self.dropped = 0
        self.sends_dropped = 0
        self.expired = 0
        self.sessions = 0
        self.handshaking = 0
        registry.register(_DtlsCollector(self))

    def failed(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


_DTLS_COUNTERS = (
    ("hello_verify", "HelloVerifyRequests sent (ClientHellos without a valid cookie)"),
    ("cookies_rejected", "ClientHellos whose cookie was wrong or too old"),
    ("dropped", "Datagrams dropped: no session for them and not a ClientHello"),
    ("sends_dropped", "CoAP messages not sent: their session had ended"),
    ("expired", "Sessions ended after the idle timeout"),
)


class _DtlsCollector(Collector):
    def __init__(self, m: DtlsMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        m = self.m
        handshakes = CounterMetricFamily(
            "iotgw_coaps_handshakes", "DTLS handshakes past the cookie, by result and reason",
            labels=["result", "reason"],
        )
        handshakes.add_metric(["ok", ""], m.handshakes_ok)
        for reason, count in sorted(m.failures.items()):
            handshakes.add_metric(["failed", reason], count)
        yield handshakes
        for name, text in _DTLS_COUNTERS:
            yield CounterMetricFamily(f"iotgw_coaps_{name}", text, value=getattr(m, name))
        yield GaugeMetricFamily("iotgw_coaps_sessions", "Established DTLS sessions",
                                value=m.sessions)
        yield GaugeMetricFamily("iotgw_coaps_handshakes_in_progress",
                                "DTLS handshakes past the cookie, not finished",
                                value=m.handshaking)
