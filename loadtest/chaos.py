"""`iotgw-load chaos`: the chaos fleet (loadtest/chaosfleet.py) against a deployment this
command starts (loadtest/deploy.py), under a fault schedule (loadtest/faults.py); then every
acknowledged message is looked for where it must be, and the run is judged.

1. Start the deployment (Redis, Kafka, N gateway workers, Toxiproxy on the TCP links) and the
   UDP relay for CoAP (in this process).
2. Run the fleet for the schedule's duration (driver.run_local, one process); beside it, apply
   each fault at its time and revert it at its end, noting the wall-clock window.
3. Verify: read every record of `iot.telemetry` (Kafka's direct listener, past the proxy) and
   match them by (device, seq) with what each device was acknowledged: acknowledged but not
   there is lost; there twice is a duplicate. Read each shadow back over REST: its `reported`
   must be the last report acknowledged as stored (or one sent after it, never acknowledged),
   and its version at least the number of reports acknowledged.
4. Measure per fault window and traffic kind (counts, failures, p50/p99/max), reconnects and
   their times, the recovery time after each fault (until the per-second p99 is back near the
   calm baseline), commands answered and timed out, and the priority ratio (command and shadow
   p99 while telemetry floods and Kafka is slow, over their calm p99).
5. Write the JSON summary and the HTML report (fault windows as bands), apply --fail-on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.chaosfleet import ChaosActuator, ChaosCoapDevice, Flooder, Ledger
from loadtest.deploy import API_TOKEN, Deployment, DeploymentError
from loadtest.faults import PROCESS, Fault, Schedule
from loadtest.kafka import parse_record
from loadtest.runtime import Settings, UsageError
from loadtest.stats import Collector, HistoryRow, StatsEntry
from loadtest.toxiproxy import Toxiproxy
from loadtest.udprelay import NONE, Impairment, UdpRelay

# Traffic kinds: (type, name) entries of the statistics that make each.
KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "heartbeat": (("PING", "heartbeat"),),
    "telemetry": (("PUBLISH", "telemetry"), ("POST", "telemetry")),
    "command": (("COMMAND", "round trip"),),
    "shadow": (("PUBLISH", "shadow update"), ("PATCH", "shadow update")),
    "flood": (("PUBLISH", "flood"),),
    "reconnect": (("RECONNECT", "mqtt"),),
}
WARMUP = 3.0  # seconds at the start left out of the calm baseline (devices still connecting)
PRIORITY_BOUND = 3.0  # command/shadow p99 under stress over calm p99
# The calm p99 counted as at least this much when judging the bound: a few milliseconds of
# scheduling noise on a shared machine must not read as a priority failure, while urgent
# messages queued behind a telemetry backlog (hundreds of ms with Kafka slow) still do.
PRIORITY_FLOOR_MS = 10.0


@dataclass
class Window:
    fault: Fault
    start: float  # wall clock
    end: float | None = None
    error: str | None = None


@dataclass
class Target:
    """Where the fleet goes and where the verifier looks: the deployment this command started,
    or one given by flags (`--host` ...)."""

    mqtt_host: str
    mqtt_port: int
    coap_host: str
    coap_port: int
    kafka: str  # bootstrap for reading back (past any fault proxy)
    http_urls: list[str]
    api_token: str
    toxi: Toxiproxy | None  # proxies named device, kafka, redis
    dep: Deployment | None = None  # for the process faults

    @classmethod
    def of(cls, dep: Deployment) -> Target:
        return cls("127.0.0.1", dep.ports.mqtt_proxy, "127.0.0.1", dep.ports.coap,
                   dep.kafka_direct, dep.http_urls, API_TOKEN, dep.toxi, dep)


@dataclass
class ChaosOptions:
    schedule: Schedule
    devices: int = 12
    spawn_rate: float = 50.0
    workers: int = 2
    json_path: str | None = None
    html_path: str | None = None
    fail_on: str | None = None
    workdir: str | None = None
    keep: bool = False
    toxiproxy: str | None = None
    verify_timeout: float = 60.0
    quiet: bool = False
    target: Target | None = None  # None: start a deployment


@dataclass
class Verdict:
    summary: dict[str, Any]
    failed: list[str] = field(default_factory=list)

    @property
    def code(self) -> int:
        return 1 if self.failed else 0


# ---- --fail-on -----------------------------------------------------------------------------

_COND = re.compile(r"^\s*(lost|duplicates|timeouts|p50:\w+|p99:\w+|max:\w+|recovery|priority)"
                   r"\s*>\s*([0-9.]+)\s*(ms|s|x)?\s*$")


def parse_chaos_fail_on(text: str | None) -> list[tuple[str, float]]:
    """`lost>0,p99:command>500ms,recovery>10s,priority>3` -> [(metric, limit)] (times in ms,
    recovery in s). `lost>0` always holds as well."""
    conds: list[tuple[str, float]] = [("lost", 0.0)]
    for part in (text or "").split(","):
        if not part.strip():
            continue
        m = _COND.match(part)
        if m is None:
            raise UsageError(
                f"--fail-on {part.strip()!r}: conditions are lost>N, duplicates>N, "
                "timeouts>N, p50|p99|max:KIND>Nms, recovery>Ns, priority>N "
                f"(KIND: {', '.join(KINDS)})"
            )
        metric, value, unit = m[1], float(m[2]), m[3]
        if ":" in metric and metric.split(":")[1] not in KINDS:
            raise UsageError(f"--fail-on {part.strip()!r}: no traffic kind "
                             f"{metric.split(':')[1]!r} (kinds: {', '.join(KINDS)})")
        if unit == "s" and metric != "recovery":
            value *= 1000
        conds.append((metric, value))
    return conds


# ---- faults ----------------------------------------------------------------------------------


class FaultDriver:
    """Applies and reverts faults on the deployment, the relay and the fleet."""

    def __init__(self, target: Target, relay: UdpRelay,
                 flooders: Callable[[], list[Flooder]]) -> None:
        self.target = target
        self.relay = relay
        self.flooders = flooders

    async def apply(self, f: Fault) -> None:
        toxi, dep = self._toxi(f), self._dep(f)
        p = f.params
        if f.link == "coap":
            self.relay.impairment = Impairment(drop=1.0) if f.kind == "partition" else \
                Impairment.from_dict(p)
        elif f.kind == "partition":
            await asyncio.to_thread(toxi.set_enabled, str(f.link), False)
        elif f.kind in ("latency", "bandwidth", "timeout", "reset"):
            kind = {"reset": "reset_peer"}.get(f.kind, f.kind)
            attrs = {
                "latency": {"latency": int(p.get("latency_ms", 0)),
                            "jitter": int(p.get("jitter_ms", 0))},
                "bandwidth": {"rate": int(p.get("rate_kbps", 16))},
                "timeout": {"timeout": int(p.get("timeout_ms", 0))},
                "reset": {"timeout": int(p.get("timeout_ms", 0))},
            }[f.kind]
            streams = ("downstream",) if f.kind == "latency" else ("downstream", "upstream")
            for stream in streams:
                await asyncio.to_thread(toxi.add_toxic, str(f.link), self._toxic(f, stream),
                                        kind, attrs, stream)
        elif f.kind == "kafka-stop":
            await asyncio.to_thread(dep.stop_kafka)
        elif f.kind == "redis-stop":
            await asyncio.to_thread(dep.stop_redis)
        elif f.kind == "worker-kill":
            await asyncio.to_thread(dep.kill_worker, 0)
        elif f.kind == "gateway-kill":
            await asyncio.to_thread(dep.kill_gateway)
        elif f.kind == "flood":
            for d in self.flooders():
                d.flooding = True

    def _toxi(self, f: Fault) -> Toxiproxy:
        if f.link in (None, "coap") or self.target.toxi is not None:
            return self.target.toxi  # type: ignore[return-value]
        raise UsageError(f"{f.name}: needs Toxiproxy (--toxiproxy-api)")

    def _dep(self, f: Fault) -> Deployment:
        if f.kind not in PROCESS or self.target.dep is not None:
            return self.target.dep  # type: ignore[return-value]
        raise UsageError(f"{f.name}: process faults need the deployment this command starts")

    async def revert(self, f: Fault) -> None:
        toxi, dep = self._toxi(f), self._dep(f)
        if f.link == "coap":
            self.relay.impairment = NONE
        elif f.kind == "partition":
            await asyncio.to_thread(toxi.set_enabled, str(f.link), True)
        elif f.kind in ("latency", "bandwidth", "timeout", "reset"):
            streams = ("downstream",) if f.kind == "latency" else ("downstream", "upstream")
            for stream in streams:
                await asyncio.to_thread(toxi.remove_toxic, str(f.link), self._toxic(f, stream))
        elif f.kind == "kafka-stop":
            await asyncio.to_thread(dep.start_kafka)
        elif f.kind == "redis-stop":
            await asyncio.to_thread(dep.start_redis)
        elif f.kind == "gateway-kill":
            await asyncio.to_thread(dep.start_gateway)
        elif f.kind == "flood":
            for d in self.flooders():
                d.flooding = False

    @staticmethod
    def _toxic(f: Fault, stream: str) -> str:
        return f"{f.kind}-{int(f.at * 1000)}-{stream}"


async def _drive_faults(schedule: Schedule, driver: FaultDriver, started: Callable[[], float],
                        windows: list[Window], log: Callable[[str], None]) -> None:
    async def one(f: Fault, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + f.at - time.time()))
        w = Window(f, time.time())
        windows.append(w)
        log(f"chaos: {w.start - t0:6.1f}s  start {f.name}")
        try:
            await driver.apply(f)
            await asyncio.sleep(max(0.0, t0 + f.end - time.time()))
        except Exception as exc:
            w.error = f"{type(exc).__name__}: {exc}"
            log(f"chaos: {f.name}: {w.error}")
        finally:
            try:
                await asyncio.shield(driver.revert(f))
            except Exception as exc:
                w.error = (w.error or "") + f" revert: {type(exc).__name__}: {exc}"
                log(f"chaos: {f.name}: revert failed: {exc}")
            w.end = time.time()
            log(f"chaos: {w.end - t0:6.1f}s  end   {f.name}")

    t0 = started()
    tasks = [asyncio.ensure_future(one(f, t0)) for f in schedule.faults]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- reading back ----------------------------------------------------------------------------


async def read_telemetry(bootstrap: str, want: set[tuple[str, int]], timeout: float,
                         topic: str = "iot.telemetry") -> dict[tuple[str, int], int]:
    """How often each (device, seq) is in `topic`, reading from the beginning until every one
    of `want` was seen and the partitions' ends (as of the start) are reached, or `timeout`."""
    from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None,
                                fetch_max_bytes=16 << 20)
    await consumer.start()
    seen: dict[tuple[str, int], int] = {}
    try:
        deadline = time.monotonic() + timeout
        partitions: set[int] | None = None
        while not partitions and time.monotonic() < deadline:
            cluster = await consumer._client.fetch_all_metadata()
            partitions = cluster.partitions_for_topic(topic)
            if not partitions:
                await asyncio.sleep(0.5)
        if not partitions:
            return seen
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        missing = set(want)
        ends: dict[Any, int] = {}
        last_ends = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - last_ends > 2.0:  # a spool replay may still be adding records
                ends = await consumer.end_offsets(tps)
                last_ends = time.monotonic()
            batches = await consumer.getmany(timeout_ms=300, max_records=50_000)
            for records in batches.values():
                for r in records:
                    parsed = parse_record(r.key, r.value)
                    if parsed is None:
                        continue
                    key = (parsed[0], parsed[1])
                    seen[key] = seen.get(key, 0) + 1
                    missing.discard(key)
            at_end = True
            for tp in tps:
                if await consumer.position(tp) < ends.get(tp, 0):
                    at_end = False
            if not missing and at_end:
                break
    finally:
        await consumer.stop()
    return seen


