"""The REST API token store (gateway/tokens.py): salted hashes on disk, scopes, bootstrap token,
revocation seen by a running store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.tokens import (
    ADMIN,
    COMMANDS_WRITE,
    SHADOW_READ,
    SHADOW_WRITE,
    Principal,
    Token,
    TokenError,
    TokenStore,
    parse_scopes,
)


def test_created_token_authenticates_with_its_name_and_scopes(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token = store.create("app1", "shadow:read, shadow:write")
    principal = store.authenticate(token)
    assert principal == Principal("app1", frozenset({SHADOW_READ, SHADOW_WRITE}))
    assert principal.allows(SHADOW_WRITE) and not principal.allows(COMMANDS_WRITE)
    assert store.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.authenticate("not-a-token") is None


def _stored(tmp_path: Path) -> bytes:
    """Every byte of the registry, its write-ahead log included."""
    return b"".join(p.read_bytes() for p in sorted(tmp_path.glob("registry.sqlite*")))


def test_only_a_salted_hash_is_stored(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token = store.create("app1", [SHADOW_READ])
    data = _stored(tmp_path)
    secret = token.split("_", 2)[2]  # the secret itself may hold an underscore
    assert secret.encode() not in data and token.encode() not in data
    assert (tmp_path / "registry.sqlite").stat().st_mode & 0o077 == 0
    store.create("app2", [SHADOW_READ])
    with sqlite3.connect(tmp_path / "registry.sqlite") as db:
        rows = db.execute("SELECT salt, hash, iterations FROM tokens").fetchall()
    assert len({salt for salt, _, _ in rows}) == 2 and {i for _, _, i in rows} == {20_000}


def test_first_check_pays_pbkdf2_then_it_is_remembered(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token = store.create("app1", [SHADOW_READ])
    found, final = store.lookup(token)
    assert not final and isinstance(found, Token)
    assert store.verify_slow(found, token) is not None
    found, final = store.lookup(token)
    assert final and isinstance(found, Principal)


def test_a_revoked_token_stops_working_in_a_store_that_is_already_running(
    tmp_path: Path,
) -> None:
    running = TokenStore(tmp_path)
    cli = TokenStore(tmp_path)
    token = cli.create("app1", [SHADOW_READ])
    assert running.authenticate(token) is not None
    cli.revoke("app1")
    assert running.authenticate(token) is None
    with pytest.raises(TokenError):
        cli.revoke("app1")


def test_bootstrap_token_is_an_admin_named_admin_and_never_stored(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, bootstrap="boot")
    principal = store.authenticate("boot")
    assert principal is not None and principal.name == "admin" and principal.allows(SHADOW_WRITE)
    assert b"boot" not in _stored(tmp_path)
    assert not store.empty()
    with pytest.raises(TokenError):
        store.create("admin", [ADMIN])


def test_empty_means_no_token_can_be_valid(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    assert store.empty()
    store.create("x", [SHADOW_READ])
    assert not store.empty()
    store.revoke("x")
    assert store.empty()


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 65, "é"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(TokenError):
        TokenStore(tmp_path).create(name, [SHADOW_READ])


def test_scopes_are_checked_and_duplicates_refused(tmp_path: Path) -> None:
    assert parse_scopes("admin") == frozenset({ADMIN})
    for bad in ("", "shadow:read,root", " , "):
        with pytest.raises(TokenError):
            parse_scopes(bad)
    store = TokenStore(tmp_path)
    store.create("app1", [SHADOW_READ])
    with pytest.raises(TokenError):
        store.create("app1", [SHADOW_WRITE])
    assert [t.name for t in store.list()] == ["app1"]


def test_an_unreadable_token_file_is_an_error_not_an_empty_store(tmp_path: Path) -> None:
    (tmp_path / "registry.sqlite").write_bytes(b"{broken" * 1000)
    with pytest.raises(TokenError):
        TokenStore(tmp_path).empty()
    (tmp_path / "registry.sqlite").unlink()
    (tmp_path / "tokens.json").write_text("{broken")  # an earlier version's file
    with pytest.raises(TokenError, match="cannot migrate"):
        TokenStore(tmp_path)
