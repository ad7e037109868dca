"""The device-shadow model: pure functions over shadow documents, no I/O.

Both stores (``shadow.sqlite``, ``shadow.redis``) read a :class:`Shadow`, call
:func:`apply_update` / :func:`apply_replace` / :func:`apply_delete` here and write the result
back atomically, so every rule below lives in exactly one place.

Document (AWS IoT device-shadow semantics)
------------------------------------------
``Shadow.document()`` renders what GET returns::

    {"state": {"desired": {...}, "reported": {...}, "delta": {...}},
     "metadata": {"desired": {"color": {"timestamp": 1700000000}}, "reported": {...}},
     "version": 7, "vv": {"node-a": 4, "app-1": 3}, "timestamp": 1700000000}

Empty sections are omitted, as AWS does. ``timestamp`` values are epoch seconds (AWS); the
internal per-leaf metadata (:class:`LeafMeta`) keeps milliseconds, the writer and its version
vector counter (the write's "dot"), and, in ``reported``, the highest device ``seq`` applied.

Update documents: ``{"state": {"desired": {...}, "reported": {...}}, "version": N,
"clientToken": "..."}``. Sections merge recursively, like a JSON merge patch (RFC 7386): an
object merges into the stored object, any other value (scalar or array) replaces what is stored
at its key (an object below it, or a scalar on its way, which becomes an object), ``null``
deletes the key, ``"desired": null`` clears the section and ``"state": null`` clears both.
Unlike RFC 7386, objects left empty are pruned (as AWS does), and an update changes only the
fields it names: an empty object names none, and deleting ``a.b`` where ``a`` is a scalar
changes nothing. ``version`` in the body is the same as the ``expected_version`` argument. A
missing shadow has version 0, so ``expected_version=0`` means "only if it does not exist yet".

Delta: the keys of ``desired`` whose value differs from ``reported`` (missing counts as
different); objects recurse, arrays and scalars compare whole; ``true`` is not ``1``, ``1`` is
``1.0``.

Limits (:class:`Limits`, defaults as AWS): the compact UTF-8 JSON of
``{"desired":..., "reported":...}`` after the write is at most 8 KiB (:class:`ShadowTooLarge`),
a section nests at most 6 levels, the section object being level 1 and each nested object or
array one more (:class:`ShadowTooDeep`), keys are at most 128 UTF-8 bytes
(:class:`KeyTooLong`); anything else malformed is :class:`InvalidUpdate`. Each error has an AWS
style ``code`` (400, 409, 413) and ``document()`` for the ``/rejected`` reply.

Every accepted write, even one that changes nothing, gets ``version + 1`` and
``vv[writer] + 1``.

Version vectors and the conflict rule
-------------------------------------
A write may carry ``context``: the ``vv`` it read. If the context dominates the stored vv
(componentwise ``>=``) the writer saw everything, and the write is applied as a plain merge.
Otherwise it is *concurrent*. Each stored leaf remembers its dot ``(writer, counter)``. A leaf
the context does not cover (``context[writer] < counter``) was written by a concurrent write;
a leaf the write touches that no concurrent write touched merges normally. When the incoming
write and a concurrent write hit the same leaf:

* value against value: the greater ``(ts_ms, writer id, canonical JSON of the value)`` wins,
  i.e. the later ``ts_ms``, a tie goes to the greater writer id (plain string order);
* a delete against a value: the value wins (add-wins). Deleted leaves leave no tombstone, so
  this is the only rule that gives the same result in either arrival order.

For concurrent writes to the same leaves or to disjoint leaves the result is the same
whichever arrives first. If one concurrent write replaces an object with a scalar while the
other writes inside that object, each arrival order still gives a well-defined result, but
the two orders can give different results.
The result reports ``concurrent`` and the JSON pointers (RFC 6901, e.g. ``/desired/color``) of
``conflicting_fields`` and of ``overruled_fields`` (those where the incoming write lost).
A write without a context makes no causal claim and is applied in arrival order, as on AWS.
The stored vv becomes ``max(stored, context)`` componentwise, then ``vv[writer] += 1``.

Out-of-order reports
--------------------
A write may carry ``seq`` (a per-device increasing counter or a millisecond timestamp). It
applies to ``reported`` only: a field whose stored leaf (or any leaf the write would replace)
has a higher ``seq`` is not overwritten or deleted. Its pointer goes to ``suppressed_fields``,
and the other fields of the same report still apply. A leaf keeps the highest ``seq`` ever
applied to it. Deleting a field drops its ``seq`` as well.

Accepted reply, delta notification, resync
------------------------------------------
An accepted write returns :class:`UpdateResult` with the new shadow at version ``V``, the
``accepted`` payload (what was applied, with its metadata, stamped ``V``) and, when ``desired``
changed and the delta is not empty, a ``delta`` payload: the *whole* current delta with its
``desired`` metadata, also stamped ``V``. A device that missed notifications asks for changes
since the last ``V`` it saw (:func:`select_changes`). Each write appends a
:class:`ChangeRecord`: version, writer, ts, the applied update as a merge patch that turns
version ``V-1`` into ``V``, and the delta after the write.

Deletion leaves a tombstone (``Shadow.deleted``) that keeps ``version`` and ``vv``, so a
re-created shadow continues the numbering and a stale ``expected_version`` still conflicts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import (
    Any,
    ClassVar,
    Final,
    Literal,
    TypeAlias,
)

import msgspec
from msgspec.structs import astuple

JSON: TypeAlias = bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None
JSONObject: TypeAlias = dict[str, JSON]
Path: TypeAlias = tuple[str, ...]
Section: TypeAlias = Literal["desired", "reported"]
VersionVector: TypeAlias = dict[str, int]

SECTIONS: Final[tuple[Section, Section]] = ("desired", "reported")
_UPDATE_KEYS: Final = frozenset({"state", "version", "clientToken"})
_COMPACT_UTF8: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# The C encoder behind ``_COMPACT_UTF8.encode`` made once (that method builds one per call);
# no circular check: state trees are validated, finite in depth.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_compact_utf8_chunks: Final = (
    _c_make_encoder(
        None, _COMPACT_UTF8.default, json.encoder.encode_basestring, None, ":", ",",
        False, False, True,
    )
    if _c_make_encoder is not None
    else None
)  # fmt: skip


# --------------------------------------------------------------------------- errors


class ShadowError(Exception):
    """A write that was refused; ``code`` is the AWS-style error code of the rejected reply."""

    code: ClassVar[int] = 400

    def document(self) -> JSONObject:
        """The body of a ``/rejected`` reply: ``{"code": 400, "message": "..."}``."""
        return {"code": self.code, "message": str(self)}


class InvalidUpdate(ShadowError):
    """The update document is malformed (REST 400)."""


class ShadowTooDeep(InvalidUpdate):
    """A section nests deeper than ``Limits.max_depth``."""


class KeyTooLong(InvalidUpdate):
    """A key is longer than ``Limits.max_key_bytes`` UTF-8 bytes."""


class ShadowTooLarge(ShadowError):
    """The state would exceed ``Limits.max_state_bytes`` (REST 413)."""

    code = 413


class VersionConflict(ShadowError):
    """The expected version is not the stored one (REST 412 on If-Match, MQTT 409).

    ``current`` is the stored shadow (None when there is none) so the caller can retry or
    reply with it; ``current_version`` is its version (a deleted shadow keeps its number).
    """

    code = 409

    def __init__(self, message: str, current: Shadow | None, current_version: int) -> None:
        super().__init__(message)
        self.current = current
        self.current_version = current_version


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class Limits:
    max_state_bytes: int = 8 * 1024
    max_depth: int = 6
    max_key_bytes: int = 128
    max_id_bytes: int = 128  # device and writer ids
    history: int = 100  # change records kept per device


DEFAULT_LIMITS: Final = Limits()


# --------------------------------------------------------------------------- documents


class LeafMeta(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """What the shadow remembers about one leaf (a scalar or an array). A msgspec struct,
    packed as the array ``[ts_ms, writer, counter, seq]``: a NamedTuple cost twice as much to
    build and four times as much to pack."""

    ts_ms: int
    writer: str
    counter: int  # vv[writer] after the write that set this leaf: its dot
    seq: int | None = None  # highest device seq applied (reported only)


# The value classes are frozen msgspec structs: a third of a dataclass' cost to build, and
# immutable at run time as well.


class Shadow(msgspec.Struct, frozen=True):
    """One device's shadow (immutable: the model always builds a new one)."""

    desired: JSONObject = msgspec.field(default_factory=dict)
    reported: JSONObject = msgspec.field(default_factory=dict)
    desired_meta: dict[Path, LeafMeta] = msgspec.field(default_factory=dict)
    reported_meta: dict[Path, LeafMeta] = msgspec.field(default_factory=dict)
    version: int = 0
    vv: VersionVector = msgspec.field(default_factory=dict)
    ts_ms: int = 0  # time of the last write
    deleted: bool = False  # a tombstone: only version and vv are meaningful
    # to_bytes(), when the model made it (to bound the size; the store writes it). Not part
    # of the value: left out of comparisons and repr.
    _packed: bytes | None = None

    def _value(self) -> _ShadowValue:
        return (
            self.desired, self.reported, self.desired_meta, self.reported_meta, self.version,
            self.vv, self.ts_ms, self.deleted,
        )  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Shadow):
            return NotImplemented
        return self._value() == other._value()

    def __repr__(self) -> str:
        fields = zip(self.__struct_fields__, self._value(), strict=False)
        return f"Shadow({', '.join(f'{name}={value!r}' for name, value in fields)})"

    @property
    def delta(self) -> JSONObject:
        return compute_delta(self.desired, self.reported)

    def section(self, name: Section) -> JSONObject:
        return self.desired if name == "desired" else self.reported

    def meta(self, name: Section) -> dict[Path, LeafMeta]:
        return self.desired_meta if name == "desired" else self.reported_meta

    def document(self) -> JSONObject:
        """The AWS-shaped GET document (empty sections omitted)."""
        state: JSONObject = {}
        metadata: JSONObject = {}
        for name in SECTIONS:
            if self.section(name):
                state[name] = copy_json(self.section(name))
                metadata[name] = nest_metadata(self.meta(name), self.meta(name))
        delta = self.delta
        if delta:
            state["delta"] = delta
        vv: JSONObject = dict(self.vv)
        return {
            "state": state,
            "metadata": metadata,
            "version": self.version,
            "vv": vv,
            "timestamp": self.ts_ms // 1000,
        }

    def to_json(self) -> str:
        """The storage form (compact JSON, ASCII so any byte store takes it)."""
        return json.dumps(
            {
                "desired": self.desired,
                "reported": self.reported,
                "meta": {
                    "desired": [[p, astuple(m)] for p, m in self.desired_meta.items()],
                    "reported": [[p, astuple(m)] for p, m in self.reported_meta.items()],
                },
                "version": self.version,
                "vv": self.vv,
                "ts_ms": self.ts_ms,
                "deleted": self.deleted,
            },
            separators=(",", ":"),
        )

    def to_bytes(self) -> bytes:
        """The compact storage form: msgpack, or ``to_json()`` for what msgpack cannot hold
        (integers beyond 64 bits, strings with lone surrogates). ``from_bytes`` reads both."""
        return self._packed if self._packed is not None else _pack_shadow(self._value())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Shadow:
        """Reads ``to_bytes()`` or ``to_json()`` output (a JSON document starts with ``{``)."""
        if raw[:1] == b"{":
            return cls.from_json(raw)
        try:
            return cls(*_unpack_shadow(raw))
        except msgspec.ValidationError:  # leaf metadata as earlier versions packed it
            desired, reported, dmeta, rmeta, version, vv, ts_ms, deleted = _unpack(raw)
            return cls(
                desired, reported, _read_meta(dmeta), _read_meta(rmeta), version, vv, ts_ms,
                deleted,
            )  # fmt: skip

    @classmethod
    def from_json(cls, raw: str | bytes) -> Shadow:
        d = json.loads(raw)
        meta = d["meta"]
        return cls(
            desired=d["desired"],
            reported=d["reported"],
            desired_meta={tuple(p): LeafMeta(*m) for p, m in meta["desired"]},
            reported_meta={tuple(p): LeafMeta(*m) for p, m in meta["reported"]},
            version=d["version"],
            vv=d["vv"],
            ts_ms=d["ts_ms"],
            deleted=d["deleted"],
        )


