"""Property tests of the shadow rules through the store API, on SQLite and Redis.

Hypothesis drives random multi-step scenarios (nested desired/reported documents with nulls
and arrays, version expectations, writer ids and version-vector contexts, device ``seq``
values, limit violations, replaces and deletes; biased toward writes that are accepted:
about two thirds of the updates are) through a store and checks, after every step:

* for a plain update (no context, no seq), the verdict and the stored sections that the
  independent reference rules below work out (``reference_verdict``: merge patch, version
  compare-and-set, depth, size and finiteness limits), where they decide: an oracle that
  does not call the model the store calls;
* the store agrees with ``shadow.model`` applied to the previous stored shadow: the same
  document, the same accepted/delta payloads, the same error with the same message;
* the invariants of the specification (``shadow/model.py``'s docstring), checked against the
  independent reference functions below: versions and version vectors, refused writes store
  nothing, a plain write is a JSON merge patch with pruning, the change record turns version
  ``V-1`` into ``V``, the delta, the per-leaf metadata and the limits.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shadow.model import (
    DEFAULT_LIMITS,
    Limits,
    Shadow,
    ShadowError,
    UpdateResult,
    VersionConflict,
    apply_delete,
    apply_replace,
    apply_update,
)
from shadow.redis import RedisShadowStore
from shadow.sqlite import SqliteShadowStore
from shadow.store import BaseShadowStore

WRITERS = ["node-a", "node-b", "app"]
KEYS = ["a", "b", "c", "a/b", "~t", "é", ""]

# --------------------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([2**70, 1.0, 0.5, -0.0, "x", "", "ü\x01"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
    ),
    max_leaves=10,
)
sections = st.one_of(st.none(), st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
# Biased toward writes that are accepted (one_of picks its branches alike: a branch given
# several times is drawn that much more often): mostly well-formed documents whose version,
# when they carry one, is mostly the current one ("current" is filled in when the step runs).
well_formed = st.fixed_dictionaries(
    {"state": st.fixed_dictionaries({}, optional={"desired": sections, "reported": sections})},
    optional={
        "clientToken": st.just("tok"),
        "version": st.one_of(st.just("current"), st.just("current"), st.integers(0, 5)),
    },
)
documents = st.one_of(
    well_formed,
    well_formed,
    well_formed,
    well_formed,
    st.sampled_from(
        [
            {"state": None},
            {"state": {"desired": 1}},
            {"state": {"delta": {}}},
            {"state": {}, "extra": 1},
            {"state": {"reported": {"a": float("inf")}}},
            {"state": {"reported": {"k" * 129: 1}}},
        ]
    ),
)
steps = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["update"] * 8 + ["replace", "delete"]),
        "doc": documents,
        "writer": st.sampled_from(WRITERS),
        "ts": st.integers(0, 3_000),  # clocks need not agree between writers
        # None, the version just read, or any (mostly stale) number
        "expected": st.one_of(st.none(), st.none(), st.just("read"), st.just("read"),
                              st.integers(0, 6)),
        # None, the vv read before the previous step (concurrent), the current vv, or any
        "context": st.one_of(
            st.none(),
            st.none(),
            st.just("previous"),
            st.just("current"),
            st.dictionaries(st.sampled_from(WRITERS), st.integers(0, 5), max_size=3),
        ),
        "seq": st.one_of(st.none(), st.none(), st.integers(0, 6)),
    }
)
limits = st.sampled_from(
    [DEFAULT_LIMITS, DEFAULT_LIMITS, Limits(max_state_bytes=160, max_depth=3, max_key_bytes=4)]
)

# --------------------------------------------------------------------------- reference rules


def json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def typed(value: Any, ordered: bool = True) -> Any:
    """A form that tells ``1`` from ``1.0`` and ``True``, and sees key order (unless not
    `ordered`)."""
    if isinstance(value, dict):
        items = value.items() if ordered else sorted(value.items())
        return ["{", [[k, typed(v, ordered)] for k, v in items]]
    if isinstance(value, list):
        return ["[", [typed(v, ordered) for v in value]]
    return [type(value).__name__, value]


def names_a_value(patch: dict[str, Any]) -> bool:
    return any(v is not None and (not isinstance(v, dict) or names_a_value(v))
               for v in patch.values())  # fmt: skip


def merge(state: dict[str, Any], patch: dict[str, Any] | None) -> dict[str, Any]:
    """JSON merge patch (RFC 7386) as the spec amends it: empty objects are pruned, an empty
    object names nothing, deleting below a scalar changes nothing; None clears the section."""
    if patch is None:
        return {}
    out = copy.deepcopy(state)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            stored = out.get(key)
            if isinstance(stored, dict):
                merged = merge(stored, value)
                if merged:
                    out[key] = merged
                else:
                    del out[key]
            elif names_a_value(value):
                out[key] = merge({}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def delta(desired: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, want in desired.items():
        have = reported.get(key, delta)  # a missing key: never equal
        if isinstance(want, dict) and isinstance(have, dict):
            if sub := delta(want, have):
                out[key] = sub
        elif have is delta or not json_equal(want, have):
            out[key] = want
    return out


def leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for key, value in tree.items():
        path = (*prefix, key)
        out |= leaves(value, path) if isinstance(value, dict) else {path}
    return out


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def value_at(tree: Any, pointer: str) -> Any:
    """The value at an RFC 6901 pointer below the section, or ``merge`` if there is none."""
    for raw in pointer.split("/")[2:]:
        key = raw.replace("~1", "/").replace("~0", "~")
        if not isinstance(tree, dict) or key not in tree:
            return merge
        tree = tree[key]
    return tree


def keys_of(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(k for v in value.values() for k in keys_of(v))]
    if isinstance(value, list):
        return [k for v in value for k in keys_of(v)]
    return []


def finite(value: Any) -> bool:
    """JSON has no NaN or infinity."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return True


