"""`iotgw telemetry tail --kafka`: the consumer-group reader of the gateway's topics keeps each
device's order across a partition rebalance and commits only what it processed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from gateway.telemetry.kafkatail import KafkaTail
from gateway.telemetry.records import Record

DEVICES = 8
PER_DEVICE = 60


async def _produce(bootstrap: str, topic: str) -> None:
    from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for seq in range(1, PER_DEVICE + 1):
            for d in range(DEVICES):
                device = f"dev-{d}"
                record = Record(device, "telemetry", "mqtt", f"devices/{device}/telemetry",
                                b"{}", seq=seq)
                await producer.send(topic, record.envelope(), key=device.encode())
        await producer.flush()
    finally:
        await producer.stop()


def test_kafka_tail_keeps_order_across_a_rebalance_mid_stream(kafka_broker: Any) -> None:
    topic = f"iot.tail-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, 4)
    group = f"tail-{uuid.uuid4().hex[:8]}"
    asyncio.run(_produce(kafka_broker.bootstrap, topic))
    order: list[tuple[str, int, str]] = []  # (device, seq, consumer) as processed, in time
    b_state = {"joining": False, "processed": False}

    def processor(name: str) -> Any:
        async def process(record: Record, msg: Any) -> None:
            order.append((record.device, record.seq, name))
            if name == "b":
                b_state["processed"] = True
            # Slow, so that the second member joins while records remain; slower still while
            # the group rebalances (it took over 4 s once), so that some remain after it.
            rebalancing = b_state["joining"] and not b_state["processed"]
            await asyncio.sleep(0.05 if rebalancing else 0.01)

        return process

    async def main() -> tuple[KafkaTail, KafkaTail]:
        stop = asyncio.Event()
        a = KafkaTail(kafka_broker.bootstrap, [topic], group, processor("a"))
        b = KafkaTail(kafka_broker.bootstrap, [topic], group, processor("b"))
        ta = asyncio.create_task(a.run(stop))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(order) < 50 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        tb = asyncio.create_task(b.run(stop))  # joins: the group rebalances mid-stream
        b_state["joining"] = True
        while len({(d, s) for d, s, _ in order}) < DEVICES * PER_DEVICE \
                and loop.time() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(ta, tb)
        return a, b

    a, b = asyncio.run(main())
    assert a.skipped == b.skipped == 0
    seen = {(d, s) for d, s, _ in order}
    assert len(seen) == DEVICES * PER_DEVICE  # everything processed
    assert {c for _, _, c in order} == {"a", "b"}  # the rebalance moved partitions to b
    by_device: dict[str, list[int]] = defaultdict(list)
    for d, s, _ in order:
        by_device[d].append(s)
    for d, seqs in by_device.items():
        assert seqs == sorted(seqs), (  # seq and consumer, as processed
            f"{d} out of order: " + " ".join(f"{s}{c}" for dd, s, c in order if dd == d))
    # at most the record in hand at a revoke is processed again
    assert len(order) - len(seen) <= 4, len(order) - len(seen)


def test_kafka_tail_cli_prints_records_and_resumes_from_the_group(
    kafka_broker: Any, tmp_path: Path
) -> None:
    topic = f"iot.tail-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, 2)
    asyncio.run(_produce(kafka_broker.bootstrap, topic))
    cmd = [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())",
           "telemetry", "--data-dir", str(tmp_path), "tail", "--kafka", kafka_broker.bootstrap,
           "--topics", topic, "--group", "g1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == DEVICES * PER_DEVICE
    assert lines[0]["device"].startswith("dev-") and lines[0]["kind"] == "telemetry"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert again.returncode == 0 and again.stdout == ""  # the group committed what it printed
    bad = subprocess.run([*cmd[:-6], "--kafka", "nohost"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "is not host:port" in bad.stderr