# Shadow's fields but _packed, in order: its value, and its storage form as msgpack (the
# leaf metadata maps are keyed by arrays)
_ShadowValue: TypeAlias = tuple[
    JSONObject, JSONObject, dict[Path, LeafMeta], dict[Path, LeafMeta], int, VersionVector, int,
    bool,
]  # fmt: skip


def _pack_shadow(value: _ShadowValue) -> bytes:
    """``Shadow.to_bytes()`` of the shadow with these fields."""
    try:
        return _pack(value)
    except (OverflowError, UnicodeEncodeError):
        return Shadow(*value).to_json().encode()


def _read_meta(entries: list[list[Any]]) -> dict[Path, LeafMeta]:
    """Leaf metadata as earlier versions packed it: ``[path, [ts_ms, writer, counter, seq]]``
    or ``[path, ts_ms, writer, counter, seq]`` entries."""
    if entries and len(entries[0]) == 2:
        return {tuple(path): LeafMeta(*m) for path, m in entries}
    return {tuple(e[0]): LeafMeta(*e[1:]) for e in entries}


class ChangeRecord(msgspec.Struct, frozen=True, array_like=True):
    """One accepted write, kept in the per-device history for resync. Packed as the array
    ``[version, writer, ts_ms, state, delta]``."""

    version: int
    writer: str
    ts_ms: int
    state: JSONObject  # the applied merge patch: {"desired": {...}|None, "reported": ...}
    delta: JSONObject  # the delta after the write

    def document(self) -> JSONObject:
        return {
            "version": self.version,
            "writer": self.writer,
            "timestamp": self.ts_ms // 1000,
            "ts_ms": self.ts_ms,
            "state": copy_json(self.state),
            "delta": copy_json(self.delta),
        }

    def to_json(self) -> str:
        return json.dumps(
            [self.version, self.writer, self.ts_ms, self.state, self.delta],
            separators=(",", ":"),
        )

    def to_bytes(self) -> bytes:
        """msgpack, or ``to_json()`` when msgpack cannot hold it (see ``Shadow.to_bytes``)."""
        try:
            return _pack(self)
        except (OverflowError, UnicodeEncodeError):
            return self.to_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChangeRecord:
        """Reads ``to_bytes()`` or ``to_json()`` output (a JSON record starts with ``[``)."""
        version, writer, ts_ms, state, delta = json.loads(raw) if raw[:1] == b"[" else _unpack(raw)
        return cls(version, writer, ts_ms, state, delta)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ChangeRecord:
        version, writer, ts_ms, state, delta = json.loads(raw)
        return cls(version, writer, ts_ms, state, delta)


