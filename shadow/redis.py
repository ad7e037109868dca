"""``RedisShadowStore``: shadows in Redis, shared by every gateway node.

Keys (``prefix`` defaults to ``iotgw``), hash-tagged by device so that a shadow and its history
live in one slot and the store runs on Redis Cluster:

* ``{prefix}:shadow:{<device>}``: a hash with ``v`` (version), ``d`` ("1" for a tombstone),
  ``t`` (a token unique to the write that stored it) and ``doc`` (``Shadow.to_bytes()``:
  msgpack; documents stored as ``Shadow.to_json()`` by earlier versions are still read);
* ``{prefix}:shadow:{<device>}:changes``: a list of the last ``limits.history`` change records
  (``ChangeRecord.to_bytes()``, or JSON from earlier versions);
* ``{prefix}:shadows``: a sorted set of device ids (all scores 0, read by lex range) for
  ``list_devices``. It cannot share a slot with every device, so it is updated next to the
  write rather than inside the script (see below).

``{``, ``}`` and ``%`` in device ids are percent-encoded inside the tag, so every id maps to
exactly one, well-formed tag.

Why optimistic CAS and not a server-side merge
----------------------------------------------
The merge (JSON merge patch, per-leaf version-vector conflicts, seq suppression, limits) is
the subtle part of the shadow. Writing it a second time in Lua would give two implementations
to keep identical, and Lua cannot even hold the same values (it has no integer/float
distinction, no key order, no 64-bit integers, and cannot reproduce Python's float text, which
the size limit measures). It would also move the merge's CPU time into the one Redis process
that every gateway node shares. So the store merges in Python with ``shadow.model`` (shared
with the SQLite store) and writes with a small Lua script that sets the document only if the
stored write token is still the one the merge started from, then appends the
change record and trims the history, atomically. If they moved, the script answers with the
stored document instead, and the write is redone on it. Nothing is lost: the only way to
change a document is the compare-and-set.

One round trip per write, usually
---------------------------------
The store remembers the last document it wrote or read per device (``cache_size`` devices,
least recently used dropped first; about 2 KB each for a small shadow, up to ~50 KB at the
size limit) with its token, and merges on that without reading. A device's shadow is mostly
written through the node that holds its connection, so the remembered document is usually
current; when it is not (another node wrote), the compare-and-set fails and returns the
current document, and the write is redone on it: the same two round trips as reading first.
A device the store does not remember is read first. The token, unique to each write (a random
prefix per store and a counter), is what the compare-and-set compares, not the version: a
version number can come back with different content (a flushed or failed-over Redis), a token
cannot. Every write makes version + 1 of the document it started from, so the script stores
``v`` itself. An outcome that does not write (a refusal such as a stale
``expected_version``, or a delete of nothing) is only final when it was computed on a document
just read from Redis; computed on a remembered one, the document is read and the mutation run
again. ``stats.cas_retries`` counts only writes redone on a document that had been read from
Redis, not stale remembered ones.

Batching: each call queues its writes and every call made in the same event-loop turn goes
out together: one pipeline of compare-and-sets (plus the reads that are needed) over any
number of devices, so concurrent ``update`` calls share round trips as ``update_many`` does.
Two writes to the same device in one batch go out in successive rounds, in order. The write
path talks RESP directly (the store packs its compare-and-set commands, ``hiredis`` the others
and parses the replies, on connections of its own); reads other than the document use the
``redis`` client.

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

import asyncio
import functools
import hashlib
import itertools
import os
from collections.abc import Sequence
from typing import Any

import hiredis
import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shadow import resp
from shadow.model import (
    DEFAULT_LIMITS,
    ChangeLog,
    ChangeRecord,
    Limits,
    Shadow,
    ShadowError,
    UpdateResult,
    VersionConflict,
    select_changes,
)
from shadow.store import BaseShadowStore, Mutation, Outcome, Write

# KEYS[1] shadow hash, KEYS[2] its change list.
# ARGV: [1] token of the document the merge started from ("": none), [2] new token, [3] "1"
#       for a tombstone, [4] document, [5] change record ("" clears the history), [6] history
#       length. The new version is the stored one + 1, as every write makes it.
# Returns 1 when written, else {stored document or nil, its token or nil}.
_CAS_SCRIPT = """
local cur = redis.call('HMGET', KEYS[1], 'v', 't')
if (cur[2] or '') ~= ARGV[1] then
  return {redis.call('HGET', KEYS[1], 'doc'), cur[2]}
end
redis.call('HSET', KEYS[1], 'v', (tonumber(cur[1]) or 0) + 1, 'd', ARGV[3], 't', ARGV[2],
           'doc', ARGV[4])
