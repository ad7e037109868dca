"""The device registry: device ids with salted password hashes, kept in the registry database
(gateway/registrydb.py: `registry.sqlite` in the data dir) and managed with
`iotgw devices add|list|remove|disable|enable|import` or the REST API.

Every read goes to the database (a primary-key lookup), so a device added by another process
can connect at once. Hashes are PBKDF2-HMAC-SHA256 with a per-device random salt. A disabled
device keeps its credentials but may not connect.

`verify` and `get` are blocking and thread-safe: the gateway calls them from worker threads
and from the event loop at the same time. They raise RegistryUnavailable (a RegistryError)
when the database cannot be read.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Final

from gateway.registrydb import RegistryDb, RegistryUnavailable

ITERATIONS: Final = 20_000
REMOVED: Final = "removed"
DISABLED: Final = "disabled"
ADDED: Final = "added"
REKEYED: Final = "rekeyed"  # a new DTLS pre-shared key (or none): its coaps sessions end


class RegistryError(ValueError):
    """A bad device id, a duplicate, an unknown device, or an unreadable registry."""


class DeviceUnavailableError(RegistryError, RegistryUnavailable):
    """The registry database cannot be read: the caller answers "try again later"."""


class DeviceExists(RegistryError):
    pass


class UnknownDevice(RegistryError):
    pass


@dataclass(frozen=True)
class Device:
    device_id: str
    salt: bytes
    password_hash: bytes
    iterations: int
    created: float
    disabled: bool = False


def _hash(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


def hash_password(password: str) -> tuple[bytes, bytes]:
    """(salt, hash) for a new password; module-level so that a process pool can run it."""
    salt = secrets.token_bytes(16)
    return salt, _hash(password, salt, ITERATIONS)


MIN_IMPORTED_ITERATIONS: Final = 10_000
Hashed = tuple[bytes, bytes, int]  # (salt, PBKDF2-HMAC-SHA256 digest, iterations)


def parse_password_hash(text: str) -> Hashed:
    """A password hash in the PHC / passlib form `$pbkdf2-sha256$ITERATIONS$SALT$HASH` (salt and
    hash in base64, passlib's `.` for `+` and no padding accepted): devices moved from another
    system keep their passwords, and importing them costs no PBKDF2."""
    parts = text.strip().split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "pbkdf2-sha256":
        raise RegistryError("a password hash reads $pbkdf2-sha256$ITERATIONS$SALT$HASH")

    def b64(field: str) -> bytes:
        field = field.replace(".", "+")
        try:
            return base64.b64decode(field + "=" * (-len(field) % 4), validate=True)
        except ValueError:
            raise RegistryError(f"{field!r} in a password hash is not base64") from None

    if not parts[2].isdigit() or int(parts[2]) < MIN_IMPORTED_ITERATIONS:
        raise RegistryError(
            f"a password hash needs {MIN_IMPORTED_ITERATIONS} iterations or more, not {parts[2]}"
        )
    salt, digest = b64(parts[3]), b64(parts[4])
    if len(salt) < 8 or len(digest) != 32:
        raise RegistryError("a password hash needs a salt of 8 bytes or more and a 32-byte hash")
    return salt, digest, int(parts[2])


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def check_device_id(device_id: str) -> None:
    """Device ids become topic levels (`devices/{id}/...`), so they must be one valid level."""
    if not device_id or len(device_id.encode()) > 128:
        raise RegistryError("a device id is 1 to 128 bytes long")
    if any(c in device_id for c in "/+#\x00") or device_id.startswith("$"):
        raise RegistryError(
            f"device id {device_id!r} may not contain / + # or U+0000, nor start with $"
        )


def valid_device_id(device_id: str) -> bool:
    try:
        check_device_id(device_id)
    except RegistryError:
        return False
    return True


MAX_PSK: Final = 64  # bytes: what libcoap and most DTLS stacks accept


def check_psk(psk: str) -> None:
    """A PSK is text, used as its UTF-8 bytes (as `coap-client -k KEY` does)."""
    if not psk or len(psk.encode()) > MAX_PSK or any(c.isspace() for c in psk):
        raise RegistryError(f"a PSK is 1 to {MAX_PSK} bytes of text without spaces")


def generate_psk() -> str:
    return secrets.token_urlsafe(24)


def _check_password(password: str) -> None:
    if not password:
        raise RegistryError("the password may not be empty")


_COLUMNS: Final = "id, salt, hash, iterations, created, disabled"


def _device(row: tuple[str, bytes, bytes, int, float, int]) -> Device:
    return Device(row[0], row[1], row[2], row[3], row[4], bool(row[5]))


class DeviceRegistry:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        try:
            self.db = RegistryDb(data_dir)
        except RegistryUnavailable as exc:
            raise DeviceUnavailableError(str(exc)) from None
        self.path = self.db.path
        # Successful checks are remembered (keyed by a keyed digest of id, salt and password,
        # not the password) so that a reconnect storm does not pay PBKDF2 for every CONNECT.
        # The salt is in the digest: a device removed and added again with a new password
        # does not inherit the old password's remembered success.
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}

    # ---- reading ----------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[Device]:
        try:
            return [_device(r) for r in self.db.query(sql, params)]
        except RegistryUnavailable as exc:
            raise DeviceUnavailableError(str(exc)) from None

    def list(self) -> list[Device]:
        return self._query(f"SELECT {_COLUMNS} FROM devices ORDER BY id")

    def ids(self, after: str | None, limit: int) -> builtins.list[str]:
        """Registered ids in order, after `after`, at most `limit` (REST paging)."""
        return [
            d.device_id
            for d in self._query(
                f"SELECT {_COLUMNS} FROM devices WHERE id > ? ORDER BY id LIMIT ?",
                (after or "", limit),
            )
        ]

    def get(self, device_id: str) -> Device | None:
        found = self._query(f"SELECT {_COLUMNS} FROM devices WHERE id = ?", (device_id,))
        return found[0] if found else None

    def check(self) -> int:
        """Read the whole registry once (start-up): the number of devices, or
        DeviceUnavailableError."""
        try:
            rows = self.db.query(
                "SELECT count(*) FROM devices UNION ALL SELECT count(*) FROM tokens"
            )
        except RegistryUnavailable as exc:
            raise DeviceUnavailableError(str(exc)) from None
        return int(rows[0][0])

    def verify(self, device_id: str, password: bytes | None) -> bool:
        """True when the device exists, is enabled and the password is its password."""
        if password is None:
            return False
        device = self.get(device_id)
        if device is None or device.disabled:
            return False
        digest = hmac.new(
            self._cache_key, device_id.encode() + b"\0" + device.salt + password, "sha256"
        ).digest()
        remembered = self._verified.get(device_id)
        if remembered is not None and hmac.compare_digest(remembered, digest):
            return True
        try:
            text = password.decode()
        except UnicodeDecodeError:
            return False
        ok = hmac.compare_digest(_hash(text, device.salt, device.iterations), device.password_hash)
        if ok:
            self._verified[device_id] = digest
        return ok

    def psk(self, device_id: str) -> bytes | None:
        """The device's DTLS pre-shared key, or None (unknown, disabled, or without one)."""
        try:
            rows = self.db.query(
                "SELECT psk FROM devices WHERE id = ? AND disabled = 0", (device_id,)
            )
        except RegistryUnavailable as exc:
            raise DeviceUnavailableError(str(exc)) from None
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

    def disabled(self, device_id: str) -> bool:
        """True when the device is registered and disabled (its CONNECT is "not authorized")."""
        device = self.get(device_id)
        return device is not None and device.disabled

    def changes_since(self, cursor: int | None) -> tuple[int, dict[str, str]]:
        """What happened to devices since `cursor` (None: start from now): the new cursor and
        the devices removed, disabled, added or rekeyed meanwhile, each with the strongest of
        what happened to it (REMOVED, then DISABLED, then REKEYED, then ADDED). One indexed
        read: the gateway calls it from its periodic sweep."""
        self.db.reopen_if_replaced()
        try:
            if cursor is None:
                row = self.db.one("SELECT coalesce(max(seq), 0) FROM changes")
                return int(row[0]), {}
            rows = self.db.query(
                "SELECT seq, device, op FROM changes WHERE seq > ? ORDER BY seq", (cursor,)
            )
        except RegistryUnavailable as exc:
            raise DeviceUnavailableError(str(exc)) from None
        changed: dict[str, str] = {}
        # A rekey outranks an addition: both together mean a new device whose coaps sessions
        # (made with the first key) must end, and readers treat REKEYED as ADDED otherwise.
        strength = {ADDED: 1, REKEYED: 2, DISABLED: 3, REMOVED: 4}
        for seq, device, op in rows:
            cursor = seq
            if strength.get(op, 0) > strength.get(changed.get(device, ""), 0):
                changed[device] = op
        return cursor, changed

    # ---- writing (the CLI, the REST API) ------------------------------------------------------

    def add(self, device_id: str, password: str, psk: str | None = None) -> Device:
        """Register a device (PBKDF2 first, then one short transaction), with a DTLS
        pre-shared key when `psk` is given."""
        check_device_id(device_id)
        _check_password(password)
        if psk is not None:
            check_psk(psk)
        salt, digest = hash_password(password)
        device = Device(device_id, salt, digest, ITERATIONS, time.time())
        self._insert([device], psk)
        return device

    def set_psk(self, device_id: str, psk: str | None) -> None:
        """Give a device a new DTLS pre-shared key (None: none); its coaps sessions end."""
        if psk is not None:
            check_psk(psk)
        try:
            with self.db.write() as conn:
                key = psk.encode() if psk is not None else None
                changed = conn.execute("UPDATE devices SET psk = ? WHERE id = ?", (key, device_id))
                if changed.rowcount == 0:
                    raise UnknownDevice(f"no device {device_id!r}")
                self.db.log_change(conn, device_id, REKEYED)
        except RegistryUnavailable as exc:
            raise DeviceUnavailableError(str(exc)) from None

    def add_many(
        self,
        entries: Sequence[tuple[str, str | Hashed]],
        pool: ProcessPoolExecutor | None = None,
    ) -> int:
        """Register many devices at once, all or none: (id, password or ready hash) pairs,
        passwords hashed in `pool` when given (PBKDF2 is the cost; a ready hash costs nothing),
        stored in one transaction. RegistryError names the first bad, duplicate or existing
        id."""
        seen: set[str] = set()
        for device_id, secret in entries:
            check_device_id(device_id)
            if isinstance(secret, str):
                _check_password(secret)
            if device_id in seen:
                raise DeviceExists(f"device {device_id!r} is listed twice")
            seen.add(device_id)
        passwords = [secret for _, secret in entries if isinstance(secret, str)]
        if pool is not None and passwords:
            hashed: Iterable[tuple[bytes, bytes]] = pool.map(
                hash_password, passwords, chunksize=max(1, len(passwords) // 64)
            )
        else:
            hashed = map(hash_password, passwords)
        made = iter(hashed)
        now = time.time()
        devices = []
        for device_id, secret in entries:
            if isinstance(secret, str):
                salt, digest = next(made)
                devices.append(Device(device_id, salt, digest, ITERATIONS, now))
            else:
                devices.append(Device(device_id, secret[0], secret[1], secret[2], now))
        self._insert(devices)
        return len(devices)

    def _insert(self, devices: builtins.list[Device], psk: str | None = None) -> None:
        try:
            with self.db.write() as conn:
                if len(devices) > 1:  # name the first existing one instead of a bare failure
                    for d in devices:
                        found = conn.execute("SELECT 1 FROM devices WHERE id = ?", (d.device_id,))
                        if found.fetchone():
                            raise DeviceExists(f"device {d.device_id!r} exists already")
                conn.executemany(
                    f"INSERT INTO devices ({_COLUMNS}, psk) VALUES (?, ?, ?, ?, ?, 0, ?)",
                    [
                        (d.device_id, d.salt, d.password_hash, d.iterations, d.created,
                         psk.encode() if psk is not None else None)
                        for d in devices
                    ],
                )
                conn.executemany(
                    "INSERT INTO changes (device, op, at) VALUES (?, 'added', ?)",
                    [(d.device_id, d.created) for d in devices],
                )
                self.db.prune_changes(conn)
        except sqlite3.IntegrityError:
            raise DeviceExists(f"device {devices[0].device_id!r} exists already") from None
        except RegistryUnavailable as exc:
            raise DeviceUnavailableError(str(exc)) from None

    def remove(self, device_id: str) -> None:
        self._change(device_id, REMOVED, "DELETE FROM devices WHERE id = ?")

    def disable(self, device_id: str) -> None:
        self._change(device_id, DISABLED, "UPDATE devices SET disabled = 1 WHERE id = ?")

    def enable(self, device_id: str) -> None:
        self._change(device_id, "enabled", "UPDATE devices SET disabled = 0 WHERE id = ?")

    def _change(self, device_id: str, op: str, sql: str) -> None:
        try:
            with self.db.write() as conn:
                if conn.execute(sql, (device_id,)).rowcount == 0:
                    raise UnknownDevice(f"no device {device_id!r}")
                self.db.log_change(conn, device_id, op)
        except RegistryUnavailable as exc:
            raise DeviceUnavailableError(str(exc)) from None
        self._verified.pop(device_id, None)
