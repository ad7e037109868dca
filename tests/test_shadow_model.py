"""shadow.model: merge, delta, limits, CAS, version vectors, seq suppression, resync records."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import astuple

from shadow.model import (
    ChangeRecord,
    InvalidUpdate,
    KeyTooLong,
    Limits,
    Shadow,
    ShadowTooDeep,
    ShadowTooLarge,
    UpdateResult,
    VersionConflict,
    apply_delete,
    apply_replace,
    apply_update,
    compute_delta,
    dominates,
    json_equal,
    merge_vv,
    select_changes,
    state_size,
)


def desired(patch: Any) -> dict[str, Any]:
    return {"state": {"desired": patch}}


def reported(patch: Any) -> dict[str, Any]:
    return {"state": {"reported": patch}}


def write(
    shadow: Shadow | None, doc: Any, writer: str = "app", ts_ms: int = 1_000, **kw: Any
) -> UpdateResult:
    return apply_update(shadow, doc, writer=writer, ts_ms=ts_ms, **kw)


# --------------------------------------------------------------------------- merge


def test_update_merges_nested_objects_and_keeps_untouched_fields() -> None:
    s = write(None, desired({"light": {"on": True, "level": 3}, "fan": 1})).shadow
    s = write(s, desired({"light": {"level": 5}})).shadow
    assert s.desired == {"light": {"on": True, "level": 5}, "fan": 1}


def test_update_documents_may_be_dict_subclasses() -> None:
    # the compiled model types its internal dicts exactly; what callers pass may be a subclass
    doc = OrderedDict(state=OrderedDict(desired=OrderedDict(light=OrderedDict(on=True))))
    s = write(write(None, desired({"fan": 1})).shadow, doc)
    assert s.shadow.desired == {"fan": 1, "light": {"on": True}}
    assert s.delta is not None and s.delta["state"] == {"fan": 1, "light": {"on": True}}
    assert compute_delta(OrderedDict(a=1), OrderedDict()) == {"a": 1}


def test_null_deletes_a_key_and_prunes_emptied_parents() -> None:
    s = write(None, desired({"light": {"on": True}, "fan": 1})).shadow
    s = write(s, desired({"light": {"on": None}})).shadow
    assert s.desired == {"fan": 1}
    assert s.desired_meta.keys() == {("fan",)}


def test_desired_null_clears_the_section_and_state_null_clears_both() -> None:
    s = write(None, {"state": {"desired": {"a": 1}, "reported": {"b": 2}}}).shadow
    cleared = write(s, desired(None))
    assert cleared.shadow.desired == {} and cleared.shadow.reported == {"b": 2}
    assert cleared.accepted["state"] == {"desired": None}
    both = write(s, {"state": None}).shadow
    assert both.desired == {} and both.reported == {}


def test_arrays_are_replaced_whole() -> None:
    s = write(None, desired({"modes": [1, 2, 3]})).shadow
    s = write(s, desired({"modes": [4]})).shadow
    assert s.desired == {"modes": [4]}


def test_a_value_replaces_an_object_and_an_object_replaces_a_scalar() -> None:
    s = write(None, desired({"a": {"b": 1, "c": 2}})).shadow
    s = write(s, desired({"a": 7})).shadow
    assert s.desired == {"a": 7} and s.desired_meta.keys() == {("a",)}
    s = write(s, desired({"a": {"x": 1}})).shadow
    assert s.desired == {"a": {"x": 1}} and s.desired_meta.keys() == {("a", "x")}


def test_empty_object_and_deleting_below_a_scalar_change_nothing() -> None:
    s = write(None, desired({"a": 5})).shadow
    s = write(s, desired({"a": {}, "b": {}})).shadow
    s = write(s, desired({"a": {"b": None}})).shadow
    assert s.desired == {"a": 5}


def test_update_does_not_alias_the_callers_document() -> None:
    doc = desired({"modes": [1, 2]})
    s = write(None, doc).shadow
    doc["state"]["desired"]["modes"].append(3)
    assert s.desired == {"modes": [1, 2]}


def test_every_accepted_write_bumps_version_and_the_writers_vv_entry() -> None:
    r1 = write(None, desired({"a": 1}), writer="app")
    r2 = write(r1.shadow, reported({"a": 1}), writer="dev")
    r3 = write(r2.shadow, reported({"a": 1}), writer="dev")  # no change, still accepted
    assert [r.version for r in (r1, r2, r3)] == [1, 2, 3]
    assert r3.shadow.vv == {"app": 1, "dev": 2}


def test_metadata_has_a_timestamp_per_leaf_and_only_written_leaves_change() -> None:
    s = write(None, desired({"a": 1, "b": {"c": 2}}), ts_ms=10_000).shadow
    s = write(s, desired({"b": {"c": 3}}), ts_ms=20_000).shadow
    doc = s.document()
    assert doc["metadata"] == {"desired": {"a": {"timestamp": 10}, "b": {"c": {"timestamp": 20}}}}
    assert doc["timestamp"] == 20 and doc["version"] == 2
    assert "reported" not in doc["state"]


# --------------------------------------------------------------------------- delta


def test_delta_lists_desired_fields_that_differ_from_reported() -> None:
    d = {"a": 1, "b": {"c": 1, "d": 2}, "e": [1, 2], "f": "x"}
    r = {"a": 1, "b": {"c": 1, "d": 3}, "e": [1], "g": 0}
    assert compute_delta(d, r) == {"b": {"d": 2}, "e": [1, 2], "f": "x"}


def test_delta_compares_json_types_not_python_equality() -> None:
    assert compute_delta({"on": True}, {"on": 1}) == {"on": True}
    assert compute_delta({"n": 1}, {"n": 1.0}) == {}
    assert compute_delta({"o": {"a": 1}}, {"o": 5}) == {"o": {"a": 1}}
    assert not json_equal([True], [1])


def test_delta_payload_is_sent_when_desired_changes_and_stamped_with_the_new_version() -> None:
    r1 = write(None, desired({"color": "red"}), ts_ms=5_000, **{})
    assert r1.delta is not None
    assert r1.delta["state"] == {"color": "red"}
    assert r1.delta["metadata"] == {"color": {"timestamp": 5}}
    assert r1.delta["version"] == r1.accepted["version"] == 1
    r2 = write(r1.shadow, reported({"color": "blue"}))
    assert r2.delta is None  # a report alone does not notify the device
    r3 = write(r2.shadow, desired({"color": "blue"}))
    assert r3.delta is None  # desired changed but nothing is left to do


def test_accepted_payload_echoes_applied_fields_and_client_token() -> None:
    r = write(None, {"state": {"desired": {"a": 1, "b": None}}, "clientToken": "t1"}, ts_ms=3_000)
    assert r.accepted == {
        "state": {"desired": {"a": 1}},
        "metadata": {"desired": {"a": {"timestamp": 3}}},
        "version": 1,
        "timestamp": 3,
        "clientToken": "t1",
    }


# --------------------------------------------------------------------------- limits


def test_state_over_the_size_limit_is_rejected_as_too_large() -> None:
    with pytest.raises(ShadowTooLarge) as err:
        write(None, desired({"blob": "x" * 9000}))
    assert err.value.code == 413
    assert err.value.document()["code"] == 413 and "8192" in str(err.value)


def test_size_limit_counts_both_sections_after_the_merge() -> None:
    s = write(None, desired({"a": "x" * 4000})).shadow
    with pytest.raises(ShadowTooLarge):
        write(s, reported({"b": "y" * 4200}))


def test_nesting_deeper_than_six_levels_is_rejected() -> None:
    ok: Any = 1
    for _ in range(6):
        ok = {"k": ok}
    write(None, desired(ok))  # 6 levels: the section object is level 1
    with pytest.raises(ShadowTooDeep):
        write(None, desired({"k": ok}))
    with pytest.raises(ShadowTooDeep):
        write(None, desired({"a": {"b": {"c": {"d": {"e": [[1]]}}}}}))  # arrays count too


def test_keys_longer_than_128_bytes_are_rejected() -> None:
    write(None, desired({"k" * 128: 1}))
    with pytest.raises(KeyTooLong):
        write(None, desired({"é" * 65: 1}))  # 130 UTF-8 bytes


def test_limits_are_configurable() -> None:
    small = Limits(max_state_bytes=64, max_depth=2, max_key_bytes=4)
    with pytest.raises(ShadowTooLarge):
        write(None, desired({"a": "x" * 64}), limits=small)
    with pytest.raises(ShadowTooDeep):
        write(None, desired({"a": {"b": {"c": 1}}}), limits=small)
    with pytest.raises(KeyTooLong):
        write(None, desired({"abcde": 1}), limits=small)


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {},
        {"state": 1},
        {"state": {"delta": {}}},
        {"state": {"desired": [1]}},
        {"state": {}, "metadata": {}},
        {"state": {"desired": {"a": float("nan")}}},
        {"state": {"desired": {"a": {1, 2}}}},
        {"state": {"desired": {}}, "version": "3"},
        {"state": {"desired": {}}, "version": True},
        {"state": {"desired": {}}, "clientToken": 5},
    ],
)
def test_malformed_updates_are_invalid(doc: Any) -> None:
    with pytest.raises(InvalidUpdate) as err:
        write(None, doc)
    assert err.value.code == 400


def test_bad_writer_context_and_seq_are_invalid() -> None:
    with pytest.raises(InvalidUpdate):
        write(None, desired({}), writer="")
    with pytest.raises(InvalidUpdate):
        write(None, desired({}), context={"a": -1})
    with pytest.raises(InvalidUpdate):
        write(None, desired({}), seq=True)


# --------------------------------------------------------------------------- CAS


def test_expected_version_must_match_and_the_conflict_carries_the_current_document() -> None:
    s = write(None, desired({"a": 1})).shadow
    write(s, desired({"a": 2}), expected_version=1)
    with pytest.raises(VersionConflict) as err:
        write(s, desired({"a": 2}), expected_version=0)
    assert err.value.code == 409
    assert err.value.current is s and err.value.current_version == 1


def test_expected_version_zero_means_create_only() -> None:
    assert write(None, desired({"a": 1}), expected_version=0).version == 1
    with pytest.raises(VersionConflict) as err:
        write(None, desired({"a": 1}), expected_version=4)
    assert err.value.current is None


def test_version_in_the_body_is_a_cas_check_and_must_agree_with_the_argument() -> None:
    s = write(None, desired({"a": 1})).shadow
    with pytest.raises(VersionConflict):
        write(s, {"state": {"desired": {"a": 2}}, "version": 7})
    with pytest.raises(InvalidUpdate):
        write(s, {"state": {"desired": {"a": 2}}, "version": 1}, expected_version=2)


# --------------------------------------------------------------------------- version vectors


def test_write_whose_context_dominates_is_not_concurrent() -> None:
    s = write(None, desired({"a": 1}), writer="n1").shadow
    r = write(s, desired({"a": 2}), writer="n2", context=s.vv, ts_ms=1)  # older ts is fine
    assert not r.concurrent and r.shadow.desired == {"a": 2}


def test_concurrent_writes_to_disjoint_fields_are_both_kept() -> None:
    base = write(None, desired({"a": 0, "b": 0}), writer="n0").shadow
    s = write(base, desired({"a": 1}), writer="n1", context=base.vv).shadow
    r = write(s, desired({"b": 2}), writer="n2", context=base.vv)
    assert r.concurrent and r.conflicting_fields == ()
    assert r.shadow.desired == {"a": 1, "b": 2}
    assert r.shadow.vv == {"n0": 1, "n1": 1, "n2": 1}


def test_same_field_written_concurrently_goes_to_the_later_ts() -> None:
    base = write(None, desired({"a": 0}), writer="n0").shadow
    s = write(base, desired({"a": "late"}), writer="n1", context=base.vv, ts_ms=2_000).shadow
    r = write(s, desired({"a": "early"}), writer="n2", context=base.vv, ts_ms=1_000)
    assert r.conflicting_fields == ("/desired/a",) and r.overruled_fields == ("/desired/a",)
    assert r.shadow.desired == {"a": "late"}
    s = write(base, desired({"a": "early"}), writer="n2", context=base.vv, ts_ms=1_000).shadow
    r = write(s, desired({"a": "late"}), writer="n1", context=base.vv, ts_ms=2_000)
    assert r.conflicting_fields == ("/desired/a",) and r.overruled_fields == ()
    assert r.shadow.desired == {"a": "late"}


def test_same_field_same_ts_goes_to_the_greater_writer_id() -> None:
    base = write(None, desired({"a": 0}), writer="n0").shadow
    for first, second in (("node-a", "node-b"), ("node-b", "node-a")):
        s = write(base, desired({"a": first}), writer=first, context=base.vv).shadow
        r = write(s, desired({"a": second}), writer=second, context=base.vv)
        assert r.shadow.desired == {"a": "node-b"}


def test_concurrent_delete_loses_to_a_value_in_either_order() -> None:
    base = write(None, desired({"a": 0}), writer="n0").shadow
    s = write(base, desired({"a": 1}), writer="n1", context=base.vv, ts_ms=1).shadow
    r = write(s, desired({"a": None}), writer="n2", context=base.vv, ts_ms=9)
    assert r.shadow.desired == {"a": 1} and r.overruled_fields == ("/desired/a",)
    s = write(base, desired({"a": None}), writer="n2", context=base.vv, ts_ms=9).shadow
    assert write(s, desired({"a": 1}), writer="n1", context=base.vv, ts_ms=1).shadow.desired == {
        "a": 1
    }


def test_concurrent_clear_of_a_section_keeps_fields_it_had_not_seen() -> None:
    base = write(None, desired({"a": 0, "b": 0}), writer="n0").shadow
    s = write(base, desired({"b": 1}), writer="n1", context=base.vv).shadow
    r = write(s, desired(None), writer="n2", context=base.vv)
    assert r.shadow.desired == {"b": 1}
    assert r.accepted["state"]["desired"] == {"a": None}


def test_stored_vv_is_the_max_of_stored_and_context_then_bumped() -> None:
    s = write(None, desired({"a": 1}), writer="n1").shadow
    r = write(s, desired({"a": 2}), writer="n2", context={"n1": 1, "n3": 4})
    assert r.shadow.vv == {"n1": 1, "n2": 1, "n3": 4}


# --------------------------------------------------------------------------- seq


def test_report_with_a_lower_seq_does_not_overwrite_newer_fields() -> None:
    s = write(None, reported({"temp": 20, "hum": 40}), writer="dev", seq=3).shadow
    s = write(s, reported({"mode": "eco"}), writer="dev").shadow  # no seq: new field, no seq
    r = write(s, reported({"temp": 18, "mode": "off", "door": "open"}), writer="dev", seq=2)
    assert r.suppressed_fields == ("/reported/temp",)
    assert r.shadow.reported == {"temp": 20, "hum": 40, "mode": "off", "door": "open"}
    assert r.shadow.reported_meta[("temp",)].seq == 3
    assert r.shadow.reported_meta[("door",)].seq == 2


def test_equal_seq_applies_and_a_field_keeps_its_highest_seq() -> None:
    s = write(None, reported({"t": 1}), seq=5).shadow
    s = write(s, reported({"t": 2}), seq=5).shadow
    assert s.reported == {"t": 2}
    s = write(s, reported({"t": 3})).shadow  # an unsequenced write keeps seq 5
    r = write(s, reported({"t": 4}), seq=4)
    assert r.shadow.reported == {"t": 3} and r.suppressed_fields == ("/reported/t",)


def test_stale_delete_is_suppressed_and_desired_ignores_seq() -> None:
    s = write(None, {"state": {"desired": {"d": 1}, "reported": {"r": 1}}}, seq=9).shadow
    r = write(s, {"state": {"desired": {"d": 2}, "reported": {"r": None}}}, seq=1)
    assert r.shadow.desired == {"d": 2} and r.shadow.reported == {"r": 1}
    assert r.suppressed_fields == ("/reported/r",)


def test_a_stale_write_cannot_replace_an_object_holding_a_newer_field() -> None:
    s = write(None, reported({"cfg": {"a": 1, "b": 2}}), seq=1).shadow
    s = write(s, reported({"cfg": {"b": 3}}), seq=5).shadow
    r = write(s, reported({"cfg": "flat"}), seq=3)
    assert r.shadow.reported == {"cfg": {"a": 1, "b": 3}}


# --------------------------------------------------------------------------- replace, delete


def test_replace_sets_exactly_the_given_sections() -> None:
    s = write(None, {"state": {"desired": {"a": 1, "b": 2}, "reported": {"c": 3}}}).shadow
    r = apply_replace(s, desired({"b": 5}), writer="api", ts_ms=9_000)
    assert r.shadow.desired == {"b": 5} and r.shadow.reported == {}
    assert r.change.state == {"desired": {"a": None, "b": 5}, "reported": {"c": None}}
    assert r.version == 2 and r.shadow.vv == {"app": 1, "api": 1}
    with pytest.raises(InvalidUpdate):
        apply_replace(s, desired({"a": None}), writer="api", ts_ms=1)


def test_delete_leaves_a_tombstone_that_continues_the_version() -> None:
    s = write(None, desired({"a": 1})).shadow
    with pytest.raises(VersionConflict):
        apply_delete(s, expected_version=5, ts_ms=1)
    tomb = apply_delete(s, expected_version=1, ts_ms=1)
    assert tomb is not None and tomb.deleted and tomb.version == 2
    assert apply_delete(tomb, ts_ms=2) is None and apply_delete(None, ts_ms=2) is None
    with pytest.raises(VersionConflict) as err:
        write(tomb, desired({"a": 2}), expected_version=1)
    assert err.value.current is None
    again = write(tomb, desired({"b": 1}))
    assert again.version == 3 and again.shadow.desired == {"b": 1} and not again.shadow.deleted


# --------------------------------------------------------------------------- resync


def records(*versions: int) -> list[ChangeRecord]:
    return [ChangeRecord(v, "w", 0, {}, {}) for v in versions]


def test_changes_since_returns_newer_records_when_history_reaches_back() -> None:
    log = select_changes(5, records(3, 4, 5), 2)
    assert log.complete and [r.version for r in log.changes] == [3, 4, 5]
    assert select_changes(5, records(3, 4, 5), 5).complete
    assert select_changes(5, records(3, 4, 5), 5).changes == ()


def test_changes_since_asks_for_the_full_document_when_history_is_too_short() -> None:
    assert not select_changes(5, records(3, 4, 5), 1).complete
    assert not select_changes(5, records(3, 4, 5), 9).complete  # caller is ahead: a reset


def test_storage_json_round_trips() -> None:
    s = write(None, {"state": {"desired": {"a": [1, {"b": None}]}, "reported": {"x": 1.5}}}, seq=3)
    assert Shadow.from_json(s.shadow.to_json()) == s.shadow
    assert ChangeRecord.from_json(s.change.to_json()) == s.change


def test_storage_bytes_are_msgpack_and_read_the_json_form_too() -> None:
    s = write(None, {"state": {"desired": {"a": [1, {"b": None}]}, "reported": {"x": 1.0}}}, seq=3)
    assert s.shadow.to_bytes()[:1] != b"{" and s.change.to_bytes()[:1] != b"["
    for raw in (s.shadow.to_bytes(), s.shadow.to_json().encode()):
        assert Shadow.from_bytes(raw).to_json() == s.shadow.to_json()  # 1.0 stays a float
    for raw in (s.change.to_bytes(), s.change.to_json().encode()):
        assert ChangeRecord.from_bytes(raw) == s.change
    # leaf metadata as earlier versions packed it: [path, ts_ms, writer, counter, seq] and
    # [path, [ts_ms, writer, counter, seq]] entries
    sh = s.shadow
    for entry in (lambda p, m: [p, *astuple(m)], lambda p, m: [p, astuple(m)]):
        earlier = msgpack.packb([
            sh.desired, sh.reported, [entry(p, m) for p, m in sh.desired_meta.items()],
            [entry(p, m) for p, m in sh.reported_meta.items()], sh.version, sh.vv, sh.ts_ms,
            sh.deleted,
        ])  # fmt: skip
        assert Shadow.from_bytes(earlier) == sh


def test_storage_bytes_fall_back_to_json_for_what_msgpack_cannot_hold() -> None:
    for value in (2**70, -(2**64), "lone \ud800 surrogate"):
        s = write(None, reported({"v": value}))
        assert s.shadow.to_bytes()[:1] == b"{" and s.change.to_bytes()[:1] == b"["
        assert Shadow.from_bytes(s.shadow.to_bytes()).reported == {"v": value}
        assert ChangeRecord.from_bytes(s.change.to_bytes()) == s.change


# --------------------------------------------------------------------------- properties

KEYS = st.sampled_from(["a", "b", "c", "d"])
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["x", "y", 1.5])
VALUES = st.recursive(
    SCALARS.filter(lambda v: v is not None) | st.lists(SCALARS, max_size=2),
    lambda inner: st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)
PATCHES = st.dictionaries(KEYS, st.none() | VALUES, max_size=4)
VVS = st.dictionaries(st.sampled_from(["n1", "n2", "n3"]), st.integers(0, 5), max_size=3)


def ref_merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """The documented merge, written independently of the model."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            cur = out.get(key)
            if isinstance(cur, dict):
                sub = ref_merge(cur, value)
            elif sets_something(value):
                sub = ref_merge({}, value)
            else:
                continue
            if sub:
                out[key] = sub
            else:
                out.pop(key, None)
        else:
            out[key] = value
    return out


