"""Run the benchmark set N times, keep the results, and regenerate README's performance table.

    .venv/bin/python scripts/bench.py --runs 3           # run, store, regenerate the table
    .venv/bin/python scripts/bench.py --table-only       # regenerate from the latest results
    .venv/bin/python scripts/bench.py --runs 1 -k broker # a subset (the table marks the rest)

Each batch is a directory `bench/results/{UTC time}/` holding `machine.json` (CPU, cores,
memory, kernel, Python, commit, load averages before and after: this machine is shared) and
one pytest-benchmark JSON per run (`run-{i}.json`; ratios to anchors are in each benchmark's
extra_info, computed from that run's own measurements: by the benchmarks themselves, and by
bench/anchors.py for anchors that are separate tests, at the end of the run and again here on
each run's file). The table
between README's `perf-table` markers is rewritten from the latest batch: every figure is the
median over the batch's runs, every ratio the median of the per-run ratios. Nothing in it is
typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"

# The benchmarks the table is made of (pytest -k expression over their names).
TABLE_SET = (
    "test_publish_decode or test_framer or test_decode or test_encode_ours_prebuilt"
    " or test_encode_aiocoap_prebuilt or test_qos1_publish_puback or test_qos0_fan_in"
    " or test_connection_rate or test_hold_idle or test_hold_100k or test_qos0_from_one_node"
    " or test_con_post_telemetry or (test_mqtt_qos1_to_kafka and max-rate and not gzip)"
    " or test_rest_get_shadow or test_cas_updates"
)


class Missing(Exception):
    """A figure the batch does not hold (its benchmark was not run)."""


def _anchors() -> Any:
    """bench/anchors.py: the pairs of benchmarks that are separate tests."""
    spec = importlib.util.spec_from_file_location("anchors", ROOT / "bench" / "anchors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Batch:
    """The runs of one batch: figures as medians over runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.machine = json.loads((directory / "machine.json").read_text())
        self.runs = [json.loads(p.read_text()) for p in sorted(directory.glob("run-*.json"))]
        ratios = _anchors().ratios  # the plugin does this at the end of each run; idempotent
        for run in self.runs:
            ratios(run["benchmarks"])

    def values(self, name: str, key: str) -> list[float]:
        found = []
        for run in self.runs:
            for bench in run["benchmarks"]:
                if bench["fullname"] == "bench/" + name:
                    value: Any = bench["stats"]["median"] if key == "time" else bench["extra_info"]
                    if key != "time":
                        for part in key.split("."):
                            value = value.get(part) if isinstance(value, dict) else None
                    if isinstance(value, int | float):
                        found.append(float(value))
        if not found:
            raise Missing(f"{name}: {key}")
        return found

    def median(self, name: str, key: str) -> float:
        return statistics.median(self.values(name, key))


