"""Who may publish and subscribe where.

`device` mode: a device publishes under `devices/{id}/...` and `$shadow/{id}/...` and subscribes to
`devices/{id}/commands/...` and `$shadow/{id}/...`, its own id spelled out (no wildcard for the id).
An identity that is not a valid device id (`+`, `#`, `a/b`, empty, `$...`) is granted nothing:
its characters must never widen a pattern (the CONNECT refuses such ids in device mode too).
Service accounts (applications, named in the ACL file and registered like devices) get the
publish and subscribe patterns the file gives them instead.
`open` mode: a general broker. In both, configured deny filters win (anonymous clients too).

The ACL file (`--acl-file`, TOML):

    deny_publish = ["$SYS/#"]
    deny_subscribe = ["secret/#"]

    [[service]]
    name = "billing"                       # its user name (`iotgw devices add billing`)
    publish = ["devices/+/commands/#"]
    subscribe = ["devices/+/telemetry/#", "devices/+/events/#"]
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway._native import mqtt
from gateway.auth import valid_device_id
from gateway.mqtt.topics import SubscriptionTrie


def _overlaps(pattern: str, topic_filter: str) -> bool:
    """True when some topic matches both (a deny rule must treat an overlap as a hit)."""
    p_levels, f_levels = pattern.split("/"), topic_filter.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(f_levels):
            return False
        f = f_levels[i]
        if f == "#":
            return True  # the filter reaches into what the pattern names
        if p != "+" and f != "+" and p != f:
            return False
    return len(p_levels) == len(f_levels)


def _within(topic_filter: str, pattern: str) -> bool:
    """True when every topic `topic_filter` matches is also matched by `pattern`."""
    p_levels, f_levels = pattern.split("/"), topic_filter.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(f_levels):
            return False
        f = f_levels[i]
        if f == "#" or (f == "+" and p != "+") or (p not in ("+", f)):
            return False
    return len(p_levels) == len(f_levels)


@dataclass(frozen=True)
class ServiceAccount:
    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


class AclError(ValueError):
    """The ACL file is unreadable or names an invalid topic filter."""


class Acl:
    def __init__(
        self,
        mode: str,
        deny_publish: Iterable[str] = (),
        deny_subscribe: Iterable[str] = (),
        services: Iterable[ServiceAccount] = (),
    ) -> None:
        if mode not in ("device", "open"):
            raise AclError(f"ACL mode {mode!r} is not device or open")
        self.mode = mode
        self._deny_publish: SubscriptionTrie[str, None] = SubscriptionTrie()
        for f in deny_publish:
            self._deny_publish.add(f, f, None)
        self._deny_subscribe = list(deny_subscribe)
        self.services: dict[str, ServiceAccount] = {}
        self._service_publish: dict[str, SubscriptionTrie[str, None]] = {}
        for s in services:
            self.services[s.name] = s
            trie: SubscriptionTrie[str, None] = SubscriptionTrie()
            for f in s.publish:
                trie.add(f, f, None)
            self._service_publish[s.name] = trie

    @classmethod
    def from_config(cls, mode: str, path: str | None) -> Acl:
        if path is None:
            return cls(mode)
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AclError(f"ACL file {path}: {exc}") from None
        return cls(
            mode,
            _filters(doc, "deny_publish", path),
            _filters(doc, "deny_subscribe", path),
            [_service(entry, path) for entry in doc.get("service", [])],
        )

    def is_service(self, identity: str) -> bool:
        return identity in self.services

    def can_publish(self, identity: str, topic: str) -> bool:
        if topic.startswith("$SYS/"):
            return False  # the gateway's own statistics (gateway/systopics.py)
        if self._deny_publish.size and self._deny_publish.match(topic):
            return False
        if self.mode == "open":
            return True
        service = self._service_publish.get(identity)
        if service is not None:
            return bool(service.match(topic))
        levels = topic.split("/", 2)
        # An identity that is no device id (empty, `$...`) owns no topic: it must not match an
        # empty or `$` level of someone's topic. (Wildcards cannot occur in a topic name.)
        return (
            len(levels) == 3
            and levels[1] == identity
            and levels[0] in ("devices", "$shadow")
            and identity != ""
            and not identity.startswith("$")
        )

    def can_subscribe(self, identity: str, topic_filter: str) -> bool:
        if self._deny_subscribe and any(_overlaps(p, topic_filter) for p in self._deny_subscribe):
            return False
        if self.mode == "open":
            return True
        service = self.services.get(identity)
        if service is not None:
            return any(_within(topic_filter, p) for p in service.subscribe)
        levels = topic_filter.split("/")
        if len(levels) < 3 or levels[1] != identity or not valid_device_id(identity):
            return False  # a client id `+` must not subscribe to `$shadow/+/#`
        if levels[0] == "$shadow":
            return True
        return levels[0] == "devices" and levels[2] == "commands"


def _filters(doc: Mapping[str, Any], key: str, path: str) -> list[str]:
    value = doc.get(key, [])
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise AclError(f"ACL file {path}: {key} must be a list of topic filters")
    for f in value:
        try:
            mqtt.validate_topic_filter(f)
        except (TypeError, mqtt.MqttError) as exc:
            raise AclError(f"ACL file {path}: {key}: {f!r} is not a topic filter: {exc}") from None
    return list(value)


def _service(entry: Any, path: str) -> ServiceAccount:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise AclError(f"ACL file {path}: every [[service]] needs a name")
    unknown = set(entry) - {"name", "publish", "subscribe"}
    if unknown:
        raise AclError(f"ACL file {path}: unknown service keys {sorted(unknown)}")
    return ServiceAccount(
        entry["name"],
        tuple(_filters(entry, "publish", path)),
        tuple(_filters(entry, "subscribe", path)),
    )