class ChangeLog(msgspec.Struct, frozen=True):
    """Answer to ``changes_since(device, since)``.

    ``changes`` are the records with ``version > since``, oldest first. ``complete`` is False
    when the history no longer reaches back to ``since`` (or ``since`` is ahead of the shadow):
    the caller must then send the full document instead.
    """

    version: int  # current version of the shadow
    changes: tuple[ChangeRecord, ...]
    complete: bool


class UpdateResult(msgspec.Struct, frozen=True):
    """The outcome of an accepted update or replace.

    ``accepted`` is the ``/update/accepted`` payload and ``delta`` the ``/update/delta``
    payload (None when there is nothing to notify); both carry ``version`` = the new version.
    They are built when asked for (a new object each time), from ``applied`` (per section
    named by the write: the merge patch applied, or the whole new section for a replace;
    None for a cleared section), ``client_token`` and ``notify`` (desired changed and the
    delta is not empty). A store that only persists the write never pays for them.
    """

    shadow: Shadow
    change: ChangeRecord
    applied: dict[Section, JSONObject | None]
    client_token: str | None = None
    notify: bool = False
    concurrent: bool = False
    conflicting_fields: tuple[str, ...] = ()
    overruled_fields: tuple[str, ...] = ()
    suppressed_fields: tuple[str, ...] = ()
    cas_retries: int = 0

    @property
    def version(self) -> int:
        return self.shadow.version

    @property
    def accepted(self) -> JSONObject:
        new = self.shadow
        state: JSONObject = {}
        metadata: JSONObject = {}
        for name, patch in self.applied.items():
            state[name] = copy_json(patch)
            if patch:
                metadata[name] = nest_metadata(new.meta(name), _value_paths(patch))
        doc: JSONObject = {
            "state": state,
            "metadata": metadata,
            "version": new.version,
            "timestamp": self.change.ts_ms // 1000,
        }
        if self.client_token is not None:
            doc["clientToken"] = self.client_token
        return doc

    @property
    def delta(self) -> JSONObject | None:
        if not self.notify:
            return None
        delta = self.change.delta  # the delta after the write
        doc: JSONObject = {
            "state": copy_json(delta),
            "metadata": nest_metadata(self.shadow.desired_meta, leaf_paths(delta)),
            "version": self.shadow.version,
            "timestamp": self.change.ts_ms // 1000,
        }
        if self.client_token is not None:
            doc["clientToken"] = self.client_token
        return doc