def _si(value: float) -> str:
    """12345 -> 12.3k, 1234567 -> 1.23M (three significant digits)."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _time(seconds: float) -> str:
    return f"{seconds * 1e9:.0f} ns" if seconds < 1e-6 else f"{seconds * 1e6:.1f} µs"


FORMATS: dict[str, Callable[[float], str]] = {
    "si": _si, "time": _time, "x": lambda v: f"{v:.2f}x", "int": lambda v: f"{v:,.0f}",
    "1": lambda v: f"{v:.1f}", "0": lambda v: f"{v:.0f}",
}

# Short names for the benchmarks of the table (file::test[params], without `bench/`).
B = {
    "dec": "test_bench_mqtt.py::test_publish_decode_ours",
    "dec_read": "test_bench_mqtt.py::test_publish_decode_ours_with_topic_and_payload",
    "dec_amqtt": "test_bench_mqtt.py::test_publish_decode_amqtt",
    "dec_paho": "test_bench_mqtt.py::test_publish_decode_paho_client",
    "framer": "test_bench_mqtt.py::test_framer_64_mib_in_64_kib_reads",
    "cdec": "test_bench_coap.py::test_decode[ours-post]",
    "cenc": "test_bench_coap.py::test_encode_ours_prebuilt_message[post]",
    "cdec_aio": "test_bench_coap.py::test_decode[aiocoap-post]",
    "cenc_aio": "test_bench_coap.py::test_encode_aiocoap_prebuilt_message[post]",
    "hold": "test_bench_broker.py::test_hold_idle_connections[iotgw]",
    "hold_mosq": "test_bench_broker.py::test_hold_idle_connections[mosquitto]",
    "hold6": "test_bench_cluster.py::test_hold_100k_connections_on_workers",
    "xnode": "test_bench_cluster.py::test_qos0_from_one_node_to_a_subscriber_on_another",
    "coap": "test_bench_coap_endpoint.py::test_con_post_telemetry_throughput",
    "kafka": "test_bench_kafka.py::test_mqtt_qos1_to_kafka_end_to_end[max-rate]",
    "rest_sqlite": "test_bench_shadow.py::test_rest_get_shadow_with_wrk[sqlite]",
    "rest_redis": "test_bench_shadow.py::test_rest_get_shadow_with_wrk[redis]",
    "cas": "test_bench_shadow.py::"
           "test_cas_updates_per_second_through_the_store_vs_redis_benchmark_evalsha",
}
for _short, _test in (("q1", "test_qos1_publish_puback_throughput"),
                      ("q0", "test_qos0_fan_in_delivery_throughput"),
                      ("conn", "test_connection_rate_and_memory")):
    for _kind in ("iotgw", "mosquitto", "amqtt", "amqtt-default"):
        B[f"{_short}_{_kind}"] = f"test_bench_broker.py::{_test}[{_kind}]"

# (what, iotgw, anchor): `{bench:key:format}` is the median of that figure over the batch
# (`time`: the benchmark's median time; nested keys with dots).
ROWS = [
    ("MQTT PUBLISH decode, 88-byte frame (median time)",
     "{dec:time:time}; with topic and payload read {dec_read:time:time}",
     "amqtt {dec_amqtt:time:time} ({dec:vs_amqtt:x}), paho's client path"
     " {dec_paho:time:time} ({dec:vs_paho:x})"),
    ("MQTT framer, 64 MiB of PUBLISH frames in 64 KiB reads",
     "{framer:frames_per_s:si} frames/s", ""),
    ("CoAP CON POST decode / encode (median time)",
     "{cdec:time:time} / {cenc:time:time}",
     "aiocoap {cdec_aio:time:time} / {cenc_aio:time:time} ({cdec:vs_aiocoap:x} /"
     " {cenc:vs_aiocoap:x})"),
    ("broker, QoS 1, 100 connections, window 10 (broker on one core)",
     "{q1_iotgw:rate:si} msg/s, {q1_iotgw:broker_cpu_us_per_op:1} µs CPU/msg",
     "Mosquitto {q1_mosquitto:rate:si}, {q1_mosquitto:broker_cpu_us_per_op:1} µs"
     " ({q1_iotgw:vs_mosquitto:x}); amqtt {q1_amqtt:rate:si} ({q1_iotgw:vs_amqtt:x}), as"
     " shipped {q1_amqtt-default:rate:si} ({q1_iotgw:vs_amqtt-default:x})"),
    ("broker, QoS 0, 10 publishers -> 1 subscriber",
     "{q0_iotgw:rate:si} delivered/s, {q0_iotgw:broker_cpu_us_per_op:1} µs CPU/msg",
     "Mosquitto {q0_mosquitto:rate:si}, {q0_mosquitto:broker_cpu_us_per_op:1} µs"
     " ({q0_iotgw:vs_mosquitto:x}); amqtt {q0_amqtt:rate:si} delivered/s"),
    ("connects (2,000)",
     "{conn_iotgw:rate:si}/s, {conn_iotgw:broker_cpu_us_per_op:0} µs CPU,"
     " {conn_iotgw:kb_per_connection:1} KB RSS each",
     "Mosquitto {conn_mosquitto:rate:si}/s, {conn_mosquitto:broker_cpu_us_per_op:0} µs,"
     " {conn_mosquitto:kb_per_connection:1} KB ({conn_iotgw:vs_mosquitto:x}); amqtt"
     " {conn_amqtt:rate:si}/s, {conn_amqtt:kb_per_connection:0} KB"),
    ("idle connections held by one process (its open-file limit)",
     "{hold:connections:int} at {hold:kb_per_connection:1} KB each, {hold:rate:si} connects/s",
     "Mosquitto {hold_mosq:kb_per_connection:1} KB, {hold_mosq:rate:si}/s"
     " ({hold:vs_mosquitto:x})"),
    ("idle connections held by `--workers 6` on one core (cluster over Redis)",
     "{hold6:connections_held:int} at {hold6:rss_kb_per_connection:1} KB each,"
     " {hold6:rate:si} connects/s, {hold6:cpu_us_per_connect:0} µs CPU each (workers + Redis)",
     "one process (row above): {hold6:vs_single_node:x} its connects/s"),
    ("cluster: QoS 0 from 10 publishers on one node to a subscriber on another",
     "{xnode:rate:si} delivered/s, {xnode:cpu_us_per_msg_nodes_and_redis:1} µs CPU/msg"
     " (both nodes + Redis)",
     "one plain gateway, same load: {xnode:single_node_rate:si}/s ({xnode:vs_single_node:x})"),
    ("CoAP CON POST /telemetry, durable 2.04",
     "{coap:requests_per_s:si} req/s, {coap:gateway_cpu_us_per_request:0} µs CPU/req",
     "libcoap's coap-server, a PUT kept in memory: {coap:coap_server_requests_per_s:si} req/s,"
     " {coap:coap_server_cpu_us_per_request:0} µs ({coap:vs_coap_server:x})"),
    ("MQTT QoS 1 -> Kafka (acks=all), PUBACK after Kafka",
     "{kafka:rate:si} msg/s, PUBACK p99 {kafka:puback_ms.p99:0} ms",
     "kafka-producer-perf-test, acks=all, same record size: {kafka:producer_perf_per_s:si}"
     " records/s ({kafka:vs_producer_perf:x})"),
    ("REST GET shadow (wrk, 32 connections)",
     "SQLite {rest_sqlite:requests_per_s:si} req/s, p99 {rest_sqlite:p99_ms:1} ms; Redis"
     " {rest_redis:requests_per_s:si} req/s, p99 {rest_redis:p99_ms:1} ms",
     "GET /healthz, same server: {rest_sqlite:bare_endpoint_requests_per_s:si} req/s"
     " (SQLite {rest_sqlite:vs_bare_endpoint:x}, Redis {rest_redis:vs_bare_endpoint:x})"),
    ("shadow CAS updates through the Redis store, 16 writers: `update` / `update_many`"
     " (64 per call)",
     "{cas:store_update_per_s:si} / {cas:store_update_many_per_s:si} updates/s,"
     " {cas:store_update_cpu_us:0} / {cas:store_update_many_cpu_us:0} µs client CPU each",
     "`redis-benchmark` EVALSHA of the store's script:"
     " {cas:redis_benchmark_evalsha_p1_per_s:si}/s unpipelined,"
     " {cas:redis_benchmark_evalsha_p16_per_s:si}/s at pipeline 16: `update`"
     " {cas:store_update_vs_evalsha_p1:x} / {cas:store_update_vs_evalsha_p16:x},"
     " `update_many` {cas:store_update_many_vs_evalsha_p1:x} /"
     " {cas:store_update_many_vs_evalsha_p16:x}"),
]


def render(template: str, batch: Batch) -> str:
    def field(m: re.Match[str]) -> str:
        bench, key, fmt = m.group(1).split(":")
        return FORMATS[fmt](batch.median(B[bench], key))

    return re.sub(r"\{([^{}]+)\}", field, template)


def table(batch: Batch) -> str:
    m = batch.machine
    lines = [
        f"Generated by `scripts/bench.py` from `bench/results/{batch.directory.name}/`:"
        f" {len(batch.runs)} run(s) on {m['cpu']} ({m['cores']} cores, shared with other"
        f" work: load average {m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after),"
        f" commit {m['commit'][:7]}. Figures are medians over the runs, ratios the median of"
        " the ratios each run computed against its anchor in that run (above 1: iotgw did"
        " better). A row that says *not measured* was not in this batch.",
        "",
        "| what | iotgw | anchor (same run) |",
        "| --- | --- | --- |",
    ]
    for label, ours, anchor in ROWS:
        try:
            mine = render(ours, batch)
        except Missing:
            lines.append(f"| {label} | *not measured in this batch* | |")
            continue
        try:
            theirs = render(anchor, batch)
        except Missing as exc:
            theirs = f"*anchor not measured ({exc})*"
        lines.append(f"| {label} | {mine} | {theirs} |")
    return "\n".join(lines)


def regenerate(batch: Batch) -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"scripts/bench.py: README.md has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{table(batch)}\n{END}{tail}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _machine() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem = re.search(r"MemTotal:\s+(\d+)", meminfo)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "uncommitted_changes": bool(dirty),
        "load_before": list(os.getloadavg()),
    }


def _drop_samples(path: Path) -> None:
    """Keep the statistics, not every timed sample: a micro-benchmark's samples are megabytes."""
    data = json.loads(path.read_text())
    for bench in data.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
    path.write_text(json.dumps(data, indent=1) + "\n")


