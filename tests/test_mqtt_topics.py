"""Subscription trie and retained-topic tree against a brute-force reference matcher."""

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mqtt.topics import SubscriptionTrie, TopicTree


def reference_match(topic_filter: str, topic: str) -> bool:
    """MQTT matching, written as plainly as possible (the spec's examples, 4.7)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def test_spec_examples() -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    for f in [
        "sport/tennis/player1/#",
        "sport/#",
        "#",
        "+/tennis/#",
        "sport/+",
        "+",
        "/+",
        "+/+",
        "$SYS/#",
        "$SYS/monitor/+",
    ]:
        trie.add(f, f, 0)

    def keys(topic: str) -> set[str]:
        return {k for k, _ in trie.match(topic)}

    assert keys("sport/tennis/player1") == {"sport/tennis/player1/#", "sport/#", "#", "+/tennis/#"}
    assert keys("sport") == {"sport/#", "#", "+"}  # "sport/#" matches its parent level
    assert keys("sport/") == {"sport/#", "#", "sport/+", "+/+"}
    assert keys("/finance") == {"#", "/+", "+/+"}
    assert keys("$SYS/monitor/Clients") == {"$SYS/#", "$SYS/monitor/+"}  # no leading wildcard


def test_overlapping_filters_yield_the_key_once_per_filter() -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    trie.add("a/+", "s1", 1)
    trie.add("a/#", "s1", 2)
    assert sorted(trie.match("a/b")) == [("s1", 1), ("s1", 2)]


def test_remove_prunes_and_reports_absence() -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    assert trie.add("a/b/c", "s", 0) and not trie.add("a/b/c", "s", 1)
    assert trie.get("a/b/c", "s") == 1 and len(trie) == 1
    assert trie.remove("a/b/c", "s") and not trie.remove("a/b/c", "s")
    assert trie.match("a/b/c") == [] and len(trie) == 0
    assert trie._root.children == {}


levels = st.sampled_from(["a", "b", "", "$x"])
topics = st.lists(levels, min_size=1, max_size=4).map("/".join)
filters = st.lists(st.sampled_from(["a", "b", "", "+", "$x"]), min_size=1, max_size=4).flatmap(
    lambda ls: st.sampled_from(["/".join(ls), "/".join([*ls, "#"]), "#"])
)


@settings(max_examples=300)
@given(st.lists(filters, max_size=12, unique=True), topics)
def test_trie_matches_reference(filter_list: list[str], topic: str) -> None:
    trie: SubscriptionTrie[str, None] = SubscriptionTrie()
    for f in filter_list:
        trie.add(f, f, None)
    assert {k for k, _ in trie.match(topic)} == {
        f for f in filter_list if reference_match(f, topic)
    }


@settings(max_examples=300)
@given(st.lists(topics, max_size=12, unique=True), filters)
def test_retained_tree_matches_reference(topic_list: list[str], topic_filter: str) -> None:
    tree: TopicTree[int] = TopicTree()
    for i, t in enumerate(topic_list):
        tree.set(t, i)
    found = dict(tree.match(topic_filter))
    assert set(found) == {t for t in topic_list if reference_match(topic_filter, t)}
    for t in topic_list:
        assert tree.get(t) == topic_list.index(t)
    for t in topic_list:
        assert tree.delete(t)
    assert len(tree) == 0 and tree._root.children == {}
