"""The registry database: devices and API tokens in one SQLite file in the data dir
(`registry.sqlite`), shared by the running gateway and the `iotgw devices|tokens` CLI.

Why SQLite: writers in several processes (parallel CLI runs, the REST API) must not lose each
other's changes, and readers must see a change at once without a restart. Every write is one
`BEGIN IMMEDIATE` transaction; the file is in WAL mode so that readers never wait for writers.

Every thread gets its own connection (`threading.local`): the gateway reads from the event loop
and from its authentication worker threads at the same time.

The `changes` table logs what happened to devices (added, removed, disabled, enabled) with an
increasing sequence number: a running gateway asks for what came after the last number it saw
(`changes_since`) to end the sessions of devices removed or disabled by another process.

Schema version 2 (`PRAGMA user_version`): version 1 plus the devices' DTLS pre-shared keys
(`psk`, NULL for a device without one); a version 1 file is upgraded in place when opened. On
its first creation the file takes in the `devices.json` and `tokens.json` of earlier versions,
which are then renamed `*.migrated`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

log = logging.getLogger("iotgw.registry")

FILE_NAME: Final = "registry.sqlite"
SCHEMA_VERSION: Final = 2
BUSY_TIMEOUT_S: Final = 30.0  # a writer waits this long for another writer's transaction
LOG_EVERY_S: Final = 60.0  # an unreadable registry is logged at most once per this
CHANGES_KEPT_S: Final = 7 * 86400.0  # change-log rows older than this are pruned by writers

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    iterations INTEGER NOT NULL,
    created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    psk BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    iterations INTEGER NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    op TEXT NOT NULL,
    at REAL NOT NULL
);
"""


class RegistryUnavailable(ValueError):
    """The registry file cannot be opened or read (corrupt, missing, wrong permissions)."""


class RegistryDb:
    """One registry file; connections per thread, opened lazily."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / FILE_NAME
        self._local = threading.local()
        self._generation = 0  # bumped to make every thread reopen its connection
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._log_lock = threading.Lock()
        self._last_logged = -LOG_EVERY_S
        self._suppressed = 0
        self._create()

    # ---- opening ---------------------------------------------------------------------------

    def _create(self) -> None:
        """Create the file (and migrate JSON files) if needed; RegistryUnavailable if it is not
        a registry. Run once per process, in the constructor."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryUnavailable(f"device registry {self.path}: {exc}") from None
        migrated: list[Path] = []
        try:
            if os.stat(self.path).st_mode & 0o077:  # password and token hashes: owner only
                os.chmod(self.path, 0o600)
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RegistryUnavailable(
                    f"device registry {self.path} has schema {version}, newer than this "
                    f"iotgw knows ({SCHEMA_VERSION})"
                )
            if version == 0:
                # one statement at a time: executescript() would commit the transaction first
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                migrated = _migrate(conn, self.data_dir)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 1:
                conn.execute("ALTER TABLE devices ADD COLUMN psk BLOB")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
            # WAL outside the transaction (it cannot change inside one); persistent in the file.
            conn.execute("PRAGMA journal_mode = WAL")
        except (OSError, sqlite3.Error) as exc:
            raise RegistryUnavailable(f"device registry {self.path} is unreadable: {exc}") from None
        finally:
            conn.close()
        for path in migrated:
            try:
                os.replace(path, path.with_name(path.name + ".migrated"))
            except OSError as exc:  # migrated all the same: the file is read only at creation
                log.warning("could not rename %s after migrating it: %s", path, exc)
            log.info("migrated %s into %s", path, self.path)
        self._identity = self._file_identity()

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and local.generation == self._generation:
            return conn
        if conn is not None:
            conn.close()
            local.conn = None
        # mode=rw: a file deleted under a running gateway is an error, not a new empty registry
        conn = sqlite3.connect(
            f"file:{self.path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S,
            isolation_level=None, check_same_thread=True,
        )
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never torn
        local.conn, local.generation = conn, self._generation
        return conn

    def reopen_if_replaced(self) -> None:
        """Reopen every thread's connection if the file was replaced or deleted (a restore from
        a backup): a connection keeps reading the file it opened. Cheap (one stat); the
        gateway's sweep calls it."""
        identity = self._file_identity()
        if identity != self._identity:
            self._identity = identity
            self._generation += 1

    def _failed(self, exc: BaseException) -> RegistryUnavailable:
        """Drop this thread's connection (the next call reopens it) and log, once a minute."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with contextlib.suppress(sqlite3.Error):  # closing a broken connection
                conn.close()
        message = f"device registry {self.path} is unreadable: {exc}"
        with self._log_lock:
            now = time.monotonic()
            if now - self._last_logged >= LOG_EVERY_S:
                more = f" ({self._suppressed} more failures)" if self._suppressed else ""
                log.error("%s%s", message, more)
                self._last_logged, self._suppressed = now, 0
            else:
                self._suppressed += 1
        return RegistryUnavailable(message)

    # ---- use -------------------------------------------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of one read (its own implicit transaction)."""
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        try:
            return self._connection().execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): concurrent writers queue
        for up to BUSY_TIMEOUT_S instead of failing or overwriting each other."""
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        try:
            yield conn
            conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            raise
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise self._failed(exc) from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def log_change(self, conn: sqlite3.Connection, device: str, op: str) -> None:
        now = time.time()
        conn.execute("INSERT INTO changes (device, op, at) VALUES (?, ?, ?)", (device, op, now))

    def prune_changes(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM changes WHERE at < ?", (time.time() - CHANGES_KEPT_S,))


def _migrate(conn: sqlite3.Connection, data_dir: Path) -> list[Path]:
    """Copy `devices.json` / `tokens.json` (iotgw before the SQLite registry) into the new
    tables, inside the creating transaction; returns the files to rename once committed."""
    done: list[Path] = []
    devices = data_dir / "devices.json"
    if devices.exists():
        try:
            doc = json.loads(devices.read_text())
            rows = [
                (
                    d["id"], bytes.fromhex(d["salt"]), bytes.fromhex(d["hash"]),
                    int(d["iterations"]), float(d["created"]),
                )
                for d in doc["devices"]
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryUnavailable(f"cannot migrate {devices}: {exc}") from None
        conn.executemany(
            "INSERT INTO devices (id, salt, hash, iterations, created) VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        done.append(devices)
    tokens = data_dir / "tokens.json"
    if tokens.exists():
        try:
            doc = json.loads(tokens.read_text())
            trows = [
                (
                    t["id"], t["name"], ",".join(sorted(t["scopes"])), bytes.fromhex(t["salt"]),
                    bytes.fromhex(t["hash"]), int(t["iterations"]), float(t["created"]),
                )
                for t in doc["tokens"]
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryUnavailable(f"cannot migrate {tokens}: {exc}") from None
        conn.executemany(
            "INSERT INTO tokens (id, name, scopes, salt, hash, iterations, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            trows,
        )
        done.append(tokens)
    return done
