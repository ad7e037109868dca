"""Fault schedules for `iotgw-load chaos`: a TOML file (or a built-in schedule by name) listing
faults, when each starts and how long it lasts.

    name = "mine"
    duration = "60s"            # the whole run (the traffic), faults included
    [[fault]]
    kind = "latency"            # see KINDS
    link = "device"             # device | kafka | redis (Toxiproxy) | coap (the UDP relay)
    at = "10s"                  # from the start of the run
    for = "8s"
    latency_ms = 200
    jitter_ms = 50
    [[fault]]
    kind = "partition"
    link = "device"
    at = "30s"
    for = "3s"
    every = "10s"               # periodic: again every 10 s ...
    repeat = 3                  # ... 3 times in all
    [[fault]]
    kind = "kafka-stop"
    at = "45s"
    for = "6s"

Network faults (on a link): latency (latency_ms, jitter_ms), bandwidth (rate_kbps),
timeout (timeout_ms: data stops, the connection closes after it; 0: never), reset (reset_peer:
connections reset, new ones too), partition (the proxy disabled: connections closed, new ones
refused); on the coap link `impair` (drop, delay_ms, jitter_ms, duplicate, reorder) and
partition (every datagram dropped). Process faults: kafka-stop, redis-stop (stopped for `for`,
then started again), worker-kill (one gateway worker SIGKILLed; its supervisor starts it again;
`for` is the window observed), gateway-kill (supervisor and workers SIGKILLed, started again
after `for`). Load: flood (the Flooder devices publish telemetry at 200 Hz each).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any

from loadtest.cli import parse_duration

NETWORK = ("latency", "bandwidth", "timeout", "reset", "partition", "impair")
PROCESS = ("kafka-stop", "redis-stop", "worker-kill", "gateway-kill")
LOAD = ("flood",)
KINDS = NETWORK + PROCESS + LOAD
LINKS = ("device", "kafka", "redis", "coap")
PARAMS: dict[str, dict[str, float]] = {
    "latency": {"latency_ms": 200, "jitter_ms": 0},
    "bandwidth": {"rate_kbps": 16},
    "timeout": {"timeout_ms": 0},
    "reset": {"timeout_ms": 0},
    "partition": {},
    "impair": {"drop": 0.0, "delay_ms": 0.0, "jitter_ms": 0.0, "duplicate": 0.0,
               "reorder": 0.0},
}


class ScheduleError(Exception):
    """The schedule is wrong; the message says where (exit code 2)."""


@dataclass
class Fault:
    kind: str
    at: float
    duration: float
    link: str | None = None
    params: dict[str, float] = field(default_factory=dict)
    label: str = ""

    @property
    def end(self) -> float:
        return self.at + self.duration

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        where = f" {self.link}" if self.link else ""
        detail = ", ".join(f"{k}={v:g}" for k, v in self.params.items() if v)
        return f"{self.kind}{where}" + (f" ({detail})" if detail else "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "link": self.link, "at": self.at,
                "for": self.duration, "params": self.params}


@dataclass
class Schedule:
    name: str
    duration: float
    faults: list[Fault]


BUILTIN = {
    # About 40 s: the test suite's run. Calm first (the baseline), one network fault on the
    # device links (MQTT delayed, CoAP lossy), Kafka stopped (starting it again takes 3-8 s
    # more), one worker killed, then the priority check: telemetry flooding, Kafka slow.
    "smoke": """
name = "smoke"
duration = "38s"
[[fault]]
kind = "latency"
link = "device"
at = "6s"
for = "4s"
latency_ms = 200
jitter_ms = 50
[[fault]]
kind = "impair"
link = "coap"
at = "6s"
for = "4s"
drop = 0.2
delay_ms = 50
duplicate = 0.1
reorder = 0.1
[[fault]]
kind = "kafka-stop"
at = "12s"
for = "3s"
[[fault]]
kind = "worker-kill"
at = "22s"
for = "4s"
[[fault]]
kind = "flood"
at = "29s"
for = "6s"
[[fault]]
kind = "latency"
link = "kafka"
at = "29s"
for = "6s"
latency_ms = 100
""",
    # Ten minutes, every fault kind, calm minutes between them for the recovery times.
    "full": """
