"""`--fail-on "p99>50ms,errors>0.1%"`: conditions that make the run exit with code 1.

Each comma-separated condition is `METRIC[NAME] OP VALUE[UNIT]`:
  * METRIC: a percentile `p50` ... `p99.99`, `p100`; `avg`, `min`, `max`, `med` (response
    times: a unit of `us`, `ms` (default) or `s`); `errors` (failed requests plus other errors,
    such as lost connections: a count, or a share of all requests with `%`); `rps` (requests
    per second); `reqs` (request count).
  * [NAME] (optional): only the entries with that name (or "TYPE NAME"), e.g.
    `p99[telemetry]>20ms`; without it the Aggregated row.
  * OP: `>`, `>=`, `<`, `<=`. The condition describes a failure: `rps<1000` fails a run that
    did less than 1000 requests per second.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.runtime import UsageError
from loadtest.stats import Collector, StatsEntry, aggregate

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_TIME_UNITS = {"us": 1.0, "µs": 1.0, "ms": 1000.0, "s": 1_000_000.0, "": 1000.0}
_RE = re.compile(
    r"^\s*(?P<metric>p\d+(?:\.\d+)?|avg|mean|min|max|med|median|errors|fails|failures|rps|reqs"
    r"|requests)\s*(?:\[(?P<name>[^\]]+)\])?\s*(?P<op>>=|<=|>|<)\s*(?P<value>\d+(?:\.\d+)?)"
    r"\s*(?P<unit>%|us|µs|ms|s)?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Threshold:
    text: str
    metric: str
    name: str | None
    op: str
    value: float
    unit: str

    def measure(self, collector: Collector) -> float:
        """The measured value, in the unit the condition uses."""
        entry = self._entry(collector)
        m = self.metric
        if m in ("errors", "fails", "failures"):
            if self.name is None:
                errors = sum(collector.failures.values())
            else:
                errors = sum(
                    c for (t, n, _), c in collector.failures.items() if _named(t, n, self.name)
                )
            if self.unit == "%":
                return 100.0 * errors / entry.num_requests if entry.num_requests else (
                    100.0 if errors else 0.0
                )
            return float(errors)
        if m == "rps":
            return entry.num_requests / collector.duration
        if m in ("reqs", "requests"):
            return float(entry.num_requests)
        h = entry.hist
        if m in ("avg", "mean"):
            micros = h.mean
        elif m == "min":
            micros = float(h.min)
        elif m == "max":
            micros = float(h.max)
        elif m in ("med", "median"):
            micros = float(h.percentile(0.5))
        else:
            micros = float(h.percentile(float(m[1:]) / 100.0))
        return micros / _TIME_UNITS[self.unit]

    def _entry(self, collector: Collector) -> StatsEntry:
        if self.name is None:
            return collector.total
        name = self.name
        return aggregate(e for e in collector.entries.values() if _named(e.type, e.name, name))

    def check(self, collector: Collector) -> str | None:
        """None when the condition does not hold; else a message for the user."""
        got = self.measure(collector)
        if _OPS[self.op](got, self.value):
            unit = self.unit if self.unit else ("ms" if self._is_time else "")
            return f"fail-on {self.text!r}: measured {got:.4g}{unit}"
        return None

    @property
    def _is_time(self) -> bool:
        return self.metric.startswith("p") or self.metric in (
            "avg", "mean", "min", "max", "med", "median"
        )


def _named(type_: str, name: str, wanted: str) -> bool:
    return name == wanted or f"{type_} {name}" == wanted


def parse_fail_on(text: str | None) -> list[Threshold]:
    """Parse the --fail-on list; UsageError names the bad condition."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        m = _RE.match(part)
        if m is None:
            raise UsageError(
                f"--fail-on: cannot read {part.strip()!r} (expected e.g. p99>50ms, errors>0.1%, "
                "rps<1000)"
            )
        metric = m["metric"].lower()
        unit = (m["unit"] or "").lower()
        is_pct = metric.startswith("p")
        if is_pct:
            pct = float(metric[1:])
            if not 0 < pct <= 100:
                raise UsageError(f"--fail-on {part.strip()!r}: percentile must be in (0, 100]")
        timed = is_pct or metric in ("avg", "mean", "min", "max", "med", "median")
        if timed and unit == "%":
            raise UsageError(f"--fail-on {part.strip()!r}: a time takes us, ms or s, not %")
        if not timed and unit not in ("", "%"):
            raise UsageError(f"--fail-on {part.strip()!r}: {metric} takes no time unit")
        if unit == "%" and metric not in ("errors", "fails", "failures"):
            raise UsageError(f"--fail-on {part.strip()!r}: only errors take %")
        out.append(
            Threshold(part.strip(), metric, m["name"], m["op"], float(m["value"]), unit)
        )
    return out


def evaluate(thresholds: list[Threshold], collector: Collector) -> list[str]:
    """The messages of the conditions that hold (empty: the run passes)."""
    return [msg for t in thresholds if (msg := t.check(collector)) is not None]
