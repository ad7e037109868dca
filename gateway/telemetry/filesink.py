"""The embedded sink: telemetry envelopes appended to rotating segment files in the data dir,
fsynced in groups (one fsync per pipeline batch), with a CRC per record.

Segment file: `{first-sequence:020d}.seg`, records framed as
`[u32 length][u32 crc32 of the envelope][envelope]`, big-endian. A torn record at the end of the
newest segment (a crash mid-write) is detected by its length or CRC and ignored by readers.
The framing (`frame`, `scan_frames`) is shared with the Kafka disk spool (spool.py).
"""

from __future__ import annotations

import asyncio
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.telemetry.records import Record

HEADER = struct.Struct(">II")
SUFFIX = ".seg"


class FileSink:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 64 << 20,
        retention_bytes: int = 1 << 30,
        pwrite: Callable[[int, bytes | memoryview, int], int] = os.pwrite,
        fdatasync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        self.directory = Path(directory)
        # The OS calls that can fail with ENOSPC/EIO, a seam for tests that inject short writes.
        self._pwrite = pwrite
        self._fdatasync = fdatasync
        self.segment_bytes = segment_bytes
        self.retention_bytes = retention_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        # One thread does all file work, so writes stay ordered and never block the event loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="iotgw-filesink")
        self._fd = -1
        self._size = 0
        self._count = _next_ordinal(self.directory)  # names the next segment

    async def write(self, records: list[Record]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write, records)

    def _write(self, records: list[Record]) -> None:
        if self._fd < 0 or self._size >= self.segment_bytes:
            self._rotate()
        data = frame([record.envelope() for record in records])
        write_all(self._fd, data, self._size, self._pwrite)
        self._fdatasync(self._fd)
        self._size += len(data)
        self._count += len(records)

    def _rotate(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self.directory / f"{self._count:020d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's name is durable too
        finally:
            os.close(dir_fd)
        self._enforce_retention()

    def _enforce_retention(self) -> None:
        segments = sorted(self.directory.glob("*" + SUFFIX))
        total = sum(p.stat().st_size for p in segments)
        for old in segments[:-1]:  # never the one being written
            if total <= self.retention_bytes:
                break
            total -= old.stat().st_size
            old.unlink()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _next_ordinal(directory: Path) -> int:
    """Records ever written here: the newest segment's first ordinal plus its records."""
    segments = sorted(directory.glob("*" + SUFFIX))
    if not segments:
        return 0
    return int(segments[-1].stem) + sum(1 for _ in _segment_envelopes(segments[-1]))


def frame(bodies: list[bytes]) -> bytes:
    """`[u32 length][u32 crc32][body]` for each body, concatenated."""
    parts = []
    for body in bodies:
        parts.append(HEADER.pack(len(body), zlib.crc32(body)))
        parts.append(body)
    return b"".join(parts)


def scan_frames(data: bytes | memoryview, offset: int = 0) -> Iterator[tuple[bytes, int]]:
    """(body, offset just after it) for each intact frame from `offset`; stops at the first torn
    or corrupt one: nothing after it in this segment is trusted."""
    end = len(data)
    while offset + HEADER.size <= end:
        length, crc = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        if start + length > end:
            return
        body = bytes(data[start : start + length])
        if zlib.crc32(body) != crc:
            return
        offset = start + length
        yield body, offset


def write_all(
    fd: int,
    data: bytes,
    offset: int,
    pwrite: Callable[[int, bytes | memoryview, int], int] = os.pwrite,
) -> None:
    view = memoryview(data)
    while view:
        written = pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _segment_envelopes(path: Path) -> Iterator[bytes]:
    for envelope, _ in scan_frames(path.read_bytes()):
        yield envelope


def read_records(directory: str | os.PathLike[str]) -> Iterator[Record]:
    """Every intact record, oldest first."""
    for path in sorted(Path(directory).glob("*" + SUFFIX)):
        for envelope in _segment_envelopes(path):
            yield Record.from_envelope(envelope)