def sets_something(patch: dict[str, Any]) -> bool:
    return any(
        (sets_something(v) if isinstance(v, dict) else v is not None) for v in patch.values()
    )


def subset_equal(small: Any, big: Any) -> bool:
    if isinstance(small, dict) and isinstance(big, dict):
        return all(k in big and subset_equal(v, big[k]) for k, v in small.items())
    return json_equal(small, big)


def shadow_from(d: dict[str, Any], r: dict[str, Any]) -> Shadow:
    return write(None, {"state": {"desired": d, "reported": r}}, writer="seed").shadow


@given(PATCHES, PATCHES)
def test_delta_is_empty_iff_desired_is_subset_equal_to_reported(d: Any, r: Any) -> None:
    s = shadow_from(d, r)
    assert (s.delta == {}) == subset_equal(s.desired, s.reported)
    assert subset_equal(s.delta, s.desired)  # a delta only ever holds desired values


@given(PATCHES, PATCHES, PATCHES)
def test_update_merges_like_the_reference_merge(d: Any, r: Any, patch: Any) -> None:
    s = shadow_from(d, r)
    new = write(s, desired(patch)).shadow
    assert new.desired == ref_merge(s.desired, patch)
    assert new.reported == s.reported


@given(PATCHES, PATCHES, PATCHES)
def test_applying_an_update_twice_reads_the_same_as_once(d: Any, r: Any, patch: Any) -> None:
    doc = {"state": {"desired": patch, "reported": patch}}
    once = write(shadow_from(d, r), doc).shadow
    twice = write(once, doc).shadow
    assert (twice.desired, twice.reported) == (once.desired, once.reported)
    stored = Shadow.from_json(once.to_json())
    assert stored == once and stored.document() == once.document()
    assert Shadow.from_bytes(once.to_bytes()).to_json() == once.to_json()