def run_batch(runs: int, select: str, extra: list[str]) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    directory = RESULTS / stamp
    directory.mkdir(parents=True)
    machine = _machine()
    for i in range(1, runs + 1):
        out = directory / f"run-{i}.json"
        command = [sys.executable, "-m", "pytest", "bench", "--benchmark-only",
                   f"--benchmark-json={out}", "-p", "no:cacheprovider", "-q", "-k", select,
                   *extra]
        print(f"scripts/bench.py: run {i} of {runs}: {' '.join(command[2:])}", flush=True)
        done = subprocess.run(command, cwd=ROOT)
        if out.exists():
            _drop_samples(out)
        if done.returncode != 0:
            print(f"scripts/bench.py: run {i} failed (exit {done.returncode}); its JSON is kept"
                  " with what passed", file=sys.stderr)
    machine["load_after"] = list(os.getloadavg())
    (directory / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs in the batch (default 3)")
    parser.add_argument("-k", dest="select", default=TABLE_SET,
                        help="pytest -k expression (default: the benchmarks of the table)")
    parser.add_argument("--table-only", action="store_true",
                        help="only regenerate README's table from the latest batch")
    parser.add_argument("pytest_args", nargs="*", help="more arguments for pytest")
    args = parser.parse_args()
    if args.runs < 1:
        print("scripts/bench.py: --runs must be at least 1", file=sys.stderr)
        return 2
    if args.table_only:
        batches = sorted(p for p in RESULTS.glob("*") if (p / "machine.json").exists())
        if not batches:
            print("scripts/bench.py: no results in bench/results/ yet", file=sys.stderr)
            return 2
        directory = batches[-1]
    else:
        directory = run_batch(args.runs, args.select, args.pytest_args)
    regenerate(Batch(directory))
    print(f"scripts/bench.py: README.md's table regenerated from {directory.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
