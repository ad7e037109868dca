"""The registry database (registry.sqlite): concurrent writers in real processes lose nothing,
earlier JSON files are migrated, bulk import, disable/enable and the change log."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import stop_process

from gateway import cli
from gateway.auth import DeviceRegistry, RegistryError
from gateway.tokens import TokenStore

CLI = [sys.executable, "-m", "gateway.cli"]


def _cli(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "devices", "--data-dir", str(data_dir), *args],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


def test_parallel_cli_adds_all_succeed_and_every_printed_password_verifies(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"  # fresh: the processes also race to create the file
    procs = [
        subprocess.Popen(
            [*CLI, "devices", "--data-dir", str(data), "add", f"dev-{i}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(50)
    ]
    printed: dict[str, str] = {}
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and err == f"iotgw: data dir {data}\n", err
        device, password = out.strip().split("\t")
        printed[device] = password
    reg = DeviceRegistry(data)
    assert [d.device_id for d in reg.list()] == sorted(printed)
    for device, password in printed.items():
        assert reg.verify(device, password.encode()), device


def test_parallel_adds_of_one_id_store_it_once_and_the_others_fail_with_one_line(
    tmp_path: Path,
) -> None:
    procs = [
        subprocess.Popen(
            [*CLI, "devices", "--data-dir", str(tmp_path), "add", "same"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(8)
    ]
    try:
        results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    finally:
        for p in procs:
            stop_process(p, 0)
    winners = [out for code, out, _ in results if code == 0]
    assert len(winners) == 1
    for code, _, err in results:
        if code != 0:
            assert code == 2 and err.count("\n") == 1 and "exists already" in err, err
    password = winners[0].strip().split("\t")[1]
    assert DeviceRegistry(tmp_path).verify("same", password.encode())


def test_verify_and_get_are_thread_safe_while_another_process_writes(tmp_path: Path) -> None:
    reg = DeviceRegistry(tmp_path)
    reg.add("seed", "pw")
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                assert reg.verify("seed", b"pw")
                reg.get("new-0")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        result = _cli(tmp_path, "add", "new-0")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert result.returncode == 0 and errors == []
    password = result.stdout.strip().split("\t")[1]
    assert reg.verify("new-0", password.encode())  # seen at once, no restart


def _old_hash(password: str, salt: bytes) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 20_000).hex()


def test_json_files_of_earlier_versions_are_migrated_once(tmp_path: Path) -> None:
    salt = b"s" * 16
    (tmp_path / "devices.json").write_text(json.dumps({"devices": [
        {"id": "old-1", "salt": salt.hex(), "hash": _old_hash("pw1", salt),
         "iterations": 20_000, "created": 1.5},
    ]}))
    secret = "A" * 43
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": [
        {"id": "0123456789ab", "name": "dash", "scopes": ["devices:read", "shadow:read"],
         "salt": salt.hex(), "hash": _old_hash(secret, salt), "iterations": 20_000,
         "created": 2.5},
    ]}))
    reg = DeviceRegistry(tmp_path)
    assert reg.verify("old-1", b"pw1") and not reg.verify("old-1", b"pw2")
    principal = TokenStore(tmp_path).authenticate(f"iotgw_0123456789ab_{secret}")
    assert principal is not None and principal.name == "dash"
    assert principal.scopes == {"devices:read", "shadow:read"}
    assert not (tmp_path / "devices.json").exists()
    assert (tmp_path / "devices.json.migrated").exists()
    assert (tmp_path / "tokens.json.migrated").exists()
    assert (tmp_path / "registry.sqlite").stat().st_mode & 0o077 == 0
    reg.add("new-1", "pw")
    # a devices.json appearing later (an old CLI) is not imported again over the registry
    (tmp_path / "devices.json").write_text('{"devices": []}')
    assert [d.device_id for d in DeviceRegistry(tmp_path).list()] == ["new-1", "old-1"]


def test_a_corrupt_json_file_fails_the_migration_with_a_plain_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "devices.json").write_text("{not json")
    assert cli.main(["devices", "--data-dir", str(tmp_path), "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iotgw: cannot migrate") and err.count("\n") == 1
    assert (tmp_path / "devices.json").read_text() == "{not json"  # kept for the operator


def test_a_corrupt_registry_is_one_line_and_exit_2_for_the_cli_and_run(tmp_path: Path) -> None:
    (tmp_path / "registry.sqlite").write_bytes(b"this is not a database" * 100)
    for args in (["devices", "--data-dir", str(tmp_path), "list"],
                 ["run", "--data-dir", str(tmp_path), "--mqtt-port", "0", "--http-port", "0",
                  "--coap-port", "0"]):
        result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "registry.sqlite" in result.stderr and "Traceback" not in result.stderr


def test_import_csv_generates_missing_passwords_and_every_one_verifies(tmp_path: Path) -> None:
    rows = ["id,password"] + [
        f"csv-{i},given-{i}" if i % 2 else f"csv-{i}," for i in range(200)
    ]
    (tmp_path / "devices.csv").write_text("\n".join(rows) + "\n")
    result = _cli(tmp_path / "d", "import", str(tmp_path / "devices.csv"))
    assert result.returncode == 0, result.stderr
    assert "imported 200 devices" in result.stderr
    generated = dict(line.split("\t") for line in result.stdout.splitlines())
    assert sorted(generated) == sorted(f"csv-{i}" for i in range(0, 200, 2))
    reg = DeviceRegistry(tmp_path / "d")
    assert len(reg.list()) == 200
    for i in range(200):
        password = f"given-{i}" if i % 2 else generated[f"csv-{i}"]
        assert reg.verify(f"csv-{i}", password.encode())


def test_import_of_ready_hashes_needs_no_pbkdf2_and_keeps_the_passwords(tmp_path: Path) -> None:
    """Devices moved from another system (passlib's pbkdf2_sha256 format) keep their passwords;
    storing a ready hash costs no PBKDF2, so thousands go in per second."""
    import base64
    import hashlib

    salt = b"moved-salt-16by!"
    digest = hashlib.pbkdf2_hmac("sha256", b"old-password", salt, 29000)

    def ab64(raw: bytes) -> str:  # passlib's alphabet: '.' for '+', no padding
        return base64.b64encode(raw).decode().rstrip("=").replace("+", ".")

    phc = f"$pbkdf2-sha256$29000${ab64(salt)}${ab64(digest)}"
    count = 5000
    rows = ["id,password_hash"] + [f"moved-{i},{phc}" for i in range(count)]
    (tmp_path / "moved.csv").write_text("\n".join(rows) + "\n")
    result = _cli(tmp_path / "d", "import", str(tmp_path / "moved.csv"))
    assert result.returncode == 0, result.stderr
    assert f"imported {count} devices" in result.stderr and result.stdout == ""
    print(result.stderr.strip())  # the rate, for the record
    reg = DeviceRegistry(tmp_path / "d")
    assert reg.verify("moved-0", b"old-password") and reg.verify("moved-4999", b"old-password")
    assert not reg.verify("moved-1", b"new-password")


def test_import_json_is_all_or_nothing(tmp_path: Path) -> None:
    DeviceRegistry(tmp_path).add("taken", "pw")
    doc = [{"id": "j-1", "password": "a"}, {"id": "taken"}, {"id": "j-2"}]
    path = tmp_path / "in.json"
    path.write_text(json.dumps(doc))
    result = _cli(tmp_path, "import", str(path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "'taken' exists already" in result.stderr and result.stdout == ""
    assert [d.device_id for d in DeviceRegistry(tmp_path).list()] == ["taken"]
    doc[1] = {"id": "j-3"}
    path.write_text(json.dumps(doc))
    result = _cli(tmp_path, "import", str(path))
    assert result.returncode == 0
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["j-3", "j-2"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "device,secret\nx,y\n", "the first line must be a header"),
        ("a.csv", "id,password_hash\nx,$md5$1$2\n", "line 2: a password hash reads"),
        ("a.csv", "id,password_hash\nx,$pbkdf2-sha256$1000$c2FsdHNhbHQ$" + "A" * 43 + "\n",
         "10000 iterations or more"),
        ("a.json", '[{"id": "x", "password": "a", "password_hash": "b"}]', "not both"),
        ("a.csv", "id,password\nok,1\nbad/id,2\n", "may not contain"),
        ("a.csv", "id,password\nd,1\nd,2\n", "listed twice"),
        ("a.json", '{"id": "x"}', "JSON list"),
        ("a.json", '[{"id": 5}]', "item 0"),
        ("a.json", "[", "not JSON"),
    ],
)
def test_bad_import_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    (tmp_path / name).write_text(text)
    assert cli.main(["devices", "--data-dir", str(tmp_path), "import", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert DeviceRegistry(tmp_path).list() == []


def test_disable_enable_and_the_change_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = DeviceRegistry(tmp_path)
    cursor, changes = gateway.changes_since(None)
    assert changes == {}
    for action, device in [("add", "a"), ("add", "b"), ("add", "c"), ("disable", "a"),
                           ("remove", "b"), ("disable", "c"), ("remove", "c")]:
        args = [action, device] + (["--password", "pw"] if action == "add" else [])
        assert cli.main(["devices", "--data-dir", str(tmp_path), *args]) == 0
    capsys.readouterr()
    assert cli.main(["devices", "--data-dir", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out == "a\tdisabled\n"
    assert not gateway.verify("a", b"pw") and gateway.disabled("a")
    cursor, changes = gateway.changes_since(cursor)
    assert changes == {"a": "disabled", "b": "removed", "c": "removed"}
    assert gateway.changes_since(cursor) == (cursor, {})
    assert cli.main(["devices", "--data-dir", str(tmp_path), "enable", "a"]) == 0
    assert gateway.verify("a", b"pw") and not gateway.disabled("a")
    assert gateway.changes_since(cursor)[1] == {}  # enabling revokes nothing
    assert cli.main(["devices", "--data-dir", str(tmp_path), "disable", "zz"]) == 2


def test_a_device_added_again_does_not_accept_its_old_password(tmp_path: Path) -> None:
    gateway, admin = DeviceRegistry(tmp_path), DeviceRegistry(tmp_path)
    admin.add("d", "old")
    assert gateway.verify("d", b"old")  # remembered
    admin.remove("d")
    admin.add("d", "new")
    assert not gateway.verify("d", b"old")
    assert gateway.verify("d", b"new")


def test_a_revoked_and_recreated_token_does_not_inherit_a_remembered_success(
    tmp_path: Path,
) -> None:
    gateway, admin = TokenStore(tmp_path), TokenStore(tmp_path)
    token = admin.create("app", "shadow:read")
    assert gateway.authenticate(token) is not None
    admin.revoke("app")
    assert gateway.authenticate(token) is None
    with pytest.raises(RegistryError):
        DeviceRegistry(tmp_path).remove("nobody")