@given(PATCHES, PATCHES, PATCHES, PATCHES)
def test_change_record_replays_the_write(d: Any, r: Any, p1: Any, p2: Any) -> None:
    s = shadow_from(d, r)
    for result in (
        write(s, {"state": {"desired": p1, "reported": p2}}),
        apply_replace(s, {"state": {"desired": ref_merge({}, p1)}}, writer="w", ts_ms=1),
    ):
        for name in ("desired", "reported"):
            patch = result.change.state.get(name, {})
            replayed = {} if patch is None else ref_merge(s.section(name), patch)
            assert replayed == result.shadow.section(name)


@given(PATCHES, st.lists(PATCHES, max_size=4))
def test_state_never_exceeds_the_size_limit(d: Any, patches: list[Any]) -> None:
    limits = Limits(max_state_bytes=60)
    s: Shadow | None = None
    for patch in [d, *patches]:
        with contextlib.suppress(ShadowTooLarge):
            s = write(s, desired(patch), limits=limits).shadow
        if s is not None:
            assert state_size(s.desired, s.reported) <= 60


@given(VVS, VVS)
def test_vv_merge_is_commutative_and_dominates_both(a: Any, b: Any) -> None:
    assert merge_vv(a, b) == merge_vv(b, a)
    assert dominates(merge_vv(a, b), a) and dominates(merge_vv(a, b), b)


