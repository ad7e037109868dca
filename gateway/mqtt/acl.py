"""Who may publish and subscribe where.

`device` mode: a device publishes under `devices/{id}/...` and `$shadow/{id}/...` and subscribes to
`devices/{id}/commands/...` and `$shadow/{id}/...`, its own id spelled out (no wildcard for the id).
`open` mode: a general broker. In both, configured deny filters win (anonymous clients too).
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.mqtt.topics import SubscriptionTrie


def _filter_covers(pattern: str, topic_filter: str) -> bool:
    """True when every topic `topic_filter` can match is matched by `pattern` (or the two
    overlap in a wildcard, which a deny rule must treat as a hit)."""
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


class Acl:
    def __init__(
        self,
        mode: str,
        deny_publish: Iterable[str] = (),
        deny_subscribe: Iterable[str] = (),
    ) -> None:
        if mode not in ("device", "open"):
            raise ValueError(f"ACL mode {mode!r} is not device or open")
        self.mode = mode
        self._deny_publish: SubscriptionTrie[str, None] = SubscriptionTrie()
        for f in deny_publish:
            self._deny_publish.add(f, f, None)
        self._deny_subscribe = list(deny_subscribe)

    def can_publish(self, identity: str, topic: str) -> bool:
        if self._deny_publish.match(topic):
            return False
        if self.mode == "open":
            return True
        levels = topic.split("/", 2)
        return len(levels) == 3 and levels[1] == identity and levels[0] in ("devices", "$shadow")

    def can_subscribe(self, identity: str, topic_filter: str) -> bool:
        if any(_filter_covers(p, topic_filter) for p in self._deny_subscribe):
            return False
        if self.mode == "open":
            return True
        levels = topic_filter.split("/")
        if len(levels) < 3 or levels[1] != identity:
            return False
        if levels[0] == "$shadow":
            return True
        return levels[0] == "devices" and levels[2] == "commands"