name = "full"
duration = "10m"
[[fault]]
kind = "latency"
link = "device"
at = "30s"
for = "30s"
latency_ms = 200
jitter_ms = 50
[[fault]]
kind = "impair"
link = "coap"
at = "30s"
for = "30s"
drop = 0.2
delay_ms = 50
jitter_ms = 20
duplicate = 0.1
reorder = 0.1
[[fault]]
kind = "partition"
link = "device"
at = "80s"
for = "10s"
every = "30s"
repeat = 3
[[fault]]
kind = "bandwidth"
link = "kafka"
at = "180s"
for = "30s"
rate_kbps = 64
[[fault]]
kind = "timeout"
link = "redis"
at = "230s"
for = "10s"
timeout_ms = 0
[[fault]]
kind = "reset"
link = "device"
at = "260s"
for = "5s"
[[fault]]
kind = "kafka-stop"
at = "290s"
for = "30s"
[[fault]]
kind = "redis-stop"
at = "350s"
for = "15s"
[[fault]]
kind = "worker-kill"
at = "400s"
for = "20s"
[[fault]]
kind = "gateway-kill"
at = "440s"
for = "5s"
[[fault]]
kind = "partition"
link = "kafka"
at = "490s"
for = "20s"
[[fault]]
kind = "flood"
at = "540s"
for = "30s"
[[fault]]
kind = "latency"
link = "kafka"
at = "540s"
for = "30s"
latency_ms = 100
""",
}


def _seconds(value: Any, where: str) -> float:
    try:
        return float(value) if isinstance(value, int | float) else parse_duration(str(value))
    except Exception:
        raise ScheduleError(f"{where}: {value!r} is not a duration like 5s or 2m") from None


def parse_schedule(text: str, origin: str = "schedule") -> Schedule:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScheduleError(f"{origin}: {exc}") from None
    unknown = sorted(set(data) - {"name", "duration", "fault"})
    if unknown:
        raise ScheduleError(f"{origin}: unknown key {unknown[0]!r} (keys: name, duration, "
                            "[[fault]])")
    if "duration" not in data:
        raise ScheduleError(f"{origin}: no duration (the run's length, e.g. duration = \"60s\")")
    duration = _seconds(data["duration"], f"{origin}: duration")
    faults: list[Fault] = []
    for i, raw in enumerate(data.get("fault", [])):
        where = f"{origin}: fault {i + 1}"
        if not isinstance(raw, dict):
            raise ScheduleError(f"{where}: not a table")
        raw = dict(raw)
        kind = raw.pop("kind", None)
        if kind not in KINDS:
            raise ScheduleError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
        link = raw.pop("link", None)
        if kind in NETWORK:
            if link not in LINKS:
                raise ScheduleError(f"{where}: {kind} needs link = one of {', '.join(LINKS)}")
            if (kind == "impair") != (link == "coap") and kind != "partition":
                raise ScheduleError(
                    f"{where}: on the coap link the faults are impair and partition; "
                    "impair is for the coap link only"
                )
        elif link is not None:
            raise ScheduleError(f"{where}: {kind} takes no link")
        if "at" not in raw:
            raise ScheduleError(f"{where}: no `at` (when it starts, e.g. at = \"10s\")")
        at = _seconds(raw.pop("at"), f"{where}: at")
        length = _seconds(raw.pop("for", 5), f"{where}: for")
        every = _seconds(raw.pop("every"), f"{where}: every") if "every" in raw else None
        repeat = raw.pop("repeat", 1)
        label = str(raw.pop("label", ""))
        if not isinstance(repeat, int) or repeat < 1:
            raise ScheduleError(f"{where}: repeat = {repeat!r}: a count >= 1")
        if repeat > 1 and every is None:
            raise ScheduleError(f"{where}: repeat needs every (the period)")
        defaults = PARAMS.get(kind, {})
        extra = sorted(set(raw) - set(defaults))
        if extra:
            known = ", ".join(defaults) or "none"
            raise ScheduleError(f"{where}: unknown setting {extra[0]!r} for {kind} "
                                f"(settings: at, for, every, repeat, label; {kind}: {known})")
        params: dict[str, float] = {}
        for k, default in defaults.items():
            v = raw.get(k, default)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ScheduleError(f"{where}: {k} = {v!r}: a number >= 0")
            params[k] = float(v)
        if kind == "impair":
            for k in ("drop", "duplicate", "reorder"):
                if params[k] > 1:
                    raise ScheduleError(f"{where}: {k} = {params[k]:g}: a share from 0 to 1")
        for n in range(repeat):
            start = at + n * (every or 0.0)
            if start + length > duration:
                raise ScheduleError(f"{where}: ends at {start + length:g} s, after the run "
                                    f"({duration:g} s)")
            faults.append(Fault(kind, start, length, link, dict(params), label))
    faults.sort(key=lambda f: f.at)
    return Schedule(str(data.get("name", origin)), duration, faults)


def load_schedule(name_or_path: str) -> Schedule:
    """A built-in schedule by name, else a TOML file."""
    if name_or_path in BUILTIN:
        return parse_schedule(BUILTIN[name_or_path], name_or_path)
    try:
        with open(name_or_path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ScheduleError(
            f"--schedule {name_or_path}: {exc.strerror or exc} (built-in schedules: "
            f"{', '.join(BUILTIN)})"
        ) from None
    return parse_schedule(text, name_or_path)