@given(VVS, VVS, VVS)
def test_vv_merge_is_associative(a: Any, b: Any, c: Any) -> None:
    assert merge_vv(merge_vv(a, b), c) == merge_vv(a, merge_vv(b, c))


@given(VVS)
def test_vv_merge_is_idempotent(a: Any) -> None:
    assert merge_vv(a, a) == merge_vv(a, {})
    assert merge_vv(merge_vv(a, a), a) == merge_vv(a, a)


FLAT = st.dictionaries(KEYS, st.none() | st.integers(0, 3), max_size=4)


@settings(max_examples=200)
@given(FLAT, FLAT, FLAT, st.integers(0, 2), st.integers(0, 2))
def test_concurrent_flat_writes_converge_in_either_order(
    seed: Any, pa: Any, pb: Any, ts_a: int, ts_b: int
) -> None:
    base = shadow_from(ref_merge({}, seed), {})

    def both(first: tuple[str, Any, int], second: tuple[str, Any, int]) -> Shadow:
        s = base
        for writer, patch, ts in (first, second):
            s = write(s, desired(patch), writer=writer, ts_ms=ts, context=base.vv).shadow
        return s

    ab = both(("A", pa, ts_a), ("B", pb, ts_b))
    ba = both(("B", pb, ts_b), ("A", pa, ts_a))
    assert ab.desired == ba.desired and ab.vv == ba.vv