def reference_verdict(
    step: dict[str, Any], doc: Any, prior: Shadow, version: int, expected: int | None,
    lim: Limits,
) -> tuple[str, dict[str, Any]] | None:
    """What the specification says of a plain update (no context, no seq), worked out here
    from the rules alone, without shadow.model: ("accept", the sections it stores) or
    ("reject", {}); None where these rules do not decide (other writes, malformed documents,
    sizes within a few bytes of the limit, whose JSON spelling these rules do not pin down)."""
    if step["op"] != "update" or step["context"] is not None or step["seq"] is not None:
        return None
    if not isinstance(doc, dict) or set(doc) - {"state", "version", "clientToken"}:
        return None
    state = doc.get("state")
    if not isinstance(state, dict) or set(state) - {"desired", "reported"}:
        return None
    if any(v is not None and not isinstance(v, dict) for v in state.values()):
        return None
    if not finite(state):
        return ("reject", {})  # not JSON
    named = [v for v in (expected, doc.get("version")) if v is not None]
    if len(set(named)) > 1:
        return None
    if named and named[0] != version:
        return ("reject", {})  # compare-and-set on the version
    if any(len(k.encode()) > lim.max_key_bytes for k in keys_of(state)):
        return None
    after = {
        name: merge(prior.section(name), state[name]) if name in state else prior.section(name)
        for name in ("desired", "reported")
    }
    deepest = max(depth(after[name]) for name in after)
    patch_depth = max((depth(v) for v in state.values() if v is not None), default=0)
    size = len(json.dumps(after, separators=(",", ":"), ensure_ascii=False).encode())
    if deepest > lim.max_depth:
        return ("reject", {}) if patch_depth > lim.max_depth else None
    if patch_depth > lim.max_depth:
        return None
    if size > lim.max_state_bytes + 32:
        return ("reject", {})
    if size <= lim.max_state_bytes - 32:
        return ("accept", after)
    return None


# --------------------------------------------------------------------------- the scenario


def outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except ShadowError as exc:
        return exc


