"""What must survive a restart: persistent sessions (subscriptions, queued and in-flight QoS 1/2
messages, incoming QoS 2 ids, expiry) and retained messages, in one SQLite database in the
state dir (`mqtt-state.sqlite`).

Saves are incremental. A session notes itself in the broker's change log when its saved state
is reached (session.py), the broker notes retained topics set or deleted and sessions that
ended; every second the app asks for a save, which compares only those sessions with what it
last wrote for them and hands the difference (rows to add, update and delete) to the store's
own thread, which writes it in one transaction. A payload is written once, when first saved,
in one row shared by every session it is queued for; a save costs what changed, never what is
stored. A crash loses at most the last second of changes; acknowledged telemetry never depends
on this (that is the sink's).

A save that fails (disk full, no file descriptor left, I/O error) is not taken as done: what it
carried stays in the change log and the next save writes it. A database that cannot be read on
start (not a database, malformed, rows that do not decode) is set aside as
`mqtt-state.sqlite.corrupt-{UTC time}` with one logged error line, and the gateway starts
without the persistent sessions and retained messages it held: clients reconnect to a fresh
session (session present 0) rather than to a gateway that refuses them all, and the operator
keeps the file. A snapshot left by an older version (`mqtt-state.msgpack`) is read once on
start, saved into the database, and renamed `.migrated`.

`pack_session` / `unpack_session` move a session between cluster nodes (gateway/cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from gateway._native import mqtt
from gateway.mqtt.broker import Broker
from gateway.mqtt.session import Delivery, Message, Session, SubOptions, monotonic

log = logging.getLogger("iotgw.state")

FORMAT = 2  # of the database; 1 was the msgpack snapshot
_PROPS = ("payload_format_indicator", "content_type", "response_topic", "correlation_data")
FAILURE_LOG_INTERVAL = 60.0  # seconds between log lines while saves keep failing
# Free pages (4 KiB) past which a save gives space back to the file system, and the most it
# gives back at once: the file follows what is stored, at a cost that follows what was deleted.
VACUUM_ABOVE = 256
VACUUM_AT_MOST = 16384

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions(client TEXT PRIMARY KEY, state BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages(
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    retain INTEGER NOT NULL, props BLOB, expires REAL, origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries(
    client TEXT NOT NULL, seq INTEGER NOT NULL, msg INTEGER NOT NULL, qos INTEGER NOT NULL,
    retain INTEGER NOT NULL, sub_ids BLOB, packet_id INTEGER NOT NULL, state INTEGER NOT NULL,
    PRIMARY KEY (client, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_msg ON deliveries(msg);
CREATE TABLE IF NOT EXISTS retained(topic TEXT PRIMARY KEY, msg INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS retained_by_msg ON retained(msg);
"""
# Messages no longer referenced by a delivery or a retained topic, among the candidates a save
# collected (the messages of the rows it deleted): the cost follows the deletions.
_COLLECT = """
DELETE FROM messages WHERE id IN (SELECT id FROM temp.unreferenced)
    AND NOT EXISTS (SELECT 1 FROM deliveries WHERE msg = messages.id)
    AND NOT EXISTS (SELECT 1 FROM retained WHERE msg = messages.id)
"""
_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB


# ---- packing (cluster moves, the old snapshot) -----------------------------------------------

def _props_out(props: Any) -> dict[str, Any] | None:
    if props is None:
        return None
    d = {name: getattr(props, name) for name in _PROPS}
    d["user_properties"] = [list(p) for p in props.user_properties or ()]
    return d


def _props_in(d: dict[str, Any] | None) -> Any:
    if d is None:
        return None
    props = mqtt.Properties()
    for name in _PROPS:
        setattr(props, name, d.get(name))
    props.user_properties = [tuple(p) for p in d.get("user_properties", ())]
    return props


def pack_message(m: Message, now: float) -> list[Any]:
    """A message as msgpack-able data; its expiry travels as seconds left (from `now`)."""
    left = None if m.expires_at is None else max(0.0, m.expires_at - now)
    return [m.topic, bytes(m.payload), m.qos, m.retain, _props_out(m.properties), left, m.origin]


