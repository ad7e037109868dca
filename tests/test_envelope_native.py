"""The native envelope packer (gateway/_native/envelope.pyx) against msgpack and the Python
framing it replaces: the same bytes for every record, including the length and number
boundaries where msgpack changes its encoding, and msgpack's own result (or error) for records
it does not pack itself."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._native.envelope import envelope, frame_records
from gateway.telemetry.filesink import frame, scan_segment
from gateway.telemetry.records import Record

# Lengths and numbers where msgpack's encoding changes (fixstr/str8/str16/str32, bin8/16/32,
# fixint/uint8/16/32/64).
LENGTHS = [0, 1, 31, 32, 255, 256, 65535, 65536, 70000]
NUMBERS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(LENGTHS).map(lambda n: "é" * (n // 2) + "x" * (n % 2)),
    st.sampled_from(LENGTHS).map(lambda n: "a" * n),
)
payloads = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(LENGTHS).map(lambda n: b"\xfe" * n),
    st.sampled_from(LENGTHS).map(lambda n: bytes(range(256)) * (n // 256) + b"\xfe\xff" * 3),
)
numbers = st.one_of(st.sampled_from(NUMBERS), st.integers(0, 2**64 - 1))
records = st.builds(
    Record, texts, texts, texts, texts, payloads, numbers, numbers,
)


def python_envelope(record: Record) -> bytes:
    packed: bytes = msgpack.packb(
        {
            "device": record.device,
            "ts_ms": record.ts_ms,
            "seq": record.seq,
            "kind": record.kind,
            "protocol": record.protocol,
            "topic_or_path": record.topic_or_path,
            "payload": record.payload,
        },
        use_bin_type=True,
    )
    return packed


@settings(max_examples=400, deadline=None)
@given(st.lists(records, max_size=6))
def test_native_envelopes_and_frames_are_msgpack_and_python_framing_byte_for_byte(
    batch: list[Record],
) -> None:
    for record in batch:
        assert envelope(record, python_envelope) == python_envelope(record)
        assert record.envelope() == python_envelope(record)
    framed = frame_records(batch, python_envelope)
    assert framed == frame([python_envelope(r) for r in batch])


def test_what_it_does_not_pack_itself_goes_to_msgpack() -> None:
    calls: list[Any] = []

    def fallback(record: Any) -> bytes:
        calls.append(record)
        return python_envelope(record)

    odd = [
        Record("d", "telemetry", "mqtt", "t", b"x", -1, 0),  # a negative number
        Record("d", "telemetry", "mqtt", "t", b"x", True, 0),  # a bool is an int subclass
    ]
    for record in odd:
        assert envelope(record, fallback) == python_envelope(record)
    assert frame_records(odd, fallback) == frame([python_envelope(r) for r in odd])
    assert len(calls) == 2 * len(odd)
    views = Record("d", "telemetry", "mqtt", "t", memoryview(b"ab\xfecd")[1:], 5, 6)
    assert envelope(views, fallback) == python_envelope(views)  # buffers are packed natively
    assert len(calls) == 2 * len(odd)
    with pytest.raises(OverflowError):  # as msgpack: past uint64
        envelope(Record("d", "telemetry", "mqtt", "t", b"x", 2**64, 0), python_envelope)
    with pytest.raises(UnicodeEncodeError):  # as msgpack: a lone surrogate cannot be UTF-8
        envelope(Record("\ud800", "telemetry", "mqtt", "t", b""), python_envelope)
    text = Record("d", "telemetry", "mqtt", "t", "text", 1, 2)  # type: ignore[arg-type]
    assert envelope(text, python_envelope) == python_envelope(text)  # msgpack: a str


def test_native_frames_read_back_through_the_segment_scanner() -> None:
    batch = [Record(f"dev-{i}", "telemetry", "coap", "/telemetry/x", b"\xfe\xff" * i, i, i)
             for i in range(50)]
    scan = scan_segment(frame_records(batch, python_envelope))
    assert not scan.skipped
    assert [Record.from_envelope(f.body) for f in scan.frames] == batch


def test_refused_numbers_leave_the_exception_types_references_alone() -> None:
    """A number the packer refuses (negative, past uint64) goes to msgpack after the C
    conversion failed: the failure must not cost OverflowError a reference each time (it did:
    the interpreter then crashed freeing the type at exit, after every test had passed)."""
    import sys

    records = [Record("d", "telemetry", "mqtt", "t", b"x", -1, 0),
               Record("d", "telemetry", "mqtt", "t", b"x", 2**70, 0)]
    before = sys.getrefcount(OverflowError)
    for _ in range(1000):
        envelope(records[0], python_envelope)
        frame_records(records[:1], python_envelope)
        with pytest.raises(OverflowError):
            envelope(records[1], python_envelope)
    assert sys.getrefcount(OverflowError) - before in range(-5, 6)
