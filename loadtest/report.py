"""Reports of a finished run: the console summary (locust's tables), CSV files and a
self-contained HTML page with inline SVG charts (no JavaScript, nothing fetched)."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest.histogram import PERCENTILES
from loadtest.stats import Collector, HistoryRow, StatsEntry, percentile_labels

STATS_HEADER = [
    "Type",
    "Name",
    "Request Count",
    "Failure Count",
    "Median Response Time",
    "Average Response Time",
    "Min Response Time",
    "Max Response Time",
    "Average Content Size",
    "Requests/s",
    "Failures/s",
    *percentile_labels(),
]
HISTORY_HEADER = [
    "Timestamp",
    "User Count",
    "Type",
    "Name",
    "Requests/s",
    "Failures/s",
    *percentile_labels(),
    "Total Request Count",
    "Total Failure Count",
    "Total Median Response Time",
    "Total Average Response Time",
    "Total Min Response Time",
    "Total Max Response Time",
    "Total Average Content Size",
    "Connected",
]
FAILURES_HEADER = ["Method", "Name", "Error", "Occurrences"]
_UNITS = {"Response Time": " (ms)", "Content Size": " (bytes)"}


def with_units(header: Sequence[str]) -> list[str]:
    """The CSV header (locust's names) with the unit of each figure, for the HTML page."""
    out = []
    for h in header:
        unit = next((u for key, u in _UNITS.items() if key in h), "")
        if h.endswith("%"):
            unit = " (ms)"
        out.append(h + unit)
    return out


def ms(micros: float) -> str:
    """Microseconds as milliseconds for tables and CSV (3 decimals: µs resolution)."""
    return f"{micros / 1000:.3f}"


def _timed(e: StatsEntry, value: float) -> str:
    return ms(value) if e.hist.count else "N/A"


def stats_rows(collector: Collector) -> list[list[str]]:
    """The rows of the stats table/CSV: one per (type, name), then Aggregated."""
    duration = collector.duration
    rows = []
    for e in [*collector.sorted_entries(), collector.total]:
        h = e.hist
        pcts = h.percentiles(PERCENTILES)
        rows.append(
            [
                e.type,
                e.name,
                str(e.num_requests),
                str(e.num_failures),
                _timed(e, h.percentile(0.5)),
                _timed(e, h.mean),
                _timed(e, h.min),
                _timed(e, h.max),
                f"{e.total_bytes / e.num_requests:.1f}" if e.num_requests else "0",
                f"{e.num_requests / duration:.2f}",
                f"{e.num_failures / duration:.2f}",
                *(_timed(e, p) for p in pcts),
            ]
        )
    return rows


def history_rows(collector: Collector) -> list[list[str]]:
    rows = []
    for row in collector.history:
        rows.append(_history_row(row, row.total))
    return rows


def _history_row(row: HistoryRow, window: StatsEntry) -> list[str]:
    t = row.totals_snapshot
    th = t.hist
    return [
        str(int(row.timestamp)),
        str(row.users),
        window.type,
        window.name,
        f"{window.num_requests / row.interval:.2f}",
        f"{window.num_failures / row.interval:.2f}",
        *(_timed(window, p) for p in window.hist.percentiles(PERCENTILES)),
        str(t.num_requests),
        str(t.num_failures),
        _timed(t, th.percentile(0.5)),
        _timed(t, th.mean),
        _timed(t, th.min),
        _timed(t, th.max),
        f"{t.total_bytes / t.num_requests:.1f}" if t.num_requests else "0",
        str(row.connected),
    ]


def failure_rows(collector: Collector) -> list[list[str]]:
    items = sorted(collector.failures.items(), key=lambda kv: (-kv[1], kv[0]))
    return [[t, n, err, str(c)] for (t, n, err), c in items]


def write_csv(prefix: str, collector: Collector) -> list[Path]:
    """PREFIX_stats.csv, PREFIX_stats_history.csv and PREFIX_failures.csv, as locust names
    them (times in milliseconds)."""
    out = []
    for suffix, header, rows in (
        ("_stats.csv", STATS_HEADER, stats_rows(collector)),
        ("_stats_history.csv", HISTORY_HEADER, history_rows(collector)),
        ("_failures.csv", FAILURES_HEADER, failure_rows(collector)),
    ):
        path = Path(prefix + suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        out.append(path)
    return out


# ---- console -----------------------------------------------------------------------------------


def print_summary(collector: Collector, console: Console, counters: bool = True) -> None:
    duration = collector.duration
    t = Table(title=f"Summary ({duration:.1f} s, response times in ms)", title_justify="left")
    for col in ("Type", "Name"):
        t.add_column(col)
    for col in ("# reqs", "# fails", "Avg", "Min", "Max", "Med", "req/s", "failures/s"):
        t.add_column(col, justify="right")
    entries = [*collector.sorted_entries(), collector.total]
    for i, e in enumerate(entries):
        h = e.hist
        pct = 100.0 * e.num_failures / e.num_requests if e.num_requests else 0.0
        if i == len(entries) - 1:
            t.add_section()
        t.add_row(
            e.type,
            e.name,
            str(e.num_requests),
            f"{e.num_failures}({pct:.2f}%)",
            _timed(e, h.mean),
            _timed(e, h.min),
            _timed(e, h.max),
            _timed(e, h.percentile(0.5)),
            f"{e.num_requests / duration:.2f}",
            f"{e.num_failures / duration:.2f}",
        )
    console.print(t)
    p = Table(title="Response time percentiles (ms)", title_justify="left")
    p.add_column("Type")
    p.add_column("Name")
    for label in percentile_labels():
        p.add_column(label, justify="right")
    p.add_column("# reqs", justify="right")
    p.add_column("# timed", justify="right")
    for i, e in enumerate(entries):
        if i == len(entries) - 1:
            p.add_section()
        p.add_row(
            e.type,
            e.name,
            *(_timed(e, v) for v in e.hist.percentiles(PERCENTILES)),
            str(e.num_requests),
            str(e.hist.count),
        )
    console.print(p)
    if collector.failures:
        f = Table(title="Failures and errors", title_justify="left")
        f.add_column("# occurrences", justify="right")
        f.add_column("Type")
        f.add_column("Name")
        f.add_column("Error")
        for typ, name, err, count in failure_rows(collector):
            f.add_row(count, typ, name, err)
        console.print(f)
    if counters and collector.counters:
        console.print(
            "Counters: " + ", ".join(f"{k}={v}" for k, v in sorted(collector.counters.items()))
        )


# ---- HTML --------------------------------------------------------------------------------------

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def _nice_step(span: float, count: int) -> float:
    """A step of 1, 2, 2.5 or 5 times a power of ten giving at most `count` steps over `span`."""
    if span <= 0:
        return 1.0
    raw = span / count
    exp = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= raw * (1 - 1e-9):
            return m * exp
    return 10 * exp  # pragma: no cover


def _ticks(vmax: float, count: int = 4) -> list[float]:
    """Round tick values from 0 to the first one at or past `vmax`."""
    step = _nice_step(vmax, count)
    n = max(1, math.ceil(vmax / step - 1e-9))
    return [step * i for i in range(n + 1)]


_DASHES = ["", "7 4", "2 3", "10 3 2 3", "4 4", "1 2"]  # overlapping series stay visible


def svg_chart(
    title: str,
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    unit: str,
    width: int = 900,
    height: int = 260,
    bands: Sequence[tuple[float, float, str]] = (),
) -> str:
    """A line chart as inline SVG: x = seconds since the start, one polyline per series;
    `bands` (from, to, label) are shaded behind the lines (the chaos suite's fault windows)."""
    left, right, top, bottom = 70, 150, 30, 44
    pw, ph = width - left - right, height - top - bottom
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    xtop = max([*xs, *(b[1] for b in bands)]) if xs or bands else 1.0
    xticks = _ticks(xtop if xtop > 0 else 1.0, 8)
    yticks = _ticks(max(ys) if ys and max(ys) > 0 else 1.0, 4)
    xmax, ymax = xticks[-1], yticks[-1]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="18" font-size="14" font-weight="bold">'
        f"{html.escape(title)} ({html.escape(unit)})</text>",
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for n, (x0, x1, label) in enumerate(bands):
        bx = left + pw * max(x0, 0.0) / xmax
        bw = max(pw * (min(x1, xmax) - max(x0, 0.0)) / xmax, 1.0)
        out.append(
            f'<rect x="{bx:.1f}" y="{top}" width="{bw:.1f}" height="{ph}" fill="#f2b134" '
            f'fill-opacity="0.22"><title>{html.escape(label)}</title></rect>'
        )
        out.append(
            f'<text x="{bx + 2:.1f}" y="{top + 11 + 11 * (n % 3)}" font-size="10" '
            f'fill="#8a5a00">{html.escape(label[:28])}</text>'
        )
    for yv in yticks:
        y = top + ph - ph * yv / ymax
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{_tick(yv)}</text>"
        )
    for xv in xticks:
        x = left + pw * xv / xmax
        out.append(
            f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">'
            f"{_tick(xv)}</text>"
        )
    out.append(
        f'<text x="{left + pw / 2:.0f}" y="{top + ph + 34}" font-size="11" '
        'text-anchor="middle">seconds since the start</text>'
    )
    out.append(
        f'<text x="14" y="{top + ph / 2:.0f}" font-size="11" '
        f'transform="rotate(-90 14 {top + ph / 2:.0f})" text-anchor="middle">'
        f"{html.escape(unit)}</text>"
    )
    for n, (label, pts) in enumerate(series):
        color = _COLORS[n % len(_COLORS)]
        dash = _DASHES[n % len(_DASHES)]
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        # Inset by a pixel: a series at 0 (or at the top) is not hidden by the frame.
        coords = " ".join(
            f"{left + pw * x / xmax:.1f},"
            f"{top + 1 + (ph - 2) * (1 - min(y, ymax) / ymax):.1f}" for x, y in pts
        )
        if coords:
            out.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="1.8"{dashed} '
                f'points="{coords}"><title>{html.escape(label)}</title></polyline>'
            )
        ly = top + 14 + 18 * n
        out.append(
            f'<line x1="{left + pw + 12}" y1="{ly - 4}" x2="{left + pw + 32}" y2="{ly - 4}" '
            f'stroke="{color}" stroke-width="3"{dashed}/>'
        )
        out.append(
            f'<text x="{left + pw + 38}" y="{ly}" font-size="12">{html.escape(label)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _tick(v: float) -> str:
    """A tick label: thousands separated, no trailing zeros (0.25, 2.5, 10, 12,500)."""
    if v == int(v):
        return f"{int(v):,}"
    return f"{v:,.6f}".rstrip("0").rstrip(".")


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric_from: int = 2) -> str:
    b = io.StringIO()
    b.write('<div class="scroll"><table><thead><tr>')
    for h in header:
        b.write(f"<th>{html.escape(h)}</th>")
    b.write("</tr></thead><tbody>")
    for r in rows:
        b.write("<tr>")
        for i, c in enumerate(r):
            cls = ' class="num"' if i >= numeric_from else ""
            b.write(f"<td{cls}>{html.escape(str(c))}</td>")
        b.write("</tr>")
    b.write("</tbody></table></div>")
    return b.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th{white-space:nowrap}
