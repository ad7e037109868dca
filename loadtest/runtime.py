"""What every simulated client of one process shares: the event loop, the scheduler, the read
arena, the statistics, the settings and the periodic upkeep sweeps."""

from __future__ import annotations

import asyncio
import itertools
import resource
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gateway._native import mqtt
from loadtest.scheduler import Scheduler
from loadtest.stats import Stats

if TYPE_CHECKING:
    from loadtest.coap_client import CoapClient
    from loadtest.commands import Commander
    from loadtest.mqtt_client import MqttClient

DEFAULT_PORTS = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883, "coap": 5683}


class UsageError(Exception):
    """A setting is wrong; the message is shown to the user (exit code 2)."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # mqtt | mqtts | coap
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_host(url: str, port: int | None = None) -> Endpoint:
    """`mqtt://h:1883`, `mqtts://h`, `coap://h:5683`, `tcp://`/`ssl://` aliases, or bare
    `h[:port]` (MQTT). `port` overrides the URL's port."""
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UsageError(f"--host {url!r}: the scheme must be mqtt://, mqtts:// or coap://")
    scheme = {"tcp": "mqtt", "ssl": "mqtts"}.get(scheme, scheme)
    try:
        url_port = parts.port
    except ValueError:
        raise UsageError(f"--host {url!r}: bad port") from None
    host = parts.hostname or "127.0.0.1"
    return Endpoint(scheme, host, port or url_port or DEFAULT_PORTS[scheme])


@dataclass
class Settings:
    """The settings a worker process needs (sent by the master as a dict)."""

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    tls: bool = False
    coap_host: str = "127.0.0.1"
    coap_port: int = 5683
    mqtt_version: int = 4
    keepalive: int = 60
    qos: int = 1
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False
    source_ips: list[str] = field(default_factory=list)
    connect_timeout: float = 10.0
    ack_timeout: float = 10.0
    max_inflight: int = 65535
    coap_token: str | None = None
    coap_timeout: float = 10.0
    reconnect_delay: float = 1.0
    command_timeout: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def ensure_fd_limit(devices: int) -> int:
    """Raise the open-file limit for `devices` sockets plus slack; warn when the hard limit is
    too low. Returns the limit."""
    wanted = devices + 64
    got = raise_fd_limit(wanted + 1024)
    if got < wanted:
        print(
            f"iotgw-load: warning: {devices} devices in one process need about {wanted} open "
            f"files, but the limit is {got} (hard limit): use --processes, or raise it "
            "(ulimit -Hn / LimitNOFILE)",
            file=sys.stderr,
        )
    return got


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards `wanted` (at most the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def make_ssl_context(s: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s.cafile)
    if s.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if s.certfile:
        ctx.load_cert_chain(s.certfile, s.keyfile)
    return ctx


class Runtime:
    """Per-process shared state; build one per event loop."""

    def __init__(
        self,
        settings: Settings,
        loop: asyncio.AbstractEventLoop | None = None,
        worker_index: int = 0,
        worker_count: int = 1,
    ) -> None:
        self.settings = settings
        self.loop = loop or asyncio.get_running_loop()
        self.scheduler = Scheduler(self.loop)
        self.stats = Stats()
        self.arena = mqtt.ReadArena(256 * 1024)
        self.worker_index = worker_index
        self.worker_count = worker_count
        self.ssl_context = make_ssl_context(settings) if settings.tls else None
        self.mqtt_clients: set[MqttClient] = set()
        self.coap_clients: set[CoapClient] = set()  # those with requests outstanding
        self.connected = 0
        self.users = 0
        self.commander: Commander | None = None
        self._sources = itertools.cycle(settings.source_ips) if settings.source_ips else None
        self._mqtt_timer: asyncio.TimerHandle | None = None
        self._coap_timer: asyncio.TimerHandle | None = None
        self.closed = False

    def next_source_addr(self) -> tuple[str, int] | None:
        return (next(self._sources), 0) if self._sources is not None else None

    def start_sweeps(self) -> None:
        self._mqtt_sweep()
        self._coap_sweep()

    def _mqtt_sweep(self) -> None:
        if self.closed:
            return
        now = self.loop.time()
        deadline = time.perf_counter_ns() - int(self.settings.ack_timeout * 1e9)
        for c in list(self.mqtt_clients):
            c.sweep(now, deadline)
        if self.commander is not None:
            self.commander.sweep()
        self._mqtt_timer = self.loop.call_later(1.0, self._mqtt_sweep)

    def _coap_sweep(self) -> None:
        if self.closed:
            return
        if self.coap_clients:
            now = self.loop.time()
            for c in list(self.coap_clients):
                c.sweep(now)
        self._coap_timer = self.loop.call_later(0.1, self._coap_sweep)

    def close(self) -> None:
        self.closed = True
        for h in (self._mqtt_timer, self._coap_timer):
            if h is not None:
                h.cancel()
        self.scheduler.close()
