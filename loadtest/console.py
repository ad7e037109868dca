"""What the user sees while a run goes: a live rich display on a terminal, or one status line
per interval (`--headless`, or when the output is not a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from loadtest.stats import Collector, HistoryRow

LineFormat = Callable[[Collector, HistoryRow], str]


def default_line(collector: Collector, row: HistoryRow) -> str:
    """`[  12s] devices=100 connected=100 total=12345 rate=2469/sec fails=0 p50=0.41ms ...`"""
    t = row.total
    tot = row.totals_snapshot
    elapsed = row.timestamp - collector.started
    text = (
        f"[{elapsed:6.0f}s] devices={row.users} connected={row.connected} "
        f"total={tot.num_requests} rate={t.num_requests / row.interval:.0f}/sec "
        f"fails={tot.num_failures}"
    )
    if t.hist.count:
        p50, p95, p99 = t.hist.percentiles((0.5, 0.95, 0.99))
        text += f" p50={p50 / 1000:.2f}ms p95={p95 / 1000:.2f}ms p99={p99 / 1000:.2f}ms"
    overrun = collector.counters.get("overrun")
    if overrun:
        text += f" overrun={overrun}"
    return text + f" cpu={row.cpu * 100:.0f}%"


class Display(Protocol):
    def start(self) -> None: ...

    def update(self, collector: Collector, row: HistoryRow) -> None: ...

    def stop(self) -> None: ...


class HeadlessDisplay:
    def __init__(self, line: LineFormat = default_line, stream: TextIO | None = None) -> None:
        self.line = line
        self.stream = stream or sys.stdout

    def start(self) -> None:
        pass

    def update(self, collector: Collector, row: HistoryRow) -> None:
        print(self.line(collector, row), file=self.stream, flush=True)

    def stop(self) -> None:
        pass


class LiveDisplay:
    """A rich Live panel: the status line, then this interval's rate and latency per request
    type, refreshed every interval."""

    def __init__(self, console: Console, line: LineFormat = default_line) -> None:
        self.console = console
        self.line = line
        self.live = Live(Text("starting..."), console=console, refresh_per_second=4,
                         transient=False)

    def start(self) -> None:
        self.live.start()

    def update(self, collector: Collector, row: HistoryRow) -> None:
        table = Table(expand=False)
        table.add_column("Type")
        table.add_column("Name")
        for col in ("# reqs", "# fails", "req/s", "fail/s", "p50 ms", "p95 ms", "p99 ms",
                    "max ms"):
            table.add_column(col, justify="right")
        for key in sorted(collector.entries):
            total = collector.entries[key]
            w = row.entries.get(key)
            rps = w.num_requests / row.interval if w else 0.0
            fps = w.num_failures / row.interval if w else 0.0
            if w is not None and w.hist.count:
                p50, p95, p99 = (f"{v / 1000:.2f}" for v in w.hist.percentiles((0.5, 0.95, 0.99)))
                mx = f"{w.hist.max / 1000:.2f}"
            else:
                p50 = p95 = p99 = mx = "-"
            table.add_row(key[0], key[1], str(total.num_requests), str(total.num_failures),
                          f"{rps:.1f}", f"{fps:.1f}", p50, p95, p99, mx)
        errors = sum(collector.failures.values())
        head = Text(self.line(collector, row))
        parts: list[Text | Table] = [head, table]
        if errors:
            parts.append(Text(f"errors so far: {errors} (see the failures table at the end)",
                              style="red"))
        self.live.update(Group(*parts))

    def stop(self) -> None:
        self.live.stop()
