"""The device registry: salted hashes on disk, CLI-style edits seen by a running reader."""

from pathlib import Path

import pytest

from gateway.auth import DeviceRegistry, RegistryError


def test_added_device_verifies_only_with_its_password(tmp_path: Path) -> None:
    reg = DeviceRegistry(tmp_path)
    reg.add("dev-1", "s3cret")
    assert reg.verify("dev-1", b"s3cret")
    assert reg.verify("dev-1", b"s3cret")  # second time from the cache
    assert not reg.verify("dev-1", b"wrong")
    assert not reg.verify("dev-1", None)
    assert not reg.verify("dev-2", b"s3cret")
    assert not reg.verify("dev-1", b"\xff\xfe")
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("registry.sqlite*"))
    assert b"s3cret" not in stored


def test_a_second_reader_sees_additions_and_removals(tmp_path: Path) -> None:
    cli, gateway = DeviceRegistry(tmp_path), DeviceRegistry(tmp_path)
    assert gateway.list() == []
    cli.add("dev-1", "pw")
    assert gateway.verify("dev-1", b"pw")
    cli.remove("dev-1")
    assert not gateway.verify("dev-1", b"pw")


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "$sys", "x\x00", "d" * 129])
def test_device_ids_must_be_one_topic_level(tmp_path: Path, bad: str) -> None:
    with pytest.raises(RegistryError):
        DeviceRegistry(tmp_path).add(bad, "pw")


def test_duplicates_missing_and_corrupt_files_are_errors(tmp_path: Path) -> None:
    reg = DeviceRegistry(tmp_path)
    reg.add("dev-1", "pw")
    with pytest.raises(RegistryError, match="exists already"):
        reg.add("dev-1", "pw")
    with pytest.raises(RegistryError, match="no device"):
        reg.remove("dev-9")
    (tmp_path / "registry.sqlite").write_bytes(b"{not a database" * 1000)
    with pytest.raises(RegistryError, match="unreadable"):
        DeviceRegistry(tmp_path).list()
