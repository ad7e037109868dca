"""``SqliteShadowStore``: the embedded default store, one SQLite file in WAL mode.

The event loop never touches SQLite. One dedicated thread (a single-worker executor) owns the
connection and runs every statement, so calls from many tasks are queued, not interleaved.

A write is one ``BEGIN IMMEDIATE`` transaction: read the document, apply ``shadow.model``,
write the document, append the change record, trim the history. ``BEGIN IMMEDIATE`` takes
the database's write lock before the read, so a write in another process, or through another
store instance on the same file, waits (``busy_timeout``) instead of interleaving: CAS and
version vectors stay exact across processes, and no retries are needed. ``update_many``
applies the whole batch in one transaction (one commit). Each entry still succeeds or fails
on its own, because a refused entry writes nothing.

Schema: ``shadows(device PRIMARY KEY, version, deleted, doc)``, where ``doc`` is
``Shadow.to_json()`` and deleted rows are tombstones that keep the version numbering, and
``changes(device, version, record)``, which keeps the last ``limits.history`` records per
device.

``synchronous=NORMAL`` (the default) is durable across process crashes in WAL mode; a power
loss can lose the last commits but never corrupts the file. Pass ``synchronous="FULL"`` to
sync on every commit.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from shadow.model import (
    DEFAULT_LIMITS,
    ChangeLog,
    ChangeRecord,
    Limits,
    Shadow,
    ShadowError,
    select_changes,
)
from shadow.store import BaseShadowStore, Mutation, Outcome, Write

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shadows (
    device TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    doc TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    device TEXT NOT NULL,
    version INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (device, version)
) WITHOUT ROWID;
"""


class SqliteShadowStore(BaseShadowStore):
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        limits: Limits = DEFAULT_LIMITS,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(limits)
        self.path = os.fspath(path)
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow-sqlite")
        self._conn: sqlite3.Connection | None = None  # only ever used on the executor thread
        self._closed = False

    # -- plumbing (everything below _run executes on the store's thread)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the shadow store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._open()
        return fn(self._conn)

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        deadline = time.monotonic() + self._busy_timeout_s
        try:
            while True:
                # Switching a new file to WAL while another process opens it too can fail with
                # "database is locked" at once, without SQLite's busy handler: retry it here.
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute(f"PRAGMA synchronous={self._synchronous}")
                    conn.executescript(_SCHEMA)
                    return conn
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _read(conn: sqlite3.Connection, device: str) -> Shadow | None:
        row = conn.execute("SELECT doc FROM shadows WHERE device = ?", (device,)).fetchone()
        return Shadow.from_json(row[0]) if row else None

    def _persist(self, conn: sqlite3.Connection, device: str, w: Write) -> None:
        s = w.shadow
        conn.execute(
            "INSERT INTO shadows (device, version, deleted, doc) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (device) DO UPDATE SET"
            " version = excluded.version, deleted = excluded.deleted, doc = excluded.doc",
            (device, s.version, int(s.deleted), s.to_json()),
        )
        if w.change is None:
            conn.execute("DELETE FROM changes WHERE device = ?", (device,))
            return
        conn.execute(
            "INSERT INTO changes (device, version, record) VALUES (?, ?, ?)",
            (device, s.version, w.change.to_json()),
        )
        conn.execute(
            "DELETE FROM changes WHERE device = ? AND version <= ?",
            (device, s.version - self.limits.history),
        )

    # -- the store

    async def _write_many(self, items: Sequence[tuple[str, Mutation]]) -> list[Outcome]:
        def txn(conn: sqlite3.Connection) -> list[Outcome]:
            out: list[Outcome] = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                for device, mutate in items:
                    try:
                        w = mutate(self._read(conn, device))
                    except ShadowError as exc:
                        out.append(exc)  # nothing written for this entry
                        continue
                    if w is not None:
                        self._persist(conn, device, w)
                    out.append(w)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return out

        return await self._run(txn)

    async def get(self, device: str) -> Shadow | None:
        shadow = await self._run(lambda conn: self._read(conn, device))
        return None if shadow is None or shadow.deleted else shadow

    async def changes_since(self, device: str, version: int) -> ChangeLog | None:
        def read(conn: sqlite3.Connection) -> ChangeLog | None:
            conn.execute("BEGIN")  # one snapshot for the document and its history
            try:
                shadow = self._read(conn, device)
                if shadow is None or shadow.deleted:
                    return None
                # Nothing is newer than the shadow: bounding `version` by its version also keeps
                # any integer a client sends inside SQLite's 64-bit range.
                rows = conn.execute(
                    "SELECT record FROM changes WHERE device = ? AND version > ? ORDER BY version",
                    (device, min(version, shadow.version)),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            records = [ChangeRecord.from_json(r[0]) for r in rows]
            return select_changes(shadow.version, records, version)

        return await self._run(read)

    async def list_devices(self, after: str | None = None, limit: int = 100) -> list[str]:
        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT device FROM shadows WHERE deleted = 0 AND device > ?"
                " ORDER BY device LIMIT ?",
                (after or "", limit),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._run(read)

    async def close(self) -> None:
        if self._closed:
            return

        def shut(conn: sqlite3.Connection) -> None:
            conn.close()

        if self._conn is not None:
            await self._run(shut)
        self._closed = True
        self._executor.shutdown(wait=False)
