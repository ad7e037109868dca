"""``RedisShadowStore``: shadows in Redis, shared by every gateway node.

Keys (``prefix`` defaults to ``iotgw``), hash-tagged by device so that a shadow and its history
live in one slot and the store runs on Redis Cluster:

* ``{prefix}:shadow:{<device>}``: a hash with ``v`` (version), ``d`` ("1" for a tombstone)
  and ``doc`` (``Shadow.to_json()``);
* ``{prefix}:shadow:{<device>}:changes``: a list of the last ``limits.history`` change records;
* ``{prefix}:shadows``: a sorted set of device ids (all scores 0, read by lex range) for
  ``list_devices``. It cannot share a slot with every device, so it is updated next to the
  write rather than inside the script (see below).

``{``, ``}`` and ``%`` in device ids are percent-encoded inside the tag, so every id maps to
exactly one, well-formed tag.

Why optimistic CAS and not a server-side merge
----------------------------------------------
The merge (JSON merge patch, per-leaf version-vector conflicts, seq suppression, limits) is
the subtle part of the shadow. Writing it a second time in Lua would give two implementations
to keep identical. So the store reads the document (one round trip), merges in Python with
``shadow.model`` (shared with the SQLite store), and writes with a small Lua script (one round
trip) that sets the document only if the stored version is still the one that was read, then
appends the change record and trims the history, atomically. If the version moved, the write
is redone from a fresh read (``stats.cas_retries``); a write that named ``expected_version``
then fails with ``VersionConflict`` carrying the fresh document. Nothing is lost: the only way
to change a document is the compare-and-set. This costs two round trips per write. Under
contention on one device it costs retries, but shadows are written by one device and a few
apps, so contention is rare and short. ``update_many`` batches both round trips over any
number of devices: one pipeline of reads, one pipeline of compare-and-sets.

The script is sent with EVALSHA (its SHA-1 is computed locally). After a ``NOSCRIPT`` reply
(the server restarted, or ran ``SCRIPT FLUSH``) it is loaded once with ``SCRIPT LOAD`` and the
affected writes are sent again.

The device index: creating writes add the id with ``ZADD`` in the same pipeline as the
compare-and-set. A delete removes the id after its script succeeded, then checks that the
shadow was not re-created meanwhile and adds it back if it was, so a live shadow is never
missing from the index. ``list_devices`` skips ids whose shadow is gone, for example after a
creating write lost its compare-and-set to a delete.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from shadow.model import (
    DEFAULT_LIMITS,
    ChangeLog,
    ChangeRecord,
    Limits,
    Shadow,
    ShadowError,
    VersionConflict,
    select_changes,
)
from shadow.store import BaseShadowStore, Mutation, Outcome, Write

# KEYS[1] shadow hash, KEYS[2] its change list.
# ARGV: [1] version the caller read (0: none), [2] new version, [3] "1" for a tombstone,
#       [4] document, [5] change record ("" clears the history), [6] history length.
# Returns -1 when written, else the stored version (the caller read a stale document).
_CAS_SCRIPT = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if stored ~= tonumber(ARGV[1]) then
  return stored
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3], 'doc', ARGV[4])
if ARGV[5] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('RPUSH', KEYS[2], ARGV[5])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[6]), -1)
end
return -1
"""
_CAS_SHA = hashlib.sha1(_CAS_SCRIPT.encode()).hexdigest()


def _tag(device: str) -> str:
    return device.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


