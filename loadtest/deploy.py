"""The deployment the chaos suite starts on this machine, with a fault proxy on every link.

    devices --MQTT--> toxiproxy "device" --> gateway workers (iotgw run --workers N)
    devices --CoAP--> UdpRelay (in the load tester's process) --> gateway CoAP port
    gateway --------> toxiproxy "kafka" --> Kafka (one KRaft node)
    gateway --------> toxiproxy "redis" --> redis-server (AOF on: a restart keeps the shadows)

Kafka listens twice: `EXTERNAL`, advertised at the proxy's port (so the gateway's producers
reconnect through the proxy after the metadata round trip, as they must for a fault on that
link to bite), and `DIRECT`, which the verifier uses to read back what reached Kafka whatever
the faults. Every process is started with its own session and is stopped (or killed, for the
process faults) by its pid. Kafka runs from the jars scripts/test.sh fetches (.cache/kafka/libs,
or $IOTGW_KAFKA_LIBS); toxiproxy-server is found by `toxiproxy.find_binary`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtest.toxiproxy import Toxiproxy, ToxiproxyServer, find_binary

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LIBS = Path(os.environ.get("IOTGW_KAFKA_LIBS", ROOT / ".cache" / "kafka" / "libs"))
KAFKA_HEAP = os.environ.get("IOTGW_KAFKA_HEAP", "384m")
API_TOKEN = "chaos-admin-token"
LINKS = ("device", "kafka", "redis", "coap")

_LOG4J2 = """\
status = error
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
"""


class DeploymentError(Exception):
    """A part of the deployment could not be started; str() says which and why (exit 3)."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive free TCP ports (workers serve HTTP on port + i)."""
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
    raise DeploymentError(f"no {count} consecutive free ports")


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (read from /proc: connecting in a loop to a
    port nobody holds yet can end in a TCP self-connect that then holds it)."""
    wanted = (f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}",
              f"00000000:{port:04X}")
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = [line.split() for line in fh.readlines()[1:]]
        except OSError:
            return True
        if any(row[1] in wanted and row[3] == "0A" for row in rows):
            return True
    return False


def _stop(proc: subprocess.Popen[bytes] | None, kill: bool = False, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Ports:
    mqtt: int  # the gateway's (workers share it)
    coap: int
    http: int  # worker i: http + i
    redis: int
    kafka_external: int
    kafka_direct: int
    kafka_controller: int
    toxiproxy_api: int
    mqtt_proxy: int
    redis_proxy: int
    kafka_proxy: int


class Deployment:
    """Start with `start()`, stop everything with `stop()`; the process faults are methods."""

    def __init__(self, workdir: Path, workers: int = 2, toxiproxy_binary: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.workdir = workdir
        self.workers = workers
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        binary = find_binary(toxiproxy_binary)
        if binary is None:
            raise DeploymentError("toxiproxy-server not found: run scripts/test.sh (it builds "
                                  "it into .cache/go-bin) or give --toxiproxy PATH")
        self.toxiproxy_binary = binary
        redis = shutil.which("redis-server")
        if redis is None:
            raise DeploymentError("redis-server is not installed (apt install redis-server)")
        self.redis_binary = redis
        java = shutil.which("java")
        if java is None:
            raise DeploymentError("java is not installed (Kafka needs Java 17+)")
        self.java = java
        if not any(KAFKA_LIBS.glob("kafka_2.13-*.jar")):
            raise DeploymentError(f"the Kafka jars are missing in {KAFKA_LIBS}: run "
                                  "scripts/test.sh (or set IOTGW_KAFKA_LIBS)")
        http = free_ports(workers)
        self.ports = Ports(
            mqtt=free_port(), coap=free_port(socket.SOCK_DGRAM), http=http,
            redis=free_port(), kafka_external=free_port(), kafka_direct=free_port(),
            kafka_controller=free_port(), toxiproxy_api=free_port(), mqtt_proxy=free_port(),
            redis_proxy=free_port(), kafka_proxy=free_port(),
        )
        self.data_dir = workdir / "gateway"
        self.toxi_server = ToxiproxyServer(binary, self.ports.toxiproxy_api,
                                           workdir / "toxiproxy.log")
        self.toxi: Toxiproxy = self.toxi_server.client
        self.redis: subprocess.Popen[bytes] | None = None
        self.kafka: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    # ---- addresses -------------------------------------------------------------------------

    @property
    def mqtt_url(self) -> str:
        """Where devices connect: the proxy in front of the gateway."""
        return f"mqtt://127.0.0.1:{self.ports.mqtt_proxy}"

    @property
    def kafka_direct(self) -> str:
        return f"127.0.0.1:{self.ports.kafka_direct}"

    @property
    def http_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.ports.http + i}" for i in range(self.workers)]

    # ---- start and stop --------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.toxi_server.start()
            p = self.ports
            self.toxi.create("device", f"127.0.0.1:{p.mqtt_proxy}", f"127.0.0.1:{p.mqtt}")
            self.toxi.create("redis", f"127.0.0.1:{p.redis_proxy}", f"127.0.0.1:{p.redis}")
            self.toxi.create("kafka", f"127.0.0.1:{p.kafka_proxy}",
                             f"127.0.0.1:{p.kafka_external}")
            self._write_kafka_config()
            self.start_redis()
            self.start_kafka()
            self.start_gateway()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        _stop(self.gateway)
        _stop(self.kafka)
        _stop(self.redis)
        self.toxi_server.stop()

    # ---- Redis -----------------------------------------------------------------------------

    def start_redis(self, timeout: float = 10.0) -> None:
        d = self.workdir / "redis"
        d.mkdir(exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.redis = subprocess.Popen(
            [self.redis_binary, "--port", str(self.ports.redis), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
             "--dir", str(d)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self._wait(lambda: listening(self.ports.redis), timeout, "redis-server", self.redis)

    def stop_redis(self) -> None:
        """SIGTERM: Redis writes its append-only file and exits."""
        _stop(self.redis)

    # ---- Kafka -----------------------------------------------------------------------------

    def _java(self, main: str, *args: str) -> list[str]:
        return [self.java, f"-Xmx{KAFKA_HEAP}", "-Xms64m", "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                "-cp", f"{KAFKA_LIBS}/*", main, *args]

    def _write_kafka_config(self) -> None:
        p = self.ports
        (self.workdir / "log4j2.properties").write_text(_LOG4J2)
        props = self.workdir / "kafka.properties"
        props.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"listeners=EXTERNAL://127.0.0.1:{p.kafka_external},"
            f"DIRECT://127.0.0.1:{p.kafka_direct},CONTROLLER://127.0.0.1:{p.kafka_controller}",
            # The gateway learns the proxy's port from the metadata: it stays behind the proxy.
            f"advertised.listeners=EXTERNAL://127.0.0.1:{p.kafka_proxy},"
            f"DIRECT://127.0.0.1:{p.kafka_direct}",
            "inter.broker.listener.name=DIRECT",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=EXTERNAL:PLAINTEXT,DIRECT:PLAINTEXT,"
            "CONTROLLER:PLAINTEXT",
            f"controller.quorum.voters=1@127.0.0.1:{p.kafka_controller}",
            f"log.dirs={self.workdir / 'kafka-data'}",
            "num.partitions=4",
            "auto.create.topics.enable=true",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "min.insync.replicas=1",
            "default.replication.factor=1",
            "group.initial.rebalance.delay.ms=0",
            "num.network.threads=2",
            "num.io.threads=2",
            "background.threads=2",
            "num.recovery.threads.per.data.dir=1",
            "",
        ]))
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        done = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                       "-c", str(props)),
            capture_output=True, timeout=120,
        )
        if done.returncode != 0:
            raise DeploymentError("kafka-storage format failed:\n"
                                  + (done.stdout + done.stderr).decode(errors="replace"))

    def start_kafka(self, timeout: float = 90.0) -> None:
        log = (self.workdir / "kafka.log").open("ab")
        self.kafka = subprocess.Popen(
            self._java("kafka.Kafka", str(self.workdir / "kafka.properties")),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self._wait(lambda: listening(self.ports.kafka_direct)
                   and listening(self.ports.kafka_external), timeout, "Kafka", self.kafka)

    def stop_kafka(self) -> None:
        """SIGTERM: a clean broker shutdown."""
        _stop(self.kafka)

    # ---- the gateway -----------------------------------------------------------------------

    def gateway_command(self) -> list[str]:
        p = self.ports
        return [
            sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())",
            "run", "--workers", str(self.workers), "--mqtt-port", str(p.mqtt),
            "--coap-port", str(p.coap), "--http-port", str(p.http),
            "--data-dir", str(self.data_dir), "--redis", f"redis://127.0.0.1:{p.redis_proxy}",
            "--kafka", f"127.0.0.1:{p.kafka_proxy}", "--allow-anonymous", "--acl", "open",
            "--api-token", API_TOKEN, "--log-level", "warning",
        ]

    def start_gateway(self, timeout: float = 60.0) -> None:
        log = (self.workdir / "gateway.log").open("ab")
        self.gateway = subprocess.Popen(self.gateway_command(), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait(self.gateway_ready, timeout, "the gateway", self.gateway)

    def gateway_ready(self) -> bool:
        for url in self.http_urls:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                    if r.status != 200:
                        return False
            except (OSError, urllib.error.URLError):
                return False
        return True

    def kill_gateway(self) -> None:
        """SIGKILL the supervisor and every worker at once (its whole process group)."""
        _stop(self.gateway, kill=True)

    def worker_pids(self) -> list[int]:
        """The gateway's worker processes (children running multiprocessing's spawn_main)."""
        if self.gateway is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.gateway.pid)], capture_output=True,
                             text=True)
        pids = []
        for pid in sorted(int(p) for p in out.stdout.split()):
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                continue
        return pids

    def kill_worker(self, index: int = 0) -> int:
        """SIGKILL one worker (the supervisor starts it again); returns its pid."""
        pids = self.worker_pids()
        if not pids:
            raise DeploymentError("no gateway worker to kill")
        pid = pids[index % len(pids)]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return pid

    # ---- helpers ---------------------------------------------------------------------------

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str,
              proc: subprocess.Popen[bytes] | None) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc is not None and proc.poll() is not None:
                raise DeploymentError(f"{what} exited with {proc.returncode} while starting "
                                      f"(see {self.workdir})")
            if time.monotonic() > deadline:
                raise DeploymentError(f"{what} not ready after {timeout:.0f} s "
                                      f"(see {self.workdir})")
            time.sleep(0.1)
