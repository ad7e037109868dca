"""Durability of the telemetry sinks under disk faults: short writes and I/O errors (injected at
the OS-call seam), torn tails and torn first writes left by a crash, corruption anywhere in a
segment (readers resynchronise and report what they skip), and a real size-limited file system
that fills mid-stream under a real MQTT client (no PUBACK while full, nothing lost or repeated)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.telemetry.pipeline as pipeline_module
import gateway.telemetry.spool as spool_module
from gateway.telemetry.filesink import HEADER, FileSink, frame, read_records
from gateway.telemetry.pipeline import TelemetryPipeline
from gateway.telemetry.records import Record
from gateway.telemetry.spool import Spool


def _record(i: int, device: str = "d1", size: int = 40) -> Record:
    payload = (b"%06d " % i).ljust(size, b".")
    # A fixed time: segments of the same records are byte for byte the same (hypothesis).
    return Record(
        device, "telemetry", "mqtt", f"devices/{device}/telemetry", payload, 1_700_000_000_000
    )


def _number(record: Record) -> int:
    return int(record.payload.split(b" ")[0])


class Collector:
    def __init__(self) -> None:
        self.tokens: list[Any] = []

    def records_durable(self, tokens: list[Any]) -> None:
        self.tokens.extend(tokens)


class FaultyDisk:
    """The OS calls of a disk that fails on chosen calls: a pwrite that writes about half of what
    it was given and then reports ENOSPC (a short write followed by a full disk), an fdatasync that
    reports EIO. Counts calls from 0."""

    def __init__(self, fail_writes: set[int] = frozenset(), fail_syncs: set[int] = frozenset()):
        self.fail_writes = set(fail_writes)
        self.fail_syncs = set(fail_syncs)
        self.writes = 0
        self.syncs = 0
        self.full = False  # while set, every write fails half-way

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        call, self.writes = self.writes, self.writes + 1
        if self.full or call in self.fail_writes:
            half = len(data) // 2 + 3  # off any frame boundary: a torn frame stays behind
            if half < len(data):
                os.pwrite(fd, bytes(data[:half]), offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        call, self.syncs = self.syncs, self.syncs + 1
        if call in self.fail_syncs:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fdatasync(fd)


async def _write_batches(pipeline: TelemetryPipeline, batches: list[range]) -> Collector:
    """Submit each batch and wait until it is durable before the next (one sink write each)."""
    target = Collector()
    for batch in batches:
        for i in batch:
            pipeline.submit(_record(i), target, i)
        await pipeline.drain()
    return target


# ---- the file sink: failed writes ----------------------------------------------------------------


def test_a_short_write_is_truncated_back_and_the_retried_batch_is_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "RETRY_DELAY", 0.01)
    disk = FaultyDisk(fail_writes={1})  # the second batch: half written, then ENOSPC

    async def main() -> Collector:
        pipeline = TelemetryPipeline(FileSink(tmp_path, pwrite=disk.pwrite))
        target = await _write_batches(pipeline, [range(0, 10), range(10, 20), range(20, 30)])
        await pipeline.close()
        return target

    target = asyncio.run(main())
    assert target.tokens == list(range(30))
    assert [_number(r) for r in read_records(tmp_path)] == list(range(30))  # each exactly once
    skipped: list[Any] = []
    list(read_records(tmp_path, on_skip=skipped.append))
    assert skipped == []  # nothing torn was left behind


def test_a_failed_fdatasync_is_undone_so_the_retried_batch_is_not_stored_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "RETRY_DELAY", 0.01)
    disk = FaultyDisk(fail_syncs={1})  # the second batch is written, but not known durable

    async def main() -> Collector:
        sink = FileSink(tmp_path, pwrite=disk.pwrite, fdatasync=disk.fdatasync)
        pipeline = TelemetryPipeline(sink)
        target = await _write_batches(pipeline, [range(0, 5), range(5, 10), range(10, 15)])
        await pipeline.close()
        return target

    target = asyncio.run(main())
    assert target.tokens == list(range(15))
    assert [_number(r) for r in read_records(tmp_path)] == list(range(15))


def test_a_long_outage_is_retried_for_ever_and_logged_at_a_bounded_rate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Thousands of failed attempts (a disk full for hours, compressed): the back-off stays
    capped, the batch is acknowledged once a write succeeds, and the log gets one line when
    the lane blocks and one when it recovers, not one per attempt."""
    monkeypatch.setattr(pipeline_module, "RETRY_FIRST", 0.0001)
    monkeypatch.setattr(pipeline_module, "RETRY_DELAY", 0.0002)
    monkeypatch.setattr(pipeline_module, "LOG_EVERY", 3600.0)

    class FullDisk:
        def __init__(self) -> None:
            self.calls = 0

        async def write(self, records: list[Record]) -> None:
            self.calls += 1
            if self.calls <= 1500:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        async def close(self) -> None:
            pass

    async def main() -> Collector:
        pipeline = TelemetryPipeline(FullDisk())
        target = Collector()
        pipeline.submit(_record(1), target, "a")
        await asyncio.wait_for(pipeline.drain(), 20)
        await pipeline.close()
        return target

    with caplog.at_level(logging.WARNING, logger="iotgw.telemetry"):
        target = asyncio.run(main())
    assert target.tokens == ["a"]
    lines = [r.getMessage() for r in caplog.records if r.name == "iotgw.telemetry"]
    assert len(lines) == 2, lines[:5]
    assert "1500 failed attempts" in lines[1]