if ARGV[5] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('RPUSH', KEYS[2], ARGV[5])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[6]), -1)
end
return 1
"""
_CAS_SHA = hashlib.sha1(_CAS_SCRIPT.encode()).hexdigest()
# EVALSHA of the script with 2 keys and 6 arguments, up to the first key: packed here rather
# than by hiredis (half the cost, the write path's largest after the merge).
_CAS_HEAD = b"*11\r\n" + resp.pack("EVALSHA", _CAS_SHA, 2)[len(b"*3\r\n") :]
# Queued writes go out at the end of the event-loop turn, or as soon as this many are queued
# (so that big batches do not wait, and several pipelines can be in flight at once).
_BATCH = 64


# one compare-and-set: item index, the document the merge started from and its token (as a
# RESP argument, see _token_arg), whether that document was just read from Redis (rather than
# remembered), the write
_Cas = tuple[int, Shadow | None, bytes, bool, Write]


def _tag(device: str) -> str:
    return device.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


@functools.lru_cache(maxsize=1 << 16)
def _keys(prefix: str, device: str) -> tuple[bytes, bytes]:
    """The device's shadow and change-list keys."""
    key = f"{prefix}:shadow:{{{_tag(device)}}}"
    return key.encode(), f"{key}:changes".encode()


@functools.lru_cache(maxsize=1 << 16)
def _cas_head(prefix: str, device: str) -> bytes:
    """The device's EVALSHA of the compare-and-set script, up to the script's arguments."""
    key, changes = _keys(prefix, device)
    return _CAS_HEAD + b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(key), key, len(changes), changes)


def _token_arg(token: bytes | None) -> bytes:
    """A write token as a RESP argument (the store keeps tokens in this form: each is sent
    once as the new token and then as the base of the next write); None: no document."""
    token = token or b""
    return b"$%d\r\n%b\r\n" % (len(token), token)


def _decode(raw: bytes | None) -> Shadow | None:
    return Shadow.from_bytes(raw) if raw is not None else None


