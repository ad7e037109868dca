"""The guard every secret check goes through (gateway/guard.py), driven with the real device
registry: what it remembers, what it throttles, what it refuses at once."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway import guard
from gateway.auth import DeviceRegistry
from gateway.events import EventLog
from gateway.guard import AuthGuard, GuardLimits
from gateway.metrics import AuthMetrics, EventMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingRegistry(DeviceRegistry):
    """The real registry, counting the slow checks that reach it (and on which thread)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.verified = 0
        self.threads: set[int] = set()

    def verify(self, device_id: str, password: bytes | None) -> bool:
        self.verified += 1
        self.threads.add(threading.get_ident())
        return super().verify(device_id, password)


def _guard(clock: Clock, **limits: Any) -> AuthGuard:
    registry = CollectorRegistry()
    return AuthGuard(
        AuthMetrics(registry), EventLog(EventMetrics(registry)), GuardLimits(**limits), clock
    )


async def _verdict(result: Any) -> str:
    return result if isinstance(result, str) else str(await result)


def test_secrets_are_checked_on_a_thread_and_remembered_both_ways(tmp_path: Path) -> None:
    registry = CountingRegistry(tmp_path)
    registry.add("dev1", "right")
    clock = Clock()
    g = _guard(clock)
    keys = ("id:dev1", "addr:10.0.0.1")

    async def main() -> list[str]:
        loop_thread = threading.get_ident()
        got = []
        for secret in (b"right", b"right", b"wrong", b"wrong", b"right"):
            got.append(await _verdict(g.check_device("mqtt", registry, "dev1", secret, keys)))
        assert loop_thread not in registry.threads
        return got

    assert asyncio.run(main()) == [guard.OK, guard.OK, guard.DENIED, guard.DENIED, guard.OK]
    assert registry.verified == 2  # one good secret, one wrong one: each checked once
    g.close()


def test_a_new_credential_voids_what_was_remembered_of_the_old_one(tmp_path: Path) -> None:
    registry = CountingRegistry(tmp_path)
    registry.add("dev1", "first")
    g = _guard(Clock())
    keys = ("id:dev1",)

    async def main() -> list[str]:
        got = [await _verdict(g.check_device("mqtt", registry, "dev1", b"first", keys))]
        got.append(await _verdict(g.check_device("mqtt", registry, "dev1", b"second", keys)))
        registry.remove("dev1")
        got.append(await _verdict(g.check_device("mqtt", registry, "dev1", b"first", keys)))
        registry.add("dev1", "second")
        got.append(await _verdict(g.check_device("mqtt", registry, "dev1", b"first", keys)))
        got.append(await _verdict(g.check_device("mqtt", registry, "dev1", b"second", keys)))
        return got

    assert asyncio.run(main()) == [
        guard.OK, guard.DENIED, guard.DENIED, guard.DENIED, guard.OK,
    ]
    g.close()


def test_failures_ban_a_key_for_twice_as_long_each_time(tmp_path: Path) -> None:
    registry = CountingRegistry(tmp_path)
    registry.add("dev1", "right")
    clock = Clock()
    g = _guard(clock, failures_before_ban=3, ban_seconds=10.0)
    keys = ("addr:10.0.0.9",)

    async def attempt(secret: bytes) -> str:
        return await _verdict(g.check_device("coap", registry, "dev1", secret, keys))

    async def main() -> None:
        for i in range(3):
            assert await attempt(b"guess-%d" % i) == guard.DENIED
        assert await attempt(b"guess-x") == guard.THROTTLED
        assert registry.verified == 3
        clock.now += 10.5  # the first ban ends
        for i in range(3):
            assert await attempt(b"again-%d" % i) == guard.DENIED
        clock.now += 10.5  # the second ban is 20 s: still on
        assert await attempt(b"later") == guard.THROTTLED
        clock.now += 10.0
        assert await attempt(b"right") == guard.OK

    asyncio.run(main())
    g.close()


def test_a_known_good_secret_passes_while_its_id_and_address_are_banned(tmp_path: Path) -> None:
    registry = CountingRegistry(tmp_path)
    registry.add("victim", "right")
    g = _guard(Clock(), failures_before_ban=2)
    keys = ("user:victim", "addr:10.0.0.1")

    async def main() -> None:
        assert await _verdict(g.check_device("mqtt", registry, "victim", b"right", keys)) == "ok"
        for i in range(2):
            await _verdict(g.check_device("mqtt", registry, "victim", b"x%d" % i, keys))
        assert await _verdict(
            g.check_device("mqtt", registry, "victim", b"x9", keys)
        ) == guard.THROTTLED
        assert await _verdict(g.check_device("mqtt", registry, "victim", b"right", keys)) == "ok"

    asyncio.run(main())
    g.close()


def test_unknown_devices_are_refused_without_a_slow_check(tmp_path: Path) -> None:
    registry = CountingRegistry(tmp_path)
    g = _guard(Clock(), failures_before_ban=2)

    async def main() -> list[str]:
        return [
            await _verdict(g.check_device("mqtt", registry, f"nobody-{i}", b"x", ("addr:a",)))
            for i in range(3)
        ]

    assert asyncio.run(main()) == [guard.DENIED, guard.DENIED, guard.THROTTLED]
    assert registry.verified == 0
    g.close()