# ---- the file sink: start-up repair ------------------------------------------------------------


def test_a_torn_first_write_of_a_segment_is_repaired_on_start_and_never_appended_after(
    tmp_path: Path,
) -> None:
    async def write(batch: range) -> None:
        pipeline = TelemetryPipeline(FileSink(tmp_path))
        await pipeline.start()
        await _write_batches(pipeline, [batch])
        await pipeline.close()

    asyncio.run(write(range(0, 5)))
    # A crash during the first write of the next segment: its name is the next ordinal.
    torn = tmp_path / f"{5:020d}.seg"
    torn.write_bytes(frame([_record(99).envelope()])[:17])
    asyncio.run(write(range(5, 10)))

    assert [_number(r) for r in read_records(tmp_path)] == list(range(10))
    skipped: list[Any] = []
    list(read_records(tmp_path, on_skip=skipped.append))
    assert skipped == []


def test_a_torn_tail_is_truncated_on_start_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def write(batch: range) -> None:
        pipeline = TelemetryPipeline(FileSink(tmp_path))
        await pipeline.start()
        await _write_batches(pipeline, [batch])
        await pipeline.close()

    asyncio.run(write(range(0, 3)))
    (segment,) = tmp_path.glob("*.seg")
    intact = segment.stat().st_size
    with segment.open("ab") as fh:
        fh.write(frame([_record(7).envelope()])[:-5])  # a crash mid-append: most of a frame
    torn = segment.stat().st_size - intact

    with caplog.at_level(logging.WARNING, logger="iotgw.telemetry"):
        asyncio.run(write(range(3, 6)))
    assert segment.stat().st_size == intact
    lines = [r.getMessage() for r in caplog.records if str(segment) in r.getMessage()]
    assert len(lines) == 1 and f"{torn} bytes" in lines[0]
    assert [_number(r) for r in read_records(tmp_path)] == list(range(6))


# ---- readers -------------------------------------------------------------------------------------


def _segments_with(tmp_path: Path, count: int, segment_bytes: int = 1500) -> list[Path]:
    async def main() -> None:
        pipeline = TelemetryPipeline(FileSink(tmp_path, segment_bytes=segment_bytes))
        await _write_batches(pipeline, [range(i, min(i + 4, count)) for i in range(0, count, 4)])
        await pipeline.close()

    asyncio.run(main())
    return sorted(tmp_path.glob("*.seg"))