def _get_json(url: str, token: str, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def check_shadows(http_urls: Sequence[str], devices: Sequence[Any], token: str
                  ) -> dict[str, Any]:
    """Each shadow-reporting device's stored document against its ledger."""
    diverged: list[dict[str, Any]] = []
    checked = 0
    for i, d in enumerate(devices):
        ledger: Ledger = d.ledger
        if not ledger.reports:
            continue
        checked += 1
        url = f"{http_urls[i % len(http_urls)]}/v1/devices/{d.id}/shadow"
        try:
            doc = _get_json(url, token)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            diverged.append({"device": d.id, "problem": f"GET shadow: {exc}"})
            continue
        stored = (doc.get("state") or {}).get("reported") or {}
        version = int(doc.get("version") or 0)
        candidates = [r for seq, r in ledger.reports if seq >= ledger.report_acked]
        matches = any(all(stored.get(k) == v for k, v in r.items()) for r in candidates)
        if ledger.report_acked == 0 and not ledger.reports_acked:
            matches = matches or not stored  # nothing acknowledged: nothing promised
        if not matches:
            last = next((r for seq, r in ledger.reports if seq == ledger.report_acked), None)
            diverged.append({"device": d.id, "problem": "reported is not the last "
                             "acknowledged report (nor a later one)", "stored": stored,
                             "last_acknowledged": last})
        elif version < ledger.reports_acked:
            diverged.append({"device": d.id, "problem": f"version {version} < "
                             f"{ledger.reports_acked} reports acknowledged (a lost write)",
                             "vv": doc.get("vv")})
        elif sum(int(n) for n in (doc.get("vv") or {}).values()) < ledger.reports_acked:
            diverged.append({"device": d.id, "problem": "the version vector counts fewer "
                             f"writes than the {ledger.reports_acked} acknowledged (a lost "
                             "write)", "vv": doc.get("vv")})
    return {"devices": checked, "converged": not diverged, "diverged": diverged}


# ---- measuring -------------------------------------------------------------------------------


def _merge(rows: Sequence[HistoryRow], kind: str) -> StatsEntry:
    e = StatsEntry("", kind)
    keys = KINDS[kind]
    for row in rows:
        for key in keys:
            got = row.entries.get(key)
            if got is not None:
                e.merge(got)
    return e


def _describe(e: StatsEntry) -> dict[str, Any]:
    h = e.hist
    out: dict[str, Any] = {"count": e.num_requests, "failures": e.num_failures}
    if h.count:
        p50, p99 = h.percentiles((0.5, 0.99))
        out.update(p50_ms=round(p50 / 1000, 3), p99_ms=round(p99 / 1000, 3),
                   max_ms=round(h.max / 1000, 3))
    else:
        out.update(p50_ms=None, p99_ms=None, max_ms=None)
    return out


def _rows_between(collector: Collector, a: float, b: float) -> list[HistoryRow]:
    """History rows whose interval's middle is in [a, b)."""
    return [r for r in collector.history if a <= r.timestamp - r.interval / 2 < b]


def _recovery(collector: Collector, end: float, baseline: dict[str, Any],
              horizon: float) -> dict[str, float | None]:
    """Seconds from the fault's end until the per-second p99 of each kind is back near its
    calm value (<= max(2 x baseline p99, baseline p99 + 20 ms)) with no failures that second;
    None if it did not come back before `horizon` (the next fault or the end)."""
    out: dict[str, float | None] = {}
    for kind in ("telemetry", "heartbeat"):
        base = baseline.get(kind, {}).get("p99_ms")
        if base is None:
            continue
        limit = max(2 * base, base + 20.0)
        out[kind] = None
        for row in collector.history:
            if row.timestamp < end or row.timestamp - row.interval > horizon:
                continue
            e = _merge([row], kind)
            if e.hist.count and not e.num_failures and e.hist.percentile(0.99) / 1000 <= limit:
                out[kind] = round(max(0.0, row.timestamp - end), 1)
                break
    return out


def summarize(collector: Collector, windows: list[Window], devices: Sequence[Any],
              seen: dict[tuple[str, int], int], shadows: dict[str, Any],
              meta: dict[str, Any]) -> dict[str, Any]:
    t0 = collector.started
    end = collector.ended or time.time()
    first_fault = min((w.start for w in windows), default=end)
    baseline_rows = _rows_between(collector, t0 + WARMUP, first_fault)
    baseline = {k: _describe(_merge(baseline_rows, k)) for k in KINDS}

    # acknowledged-but-lost and duplicates, per kind, lost also per window (by the ack time)
    kinds: dict[str, dict[str, Any]] = {}
    lost_at: list[float] = []
    for d in devices:
        kind = "flood" if isinstance(d, Flooder) else "telemetry"
        acc = kinds.setdefault(kind, {"acknowledged": 0, "lost": 0, "duplicates": 0})
        for seq, when in d.ledger.telemetry_acked:
            acc["acknowledged"] += 1
            if seen.get((d.id, seq), 0) == 0:
                acc["lost"] += 1
                lost_at.append(when)
    by_device = {d.id: ("flood" if isinstance(d, Flooder) else "telemetry") for d in devices}
    for (dev, _), n in seen.items():
        if n > 1 and dev in by_device:
            kinds[by_device[dev]]["duplicates"] += n - 1
    whole = {k: _describe(aggregate_kind(collector, k)) for k in KINDS}
    for name, stats in whole.items():
        stats.update(kinds.get(name, {}))
        stats.setdefault("lost", 0)
        stats.setdefault("duplicates", 0)
    shadow_lost = sum(1 for x in shadows["diverged"] if "lost write" in x["problem"])
    whole["shadow"]["lost"] = shadow_lost

    out_windows = []
    ordered = sorted(windows, key=lambda w: w.start)
    for i, w in enumerate(ordered):
        w_end = w.end or end
        rows = _rows_between(collector, w.start, w_end)
        nxt = min([x.start for x in ordered[i + 1:] if x.start >= w_end] + [end])
        out_windows.append({
            **w.fault.to_dict(),
            "start_s": round(w.start - t0, 1),
            "end_s": round(w_end - t0, 1),
            "error": w.error,
            "kinds": {k: _describe(_merge(rows, k)) for k in KINDS},
            "lost": sum(1 for t in lost_at if w.start <= t < w_end),
            # devices reconnect after the fault: counted up to the next fault (or the end)
            "reconnects": _describe(_merge(_rows_between(collector, w.start, nxt), "reconnect")),
            "recovery_s": _recovery(collector, w_end, baseline, nxt),
        })

    # priority: command and shadow p99 while flooding (and Kafka slow) over their calm p99
    flood_rows = [r for w in windows if w.fault.kind == "flood"
                  for r in _rows_between(collector, w.start, w.end or end)]
    priority: dict[str, Any] = {"bound": PRIORITY_BOUND, "floor_ms": PRIORITY_FLOOR_MS}
    for urgent in ("command", "shadow"):
        calm = baseline[urgent].get("p99_ms")
        stressed = _describe(_merge(flood_rows, urgent)).get("p99_ms") if flood_rows else None
        ratio = round(stressed / calm, 2) if calm and stressed is not None else None
        priority[urgent] = {
            "calm_p99_ms": calm, "stressed_p99_ms": stressed, "ratio": ratio,
            "within_bound": None if calm is None or stressed is None else
            stressed <= PRIORITY_BOUND * max(calm, PRIORITY_FLOOR_MS),
        }
    cmd = aggregate_kind(collector, "command")
    timed_out = sum(c for (t, n, err), c in collector.failures.items()
                    if t == "COMMAND" and "timeout" in err)
    lost = sum(v.get("lost", 0) for v in whole.values())
    return {
        **meta,
        "lost": lost,
        "duplicates": sum(v.get("duplicates", 0) for v in whole.values()),
        "converged": shadows["converged"],
        "p99_ms": {k: v["p99_ms"] for k, v in whole.items()},
        "kinds": whole,
        "baseline": baseline,
        "reconnects": whole["reconnect"],
        "commands": {"sent": cmd.num_requests, "answered": cmd.num_requests - cmd.num_failures,
                     "timed_out": timed_out, "failed": cmd.num_failures - timed_out},
        "shadow": shadows,
        "windows": out_windows,
        "priority": priority,
        "errors": [{"type": t, "name": n, "error": err, "count": c} for (t, n, err), c in
                   sorted(collector.failures.items(), key=lambda kv: -kv[1])[:30]],
    }


def aggregate_kind(collector: Collector, kind: str) -> StatsEntry:
    e = StatsEntry("", kind)
    for key in KINDS[kind]:
        got = collector.entries.get(key)
        if got is not None:
            e.merge(got)
    return e


def judge(summary: dict[str, Any], conds: list[tuple[str, float]]) -> list[str]:
    failed = []
    if not summary["converged"]:
        failed.append(f"shadows did not converge: {len(summary['shadow']['diverged'])} devices")
    for metric, limit in conds:
        if metric in ("lost", "duplicates"):
            value: float | None = summary[metric]
        elif metric == "timeouts":
            value = summary["commands"]["timed_out"]
        elif metric == "recovery":
            values = [v for w in summary["windows"] for v in w["recovery_s"].values()]
            if any(v is None for v in values):
                failed.append("recovery: some fault was not recovered from before the next one")
                continue
            value = max((v for v in values if v is not None), default=0.0)
        elif metric == "priority":
            pr = summary["priority"]
            for urgent in ("command", "shadow"):
                calm, stressed = pr[urgent]["calm_p99_ms"], pr[urgent]["stressed_p99_ms"]
                if calm is None or stressed is None:
                    failed.append(f"priority: no {urgent} p99 to compare (calm {calm}, "
                                  f"stressed {stressed})")
                elif stressed > limit * max(calm, pr["floor_ms"]):
                    failed.append(f"priority: {urgent} p99 {stressed:g} ms under stress > "
                                  f"{limit:g} x calm {calm:g} ms (floor {pr['floor_ms']:g})")
            continue
        else:
            stat, kind = metric.split(":")
            value = summary["kinds"][kind].get(f"{stat}_ms")
        if value is not None and value > limit:
            failed.append(f"{metric} = {value:g} > {limit:g}")
    if any(w["error"] for w in summary["windows"]):
        failed += [f"fault {w['name']}: {w['error']}" for w in summary["windows"] if w["error"]]
    return failed


# ---- the run ---------------------------------------------------------------------------------


async def _run(opts: ChaosOptions, target: Target, log: Callable[[str], None]
               ) -> tuple[Collector, list[Window], list[Any], dict[tuple[str, int], int],
                          dict[str, Any], dict[str, int]]:
    from loadtest.console import HeadlessDisplay, default_line
    from loadtest.driver import RunControl, load_classes, run_local
    from loadtest.runner import Runner

    relay = UdpRelay((target.coap_host, target.coap_port))
    relay_port = await relay.start()
    settings = Settings(mqtt_host=target.mqtt_host, mqtt_port=target.mqtt_port,
                        coap_host="127.0.0.1", coap_port=relay_port, qos=1, keepalive=15,
                        ack_timeout=15.0, coap_timeout=30.0, command_timeout=10.0)
    spec: dict[str, Any] = {
        "kind": "scenario", "users": opts.devices, "spawn_rate": opts.spawn_rate,
        # device numbers of their own: records of earlier runs in Kafka are not this run's
        "first_number": random.randrange(1, 10**6) * 1000, "settings": settings.to_dict(),
        "scenario": {"file": None, "profile": "chaos", "classes": []},
    }
    spec["_classes"] = load_classes(spec)
    ctl = RunControl(run_time=opts.schedule.duration, stop_timeout=10.0,
                     display=None if opts.quiet else HeadlessDisplay(default_line))

    def devices() -> list[Any]:
        w = ctl.workload
        return list(w.devices) if isinstance(w, Runner) else []

    driver = FaultDriver(target, relay, lambda: [d for d in devices() if isinstance(d, Flooder)])
    windows: list[Window] = []
    traffic = asyncio.ensure_future(run_local(spec, ctl))
    while ctl.workload is None and not traffic.done():
        await asyncio.sleep(0.01)
    faults = asyncio.ensure_future(
        _drive_faults(opts.schedule, driver, lambda: ctl.collector.started, windows, log)
    )
    try:
        await traffic
    finally:
        if not faults.done():
            faults.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await faults
        relay.close()
    fleet = devices()
    want = {(d.id, seq) for d in fleet for seq, _ in d.ledger.telemetry_acked}
    log(f"chaos: reading back {len(want)} acknowledged telemetry messages from Kafka")
    seen = await read_telemetry(target.kafka, want, opts.verify_timeout)
    reporters = [d for d in fleet if isinstance(d, ChaosActuator | ChaosCoapDevice)]
    shadows = await asyncio.to_thread(check_shadows, target.http_urls, reporters,
                                      target.api_token)
    return ctl.collector, windows, fleet, seen, shadows, dict(relay.counters)


def run_chaos(opts: ChaosOptions) -> Verdict:
    """The whole chaos run; raises DeploymentError when the deployment cannot start."""
    import uvloop

    conds = parse_chaos_fail_on(opts.fail_on)

    def log(text: str) -> None:
        if not opts.quiet:
            print(text, file=sys.stderr, flush=True)

    tmp = None
    dep: Deployment | None = None
    target = opts.target
    if target is None:
        if opts.workdir:
            workdir = Path(opts.workdir)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="iotgw-chaos-")
            workdir = Path(tmp.name)
        dep = Deployment(workdir, workers=opts.workers, toxiproxy_binary=opts.toxiproxy,
                         log=log)
        log(f"chaos: starting the deployment in {workdir} ({opts.workers} workers, Redis, "
            "Kafka, Toxiproxy)")
        started = time.monotonic()
        dep.start()
        log(f"chaos: deployment up in {time.monotonic() - started:.1f} s")
        target = Target.of(dep)
    log(f"chaos: schedule {opts.schedule.name}: {len(opts.schedule.faults)} faults over "
        f"{opts.schedule.duration:g} s, {opts.devices} devices")
    try:
        collector, windows, fleet, seen, shadows, relayed = uvloop.run(_run(opts, target, log))
    finally:
        if dep is not None:
            dep.stop()
        if tmp is not None and not opts.keep:
            tmp.cleanup()
    meta = {"schedule": opts.schedule.name, "duration_s": opts.schedule.duration,
            "devices": opts.devices,
            "workers": opts.workers if opts.target is None else None,
            "target": f"mqtt://{target.mqtt_host}:{target.mqtt_port}"}
    summary = summarize(collector, windows, fleet, seen, shadows, meta)
    summary["coap_relay"] = relayed
    failed = judge(summary, conds)
    summary["failed"] = failed
    summary["passed"] = not failed
    if opts.json_path:
        Path(opts.json_path).write_text(json.dumps(summary, indent=2) + "\n")
        log(f"wrote {opts.json_path}")
    if opts.html_path:
        from loadtest.report import write_html

        bands = [(w.start, w.end or w.start, w.fault.name) for w in windows]
        write_html(opts.html_path, collector, {"Command": "iotgw-load chaos", **meta},
                   bands=bands, sections=[("Chaos summary", summary_html(summary))],
                   kind_charts=[("p99 per traffic kind (per second)", [
                       (k, [n for _, n in KINDS[k]]) for k in
                       ("heartbeat", "telemetry", "command", "shadow")])])
        log(f"wrote {opts.html_path}")
    return Verdict(summary, failed)


