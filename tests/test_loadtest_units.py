"""iotgw-load's pure parts: histogram merging, statistics deltas, thresholds, Kafka sequence
matching, wait times, class distribution, settings layering and the report writers."""

from __future__ import annotations

import csv
import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import msgpack
import pytest

from loadtest import MqttDevice, between, constant, constant_pacing, constant_throughput, task
from loadtest.bench import payload_template, read_stamp, stamp
from loadtest.cli import parse_args, parse_duration
from loadtest.histogram import MAX_VALUE, PERCENTILES, Histogram, bucket_bounds, bucket_of
from loadtest.kafka import SeqMatcher, expected_telemetry, parse_record
from loadtest.report import render_html, write_csv
from loadtest.runtime import UsageError, parse_host
from loadtest.scenario import ScenarioError, assign_classes
from loadtest.stats import Collector, Stats
from loadtest.thresholds import evaluate, parse_fail_on

# ---- histogram ----------------------------------------------------------------------------------


def test_every_value_lands_in_a_bucket_whose_bounds_hold_it_within_two_percent() -> None:
    rng = random.Random(1)
    values = list(range(0, 5000)) + [rng.randrange(1, 1 << 40) for _ in range(20000)]
    for v in values:
        lo, hi = bucket_bounds(bucket_of(v))
        assert lo <= v <= hi
        assert hi - lo <= max(0, v) / 64 + 1


def test_buckets_are_contiguous_and_ordered() -> None:
    prev_hi = -1
    for index in range(0, bucket_of(MAX_VALUE) + 1):
        lo, hi = bucket_bounds(index)
        assert lo == prev_hi + 1
        assert bucket_of(lo) == index and bucket_of(hi) == index
        prev_hi = hi


def test_merged_histograms_equal_the_histogram_of_all_samples() -> None:
    rng = random.Random(7)
    parts = [[int(rng.lognormvariate(7, 1.5)) for _ in range(rng.randrange(1, 3000))]
             for _ in range(5)]
    merged = Histogram()
    for part in parts:
        h = Histogram()
        h.record_many(part)
        merged.merge(Histogram.from_wire(msgpack.unpackb(
            msgpack.packb(h.to_wire()), strict_map_key=False)))
    whole = Histogram()
    whole.record_many(v for part in parts for v in part)
    assert merged == whole
    assert merged.percentiles(PERCENTILES) == whole.percentiles(PERCENTILES)
    assert merged.count == sum(len(p) for p in parts)
    assert merged.total == sum(sum(p) for p in parts)


def test_percentiles_are_within_bucket_precision_of_the_exact_ones() -> None:
    rng = random.Random(3)
    values = sorted(int(rng.expovariate(1 / 2000)) for _ in range(50000))
    h = Histogram()
    h.record_many(values)
    for p in (0.5, 0.9, 0.99, 0.999):
        exact = values[max(0, int(p * len(values) + 0.999999) - 1)]
        assert abs(h.percentile(p) - exact) <= exact / 64 + 1
    assert h.percentile(1.0) == values[-1]
    assert h.min == values[0] and h.max == values[-1]


def test_percentile_of_a_single_sample_is_that_sample() -> None:
    h = Histogram()
    h.record(123_456)
    assert h.percentiles((0.5, 0.99, 1.0)) == [123_456] * 3


# ---- stats deltas -------------------------------------------------------------------------------


def test_deltas_from_several_workers_merge_into_exact_totals() -> None:
    collector = Collector()
    expected = Histogram()
    for worker in range(3):
        stats = Stats()
        for i in range(100 * (worker + 1)):
            stats.get("PUBLISH", "telemetry").record(i * 10 + worker)
            expected.record(i * 10 + worker)
        stats.get("PUBLISH", "heartbeat").count(5)
        stats.failure("PUBLISH", "telemetry", "timeout", 2)
        stats.incr("overrun", 4)
        wire = msgpack.unpackb(msgpack.packb(stats.take_delta()), strict_map_key=False)
        collector.add_delta(wire)
        assert stats.take_delta()["entries"] == []  # a delta empties the recorder
    tel = collector.entries[("PUBLISH", "telemetry")]
    assert tel.hist == expected
    assert tel.num_requests == 600 + 6 and tel.num_failures == 6
    assert collector.entries[("PUBLISH", "heartbeat")].num_requests == 15
    assert collector.failures[("PUBLISH", "telemetry", "timeout")] == 6
    assert collector.counters == {"overrun": 12}
    row = collector.close_interval()
    assert row.total.num_requests == 621
    assert collector.close_interval().total.num_requests == 0


