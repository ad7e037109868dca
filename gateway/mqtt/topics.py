"""Topic matching without linear scans: a trie of subscription filters (publish -> subscribers)
and a tree of retained topics (new subscription filter -> retained messages).

Filters are assumed valid (the codec checks `+`/`#` placement). Topics starting with `$` are
never matched by a filter whose first level is a wildcard (MQTT 3.1.1 4.7.2, 5.0 4.7.2).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _FilterNode(Generic[K, V]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _FilterNode[K, V]] = {}
        self.subscribers: dict[K, V] = {}


class SubscriptionTrie(Generic[K, V]):
    """Maps topic filters to subscribers: `add(filter, key, value)`, `match(topic)`.

    A key (a session, a shared-subscription group) holds at most one value per filter; the same
    key may match a topic through several filters, and `match` then yields it once per filter so
    the caller can merge (highest QoS, every subscription identifier)."""

    def __init__(self) -> None:
        self._root: _FilterNode[K, V] = _FilterNode()
        self.size = 0  # filters x keys; an attribute: the PUBLISH path reads it, len() costs a call

    def __len__(self) -> int:
        return self.size

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Subscribe `key`; returns True when it was not subscribed to this filter before."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _FilterNode()
            node = child
        is_new = key not in node.subscribers
        node.subscribers[key] = value
        self.size += is_new
        return is_new

    def remove(self, topic_filter: str, key: K) -> bool:
        """Unsubscribe `key`; returns False when it was not subscribed. Prunes empty branches."""
        path: list[tuple[_FilterNode[K, V], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.subscribers.pop(key, _MISSING) is _MISSING:
            return False
        self.size -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.subscribers or child.children:
                break
            del parent.children[level]
        return True

    def get(self, topic_filter: str, key: K) -> V | None:
        node: _FilterNode[K, V] | None = self._root
        for level in topic_filter.split("/"):
            node = node.children.get(level) if node is not None else None
        return None if node is None else node.subscribers.get(key)

    def match(self, topic: str) -> list[tuple[K, V]]:
        """Every (key, value) whose filter matches the topic name."""
        found: list[tuple[K, V]] = []
        nodes = [self._root]
        wildcards_allowed = not topic.startswith("$")
        for level in topic.split("/"):
            following: list[_FilterNode[K, V]] = []
            for node in nodes:
                children = node.children
                if wildcards_allowed:
                    multi = children.get("#")
                    if multi is not None:
                        found.extend(multi.subscribers.items())
                    single = children.get("+")
                    if single is not None:
                        following.append(single)
                exact = children.get(level)
                if exact is not None:
                    following.append(exact)
            if not following:
                return found
            nodes = following
            wildcards_allowed = True
        for node in nodes:
            found.extend(node.subscribers.items())
            multi = node.children.get("#")  # "a/#" also matches "a" itself
            if multi is not None:
                found.extend(multi.subscribers.items())
        return found


class _TopicNode(Generic[V]):
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[str, _TopicNode[V]] = {}
        self.value: V | None = None


class TopicTree(Generic[V]):
    """Values stored by exact topic name (retained messages), found by a filter."""

    def __init__(self) -> None:
        self._root: _TopicNode[V] = _TopicNode()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def set(self, topic: str, value: V) -> None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _TopicNode()
            node = child
        self._count += node.value is None
        node.value = value

    def get(self, topic: str) -> V | None:
        node: _TopicNode[V] | None = self._root
        for level in topic.split("/"):
            node = node.children.get(level) if node is not None else None
        return None if node is None else node.value

    def delete(self, topic: str) -> bool:
        path: list[tuple[_TopicNode[V], str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.value is None:
            return False
        node.value = None
        self._count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.value is not None or child.children:
                break
            del parent.children[level]
        return True

    def items(self) -> Iterator[tuple[str, V]]:
        """Every (topic, value), `$` topics included."""
        if self._root.value is not None:  # pragma: no cover - the root is never a topic
            yield "", self._root.value
        yield from self._walk_all(self._root, (), dollar_guard=False)

    def match(self, topic_filter: str) -> Iterator[tuple[str, V]]:
        """(topic, value) for every stored topic the filter matches."""
        levels = topic_filter.split("/")
        stack: list[tuple[_TopicNode[V], int, tuple[str, ...]]] = [(self._root, 0, ())]
        while stack:
            node, depth, prefix = stack.pop()
            if depth == len(levels):
                if node.value is not None:
                    yield "/".join(prefix), node.value
                continue
            level = levels[depth]
            # A leading wildcard does not reach `$` topics.
            dollar_guard = depth == 0
            if level == "#":
                if node.value is not None and depth > 0:  # "a/#" matches "a"
                    yield "/".join(prefix), node.value
                yield from self._walk_all(node, prefix, dollar_guard)
            elif level == "+":
                for name, child in node.children.items():
                    if not (dollar_guard and name.startswith("$")):
                        stack.append((child, depth + 1, (*prefix, name)))
            else:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, depth + 1, (*prefix, level)))

    @staticmethod
    def _walk_all(
        node: _TopicNode[V], prefix: tuple[str, ...], dollar_guard: bool
    ) -> Iterator[tuple[str, V]]:
        stack = [
            (child, (*prefix, name))
            for name, child in node.children.items()
            if not (dollar_guard and name.startswith("$"))
        ]
        while stack:
            current, path = stack.pop()
            if current.value is not None:
                yield "/".join(path), current.value
            stack.extend((child, (*path, name)) for name, child in current.children.items())


_MISSING = object()
