"""The disk spool in front of Kafka (gateway/telemetry/spool.py): append, read, commit, reopen
after a crash (torn tail, corrupt record, lost committed position) and its size bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.telemetry.filesink import MARKER
from gateway.telemetry.records import Record
from gateway.telemetry.spool import COMMITTED, Spool


def _record(i: int, size: int = 20) -> Record:
    record = Record(f"d{i % 3}", "telemetry", "mqtt", "devices/d/telemetry", b"x" * size, i, i)
    if i % 2:
        record.content_type = "text/plain"
    return record


async def _read_all(spool: Spool, batch: int = 7) -> list[Record]:
    out: list[Record] = []
    while True:
        _, records = await spool.read(batch)
        if not records:
            return out
        out.extend(records)


def test_records_are_read_back_in_order_and_survive_reopen(tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path, segment_bytes=1000)
        assert await spool.append([_record(i) for i in range(50)]) == 0
        assert await spool.append([_record(i) for i in range(50, 120)]) == 50
        assert len(list(tmp_path.glob("*.seg"))) > 3  # rotated
        first, records = await spool.read(30)
        assert first == 0 and [r.seq for r in records] == list(range(30))
        assert records[1].content_type == "text/plain" and records[1].payload == b"x" * 20
        await spool.commit(30)
        assert spool.pending == 90 and not spool.empty
        await spool.close()

        again = Spool(tmp_path, segment_bytes=1000)
        await again.open()
        assert (again.committed, again.end) == (30, 120)
        assert [r.seq for r in await _read_all(again)] == list(range(30, 120))
        await again.commit(120)
        assert again.empty and again.bytes == 0
        assert not list(tmp_path.glob("*.seg"))  # whole segments go once acknowledged
        assert await again.append([_record(120)]) == 120  # positions go on
        await again.close()

    asyncio.run(main())


def test_segments_are_deleted_only_when_every_record_in_them_is_committed(tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path, segment_bytes=500)
        for i in range(0, 60, 10):
            await spool.append([_record(j) for j in range(i, i + 10)])  # a few per segment
        firsts = [int(p.stem) for p in sorted(tmp_path.glob("*.seg"))]
        assert len(firsts) > 4
        await spool.read(60)
        await spool.commit(15)
        left = [int(p.stem) for p in sorted(tmp_path.glob("*.seg"))]
        holding_15 = max(f for f in firsts if f <= 15)  # the segment record 15 is in stays
        assert left == [f for f in firsts if f >= holding_15]
        await spool.close()

    asyncio.run(main())


def test_a_torn_tail_is_cut_on_open_and_appends_continue_readably(tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path)
        await spool.append([_record(i) for i in range(5)])
        await spool.close()
        (segment,) = tmp_path.glob("*.seg")
        intact = segment.stat().st_size
        with segment.open("ab") as fh:
            fh.write(b"\x00\x00\x01\x00\xde\xad")  # a crash mid-append: a header, no body

        spool = Spool(tmp_path)
        await spool.open()
        assert spool.end == 5 and segment.stat().st_size == intact
        await spool.append([_record(5), _record(6)])
        assert [r.seq for r in await _read_all(spool)] == list(range(7))
        await spool.close()

    asyncio.run(main())


def test_a_corrupt_record_is_skipped_and_reading_goes_on_with_the_next_in_its_segment(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        spool = Spool(tmp_path, segment_bytes=300)
        await spool.append([_record(i) for i in range(5)])
        await spool.append([_record(i) for i in range(5, 10)])
        await spool.close()
        first = sorted(tmp_path.glob("*.seg"))[0]
        data = bytearray(first.read_bytes())
        second_frame = data.find(MARKER, data.find(MARKER) + 2)
        data[second_frame + 12] ^= 0xFF  # flip a byte inside the second record
        first.write_bytes(bytes(data))

        spool = Spool(tmp_path, segment_bytes=300)
        await spool.open()
        seqs = [r.seq for r in await _read_all(spool)]
        assert seqs == [0, *range(2, 10)]  # only the damaged record is lost
        await spool.close()

    asyncio.run(main())


def test_a_damaged_committed_position_replays_everything_rather_than_lose(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        spool = Spool(tmp_path)
        await spool.append([_record(i) for i in range(10)])
        await spool.commit(4)
        await spool.close()
        (tmp_path / COMMITTED).write_bytes(b"\x00" * 12)  # bad CRC

        spool = Spool(tmp_path)
        await spool.open()
        assert spool.committed == 0 and spool.pending == 10
        await spool.close()

    asyncio.run(main())


def test_a_full_spool_makes_appends_wait_until_a_commit_frees_room(tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path, max_bytes=4000, segment_bytes=1000)
        await spool.append([_record(i, size=60) for i in range(15)])  # ~170 bytes each
        waits: list[int] = []
        late = asyncio.create_task(
            spool.append([_record(i, size=60) for i in range(15, 35)], lambda: waits.append(1))
        )
        await asyncio.sleep(0.2)
        assert not late.done() and waits  # full: the append waits (and said so)
        assert spool.bytes <= spool.max_bytes
        _, records = await spool.read(100)
        await spool.commit(len(records))  # the replayer got them into Kafka
        await asyncio.wait_for(late, 5)
        assert spool.bytes <= spool.max_bytes
        assert [r.seq for r in await _read_all(spool)] == list(range(len(records), 35))
        await spool.close()

    asyncio.run(main())


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 40)),
            st.tuples(st.just("read"), st.integers(1, 50)),
            st.tuples(st.just("commit"), st.integers(0, 60)),
            st.tuples(st.just("reopen"), st.just(0)),
        ),
        max_size=25,
    )
)
def test_whatever_happens_reads_return_every_uncommitted_record_in_order(
    steps: list[tuple[str, int]],
) -> None:
    import tempfile

    async def main(directory: str) -> None:
        spool = Spool(directory, segment_bytes=700)
        appended = 0
        read_upto = 0  # what a replayer has seen since the last (re)open
        for op, n in steps:
            if op == "append":
                assert await spool.append([_record(i) for i in range(appended, appended + n)]) == (
                    appended
                )
                appended += n
            elif op == "read":
                first, records = await spool.read(n)
                assert first == read_upto
                assert [r.seq for r in records] == list(range(first, first + len(records)))
                read_upto += len(records)
            elif op == "commit":
                target = min(read_upto, spool.committed + n)
                await spool.commit(target)
            else:
                await spool.close()
                spool = Spool(directory, segment_bytes=700)
                await spool.open()
                read_upto = spool.committed
            assert spool.end == appended
        rest = await _read_all(spool)
        assert [r.seq for r in rest] == list(range(read_upto, appended))
        await spool.close()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(main(directory))
