"""Shared test tooling: free loopback ports and real servers (redis-server, mosquitto)
started by the tests themselves, never by hand."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka_broker import kafka_broker_fixture  # noqa: F401  (issue 5: a real Kafka broker)


def pytest_sessionstart(session: pytest.Session) -> None:
    """The compiled modules are imported in place of their sources (setup.py): refuse to test
    a build older than the code, which would test the old code."""
    root = Path(__file__).parent.parent
    stale = [
        str(so.relative_to(root))
        for so in [*root.glob("shadow/*.so"), *root.glob("gateway/_native/*.so")]
        for suffix in (".py", ".pyx", ".pxd")
        if (src := so.with_name(so.name.split(".")[0] + suffix)).exists()
        and src.stat().st_mtime > so.stat().st_mtime
    ]
    if stale:
        pytest.exit(f"rebuild first (pip install -e .): {sorted(set(stale))} older than source")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free on 127.0.0.1 a moment ago (TCP by default, UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive TCP ports that were free a moment ago (the workers of
    `iotgw run --workers N` serve HTTP on --http-port + i)."""
    for _ in range(100):
        first = free_port()
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


def wait_for_tcp(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_for_ready(
    http_port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until a gateway answers `GET /readyz` with 200 on `http_port`. (A port that accepts is
    not enough under --workers: the supervisor binds the workers' sockets before they run.)"""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no gateway ready on 127.0.0.1:{http_port} after {timeout}s")


def pinned(core: int) -> list[str]:
    """A command prefix running the command on one core (benchmarks: the server on one, its
    load on the other); nothing where taskset or a second core is missing."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core)]
    return []


def worker_pids(supervisor: int) -> list[int]:
    """The worker processes of `iotgw run --workers N` (not multiprocessing's resource
    tracker), in pid order."""
    out = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True)
    pids = sorted(int(p) for p in out.stdout.split())
    return [p for p in pids if b"spawn_main" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    """A process's command line; empty once it is gone (it may exit between pgrep and here)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds; reaped either way
    (a test never leaves a process behind, nor waits for one without end)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _require(binary: str) -> str:
    sbin = Path("/usr/sbin") / binary  # mosquitto lives in sbin, often not on PATH
    path = shutil.which(binary) or (str(sbin) if sbin.exists() else None)
    if path is None:
        pytest.fail(f"{binary} is not installed: scripts/test.sh installs it")
    return path


class RedisProcess:
    """A real redis-server on a free loopback port, without persistence, that a test may stop
    and start again on the same port (an outage; it comes back empty)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.command = [
            _require("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(workdir),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_tcp(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real redis-server on a free loopback port, without persistence, for the session."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    try:
        assert server.proc is not None
        yield Server(server.port, server.proc)
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, to stop and start again."""
    server = RedisProcess(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real Mosquitto broker (Debian's package) on a free loopback port, anonymous allowed."""
    binary = _require("mosquitto")
    port = free_port()
    conf = tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_tcp(port, proc=proc)
        yield Server(port, proc)
    finally:
        stop_process(proc)


class GatewayProcess:
    """`iotgw run` in a process of its own (to SIGKILL it, or to trace it), on free loopback
    ports, anonymous clients allowed, ACL open; `start()` again reuses its ports and data.
    `prefix` runs it under another command (strace); signals go to the whole process group,
    so that a tracer that would detach on SIGTERM does not leave the gateway running."""

    def __init__(self, data_dir: Path, *extra: str, prefix: Sequence[str] = ()) -> None:
        self.mqtt_port, self.http_port = free_port(), free_port()
        self.coap_port = free_port(socket.SOCK_DGRAM)
        self.command = [
            *prefix,
            sys.executable, "-m", "gateway.cli", "run", "--allow-anonymous", "--acl", "open",
            "--mqtt-port", str(self.mqtt_port), "--http-port", str(self.http_port),
            "--coap-port", str(self.coap_port), "--data-dir", str(data_dir), *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_ready(self.http_port, timeout=60, proc=self.proc)
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved on the way out."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a graceful stop), SIGKILL after `timeout` seconds."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """gateway_process(*extra_args) -> a started GatewayProcess (data dir in tmp_path);
    stopped at the end of the test."""
    made: list[GatewayProcess] = []

    def start(*extra: str) -> GatewayProcess:
        made.append(GatewayProcess(tmp_path / f"gw{len(made)}", *extra).start())
        return made[-1]

    yield start
    for gw in made:
        gw.stop()


class RunningGateway:
    """A gateway on its own uvloop event loop in a background thread, so that synchronous
    clients (paho-mqtt, raw sockets) can talk to it from the test."""

    def __init__(self, **settings: object) -> None:
        import asyncio
        import threading

        import uvloop

        from gateway.app import Gateway
        from gateway.config import Config

        self.config = Config(**settings)  # type: ignore[arg-type]
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway = Gateway(self.config)
        try:
            asyncio.run_coroutine_threadsafe(self.gateway.start(), self.loop).result(10)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            raise
        assert self.gateway.mqtt_port is not None
        self.mqtt_port: int = self.gateway.mqtt_port
        self.mqtts_port = self.gateway.mqtts_port
        self.coap_port: int | None = self.gateway.coap_port
        self.coaps_port: int | None = self.gateway.coaps_port

    def call(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run fn(*args) on the gateway's loop and return its result."""
        import concurrent.futures

        done: concurrent.futures.Future[object] = concurrent.futures.Future()

        def target() -> None:
            try:
                done.set_result(fn(*args))
            except Exception as exc:  # pragma: no cover - surfaced to the test
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(target)
        return done.result(10)

    def stop(self) -> None:
        import asyncio

        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.gateway.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[object]:
    """gateway_factory(**settings) starts a gateway (data dir in tmp_path, free MQTT port)."""
    started: list[RunningGateway] = []

    def start(**settings: object) -> RunningGateway:
        settings.setdefault("data_dir", str(tmp_path / f"data{len(started)}"))
        settings.setdefault("mqtt_port", 0)
        settings.setdefault("http_port", 0)
        settings.setdefault("coap_port", free_port(socket.SOCK_DGRAM))  # 0 turns CoAP off
        from gateway.startup import StartupError

        for attempt in range(3):
            try:
                gw = RunningGateway(**settings)
                break
            except StartupError as exc:
                # --ws-port, --wss-port and --coap-port have no "any free port" (0 is off): a
                # port that was free a moment ago may have been taken since by another process;
                # pick again.
                if attempt == 2 or "in use" not in str(exc) or not any(
                    what in str(exc) for what in ("WebSocket", "--coap-port")
                ):
                    raise
                for name in ("ws_port", "wss_port"):
                    if settings.get(name):
                        settings[name] = free_port()
                if "--coap-port" in str(exc):
                    settings["coap_port"] = free_port(socket.SOCK_DGRAM)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
