"""The shadow store contract, its metrics counters and the logic both stores share.

``ShadowStore`` is what the MQTT, CoAP and REST bindings call. All methods are coroutines:

* ``get(device) -> Shadow | None``: None when there is no shadow (or it was deleted).
* ``update(device, update_doc, *, writer, expected_version=None, context=None, seq=None,
  ts_ms=None) -> UpdateResult``: merge an AWS-style update document (see ``shadow.model`` for
  the rules). ``writer`` is the gateway node id or API client id the write is made under;
  ``expected_version`` is the CAS check (also taken from ``"version"`` in the body);
  ``context`` is the version vector the writer read; ``seq`` is a device report's sequence
  number; ``ts_ms`` defaults to the store's clock. Raises ``InvalidUpdate`` (400),
  ``ShadowTooLarge`` (413) or ``VersionConflict`` (409 / 412), which carries the current
  document.
* ``update_many(requests) -> list[UpdateResult | ShadowError]``: several updates in as few
  round trips as the store allows; each entry succeeds or fails on its own, in order.
* ``replace(device, doc, *, writer, expected_version=None, ts_ms=None) -> UpdateResult``: PUT,
  ``desired`` and ``reported`` become exactly the sections of ``doc``.
* ``delete(device, *, expected_version=None) -> int | None``: the version of the delete (the
  tombstone's; a re-created shadow continues after it), None when there was nothing to delete.
* ``changes_since(device, version) -> ChangeLog | None``: the change records after
  ``version``; ``complete=False`` means "send the whole document"; None when there is no shadow.
* ``list_devices(after=None, limit=100) -> list[str]``: device ids with a shadow, in code point
  order, strictly after ``after``: pass the last id of a page to get the next one.
* ``close()``.

Every store has ``stats`` (:class:`StoreStats`, counters for metrics) and ``limits``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import msgspec

from shadow.model import (
    DEFAULT_LIMITS,
    ChangeLog,
    InvalidUpdate,
    Limits,
    Shadow,
    ShadowError,
    UpdateResult,
    VersionConflict,
    apply_delete,
    apply_replace,
    apply_update,
    check_id,
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class UpdateRequest(msgspec.Struct, frozen=True):
    """One entry of ``update_many``: the arguments of ``update``."""

    device: str
    update: Mapping[str, object]
    writer: str
    expected_version: int | None = None
    context: Mapping[str, int] | None = None
    seq: int | None = None
    ts_ms: int | None = None


@dataclass(slots=True)
class StoreStats:
    """Counters since the store was opened (this process only); the metrics module exports them.

    ``writes``: accepted updates, replaces and deletes. ``conflicts``: writes refused by CAS
    (VersionConflict). ``concurrent_writes``: accepted writes whose context did not dominate
    the stored version vector. ``conflicting_fields``: fields such writes hit that a concurrent
    write had also set (resolved by the rule in ``shadow.model``). ``stale_fields_dropped``:
    reported fields not applied because a newer ``seq`` was already there. ``cas_retries``:
    optimistic writes redone because the document changed under them (Redis). ``invalid``:
    writes refused as malformed or too large.
    """

    writes: int = 0
    conflicts: int = 0
    concurrent_writes: int = 0
    conflicting_fields: int = 0
    stale_fields_dropped: int = 0
    cas_retries: int = 0
    invalid: int = 0

    def record(self, outcomes: Iterable[UpdateResult | ShadowError]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, UpdateResult):
                self.writes += 1
                if outcome.concurrent:
                    self.concurrent_writes += 1
                    self.conflicting_fields += len(outcome.conflicting_fields)
                if outcome.suppressed_fields:
                    self.stale_fields_dropped += len(outcome.suppressed_fields)
            elif isinstance(outcome, VersionConflict):
                self.conflicts += 1
            else:
                self.invalid += 1


class ShadowStore(Protocol):
    stats: StoreStats
    limits: Limits

    async def get(self, device: str) -> Shadow | None: ...

    async def update(
        self,
        device: str,
        update_doc: Mapping[str, object],
        *,
        writer: str,
        expected_version: int | None = None,
        context: Mapping[str, int] | None = None,
        seq: int | None = None,
        ts_ms: int | None = None,
    ) -> UpdateResult: ...

    async def update_many(
        self, requests: Sequence[UpdateRequest]
    ) -> list[UpdateResult | ShadowError]: ...

    async def replace(
        self,
        device: str,
        doc: Mapping[str, object],
        *,
        writer: str,
        expected_version: int | None = None,
        ts_ms: int | None = None,
    ) -> UpdateResult: ...

    async def delete(
        self, device: str, *, expected_version: int | None = None
    ) -> int | None: ...

    async def changes_since(self, device: str, version: int) -> ChangeLog | None: ...

    async def list_devices(self, after: str | None = None, limit: int = 100) -> list[str]: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- shared logic


@dataclass(slots=True)
class Tombstone:
    """What a delete stores: the tombstone, and no change record (it clears the history)."""

    shadow: Shadow
    change: None = None


# What a store persists for one mutation: ``shadow``, the new document, and ``change``, its
# change record (None: clear the history). An update or replace stores its result as is.
Write = UpdateResult | Tombstone
# Reads the stored shadow (None: none) and returns what to write, None for "nothing to
# write", or raises ShadowError. Pure, so an optimistic store may call it again on a retry.
Mutation = Callable[[Shadow | None], Write | None]
# What ``_write_many`` reports per item: the write, None (nothing written) or the refusal.
Outcome = Write | ShadowError | None


class BaseShadowStore(ABC):
    """Implements the public API on top of one primitive, ``_write_many``: atomically, for
    each (device, mutation), read the shadow, call the mutation and store its result."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.stats = StoreStats()

    @abstractmethod
    def _write_many(self, items: Sequence[tuple[str, Mutation]]) -> Awaitable[list[Outcome]]:
        """A coroutine, or (Redis) the future of a queued batch: one level less to resume."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abstractmethod
    async def get(self, device: str) -> Shadow | None: ...

    @abstractmethod
    async def changes_since(self, device: str, version: int) -> ChangeLog | None: ...

    @abstractmethod
    async def list_devices(self, after: str | None = None, limit: int = 100) -> list[str]: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def update(
        self,
        device: str,
        update_doc: Mapping[str, object],
        *,
        writer: str,
        expected_version: int | None = None,
        context: Mapping[str, int] | None = None,
        seq: int | None = None,
        ts_ms: int | None = None,
    ) -> UpdateResult:
        request = UpdateRequest(device, update_doc, writer, expected_version, context, seq, ts_ms)
        (outcome,) = await self._results(self._updates([request]))
        if isinstance(outcome, ShadowError):
            raise outcome
        return outcome

    async def update_many(
        self, requests: Sequence[UpdateRequest]
    ) -> list[UpdateResult | ShadowError]:
        return await self._results(self._updates(requests))

    def _updates(self, requests: Sequence[UpdateRequest]) -> list[tuple[str, Mutation]]:
        now = now_ms()  # one clock reading for the requests of one call

        def mutation(r: UpdateRequest) -> Mutation:
            ts_ms = r.ts_ms if r.ts_ms is not None else now

            def mutate(current: Shadow | None) -> UpdateResult:
                return apply_update(
                    current,
                    r.update,
                    writer=r.writer,
                    ts_ms=ts_ms,
                    expected_version=r.expected_version,
                    context=r.context,
                    seq=r.seq,
                    limits=self.limits,
                )

            return mutate

        return [(r.device, mutation(r)) for r in requests]

    async def replace(
        self,
        device: str,
        doc: Mapping[str, object],
        *,
        writer: str,
        expected_version: int | None = None,
        ts_ms: int | None = None,
    ) -> UpdateResult:
        ts = ts_ms if ts_ms is not None else now_ms()

        def mutate(current: Shadow | None) -> UpdateResult:
            return apply_replace(
                current,
                doc,
                writer=writer,
                ts_ms=ts,
                expected_version=expected_version,
                limits=self.limits,
            )

        (outcome,) = await self._results([(device, mutate)])
        if isinstance(outcome, ShadowError):
            raise outcome
        return outcome

    async def delete(self, device: str, *, expected_version: int | None = None) -> int | None:
        """The version the delete was given (the tombstone's), or None: nothing to delete."""
        ts = now_ms()

        def mutate(current: Shadow | None) -> Write | None:
            tombstone = apply_delete(current, expected_version=expected_version, ts_ms=ts)
            return None if tombstone is None else Tombstone(tombstone)

        check_id(device, "device id", self.limits)
        (outcome,) = await self._write_many([(device, mutate)])
        if isinstance(outcome, ShadowError):
            self.stats.record([outcome])
            raise outcome
        if outcome is None:
            return None
        self.stats.writes += 1
        return outcome.shadow.version

    async def _results(
        self, items: Sequence[tuple[str, Mutation]]
    ) -> list[UpdateResult | ShadowError]:
        """Runs update/replace mutations; invalid device ids fail without reaching the store."""
        out: list[UpdateResult | ShadowError | None] = [None] * len(items)
        valid: list[int] = []
        for i, (device, _) in enumerate(items):
            try:
                check_id(device, "device id", self.limits)
                valid.append(i)
            except InvalidUpdate as exc:
                out[i] = exc
        written = await self._write_many([items[i] for i in valid]) if valid else []
        for i, w in zip(valid, written, strict=True):
            assert isinstance(w, (UpdateResult, ShadowError))  # what updates and replaces give
            out[i] = w
        results: list[UpdateResult | ShadowError] = out  # type: ignore[assignment]  # all set
        self.stats.record(results)
        return results
