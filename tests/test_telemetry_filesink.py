"""The embedded telemetry sink and the pipeline's group commit and in-order acknowledgements."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.telemetry.filesink import FileSink, read_records
from gateway.telemetry.pipeline import TelemetryPipeline
from gateway.telemetry.records import Record, classify_topic


def test_topics_are_classified_by_the_public_scheme() -> None:
    assert classify_topic("devices/d1/telemetry") == ("telemetry", "d1")
    assert classify_topic("devices/d1/telemetry/temp/x") == ("telemetry", "d1")
    assert classify_topic("devices/d1/events") == ("events", "d1")
    assert classify_topic("devices/d1/commands/reboot") is None
    assert classify_topic("devices//telemetry") is None
    assert classify_topic("plant/d1/telemetry") is None


def _record(device: str, i: int) -> Record:
    return Record(device, "telemetry", "mqtt", f"devices/{device}/telemetry", b"%d" % i)


class Collector:
    def __init__(self) -> None:
        self.tokens: list[Any] = []

    def records_durable(self, tokens: list[Any]) -> None:
        self.tokens.extend(tokens)


def test_records_are_durable_in_order_and_survive_reopen(tmp_path: Path) -> None:
    async def main() -> Collector:
        pipeline = TelemetryPipeline(FileSink(tmp_path, segment_bytes=2000))
        target = Collector()
        for i in range(500):
            pipeline.submit(_record(f"d{i % 3}", i), target, i)
            if i % 50 == 0:
                await asyncio.sleep(0.01)  # let batches form across several group commits
        await pipeline.close()
        return target

    target = asyncio.run(main())
    assert target.tokens == list(range(500))  # every ack, in submission order
    records = list(read_records(tmp_path))
    assert [r.payload for r in records] == [b"%d" % i for i in range(500)]
    assert [r.seq for r in records if r.device == "d1"] == list(range(1, 168))
    assert len(list(tmp_path.glob("*.seg"))) > 1  # rotated

    async def append() -> None:
        pipeline = TelemetryPipeline(FileSink(tmp_path, segment_bytes=2000))
        pipeline.submit(_record("d9", 0))
        await pipeline.close()

    asyncio.run(append())
    assert len(list(read_records(tmp_path))) == 501


def test_a_torn_tail_is_ignored(tmp_path: Path) -> None:
    async def main() -> None:
        pipeline = TelemetryPipeline(FileSink(tmp_path))
        for i in range(3):
            pipeline.submit(_record("d", i))
        await pipeline.close()

    asyncio.run(main())
    (segment,) = tmp_path.glob("*.seg")
    with segment.open("ab") as fh:
        fh.write(b"\x00\x00\x00\x40\x12\x34")  # a header promising more than follows
    assert [r.payload for r in read_records(tmp_path)] == [b"0", b"1", b"2"]


def test_a_failing_sink_is_retried_and_nothing_is_acknowledged_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0
            self.stored: list[Record] = []

        async def write(self, records: list[Record]) -> None:
            self.calls += 1
            if self.calls == 1:
                raise OSError("disk on fire")
            self.stored.extend(records)

        async def close(self) -> None:
            pass

    import gateway.telemetry.pipeline as p

    monkeypatch.setattr(p, "RETRY_DELAY", 0.01)  # restored after the test

    async def main() -> tuple[Flaky, Collector]:
        sink = Flaky()
        pipeline = TelemetryPipeline(sink)
        target = Collector()
        pipeline.submit(_record("d", 1), target, "a")
        await asyncio.sleep(0)
        assert target.tokens == []
        await pipeline.close()
        return sink, target

    sink, target = asyncio.run(main())
    assert sink.calls == 2 and target.tokens == ["a"] and len(sink.stored) == 1