def unpack_message(d: list[Any], now: float) -> Message:
    topic, payload, qos, retain, props, left, origin = d
    return Message(
        topic, payload, qos, retain, _props_in(props), None if left is None else now + left, origin
    )


def _delivery_out(d: Delivery, now: float) -> list[Any]:
    return [pack_message(d.message, now), d.qos, d.retain, list(d.subscription_ids), d.state]


def _delivery_in(d: list[Any], now: float) -> Delivery:
    message, qos, retain, ids, state = d
    return Delivery(unpack_message(message, now), qos, retain, tuple(ids), state, dup=state != 0)


def _subscriptions_out(subscriptions: dict[str, SubOptions]) -> dict[str, list[Any]]:
    return {
        f: [o.qos, o.no_local, o.retain_as_published, o.retain_handling, o.identifier]
        for f, o in subscriptions.items()
    }


def pack_session(s: Session, now: float, wall: float) -> dict[str, Any]:
    """A persistent session as msgpack-able data (moves between cluster nodes)."""
    offline_for = 0.0 if s.disconnected_at is None else now - s.disconnected_at
    return {
        "client_id": s.client_id,
        "version": s.version,
        "identity": s.identity,
        "anonymous": s.anonymous,
        "expiry": s.expiry_interval,
        "offline_since": wall - offline_for,
        "subscriptions": _subscriptions_out(s.subscriptions),
        "outgoing": {str(pid): _delivery_out(d, now) for pid, d in s.outgoing.items()},
        "queue": [_delivery_out(d, now) for d in s.queue],
        "incoming_qos2": sorted(s.incoming_qos2),
    }


def _install(broker: Broker, session: Session, subscriptions: dict[str, list[Any]]) -> None:
    for topic_filter, (qos, no_local, rap, rh, ident) in subscriptions.items():
        opts = SubOptions(qos, no_local, rap, rh, ident)
        session.subscriptions[topic_filter] = opts
        broker.add_subscription(session.client_id, topic_filter, opts)
    broker.sessions[session.client_id] = session
    session.join(broker.journal, broker.budget)


def unpack_session(broker: Broker, d: dict[str, Any], now: float, wall: float) -> Session | None:
    """Install a packed session (with its subscriptions) in the broker; None if it expired."""
    session = Session(d["client_id"], d["version"], d["identity"], d["expiry"])
    session.anonymous = d.get("anonymous")  # None: from a version that did not say
    session.max_queue = broker.limits.max_queued_messages
    session.disconnected_at = now - max(0.0, wall - d["offline_since"])
    if session.expired(now):
        return None
    session.outgoing.update((int(pid), _delivery_in(x, now)) for pid, x in d["outgoing"].items())
    session.queue.extend(_delivery_in(x, now) for x in d["queue"])
    session.incoming_qos2 = set(d["incoming_qos2"])
    _install(broker, session, d["subscriptions"])
    return session


def _load_snapshot(broker: Broker, raw: bytes) -> int:
    """Restore an `mqtt-state.msgpack` snapshot (format 1) into an empty broker."""
    doc = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise ValueError("not an iotgw session snapshot (format 1)")
    now = monotonic()
    wall = time.time()
    for d in doc["retained"]:
        message = unpack_message(d, now)
        if not message.expired(now):
            message.own()
            broker.retained.set(message.topic, message)
            broker.journal.retained.add(message.topic)
    return sum(unpack_session(broker, d, now, wall) is not None for d in doc["sessions"])


# ---- the state database --------------------------------------------------------------------

