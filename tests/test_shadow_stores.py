"""One contract suite for both shadow stores: embedded SQLite and Redis (a real redis-server).

Every test in the first part runs against each store (the ``backend`` fixture; Redis twice:
remembering documents between writes, and reading before every write). The tests are
synchronous and drive the stores with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import stop_process

from shadow.model import (
    InvalidUpdate,
    KeyTooLong,
    Limits,
    Shadow,
    ShadowTooDeep,
    ShadowTooLarge,
    UpdateResult,
    VersionConflict,
    apply_update,
)
from shadow.redis import RedisShadowStore
from shadow.sqlite import SqliteShadowStore
from shadow.store import BaseShadowStore, UpdateRequest

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Backend:
    kind: str
    open: Callable[..., BaseShadowStore]  # keyword arguments go to the store (e.g. limits)

    def run(self, body: Callable[..., Awaitable[None]], stores: int = 1, **kw: Any) -> None:
        """Runs ``body(store, ...)`` with ``stores`` instances open on the same data."""

        async def main() -> None:
            opened = [self.open(**kw) for _ in range(stores)]
            try:
                await body(*opened)
            finally:
                for store in opened:
                    await store.close()

        asyncio.run(main())


@pytest.fixture
def redis_space(redis_server: Any) -> Iterator[tuple[str, redis.Redis]]:
    """A key prefix of its own in the tests' Redis and a client to it; its keys go after."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    yield prefix, client
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["sqlite", "redis", "redis-uncached"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "shadows.db"
        yield Backend("sqlite", lambda **kw: SqliteShadowStore(path, **kw))
        return
    url = request.getfixturevalue("redis_server").url
    prefix, _ = request.getfixturevalue("redis_space")
    cache = {"cache_size": 0} if request.param == "redis-uncached" else {}
    yield Backend("redis", lambda **kw: RedisShadowStore(url, prefix=prefix, **cache, **kw))


def desired(patch: Any, **extra: Any) -> dict[str, Any]:
    return {"state": {"desired": patch}, **extra}


def reported(patch: Any) -> dict[str, Any]:
    return {"state": {"reported": patch}}


# --------------------------------------------------------------------------- basics


def test_get_of_a_missing_shadow_is_none_and_update_creates_it(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        assert await store.get("dev1") is None
        result = await store.update("dev1", desired({"color": "red"}), writer="app")
        assert result.version == 1
        shadow = await store.get("dev1")
        assert shadow is not None and shadow.desired == {"color": "red"}
        assert shadow.version == 1 and shadow.vv == {"app": 1}

    backend.run(body)


def test_update_merges_and_the_document_shows_the_delta(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        await store.update("d", desired({"light": {"on": True, "level": 3}}), writer="app")
        r = await store.update("d", reported({"light": {"on": True, "level": 1}}), writer="d")
        assert r.delta is None
        r = await store.update("d", desired({"light": {"level": 5}, "fan": [1, 2]}), writer="app")
        assert r.delta is not None and r.delta["version"] == r.version == 3
        assert r.delta["state"] == {"light": {"level": 5}, "fan": [1, 2]}
        shadow = await store.get("d")
        assert shadow is not None
        doc = shadow.document()
        assert doc["state"]["desired"] == {"light": {"on": True, "level": 5}, "fan": [1, 2]}
        assert doc["state"]["delta"] == {"light": {"level": 5}, "fan": [1, 2]}
        assert set(doc["metadata"]["desired"]["light"]) == {"on", "level"}
        assert doc["version"] == 3

    backend.run(body)


def test_null_deletes_fields_and_a_null_section_clears_it(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        doc = {"state": {"desired": {"a": 1, "b": {"c": 2}}, "reported": {"a": 0}}}
        await store.update("d", doc, writer="app")
        await store.update("d", desired({"b": {"c": None}}), writer="app")
        shadow = await store.get("d")
        assert shadow is not None and shadow.desired == {"a": 1}
        await store.update("d", desired(None), writer="app")
        shadow = await store.get("d")
        assert shadow is not None and shadow.desired == {} and shadow.reported == {"a": 0}
        assert shadow.delta == {}

    backend.run(body)


def test_replace_sets_whole_sections(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        await store.update("d", {"state": {"desired": {"a": 1}, "reported": {"b": 2}}}, writer="x")
        r = await store.replace("d", desired({"z": 9}), writer="api", expected_version=1)
        assert r.version == 2
        shadow = await store.get("d")
        assert shadow is not None and (shadow.desired, shadow.reported) == ({"z": 9}, {})
        with pytest.raises(VersionConflict):
            await store.replace("d", desired({}), writer="api", expected_version=1)

    backend.run(body)


def test_delete_removes_the_shadow_and_a_recreated_one_continues_the_version(
    backend: Backend,
) -> None:
    async def body(store: BaseShadowStore) -> None:
        assert await store.delete("d") is None
        await store.update("d", desired({"a": 1}), writer="app")
        with pytest.raises(VersionConflict):
            await store.delete("d", expected_version=7)
        assert await store.delete("d", expected_version=1) == 2
        assert await store.get("d") is None
        assert await store.delete("d") is None
        assert await store.changes_since("d", 0) is None
        with pytest.raises(VersionConflict) as err:
            await store.update("d", desired({"a": 2}), writer="app", expected_version=1)
        assert err.value.current is None
        r = await store.update("d", desired({"b": 1}), writer="app")
        assert r.version == 3 and r.shadow.desired == {"b": 1}

    backend.run(body)


def test_limit_violations_raise_typed_errors_and_store_nothing(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        await store.update("d", desired({"a": 1}), writer="app")
        with pytest.raises(ShadowTooLarge):
            await store.update("d", desired({"b": "x" * 300}), writer="app")
        with pytest.raises(ShadowTooDeep):
            await store.update("d", desired({"b": {"c": {"d": 1}}}), writer="app")
        with pytest.raises(KeyTooLong):
            await store.update("d", desired({"long-key": 1}), writer="app")
        with pytest.raises(InvalidUpdate):
            await store.update("d", {"state": {"delta": {}}}, writer="app")
        with pytest.raises(InvalidUpdate):
            await store.update("", desired({"a": 1}), writer="app")
        shadow = await store.get("d")
        assert shadow is not None and shadow.version == 1 and shadow.desired == {"a": 1}
        assert store.stats.invalid == 5 and store.stats.writes == 1

    backend.run(body, limits=Limits(max_state_bytes=200, max_depth=2, max_key_bytes=5))


# --------------------------------------------------------------------------- CAS


def test_cas_write_applies_on_the_current_version_and_a_stale_one_conflicts(
    backend: Backend,
) -> None:
    async def body(store: BaseShadowStore) -> None:
        await store.update("d", desired({"a": 1}), writer="app", expected_version=0)
        await store.update("d", desired({"a": 2}), writer="app", expected_version=1)
        with pytest.raises(VersionConflict) as err:
            await store.update("d", desired({"a": 3}), writer="app", expected_version=1)
        current = err.value.current
        assert current is not None and current.version == 2 and current.desired == {"a": 2}
        with pytest.raises(VersionConflict):  # the version in the body is a CAS check too
            await store.update("d", desired({"a": 3}, version=1), writer="app")
        assert store.stats.conflicts == 2

    backend.run(body)


def test_fifty_concurrent_cas_writers_end_at_fifty(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        await store.replace("counter", desired({"n": 0}), writer="seed")

        async def increment(writer: str) -> int:
            conflicts = 0
            while True:
                shadow = await store.get("counter")
                assert shadow is not None
                n = shadow.desired["n"]
                assert isinstance(n, int)
                try:
                    await store.update(
                        "counter",
                        desired({"n": n + 1}),
                        writer=writer,
                        expected_version=shadow.version,
                    )
                    return conflicts
                except VersionConflict:
                    conflicts += 1

        conflicts = await asyncio.gather(*(increment(f"w{i}") for i in range(50)))
        shadow = await store.get("counter")
        assert shadow is not None
        assert shadow.desired == {"n": 50} and shadow.version == 51
        assert store.stats.writes == 51 and store.stats.conflicts == sum(conflicts)

    backend.run(body)


def test_concurrent_blind_writers_lose_no_field(backend: Backend) -> None:
    async def body(store: BaseShadowStore, other: BaseShadowStore) -> None:
        writes = [
            (store if i % 2 else other).update("d", desired({f"k{i}": i}), writer=f"w{i}")
            for i in range(20)
        ]
        await asyncio.gather(*writes)
        shadow = await store.get("d")
        assert shadow is not None
        assert shadow.desired == {f"k{i}": i for i in range(20)} and shadow.version == 20

    backend.run(body, stores=2)


# --------------------------------------------------------------------------- version vectors


def test_two_nodes_writing_concurrently_keep_disjoint_fields_and_resolve_the_same_field(
    backend: Backend,
) -> None:
    async def body(node1: BaseShadowStore, node2: BaseShadowStore) -> None:
        await node1.update("d", desired({"a": 0, "b": 0, "c": 0}), writer="seed")
        seen = await node2.get("d")
        assert seen is not None
        results = await asyncio.gather(
            node1.update(
                "d", desired({"a": 1, "c": "n1"}), writer="node-1", context=seen.vv, ts_ms=2_000
            ),
            node2.update(
                "d", desired({"b": 2, "c": "n2"}), writer="node-2", context=seen.vv, ts_ms=1_000
            ),
        )
        shadow = await node1.get("d")
        assert shadow is not None
        assert shadow.desired == {"a": 1, "b": 2, "c": "n1"}  # c: the later ts_ms wins
        assert shadow.vv == {"seed": 1, "node-1": 1, "node-2": 1}
        later = [r for r in results if r.concurrent]
        assert len(later) == 1 and later[0].conflicting_fields == ("/desired/c",)
        stats = [node1.stats, node2.stats]
        assert sum(s.concurrent_writes for s in stats) == 1
        assert sum(s.conflicting_fields for s in stats) == 1

    backend.run(body, stores=2)


def test_same_field_same_ts_goes_to_the_greater_writer_id(backend: Backend) -> None:
    async def body(node1: BaseShadowStore, node2: BaseShadowStore) -> None:
        r = await node1.update("d", desired({"mode": "seed"}), writer="seed")
        ctx = r.shadow.vv
        await node2.update("d", desired({"mode": "b"}), writer="node-b", context=ctx, ts_ms=5)
        late = await node1.update(
            "d", desired({"mode": "a"}), writer="node-a", context=ctx, ts_ms=5
        )
        assert late.concurrent and late.overruled_fields == ("/desired/mode",)
        assert late.shadow.desired == {"mode": "b"}

    backend.run(body, stores=2)


# --------------------------------------------------------------------------- seq


def test_reordered_reports_do_not_overwrite_newer_fields(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        await store.update("d", reported({"temp": 30, "hum": 50}), writer="d", seq=3)
        r = await store.update("d", reported({"temp": 20, "door": "open"}), writer="d", seq=2)
        assert r.suppressed_fields == ("/reported/temp",)
        shadow = await store.get("d")
        assert shadow is not None
        assert shadow.reported == {"temp": 30, "hum": 50, "door": "open"}
        assert store.stats.stale_fields_dropped == 1

    backend.run(body)


# --------------------------------------------------------------------------- resync


def test_changes_since_returns_newer_records_or_asks_for_the_full_document(
    backend: Backend,
) -> None:
    async def body(store: BaseShadowStore) -> None:
        for i in range(1, 9):
            await store.update("d", desired({"n": i}), writer="app", ts_ms=1_000 * i)
        log = await store.changes_since("d", 5)
        assert log is not None and log.complete and log.version == 8
        assert [c.version for c in log.changes] == [6, 7, 8]
        assert [c.state for c in log.changes] == [{"desired": {"n": n}} for n in (6, 7, 8)]
        assert log.changes[-1].delta == {"n": 8} and log.changes[-1].writer == "app"
        oldest = await store.changes_since("d", 3)  # history keeps versions 4..8
        assert oldest is not None and oldest.complete and len(oldest.changes) == 5
        too_old = await store.changes_since("d", 2)
        assert too_old is not None and not too_old.complete and too_old.changes == ()
        now = await store.changes_since("d", 8)
        assert now is not None and now.complete and now.changes == ()
        ahead = await store.changes_since("d", 2**70)  # beyond any integer SQLite stores
        assert ahead is not None and not ahead.complete and ahead.changes == ()
        assert await store.changes_since("nobody", 0) is None

    backend.run(body, limits=Limits(history=5))


def test_list_devices_pages_in_code_point_order_and_skips_deleted(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        devices = [f"d{i:02}" for i in range(12)] + ["dz", "dé", "d{x}"]
        for device in devices:
            await store.update(device, desired({"a": 1}), writer="app")
        await store.delete("d03")
        expected = sorted(d for d in devices if d != "d03")
        pages: list[list[str]] = []
        after: str | None = None
        while page := await store.list_devices(after=after, limit=5):
            pages.append(page)
            after = page[-1]
        assert [len(p) for p in pages] == [5, 5, 4]
        assert [d for p in pages for d in p] == expected

    backend.run(body)


def test_update_many_applies_each_entry_on_its_own(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        await store.update("c", desired({"x": 1}), writer="app")
        results = await store.update_many(
            [
                UpdateRequest("a", desired({"n": 1}), "app"),
                UpdateRequest("b", {"state": 5}, "app"),
                UpdateRequest("a", desired({"m": 2}), "app"),
                UpdateRequest("c", desired({"x": 2}), "app", expected_version=9),
                UpdateRequest("c", desired({"y": 3}), "app", expected_version=1),
            ]
        )
        assert [type(r).__name__ for r in results] == [
            "UpdateResult",
            "InvalidUpdate",
            "UpdateResult",
            "VersionConflict",
            "UpdateResult",
        ]
        a, c = await store.get("a"), await store.get("c")
        assert a is not None and a.desired == {"n": 1, "m": 2} and a.version == 2
        assert c is not None and c.desired == {"x": 1, "y": 3}
        assert await store.get("b") is None
        assert isinstance(results[2], UpdateResult) and results[2].version == 2

    backend.run(body)


def test_a_new_store_instance_sees_the_data_after_close(backend: Backend) -> None:
    async def write(store: BaseShadowStore) -> None:
        await store.update("d", desired({"a": 1}), writer="app")
        await store.update("d", reported({"a": 1}), writer="dev", seq=4)

    async def read(store: BaseShadowStore) -> None:
        shadow = await store.get("d")
        assert shadow is not None and shadow.version == 2 and shadow.delta == {}
        assert shadow.reported_meta[("a",)].seq == 4
        log = await store.changes_since("d", 0)
        assert log is not None and [c.version for c in log.changes] == [1, 2]
        assert await store.list_devices() == ["d"]
        r = await store.update("d", reported({"a": 2}), writer="dev", seq=3)
        assert r.suppressed_fields == ("/reported/a",) and r.version == 3

    backend.run(write)
    backend.run(read)


def test_concurrent_updates_to_one_device_apply_in_call_order(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        results = await asyncio.gather(
            *(store.update("d", desired({"n": i, f"k{i}": i}), writer="app") for i in range(20))
        )
        assert [r.version for r in results] == list(range(1, 21))
        shadow = await store.get("d")
        assert shadow is not None and shadow.version == 20 and shadow.desired["n"] == 19
        assert store.stats.cas_retries == 0

    backend.run(body)


def test_a_node_writes_on_top_of_what_another_node_wrote_since(backend: Backend) -> None:
    async def body(node1: BaseShadowStore, node2: BaseShadowStore) -> None:
        await node1.update("d", desired({"a": 1}), writer="n1")
        await node2.update("d", desired({"b": 2}), writer="n2")
        r = await node1.update("d", desired({"c": 3}), writer="n1", expected_version=2)
        assert r.version == 3 and r.shadow.desired == {"a": 1, "b": 2, "c": 3}
        with pytest.raises(VersionConflict) as err:
            await node2.update("d", desired({"c": 4}), writer="n2", expected_version=2)
        assert err.value.current_version == 3
        assert await node2.delete("d") == 4
        assert await node1.delete("d") is None
        assert await node1.get("d") is None
        r = await node1.update("d", desired({"e": 5}), writer="n1")
        assert r.version == 5 and r.shadow.desired == {"e": 5}
        assert await node2.list_devices() == ["d"]
        assert node1.stats.cas_retries == node2.stats.cas_retries == 0

    backend.run(body, stores=2)


def test_integers_beyond_64_bits_and_floats_keep_their_type(backend: Backend) -> None:
    async def body(store: BaseShadowStore) -> None:
        await store.update("d", reported({"big": 2**70, "f": 1.0, "i": 1}), writer="dev")
        await store.update("d", desired({"neg": -(2**65)}), writer="app")
        shadow = await store.get("d")
        assert shadow is not None and shadow.reported == {"big": 2**70, "f": 1.0, "i": 1}
        assert [type(v) for v in shadow.reported.values()] == [int, float, int]
        assert shadow.desired == {"neg": -(2**65)}
        log = await store.changes_since("d", 0)
        assert log is not None and log.changes[0].state == {"reported": shadow.reported}

    backend.run(body)


# --------------------------------------------------------------------------- store specific


def test_sqlite_writers_in_two_processes_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from shadow.model import VersionConflict
        from shadow.sqlite import SqliteShadowStore

        async def main(writer):
            store = SqliteShadowStore({str(path)!r})
            for _ in range(25):
                while True:
                    s = await store.get("counter")
                    n, v = (s.desired["n"], s.version) if s else (0, 0)
                    try:
                        await store.update("counter", {{"state": {{"desired": {{"n": n + 1}}}}}},
                                           writer=writer, expected_version=v)
                        break
                    except VersionConflict:
                        pass
            await store.close()

        asyncio.run(main(sys.argv[1]))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"proc{i}"], cwd=ROOT) for i in range(2)
    ]
    try:
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            stop_process(p, 0)

    async def check() -> None:
        async with SqliteShadowStore(path) as store:
            shadow = await store.get("counter")
            assert shadow is not None and shadow.desired == {"n": 50} and shadow.version == 50
            assert shadow.vv == {"proc0": 25, "proc1": 25}

    asyncio.run(check())


def test_redis_keys_are_hash_tagged_per_device(
    redis_server: Any, redis_space: tuple[str, redis.Redis]
) -> None:
    prefix, client = redis_space

    async def body() -> None:
        async with RedisShadowStore(redis_server.url, prefix=prefix) as store:
            await store.update("dev1", desired({"a": 1}), writer="app")
            await store.update("odd{id}%", desired({"a": 1}), writer="app")

    asyncio.run(body())
    keys = {k.decode() for k in client.scan_iter(match=f"{prefix}:*")}
    assert keys == {
        f"{prefix}:shadows",
        f"{prefix}:shadow:{{dev1}}",
        f"{prefix}:shadow:{{dev1}}:changes",
        f"{prefix}:shadow:{{odd%7Bid%7D%25}}",
        f"{prefix}:shadow:{{odd%7Bid%7D%25}}:changes",
    }


def test_redis_hash_fields_follow_the_document(
    redis_server: Any, redis_space: tuple[str, redis.Redis]
) -> None:
    """The script stores ``v`` as the stored version + 1 (it compares only the token): it
    must match the document's own version, through deletes and re-creation."""
    prefix, client = redis_space
    key = f"{prefix}:shadow:{{d}}"

    async def body() -> None:
        async with RedisShadowStore(redis_server.url, prefix=prefix) as store:
            for step in range(3):
                await store.update("d", desired({"n": step}), writer="app")
            await store.delete("d")
            await store.update("d", desired({"n": 9}), writer="app")
            shadow = await store.get("d")
            assert shadow is not None and shadow.version == 5
            assert client.hmget(key, "v", "d") == [b"5", b"0"]
            t = client.hget(key, "t")
            assert t is not None and len(t) == 29  # random prefix, ".", 16 hex digits

    asyncio.run(body())


def test_redis_store_reloads_its_script_after_a_script_flush(
    redis_server: Any, redis_space: tuple[str, redis.Redis]
) -> None:
    prefix, _ = redis_space

    async def body() -> None:
        async with RedisShadowStore(redis_server.url, prefix=prefix) as store:
            await store.update("d", desired({"a": 1}), writer="app")
            await store._redis.script_flush()
            r = await store.update("d", desired({"a": 2}), writer="app")
            assert r.version == 2
            results = await store.update_many(
                [UpdateRequest(f"m{i}", desired({"a": i}), "app") for i in range(3)]
            )
            assert all(isinstance(r, UpdateResult) for r in results)

    asyncio.run(body())


def test_redis_store_reads_shadows_stored_as_json_by_earlier_versions(
    redis_server: Any, redis_space: tuple[str, redis.Redis]
) -> None:
    prefix, client = redis_space
    old = apply_update(None, desired({"a": 1}), writer="old-node", ts_ms=1_000)
    key = f"{prefix}:shadow:{{d}}"
    client.hset(key, mapping={"v": 1, "d": 0, "doc": old.shadow.to_json()})
    client.rpush(f"{key}:changes", old.change.to_json())
    client.zadd(f"{prefix}:shadows", {"d": 0})

    async def body() -> None:
        async with RedisShadowStore(redis_server.url, prefix=prefix) as store:
            assert await store.get("d") == old.shadow
            r = await store.update("d", desired({"b": 2}), writer="app", expected_version=1)
            assert r.shadow.desired == {"a": 1, "b": 2} and r.version == 2
            log = await store.changes_since("d", 0)
            assert log is not None and [c.version for c in log.changes] == [1, 2]
            assert log.changes[0] == old.change

    asyncio.run(body())


def test_redis_store_redoes_a_write_when_the_shadow_was_replaced_behind_its_back(
    redis_server: Any, redis_space: tuple[str, redis.Redis]
) -> None:
    """A remembered document whose version number comes back with other content (keys
    flushed, failover) is caught by the write token, not taken for current."""
    prefix, client = redis_space

    async def body() -> None:
        async with (
            RedisShadowStore(redis_server.url, prefix=prefix) as node1,
            RedisShadowStore(redis_server.url, prefix=prefix) as node2,
        ):
            await node1.update("d", desired({"a": 1}), writer="n1")
            await node1.update("e", desired({"a": 1}), writer="n1")
            client.delete(*client.keys(f"{prefix}:*"))
            await node2.update("d", desired({"b": 2}), writer="n2")
            r = await node1.update("d", desired({"c": 3}), writer="n1")
            assert r.version == 2 and r.shadow.desired == {"b": 2, "c": 3}
            r = await node1.update("e", desired({"c": 3}), writer="n1")  # gone: created anew
            assert r.version == 1 and r.shadow.desired == {"c": 3}
            assert node1.stats.cas_retries == 0

    asyncio.run(body())


def test_redis_store_redoes_a_write_whose_document_moved_after_it_was_read(
    redis_server: Any, redis_space: tuple[str, redis.Redis]
) -> None:
    prefix, client = redis_space

    async def body() -> None:
        # cache_size=0: every write reads the document first, so a moved one is a real retry
        async with RedisShadowStore(redis_server.url, prefix=prefix, cache_size=0) as store:
            await store.update("d", desired({"a": 1}), writer="app")
            calls = 0

            def mutate(current: Shadow | None) -> UpdateResult:
                nonlocal calls
                calls += 1
                if calls == 1:  # another writer stores the document between read and write
                    client.hset(f"{prefix}:shadow:{{d}}", "t", "someone else's token")
                return apply_update(current, desired({"b": 2}), writer="app", ts_ms=1)

            (r,) = await store._results([("d", mutate)])
            assert isinstance(r, UpdateResult) and calls == 2
            assert r.cas_retries == 1 and store.stats.cas_retries == 1
            assert r.version == 2 and r.shadow.desired == {"a": 1, "b": 2}

    asyncio.run(body())


def test_redis_store_reconnects_after_the_server_closed_its_idle_connections(
    redis_server: Any, redis_space: tuple[str, redis.Redis]
) -> None:
    prefix, client = redis_space

    async def body() -> None:
        async with RedisShadowStore(redis_server.url, prefix=prefix) as store:
            await store.update("d", desired({"a": 1}), writer="app")
            client.client_kill_filter(_type="normal", skipme=True)
            await asyncio.sleep(0.1)  # the store's loop sees the connections close
            r = await store.update("d", desired({"a": 2}), writer="app")
            assert r.version == 2
            assert await store.get("d") == r.shadow

    asyncio.run(body())