def test_records_after_a_corrupt_frame_are_still_read(tmp_path: Path) -> None:
    first, *_ = _segments_with(tmp_path, 40)
    data = bytearray(first.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 6] = b"\x00garb\x00"
    first.write_bytes(bytes(data))

    numbers = [_number(r) for r in read_records(tmp_path)]
    assert numbers[-1] == 39 and len(numbers) >= 38  # one frame (two if it hit a boundary) lost
    assert numbers == sorted(numbers)


def test_readers_report_every_skipped_range_with_segment_offset_and_length(
    tmp_path: Path,
) -> None:
    first, second, *_ = _segments_with(tmp_path, 40)
    for path, at in ((first, 100), (first, 400), (second, 60)):
        data = bytearray(path.read_bytes())
        data[at : at + 3] = b"\xff\xff\xff"
        path.write_bytes(bytes(data))

    skipped: list[Any] = []
    numbers = [_number(r) for r in read_records(tmp_path, on_skip=skipped.append)]
    assert len(numbers) >= 40 - 6 and numbers == sorted(numbers)
    assert [(s.segment, s.offset <= at < s.offset + s.length) for s, at in zip(
        skipped, (100, 400, 60), strict=True
    )] == [(first, True), (first, True), (second, True)]


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_corruption_loses_only_the_frames_it_touches_and_every_byte_is_accounted_for(
    tmp_path: Path, data: st.DataObject
) -> None:
    from gateway.telemetry.filesink import scan_segment

    directory = tmp_path / f"h{time.monotonic_ns()}"
    (segment,) = _segments_with(directory, 30, segment_bytes=1 << 20)
    intact = segment.read_bytes()
    frames = scan_segment(intact).frames
    assert len(frames) == 30
    start = data.draw(st.integers(0, len(intact) - 1), label="start")
    length = data.draw(st.integers(1, min(64, len(intact) - start)), label="length")
    junk = data.draw(st.binary(min_size=length, max_size=length), label="junk")
    damaged = intact[:start] + junk + intact[start + length :]

    scan = scan_segment(damaged)
    found = {(f.offset, f.end, f.body) for f in scan.frames}
    untouched = {
        (f.offset, f.end, f.body) for f in frames if f.end <= start or f.offset >= start + length
    }
    assert untouched <= found  # every frame the corruption did not touch is read
    assert {f.body for f in scan.frames} <= {f.body for f in frames}  # nothing invented
    # Frames and reported ranges tile the file after its header: no byte goes unreported.
    pieces = sorted([(f.offset, f.end) for f in scan.frames] + [
        (s.offset, s.offset + s.length) for s in scan.skipped
    ])
    position = scan.data_start
    for begin, end in pieces:
        assert begin == position
        position = end
    assert position == len(damaged)


def test_a_frame_forged_inside_a_payload_is_never_read_as_a_record(tmp_path: Path) -> None:
    """A device controls its payload bytes: a well-formed frame inside it (claiming another
    device) must not become a record when a reader resynchronises through it."""
    from gateway.telemetry.filesink import MARKER

    forged = Record("victim", "telemetry", "mqtt", "devices/victim/telemetry", b"forged")
    hostile = Record(
        "mallory", "telemetry", "mqtt", "devices/mallory/telemetry",
        frame([forged.envelope()]) * 3,
    )

    async def main() -> None:
        pipeline = TelemetryPipeline(FileSink(tmp_path))
        pipeline.submit(_record(0))
        pipeline.submit(hostile)
        pipeline.submit(_record(1))
        await pipeline.close()

    asyncio.run(main())
    (segment,) = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    at = data.rfind(MARKER, 0, data.find(b"mallory"))  # the hostile record's own frame header
    data[at : at + 10] = bytes(10)  # damaged: a reader must resynchronise through the payload
    segment.write_bytes(bytes(data))
    records = list(read_records(tmp_path, on_skip=lambda s: None))
    assert [r.device for r in records] == ["d1", "d1"]