@dataclass(slots=True)
class _Batch:
    """One save: rows for the store's thread, and what to do on the loop once it is written."""

    saved_at: float
    ended: list[tuple[str]] = field(default_factory=list)
    sessions: list[tuple[str, bytes]] = field(default_factory=list)
    messages: list[tuple[Any, ...]] = field(default_factory=list)
    put: list[tuple[Any, ...]] = field(default_factory=list)
    moved: list[tuple[int, int, str, int]] = field(default_factory=list)
    gone: list[tuple[str, int]] = field(default_factory=list)
    unreferenced: list[tuple[int]] = field(default_factory=list)
    retained_put: list[tuple[str, int]] = field(default_factory=list)
    retained_gone: list[tuple[str]] = field(default_factory=list)
    # Loop side: applied when written, undone when not.
    touched: list[Session] = field(default_factory=list)
    ended_ids: set[str] = field(default_factory=set)
    retained_topics: set[str] = field(default_factory=set)
    new_messages: list[Message] = field(default_factory=list)
    new_saved: list[tuple[Session, dict[int, tuple[int, int, int]], bytes | None]] = field(
        default_factory=list
    )

    def __bool__(self) -> bool:
        return bool(
            self.ended or self.sessions or self.messages or self.put or self.moved or self.gone
            or self.retained_put or self.retained_gone
        )


@dataclass(slots=True)
class _Stored:
    """The database's content, read on the store's thread."""

    messages: dict[int, tuple[Any, ...]]
    sessions: list[tuple[str, bytes]]
    deliveries: dict[str, list[tuple[Any, ...]]]
    retained: list[tuple[str, int]]
    next_seq: int