def summary_html(s: dict[str, Any]) -> str:
    import html

    def cell(v: Any) -> str:
        return "-" if v is None else html.escape(str(v))

    head = ("<p>lost: <b>{}</b>, duplicates: {}, converged: <b>{}</b>, commands answered {} / "
            "timed out {}, reconnects {}</p>").format(
        s["lost"], s["duplicates"], s["converged"], s["commands"]["answered"],
        s["commands"]["timed_out"], s["reconnects"]["count"])
    rows = ["<table><thead><tr><th>window</th><th>from</th><th>to</th><th>lost</th>"
            + "".join(f"<th>{k} p99 ms</th>" for k in ("heartbeat", "telemetry", "command",
                                                         "shadow"))
            + "<th>reconnects</th><th>recovery s (telemetry)</th></tr></thead><tbody>"]
    for w in s["windows"]:
        rows.append(
            f"<tr><td>{html.escape(w['name'])}</td><td class=num>{w['start_s']}</td>"
            f"<td class=num>{w['end_s']}</td><td class=num>{w['lost']}</td>"
            + "".join(f"<td class=num>{cell(w['kinds'][k]['p99_ms'])}</td>"
                      for k in ("heartbeat", "telemetry", "command", "shadow"))
            + f"<td class=num>{w['reconnects']['count']}</td>"
            f"<td class=num>{cell(w['recovery_s'].get('telemetry'))}</td></tr>"
        )
    rows.append("</tbody></table>")
    return head + "".join(rows)