def test_checks_beyond_the_pending_bound_are_refused_as_busy_at_once(tmp_path: Path) -> None:
    release = threading.Event()

    def slow() -> bool:
        release.wait(5)
        return False

    g = _guard(Clock(), workers=1, max_pending=3, failures_before_ban=1000)

    async def main() -> list[str]:
        results = [
            g.check("http", "token", f"t{i}", b"s", slow, (f"addr:{i}",)) for i in range(5)
        ]
        busy = [r for r in results if isinstance(r, str)]
        release.set()
        waited = [await r for r in results if not isinstance(r, str)]
        return busy + waited

    assert asyncio.run(main()) == [guard.BUSY, guard.BUSY] + [guard.DENIED] * 3
    g.close()


def test_an_unreadable_registry_is_unavailable_not_a_wrong_secret(tmp_path: Path) -> None:
    registry = CountingRegistry(tmp_path)
    registry.add("dev1", "right")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00garbage" * 4096)
    os.replace(garbage, tmp_path / "registry.sqlite")
    registry.db.reopen_if_replaced()  # what the gateway's sweep does
    g = _guard(Clock())

    async def main() -> str:
        return await _verdict(g.check_device("mqtt", registry, "dev1", b"right", ("id:dev1",)))

    assert asyncio.run(main()) == guard.UNAVAILABLE
    g.close()


@pytest.mark.parametrize("count", [1000])
def test_tracked_keys_are_bounded_and_evictions_counted(tmp_path: Path, count: int) -> None:
    g = _guard(Clock(), max_keys=100)
    registry = CountingRegistry(tmp_path)

    async def main() -> None:
        for i in range(count):
            await _verdict(g.check_device("mqtt", registry, "x", b"s", (f"addr:{i}",)))

    asyncio.run(main())
    assert len(g.throttle._keys) == 100
    assert g.metrics.forgotten_keys._value.get() == count - 100
    g.close()


def test_a_clean_first_login_goes_before_a_suspects_and_may_take_its_place() -> None:
    """The queue of slow checks is full of a guesser's attempts: a check from a key with no
    failures is run first, and takes the place of the most suspect waiting one (busy)."""
    gate = threading.Event()
    order: list[str] = []

    def verify(name: str) -> Any:
        def run() -> bool:
            gate.wait(5)
            order.append(name)
            return name == "clean"

        return run

    g = _guard(Clock(), workers=1, max_pending=3, max_pending_per_key=10, failures_before_ban=99)

    async def main() -> list[str]:
        for _i in range(3):  # the guesser's address has failures on record
            g.throttle.failed(["addr:evil"], 1000.0)
        blocker = g.check("mqtt", "device", "first", b"x", verify("first"), ("addr:evil",))
        await asyncio.sleep(0.05)  # the worker holds `first`
        suspects = [
            g.check("mqtt", "device", f"s{i}", b"x", verify(f"s{i}"), ("addr:evil",))
            for i in range(2)
        ]
        clean = g.check("mqtt", "device", "clean", b"x", verify("clean"), ("addr:good",))
        gate.set()
        return [await _verdict(r) for r in (blocker, *suspects, clean)]

    verdicts = asyncio.run(main())
    # Of equally suspect ones, the newest gives way (the older waited longer).
    assert verdicts == [guard.DENIED, guard.DENIED, guard.BUSY, guard.OK]
    assert order == ["first", "clean", "s0"]
    g.close()


def test_a_burst_of_one_secret_is_checked_once(tmp_path: Path) -> None:
    """A device's first requests arrive together (a CoAP window, a reconnect racing): they wait
    for one check of their secret, not one each."""
    registry = CountingRegistry(tmp_path)
    registry.add("dev1", "right")
    g = _guard(Clock(), max_pending_per_key=2)

    async def main() -> list[str]:
        keys = ("id:dev1", "addr:10.0.0.1")
        results = [g.check_device("coap", registry, "dev1", b"right", keys) for _ in range(20)]
        return [await _verdict(r) for r in results]

    assert asyncio.run(main()) == [guard.OK] * 20
    assert registry.verified == 1
    g.close()


def test_a_check_from_an_address_good_secrets_came_from_goes_first(tmp_path: Path) -> None:
    """At the onset of a flood from fresh addresses nothing has failed yet: a device from an
    address its fleet logs in from is still checked before them."""
    gate = threading.Event()
    order: list[str] = []

    def verify(name: str, ok: bool) -> Any:
        def run() -> bool:
            gate.wait(5)
            order.append(name)
            return ok

        return run

    g = _guard(Clock(), workers=1, max_pending=10, max_pending_per_key=10)

    async def main() -> None:
        await _verdict(g.check("mqtt", "device", "d0", b"x", verify("warm", True),
                               ("addr:fleet",)))
        order.clear()
        gate.clear()
        blocker = g.check("mqtt", "device", "d1", b"x", verify("first", True), ("addr:new-0",))
        await asyncio.sleep(0.05)  # the worker holds `first`
        fresh = [
            g.check("mqtt", "device", f"a{i}", b"x", verify(f"new-{i}", False),
                    (f"addr:new-{i}",))
            for i in range(1, 4)
        ]
        fleet = g.check("mqtt", "device", "d2", b"x", verify("fleet", True), ("addr:fleet",))
        gate.set()
        for r in (blocker, *fresh, fleet):
            await _verdict(r)

    gate.set()
    asyncio.run(main())
    assert order == ["first", "fleet", "new-1", "new-2", "new-3"]
    g.close()
