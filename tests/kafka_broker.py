"""A real Apache Kafka broker for the tests, without Docker: one KRaft node (broker and
controller in one JVM) from the jars that scripts/test.sh fetches from Maven Central
(tests/kafka/pom.xml -> .cache/kafka/libs), on free loopback ports, in a temporary data dir.

`kafka_broker` (session scope; import `kafka_broker_fixture` to register it) yields a
`KafkaBroker`: `.bootstrap` ("127.0.0.1:port"), `.stop()` / `.start()` (same data dir and ports:
a restart keeps every record), `.pause()` / `.resume()` (SIGSTOP / SIGCONT: a broker that
hangs), `.create_topic(name, partitions)`. Importable from bench/ too; there is one broker per
test session whoever asks for it; a killed session takes it along (or the next one reaps it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBS = Path(os.environ.get("IOTGW_KAFKA_LIBS", ROOT / ".cache" / "kafka" / "libs"))
HEAP = os.environ.get("IOTGW_KAFKA_HEAP", "512m")

LOG4J2 = """\
status = error
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
"""


OWNER = "-Diotgw.test.kafka.owner="  # marks our brokers with the test process that owns them


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG),
    so a test run that is killed does not leave a broker behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _reap_orphans() -> None:
    """Kill brokers left by earlier test runs that died before stopping them (their owner
    process is gone); only processes carrying our marker."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            if arg.startswith(OWNER.encode()):
                owner = int(arg[len(OWNER) :])
                if not Path(f"/proc/{owner}").exists():
                    with contextlib.suppress(OSError):
                        os.kill(int(entry.name), signal.SIGKILL)


def _run_apart(coroutine_function: Any) -> Any:
    """asyncio.run(coroutine_function()) on a thread of its own, so that callers inside an
    event loop (an async test that restarts the broker) can wait for it too."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(coroutine_function())))
    thread.start()
    thread.join()
    return result[0] if result else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KafkaBroker:
    def __init__(self, workdir: Path, partitions: int = 4) -> None:
        java = shutil.which("java")
        if java is None:
            pytest.fail("java is not installed (Kafka needs Java 17+): run scripts/test.sh")
        if not any(LIBS.glob("kafka_2.13-*.jar")):
            pytest.fail(f"the Kafka broker jars are missing in {LIBS}: run scripts/test.sh")
        _reap_orphans()
        self.java = java
        self.workdir = workdir
        self.port = _free_port()
        self.controller_port = _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.data_dir = workdir / "data"
        self.log_path = workdir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "log4j2.properties").write_text(LOG4J2)
        self.properties = workdir / "server.properties"
        self.properties.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"log.dirs={self.data_dir}",
                    f"num.partitions={partitions}",
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
                    # a small machine shared with the tests: few threads
                    "num.network.threads=2",
                    "num.io.threads=2",
                    "background.threads=2",
                    "num.recovery.threads.per.data.dir=1",
                    "",
                ]
            )
        )
        self._format()

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            self.java,
            f"-Xmx{HEAP}",
            "-Xms64m",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"{OWNER}{os.getpid()}",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp",
            f"{LIBS}/*",
            main,
            *args,
        ]

    def _format(self) -> None:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        done = subprocess.run(
            self._java(  # `-t=ID`: an id starting with "-" would otherwise read as an option
                "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                "-c", str(self.properties)
            ),
            capture_output=True,
            timeout=120,
        )
        if done.returncode != 0:
            output = done.stdout.decode() + done.stderr.decode()
            pytest.fail(f"kafka-storage format failed:\n{output}")

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker (again, on the same ports and data) and wait until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self._java("kafka.Kafka", str(self.properties)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C in the test run reaches pytest only; we stop it
            # Tied to the starting thread's life, so only when that is the main thread.
            preexec_fn=(
                _die_with_parent if threading.current_thread() is threading.main_thread() else None
            ),
        )
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        from aiokafka import AIOKafkaClient  # type: ignore[import-untyped]

        async def answers() -> bool:
            client = AIOKafkaClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
            try:
                await client.bootstrap()
                return bool(client.cluster.brokers())
            except Exception:
                return False
            finally:
                await client.close()

        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Kafka exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            if self._listening() and _run_apart(answers):
                return
            time.sleep(0.2)
        raise TimeoutError(f"Kafka did not answer within {timeout}s:\n{self.log_tail()}")

    def _listening(self) -> bool:
        # Reading /proc instead of connecting: connecting in a loop to a free port can hit a
        # TCP self-connect (source port == destination port) that then occupies the port.
        # Java listens on an IPv6 socket (tcp6, IPv4-mapped address) when it can.
        wanted = (f"0100007F:{self.port:04X}", f"0000000000000000FFFF00000100007F:{self.port:04X}")
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as fh:
                    rows = [line.split() for line in fh.readlines()[1:]]
            except OSError:
                return True
            if any(row[1] in wanted and row[3] == "0A" for row in rows):  # 0A: LISTEN
                return True
        return False

    def stop(self, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop the broker: SIGTERM (a clean shutdown) or, with kill, SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused broker would never see the SIGTERM
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its connections but answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while self._state() != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self._state() == "T", f"the broker is not stopped: {self._state()}"

    def _state(self) -> str:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def create_topic(self, name: str, partitions: int = 4) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]

        async def create() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(name, partitions, 1)])
            finally:
                await admin.close()

        asyncio.run(create())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no broker log)"


_shared: list[KafkaBroker] = []  # test tooling only: one broker per session, however imported
_users = [0]


@pytest.fixture(scope="session", name="kafka_broker")
def kafka_broker_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A real Kafka broker (KRaft, one node) on free loopback ports for the whole session."""
    if not _shared:
        broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
        broker.start()
        _shared.append(broker)
    _users[0] += 1
    broker = _shared[0]
    try:
        if not broker.running:  # a test stopped it and failed before starting it again
            broker.start()
        yield broker
    finally:
        _users[0] -= 1
        if _users[0] == 0:
            broker.stop()
            _shared.clear()