# --------------------------------------------------------------------------- JSON helpers


# msgpack by msgspec: the same bytes as the msgpack package, in a third of the time (packing
# is a large part of a write); it raises OverflowError and UnicodeEncodeError alike.
_pack: Final = msgspec.msgpack.encode
_unpack: Final = msgspec.msgpack.decode
# Shadow.to_bytes' form, decoded into its types: the leaf metadata straight into LeafMeta
_Meta: TypeAlias = dict[Path, LeafMeta]
_unpack_shadow: Final = msgspec.msgpack.Decoder(
    tuple[dict[str, Any], dict[str, Any], _Meta, _Meta, int, dict[str, int], int, bool]
).decode


def copy_json(value: JSON) -> Any:
    """A deep copy of a JSON value (much cheaper than copy.deepcopy)."""
    if isinstance(value, dict):
        return {k: copy_json(v) if isinstance(v, (dict, list)) else v for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) if isinstance(v, (dict, list)) else v for v in value]
    return value


def json_equal(a: JSON, b: JSON) -> bool:
    """JSON equality: ``true`` is not ``1`` (unlike Python), ``1`` equals ``1.0``."""
    if a is b:  # a section a write left alone (shadows hold no NaN)
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return False
        for k, v in a.items():  # noqa: SIM110  (no all(...): model.pxd makes this a cpdef
            if not json_equal(v, b[k]):  # function, which cannot hold a generator's closure)
                return False
        return True
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return False
        for x, y in zip(a, b, strict=True):  # noqa: SIM110  (as above)
            if not json_equal(x, y):
                return False
        return True
    return type(a) is type(b) and a == b


