"""The composition root: builds every part of a gateway from one `Config` and owns its life
(start, periodic sweep, graceful stop)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sqlite3
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gateway._native import mqtt
from gateway.admin import Admin
from gateway.auth import ADDED, REKEYED, DeviceRegistry, RegistryError
from gateway.cluster import Cluster
from gateway.coap import CoapEndpoint, CoapMetrics
from gateway.coap.dtls import DtlsLimits, DtlsServer
from gateway.config import Config
from gateway.events import EventLog
from gateway.guard import AuthGuard, GuardLimits
from gateway.http.api import ApiContext, build_api
from gateway.http.server import HttpServer
from gateway.logs import setup_logging
from gateway.metrics import DtlsMetrics, Metrics, ShadowMetrics
from gateway.mqtt import persistence
from gateway.mqtt.acl import Acl
from gateway.mqtt.broker import Broker, BrokerLimits
from gateway.mqtt.connection import MqttConnection
from gateway.mqtt.session import Message
from gateway.mqtt.websocket import WebSocketListener
from gateway.shadows import ShadowInterceptor, ShadowService
from gateway.startup import (
    DataDirLock,
    Listeners,
    StartupError,
    bind_listeners,
    check_files,
    tls_context,
)
from gateway.systopics import SysTopics
from gateway.telemetry.filesink import FileSink
from gateway.telemetry.interceptor import TelemetryInterceptor
from gateway.telemetry.pipeline import Sink, TelemetryPipeline
from gateway.telemetry.records import SHADOW, Record
from gateway.tokens import TokenStore
from shadow import ShadowStore, SqliteShadowStore

log = logging.getLogger("iotgw")

SWEEP_INTERVAL = 0.5  # seconds between timeout sweeps
SAVE_INTERVAL = 1.0  # seconds between saves of what changed in sessions and retained messages


class Gateway:
    def __init__(self, config: Config, worker: int | None = None) -> None:
        """`worker`: this process's index under `--workers N` (each is a cluster node with its
        own state dir, data_dir/workers/{i}, and HTTP port, http_port + i)."""
        self.config = config
        self.data_dir = Path(config.data_dir)  # shared: device registry, API tokens
        # This process's own state: sessions, telemetry segments, the Kafka spool.
        self.state_dir = self.data_dir
        if worker is not None:
            self.state_dir = self.data_dir / "workers" / str(worker)
        self.worker = worker
        self.metrics = Metrics()
        self.events = EventLog(self.metrics.events)
        self.guard = AuthGuard(
            self.metrics.auth, self.events,
            GuardLimits(workers=config.auth_workers, max_pending=config.auth_max_pending),
        )
        self.registry = DeviceRegistry(self.data_dir)
        # Telemetry: Kafka + disk spool per lane with --kafka, else the embedded file sink.
        if config.kafka:
            from gateway.telemetry.kafkasink import kafka_sinks

            sink: Sink | dict[str, Sink] = kafka_sinks(
                config, self.state_dir, self.metrics.telemetry
            )
        else:
            sink = FileSink(self.state_dir / "telemetry")
        self.telemetry = TelemetryPipeline(sink, metrics=self.metrics.telemetry)
        self.node_id = config.node_id or socket.gethostname()
        if worker is not None:
            self.node_id += f"-w{worker}"
        # The shadow service publishes through the broker built next (self._publish looks it
        # up when called), so the broker can be given the service when it is built.
        self.shadows = ShadowService(
            self._open_shadow_store(), self._publish, node_id=self.node_id,
            on_change=self._shadow_changed,
            on_version=lambda device, version: self.coap.resources.shadow_changed(device, version),
        )
        self.cluster: Cluster | None = None  # built with the broker, when nodes share a Redis
        self.broker = Broker(
            acl=Acl.from_config(config.acl, config.acl_file),
            metrics=self.metrics.mqtt,
            guard=self.guard,
            events=self.events,
            registry=self.registry,
            allow_anonymous=config.allow_anonymous,
            limits=BrokerLimits(
                max_packet_size=config.max_packet_size,
                max_keep_alive=config.max_keepalive,
                max_queued_messages=config.max_queued_messages,
                max_queued_bytes=config.max_queued_bytes,
                max_queued_bytes_total=config.max_queued_bytes_total,
                max_publish_rate=config.max_publish_rate,
                max_publish_bytes_rate=config.max_publish_bytes_rate,
            ),
            interceptors=[ShadowInterceptor(self.shadows), TelemetryInterceptor(self.telemetry)],
            cluster=self._cluster_of if config.cluster or worker is not None else None,
        )
        self.tokens = TokenStore(self.data_dir, bootstrap=config.api_token)
        self.admin = Admin(
            self.broker, self.guard, self.node_id,
            redis=self.cluster.redis if self.cluster is not None else None, nodes=self.cluster,
        )
        self._ban_sync: asyncio.Task[None] | None = None
        self.sys_topics = SysTopics(self.broker, self.metrics.mqtt, self.node_id,
                                    config.sys_interval)
        self.shadow_metrics = ShadowMetrics(self.metrics.registry, self.shadows.store)
        self.http: HttpServer | None = None
        # CoAP endpoint (gateway/coap/)
        dtls: Callable[..., DtlsServer] | None = None
        if config.coaps:  # coaps: the same endpoint, behind DTLS (gateway/coap/dtls.py)
            dtls = functools.partial(
                DtlsServer,
                psk=self.registry.psk if config.dtls_psk else None,
                certfile=config.tls_cert, keyfile=config.tls_key,
                client_ca=config.tls_client_ca, device_disabled=self.registry.disabled,
                metrics=DtlsMetrics(self.metrics.registry), events=self.events, guard=self.guard,
                limits=DtlsLimits(max_sessions=config.dtls_max_sessions,
                                  idle_timeout=config.dtls_idle_timeout),
            )
        self.coap = CoapEndpoint(
            shadows=self.shadows, pipeline=self.telemetry, broker=self.broker,
            registry=self.registry, guard=self.guard, events=self.events,
            allow_anonymous=config.allow_anonymous, metrics=CoapMetrics(self.metrics.registry),
            dtls=dtls,
        )
        self.coap_port: int | None = None
        self.coaps_port: int | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.mqtt_port: int | None = None
        self.mqtts_port: int | None = None
        self.ws_port: int | None = None
        self.wss_port: int | None = None
        self.state = persistence.StateStore(
            self.state_dir / "mqtt-state.sqlite", self.broker,
            legacy=self.state_dir / "mqtt-state.msgpack",
        )
        self._saving: asyncio.Task[bool] | None = None
        self._registry_cursor: int | None = None  # the last registry change acted upon

    def _cluster_of(self, broker: Broker) -> Cluster:
        """The cluster link of `broker` (built by the broker: each needs the other)."""
        assert self.config.redis
        # Other nodes' admin questions are answered by self.admin (built after the broker:
        # looked up when a question comes).
        self.cluster = Cluster(broker, self.config.redis, self.node_id, self.metrics.cluster,
                               answer=lambda question: self.admin.answer(question))
        return self.cluster

    async def start(self, listeners: Listeners | None = None) -> None:
        """Serve `listeners` (bound by `run`/`supervise`), or bind them here (embedded, tests):
        plain sockets, so a port in use fails."""
        if listeners is None:
            (listeners,) = bind_listeners(self.config)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log.info("data dir %s", self.state_dir)
        self.registry_changed()  # from now on: devices removed or disabled are let go
        await self.telemetry.start()  # replays a Kafka spool left by a previous run
        if self.cluster is not None:
            await self.cluster.start()
            await self.admin.sync()  # the cluster's bans hold before the first CONNECT
            self._ban_sync = asyncio.create_task(self.admin.sync_forever())
        restored = await self.state.open()
        if restored:
            log.info("restored %d persistent sessions", restored)
        if self.cluster is not None:
            for session in list(self.broker.sessions.values()):
                self.cluster.reclaim(session)
        loop = asyncio.get_running_loop()
        arena = mqtt.ReadArena()  # one read buffer shared by every connection of this loop
        for sock in listeners.mqtt:
            self._servers.append(await loop.create_server(
                lambda: MqttConnection(self.broker, arena), sock=sock, backlog=4096
            ))
        self.mqtt_port = listeners.mqtt[0].getsockname()[1]
        if self.config.tls_cert:
            ctx = self._tls_context()
            for sock in listeners.mqtts:
                self._servers.append(await loop.create_server(
                    lambda: MqttConnection(self.broker, arena), sock=sock, ssl=ctx,
                    backlog=4096,
                ))
            self.mqtts_port = listeners.mqtts[0].getsockname()[1]
            log.info("MQTT over TLS listening on %s:%s", self.config.bind, self.mqtts_port)
        self.ws_port = await self._serve_websocket(listeners.ws, arena, None)
        if listeners.wss:
            self.wss_port = await self._serve_websocket(listeners.wss, arena, self._tls_context())
        self._sweeper = asyncio.create_task(self._sweep_forever())
        log.info("MQTT listening on %s:%s", self.config.bind, self.mqtt_port)
        self.http = HttpServer(
            build_api(
                self.metrics,
                ready=lambda: self.mqtt_port is not None,
                context=ApiContext(
                    self.shadows, self.broker, self.registry, self.tokens, self.guard,
                    self.node_id, self.shadow_metrics,
                    registry_changed=self.registry_changed, cluster=self.cluster,
                    admin=self.admin,
                ),
            ),
            self.config.bind,
            self.config.http_port,
            sockets=listeners.http,
            access_log=self.config.http_access_log,
        )
        await self.http.start()
        log.info("HTTP listening on %s:%s", self.config.bind, self.http.port)
        # CoAP endpoint (gateway/coap/)
        coap_port = self.config.coap_port
        self.coap_port = await self.coap.start(
            self.config.bind, coap_port or None, listeners.coap
        )
        if self.coap_port is not None:
            log.info("CoAP listening on %s:%s (UDP)", self.config.bind, self.coap_port)
        if self.coap.dtls is not None:
            self.coaps_port = await self.coap.dtls.start(
                self.config.bind, self.config.coaps_port, listeners.coaps
            )
            log.info("CoAP over DTLS listening on %s:%s (UDP)", self.config.bind,
                     self.coaps_port)

    async def _serve_websocket(
        self, socks: list[socket.socket], arena: mqtt.ReadArena, ctx: ssl.SSLContext | None
    ) -> int | None:
        """MQTT over WebSocket (gateway/mqtt/websocket.py) on `socks`, with TLS if `ctx`."""
        if not socks:
            return None
        listener = WebSocketListener(self.broker, arena, self.config.ws_handshake_timeout)
        for sock in socks:
            self._servers.append(await listener.serve(sock, ctx))
        port: int = socks[0].getsockname()[1]
        log.info("MQTT over WebSocket%s listening on %s:%s (path /mqtt)",
                 " with TLS" if ctx else "", self.config.bind, port)
        return port

    def _open_shadow_store(self) -> ShadowStore:
        if self.config.redis:
            from shadow.redis import RedisShadowStore

            return RedisShadowStore(self.config.redis)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return SqliteShadowStore(self.data_dir / "shadows.sqlite")

    def registry_changed(self) -> None:
        """Act on devices removed or disabled since the last look (by the CLI in another
        process, or the REST API here): their MQTT connections close, a removed device's
        sessions end, their CoAP observations end. Called by the sweep and by the REST API."""
        self.tokens.db.reopen_if_replaced()  # the devices' database is checked just below
        try:
            self._registry_cursor, changes = self.registry.changes_since(self._registry_cursor)
        except RegistryError:  # logged by the registry (once a minute); CONNECTs get 0x88
            return
        if changes:
            # A new PSK concerns coaps sessions only; to MQTT it is what "added" is (a
            # registered id: only anonymous sessions acting as it go, and there are none
            # unless it was added meanwhile, which a rekey outranks in `changes`).
            closed = self.broker.lifecycle.revoke(
                {d: ADDED if op == REKEYED else op for d, op in changes.items()}
            )
            self.coap.revoke(changes)
            log.info(
                "registry: %d devices added, removed or disabled, %d connections closed",
                len(changes), closed,
            )

    def _publish(self, topic: str, payload: bytes) -> None:
        """Route a message the gateway itself publishes (shadow replies, deltas)."""
        self.broker.publish(Message(topic, payload, 1, False, origin="$gateway"))
        self.broker.flush()

    def _shadow_changed(self, device: str, accepted: bytes) -> None:
        record = Record(device, SHADOW, "shadow", f"$shadow/{device}", accepted)
        record.content_type = "application/json"
        self.telemetry.submit(record)

    def _tls_context(self) -> ssl.SSLContext:
        return tls_context(self.config)  # gateway/startup.py: what it checks and verifies

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        last_save = loop.time()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.broker.lifecycle.sweep()
                self.guard.sweep()
                self.sys_topics.tick()
                self.registry_changed()
                now = loop.time()
                # A save runs beside the sweeps (its writing is on the store's thread); the
                # next one starts once it is done.
                if now - last_save >= SAVE_INTERVAL and (
                    self._saving is None or self._saving.done()
                ):
                    last_save = now
                    self._saving = asyncio.create_task(self.save_state())
            except Exception:  # a bug in one sweep must not stop every timeout for good
                log.exception("sweep failed")

    async def save_state(self) -> bool:
        """Save what changed in sessions and retained messages since the last save; False if
        that failed (the next save writes it: nothing is taken as saved that was not)."""
        return await self.state.save()

    async def stop(self) -> None:
        if self._ban_sync is not None:
            self._ban_sync.cancel()
        if self.http is not None:
            await self.http.stop()
        await self.coap.stop()  # CoAP endpoint: answers what is in progress, closes the socket
        for server in self._servers:
            server.close()
        for conn in list(self.broker.online.values()) + list(self.broker.connecting):
            conn.close_with(mqtt.SERVER_SHUTTING_DOWN, "server shutting down")
        self.broker.flush()
        for server in self._servers:
            await server.wait_closed()
        await self.shadows.close()
        await self.telemetry.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if not await self.save_state():
            log.error("the last save of session state failed: changes since the one before "
                      "are lost")
        await self.state.close()
        if self.cluster is not None:
            await self.cluster.stop()
        self.guard.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper


async def serve(
    config: Config, worker: int | None = None, listeners: Listeners | None = None
) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # first: a signal during start stops after it
        loop.add_signal_handler(sig, stop.set)
    try:
        gateway = Gateway(config, worker)
        await gateway.start(listeners)
    except (OSError, sqlite3.Error) as exc:  # the data dir's files, mostly: one line, not a trace
        raise StartupError(f"cannot start: {exc}") from exc
    # What exists now lives as long as the process: keep the collector from walking it again,
    # and collect the young generation less often (the hot path makes few reference cycles).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    await stop.wait()
    await gateway.stop()


def raise_file_limit() -> int:
    """Lift the soft limit on open files to the hard one: every connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run(config: Config, worker: int | None = None, listeners: Listeners | None = None) -> None:
    """`iotgw run`: check the files, own the data dir, bind, serve. A lone gateway (or the
    supervisor of `--workers`) locks the data dir; a worker locks its own state dir and serves
    the sockets the supervisor bound. Raises StartupError (one line for the operator)."""
    import uvloop

    raise_file_limit()
    logs = setup_logging(config, worker)
    try:
        if worker is None:
            check_files(config)
            lock = DataDirLock(config.data_dir).acquire()
            try:
                if config.workers > 1:
                    supervise(config)
                    return
                (listeners,) = bind_listeners(config)
                uvloop.run(serve(config, None, listeners))
            finally:
                lock.release()
            return
        worker_lock = DataDirLock(Path(config.data_dir) / "workers" / str(worker)).acquire()
        try:
            uvloop.run(serve(config, worker, listeners))
        finally:
            worker_lock.release()
    finally:
        logs.stop()  # writes what is still queued