# ---- reading back -----------------------------------------------------------------------------


def read_topic(
    bootstrap: str, topic: str, expect: int, timeout: float = 20.0
) -> list[tuple[int, int, bytes | None, bytes, list[tuple[str, bytes]]]]:
    """Every record of `topic` from the beginning, as (partition, offset, key, value, headers),
    in offset order per partition; reads until it has at least `expect` records and every
    record Kafka held when the read began (records may repeat: `expect` alone could stop
    before the last ones), or until `timeout`."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> list[tuple[int, int, bytes | None, bytes, list[tuple[str, bytes]]]]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=16 << 20,
            max_partition_fetch_bytes=4 << 20,
        )
        await consumer.start()
        got: list[tuple[int, int, bytes | None, bytes, list[tuple[str, bytes]]]] = []
        try:
            deadline = time.monotonic() + timeout
            partitions = await consumer._client._wait_on_metadata(topic)
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
            behind = {tp.partition: end for tp, end in ends.items() if end > 0}
            while (len(got) < expect or behind) and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=200, max_records=100_000)
                for tp, messages in batches.items():
                    for m in messages:
                        got.append((tp.partition, m.offset, m.key, m.value, list(m.headers)))
                        end = behind.get(tp.partition)
                        if end is not None and m.offset + 1 >= end:
                            del behind[tp.partition]
        finally:
            await consumer.stop()
        got.sort(key=lambda r: (r[0], r[1]))
        return got

    return asyncio.run(read())


def end_offsets(bootstrap: str, topic: str) -> int:
    """Records in `topic` (sum of the partitions' end offsets): what Kafka acknowledged."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def count() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = await consumer._client._wait_on_metadata(topic)
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
            return int(sum(ends.values()))
        finally:
            await consumer.stop()

    return asyncio.run(count())
