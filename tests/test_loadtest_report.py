"""The HTML load-test report reads right: both tables count the same requests (untimed ones
too), every figure has its unit, wide tables scroll in their own box, axis ticks are round
numbers, and series that coincide stay visible."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

from loadtest.report import render_html
from loadtest.stats import Collector, Stats


class Tables(HTMLParser):
    """Each <table>: its header cells and rows of cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[list[str], list[list[str]]]] = []
        self._cell: list[str] | None = None
        self._row: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append(([], []))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self.tables:
            header, rows = self.tables[-1]
            if not header and not rows:
                header.extend(self._row)
            else:
                rows.append(self._row)


def _collector() -> Collector:
    c = Collector()
    for _ in range(3):
        s = Stats()
        for i in range(40):
            s.get("PUBLISH", "telemetry").record(900 + 7 * i)
        s.get("RECEIVE", "command").count(25)  # counted, not timed
        c.add_delta(s.take_delta())
        c.set_gauges("w", 10, 10)  # spawned == connected: two series on one line
        c.close_interval()
    c.ended = c.started + 3
    for i, row in enumerate(c.history):  # one-second intervals, as a real run has
        row.timestamp, row.interval = c.started + i + 1, 1.0
    return c


def test_both_tables_count_the_same_requests_and_every_figure_has_a_unit() -> None:
    page = render_html(_collector(), {})
    parser = Tables()
    parser.feed(page)
    _, (stats_header, stats), (pct_header, pcts) = parser.tables[:3]
    count = stats_header.index("Request Count")
    counts = {(r[0], r[1]): r[count] for r in stats}
    assert counts[("RECEIVE", "command")] == "75" and counts[("", "Aggregated")] == "195"
    assert {(r[0], r[1]): r[pct_header.index("Request Count")] for r in pcts} == counts
    for header in (stats_header, pct_header):
        for name in header:
            if "Response Time" in name or "%" in name or "Size" in name:
                assert name.endswith(("(ms)", "(bytes)")), name
    assert pcts[[r[1] for r in pcts].index("command")][2] == "N/A"  # untimed: no percentile


def test_tables_scroll_in_their_own_box() -> None:
    page = render_html(_collector(), {})
    assert ".scroll{overflow-x:auto" in page
    assert page.count('<div class="scroll"><table>') == 2  # stats and percentiles


def test_charts_have_round_ticks_units_and_every_series_visible() -> None:
    page = render_html(_collector(), {})
    svgs = ["<svg" + chunk.split("</svg>")[0] + "</svg>" for chunk in page.split("<svg")[1:]]
    assert len(svgs) == 3
    ns = "{http://www.w3.org/2000/svg}"
    for svg in svgs:
        root = ET.fromstring(svg)
        texts = [t.text or "" for t in root.iter(ns + "text")]
        assert re.search(r"\((requests/s|ms|devices)\)$", texts[0]), texts[0]  # title + unit
        assert "seconds since the start" in texts
        for anchor in ("end", "middle"):  # y ticks, x ticks
            ticks = [float((t.text or "").replace(",", "")) for t in root.iter(ns + "text")
                     if t.get("text-anchor") == anchor and re.fullmatch(r"[\d,.]+", t.text or "")]
            steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
            assert ticks[0] == 0 and len(steps) == 1, ticks  # evenly spaced from 0
            mantissa = f"{steps.pop():.3e}".split("e")[0]
            assert mantissa in ("1.000", "2.000", "2.500", "5.000"), ticks
        lines = list(root.iter(ns + "polyline"))
        dashes = [line.get("stroke-dasharray") for line in lines]
        assert len(set(dashes)) == len(lines)  # each series drawn differently: none hidden
    devices = ET.fromstring(svgs[2])
    drawn = {line.findtext(ns + "title") for line in devices.iter(ns + "polyline")}
    assert drawn == {"spawned", "connected"}