def run_worker(config: Config, worker: int, listeners: Listeners) -> None:
    """A worker process's entry: a start-up error is one line and exit code 2, which tells the
    supervisor not to start it again."""
    try:
        run(config, worker, listeners)
    except StartupError as exc:
        print(f"iotgw: worker {worker}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


RESTART_DELAY = 1.0  # seconds before a worker that died is started again


def supervise(config: Config) -> None:
    """`--workers N`: N gateway processes on the same ports, each a cluster node; one that dies
    is started again. SIGINT/SIGTERM stop all. The sockets are bound here, once (see
    gateway/startup.py): SO_REUSEPORT spreads connections over the workers, and a port some
    other process holds is a StartupError before any worker starts.

    Each process has its own open-file limit, so N workers hold N times the connections one
    process can (and use up to N cores)."""
    listeners = bind_listeners(config, workers=config.workers)
    context = multiprocessing.get_context("spawn")
    stopping = False
    failed: str | None = None

    def start(i: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=run_worker, args=(config, i, listeners[i]), name=f"iotgw-w{i}"
        )
        process.start()
        return process

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    workers = [start(i) for i in range(config.workers)]
    log.info("started %d workers: %s", len(workers), ", ".join(str(w.pid) for w in workers))
    while not stopping:
        time.sleep(0.2)
        for i, process in enumerate(workers):
            if not process.is_alive() and not stopping:
                if process.exitcode == 2:  # it said why on stderr; starting it again won't help
                    failed = f"worker {i} could not start (see above): stopping the others"
                    stopping = True
                    break
                log.error("worker %d exited with %s: starting it again", i, process.exitcode)
                time.sleep(RESTART_DELAY)
                workers[i] = start(i)
    for process in workers:
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    for process in workers:
        process.join(30)
        if process.is_alive():
            process.kill()
    for worker_listeners in listeners:
        worker_listeners.close()
    if failed:
        raise StartupError(failed)