# ---- thresholds ---------------------------------------------------------------------------------


def _collector(latencies: list[int], failures: int = 0) -> Collector:
    c = Collector()
    s = Stats()
    for v in latencies:
        s.get("PUBLISH", "telemetry").record(v)
    if failures:
        s.failure("PUBLISH", "telemetry", "timeout", failures)
    c.add_delta(s.take_delta())
    c.started, c.ended = 0.0, 10.0
    return c


def test_fail_on_holds_when_p99_is_over_the_limit() -> None:
    c = _collector([1000] * 98 + [60_000, 70_000])  # p99 = 60 ms
    assert evaluate(parse_fail_on("p99>50ms"), c)
    assert not evaluate(parse_fail_on("p99>80ms"), c)
    assert not evaluate(parse_fail_on("p50>2ms,max>1s"), c)
    assert evaluate(parse_fail_on("p100>=70000us"), c)


def test_fail_on_error_share_and_count() -> None:
    c = _collector([1000] * 998, failures=2)  # 2 of 1000 requests = 0.2 %
    assert evaluate(parse_fail_on("errors>0.1%"), c)
    assert not evaluate(parse_fail_on("errors>0.5%"), c)
    assert evaluate(parse_fail_on("errors>0"), c)
    assert not evaluate(parse_fail_on("errors>2"), c)
    assert evaluate(parse_fail_on("rps<1000"), c)  # 100 requests/s
    assert evaluate(parse_fail_on("p99[telemetry]>0.5ms"), c)
    assert not evaluate(parse_fail_on("p99[heartbeat]>0.5ms"), c)


@pytest.mark.parametrize("bad", ["p99>>5", "latency>5ms", "p99>5%", "errors>5ms", "p0>1"])
def test_unreadable_fail_on_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_fail_on(bad)


# ---- Kafka sequence matching (no broker) --------------------------------------------------------


def _envelope(device: str, seq: int, ts: int) -> bytes:
    payload = b'{"seq":%d,"ts":%d,"temp":21.5}' % (seq, ts)
    return msgpack.packb({"device": device, "ts_ms": ts // 1000, "seq": 99, "kind": "telemetry",
                          "protocol": "mqtt", "topic_or_path": f"devices/{device}/telemetry",
                          "payload": payload})


def test_kafka_records_are_matched_by_device_and_sequence() -> None:
    stats = Stats()
    m = SeqMatcher(stats)
    now = 1_000_000_000
    records = [("a", 1), ("a", 2), ("b", 1), ("a", 4), ("a", 3), ("a", 4), ("b", 2)]
    for device, seq in records:
        parsed = parse_record(device.encode(), _envelope(device, seq, now - 5000))
        assert parsed == (device, seq, now - 5000)
        m.observe(parsed[0], parsed[1], parsed[2], now)
    assert m.unique == 6 and m.duplicates == 1 and m.reordered == 1 and m.gaps == 0
    assert m.finish(expected=8) == 2  # two acknowledged messages never reached Kafka
    delta = stats.take_delta()
    c = Collector()
    c.add_delta(delta)
    e2e = c.entries[("KAFKA", "e2e telemetry")]
    assert e2e.hist.count == 6 and e2e.hist.max == 5000
    assert c.failures[("KAFKA", "e2e telemetry", "not seen in Kafka")] == 2
    assert c.counters["kafka_duplicates"] == 1


def test_kafka_matching_reads_the_gateways_own_envelope() -> None:
    from gateway.telemetry.records import Record

    payload = b'{"seq":5,"ts":1700000000000000,"temp":20.5,"pad":"xxxx"}'
    value = Record("thermostat-3", "telemetry", "mqtt", "devices/thermostat-3/telemetry",
                   payload, ts_ms=1700000000001, seq=77).envelope()
    assert parse_record(b"thermostat-3", value) == ("thermostat-3", 5, 1700000000000000)


def test_kafka_gap_stays_missing_until_the_late_record_arrives() -> None:
    m = SeqMatcher(Stats())
    m.observe("d", 1, 0, 10)
    m.observe("d", 5, 0, 10)
    assert m.gaps == 3
    m.observe("d", 3, 0, 10)
    assert m.gaps == 2 and m.reordered == 1