def print_verdict(v: Verdict) -> None:
    s = v.summary
    print(f"chaos {s['schedule']}: lost={s['lost']} duplicates={s['duplicates']} "
          f"converged={s['converged']} commands answered={s['commands']['answered']} "
          f"timed_out={s['commands']['timed_out']} reconnects={s['reconnects']['count']}")
    for k in ("heartbeat", "telemetry", "command", "shadow", "flood"):
        e = s["kinds"][k]
        print(f"  {k:10} count={e['count']:<7} failures={e['failures']:<5} "
              f"p50={e['p50_ms']} p99={e['p99_ms']} max={e['max_ms']} ms")
    for w in s["windows"]:
        print(f"  [{w['start_s']:6.1f}-{w['end_s']:6.1f}s] {w['name']}: lost={w['lost']} "
              f"telemetry p99={w['kinds']['telemetry']['p99_ms']} "
              f"reconnects={w['reconnects']['count']} recovery={w['recovery_s']}")
    pr = s["priority"]
    for k in ("command", "shadow"):
        print(f"  priority {k}: calm p99={pr[k]['calm_p99_ms']} stressed "
              f"p99={pr[k]['stressed_p99_ms']} ratio={pr[k]['ratio']} (bound {pr['bound']})")
    for msg in v.failed:
        print(f"iotgw-load chaos: {msg}", file=sys.stderr)