class RedisShadowStore(BaseShadowStore):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "iotgw",
        limits: Limits = DEFAULT_LIMITS,
        max_cas_retries: int = 100,
        cache_size: int = 10_000,
    ) -> None:
        """``url``: ``redis://host:port/db`` (or ``rediss://``, ``unix://``) or just
        ``host:port``. ``cache_size``: how many devices' last documents to remember (0: read
        before every write)."""
        super().__init__(limits)
        self.prefix = prefix
        self.max_cas_retries = max_cas_retries
        self.cache_size = cache_size
        self._redis: Redis = Redis.from_url(url if "://" in url else f"redis://{url}")
        self._pipe = resp.Pipe(self._redis)
        self._index = f"{prefix}:shadows"
        # device -> (document, its token as a RESP argument)
        self._cache: dict[str, tuple[Shadow, bytes]] = {}
        # write tokens: this store's random prefix and a counter, all 29 bytes long
        self._token_head = b"$29\r\n%b." % os.urandom(6).hex().encode()
        self._counter = itertools.count()
        self._queue: list[tuple[Sequence[tuple[str, Mutation]], asyncio.Future[list[Outcome]]]]
        self._queue = []
        self._queued = 0  # writes in the queue
        self._flushes: set[asyncio.Task[None]] = set()

    def _key(self, device: str) -> bytes:
        return _keys(self.prefix, device)[0]

    def _remember(self, device: str, shadow: Shadow | None, token: bytes) -> None:
        cache = self._cache
        cache.pop(device, None)
        if shadow is None or self.cache_size <= 0:
            return
        cache[device] = (shadow, token)
        if len(cache) > self.cache_size:
            del cache[next(iter(cache))]

    async def _read_many(self, devices: Sequence[str]) -> list[tuple[Shadow | None, bytes]]:
        commands = [resp.pack("HMGET", self._key(d), "doc", "t") for d in devices]
        replies = await self._pipe.execute(commands)
        out: list[tuple[Shadow | None, bytes]] = []
        for device, reply in zip(devices, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
            shadow, token = _decode(reply[0]), _token_arg(reply[1])
            self._remember(device, shadow, token)
            out.append((shadow, token))
        return out

    # -- writes: every call of one event-loop turn goes out together

    def _write_many(self, items: Sequence[tuple[str, Mutation]]) -> asyncio.Future[list[Outcome]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Outcome]] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((items, future))
        self._queued += len(items)
        if self._queued >= _BATCH:
            self._flush()
        return future

    def _flush(self) -> None:
        if not self._queue:
            return
        queue, self._queue, self._queued = self._queue, [], 0
        task = asyncio.ensure_future(self._write_queued(queue))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _write_queued(
        self, queue: list[tuple[Sequence[tuple[str, Mutation]], asyncio.Future[list[Outcome]]]]
    ) -> None:
        try:
            outcomes = await self._write_now([item for items, _ in queue for item in items])
        except BaseException as exc:
            for _, future in queue:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for items, future in queue:
            if not future.done():
                future.set_result(outcomes[start : start + len(items)])
            start += len(items)

    async def _write_now(self, items: Sequence[tuple[str, Mutation]]) -> list[Outcome]:
        out: list[Outcome] = [None] * len(items)
        retries: dict[int, int] = {}  # per item redone on a document read from Redis
        fresh: dict[int, tuple[Shadow | None, bytes]] = {}  # just read from Redis, per item
        pending = list(range(len(items)))
        while pending:
            later: list[int] = []
            devices: set[str] = set()
            bases: dict[int, tuple[Shadow | None, bytes, bool]] = {}  # document, token, read?
            unknown: list[int] = []
            for i in pending:
                device = items[i][0]
                if device in devices:  # one write per device per round, in order
                    later.append(i)
                    continue
                devices.add(device)
                if i in fresh:
                    bases[i] = (*fresh.pop(i), True)
                elif (known := self._cache.get(device)) is not None:
                    bases[i] = (*known, False)
                else:
                    unknown.append(i)
            if unknown:
                docs = await self._read_many([items[i][0] for i in unknown])
                for i, (shadow, token) in zip(unknown, docs, strict=True):
                    bases[i] = (shadow, token, True)
            cas: list[_Cas] = []
            for i, (current, token, was_read) in bases.items():
                try:
                    w: Outcome = items[i][1](current)
                except ShadowError as exc:
                    w = exc
                if isinstance(w, Write):
                    out[i] = w
                    cas.append((i, current, token, was_read, w))
                elif was_read:
                    out[i] = w
                else:  # refused, or nothing to write, on a remembered document: read, decide again
                    self._cache.pop(items[i][0], None)
                    later.append(i)
            for i, stored, token, was_read in await self._compare_and_set(items, cas):
                if not was_read:
                    fresh[i] = (stored, token)  # the remembered document was stale: no retry
                    later.append(i)
                    continue
                retries[i] = retries.get(i, 0) + 1
                self.stats.cas_retries += 1
                if retries[i] > self.max_cas_retries:
                    out[i] = VersionConflict(
                        f"gave up after {self.max_cas_retries} concurrent modifications",
                        stored if stored is not None and not stored.deleted else None,
                        stored.version if stored is not None else 0,
                    )
                else:
                    fresh[i] = (stored, token)
                    later.append(i)
            pending = sorted(later)

        for i, n in retries.items():
            if isinstance(w := out[i], UpdateResult):
                out[i] = msgspec.structs.replace(w, cas_retries=n)
        await self._unindex_deleted(items, out)
        return out

    async def _compare_and_set(
        self, items: Sequence[tuple[str, Mutation]], cas: list[_Cas]
    ) -> list[tuple[int, Shadow | None, bytes, bool]]:
        """Sends the writes. Returns, for each whose document moved since it was read or
        remembered: its index, the stored document and token, and whether it had been read."""
        stale: list[tuple[int, Shadow | None, bytes, bool]] = []
        todo = cas
        history = resp.pack(self.limits.history)[len(b"*1\r\n") :]  # one bulk string
        for _ in range(2):  # a second pass only after NOSCRIPT
            if not todo:
                break
            commands: list[bytes] = []
            tokens: list[bytes] = []  # per write, its new token
            index: list[bytes] = []  # ZADDs of the shadows created (or created anew)
            for i, base, token, _, w in todo:
                device = items[i][0]
                new_token = b"%b%016x\r\n" % (self._token_head, next(self._counter))
                s = w.shadow
                doc = s.to_bytes()
                change = w.change.to_bytes() if w.change is not None else b""
                tokens.append(new_token)
                commands.append(
                    b"%b%b%b$1\r\n%d\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b"
                    % (_cas_head(self.prefix, device), token, new_token, s.deleted, len(doc), doc,
                       len(change), change, history)
                )  # fmt: skip
                if (base is None or base.deleted) and not s.deleted:
                    index.append(resp.pack("ZADD", self._index, 0, device))
            replies = await self._pipe.execute(commands + index)
            missing: list[_Cas] = []
            for entry, new_token, reply in zip(todo, tokens, replies[: len(todo)], strict=True):
                i, _, _, was_read, w = entry
                if reply == 1:
                    self._remember(items[i][0], w.shadow, new_token)
                elif isinstance(reply, list):
                    stored = _decode(reply[0])
                    token = _token_arg(reply[1])
                    self._remember(items[i][0], stored, token)
                    stale.append((i, stored, token, was_read))
                elif isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                    missing.append(entry)
                else:
                    raise ResponseError(str(reply))
            for reply in replies[len(todo) :]:  # the ZADDs
                if isinstance(reply, hiredis.ReplyError):
                    raise ResponseError(str(reply))
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
        ((shadow, _),) = await self._read_many([device])
        return None if shadow is None or shadow.deleted else shadow

    async def changes_since(self, device: str, version: int) -> ChangeLog | None:
        key, changes = _keys(self.prefix, device)
        pipe = self._redis.pipeline(transaction=True)  # one slot: MULTI works on a cluster too
        pipe.hget(key, "doc")
        pipe.lrange(changes, 0, -1)
        raw, rows = await pipe.execute()
        if raw is None:
            return None
        shadow = Shadow.from_bytes(raw)
        if shadow.deleted:
            return None
        records = [ChangeRecord.from_bytes(r) for r in rows]
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
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        self._pipe.close()
        await self._redis.aclose()