def _canonical(value: JSON) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def pointer(section: str, path: Path) -> str:
    """RFC 6901 JSON pointer of a field: ``/desired/a~1b`` for key ``a/b``."""
    parts = [section, *path]
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def leaf_paths(value: JSON, prefix: Path = ()) -> Iterator[Path]:
    """Paths of the leaves (non-objects) of a state tree."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaf_paths(v, (*prefix, k))
    else:
        yield prefix


def nest_metadata(meta: Mapping[Path, LeafMeta], paths: Iterable[Path]) -> JSONObject:
    """AWS metadata for ``paths``: ``{"a": {"b": {"timestamp": s}}}``."""
    out: JSONObject = {}
    for path in paths:
        m = meta.get(path)
        if m is None or not path:
            continue
        node = out
        for key in path[:-1]:
            child = node.setdefault(key, {})
            assert isinstance(child, dict)
            node = child
        node[path[-1]] = {"timestamp": m.ts_ms // 1000}
    return out


def compute_delta(desired: JSONObject, reported: JSONObject) -> JSONObject:
    """Desired keys whose value differs from reported; objects recurse, the rest compare whole."""
    out: JSONObject = {}
    for key, want in desired.items():
        if key not in reported:
            out[key] = copy_json(want)
            continue
        have = reported[key]
        if isinstance(want, dict) and isinstance(have, dict):
            sub = compute_delta(want, have)
            if sub:
                out[key] = sub
        elif not json_equal(want, have):
            out[key] = copy_json(want)
    return out


def diff_patch(old: JSONObject, new: JSONObject) -> JSONObject:
    """The merge patch that turns ``old`` into ``new`` (both pruned state trees)."""
    out: JSONObject = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = diff_patch(before, value)
            if sub:
                out[key] = sub
        elif key not in old or not json_equal(before, value):
            out[key] = copy_json(value)
    return out


def state_size(desired: JSONObject, reported: JSONObject) -> int:
    """Bytes of the compact UTF-8 JSON of both sections: what the size limit measures."""
    both = {"desired": desired, "reported": reported}
    if _compact_utf8_chunks is None:  # pragma: no cover - Python without the C accelerator
        text = _COMPACT_UTF8.encode(both)
    else:
        text = "".join(_compact_utf8_chunks(both, 0))
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------- version vectors


def dominates(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """``a >= b`` componentwise (missing entries count as 0)."""
    return all(a.get(k, 0) >= n for k, n in b.items())


def merge_vv(a: Mapping[str, int], b: Mapping[str, int]) -> VersionVector:
    """Componentwise max; zero entries are dropped so equal vectors compare equal."""
    out = {k: n for k, n in a.items() if n > 0}
    for k, n in b.items():
        if n > out.get(k, 0):
            out[k] = n
    return out


def bump(vv: Mapping[str, int], writer: str) -> VersionVector:
    out = dict(vv)
    out[writer] = out.get(writer, 0) + 1
    return out


def covers(context: Mapping[str, int], meta: LeafMeta) -> bool:
    """Whether the write that set this leaf is known to (happened before) ``context``."""
    return context.get(meta.writer, 0) >= meta.counter


def wins(incoming: tuple[int, str, JSON], stored: tuple[int, str, JSON]) -> bool:
    """The conflict rule for one leaf written concurrently with a value on both sides:
    the later ``ts_ms`` wins, then the greater writer id, then the greater canonical JSON."""
    (ts_a, w_a, v_a), (ts_b, w_b, v_b) = incoming, stored
    return (ts_a, w_a, _canonical(v_a)) > (ts_b, w_b, _canonical(v_b))


# --------------------------------------------------------------------------- validation


def _utf8_len(text: str, where: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidUpdate(f"{where}: not valid UTF-8") from None


def check_id(value: object, what: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """A device or writer id: a non-empty string of at most ``max_id_bytes``."""
    if not isinstance(value, str) or not value:
        raise InvalidUpdate(f"{what} must be a non-empty string")
    if (len(value) if value.isascii() else _utf8_len(value, what)) > limits.max_id_bytes:
        raise InvalidUpdate(f"{what} is longer than {limits.max_id_bytes} bytes")
    return value


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidUpdate(f"{what} must be a non-negative integer")
    return value


def check_vv(
    value: object, what: str = "context", limits: Limits = DEFAULT_LIMITS
) -> VersionVector:
    if not isinstance(value, Mapping):
        raise InvalidUpdate(f"{what} must be an object of writer -> counter")
    return {
        check_id(k, f"{what} key", limits): _check_int(n, f"{what}[{k!r}]")
        for k, n in value.items()
    }


def _check_tree(value: object, where: str, depth: int, limits: Limits, nulls: bool) -> None:
    """Validates types, key lengths and depth; ``nulls`` allows null members (deletes)."""
    if isinstance(value, dict):
        if depth > limits.max_depth:
            raise ShadowTooDeep(f"{where}: nested deeper than {limits.max_depth} levels")
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidUpdate(f"{where}: keys must be strings")
            if (len(key) if key.isascii() else _utf8_len(key, where)) > limits.max_key_bytes:
                raise KeyTooLong(
                    f"{where}: key {key[:16]!r}... is longer than {limits.max_key_bytes} bytes"
                )
            kind = type(item)
            if kind is str or kind is int or kind is bool or (item is None and nulls):
                continue  # the common leaves, without a call (floats may be infinite)
            _check_tree(item, f"{where}/{key}", depth + 1, limits, nulls)
    elif isinstance(value, list):
        if depth > limits.max_depth:
            raise ShadowTooDeep(f"{where}: nested deeper than {limits.max_depth} levels")
        for i, item in enumerate(value):
            _check_tree(item, f"{where}/{i}", depth + 1, limits, nulls=True)  # null is a value
    elif value is None:
        if not nulls:
            raise InvalidUpdate(f"{where}: null is not allowed here")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidUpdate(f"{where}: numbers must be finite")
    elif not isinstance(value, (str, int)):  # bool is an int
        raise InvalidUpdate(f"{where}: {type(value).__name__} is not a JSON value")


# A validated update: per section present, a merge patch or None (clear the section); the
# version; the client token.
ParsedUpdate: TypeAlias = tuple[dict[Section, "JSONObject | None"], "int | None", "str | None"]
_SECTION_WHERE: Final = {"desired": "/state/desired", "reported": "/state/reported"}


def parse_update(doc: object, limits: Limits = DEFAULT_LIMITS, nulls: bool = True) -> ParsedUpdate:
    """Validates an update (or, with ``nulls=False``, a replace) document."""
    if type(doc) is not dict and not isinstance(doc, Mapping):
        raise InvalidUpdate("the update must be a JSON object")
    if not _UPDATE_KEYS.issuperset(doc):
        unknown = set(doc) - _UPDATE_KEYS
        raise InvalidUpdate(
            f"unknown top-level keys {sorted(map(str, unknown))}; allowed: {sorted(_UPDATE_KEYS)}"
        )
    version = doc.get("version")
    if version is not None:
        version = _check_int(version, "version")
    token = doc.get("clientToken")
    if token is not None and not isinstance(token, str):
        raise InvalidUpdate("clientToken must be a string")
    if "state" not in doc:
        raise InvalidUpdate('the update has no "state"')
    state = doc["state"]
    if state is None:
        return {"desired": None, "reported": None}, version, token
    if type(state) is not dict and not isinstance(state, Mapping):
        raise InvalidUpdate('"state" must be an object or null')
    sections: dict[Section, JSONObject | None] = {}
    for key, value in state.items():
        if key not in SECTIONS:
            raise InvalidUpdate(f'unknown key "state.{key}"; allowed: desired, reported')
        if value is not None:
            if not isinstance(value, dict):
                raise InvalidUpdate(f'"state.{key}" must be an object or null')
            _check_tree(value, _SECTION_WHERE[key], 1, limits, nulls)
        sections[key] = value
    return sections, version, token


def check_version(current: Shadow | None, expected: int | None) -> None:
    """Raises VersionConflict unless ``expected`` is None or the stored version."""
    if expected is None:
        return
    have = current.version if current is not None else 0
    if expected != have:
        live = current if current is not None and not current.deleted else None
        raise VersionConflict(
            f"version conflict: expected {expected}, current is {have}", live, have
        )


def _expected(argument: int | None, body: int | None) -> int | None:
    if argument is not None and body is not None and argument != body:
        raise InvalidUpdate(f"version {body} in the body contradicts expected version {argument}")
    return argument if argument is not None else body


# --------------------------------------------------------------------------- tree edits


class _Deleted:
    """Marks a delete in the list of applied operations."""


_DELETE: Final = _Deleted()
_Op: TypeAlias = tuple[Path, "JSON | _Deleted"]


def _patch_ops(patch: JSONObject, prefix: Path = (), ops: list[_Op] | None = None) -> list[_Op]:
    """Flattens a merge patch into leaf operations; empty objects give none."""
    if ops is None:
        ops = []
    for key, value in patch.items():
        path = (*prefix, key)
        if value is None:
            ops.append((path, _DELETE))
        elif isinstance(value, dict):
            _patch_ops(value, path, ops)
        else:
            ops.append((path, value))
    return ops


def _affected(state: JSONObject, path: Path, writing: bool) -> list[Path]:
    """Stored leaves that writing (or deleting) ``path`` replaces: the leaf at ``path``, the
    leaves under it and, when writing, a leaf on the way that turns into an object."""
    node: JSON = state
    for i, key in enumerate(path):
        if not isinstance(node, dict):
            return [path[:i]] if writing else []
        if key not in node:
            return []
        node = node[key]
    if not isinstance(node, dict):
        return [path]
    return list(leaf_paths(node, path))


def _value_at(state: JSONObject, path: Path) -> JSON:
    node: JSON = state
    for key in path:
        assert isinstance(node, dict)
        node = node[key]
    return node


def _set(state: JSONObject, path: Path, value: JSON) -> None:
    node = state
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = copy_json(value) if isinstance(value, (dict, list)) else value


def _remove(state: JSONObject, path: Path) -> None:
    """Removes a leaf and prunes the objects it leaves empty."""
    parents: list[tuple[JSONObject, str]] = []
    node = state
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            return
        parents.append((node, key))
        node = child
    node.pop(path[-1], None)
    for parent, key in reversed(parents):
        if node:
            break
        del parent[key]
        node = parent


def _nest(ops: list[_Op]) -> JSONObject | None:
    """The merge patch made of applied operations (None: the whole section was cleared)."""
    out: JSONObject = {}
    for path, value in ops:
        if not path:
            return None
        node = out
        for key in path[:-1]:
            child = node.setdefault(key, {})
            assert isinstance(child, dict)
            node = child
        node[path[-1]] = None if isinstance(value, _Deleted) else copy_json(value)
    return out


# --------------------------------------------------------------------------- writes


class _Write:
    """The mutable working state of one write."""

    __slots__ = ("conflicting", "context", "counter", "overruled", "seq", "suppressed", "ts_ms",
                 "writer")  # fmt: skip

    def __init__(
        self,
        writer: str,
        counter: int,
        ts_ms: int,
        context: VersionVector | None,  # set only when the write is concurrent
        seq: int | None,
    ) -> None:
        self.writer = writer
        self.counter = counter
        self.ts_ms = ts_ms
        self.context = context
        self.seq = seq
        self.conflicting: list[str] = []
        self.overruled: list[str] = []
        self.suppressed: list[str] = []

    def apply(
        self, section: Section, state: JSONObject, meta: dict[Path, LeafMeta], ops: list[_Op]
    ) -> list[_Op]:
        # a device's seq orders its reports only: None for desired
        seq = self.seq if section == "reported" else None
        applied: list[_Op] = []
        for path, value in ops:
            if isinstance(value, _Deleted):
                applied.extend(self._delete(section, seq, state, meta, path))
            elif self._set(section, seq, state, meta, path, value):
                applied.append((path, value))
        return applied

    def _set(
        self,
        section: Section,
        seq: int | None,
        state: JSONObject,
        meta: dict[Path, LeafMeta],
        path: Path,
        value: JSON,
    ) -> bool:
        affected = _affected(state, path, True)
        if seq is not None:
            for q in affected:
                old = meta[q].seq
                if old is not None and old > seq:  # a newer report set it
                    self.suppressed.append(pointer(section, path))
                    return False
        if self.context is not None:
            rivals = [q for q in affected if not covers(self.context, meta[q])]
            if rivals:
                where = pointer(section, path)
                self.conflicting.append(where)
                mine = (self.ts_ms, self.writer, value)
                if not all(
                    wins(mine, (meta[q].ts_ms, meta[q].writer, _value_at(state, q))) for q in rivals
                ):
                    self.overruled.append(where)
                    return False
        # the new leaf keeps the highest seq applied to what it replaces
        for q in affected:
            old = meta.pop(q).seq
            if old is not None and (seq is None or old > seq):
                seq = old
        _set(state, path, value)
        meta[path] = LeafMeta(self.ts_ms, self.writer, self.counter, seq)
        return True

    def _delete(
        self,
        section: Section,
        seq: int | None,
        state: JSONObject,
        meta: dict[Path, LeafMeta],
        path: Path,
    ) -> list[_Op]:
        affected = _affected(state, path, False)
        removed: list[_Op] = []
        for q in affected:
            m = meta[q]
            if seq is not None and m.seq is not None and m.seq > seq:  # a newer report set it
                self.suppressed.append(pointer(section, q))
            elif self.context is not None and not covers(self.context, m):
                # add-wins: a concurrently written value survives a delete
                self.conflicting.append(pointer(section, q))
                self.overruled.append(pointer(section, q))
            else:
                _remove(state, q)
                del meta[q]
                removed.append((q, _DELETE))
        if len(removed) == len(affected) and (affected or not path):
            return [(path, _DELETE)]  # all gone (or a whole section cleared): one null
        return removed


def _base(current: Shadow | None) -> Shadow:
    """What a write starts from: the stored shadow, or an empty one continuing a tombstone."""
    if current is None:
        return Shadow()
    if current.deleted:
        return Shadow(version=current.version, vv=dict(current.vv))
    return current


def _result(
    base: Shadow,
    new: Shadow,
    applied: dict[Section, JSONObject | None],
    w: _Write,
    change_state: JSONObject,
    concurrent: bool,
    client_token: str | None,
) -> UpdateResult:
    """The change record and result of a write (its payloads are built on demand)."""
    delta = new.delta
    return UpdateResult(
        new,
        ChangeRecord(new.version, w.writer, w.ts_ms, change_state, delta),
        applied,
        client_token,
        bool(delta) and not json_equal(base.desired, new.desired),
        concurrent,
        tuple(w.conflicting),
        tuple(w.overruled),
        tuple(w.suppressed),
    )


def _value_paths(patch: JSONObject, prefix: Path = (), out: list[Path] | None = None) -> list[Path]:
    """The leaves of a merge patch that set a value (not the nulls that delete)."""
    if out is None:
        out = []
    for key, value in patch.items():
        if isinstance(value, dict):
            _value_paths(value, (*prefix, key), out)
        elif value is not None:
            out.append((*prefix, key))
    return out


def _next_shadow(
    base: Shadow,
    states: Mapping[Section, JSONObject],
    metas: Mapping[Section, dict[Path, LeafMeta]],
    vv: VersionVector,
    ts_ms: int,
    limits: Limits,
) -> Shadow:
    """The shadow after a write to `base`, once its state is within the size limit."""
    value: _ShadowValue = (
        states["desired"], states["reported"], metas["desired"], metas["reported"],
        base.version + 1, vv, ts_ms, False,
    )  # fmt: skip
    packed = _pack_shadow(value)
    # Measuring the JSON is the costly part of the check, so it is skipped when the packed
    # shadow proves the state small: no JSON value is more than 7 times as long as its
    # msgpack (a control character in a string, 1 byte, is 6 in JSON; null, 1 byte, is 4,
    # plus 1 for the comma), both sections are inside the packed shadow, and what wraps them
    # is 24 bytes. A shadow msgpack cannot hold is packed as JSON, longer than the state.
    if len(packed) * 8 + 32 > limits.max_state_bytes:
        size = state_size(states["desired"], states["reported"])
        if size > limits.max_state_bytes:
            raise ShadowTooLarge(
                f"the shadow state would be {size} bytes; the limit is {limits.max_state_bytes}"
            )
    return Shadow(*value, packed)


def apply_update(
    current: Shadow | None,
    update: object,
    *,
    writer: str,
    ts_ms: int,
    expected_version: int | None = None,
    context: Mapping[str, int] | None = None,
    seq: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> UpdateResult:
    """Merges an update document into ``current`` (None: no shadow yet).

    Raises InvalidUpdate (and its subclasses), ShadowTooLarge or VersionConflict; never
    touches ``current``.
    """
    check_id(writer, "writer", limits)
    sections, version, token = parse_update(update, limits)
    expected = expected_version if version is None else _expected(expected_version, version)
    if expected is not None:
        check_version(current, expected)
    if seq is not None:
        seq = _check_int(seq, "seq")
    base = current if current is not None and not current.deleted else _base(current)

    if context is None:
        concurrent = False
        vv = bump(base.vv, writer)  # stored vectors hold no zero entries: no merge_vv needed
        w = _Write(writer, vv[writer], ts_ms, None, seq)
    else:
        ctx = check_vv(context, "context", limits)
        concurrent = not dominates(ctx, base.vv)
        vv = bump(merge_vv(base.vv, ctx), writer)
        w = _Write(writer, vv[writer], ts_ms, ctx if concurrent else None, seq)

    # a section the update does not name is shared with `base` (shadows are immutable)
    states: dict[Section, JSONObject] = {"desired": base.desired, "reported": base.reported}
    metas: dict[Section, dict[Path, LeafMeta]] = {
        "desired": base.desired_meta,
        "reported": base.reported_meta,
    }
    applied: dict[Section, JSONObject | None] = {}
    for name, patch in sections.items():
        states[name] = state = copy_json(states[name])
        metas[name] = meta = dict(metas[name])
        # clearing a section deletes each leaf, so the per-leaf rules still apply
        ops: list[_Op] = [((), _DELETE)] if patch is None else _patch_ops(patch)
        applied[name] = _nest(w.apply(name, state, meta, ops))

    new = _next_shadow(base, states, metas, vv, ts_ms, limits)
    change_state: JSONObject = {name: patch for name, patch in applied.items()}
    return _result(base, new, applied, w, change_state, concurrent, token)


def apply_replace(
    current: Shadow | None,
    doc: object,
    *,
    writer: str,
    ts_ms: int,
    expected_version: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> UpdateResult:
    """PUT semantics: ``desired`` and ``reported`` become exactly what ``doc`` holds (a section
    that is absent or null becomes empty). Nulls inside sections are refused. Every leaf gets
    fresh metadata; the change record holds the merge patch from the old state to the new."""
    check_id(writer, "writer", limits)
    sections, version, token = parse_update(doc, limits, nulls=False)
    expected = _expected(expected_version, version)
    check_version(current, expected)
    base = _base(current)
    vv = bump(base.vv, writer)
    states: dict[Section, JSONObject] = {}
    metas: dict[Section, dict[Path, LeafMeta]] = {}
    for name in SECTIONS:
        states[name] = copy_json(sections.get(name) or {})
        _prune(states[name])
        m = LeafMeta(ts_ms, writer, vv[writer])
        metas[name] = {p: m for p in leaf_paths(states[name]) if p}
    new = _next_shadow(base, states, metas, vv, ts_ms, limits)
    w = _Write(writer, vv[writer], ts_ms, None, None)
    applied: dict[Section, JSONObject | None] = {n: states[n] for n in SECTIONS}
    change_state: JSONObject = {n: diff_patch(base.section(n), states[n]) for n in SECTIONS}
    return _result(base, new, applied, w, change_state, False, token)


def _prune(state: JSONObject) -> bool:
    """Drops empty objects (in place); returns whether ``state`` itself is now empty."""
    for key in [k for k, v in state.items() if isinstance(v, dict) and _prune(v)]:
        del state[key]
    return not state


def apply_delete(
    current: Shadow | None, *, expected_version: int | None = None, ts_ms: int
) -> Shadow | None:
    """The tombstone that replaces ``current`` (version + 1, vv kept), or None when there is
    no shadow to delete. Raises VersionConflict on a stale ``expected_version``."""
    if current is None or current.deleted:
        return None
    check_version(current, expected_version)
    return Shadow(version=current.version + 1, vv=dict(current.vv), ts_ms=ts_ms, deleted=True)


def select_changes(current_version: int, records: Iterable[ChangeRecord], since: int) -> ChangeLog:
    """The records newer than ``since``; incomplete when the history starts after it."""
    newer = tuple(r for r in records if r.version > since)
    if since > current_version:
        return ChangeLog(current_version, (), complete=False)
    complete = since == current_version or (bool(newer) and newer[0].version == since + 1)
    return ChangeLog(current_version, newer if complete else (), complete)
