"""The device registry: device ids with salted password hashes, kept in one JSON file in the
data dir and managed with `iotgw devices add|list|remove`.

The running gateway re-reads the file when it changes, so devices added by the CLI can connect
without a restart. Hashes are PBKDF2-HMAC-SHA256 with a per-device random salt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.files import WatchedJson

ITERATIONS = 20_000
FILE_NAME = "devices.json"


class RegistryError(ValueError):
    """A bad device id, a duplicate, or an unreadable registry file."""


@dataclass(frozen=True)
class Device:
    device_id: str
    salt: bytes
    password_hash: bytes
    iterations: int
    created: float


def _hash(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


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


class DeviceRegistry:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._devices: dict[str, Device] = {}
        self._file = WatchedJson(self.path)
        # Successful checks are remembered (keyed by a keyed digest, not the password) so that a
        # reconnect storm does not pay PBKDF2 for every CONNECT.
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}

    # ---- reading ----------------------------------------------------------------------------

    def _refresh(self) -> None:
        try:
            changed, raw = self._file.changed()
            if not changed:
                return
            devices = {
                d["id"]: Device(
                    d["id"],
                    bytes.fromhex(d["salt"]),
                    bytes.fromhex(d["hash"]),
                    int(d["iterations"]),
                    float(d["created"]),
                )
                for d in (raw or {"devices": []})["devices"]
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"device registry {self.path} is unreadable: {exc}") from None
        self._file.accept()
        self._devices = devices
        self._verified.clear()

    def list(self) -> list[Device]:
        self._refresh()
        return sorted(self._devices.values(), key=lambda d: d.device_id)

    def get(self, device_id: str) -> Device | None:
        self._refresh()
        return self._devices.get(device_id)

    def verify(self, device_id: str, password: bytes | None) -> bool:
        """True when the device exists and the password is its password."""
        if password is None:
            return False
        device = self.get(device_id)
        if device is None:
            return False
        digest = hmac.new(self._cache_key, device_id.encode() + b"\0" + password, "sha256").digest()
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

    # ---- writing (the CLI) ------------------------------------------------------------------

    def add(self, device_id: str, password: str) -> Device:
        check_device_id(device_id)
        if not password:
            raise RegistryError("the password may not be empty")
        self._refresh()
        if device_id in self._devices:
            raise RegistryError(f"device {device_id!r} exists already")
        salt = secrets.token_bytes(16)
        device = Device(device_id, salt, _hash(password, salt, ITERATIONS), ITERATIONS, time.time())
        self._write({**self._devices, device_id: device})
        return device

    def remove(self, device_id: str) -> None:
        self._refresh()
        if device_id not in self._devices:
            raise RegistryError(f"no device {device_id!r}")
        self._write({k: v for k, v in self._devices.items() if k != device_id})

    def _write(self, devices: dict[str, Device]) -> None:
        doc: dict[str, Any] = {
            "devices": [
                {
                    "id": d.device_id,
                    "salt": d.salt.hex(),
                    "hash": d.password_hash.hex(),
                    "iterations": d.iterations,
                    "created": d.created,
                }
                for d in sorted(devices.values(), key=lambda d: d.device_id)
            ]
        }
        self._file.write(doc)
        self._refresh()
