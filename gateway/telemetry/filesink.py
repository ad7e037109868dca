"""The embedded sink: telemetry envelopes appended to rotating segment files in the data dir,
fsynced in groups (one fsync per pipeline batch), with a CRC per record.

Segment format, version 2 (`{first-ordinal:020d}.seg`): the 8-byte header `IOTGWv2\\n`, then
frames

    MARKER escaped([u32 length][u32 crc32 of the body][body])      (big-endian)

where MARKER is the two bytes `FE FF` and escaping turns every `FE` byte into `FE 00`. So the
marker occurs in a segment only where a frame starts, whatever the bodies hold, and a reader that
meets a damaged frame resynchronises at the next marker (`bytes.find`, C speed) and reports the
bytes it skipped. Why a sync marker with byte stuffing rather than scanning byte by byte for a
length + CRC that hold:

- payloads are device-controlled: a device can put a well-formed frame (claiming another device)
  inside its payload, and a length + CRC scan that passes through the payload after a damaged
  header would return it as a record. Stuffed, a payload can never contain a frame start.
- zero-filled regions (what some file systems leave after a crash) parse as valid empty frames
  (length 0, crc32(b"") == 0); here they hold no marker and are skipped as one range.
- a find() per frame costs nothing on the write path (escaping is one `bytes.replace`, which
  returns the body itself when it holds no `FE`) and scanning megabytes of garbage stays cheap.

Version 1 segments (no header: `[u32 length][u32 crc32][body]` frames) are still read; on a bad
frame the reader scans byte by byte for the next frame whose length and CRC hold (not empty).

What the sink guarantees (it is the pipeline's `Sink`: `write` returns only once durable):
- a write either completes and is fdatasynced, or the segment is truncated back to the last good
  offset before anything else is written (a short write, ENOSPC, EIO, a failed fdatasync): no
  partial frame ever stays where later frames follow, and a retried batch is stored once. If the
  truncation itself fails, nothing more is written until it succeeds.
- on start (`start`, or the first write) the newest segment's tail is validated and a torn frame
  cut off (one log line with the byte count); a segment with no intact frame is removed, so a
  torn first write is never appended after. New frames always go to a new segment.
The framing (`frame`, `scan_segment`) is shared with the Kafka disk spool (spool.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from gateway._native.envelope import frame_records
from gateway.telemetry.records import Record

log = logging.getLogger("iotgw.telemetry")

HEADER = struct.Struct(">II")
SUFFIX = ".seg"
MAGIC = b"IOTGWv2\n"  # a version 1 segment starts with a u32 length < 2**24: never 'I'
MARKER = b"\xfe\xff"
_ESC = b"\xfe"
_ESC_PAIR = b"\xfe\x00"

PWrite = Callable[[int, bytes | memoryview, int], int]


class Skipped(NamedTuple):
    """Bytes a reader could not read as frames: never silently."""

    segment: Path
    offset: int
    length: int
    reason: str


class Frame(NamedTuple):
    offset: int  # where it starts in the segment (its marker)
    end: int  # just after it
    body: bytes


class Gap(NamedTuple):
    offset: int
    length: int
    reason: str


@dataclass
class SegmentScan:
    frames: list[Frame] = field(default_factory=list)
    skipped: list[Gap] = field(default_factory=list)
    data_start: int = 0  # after the segment header
    consumed: int = 0  # bytes parsed (a partial scan leaves a frame that may still grow)
    legacy: bool = False

    @property
    def good_end(self) -> int:
        """Just after the last intact frame (the header's end if there is none)."""
        return self.frames[-1].end if self.frames else self.data_start

    def skip(self, offset: int, length: int, reason: str) -> None:
        if length <= 0:
            return
        last = self.skipped[-1] if self.skipped else None
        if last is not None and last.offset + last.length == offset:
            self.skipped[-1] = Gap(last.offset, last.length + length, last.reason)
        else:
            self.skipped.append(Gap(offset, length, reason))


def frame_one(body: bytes) -> bytes:
    head = HEADER.pack(len(body), zlib.crc32(body))
    return b"".join((MARKER, head.replace(_ESC, _ESC_PAIR), body.replace(_ESC, _ESC_PAIR)))


def frame(bodies: list[bytes]) -> bytes:
    """The version 2 frames of these bodies, concatenated."""
    parts = []
    for body in bodies:
        parts.append(MARKER)
        parts.append(HEADER.pack(len(body), zlib.crc32(body)).replace(_ESC, _ESC_PAIR))
        parts.append(body.replace(_ESC, _ESC_PAIR))
    return b"".join(parts)


def _starts_legacy(data: bytes) -> bool:
    """Does `data` begin with an intact version 1 frame (no header, length and CRC hold)?"""
    if data.startswith(MAGIC) or len(data) < HEADER.size:
        return False
    length, crc = HEADER.unpack_from(data)
    end = HEADER.size + length
    return length > 0 and end <= len(data) and zlib.crc32(data[HEADER.size : end]) == int(crc)


def scan_segment(
    data: bytes, start: int | None = None, *, final: bool = True, legacy: bool | None = None
) -> SegmentScan:
    """Every intact frame in `data` (a segment, or its part from `start` on) and every range
    between them that is not one. `final=False`: `data` may end inside a frame still being
    read; the last frame is left unparsed (`consumed` stops before it)."""
    if legacy is None and start is None and not data.startswith(MAGIC):
        if _starts_legacy(data):
            return _scan_legacy(data, 0, final)
        # Neither header nor an intact first frame: a damaged start of either version. A
        # version 1 reading finds the frames of both (a version 2 frame is a marker and a
        # version 1 frame, escapes aside); they are version 2 when most sit behind a marker.
        # (Not "version 2 if any marked frame holds": stray marker bytes in version 1 data
        # make the frame behind them read as one.)
        legacy_scan = _scan_legacy(data, 0, final)
        marked = sum(1 for f in legacy_scan.frames if data[f.offset - 2 : f.offset] == MARKER)
        if 2 * marked <= len(legacy_scan.frames):
            return legacy_scan
        scan = SegmentScan()
        _scan_v2(data, 0, final, scan)
        return scan
    if legacy:
        return _scan_legacy(data, start or 0, final)
    scan = SegmentScan()
    whole = start is None
    if start is None:
        start = len(MAGIC) if data.startswith(MAGIC) else 0
        scan.data_start = start
    _scan_v2(data, start, final, scan)
    if whole and legacy is None and not scan.frames and final and len(data) > start:
        # A header and not one frame behind it: version 1 data whose first bytes were
        # overwritten with the header, or garbage; a version 1 reading tells which.
        legacy_scan = _scan_legacy(data, 0, final)
        if legacy_scan.frames:
            return legacy_scan
    return scan


def _scan_v2(data: bytes, pos: int, final: bool, scan: SegmentScan) -> None:
    n = len(data)
    find = data.find
    marker = find(MARKER, pos)
    if marker < 0:
        if final:
            scan.skip(pos, n - pos, "no frame")
            scan.consumed = n
        else:
            scan.consumed = pos
        return
    scan.skip(pos, marker - pos, "no frame start")
    pos = marker
    while True:
        following = find(MARKER, pos + 2)
        if following < 0:
            if not final:
                scan.consumed = pos
                return
            end = n
        else:
            end = following
        raw = data[pos + 2 : end]
        plain = raw.replace(_ESC_PAIR, _ESC) if _ESC in raw else raw
        parsed = False
        if len(plain) >= HEADER.size:
            length, crc = HEADER.unpack_from(plain)
            used = HEADER.size + length
            if length > 0 and used <= len(plain):
                body = plain[HEADER.size : used]
                if zlib.crc32(body) == crc:
                    frame_end = pos + 2 + used + plain.count(_ESC, 0, used)
                    scan.frames.append(Frame(pos, frame_end, body))
                    scan.skip(frame_end, end - frame_end, "bytes after a frame")
                    parsed = True
        if not parsed:
            scan.skip(pos, end - pos, "bad frame")
        if following < 0:
            scan.consumed = n
            return
        pos = following


def _scan_legacy(data: bytes, pos: int, final: bool = True) -> SegmentScan:
    scan = SegmentScan(data_start=pos, legacy=True)
    view = memoryview(data)
    n = len(data)
    bad = -1
    while pos + HEADER.size <= n:
        length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if end > n and not final:
            scan.consumed = pos  # a frame that may end past this part: read on from here
            return scan
        if length > 0 and end <= n and zlib.crc32(view[pos + HEADER.size : end]) == crc:
            if bad >= 0:
                scan.skip(bad, pos - bad, "bad frame")
                bad = -1
            scan.frames.append(Frame(pos, end, bytes(view[pos + HEADER.size : end])))
            pos = end
        else:
            if bad < 0:
                bad = pos
            pos += 1  # resynchronise: the next offset where a length and a CRC hold
    if not final:
        scan.consumed = pos
        return scan
    if bad < 0:
        bad = pos
    scan.skip(bad, n - bad, "bad frame")
    scan.consumed = n
    return scan


def write_all(fd: int, data: bytes, offset: int, pwrite: PWrite = os.pwrite) -> None:
    """All of `data` at `offset`, however many calls that takes; raises on the first error."""
    view = memoryview(data)
    while view:
        written = pwrite(fd, view, offset)
        if written <= 0:  # no progress and no error: never spin on it
            raise OSError(errno.EIO, f"write of {len(view)} bytes wrote nothing")
        view = view[written:]
        offset += written


def write_durably(
    fd: int,
    data: bytes,
    offset: int,
    pwrite: PWrite,
    fdatasync: Callable[[int], None],
    path: Path | None,
) -> None:
    """Write `data` at `offset` and fdatasync it. On any failure the file is cut back to
    `offset` before the error is raised: a retry then writes the batch once, and nothing is
    ever written after a torn frame. (Should the cut fail too, the caller cuts before its next
    write: it marks the file dirty until this returns.)"""
    try:
        write_all(fd, data, offset, pwrite)
        fdatasync(fd)
    except OSError:
        try:
            os.ftruncate(fd, offset)
        except OSError:
            log.error("%s: cannot truncate a failed write back to %d", path, offset)
        raise


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSink:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 64 << 20,
        retention_bytes: int = 1 << 30,
        pwrite: PWrite = os.pwrite,
        fdatasync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.retention_bytes = retention_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        # The OS calls that can fail with ENOSPC/EIO, a seam for tests that inject short writes.
        self._pwrite = pwrite
        self._fdatasync = fdatasync
        # One thread does all file work, so writes stay ordered and never block the event loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="iotgw-filesink")
        self._fd = -1
        self._path: Path | None = None
        self._size = 0  # the last good offset: everything before it is intact and synced
        self._dirty = False  # bytes past `_size` (a failed write) that could not be cut yet
        self._count = -1  # names the next segment; -1 until the newest segment is validated

    async def start(self) -> None:
        """Validate the newest segment (the pipeline calls this before the first write)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._recover)

    async def write(self, records: list[Record]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write, records)

    def _write(self, records: list[Record]) -> None:
        if self._count < 0:
            self._recover()
        if self._dirty:
            self._cut_back()  # raises while it cannot: nothing is appended after garbage
        if self._fd < 0 or self._size >= self.segment_bytes:
            self._rotate()
        data = frame_records(records, Record.packed_in_python)  # frame(envelopes), natively
        start = self._size
        if start == 0:
            data = MAGIC + data
        self._dirty = True  # until the batch is durable: the next write cuts back first
        write_durably(self._fd, data, start, self._pwrite, self._fdatasync, self._path)
        self._dirty = False
        self._size += len(data)
        self._count += len(records)

    def _cut_back(self) -> None:
        os.ftruncate(self._fd, self._size)
        self._dirty = False

    def _recover(self) -> None:
        """Cut a torn tail off the newest segment; drop it if nothing in it is intact."""
        segments = sorted(self.directory.glob("*" + SUFFIX))
        count = 0
        while segments:
            newest = segments[-1]
            data = newest.read_bytes()
            scan = scan_segment(data)
            for gap in scan.skipped:
                if gap.offset + gap.length < len(data):
                    log.warning(
                        "%s: %d unreadable bytes at offset %d (%s); readers skip them",
                        newest, gap.length, gap.offset, gap.reason,
                    )
            if not scan.frames:
                log.warning(
                    "%s: no intact record in the newest segment (a torn first write); removing"
                    " its %d bytes", newest, len(data),
                )
                newest.unlink()
                fsync_dir(self.directory)
                segments.pop()
                continue
            good = scan.good_end
            if good < len(data):
                log.warning(
                    "%s: cutting a torn tail of %d bytes (never acknowledged)",
                    newest, len(data) - good,
                )
                fd = os.open(newest, os.O_WRONLY)
                try:
                    os.ftruncate(fd, good)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            count = int(newest.stem) + len(scan.frames)
            break
        self._count = count

    def _rotate(self) -> None:
        # Never append to, nor reuse, an existing file: a new segment starts empty.
        while True:
            path = self.directory / f"{self._count:020d}{SUFFIX}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                self._count += 1
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._path, self._size, self._dirty = fd, path, 0, False
        fsync_dir(self.directory)  # the new file's name is durable too
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
            if self._dirty:
                try:
                    self._cut_back()
                except OSError:
                    log.error("%s: a failed write could not be cut; start-up will", self._path)
            os.close(self._fd)
            self._fd = -1


def _log_skipped(skipped: Skipped) -> None:
    log.warning(
        "%s: skipped %d unreadable bytes at offset %d (%s)",
        skipped.segment, skipped.length, skipped.offset, skipped.reason,
    )


def read_records(
    directory: str | os.PathLike[str], on_skip: Callable[[Skipped], None] | None = None
) -> Iterator[Record]:
    """Every intact record, oldest first. Whatever cannot be read (damaged frames, a torn
    tail, an intact frame that is not an envelope) is reported to `on_skip` as a byte range
    (default: a warning in the log), and reading goes on at the next frame."""
    report = on_skip or _log_skipped
    for path in sorted(Path(directory).glob("*" + SUFFIX)):
        scan = scan_segment(path.read_bytes())
        gaps = iter(scan.skipped)
        gap = next(gaps, None)
        for f in scan.frames:
            while gap is not None and gap.offset < f.offset:  # in file order
                report(Skipped(path, gap.offset, gap.length, gap.reason))
                gap = next(gaps, None)
            try:
                record = Record.from_envelope(f.body)
            except Exception:  # a frame that holds, but not an envelope
                report(Skipped(path, f.offset, f.end - f.offset, "not an envelope"))
                continue
            yield record
        while gap is not None:
            report(Skipped(path, gap.offset, gap.length, gap.reason))
            gap = next(gaps, None)