def test_kafka_raw_json_records_take_the_device_from_the_key() -> None:
    assert parse_record(b"dev-7", b'{"seq": 12, "ts": 1700, "x": 1}') == ("dev-7", 12, 1700)
    assert parse_record(b"dev-7", b"not ours") is None
    assert parse_record(None, b'{"seq": 1, "ts": 2}') is None
    stamped, _ = payload_template(128)
    stamp(stamped, 42, 1234567)
    assert parse_record(b"c1", bytes(stamped)) == ("c1", 42, 1234567)


def test_expected_kafka_count_is_the_successful_telemetry_publishes() -> None:
    s = Stats()
    s.get("PUBLISH", "telemetry").count(10)
    s.failure("PUBLISH", "telemetry", "timeout", 2)
    s.get("POST", "telemetry").record(5)
    s.get("PUBLISH", "shadow update").count(3)
    c = Collector()
    c.add_delta(s.take_delta())
    assert expected_telemetry(c.entries) == 11


# ---- payload stamps -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [43, 44, 50, 128, 512])
def test_stamped_payloads_have_the_requested_size_and_parse_as_json(size: int) -> None:
    import json

    buf, stamped = payload_template(size)
    assert stamped and len(buf) == size
    stamp(buf, 7, 1_700_000_000_000_000)
    assert read_stamp(memoryview(buf)) == 1_700_000_000_000_000
    doc = json.loads(bytes(buf))
    assert doc["seq"] == 7 and doc["ts"] == 1_700_000_000_000_000


def test_small_payloads_are_not_stamped() -> None:
    buf, stamped = payload_template(10)
    assert not stamped and len(buf) == 10 and read_stamp(buf) is None


# ---- wait times, tasks, distribution ------------------------------------------------------------


class _Dev:
    stats = None


def test_wait_times_give_the_next_run() -> None:
    d = _Dev()
    assert constant(2).next_run(d, 10.0, 11.0) == 13.0
    assert 11.5 <= between(0.5, 1.0).next_run(d, 10.0, 11.0) <= 12.0
    assert constant_pacing(1).next_run(d, 10.0, 10.2) == 11.0  # absolute schedule
    d2 = _Dev()
    nxt = constant_throughput(5, 20).next_run(d2, 10.0, 10.0)
    assert 10.05 <= nxt <= 10.2
    assert constant_throughput(5, 20).period(d2) == pytest.approx(nxt - 10.0)  # once per device


@pytest.mark.parametrize("make", [lambda: between(3, 1), lambda: constant(-1),
                                  lambda: constant_pacing(0), lambda: between("a", 2)])
def test_bad_wait_time_arguments_raise_scenario_errors(make: Any) -> None:
    with pytest.raises(ScenarioError):
        make()


def test_classes_are_shared_by_fixed_count_then_weight() -> None:
    class A(MqttDevice):
        weight = 3

    class B(MqttDevice):
        weight = 1

    class C(MqttDevice):
        fixed_count = 2

    for cls in (A, B, C):
        cls.prepare()
    order = assign_classes([A, B, C], 10)
    assert order[:2] == [C, C]
    assert order[2:].count(A) == 6 and order[2:].count(B) == 2
    assert order[2:6] == [A, B, A, A] or order[2:6].count(B) == 1  # interleaved
    assert assign_classes([A, B, C], 1) == [C]


def test_tasks_are_collected_with_their_weights() -> None:
    class D(MqttDevice):
        wait_time = constant(1)

        @task(3)
        def a(self) -> None:
            pass

        @task
        def b(self) -> None:
            pass

    D.prepare()
    names = [f.__name__ for f in D.task_list]
    assert names.count("a") == 3 and names.count("b") == 1


def test_tasks_without_wait_time_are_refused() -> None:
    class E(MqttDevice):
        @task
        def a(self) -> None:
            pass

    with pytest.raises(ScenarioError, match="no wait_time"):
        E.prepare()


# ---- settings -----------------------------------------------------------------------------------


def test_durations_read_like_locust() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2m5s") == 125
    assert parse_duration("500ms") == 0.5
    with pytest.raises(Exception, match="duration"):
        parse_duration("5 minutes")