# ---- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from loadtest.cli import parse_duration
    from loadtest.faults import BUILTIN

    p = argparse.ArgumentParser(
        prog="iotgw-load chaos",
        description="Start a deployment (gateway workers, Redis, Kafka, Toxiproxy, a UDP relay), "
        "run the chaos fleet under a fault schedule, verify that nothing acknowledged was lost "
        "and that the shadows converged, and report per fault window.",
        epilog="exit codes: 0 passed; 1 lost messages, shadows not converged or a --fail-on "
        "condition held; 2 usage or schedule error; 3 the deployment could not be started.",
    )
    p.add_argument("--schedule", default="smoke",
                   help=f"built-in schedule ({', '.join(BUILTIN)}) or a TOML file "
                   "(default smoke)")
    p.add_argument("-d", "--run-time", type=parse_duration,
                   help="run time (default: the schedule's duration; faults after it are "
                   "an error)")
    p.add_argument("-c", "--devices", type=int, default=12,
                   help="devices of the chaos fleet (default 12; 2 of them are flooders)")
    p.add_argument("-r", "--spawn-rate", type=float, default=50.0,
                   help="devices started per second (default 50)")
    p.add_argument("--workers", type=int, default=2, help="gateway workers (default 2)")
    p.add_argument("--json", metavar="FILE", help="write the JSON summary")
    p.add_argument("--html", metavar="FILE", help="write the HTML report (fault bands)")
    p.add_argument("--fail-on", metavar="CONDITIONS",
                   help='exit 1 when one holds, e.g. "lost>0,p99:command>500ms,recovery>10s,'
                   'priority>3" (lost>0 and non-converged shadows always fail)')
    p.add_argument("--workdir", help="keep the deployment's files (logs, data) here")
    p.add_argument("--toxiproxy", metavar="PATH", help="toxiproxy-server binary (default: "
                   ".cache/go-bin/toxiproxy-server, $IOTGW_TOXIPROXY or PATH)")
    p.add_argument("--verify-timeout", type=parse_duration, default=60.0,
                   help="seconds to wait for acknowledged telemetry in Kafka (default 60)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    g = p.add_argument_group(
        "an existing deployment (instead of starting one; network faults only)")
    g.add_argument("-H", "--host", help="mqtt://HOST:PORT the devices connect to (put your "
                   "Toxiproxy's device proxy here for faults on that link)")
    g.add_argument("--coap-host", help="coap://HOST:PORT of the gateway (the relay in this "
                   "process sits in front of it)")
    g.add_argument("--kafka", metavar="HOST:PORT", help="Kafka to read iot.telemetry back from "
                   "(not through a fault proxy)")
    g.add_argument("--http", metavar="URL[,URL]", help="the gateway's REST base URL(s), for "
                   "reading the shadows back")
    g.add_argument("--api-token", help="a REST token with shadow read scope")
    g.add_argument("--toxiproxy-api", metavar="HOST:PORT",
                   help="your Toxiproxy's API; its proxies named device, kafka, redis")
    return p