# Any JSON a shadow can hold, with what makes JSON long next to msgpack: control characters
# (6 bytes each in JSON), empty keys, nulls and booleans in arrays, long floats, big integers.
_TEXT = st.text(st.characters(max_codepoint=0x3000, exclude_categories=["Cs"]), max_size=8)
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | _TEXT | st.just("\x00\x1f"),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@given(st.dictionaries(_TEXT, _ANY_JSON, max_size=4), st.dictionaries(_TEXT, _ANY_JSON, max_size=4))
@settings(max_examples=300, deadline=None)
def test_the_packed_shadow_bounds_the_json_size_of_its_state(
    desired: dict[str, Any], reported: dict[str, Any]
) -> None:
    """The size check skips measuring the JSON when 8 x the packed shadow + 32 is within the
    limit; that is only sound if the JSON is never longer."""
    shadow = Shadow(desired, reported)
    assert state_size(desired, reported) <= len(shadow.to_bytes()) * 8 + 32
    doc = {"state": {"desired": desired, "reported": reported}}
    try:
        merged = apply_update(None, doc, writer="w", ts_ms=1).shadow
    except (InvalidUpdate, ShadowTooLarge):
        return  # nested too deep, a key too long: refused before the size is measured
    size = state_size(merged.desired, merged.reported)
    apply_update(None, doc, writer="w", ts_ms=1, limits=Limits(max_state_bytes=size))
    with pytest.raises(ShadowTooLarge):  # a state one byte over the limit is still refused
        apply_update(None, doc, writer="w", ts_ms=1, limits=Limits(max_state_bytes=size - 1))


def test_value_classes_are_read_only_to_the_type_checker_and_at_run_time(tmp_path: Path) -> None:
    from mypy import api

    snippet = tmp_path / "assigns.py"
    snippet.write_text(
        "from shadow.model import ChangeRecord, Shadow, UpdateResult\n"
        "def f(s: Shadow, c: ChangeRecord, r: UpdateResult) -> None:\n"
        "    s.version = 3\n    c.delta = {}\n    r.notify = True\n"
    )
    out, err, status = api.run([str(snippet)])
    assert status == 1, out + err
    assert out.count("is read-only") == 3, out
    r = write(None, desired({"a": 1}))
    for value, name in ((r.shadow, "version"), (r.change, "delta"), (r, "notify")):
        with pytest.raises(AttributeError):
            setattr(value, name, None)


def test_a_shadow_compares_and_prints_by_its_fields_not_its_packed_form() -> None:
    made = write(None, desired({"a": 1})).shadow  # the model keeps its packed form
    read = Shadow.from_json(made.to_json())
    assert made == read and made.to_bytes() == read.to_bytes()
    assert repr(made) == repr(read) and "_packed" not in repr(made)
    assert made != Shadow(version=made.version)
