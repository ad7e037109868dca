"""Bearer tokens for the REST API: named, scoped, kept as salted hashes in one JSON file in the
data dir and managed with `iotgw tokens create|list|revoke`.

A token reads `iotgw_<id>_<secret>`: `id` finds the entry without trying every hash, `secret`
(32 random bytes) is checked against a PBKDF2-HMAC-SHA256 hash with a per-token salt, as the
device registry does for passwords (gateway/auth.py). Successful checks are remembered under a
keyed digest so that only the first request of a token pays for PBKDF2.

Scopes: `shadow:read`, `shadow:write`, `devices:read`, `commands:write`, and `admin`, which
grants every scope. A token's name is the writer id of its shadow writes (version vectors).

The bootstrap admin token (`--api-token` / `IOTGW_API_TOKEN`) is never written anywhere; it has
the name `admin`, which stored tokens may therefore not take. The running gateway re-reads the
file when it changes, so a token created or revoked by the CLI takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gateway.files import WatchedJson

FILE_NAME: Final = "tokens.json"
ITERATIONS: Final = 20_000
BOOTSTRAP_NAME: Final = "admin"
PREFIX: Final = "iotgw_"

SHADOW_READ: Final = "shadow:read"
SHADOW_WRITE: Final = "shadow:write"
DEVICES_READ: Final = "devices:read"
COMMANDS_WRITE: Final = "commands:write"
ADMIN: Final = "admin"
SCOPES: Final = (SHADOW_READ, SHADOW_WRITE, DEVICES_READ, COMMANDS_WRITE, ADMIN)

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


class TokenStore:
    def __init__(self, data_dir: str | os.PathLike[str], bootstrap: str | None = None) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._bootstrap = bootstrap.encode() if bootstrap else None
        self._tokens: dict[str, Token] = {}  # by token id
        self._file = WatchedJson(self.path)
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}  # token id -> keyed digest of the whole token

    # ---- reading ----------------------------------------------------------------------------

    def _refresh(self) -> None:
        try:
            changed, raw = self._file.changed()
            if not changed:
                return
            tokens = {
                t["id"]: Token(
                    t["id"],
                    t["name"],
                    frozenset(t["scopes"]),
                    bytes.fromhex(t["salt"]),
                    bytes.fromhex(t["hash"]),
                    int(t["iterations"]),
                    float(t["created"]),
                )
                for t in (raw or {"tokens": []})["tokens"]
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TokenError(f"token file {self.path} is unreadable: {exc}") from None
        self._file.accept()
        self._tokens = tokens
        self._verified.clear()

    def list(self) -> list[Token]:
        self._refresh()
        return sorted(self._tokens.values(), key=lambda t: t.name)

    def empty(self) -> bool:
        """True when no token can ever be valid: no bootstrap token and no stored token."""
        if self._bootstrap is not None:
            return False
        self._refresh()
        return not self._tokens

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
        self._refresh()
        stored = self._tokens.get(m.group(1))
        if stored is None:
            return None, True
        remembered = self._verified.get(stored.token_id)
        if remembered is not None and hmac.compare_digest(remembered, self._digest(token)):
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
        self._verified[stored.token_id] = self._digest(token)
        return Principal(stored.name, stored.scopes)

    def authenticate(self, token: str) -> Principal | None:
        """Both steps at once (blocking): for the CLI and tests."""
        found, final = self.lookup(token)
        if final:
            return found if isinstance(found, Principal) else None
        assert isinstance(found, Token)
        return self.verify_slow(found, token)

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._cache_key, token.encode(), "sha256").digest()

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
        self._refresh()
        if any(t.name == name for t in self._tokens.values()):
            raise TokenError(f"a token named {name!r} exists already (revoke it first)")
        token_id = secrets.token_hex(6)
        while token_id in self._tokens:  # pragma: no cover - 48 random bits
            token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        entry = Token(
            token_id, name, parsed, salt, _hash(secret, salt, ITERATIONS), ITERATIONS, time.time()
        )
        self._write({**self._tokens, token_id: entry})
        return f"{PREFIX}{token_id}_{secret}"

    def revoke(self, name: str) -> None:
        self._refresh()
        kept = {k: t for k, t in self._tokens.items() if t.name != name}
        if len(kept) == len(self._tokens):
            raise TokenError(f"no token named {name!r}")
        self._write(kept)

    def _write(self, tokens: dict[str, Token]) -> None:
        doc: dict[str, Any] = {
            "tokens": [
                {
                    "id": t.token_id,
                    "name": t.name,
                    "scopes": sorted(t.scopes),
                    "salt": t.salt.hex(),
                    "hash": t.secret_hash.hex(),
                    "iterations": t.iterations,
                    "created": t.created,
                }
                for t in sorted(tokens.values(), key=lambda t: t.name)
            ]
        }
        self._file.write(doc)
        self._refresh()