def target_from_args(args: argparse.Namespace, schedule: Schedule) -> Target:
    from loadtest.runtime import parse_host

    missing = [flag for flag, v in (("--coap-host", args.coap_host), ("--kafka", args.kafka),
                                    ("--http", args.http), ("--api-token", args.api_token))
               if not v]
    if missing:
        raise UsageError(f"--host needs {', '.join(missing)} too")
    mqtt_ep = parse_host(args.host)
    coap_ep = parse_host(args.coap_host)
    if mqtt_ep.scheme != "mqtt" or coap_ep.scheme != "coap":
        raise UsageError("--host takes mqtt://HOST:PORT and --coap-host coap://HOST:PORT")
    process = [f.name for f in schedule.faults if f.kind in PROCESS]
    if process:
        raise UsageError(f"the fault {process[0]!r} needs the deployment this command starts "
                         "(without --host)")
    toxi = None
    if args.toxiproxy_api:
        host, _, port = args.toxiproxy_api.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--toxiproxy-api {args.toxiproxy_api!r}: give HOST:PORT")
        toxi = Toxiproxy(host, int(port))
    elif any(f.link in ("device", "kafka", "redis") for f in schedule.faults):
        raise UsageError("faults on the device, kafka or redis links need --toxiproxy-api")
    return Target(mqtt_ep.host, mqtt_ep.port, coap_ep.host, coap_ep.port, args.kafka,
                  [u.strip().rstrip("/") for u in args.http.split(",") if u.strip()],
                  args.api_token, toxi)