class RedisShadowStore(BaseShadowStore):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "iotgw",
        limits: Limits = DEFAULT_LIMITS,
        max_cas_retries: int = 100,
    ) -> None:
        """``url``: ``redis://host:port/db`` or just ``host:port``."""
        super().__init__(limits)
        self.prefix = prefix
        self.max_cas_retries = max_cas_retries
        self._redis: Redis = Redis.from_url(url if "://" in url else f"redis://{url}")
        self._index = f"{prefix}:shadows"

    def _key(self, device: str) -> str:
        return f"{self.prefix}:shadow:{{{_tag(device)}}}"

    async def _read(self, device: str) -> Shadow | None:
        raw = await self._redis.hget(self._key(device), "doc")
        return Shadow.from_json(raw) if raw is not None else None

    # -- writes

    async def _write_many(self, items: Sequence[tuple[str, Mutation]]) -> list[Outcome]:
        out: list[Outcome] = [None] * len(items)
        retries = [0] * len(items)
        pending = list(range(len(items)))
        while pending:
            # round trip 1: read every pending document
            pipe = self._redis.pipeline(transaction=False)
            for i in pending:
                pipe.hget(self._key(items[i][0]), "doc")
            raws = await pipe.execute()

            # merge in Python, outside any lock
            cas: list[tuple[int, int, bool, Write]] = []  # index, version read, creates, write
            for i, raw in zip(pending, raws, strict=True):
                current = Shadow.from_json(raw) if raw is not None else None
                try:
                    w = items[i][1](current)
                except ShadowError as exc:
                    out[i] = exc
                    continue
                out[i] = w
                if w is not None:
                    w.retries = retries[i]
                    base = current.version if current is not None else 0
                    creates = current is None or current.deleted
                    cas.append((i, base, creates, w))

            # round trip 2: compare-and-set them all
            stale = await self._compare_and_set(items, cas)
            pending = []
            for i in stale:
                retries[i] += 1
                self.stats.cas_retries += 1
                if retries[i] > self.max_cas_retries:
                    current = await self._read(items[i][0])
                    out[i] = VersionConflict(
                        f"gave up after {self.max_cas_retries} concurrent modifications",
                        current if current is not None and not current.deleted else None,
                        current.version if current is not None else 0,
                    )
                else:
                    pending.append(i)

        await self._unindex_deleted(items, out)
        return out

    async def _compare_and_set(
        self, items: Sequence[tuple[str, Mutation]], cas: list[tuple[int, int, bool, Write]]
    ) -> list[int]:
        """Sends the writes; returns the indexes whose document changed since it was read."""
        stale: list[int] = []
        todo = cas
        for _ in range(2):  # a second pass only after NOSCRIPT
            if not todo:
                break
            pipe = self._redis.pipeline(transaction=False)
            slots: list[int] = []  # position in the replies of each EVALSHA
            for i, base, creates, w in todo:
                key = self._key(items[i][0])
                slots.append(len(pipe))
                pipe.evalsha(
                    _CAS_SHA, 2, key, f"{key}:changes",
                    base, w.shadow.version, int(w.shadow.deleted), w.shadow.to_json(),
                    w.change_json or "", self.limits.history,
                )  # fmt: skip
                if creates and not w.shadow.deleted:
                    pipe.zadd(self._index, {items[i][0]: 0})
            replies = await pipe.execute(raise_on_error=False)
            missing: list[tuple[int, int, bool, Write]] = []
            for entry, slot in zip(todo, slots, strict=True):
                reply = replies[slot]
                if isinstance(reply, NoScriptError):
                    missing.append(entry)
                elif isinstance(reply, Exception):
                    raise reply
                elif int(reply) != -1:
                    stale.append(entry[0])
            if missing:
                await self._redis.script_load(_CAS_SCRIPT)
            todo = missing
        if todo:
            raise RuntimeError("the Redis server keeps forgetting the shadow CAS script")
        return stale

    async def _unindex_deleted(
        self, items: Sequence[tuple[str, Mutation]], out: list[Outcome]
    ) -> None:
        deleted = [
            items[i][0] for i, w in enumerate(out) if isinstance(w, Write) and w.shadow.deleted
        ]
        if not deleted:
            return
        pipe = self._redis.pipeline(transaction=False)
        for device in deleted:
            pipe.zrem(self._index, device)
            pipe.hget(self._key(device), "d")  # read after the ZREM: re-created meanwhile?
        replies = await pipe.execute()
        recreated = {d: 0 for d, flag in zip(deleted, replies[1::2], strict=True) if flag == b"0"}
        if recreated:
            await self._redis.zadd(self._index, recreated)

    # -- reads

    async def get(self, device: str) -> Shadow | None:
        shadow = await self._read(device)
        return None if shadow is None or shadow.deleted else shadow

    async def changes_since(self, device: str, version: int) -> ChangeLog | None:
        key = self._key(device)
        pipe = self._redis.pipeline(transaction=True)  # one slot: MULTI works on a cluster too
        pipe.hget(key, "doc")
        pipe.lrange(f"{key}:changes", 0, -1)
        raw, rows = await pipe.execute()
        if raw is None:
            return None
        shadow = Shadow.from_json(raw)
        if shadow.deleted:
            return None
        records = [ChangeRecord.from_json(r) for r in rows]
        return select_changes(shadow.version, records, version)

    async def list_devices(self, after: str | None = None, limit: int = 100) -> list[str]:
        out: list[str] = []
        start: bytes = b"(" + after.encode() if after is not None else b"-"
        while len(out) < limit:
            want = limit - len(out)
            batch: list[Any] = await self._redis.zrangebylex(self._index, start, "+", 0, want)
            if not batch:
                break
            devices = [b.decode() for b in batch]
            pipe = self._redis.pipeline(transaction=False)
            for device in devices:
                pipe.hget(self._key(device), "d")
            flags: list[Any] = await pipe.execute()
            out.extend(d for d, flag in zip(devices, flags, strict=True) if flag == b"0")
            start = b"(" + batch[-1]
        return out

    async def close(self) -> None:
        await self._redis.aclose()
