"""Bearer tokens for the REST API: named, scoped, kept as salted hashes in the registry
database (gateway/registrydb.py: `registry.sqlite` in the data dir) and managed with
`iotgw tokens create|list|revoke`.

A token reads `iotgw_<id>_<secret>`: `id` finds the entry without trying every hash, `secret`
(32 random bytes) is checked against a PBKDF2-HMAC-SHA256 hash with a per-token salt, as the
device registry does for passwords (gateway/auth.py). Successful checks are remembered under a
keyed digest so that only the first request of a token pays for PBKDF2.

Scopes: `shadow:read`, `shadow:write`, `devices:read`, `devices:write` (provisioning:
add, remove, disable, enable devices), `commands:write`, and `admin`, which grants every
scope. A token's name is the writer id of its shadow writes (version vectors).

The bootstrap admin token (`--api-token` / `IOTGW_API_TOKEN`) is never written anywhere; it has
the name `admin`, which stored tokens may therefore not take. Every lookup reads the
database, so a token created or revoked by the CLI takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from gateway.registrydb import RegistryDb, RegistryUnavailable

ITERATIONS: Final = 20_000
BOOTSTRAP_NAME: Final = "admin"
PREFIX: Final = "iotgw_"

SHADOW_READ: Final = "shadow:read"
SHADOW_WRITE: Final = "shadow:write"
DEVICES_READ: Final = "devices:read"
DEVICES_WRITE: Final = "devices:write"
COMMANDS_WRITE: Final = "commands:write"
ADMIN: Final = "admin"
SCOPES: Final = (SHADOW_READ, SHADOW_WRITE, DEVICES_READ, DEVICES_WRITE, COMMANDS_WRITE, ADMIN)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN = re.compile(r"iotgw_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


class TokenError(ValueError):
    """A bad name or scope, a duplicate, an unknown token or an unreadable token file."""


@dataclass(frozen=True)
class Token:
    token_id: str
    name: str
    scopes: frozenset[str]
    salt: bytes
    secret_hash: bytes
    iterations: int
    created: float

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class Principal:
    """Who a request is made by: the token's name (the shadow writer id) and its scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes


def parse_scopes(text: str | Iterable[str]) -> frozenset[str]:
    """`shadow:read,shadow:write` (or a list) -> scopes; TokenError for unknown ones."""
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = frozenset(s.strip() for s in items if s.strip())
    if not scopes:
        raise TokenError(f"give at least one scope: {', '.join(SCOPES)}")
    unknown = scopes - set(SCOPES)
    if unknown:
        raise TokenError(
            f"unknown scopes {', '.join(sorted(unknown))}; known: {', '.join(SCOPES)}"
        )
    return scopes


def _hash(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


_COLUMNS: Final = "id, name, scopes, salt, hash, iterations, created"


def _token(row: tuple[str, str, str, bytes, bytes, int, float]) -> Token:
    return Token(row[0], row[1], frozenset(row[2].split(",")), row[3], row[4], row[5], row[6])


class TokenStore:
    """Thread-safe: a connection per thread (gateway/registrydb.py), and the remembered-success
    cache is one dict whose single-key reads and writes are atomic."""

    def __init__(self, data_dir: str | os.PathLike[str], bootstrap: str | None = None) -> None:
        try:
            self.db = RegistryDb(data_dir)
        except RegistryUnavailable as exc:
            raise TokenError(str(exc)) from None
        self.path = self.db.path
        self._bootstrap = bootstrap.encode() if bootstrap else None
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}  # token id -> keyed digest of the whole token

    # ---- reading ----------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[Token]:
        try:
            return [_token(r) for r in self.db.query(sql, params)]
        except RegistryUnavailable as exc:
            raise TokenError(str(exc)) from None

    def list(self) -> list[Token]:
        return self._query(f"SELECT {_COLUMNS} FROM tokens ORDER BY name")

    def empty(self) -> bool:
        """True when no token can ever be valid: no bootstrap token and no stored token."""
        if self._bootstrap is not None:
            return False
        return not self._query(f"SELECT {_COLUMNS} FROM tokens LIMIT 1")

    def lookup(self, token: str) -> tuple[Token | Principal | None, bool]:
        """Resolve a presented token without paying for PBKDF2.

        Returns (principal, True) when the answer is final (known good, or certainly invalid),
        or (stored token, False) when the secret still has to be checked with `verify_slow`
        (a blocking call: run it in an executor)."""
        if self._bootstrap is not None and hmac.compare_digest(token.encode(), self._bootstrap):
            return Principal(BOOTSTRAP_NAME, frozenset({ADMIN})), True
        m = _TOKEN.fullmatch(token)
        if m is None:
            return None, True
        found = self._query(f"SELECT {_COLUMNS} FROM tokens WHERE id = ?", (m.group(1),))
        if not found:
            return None, True
        stored = found[0]
        remembered = self._verified.get(stored.token_id)
        if remembered is not None and hmac.compare_digest(remembered, self._digest(token, stored)):
            return Principal(stored.name, stored.scopes), True
        return stored, False

    def verify_slow(self, stored: Token, token: str) -> Principal | None:
        """The PBKDF2 check of `token` against `stored` (blocking, thread-safe)."""
        m = _TOKEN.fullmatch(token)
        if m is None or m.group(1) != stored.token_id:
            return None
        expected = _hash(m.group(2), stored.salt, stored.iterations)
        if not hmac.compare_digest(expected, stored.secret_hash):
            return None
        self._verified[stored.token_id] = self._digest(token, stored)
        return Principal(stored.name, stored.scopes)

    def authenticate(self, token: str) -> Principal | None:
        """Both steps at once (blocking): for the CLI and tests."""
        found, final = self.lookup(token)
        if final:
            return found if isinstance(found, Principal) else None
        assert isinstance(found, Token)
        return self.verify_slow(found, token)

    def _digest(self, token: str, stored: Token) -> bytes:
        # the salt is in it: a remembered success belongs to this stored token only
        return hmac.new(self._cache_key, stored.salt + token.encode(), "sha256").digest()

    # ---- writing (the CLI) ------------------------------------------------------------------

    def create(self, name: str, scopes: str | Iterable[str]) -> str:
        """Store a new token and return it: the only time the secret is visible."""
        if not _NAME.fullmatch(name):
            raise TokenError(
                "a token name is 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if name == BOOTSTRAP_NAME:
            raise TokenError(f"the name {BOOTSTRAP_NAME!r} belongs to the bootstrap token")
        parsed = parse_scopes(scopes)
        token_id = secrets.token_hex(6)  # 48 random bits: a clash is an IntegrityError below
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        row = (
            token_id, name, ",".join(sorted(parsed)), salt, _hash(secret, salt, ITERATIONS),
            ITERATIONS, time.time(),
        )
        try:
            with self.db.write() as conn:
                if conn.execute("SELECT 1 FROM tokens WHERE name = ?", (name,)).fetchone():
                    raise TokenError(f"a token named {name!r} exists already (revoke it first)")
                conn.execute(f"INSERT INTO tokens ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        except sqlite3.IntegrityError:  # pragma: no cover - 48 random bits
            raise TokenError("token id clash: try again") from None
        except RegistryUnavailable as exc:
            raise TokenError(str(exc)) from None
        return f"{PREFIX}{token_id}_{secret}"

    def revoke(self, name: str) -> None:
        try:
            with self.db.write() as conn:
                if conn.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount == 0:
                    raise TokenError(f"no token named {name!r}")
        except RegistryUnavailable as exc:
            raise TokenError(str(exc)) from None