def test_segments_in_the_old_format_are_read_with_resynchronisation(tmp_path: Path) -> None:
    """Data dirs written before the sync marker: `[u32 length][u32 crc32][body]` frames. A torn
    write followed by the whole batch again (what the old sink did on a full disk) hides
    nothing any more: the reader scans for the next frame whose length and CRC hold."""
    import zlib

    def old_frame(i: int) -> bytes:
        body = _record(i).envelope()
        return HEADER.pack(len(body), zlib.crc32(body)) + body

    batch = b"".join(old_frame(i) for i in range(3, 6))
    torn = batch[: len(old_frame(3)) // 2]
    data = b"".join(old_frame(i) for i in range(3)) + torn + batch + old_frame(6)
    (tmp_path / f"{0:020d}.seg").write_bytes(data)

    skipped: list[Any] = []
    numbers = [_number(r) for r in read_records(tmp_path, on_skip=skipped.append)]
    assert numbers == list(range(7))
    assert [(s.offset, s.length) for s in skipped] == [(len(old_frame(0)) * 3, len(torn))]


def test_telemetry_tail_warns_on_stderr_for_each_skipped_range_and_prints_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    telemetry = tmp_path / "telemetry"
    first, *_ = _segments_with(telemetry, 20)
    data = bytearray(first.read_bytes())
    data[200:204] = b"\x00\x00\x00\x00"
    first.write_bytes(bytes(data))

    assert main(["telemetry", "--data-dir", str(tmp_path), "tail", "-n", "0"]) == 0
    out, err = capsys.readouterr()
    printed = [line for line in out.splitlines() if line]
    assert len(printed) >= 18 and '"000019 ' in printed[-1]
    warnings = err.splitlines()
    assert len(warnings) == 1
    assert str(first) in warnings[0] and "skipped" in warnings[0]


def test_telemetry_tail_follow_reports_a_torn_tail_once_when_a_second_poll_still_finds_it(
    tmp_path: Path,
) -> None:
    import select
    import sys

    (segment,) = _segments_with(tmp_path / "telemetry", 5, segment_bytes=1 << 20)
    with segment.open("ab") as fh:
        fh.write(frame([_record(9).envelope()])[:-4])  # torn (or a write still going on)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "telemetry", "--data-dir", str(tmp_path),
         "tail", "-f", "-n", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 15)
        assert ready, "no warning about the torn tail"
        line = proc.stderr.readline()
        assert str(segment) in line and "skipped" in line
        ready, _, _ = select.select([proc.stderr], [], [], 1.5)  # three more polls
        assert not ready, f"reported again: {proc.stderr.readline()!r}"
    finally:
        proc.kill()
        proc.wait(5)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(start=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=48))
def test_random_corruption_of_an_old_format_segment_loses_only_the_frames_it_touches(
    start: int, junk: bytes
) -> None:
    import zlib

    from gateway.telemetry.filesink import scan_segment

    frames, data = [], b""
    for i in range(30):
        body = _record(i).envelope()
        frames.append((len(data), len(data) + HEADER.size + len(body), body))
        data += HEADER.pack(len(body), zlib.crc32(body)) + body
    start %= len(data)
    junk = junk[: len(data) - start]
    damaged = data[:start] + junk + data[start + len(junk) :]

    found = {(f.offset, f.end, f.body) for f in scan_segment(damaged).frames}
    untouched = {f for f in frames if f[1] <= start or f[0] >= start + len(junk)}
    assert untouched <= found
    assert {f[2] for f in found} <= {f[2] for f in frames}


# ---- the Kafka disk spool ------------------------------------------------------------------------


async def _read_all(spool: Spool) -> list[Record]:
    out: list[Record] = []
    while True:
        _, records = await spool.read(7)
        if not records:
            return out
        out.extend(records)


def test_a_short_spool_write_is_rolled_back_and_later_records_stay_readable(
    tmp_path: Path,
) -> None:
    disk = FaultyDisk(fail_writes={1})

    async def main() -> None:
        spool = Spool(tmp_path, pwrite=disk.pwrite)
        await spool.append([_record(i) for i in range(5)])
        with pytest.raises(OSError):
            await spool.append([_record(i) for i in range(5, 10)])
        assert spool.end == 5  # the failed append left nothing behind
        await spool.append([_record(i) for i in range(5, 10)])
        await spool.append([_record(i) for i in range(10, 15)])
        assert [_number(r) for r in await _read_all(spool)] == list(range(15))
        await spool.close()

        again = Spool(tmp_path)
        await again.open()
        assert again.end == 15
        assert [_number(r) for r in await _read_all(again)] == list(range(15))
        await again.close()

    asyncio.run(main())