def main(argv: Sequence[str]) -> int:
    from loadtest.faults import ScheduleError, load_schedule

    args = build_parser().parse_args(list(argv))
    try:
        schedule = load_schedule(args.schedule)
        if args.run_time is not None:
            late = [f.name for f in schedule.faults if f.end > args.run_time]
            if late:
                raise UsageError(f"--run-time {args.run_time:g}s: the fault {late[0]!r} ends "
                                 "after it")
            schedule.duration = args.run_time
        if args.devices < 3:
            raise UsageError("--devices: at least 3 (the fleet has 2 flooders)")
        if args.workers < 1:
            raise UsageError("--workers: at least 1")
        target = target_from_args(args, schedule) if args.host else None
        opts = ChaosOptions(schedule, devices=args.devices, spawn_rate=args.spawn_rate,
                            workers=args.workers, json_path=args.json, html_path=args.html,
                            fail_on=args.fail_on, workdir=args.workdir,
                            toxiproxy=args.toxiproxy, verify_timeout=args.verify_timeout,
                            quiet=args.quiet, target=target)
        parse_chaos_fail_on(args.fail_on)
    except (ScheduleError, UsageError) as exc:
        print(f"iotgw-load chaos: error: {exc}", file=sys.stderr)
        return 2
    try:
        verdict = run_chaos(opts)
    except DeploymentError as exc:
        print(f"iotgw-load chaos: {exc}", file=sys.stderr)
        return 3
    print_verdict(verdict)
    return verdict.code