class StateStore:
    """Sessions and retained messages of one broker in SQLite, saved incrementally by one
    writer thread. `open()` restores, `save()` writes what changed, `close()` at the end."""

    def __init__(self, path: Path, broker: Broker, legacy: Path | None = None) -> None:
        self.path = path
        self.broker = broker
        self.legacy = legacy  # an older version's snapshot to migrate
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iotgw-state")
        self._conn: sqlite3.Connection | None = None  # used on the executor's thread only
        self._lock = asyncio.Lock()  # one save at a time: each builds on the last one's result
        self._next_seq = 1
        self._next_message = 1
        self._migrated: Path | None = None  # renamed once its content is saved
        self.failures = 0  # consecutive failed saves
        self._skipped = 0  # rows that did not decode while restoring
        self._failure_logged = 0.0

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- start -------------------------------------------------------------------------------

    async def open(self) -> int:
        """Open (or create) the database and restore what it holds into the broker (and an old
        snapshot, once); returns the sessions restored."""
        try:
            stored: _Stored = await self._run(self._open_and_read)
        except Exception as exc:
            if not _unreadable(exc):
                raise
            await self._run(self._close_db)
            kept = _set_aside(self.path, [self.path.with_name(self.path.name + s)
                                          for s in ("-wal", "-shm")])
            log.error(
                "session state %s is unreadable (%s): set aside as %s; starting without the "
                "persistent sessions and retained messages it held", self.path, _why(exc), kept,
            )
            stored = await self._run(self._open_and_read)
        restored = self._restore(stored)
        if self.legacy is not None and self.legacy.exists():
            restored += await self._migrate(self.legacy, bool(stored.sessions or stored.retained))
        return restored

    def _open_and_read(self) -> _Stored:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn = conn
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:  # a new database
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when save() returns
        conn.execute("PRAGMA temp_store=MEMORY")  # no temporary files (nor descriptors)
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.executescript(_SCHEMA)
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS unreferenced(id INTEGER PRIMARY KEY)")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format", FORMAT) != FORMAT:
            raise ValueError(f"unknown state format {meta.get('format')!r}")
        messages = {
            row[0]: row[1:] for row in conn.execute(
                "SELECT id, topic, payload, qos, retain, props, expires, origin FROM messages"
            )
        }
        deliveries: dict[str, list[tuple[Any, ...]]] = {}
        for client, *row in conn.execute(
            "SELECT client, seq, msg, qos, retain, sub_ids, packet_id, state FROM deliveries "
            "ORDER BY client, seq"
        ):
            deliveries.setdefault(client, []).append(tuple(row))
        sessions = conn.execute("SELECT client, state FROM sessions").fetchall()
        retained = conn.execute("SELECT topic, msg FROM retained").fetchall()
        (max_seq,) = conn.execute("SELECT max(seq) FROM deliveries").fetchone()
        # Written once all of it was read: an unreadable file is set aside as it was found.
        if "format" not in meta:
            conn.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
        return _Stored(messages, sessions, deliveries, retained, (max_seq or 0) + 1)

    def _restore(self, stored: _Stored) -> int:
        """Install the stored state into the (empty) broker, on the loop. Rows that do not
        decode are skipped and reported in one line."""
        broker = self.broker
        now = monotonic()
        wall = time.time()
        self._next_seq = stored.next_seq
        self._next_message = max(stored.messages, default=0) + 1
        cache: dict[int, Message] = {}
        self._skipped = skipped = 0

        def message(mid: int) -> Message | None:
            found = cache.get(mid)
            if found is None and mid in stored.messages:
                topic, payload, qos, retain, props, expires, origin = stored.messages[mid]
                found = Message(
                    topic, bytes(payload), qos, bool(retain),
                    None if props is None else _props_in(msgpack.unpackb(props, raw=False)),
                    None if expires is None else now + (expires - wall), origin, mid,
                )
                cache[mid] = found
            return found

        for topic, mid in stored.retained:
            try:
                m = message(mid)
            except Exception:
                m = None
            if m is None:
                skipped += 1
            elif not m.expired(now):
                broker.retained.set(topic, m)
        restored = 0
        for client, blob in stored.sessions:
            try:
                if self._restore_session(client, blob, stored, message, now, wall):
                    restored += 1
            except Exception:
                skipped += 1
                broker.journal.ended.add(client)
        # Restored as saved: nothing for the next save to look at.
        for session in broker.journal.sessions:
            session.untouch()
        broker.journal.sessions.clear()
        skipped += self._skipped
        if skipped:
            log.error("session state %s: %d unreadable sessions or retained messages skipped",
                      self.path, skipped)
        return restored

    def _restore_session(
        self, client: str, blob: bytes, stored: _Stored, message: Any, now: float, wall: float
    ) -> bool:
        broker = self.broker
        version, identity, expiry, offline_since, subscriptions, qos2, anonymous = (
            msgpack.unpackb(blob, raw=False, strict_map_key=False)
        )
        session = Session(client, version, identity, expiry, anonymous)
        session.max_queue = broker.limits.max_queued_messages
        # Online when last saved: it went offline when this process ended, at a moment no
        # file records; its expiry counts from the restart (keeping it a little longer, rather
        # than ending a session that may not have expired).
        since = wall if offline_since is None else offline_since
        session.disconnected_at = now - max(0.0, wall - since)
        if session.expired(now):
            broker.journal.ended.add(client)  # its rows go with the next save
            return False
        saved: dict[int, tuple[int, int, int]] = {}
        for seq, mid, qos, retain, ids, packet_id, state in stored.deliveries.get(client, ()):
            m = message(mid)
            if m is None:  # never expected: a save writes a message before its deliveries
                self._skipped += 1
                continue
            d = Delivery(m, qos, bool(retain), tuple(msgpack.unpackb(ids)) if ids else (),
                         state, dup=state != 0, seq=seq)
            if packet_id:
                session.outgoing[packet_id] = d
            else:
                session.queue.append(d)
            saved[seq] = (packet_id, state, mid)
        session.incoming_qos2 = set(qos2)
        _install(broker, session, subscriptions)
        session.saved = saved
        session.saved_meta = blob
        session.untouch()
        return True

    async def _migrate(self, snapshot: Path, have_state: bool) -> int:
        if have_state:  # saved before, then stopped before the rename
            snapshot.replace(snapshot.with_name(snapshot.name + ".migrated"))
            return 0
        try:
            restored = _load_snapshot(self.broker, snapshot.read_bytes())
        except Exception as exc:  # whatever a torn or foreign file makes msgpack or us raise
            kept = _set_aside(snapshot, [])
            log.error(
                "session snapshot %s is unreadable (%s): set aside as %s; starting without "
                "the persistent sessions and retained messages it held", snapshot, _why(exc),
                kept,
            )
            return 0
        self._migrated = snapshot
        if await self.save():
            log.info("migrated %d sessions from %s into %s", restored, snapshot, self.path)
        return restored

    # ---- saving ------------------------------------------------------------------------------

    async def save(self) -> bool:
        """Write what changed since the last save; False if that failed (it is kept for the
        next save)."""
        async with self._lock:
            batch = self._take()
            try:
                self._build(batch)
                if batch:
                    await self._run(self._write, batch)
            except Exception as exc:
                self._undo(batch)
                self._failed(exc)
                return False
            self._done(batch)
            return True

    def _take(self) -> _Batch:
        """Everything the change log holds, for one save."""
        journal = self.broker.journal
        batch = _Batch(time.time())
        batch.touched, journal.sessions = journal.sessions, []
        batch.ended_ids, journal.ended = journal.ended, set()
        batch.retained_topics, journal.retained = journal.retained, set()
        for session in batch.touched:
            session.untouch()
        return batch

    def _build(self, batch: _Batch) -> None:
        """The rows that changed, from the sessions in the change log (on the loop, no I/O,
        no payload copies)."""
        broker = self.broker
        now = monotonic()
        wall = batch.saved_at
        batch.ended = [(c,) for c in batch.ended_ids]
        for session in dict.fromkeys(batch.touched):  # once each, in order
            if broker.sessions.get(session.client_id) is session:
                self._session_rows(batch, session, now, wall)
        for topic in batch.retained_topics:
            m = broker.retained.get(topic)
            if m is None:
                batch.retained_gone.append((topic,))
            else:
                batch.retained_put.append((topic, self._message_row(batch, m, now, wall)))

    def _session_rows(self, batch: _Batch, s: Session, now: float, wall: float) -> None:
        client = s.client_id
        if not s.expiry_interval:  # not (or no longer) persistent
            if s.saved or s.saved_meta is not None:
                batch.ended.append((client,))
                batch.new_saved.append((s, {}, None))
            return
        outgoing, queue, subscriptions, incoming_qos2 = s.state()
        offline_since = None
        if s.disconnected_at is not None:
            offline_since = int(wall - (now - s.disconnected_at))
        meta: bytes = msgpack.packb(
            [s.version, s.identity, s.expiry_interval, offline_since,
             _subscriptions_out(subscriptions), sorted(incoming_qos2), s.anonymous],
            use_bin_type=True,
        )
        if meta != s.saved_meta:
            batch.sessions.append((client, meta))
        saved = s.saved
        live: dict[int, tuple[int, int, int]] = {}
        for packet_id, d in outgoing.items():
            self._delivery_row(batch, client, d, packet_id, saved, live, now, wall)
        for d in queue:
            self._delivery_row(batch, client, d, 0, saved, live, now, wall)
        for seq, (_, _, mid) in saved.items():
            if seq not in live:
                batch.gone.append((client, seq))
                batch.unreferenced.append((mid,))
        batch.new_saved.append((s, live, meta))

    def _delivery_row(
        self, batch: _Batch, client: str, d: Delivery, packet_id: int,
        saved: dict[int, tuple[int, int, int]], live: dict[int, tuple[int, int, int]],
        now: float, wall: float,
    ) -> None:
        mid = self._message_row(batch, d.message, now, wall)
        seq = d.seq
        if not seq:
            seq = d.seq = self._next_seq
            self._next_seq += 1
        entry = (packet_id, d.state, mid)
        old = saved.get(seq)
        if old is None:
            ids = msgpack.packb(list(d.subscription_ids)) if d.subscription_ids else None
            batch.put.append((client, seq, mid, d.qos, int(d.retain), ids, packet_id, d.state))
        elif old != entry:
            batch.moved.append((packet_id, d.state, client, seq))
        live[seq] = entry

    def _message_row(self, batch: _Batch, m: Message, now: float, wall: float) -> int:
        """The message's row id; a new row (the payload written once) if it has none yet."""
        if m.stored:
            return m.stored
        m.own()
        m.stored = mid = self._next_message
        self._next_message += 1
        props = _props_out(m.properties)
        batch.messages.append((
            mid, m.topic, m.payload, m.qos, int(m.retain),
            None if props is None else msgpack.packb(props, use_bin_type=True),
            None if m.expires_at is None else wall + (m.expires_at - now), m.origin,
        ))
        batch.new_messages.append(m)
        return mid

    def _write(self, b: _Batch) -> None:
        """One transaction (on the store's thread)."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            if b.ended:
                conn.executemany(
                    "INSERT OR IGNORE INTO temp.unreferenced SELECT msg FROM deliveries "
                    "WHERE client = ?", b.ended,
                )
                conn.executemany("DELETE FROM deliveries WHERE client = ?", b.ended)
                conn.executemany("DELETE FROM sessions WHERE client = ?", b.ended)
            conn.executemany("INSERT OR REPLACE INTO messages VALUES (?,?,?,?,?,?,?,?)",
                             b.messages)
            conn.executemany("INSERT OR REPLACE INTO sessions VALUES (?,?)", b.sessions)
            conn.executemany("INSERT OR REPLACE INTO deliveries VALUES (?,?,?,?,?,?,?,?)", b.put)
            conn.executemany(
                "UPDATE deliveries SET packet_id = ?, state = ? WHERE client = ? AND seq = ?",
                b.moved,
            )
            conn.executemany("DELETE FROM deliveries WHERE client = ? AND seq = ?", b.gone)
            conn.executemany("INSERT OR IGNORE INTO temp.unreferenced VALUES (?)",
                             b.unreferenced)
            replaced = b.retained_gone + [(topic,) for topic, _ in b.retained_put]
            conn.executemany(
                "INSERT OR IGNORE INTO temp.unreferenced SELECT msg FROM retained "
                "WHERE topic = ?", replaced,
            )
            conn.executemany("DELETE FROM retained WHERE topic = ?", b.retained_gone)
            conn.executemany("INSERT OR REPLACE INTO retained VALUES (?,?)", b.retained_put)
            conn.execute(_COLLECT)
            conn.execute("DELETE FROM temp.unreferenced")
            # When it was last written, for whoever looks at the file.
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('saved_at', ?)", (b.saved_at,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        if b.gone or b.ended or b.retained_gone:
            # Saved already: failing to shrink the file must not undo that.
            with contextlib.suppress(sqlite3.Error):
                (free,) = conn.execute("PRAGMA freelist_count").fetchone()
                if free > VACUUM_ABOVE:
                    # executescript steps it to the end (execute() frees one page per step)
                    conn.executescript(f"PRAGMA incremental_vacuum({min(free, VACUUM_AT_MOST)});")

    def _done(self, batch: _Batch) -> None:
        for s, live, meta in batch.new_saved:
            s.saved = live
            s.saved_meta = meta
        if self.failures:
            log.warning("saving session state to %s works again after %d failed attempts",
                        self.path, self.failures)
            self.failures = 0
        if self._migrated is not None:
            migrated, self._migrated = self._migrated, None
            migrated.replace(migrated.with_name(migrated.name + ".migrated"))

    def _undo(self, batch: _Batch) -> None:
        """The batch was not written: its messages have no rows, and everything it carried
        goes back into the change log for the next save."""
        for m in batch.new_messages:
            m.stored = 0
        journal = self.broker.journal
        for session in batch.touched:
            session.touch()
        journal.ended |= batch.ended_ids
        journal.retained |= batch.retained_topics

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.broker.metrics.state_save_failures.inc()
        now = monotonic()
        if self.failures == 1 or now - self._failure_logged >= FAILURE_LOG_INTERVAL:
            self._failure_logged = now
            log.error("saving session state to %s failed (%s); kept for the next save "
                      "(%d failed in a row)", self.path, _why(exc), self.failures)

    # ---- the end -----------------------------------------------------------------------------

    def _close_db(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def close(self) -> None:
        async with self._lock:
            await self._run(self._close_db)
        self._executor.shutdown(wait=True)


def _unreadable(exc: BaseException) -> bool:
    """Whether an error reading the database means its content is bad (not that it could not
    be opened: a directory we may not write is the operator's to fix)."""
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _CORRUPT
    return isinstance(exc, (ValueError, TypeError, KeyError, IndexError))


def _why(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__


def _set_aside(path: Path, companions: list[Path]) -> Path:
    """Rename an unreadable state file (and its companions) out of the way, keeping it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = path.with_name(f"{path.name}.corrupt-{stamp}")
    path.replace(kept)
    for extra in companions:
        if extra.exists():
            extra.replace(extra.with_name(f"{kept.name}{extra.name[len(path.name):]}"))
    return kept