th,td{border:1px solid #ddd;padding:4px 8px}th{background:#f4f4f4;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:last-child td{font-weight:600}
.meta td{border:none;padding:2px 12px 2px 0}
"""


def render_html(
    collector: Collector,
    meta: dict[str, Any],
    bands: Sequence[tuple[float, float, str]] = (),
    sections: Sequence[tuple[str, str]] = (),
    kind_charts: Sequence[tuple[str, Sequence[tuple[str, Sequence[str]]]]] = (),
) -> str:
    """The whole report as one HTML document (inline CSS and SVG only). `bands` (wall-clock
    from, to, label) are shaded on every chart; `sections` (heading, HTML) come before the
    charts; `kind_charts` (title, [(label, names)]) add a p99 chart per group of entry names."""
    start = collector.history[0].timestamp - collector.history[0].interval if collector.history \
        else collector.started
    rps = []
    fps = []
    p50 = []
    p95 = []
    p99 = []
    users = []
    conn = []
    for row in collector.history:
        x = row.timestamp - start
        rps.append((x, row.total.num_requests / row.interval))
        fps.append((x, row.total.num_failures / row.interval))
        if row.total.hist.count:
            a, b, c = row.total.hist.percentiles((0.5, 0.95, 0.99))
            p50.append((x, a / 1000))
            p95.append((x, b / 1000))
            p99.append((x, c / 1000))
        users.append((x, float(row.users)))
        conn.append((x, float(row.connected)))
    shaded = [(a - start, b - start, label) for a, b, label in bands]
    charts = [
        svg_chart("Throughput", [("requests/s", rps), ("failures/s", fps)], "requests/s",
                  bands=shaded),
        svg_chart(
            "Response time percentiles per interval",
            [("p50", p50), ("p95", p95), ("p99", p99)],
            "ms",
            bands=shaded,
        ),
        svg_chart("Devices", [("spawned", users), ("connected", conn)], "devices",
                  bands=shaded),
    ]
    for title, groups in kind_charts:
        series = []
        for label, names in groups:
            pts = []
            for row in collector.history:
                merged = StatsEntry("", label)
                for (_, name), e in row.entries.items():
                    if name in names:
                        merged.merge(e)
                if merged.hist.count:
                    pts.append((row.timestamp - start, merged.hist.percentile(0.99) / 1000))
            series.append((label, pts))
        charts.append(svg_chart(title, series, "ms", bands=shaded))
    started = dt.datetime.fromtimestamp(collector.started).isoformat(timespec="seconds")
    ended = dt.datetime.fromtimestamp(collector.ended or collector.started).isoformat(
        timespec="seconds"
    )
    meta_rows = [
        ("Started", started),
        ("Ended", ended),
        ("Duration", f"{collector.duration:.1f} s"),
    ]
    meta_rows += [(str(k), str(v)) for k, v in meta.items()]
    if collector.counters:
        meta_rows += [(k, str(v)) for k, v in sorted(collector.counters.items())]
    meta_html = "".join(
        f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>" for k, v in meta_rows
    )
    pct_rows = [
        [e.type, e.name, *(_timed(e, v) for v in e.hist.percentiles(PERCENTILES)),
         str(e.num_requests), str(e.hist.count)]
        for e in [*collector.sorted_entries(), collector.total]
    ]
    failures = failure_rows(collector)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>iotgw-load report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>iotgw-load report</h1>",
        f'<table class="meta">{meta_html}</table>',
        "<h2>Request statistics</h2>",
        _table(with_units(STATS_HEADER), stats_rows(collector)),
        "<h2>Response time percentiles</h2>",
        "<p>Request Count as above; Timed: those with a measured response time (QoS 0 "
        "publishes and received commands are counted, not timed: N/A).</p>",
        _table(["Type", "Name", *(f"{p} (ms)" for p in percentile_labels()), "Request Count",
                "Timed"], pct_rows),
        "<h2>Failures and errors</h2>",
        _table(FAILURES_HEADER, failures, numeric_from=3) if failures else "<p>None.</p>",
        *(f"<h2>{html.escape(h)}</h2>{body}" for h, body in sections),
        "<h2>Charts</h2>",
        *(f"<div>{c}</div>" for c in charts),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_html(path: str, collector: Collector, meta: dict[str, Any], **extra: Any) -> Path:
    """The report of render_html (its keyword arguments pass through) written to `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_html(collector, meta, **extra), encoding="utf-8")
    return p