def same_error(a: ShadowError, b: ShadowError) -> None:
    assert (type(a), str(a), a.document()) == (type(b), str(b), b.document())
    if isinstance(a, VersionConflict):
        assert isinstance(b, VersionConflict) and a.current_version == b.current_version
        assert (a.current is None) == (b.current is None)


def same_result(store: UpdateResult, model: UpdateResult) -> None:
    assert typed(store.shadow.document()) == typed(model.shadow.document())
    assert typed(store.accepted) == typed(model.accepted)
    assert typed(store.delta) == typed(model.delta)
    assert typed(store.change.document()) == typed(model.change.document())
    assert store.concurrent == model.concurrent
    assert store.conflicting_fields == model.conflicting_fields
    assert store.overruled_fields == model.overruled_fields
    assert store.suppressed_fields == model.suppressed_fields


def check_shadow(s: Shadow, lim: Limits) -> None:
    """Invariants of any stored, live shadow."""
    doc = s.document()
    state, metadata = doc["state"], doc["metadata"]
    for name in ("desired", "reported"):
        section = getattr(s, name)
        assert (name in state) == bool(section)
        if section:
            assert leaves(metadata[name]) == {(*p, "timestamp") for p in leaves(section)}
            assert depth(section) <= lim.max_depth
        assert set(s.meta(name)) == leaves(section)
    assert typed(state.get("delta", {})) == typed(delta(s.desired, s.reported))
    both = {"desired": s.desired, "reported": s.reported}
    size = len(json.dumps(both, separators=(",", ":"), ensure_ascii=False).encode())
    assert size <= lim.max_state_bytes


def check_write(
    step: dict[str, Any], before: Shadow | None, r: UpdateResult, context: dict[str, int] | None
) -> None:
    """Invariants of one accepted update or replace."""
    prior = before if before is not None and not before.deleted else Shadow()
    prior_vv = before.vv if before is not None else {}
    prior_version = before.version if before is not None else 0
    s = r.shadow
    assert s.version == prior_version + 1 and r.change.version == s.version
    assert r.accepted["version"] == s.version
    assert r.delta is None or (r.delta["version"] == s.version and r.delta["state"])
    writer = step["writer"]
    known = {k: max(prior_vv.get(k, 0), (context or {}).get(k, 0)) for k in (*prior_vv, writer)}
    assert s.vv[writer] == known[writer] + 1
    assert all(s.vv.get(k, 0) >= n for k, n in prior_vv.items())
    for name in ("desired", "reported"):  # the change record turns V-1 into V
        patch = r.change.state.get(name, {})
        # (in content: a merge patch cannot move keys, and a replace may put them in another
        # order)
        merged = merge(prior.section(name), patch)
        assert typed(merged, ordered=False) == typed(s.section(name), ordered=False)
    if step["op"] != "update":
        return
    state = step["doc"]["state"]
    patches = {"desired": None, "reported": None} if state is None else state
    if not r.conflicting_fields and not r.suppressed_fields:  # a plain merge
        for name in ("desired", "reported"):
            old = prior.section(name)
            expect = merge(old, patches[name]) if name in patches else old
            assert typed(s.section(name)) == typed(expect)
    for where in (*r.overruled_fields, *r.suppressed_fields):  # the stored value stays
        name = where.split("/")[1]
        old = value_at(prior.section(name), where)
        if old is not merge:
            assert json_equal(value_at(s.section(name), where), old)
    # Only a report with a seq is held back ("state": null clears reported too, so it counts).
    if step["seq"] is None or (state is not None and "reported" not in state):
        assert not r.suppressed_fields
    if context is None:
        assert not r.concurrent and not r.conflicting_fields