def test_hosts_take_scheme_defaults() -> None:
    assert parse_host("mqtt://h").port == 1883
    assert parse_host("mqtts://h").port == 8883
    assert parse_host("coap://h").port == 5683
    assert parse_host("h:1999").port == 1999
    assert parse_host("mqtt://h:1", port=7).port == 7
    with pytest.raises(UsageError):
        parse_host("http://h")


def test_flags_beat_environment_which_beats_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "load.toml"
    conf.write_text('users = 5\nspawn-rate = 7\nheadless = true\nqos = 0\n[pub]\nsize = 99\n')
    env = {"IOTGW_LOAD_CONFIG": str(conf), "IOTGW_LOAD_USERS": "6"}
    kind, opts = parse_args([], env)
    assert (kind, opts.count, opts.spawn_rate, opts.headless, opts.qos) == (
        "scenario", 6, 7.0, True, 0)
    _, opts = parse_args(["-c", "8"], env)
    assert opts.count == 8
    kind, opts = parse_args(["pub", "-I", "5"], env)
    assert (kind, opts.size, opts.interval, opts.count) == ("pub", 99, 5.0, 6)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "iotgw-load.toml").write_text("count = 3\n")
    assert parse_args([], {})[1].count == 3  # ./iotgw-load.toml is read by default


def test_unknown_or_malformed_settings_are_usage_errors(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("userz = 5\n")
    with pytest.raises(UsageError, match="userz"):
        parse_args(["--config", str(conf)], {})
    conf.write_text("qos = 3\n")
    with pytest.raises(UsageError, match="qos"):
        parse_args(["--config", str(conf)], {})
    with pytest.raises(UsageError, match="IOTGW_LOAD_RUN_TIME"):
        parse_args([], {"IOTGW_LOAD_RUN_TIME": "soon"})


# ---- reports ------------------------------------------------------------------------------------


def test_csv_and_html_reports_carry_the_totals(tmp_path: Path) -> None:
    c = Collector()
    for second in range(3):
        s = Stats()
        for i in range(50):
            s.get("PUBLISH", "telemetry").record(1000 + i * 10 + second)
        s.get("PING", "heartbeat").record(200)
        if second == 1:
            s.failure("PUBLISH", "telemetry", "no acknowledgement (timeout)")
        c.add_delta(s.take_delta())
        c.set_gauges("w", 10, 9)
        c.close_interval()
    c.ended = c.started + 3
    write_csv(str(tmp_path / "r"), c)
    rows = list(csv.DictReader((tmp_path / "r_stats.csv").open()))
    by_name = {r["Name"]: r for r in rows}
    assert by_name["telemetry"]["Request Count"] == "151"
    assert by_name["telemetry"]["Failure Count"] == "1"
    assert by_name["Aggregated"]["Request Count"] == "154"
    assert by_name["heartbeat"]["50%"] == "0.200"
    hist = list(csv.DictReader((tmp_path / "r_stats_history.csv").open()))
    assert [h["Total Request Count"] for h in hist] == ["51", "103", "154"]
    assert hist[-1]["User Count"] == "10" and hist[-1]["Connected"] == "9"
    fails = list(csv.DictReader((tmp_path / "r_failures.csv").open()))
    assert fails == [{"Method": "PUBLISH", "Name": "telemetry",
                      "Error": "no acknowledgement (timeout)", "Occurrences": "1"}]
    page = render_html(c, {"Target": "mqtt://x"})
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    svgs = page.count("<svg")
    assert svgs == 3
    for chunk in page.split("<svg")[1:]:
        ET.fromstring("<svg" + chunk.split("</svg>")[0] + "</svg>")  # well-formed
    assert "154" in page and "no acknowledgement (timeout)" in page


def test_live_display_shows_rates_and_percentiles_of_the_interval() -> None:
    import io

    from rich.console import Console

    from loadtest.console import LiveDisplay

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160, color_system=None)
    c = Collector()
    s = Stats()
    for i in range(100):
        s.get("PUBLISH", "telemetry").record(1000 + i)
    s.failure("PUBLISH", "telemetry", "timeout")
    c.add_delta(s.take_delta())
    c.set_gauges("w", 5, 4)
    row = c.close_interval()
    live = LiveDisplay(console)
    live.start()
    live.update(c, row)
    live.stop()
    text = buf.getvalue()
    assert "devices=5 connected=4" in text
    assert "telemetry" in text and "1.05" in text  # p50 of the interval in ms
    assert "errors so far: 1" in text
