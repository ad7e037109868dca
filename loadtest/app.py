"""One run from parsed options: drive it, show it, report it, decide the exit code."""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from rich.console import Console

from loadtest.console import Display, HeadlessDisplay, LiveDisplay, default_line
from loadtest.driver import RunControl, RunError, run_local, run_master
from loadtest.report import print_summary, write_csv, write_html
from loadtest.stats import Collector, HistoryRow, StatsEntry, aggregate
from loadtest.thresholds import evaluate, parse_fail_on

_BENCH_TYPES = {
    "conn": ("CONNECT",),
    "pub": ("PUBLISH",),
    "sub": ("RECEIVE",),
    "coap": ("GET", "POST", "PUT", "PATCH", "DELETE", "FETCH", "iPATCH"),
}


def _pick(entries: dict[tuple[str, str], StatsEntry], types: tuple[str, ...]) -> StatsEntry:
    return aggregate(e for (t, _), e in entries.items() if t in types)


def bench_line(kind: str) -> Any:
    """emqtt-bench-like status line: `[  3s] pub total=300000 rate=100000/sec ...`."""
    types = _BENCH_TYPES[kind]

    def line(collector: Collector, row: HistoryRow) -> str:
        elapsed = row.timestamp - collector.started
        total = _pick(collector.entries, types)
        window = _pick(row.entries, types)
        label = {"conn": "connect", "sub": "recv"}.get(kind, kind)
        text = (
            f"[{elapsed:5.0f}s] {label} total={total.num_requests} "
            f"rate={window.num_requests / row.interval:.0f}/sec"
        )
        if kind == "conn":
            text += f" connected={row.connected}"
            ping = _pick(row.entries, ("PING",))
            if ping.num_requests:
                text += f" ping={ping.num_requests / row.interval:.0f}/sec"
                text += f" ping_p99={ping.hist.percentile(0.99) / 1000:.2f}ms"
            if collector.rss_total and row.connected:
                text += (
                    f" rss={collector.rss_total / 1e6:.0f}MB "
                    f"(+{collector.rss_per_connection / 1024:.2f} KiB/conn)"
                )
        if kind in ("pub", "coap"):
            text += f" overrun={collector.counters.get('overrun', 0)}"
        fails = total.num_failures + sum(
            c for (t, _, _), c in collector.failures.items() if t in ("CONNECT",)
            and kind != "conn"
        )
        text += f" fails={fails}"
        if window.hist.count:
            p50, p99 = window.hist.percentiles((0.5, 0.99))
            what = {"conn": "connack", "pub": "ack", "sub": "e2e", "coap": "resp"}[kind]
            text += f" {what}_p50={p50 / 1000:.2f}ms {what}_p99={p99 / 1000:.2f}ms"
        return text + f" cpu={row.cpu * 100:.0f}%"

    return line


def run(kind: str, opts: argparse.Namespace, spec: dict[str, Any], target: str) -> int:
    import uvloop

    thresholds = parse_fail_on(opts.fail_on if opts.fail_on is not None else "errors>0")
    interactive = sys.stdout.isatty() and not opts.headless
    width = shutil.get_terminal_size((200, 40)).columns if interactive else 200
    console = Console(width=max(width, 100), soft_wrap=False, highlight=False)
    line = default_line if kind == "scenario" else bench_line(kind)
    display: Display = LiveDisplay(console, line) if interactive else HeadlessDisplay(line)
    ctl = RunControl(
        run_time=opts.run_time,
        stop_timeout=opts.stop_timeout,
        display=display,
        kafka=opts.kafka,
        kafka_topic=opts.kafka_topic,
        kafka_drain=opts.kafka_drain,
    )
    processes = opts.processes if opts.processes > 1 else 0
    mode = (f"{processes} processes" if processes else
            f"master of {opts.expect_workers} workers" if opts.master else "1 process")
    what = (f"scenario {spec['scenario']['file'] or 'profile ' + str(spec['scenario']['profile'])}"
            if kind == "scenario" else kind)
    print(f"iotgw-load: {what} -> {target}: {opts.count} devices at {opts.spawn_rate:g}/s, "
          f"{mode}, run time {opts.run_time or 'unlimited'}", flush=True)
    code = 0
    try:
        if processes or opts.master:
            coro = run_master(
                spec,
                ctl,
                bind_host=opts.master_bind_host,
                bind_port=opts.master_bind_port,
                expect=opts.expect_workers,
                processes=processes,
                scenario_file=spec.get("scenario", {}).get("file"),
                wait_workers=opts.expect_workers_max_wait if not processes else 60.0,
            )
        else:
            coro = run_local(spec, ctl)
        uvloop.run(coro)
    except RunError as exc:
        print(f"iotgw-load: {exc}", file=sys.stderr)
        code = 3
    collector = ctl.collector
    if collector.ended is None:
        collector.ended = collector.started if not collector.history else \
            collector.history[-1].timestamp
    if code and not collector.history:
        return code  # nothing ran
    print_summary(collector, console)
    if collector.peak_connected:
        line = f"Peak connected devices: {collector.peak_connected}"
        if collector.peak_rss_per_connection and collector.peak_connected >= 1000:
            line += (
                f"; load generator RSS {collector.rss_total / 1e6:.1f} MB, "
                f"{collector.peak_rss_per_connection / 1024:.2f} KiB per connected device"
            )
        console.print(line)
    meta = {
        "Command": "iotgw-load " + (kind if kind != "scenario" else what),
        "Target": target,
        "Devices": opts.count,
        "Spawn rate": f"{opts.spawn_rate:g}/s",
        "Mode": mode,
    }
    if collector.rss_total:
        meta["Load generator RSS (last report)"] = f"{collector.rss_total / 1e6:.1f} MB"
    if collector.peak_connected:
        meta["Peak connected devices"] = collector.peak_connected
        if collector.peak_rss_per_connection and collector.peak_connected >= 1000:
            meta["Memory per connected device (at peak)"] = (
                f"{collector.peak_rss_per_connection / 1024:.2f} KiB"
            )
    if opts.csv:
        for p in write_csv(opts.csv, collector):
            print(f"wrote {p}")
    if opts.html:
        print(f"wrote {write_html(opts.html, collector, meta)}")
    if code:
        return code
    failed = evaluate(thresholds, collector)
    for msg in failed:
        print(f"iotgw-load: {msg}", file=sys.stderr)
    return 1 if failed else 0