async def scenario(store: BaseShadowStore, plan: list[dict[str, Any]], lim: Limits) -> None:
    device = f"dev-{uuid.uuid4().hex[:10]}"
    stored: Shadow | None = None  # the model's view: what the store must hold
    previous_vv: dict[str, int] = {}
    for step in plan:
        read = await store.get(device)
        assert (read is None) == (stored is None or stored.deleted)
        if read is not None:
            assert stored is not None and typed(read.document()) == typed(stored.document())
        version = stored.version if stored is not None else 0
        current_vv = dict(stored.vv) if stored is not None else {}
        expected = version if step["expected"] == "read" else step["expected"]
        context = step["context"]
        if isinstance(context, str):
            context = previous_vv if context == "previous" else current_vv
        planned = copy.deepcopy(step["doc"])
        if isinstance(planned, dict) and planned.get("version") == "current":
            planned["version"] = version
        doc, ts = copy.deepcopy(planned), 1_700_000_000_000 + step["ts"]
        prior = stored if stored is not None and not stored.deleted else Shadow()
        verdict = reference_verdict(step, planned, prior, version, expected, lim)
        if step["op"] == "delete":
            want = outcome(apply_delete, stored, expected_version=expected, ts_ms=ts)
            got = await outcome_of(store.delete(device, expected_version=expected))
            if isinstance(want, ShadowError):
                assert isinstance(got, ShadowError)
                same_error(got, want)
            else:
                assert got == (want.version if want is not None else None)
                stored = want if want is not None else stored
        else:
            if step["op"] == "update":
                want = outcome(
                    apply_update, stored, doc, writer=step["writer"], ts_ms=ts,
                    expected_version=expected, context=context, seq=step["seq"], limits=lim,
                )  # fmt: skip
                got = await outcome_of(store.update(
                    device, doc, writer=step["writer"], ts_ms=ts, expected_version=expected,
                    context=context, seq=step["seq"],
                ))  # fmt: skip
            else:
                want = outcome(
                    apply_replace, stored, doc, writer=step["writer"], ts_ms=ts,
                    expected_version=expected, limits=lim,
                )  # fmt: skip
                got = await outcome_of(store.replace(
                    device, doc, writer=step["writer"], ts_ms=ts, expected_version=expected
                ))  # fmt: skip
            assert doc == planned  # the update document is not touched
            if verdict is not None:  # the independent oracle, where it decides
                if verdict[0] == "reject":
                    assert isinstance(got, ShadowError), (planned, got)
                else:
                    assert isinstance(got, UpdateResult), (planned, got)
                    for name, section in verdict[1].items():
                        assert typed(got.shadow.section(name)) == typed(section), name
                    assert got.shadow.version == version + 1
                    event("a write the reference rules accept")
            if isinstance(want, ShadowError):
                assert isinstance(got, ShadowError)
                same_error(got, want)
                if isinstance(want, VersionConflict):
                    named = expected if expected is not None else planned.get("version")
                    assert named is not None and named != version
            else:
                assert isinstance(got, UpdateResult)
                same_result(got, want)
                check_write({**step, "doc": planned}, stored, got,
                            context if step["op"] == "update" else None)
                check_shadow(got.shadow, lim)
                event(f"{step['op']} accepted")
                stored = got.shadow
        previous_vv = current_vv
        log = await store.changes_since(device, max(version, 0))
        if stored is not None and not stored.deleted and log is not None and log.complete:
            assert [c.version for c in log.changes] == list(range(version + 1, stored.version + 1))
    final = await store.get(device)
    assert (final is None) == (stored is None or stored.deleted)


async def outcome_of(call: Any) -> Any:
    try:
        return await call
    except ShadowError as exc:
        return exc


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
@SETTINGS
@given(plan=st.lists(steps, min_size=1, max_size=8), lim=limits)
def test_random_scenarios_through_the_store_follow_the_shadow_rules(
    kind: str,
    plan: list[dict[str, Any]],
    lim: Limits,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    async def main() -> None:
        if kind == "sqlite":
            path: Path = tmp_path_factory.mktemp("props") / "shadows.db"
            store: BaseShadowStore = SqliteShadowStore(path, limits=lim)
        else:
            server = request.getfixturevalue("redis_server")
            store = RedisShadowStore(server.url, prefix=f"props-{uuid.uuid4().hex[:8]}", limits=lim)
        try:
            await scenario(store, plan, lim)
        finally:
            await store.close()

    asyncio.run(main())
