"""Instructions per QoS 1 PUBLISH through the MQTT server's read path, counted by callgrind.

The timed broker benchmark (bench/test_bench_broker.py) swings by a fifth from run to run on
this machine; instruction counts do not, so this is how a change to the PUBLISH path is judged
(for example a refactor, against the ref before it). One MQTT connection over a transport that
drops what is written (no socket, no event loop): CONNECT, then reads of `--batch` QoS 1
PUBLISH packets each (64-byte payload, no subscriber: the broker benchmark's load), each read
decoded, handled, acknowledged and flushed as a socket read would be. Run under valgrind twice,
with a small and a large number of reads; the difference divided by the difference in
messages cancels start-up.

    .venv/bin/python bench/instructions_mqtt.py                  # this checkout
    .venv/bin/python bench/instructions_mqtt.py --tree DIR       # another checkout (a worktree
                                                                 # with this one's native modules)
    .venv/bin/python bench/instructions_mqtt.py --batch 1        # one PUBLISH per read
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def _client(reads: int, batch: int) -> None:
    from prometheus_client import CollectorRegistry

    from gateway._native import mqtt
    from gateway.events import EventLog
    from gateway.guard import AuthGuard
    from gateway.metrics import AuthMetrics, EventMetrics, MqttMetrics
    from gateway.mqtt.acl import Acl
    from gateway.mqtt.broker import Broker
    from gateway.mqtt.connection import MqttConnection

    registry = CollectorRegistry()
    events = EventLog(EventMetrics(registry))
    kwargs: dict[str, Any] = dict(
        acl=Acl("open"), metrics=MqttMetrics(registry), events=events, allow_anonymous=True,
        guard=AuthGuard(AuthMetrics(registry), events),
    )  # fmt: skip
    try:  # the gateway's interceptors, as app.py registers them
        from gateway.shadows import ShadowInterceptor
        from gateway.telemetry.interceptor import TelemetryInterceptor

        kwargs["interceptors"] = [ShadowInterceptor(None), TelemetryInterceptor(None)]  # type: ignore[arg-type]
    except ImportError:  # a ref before the channel split took them as broker arguments
        from gateway.telemetry.pipeline import TelemetryPipeline

        kwargs["telemetry"] = TelemetryPipeline.__new__(TelemetryPipeline)
        kwargs["shadows"] = object()
    broker = Broker(**kwargs)

    class Transport:
        def get_extra_info(self, key: str, default: Any = None) -> Any:
            return ("127.0.0.1", 1) if key == "peername" else default

        def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
            pass

        def write(self, data: Any) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    conn = MqttConnection(broker, mqtt.ReadArena())
    conn.connection_made(Transport())  # type: ignore[arg-type]

    def feed(data: bytes) -> None:
        view = conn.get_buffer(len(data))
        view[: len(data)] = data
        conn.buffer_updated(len(data))

    feed(mqtt.Connect("bench", keep_alive=0).encode(4))
    packets = [mqtt.encode_publish("bench/qos1", b"x" * 64, qos=1, packet_id=i + 1)
               for i in range(batch)]  # fmt: skip
    data = b"".join(bytes(p) for p in packets)
    for _ in range(reads):
        feed(data)


def _count(tree: Path, reads: int, batch: int, out: str) -> int:
    from instructions import callgrind

    argv = [__file__, "--client", str(reads), "--batch", str(batch)]
    return callgrind(argv, out, PYTHONPATH=str(tree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="the checkout to count")
    parser.add_argument("--batch", type=int, default=10, help="PUBLISH packets per read")
    parser.add_argument("--small", type=int, default=200, help="reads in the small run")
    parser.add_argument("--large", type=int, default=2200, help="reads in the large run")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)  # the run under valgrind
    args = parser.parse_args()
    if args.client is not None:
        _client(args.client, args.batch)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install -y valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        small, large = (
            _count(args.tree.resolve(), n, args.batch, os.path.join(tmp, f"{n}.out"))
            for n in (args.small, args.large)
        )
    per_message = (large - small) / ((args.large - args.small) * args.batch)
    print(f"{args.tree}: {per_message:,.0f} instructions per QoS 1 PUBLISH "
          f"({args.batch} per read)")  # fmt: skip


if __name__ == "__main__":
    main()