def test_a_corrupt_spool_record_is_skipped_reported_and_the_rest_of_its_segment_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> list[int]:
        spool = Spool(tmp_path, segment_bytes=100_000)
        await spool.append([_record(i) for i in range(10)])
        await spool.append([_record(i) for i in range(10, 20)])
        await spool.close()
        (segment,) = tmp_path.glob("*.seg")
        data = bytearray(segment.read_bytes())
        data[len(data) // 3] ^= 0xFF  # a byte of one record in the middle
        segment.write_bytes(bytes(data))

        again = Spool(tmp_path, segment_bytes=100_000)
        with caplog.at_level(logging.WARNING, logger="iotgw.telemetry.spool"):
            await again.open()
        numbers = [_number(r) for r in await _read_all(again)]
        await again.close()
        return numbers

    numbers = asyncio.run(main())
    assert len(numbers) == 19 and numbers == sorted(numbers) and numbers[-1] == 19
    assert any("skipped" in r.getMessage() for r in caplog.records)


def test_a_spool_left_by_an_older_release_is_read_in_order_through_a_torn_retry(
    tmp_path: Path,
) -> None:
    """Version 1 spool segments, as the old spool wrote them on a full disk: a torn append, then
    the same records appended again. Read in small chunks, every record comes back once."""
    import zlib

    def old_frames(numbers: range) -> bytes:
        bodies = [spool_module.encode(_record(i)) for i in numbers]
        return b"".join(HEADER.pack(len(b), zlib.crc32(b)) + b for b in bodies)

    retry = old_frames(range(5, 10))
    torn = retry[: len(old_frames(range(5, 6))) // 2]  # half of its first frame
    (tmp_path / f"{0:020d}.seg").write_bytes(old_frames(range(5)) + torn + retry)
    (tmp_path / f"{10:020d}.seg").write_bytes(old_frames(range(10, 13)))

    async def main() -> list[int]:
        spool = Spool(tmp_path)
        await spool.open()
        numbers: list[int] = []
        while True:
            _, records = await spool.read(3, max_bytes=300)
            if not records:
                break
            numbers.extend(_number(r) for r in records)
        await spool.append([_record(13)])
        numbers.extend(_number(r) for r in (await spool.read(10))[1])
        await spool.close()
        return numbers

    assert asyncio.run(main()) == list(range(14))


def test_spool_disk_full_withholds_acks_and_stores_each_record_once_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka unreachable (a real KafkaSink on a closed port), so records go to the spool; the
    spool's disk is full for a while: nothing is acknowledged until it has room again."""
    from conftest import free_port

    from gateway.telemetry.kafkasink import KafkaSink
    from gateway.telemetry.spool import SpoolingSink

    monkeypatch.setattr(pipeline_module, "RETRY_DELAY", 0.02)
    monkeypatch.setattr(spool_module, "REPLAY_RETRY_DELAY", 0.05)
    disk = FaultyDisk()

    async def main() -> tuple[list[int], list[int], list[int]]:
        kafka = KafkaSink(f"127.0.0.1:{free_port()}", start_timeout=0.2)
        spool = Spool(tmp_path, pwrite=disk.pwrite)
        sink = SpoolingSink(kafka, spool, ack_timeout=0.3)
        pipeline = TelemetryPipeline(sink)
        await pipeline.start()
        target = await _write_batches(pipeline, [range(0, 5)])
        disk.full = True
        for i in range(5, 15):
            pipeline.submit(_record(i), target, i)
        while pipeline.failures < 3:  # the spool write failed, and again on retry
            await asyncio.sleep(0.01)
        during = list(target.tokens)
        disk.full = False
        await pipeline.drain()
        after = list(target.tokens)
        await pipeline.close(drain_timeout=1)
        again = Spool(tmp_path)
        await again.open()
        stored = [_number(r) for r in await _read_all(again)]
        await again.close()
        return during, after, stored

    during, after, stored = asyncio.run(main())
    assert during == list(range(5))  # nothing acknowledged while the disk was full
    assert after == list(range(15))
    assert stored == list(range(15))  # every record spooled exactly once


# ---- a real file system that fills mid-stream ----------------------------------------------------


def _mount_tmpfs(directory: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
    )
    return done.returncode == 0


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _small_fs(directory: Path) -> None:
    """A 1 MiB tmpfs at `directory` (skips the test where that cannot be had)."""
    if not _mount_tmpfs(directory, "1m"):
        pytest.skip("needs root and `mount -t tmpfs` for a real size-limited file system")


@pytest.fixture
def unmount(tmp_path: Path) -> Any:
    """Unmounts the tmpfs mounts under tmp_path after the test (and its gateways)."""
    yield
    for line in reversed(Path("/proc/mounts").read_text().splitlines()):
        mountpoint = line.split()[1]
        if mountpoint.startswith(str(tmp_path)):
            subprocess.run(["umount", "-l", mountpoint], check=False)


def _fill_mid_stream(gw: Any, full: Path, stored: Any) -> None:
    """A paho client publishes QoS 1 telemetry to `gw` while the file system at `full` (where
    its sink writes) fills up and, once the sink has failed a few times more, gets space
    again. No PUBACK while the disk is full, every PUBACK for a stored record, and in the end
    every record stored exactly once (`stored()`: the payload numbers read back)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    ballast = full / "ballast"
    ballast.write_bytes(b"\x00" * (_free_bytes(full) - (160 << 10)))  # ~160 KiB left
    registry = gw.gateway.metrics.registry

    def failures() -> float:
        value = registry.get_sample_value("iotgw_telemetry_sink_failures_total", {"lane": "low"})
        return value or 0

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="filler")
    client.connect("127.0.0.1", gw.mqtt_port)
    client.loop_start()
    total = 1200
    sent: list[Any] = []
    stop = threading.Event()

    def publish() -> None:
        oldest = 0
        for i in range(total):
            while not stop.is_set() and i - oldest >= 100:  # at most 100 unacknowledged
                while oldest < len(sent) and sent[oldest].is_published():
                    oldest += 1
                time.sleep(0.002)
            if stop.is_set():
                return
            payload = (b"%06d " % i).ljust(300, b"x")
            sent.append(client.publish("devices/filler/telemetry", payload, qos=1))

    def acked() -> set[int]:
        return {i for i, info in enumerate(list(sent)) if info.is_published()}

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        deadline = time.monotonic() + 30
        while failures() == 0:  # the disk is full: a write failed
            assert time.monotonic() < deadline, "the disk never filled"
            time.sleep(0.02)
        time.sleep(0.3)  # PUBACKs already on their way when the write failed arrive
        before, failed = acked(), failures()
        while failures() < failed + 3:  # still full: three more attempts failed
            assert time.monotonic() < deadline, "the sink stopped retrying"
            time.sleep(0.02)
        during = acked()
        assert during == before, "PUBACKs went out while the disk was full"
        assert during <= set(stored())  # every PUBACK so far is for a stored record
        assert len(sent) < total  # the fill came mid-stream

        ballast.unlink()  # space again
        while len(acked()) < total:
            assert time.monotonic() < deadline + 30, f"only {len(acked())} of {total} acked"
            time.sleep(0.05)
    finally:
        stop.set()
        publisher.join(5)
        client.loop_stop()
        client.disconnect()


def _assert_counted(gw: Any) -> None:
    """The full disk was counted (by cause) and the lane is no longer shown blocked."""
    registry = gw.gateway.metrics.registry
    errors = registry.get_sample_value(
        "iotgw_telemetry_write_errors_total", {"lane": "low", "reason": "ENOSPC"}
    )
    assert errors is not None and errors >= 4
    assert registry.get_sample_value("iotgw_telemetry_sink_blocked", {"lane": "low"}) == 0


def test_a_disk_that_fills_mid_stream_withholds_pubacks_and_loses_nothing(
    tmp_path: Path, unmount: None, gateway_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "RETRY_DELAY", 0.2)
    data = tmp_path / "data"
    telemetry = data / "telemetry"
    _small_fs(telemetry)
    gw = gateway_factory(data_dir=str(data), allow_anonymous=True, acl="open")

    def stored() -> list[int]:
        return [_number(r) for r in read_records(telemetry)]

    _fill_mid_stream(gw, telemetry, stored)
    gw.stop()
    skipped: list[Any] = []
    numbers = [_number(r) for r in read_records(telemetry, on_skip=skipped.append)]
    assert sorted(numbers) == list(range(1200))  # every acked record exactly once
    assert skipped == []
    _assert_counted(gw)


def test_a_spool_disk_that_fills_mid_stream_withholds_pubacks_and_loses_nothing(
    tmp_path: Path, unmount: None, gateway_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with `--kafka` and Kafka unreachable: everything goes to the low lane's disk
    spool, whose file system fills."""
    from conftest import free_port

    monkeypatch.setattr(pipeline_module, "RETRY_DELAY", 0.2)
    data = tmp_path / "data"
    spool_dir = data / "spool" / "low"
    _small_fs(spool_dir)
    gw = gateway_factory(
        data_dir=str(data), allow_anonymous=True, acl="open",
        kafka=f"127.0.0.1:{free_port()}", kafka_ack_timeout_ms=300,
    )

    def stored() -> list[int]:
        """What the spool's segments hold, read without touching them (the gateway is live)."""
        from gateway.telemetry.filesink import scan_segment

        return [
            _number(spool_module.decode(f.body))
            for path in sorted(spool_dir.glob("*.seg"))
            for f in scan_segment(path.read_bytes()).frames
        ]

    _fill_mid_stream(gw, spool_dir, stored)
    gw.stop()

    async def replay_order() -> list[int]:
        spool = Spool(spool_dir)
        await spool.open()
        numbers = [_number(r) for r in await _read_all(spool)]
        await spool.close()
        return numbers

    # Every acked record spooled exactly once, in order, as the replayer will read them.
    assert asyncio.run(replay_order()) == list(range(1200))
    _assert_counted(gw)


def test_coap_telemetry_on_a_full_disk_gets_its_2_04_only_once_stored(
    tmp_path: Path, unmount: None, gateway_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiocoap

    monkeypatch.setattr(pipeline_module, "RETRY_DELAY", 0.2)
    data = tmp_path / "data"
    telemetry = data / "telemetry"
    _small_fs(telemetry)
    gw = gateway_factory(data_dir=str(data), allow_anonymous=True, acl="open")
    registry = gw.gateway.metrics.registry

    def failures() -> float:
        value = registry.get_sample_value("iotgw_telemetry_sink_failures_total", {"lane": "low"})
        return value or 0

    ballast = telemetry / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    with contextlib.suppress(OSError):
        while True:  # until ENOSPC: every block taken
            os.write(fd, b"\0" * 4096)
    os.close(fd)

    async def main() -> tuple[bool, Any]:
        ctx = await aiocoap.Context.create_client_context()
        try:
            uri = f"coap://127.0.0.1:{gw.coap_port}/telemetry/coap-1"
            message = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=b"000042 coap")
            request = asyncio.ensure_future(ctx.request(message).response)
            deadline = time.monotonic() + 20
            while failures() < 3:  # the write failed, and failed again on retry
                assert time.monotonic() < deadline, "the disk never failed a write"
                await asyncio.sleep(0.02)
            answered_while_full = request.done()
            ballast.unlink()
            return answered_while_full, await asyncio.wait_for(request, 20)
        finally:
            await ctx.shutdown()

    answered_while_full, response = asyncio.run(main())
    assert not answered_while_full
    assert response.code == aiocoap.CHANGED
    assert [r.payload for r in read_records(telemetry)] == [b"000042 coap"]  # stored once
