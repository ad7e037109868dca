"""The gateway's CoAP resources (DESIGN.md, public names), behind the message layer.

    POST /telemetry/{id}, POST /events/{id}     a telemetry record; 2.04 once it is durable
    GET /shadow/{id}                            the shadow document (ETag = version); Observe
    PUT /shadow/{id}                            replace; PATCH, iPATCH or POST: update (AWS
                                                document, plus the iotgw "seq" and "context"
                                                fields); a retransmitted iPATCH (same token
                                                and body) is answered, not applied again
    FETCH /shadow/{id}                          RFC 8132: a JSON list of dotted paths in, those
                                                fields of the document out
    DELETE /shadow/{id}                         2.02, or 4.04 when there is none
    GET /shadow/{id}/delta                      {"state": delta, "version", "timestamp"}; Observe
                                                (empty, version 0, while there is no shadow)
    GET /commands/{id}                          Observe: commands published to MQTT
                                                devices/{id}/commands/{name}
    POST /commands/{id}/{name}                  the device's answer, published on MQTT
                                                devices/{id}/commands/{name}/response
    GET /.well-known/core                       RFC 6690 link format (rt= / href= filters)

Authentication: the device id is the path's `{id}`; a token in the `t` query (`?t=...`) must be
the device's password in the registry, checked by the gateway's guard (gateway/guard.py: off
the event loop, remembered, throttled); a request without one is served only with
--allow-anonymous, and then only for a device id that is not registered.

Writes take `If-Match` with the ETag (the version as a big-endian unsigned integer): a stale
one gets 4.12 Precondition Failed; a stale `"version"` in the body gets 4.09 Conflict
(RFC 8132); `If-None-Match` refuses to overwrite an existing shadow (4.12).

Command notifications are JSON: `{"name": name, "payload": <the MQTT payload as JSON>}`, or
`"text": "..."` instead of "payload" when the payload is UTF-8 but not JSON, or `"base64"` when it
is neither. A command published with QoS >= 1 is notified as CON (queued behind a CON in flight,
never replaced), QoS 0 as NON. The answer goes to the MQTT 5 response topic of the latest
command of that name (with its correlation data) when the application gave one.

Shadow operations await the store, so each runs as a task (like the MQTT shadow requests);
telemetry, the hot path, runs inline: the pipeline calls back `records_durable`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway import guard
from gateway._native import coap, mqtt
from gateway.auth import ADDED, RegistryError, valid_device_id
from gateway.coap import blockwise
from gateway.coap.exchanges import Exchange
from gateway.coap.observe import COMMANDS, DELTA, SHADOW, Observer
from gateway.mqtt.session import Message
from gateway.shadows import split_update
from gateway.telemetry.lanes import lane_of
from gateway.telemetry.records import EVENTS, TELEMETRY, Record
from shadow import Shadow, ShadowError, ShadowTooLarge, VersionConflict

if TYPE_CHECKING:
    from gateway.auth import DeviceRegistry
    from gateway.coap.endpoint import CoapEndpoint
    from gateway.mqtt.broker import Broker
    from gateway.shadows import ShadowService
    from gateway.telemetry.pipeline import TelemetryPipeline

log = logging.getLogger("iotgw.coap")

# Content-Formats a telemetry body may declare (the record's content type); a shadow body is
# JSON or undeclared.
CONTENT_TYPES = {
    coap.TEXT_PLAIN: "text/plain;charset=utf-8",
    coap.XML: "application/xml",
    coap.OCTET_STREAM: "application/octet-stream",
    coap.EXI: "application/exi",
    coap.JSON: "application/json",
    coap.CBOR: "application/cbor",
    coap.SENML_JSON: "application/senml+json",
    coap.SENML_CBOR: "application/senml+cbor",
}

LINKS = (
    ("/telemetry", 'rt="iotgw.telemetry";title="POST /telemetry/{id}?t={token}"'),
    ("/events", 'rt="iotgw.events";title="POST /events/{id}?t={token}"'),
    (
        "/shadow",
        'rt="iotgw.shadow";ct=50;obs;title="GET FETCH PUT PATCH iPATCH POST DELETE /shadow/{id}, '
        'GET /shadow/{id}/delta"',
    ),
    (
        "/commands",
        'rt="iotgw.commands";ct=50;obs;title="GET /commands/{id} with Observe, '
        'POST /commands/{id}/{name}"',
    ),
)

_METHOD_NAMES = {coap.GET: "GET", coap.POST: "POST", coap.PUT: "PUT", coap.DELETE: "DELETE",
                 coap.FETCH: "FETCH", coap.PATCH: "PATCH", coap.IPATCH: "iPATCH"}
_SHADOW_METHODS = (coap.FETCH, coap.PUT, coap.PATCH, coap.IPATCH, coap.POST, coap.DELETE)
MAX_IPATCHES = 10_000  # iPATCHes remembered for retransmissions (EXCHANGE_LIFETIME each)
REPLY_TO_SECONDS = 300.0  # how long an MQTT 5 response topic of a command is remembered
MAX_REPLY_TO = 10_000

_POST, _GET = coap.POST, coap.GET
_monotonic = time.monotonic


def etag_of(version: int) -> bytes:
    return version.to_bytes(max(1, (version.bit_length() + 7) // 8), "big")


def command_document(name: str, payload: bytes) -> bytes:
    doc: dict[str, Any] = {"name": name}
    if not payload:
        doc["payload"] = None
    else:
        try:
            doc["payload"] = json.loads(payload)
        except UnicodeDecodeError:
            doc["base64"] = base64.b64encode(payload).decode()
        except ValueError:
            try:
                doc["text"] = payload.decode()
            except UnicodeDecodeError:
                doc["base64"] = base64.b64encode(payload).decode()
    return _json(doc)


class Resources:
    def __init__(
        self,
        endpoint: CoapEndpoint,
        *,
        shadows: ShadowService | None,
        pipeline: TelemetryPipeline | None,
        broker: Broker | None,
        registry: DeviceRegistry | None,
        allow_anonymous: bool,
    ) -> None:
        self.endpoint = endpoint
        self.respond = endpoint.respond
        self.observers = endpoint.observers
        self.blocks = endpoint.blocks
        self.shadows = shadows
        self.pipeline = pipeline
        self.broker = broker
        self.registry = registry
        self.allow_anonymous = allow_anonymous
        self.max_body = endpoint.limits.max_body
        self._tasks: set[asyncio.Task[None]] = set()
        self._command_subs: dict[str, Callable[[], None]] = {}
        # In a cluster, a shadow written on another node is heard of through its accepted
        # messages, routed here while this node has observers of that shadow.
        self._shadow_subs: dict[str, Callable[[], None]] = {}
        self._reply_to: dict[tuple[str, str], tuple[str, bytes | None]] = {}
        self._reply_deadlines: deque[tuple[float, tuple[str, str], str]] = deque()
        self._versions: dict[str, int] = {}  # newest shadow version heard of, while observed
        self._notifying: set[str] = set()  # devices with a notification task running
        self._dirty: set[str] = set()  # ... that must look at the store once more
        # iPATCHes applied: (device, token, body digest) -> (expires, ETag of the result)
        self._ipatched: dict[tuple[str, bytes, bytes], tuple[float, bytes]] = {}
        self._ipatch_deadlines: deque[tuple[float, tuple[str, bytes, bytes]]] = deque()
        self.observers.on_removed = self._observer_removed
        self.observers.probe = self._probe

    # ---- dispatch --------------------------------------------------------------------------

    def handle(
        self, ex: Exchange, msg: coap.Message, code: int, now: float, verdict: str | None = None
    ) -> None:
        """`verdict`: the guard's answer on the request's credentials, when it came later than
        the request (the request is handled again with it)."""
        ex.method = code
        if msg.bad_critical:
            bad = ", ".join(str(n) for n in msg.bad_critical)
            self._error(ex, coap.BAD_OPTION, f"bad critical option {bad}")
            return
        no_response = msg.no_response
        if no_response:
            ex.no_response = no_response
        path = msg.uri_path
        n = len(path)
        first = path[0] if n else ""
        if n == 2 and first in (TELEMETRY, EVENTS):  # the hot path
            if code != _POST:
                self._error(ex, coap.METHOD_NOT_ALLOWED, "POST only")
                return
            device = path[1]
            if not self._authorized(ex, msg, code, device, verdict):
                return
            cf = msg.content_format
            if cf is not None and cf not in CONTENT_TYPES:
                self._error(ex, coap.UNSUPPORTED_CONTENT_FORMAT, f"content format {cf}")
                return
            body = self._body(ex, msg, now)
            if body is not None:
                self._record(ex, first, device, body, cf)
            return
        if msg.proxy_uri is not None or msg.proxy_scheme is not None:
            self._error(ex, coap.PROXYING_NOT_SUPPORTED, "no proxying")
            return
        ex.block2 = msg.block2
        if first == "shadow" and (n == 2 or (n == 3 and path[2] == "delta")):
            self._shadow(ex, msg, code, path[1], n == 3, now, verdict)
        elif first == "commands" and n >= 2:
            self._commands(ex, msg, code, path, now, verdict)
        elif n == 2 and first == ".well-known" and path[1] == "core":
            if code != _GET:
                self._error(ex, coap.METHOD_NOT_ALLOWED, "GET only")
            else:
                self._well_known(ex, msg.uri_query)
        else:
            self._error(ex, coap.NOT_FOUND, "no such resource")

    def _error(
        self, ex: Exchange, code: int, text: str, options: list[tuple[int, Any]] | None = None
    ) -> None:
        """A response with a diagnostic payload (RFC 7252 5.5.2: UTF-8 text)."""
        self.respond(ex, code, options or (), text.encode()[:512])

    def _authorized(
        self, ex: Exchange, msg: coap.Message, code: int, device: str, verdict: str | None
    ) -> bool:
        """True when the request may act as `device`; else it was answered (4.01, 4.29, 5.03),
        or it waits for the guard and is handled again with its verdict. Over DTLS the session
        is the credential: it acts as its own device only (4.03 otherwise)."""
        identity = ex.identity
        if identity is not None:
            if identity == device:
                return True
            peer = ex.addr.addr
            self.endpoint.events.denied("coaps", identity, f"{peer[0]}:{peer[1]}",
                                        _METHOD_NAMES.get(code, coap.code_str(code)),
                                        "/".join(msg.uri_path))
            self._error(ex, coap.FORBIDDEN, "a DTLS session acts as its own device only")
            return False
        if verdict is None:
            result = self._check(ex, msg, device)
            if not isinstance(result, str):
                result.add_done_callback(
                    lambda f: self.handle(ex, msg, code, _monotonic(), f.result())
                )
                return False
            verdict = result
        if verdict == guard.OK:
            return True
        self.endpoint.events.refused("coap", device, f"{ex.addr[0]}:{ex.addr[1]}", verdict)
        if verdict == guard.DENIED:
            self._error(ex, coap.UNAUTHORIZED, "a valid ?t= token is required")
        elif verdict == guard.DISABLED:
            self._error(ex, coap.UNAUTHORIZED, "the device is disabled")
        elif verdict == guard.BANNED:
            self._error(ex, coap.FORBIDDEN, "banned by an operator")
        elif verdict == guard.THROTTLED:
            self._error(ex, coap.TOO_MANY_REQUESTS, "too many failed attempts: try later",
                        [(coap.MAX_AGE, 60)])
        else:
            self._error(ex, coap.SERVICE_UNAVAILABLE, "credentials cannot be checked now",
                        [(coap.MAX_AGE, self.endpoint.limits.overload_max_age)])
        return False

    def _check(
        self, ex: Exchange, msg: coap.Message, device: str
    ) -> guard.Verdict | asyncio.Future[guard.Verdict]:
        if not valid_device_id(device):
            return guard.DENIED
        if self.endpoint.guard.bans.banned((f"id:{device}", f"addr:{ex.addr[0]}")):
            return guard.BANNED
        token: str | None = None
        for q in msg.uri_query:
            if q.startswith("t="):
                token = q[2:]
                break
        registry = self.registry
        if token is None:  # anonymous: only as a device no one registered
            if not self.allow_anonymous:
                return guard.DENIED
            ex.anonymous = True
            try:
                return guard.DENIED if registry and registry.get(device) else guard.OK
            except RegistryError:
                return guard.UNAVAILABLE
        if registry is None:
            return guard.DENIED
        return self.endpoint.guard.check_device(
            "coap", registry, device, token.encode(), (f"id:{device}", f"addr:{ex.addr[0]}")
        )

    def revoke(self, changes: dict[str, str]) -> None:
        """Devices removed, disabled or added (observed until now without a token, as an
        unregistered id): their observations end with 4.01. (The guard's memory of their secrets
        no longer matches the registry's.)"""
        now = _monotonic()
        for device, op in changes.items():
            self.observers.end_device(
                device, coap.UNAUTHORIZED, f"device {op}".encode(), now, op == ADDED
            )


    def _body(
        self, ex: Exchange, msg: coap.Message, now: float
    ) -> bytes | bytearray | memoryview | None:
        """The request body, Block1 reassembled; None when a response went out already
        (2.31 Continue, or an error)."""
        block1 = msg.block1
        payload = msg.payload
        if block1 is None:
            if len(payload) > self.max_body:
                self._too_large(ex)
                return None
            return payload
        key = (ex.addr, ex.method, tuple(msg.uri_path))
        outcome, body = self.blocks.feed(key, block1, payload, msg.size1, now)
        num, _, szx = block1
        if outcome == blockwise.COMPLETE:
            ex.block1 = coap.block_value(num, False, szx)
            return body
        if outcome == blockwise.CONTINUE:
            self.respond(ex, coap.CONTINUE, [(coap.BLOCK1, coap.block_value(num, True, szx))])
        elif outcome == blockwise.INCOMPLETE:
            self._error(ex, coap.REQUEST_ENTITY_INCOMPLETE, f"block {num} is not the next one")
        elif outcome == blockwise.TOO_LARGE:
            self._too_large(ex)
        else:
            self._error(ex, coap.BAD_REQUEST, "a block that is not the last must be full")
        return None

    def _too_large(self, ex: Exchange) -> None:
        self._error(
            ex,
            coap.REQUEST_ENTITY_TOO_LARGE,
            f"the body may have at most {self.max_body} bytes",
            [(coap.SIZE1, self.max_body)],
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- telemetry ---------------------------------------------------------------------------

    def _record(
        self,
        ex: Exchange,
        kind: str,
        device: str,
        body: bytes | bytearray | memoryview,
        cf: int | None,
    ) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            self._error(ex, coap.SERVICE_UNAVAILABLE, "no telemetry pipeline")
            return
        if pipeline.lanes[lane_of(kind)].backlog >= pipeline.high_water:
            self.endpoint.metrics.overloaded += 1
            self._error(
                ex,
                coap.SERVICE_UNAVAILABLE,
                "telemetry is backed up: retry later",
                [(coap.MAX_AGE, self.endpoint.limits.overload_max_age)],
            )
            return
        payload = bytes(body)
        record = Record(device, kind, "coap", f"/{kind}/{device}", payload)
        if cf is not None:
            record.content_type = CONTENT_TYPES[cf]
        pipeline.submit(record, self.endpoint, ex)
        broker = self.broker
        topic = f"devices/{device}/{kind}"
        if broker is not None and broker.reaches_anyone(topic):
            # MQTT subscribers of devices/{id}/telemetry see a CoAP device's data too, as if it
            # had published it (QoS 1 for a CON, 0 for a NON).
            props = None
            if cf is not None:
                props = mqtt.Properties(content_type=record.content_type, user_properties=[])
            qos = 1 if ex.type == coap.CON else 0
            broker.publish(Message(topic, payload, qos, False, props, origin=device))
            broker.flush()

    # ---- shadows -------------------------------------------------------------------------------

    def _shadow(
        self,
        ex: Exchange,
        msg: coap.Message,
        code: int,
        device: str,
        delta: bool,
        now: float,
        verdict: str | None,
    ) -> None:
        if code != _GET and (delta or code not in _SHADOW_METHODS):
            self._error(ex, coap.METHOD_NOT_ALLOWED,
                        "GET only" if delta else "GET, FETCH, PUT, PATCH, iPATCH, POST or DELETE")
            return
        if self.shadows is None:
            self._error(ex, coap.SERVICE_UNAVAILABLE, "no shadow service")
            return
        if not self._authorized(ex, msg, code, device, verdict):
            return
        if code == _GET:
            accept = msg.accept
            if accept is not None and accept != coap.JSON:
                self._error(ex, coap.NOT_ACCEPTABLE, "application/json (50) only")
                return
            kind = DELTA if delta else SHADOW
            self._spawn(self._shadow_get(ex, kind, device, msg.observe, msg.etags, now))
            return
        body = b""
        if code != coap.DELETE:
            cf = msg.content_format
            if cf is not None and cf not in (coap.JSON, coap.MERGE_PATCH):
                self._error(ex, coap.UNSUPPORTED_CONTENT_FORMAT, "application/json (50) only")
                return
            found = self._body(ex, msg, now)
            if found is None:
                return
            body = bytes(found)
        if code == coap.FETCH:
            self._spawn(self._shadow_fetch(ex, device, body))
            return
        idempotent = None
        if code == coap.IPATCH:
            # A retransmitted iPATCH (same token and body, even with a new message id) gets the
            # first one's answer; it is not applied again (RFC 8132 3.2).
            idempotent = (device, ex.token, hashlib.sha256(body).digest())
            done = self._ipatched.get(idempotent)
            if done is not None:
                self.endpoint.metrics.ipatch_repeats += 1
                self.respond(ex, coap.CHANGED, [(coap.ETAG, done[1])])
                return
        self._spawn(
            self._shadow_write(
                ex, code, device, body, msg.if_match, msg.if_none_match, idempotent
            )
        )

    async def _shadow_fetch(self, ex: Exchange, device: str, body: bytes) -> None:
        """FETCH (RFC 8132 2): the body is a JSON list of dotted paths ("state.reported.t",
        "version"); the answer holds those fields of the document, in its shape (paths that
        are not there are left out)."""
        assert self.shadows is not None
        try:
            paths = json.loads(body) if body else None
        except ValueError as exc:
            self._error(ex, coap.BAD_REQUEST, f"the payload is not JSON: {exc}")
            return
        if not isinstance(paths, list) or not all(
            isinstance(p, str) and p and len(p) <= 256 for p in paths
        ) or len(paths) > 64:
            self._error(ex, coap.BAD_REQUEST, 'FETCH takes a JSON list of up to 64 paths, '
                        'such as ["state.reported.t", "version"]')
            return
        try:
            shadow = await self.shadows.store.get(device)
        except Exception:
            log.exception("shadow get of %s failed", device)
            self._error(ex, coap.INTERNAL_SERVER_ERROR, "internal error")
            return
        if shadow is None:
            self._error(ex, coap.NOT_FOUND, "no shadow")
            return
        doc = shadow.document()
        selected: dict[str, Any] = {}
        for path in paths:
            _select(doc, selected, path.split("."))
        options = [(coap.ETAG, etag_of(shadow.version)), (coap.CONTENT_FORMAT, coap.JSON)]
        self.respond(ex, coap.CONTENT, options, _json(selected))

    @staticmethod
    def _representation(kind: str, shadow: Shadow | None) -> bytes:
        """The JSON of /shadow/{id} or /shadow/{id}/delta. The delta of a device without a
        shadow is empty (version 0): a device may observe its delta before it has a shadow."""
        if kind == SHADOW:
            assert shadow is not None
            return _json(shadow.document())
        if shadow is None:
            return _json({"state": {}, "version": 0, "timestamp": int(time.time())})
        return _json(
            {"state": shadow.delta, "version": shadow.version, "timestamp": shadow.ts_ms // 1000}
        )

    async def _shadow_get(
        self,
        ex: Exchange,
        kind: str,
        device: str,
        observe: int | None,
        etags: list[bytes],
        now: float,
    ) -> None:
        assert self.shadows is not None
        observers = self.observers
        obs: Observer | None = None
        if observe == 0:
            # Registered before the read, so that a change after it is not missed: the
            # notification task skips the observer until this response has gone out.
            obs = observers.register(kind, device, ex.addr, ex.token, now)
            if obs is not None:
                obs.anonymous = ex.anonymous
            broker = self.broker
            clustered = broker is not None and broker.cluster is not None
            if obs is not None and clustered and device not in self._shadow_subs:
                assert broker is not None
                self._shadow_subs[device] = broker.subscribe_internal(
                    f"$shadow/{device}/+/accepted", lambda _: self._mark_dirty(device)
                )
        elif observe == 1:
            old = observers.lookup(ex.addr, ex.token)
            if old is not None:
                observers.remove(old)
        try:
            shadow = await self.shadows.store.get(device)
        except Exception:
            log.exception("shadow get of %s failed", device)
            if obs is not None:
                observers.remove(obs)
            self._error(ex, coap.INTERNAL_SERVER_ERROR, "internal error")
            return
        if shadow is None and kind == SHADOW:
            if obs is not None:
                observers.remove(obs)
            self._error(ex, coap.NOT_FOUND, "no shadow")
            return
        version = shadow.version if shadow is not None else 0
        etag = etag_of(version)
        options: list[tuple[int, Any]] = [(coap.ETAG, etag)]
        if obs is not None and observers.alive(obs):
            options.append((coap.OBSERVE, obs.seq))
            obs.last_version = version
            obs.last_delta = shadow.delta if kind == DELTA and shadow is not None else {}
            obs.ready = True
        elif etag in etags:
            self.respond(ex, coap.VALID, options)
            return
        options.append((coap.CONTENT_FORMAT, coap.JSON))
        self.respond(ex, coap.CONTENT, options, self._representation(kind, shadow))
        if obs is not None and self._versions.get(device, -1) > version:
            self._mark_dirty(device)  # it changed while we read it

    async def _shadow_write(
        self,
        ex: Exchange,
        code: int,
        device: str,
        body: bytes,
        if_match: list[bytes],
        if_none_match: bool,
        idempotent: tuple[str, bytes, bytes] | None = None,
    ) -> None:
        shadows = self.shadows
        assert shadows is not None
        try:
            expected: int | None = None
            if if_match or if_none_match:
                tags = [t for t in if_match if t]
                if len(tags) == 1 and len(if_match) == 1 and not if_none_match:
                    expected = int.from_bytes(tags[0], "big")
                else:  # "exists", one of several versions, or "does not exist"
                    current = await shadows.store.get(device)
                    if if_none_match and current is not None:
                        self._error(ex, coap.PRECONDITION_FAILED, "the shadow exists")
                        return
                    if if_match:
                        if current is None or (tags and etag_of(current.version) not in tags):
                            self._error(ex, coap.PRECONDITION_FAILED, "If-Match failed")
                            return
                        expected = current.version
            if code == coap.DELETE:
                if await shadows.delete(device, expected_version=expected) is not None:
                    self.respond(ex, coap.DELETED)
                else:
                    self._error(ex, coap.NOT_FOUND, "no shadow")
                return
            try:
                doc = json.loads(body)
            except ValueError as exc:
                self._error(ex, coap.BAD_REQUEST, f"the payload is not JSON: {exc}")
                return
            if code == coap.PUT:
                result = await shadows.replace(device, doc, expected_version=expected)
            else:
                update, seq, context = split_update(doc)
                result = await shadows.update(
                    device, update, expected_version=expected, context=context, seq=seq
                )
            etag = etag_of(result.version)
            if idempotent is not None:
                self._remember_ipatch(idempotent, etag)
            self.respond(ex, coap.CHANGED, [(coap.ETAG, etag)])
        except VersionConflict as exc:
            status = coap.PRECONDITION_FAILED if if_match else coap.CONFLICT
            self._error(ex, status, str(exc), [(coap.ETAG, etag_of(exc.current_version))]
                        if exc.current_version else None)
        except ShadowTooLarge as exc:
            self._error(ex, coap.REQUEST_ENTITY_TOO_LARGE, str(exc))
        except ShadowError as exc:
            self._error(ex, coap.BAD_REQUEST, str(exc))
        except Exception:
            log.exception("shadow write of %s failed", device)
            self._error(ex, coap.INTERNAL_SERVER_ERROR, "internal error")

    def _remember_ipatch(self, key: tuple[str, bytes, bytes], etag: bytes) -> None:
        ipatched = self._ipatched
        if len(ipatched) >= MAX_IPATCHES:
            ipatched.pop(next(iter(ipatched)))
        expires = _monotonic() + self.endpoint.timing.exchange_lifetime
        ipatched[key] = (expires, etag)
        self._ipatch_deadlines.append((expires, key))

    # -- notifications

    def shadow_changed(self, device: str, version: int) -> None:
        """After every accepted shadow write or delete (the app wires ShadowService to it)."""
        observers = self.observers
        if not (observers.observes(SHADOW, device) or observers.observes(DELTA, device)):
            return
        if version > self._versions.get(device, -1):
            self._versions[device] = version
        self._mark_dirty(device)

    def _mark_dirty(self, device: str) -> None:
        if device in self._notifying:
            self._dirty.add(device)  # the running task reads the store once more
            return
        self._notifying.add(device)
        self._spawn(self._notify_device(device))

    async def _notify_device(self, device: str) -> None:
        """Notify the observers of one device's shadow and delta, one store read per round
        however many changes came meanwhile (coalesced)."""
        assert self.shadows is not None
        try:
            while True:
                self._dirty.discard(device)
                shadow = await self.shadows.store.get(device)
                now = _monotonic()
                for kind in (SHADOW, DELTA):
                    payload: bytes | None = None
                    for obs in self.observers.observers(kind, device):
                        if obs.ready:
                            payload = self._notify_shadow(obs, kind, shadow, now, payload)
                if device not in self._dirty:
                    break
        except Exception:
            log.exception("shadow notifications of %s failed", device)
        finally:
            self._notifying.discard(device)

    def _notify_shadow(
        self,
        obs: Observer,
        kind: str,
        shadow: Shadow | None,
        now: float,
        payload: bytes | None,
        force: bool = False,
    ) -> bytes | None:
        """Send obs the shadow's state if it has not seen it; returns the representation
        (built once per resource and round)."""
        observers = self.observers
        if shadow is None and kind == SHADOW:  # deleted: the observation ends with 4.04
            observers.notify(obs, coap.NOT_FOUND, (), b"shadow deleted", now)
            return payload
        version = shadow.version if shadow is not None else 0
        if shadow is not None:
            if not force and obs.last_version is not None and obs.last_version >= version:
                return payload
            obs.last_version = version
        if kind == DELTA:
            delta = shadow.delta if shadow is not None else {}
            if not force and delta == obs.last_delta:
                return payload  # a change of reported or metadata only: the delta is the same
            obs.last_delta = delta
        if payload is None:
            payload = self._representation(kind, shadow)
        options = [(coap.ETAG, etag_of(version)), (coap.CONTENT_FORMAT, coap.JSON)]
        observers.notify(obs, coap.CONTENT, options, payload, now)
        return payload

    def _probe(self, obs: Observer) -> None:
        """No CON for con_interval: send the current state as CON (observe.py)."""
        if obs.kind == COMMANDS:
            self.observers.notify(obs, coap.CONTENT, (), b"", _monotonic())
        else:
            self._spawn(self._probe_shadow(obs))

    async def _probe_shadow(self, obs: Observer) -> None:
        assert self.shadows is not None
        try:
            shadow = await self.shadows.store.get(obs.device)
        except Exception:
            log.exception("shadow read for an observer probe failed")
            return
        if self.observers.alive(obs):
            self._notify_shadow(obs, obs.kind, shadow, _monotonic(), None, force=True)

    def _observer_removed(self, obs: Observer) -> None:
        device = obs.device
        observers = self.observers
        if obs.kind == COMMANDS:
            if not observers.observes(COMMANDS, device):
                unsubscribe = self._command_subs.pop(device, None)
                if unsubscribe is not None:
                    unsubscribe()
        elif not (observers.observes(SHADOW, device) or observers.observes(DELTA, device)):
            self._versions.pop(device, None)
            unsubscribe = self._shadow_subs.pop(device, None)
            if unsubscribe is not None:
                unsubscribe()

    # ---- commands ----------------------------------------------------------------------------

    def _commands(
        self,
        ex: Exchange,
        msg: coap.Message,
        code: int,
        path: list[str],
        now: float,
        verdict: str | None,
    ) -> None:
        device = path[1]
        n = len(path)
        if (n == 2 and code != _GET) or (n > 2 and code != _POST):
            self._error(ex, coap.METHOD_NOT_ALLOWED, "GET /commands/{id} (Observe) or "
                        "POST /commands/{id}/{name}")
            return
        if self.broker is None:
            self._error(ex, coap.SERVICE_UNAVAILABLE, "no broker")
            return
        if not self._authorized(ex, msg, code, device, verdict):
            return
        if n == 2:
            self._observe_commands(ex, device, msg.observe, now)
            return
        name = "/".join(path[2:])
        if any(not p or "+" in p or "#" in p for p in path[2:]) or "\x00" in name:
            self._error(ex, coap.NOT_FOUND, "bad command name")
            return
        cf = msg.content_format
        if cf is not None and cf not in CONTENT_TYPES:
            self._error(ex, coap.UNSUPPORTED_CONTENT_FORMAT, f"content format {cf}")
            return
        body = self._body(ex, msg, now)
        if body is None:
            return
        self._command_response(ex, device, name, bytes(body), cf)

    def _observe_commands(
        self, ex: Exchange, device: str, observe: int | None, now: float
    ) -> None:
        observers = self.observers
        options: list[tuple[int, Any]] = []
        if observe == 0:
            obs = observers.register(COMMANDS, device, ex.addr, ex.token, now)
            if obs is not None:
                obs.anonymous = ex.anonymous
                if device not in self._command_subs and self.broker is not None:
                    self._command_subs[device] = self.broker.subscribe_internal(
                        f"devices/{device}/commands/#",
                        lambda message: self._command(device, message),
                    )
                obs.ready = True
                options.append((coap.OBSERVE, obs.seq))
        elif observe == 1:
            old = observers.lookup(ex.addr, ex.token)
            if old is not None:
                observers.remove(old)
        self.respond(ex, coap.CONTENT, options)

    def _command(self, device: str, message: Message) -> None:
        """A message routed to devices/{device}/commands/#: notify the device's observers."""
        name = message.topic[len(device) + 18 :]  # after "devices/{id}/commands/"
        if not name or name == "response" or name.endswith("/response"):
            return  # a device's answer (ours included), not a command
        payload = bytes(message.payload)
        props = message.properties
        if props is not None and props.response_topic:
            self._remember_reply_to(device, name, props.response_topic, props.correlation_data)
        body = command_document(name, payload)
        now = _monotonic()
        options = [(coap.CONTENT_FORMAT, coap.JSON)]
        confirmable = message.qos > 0
        for obs in self.observers.observers(COMMANDS, device):
            self.observers.notify(
                obs, coap.CONTENT, options, body, now, confirmable=confirmable, event=True
            )

    def _remember_reply_to(
        self, device: str, name: str, topic: str, correlation: bytes | None
    ) -> None:
        key = (device, name)
        if len(self._reply_to) >= MAX_REPLY_TO and key not in self._reply_to:
            self._reply_to.pop(next(iter(self._reply_to)))
        self._reply_to.pop(key, None)  # re-inserted last: the dict stays in age order
        self._reply_to[key] = (topic, correlation)
        self._reply_deadlines.append((_monotonic() + REPLY_TO_SECONDS, key, topic))

    def _command_response(
        self, ex: Exchange, device: str, name: str, body: bytes, cf: int | None
    ) -> None:
        assert self.broker is not None
        reply_to = self._reply_to.pop((device, name), None)
        if reply_to is not None:
            topic, correlation = reply_to
        else:
            topic, correlation = f"devices/{device}/commands/{name}/response", None
        props = None
        if correlation is not None or cf is not None:
            props = mqtt.Properties(
                correlation_data=correlation,
                content_type=CONTENT_TYPES[cf] if cf is not None else None,
                user_properties=[],
            )
        self.broker.publish(Message(topic, body, 1, False, props, origin=device))
        self.broker.flush()
        self.respond(ex, coap.CHANGED)

    # ---- discovery -----------------------------------------------------------------------------

    def _well_known(self, ex: Exchange, query: list[str]) -> None:
        links = []
        for href, attrs in LINKS:
            if all(_link_matches(href, attrs, q) for q in query):
                links.append(f"<{href}>;{attrs}")
        self.respond(
            ex, coap.CONTENT, [(coap.CONTENT_FORMAT, coap.LINK_FORMAT)], ",".join(links).encode()
        )

    # ---- sweep and stop ----------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        ipatches = self._ipatch_deadlines
        while ipatches and ipatches[0][0] <= now:
            expires, done = ipatches.popleft()
            found = self._ipatched.get(done)
            if found is not None and found[0] == expires:
                del self._ipatched[done]
        deadlines = self._reply_deadlines
        while deadlines and deadlines[0][0] <= now:
            _, key, topic = deadlines.popleft()
            current = self._reply_to.get(key)
            if current is not None and current[0] == topic:
                del self._reply_to[key]

    def close(self) -> None:
        for subs in (self._command_subs, self._shadow_subs):
            for unsubscribe in subs.values():
                unsubscribe()
            subs.clear()

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for shadow requests in progress and for telemetry
        waiting to be durable, so that their answers still go out."""
        waits: list[Any] = list(self._tasks)
        if self.pipeline is not None:
            waits.append(self.pipeline.drain())
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), timeout)


def _link_matches(href: str, attrs: str, query: str) -> bool:
    """RFC 6690 4.1 filtering on href or an attribute, with a trailing * for a prefix."""
    name, _, value = query.partition("=")
    if name == "t":
        return True
    prefix = value.endswith("*")
    value = value.rstrip("*")
    if name == "href":
        candidates = [href]
    else:
        candidates = []
        for part in attrs.split(";"):
            key, _, v = part.partition("=")
            if key == name:
                candidates.extend(v.strip('"').split())
    return any(c.startswith(value) if prefix else c == value for c in candidates)


def _select(doc: Any, out: dict[str, Any], path: list[str]) -> None:
    """Copy doc's field at `path` (keys) into `out`, creating the objects on the way."""
    value = doc
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return
        value = value[key]
    for key in path[:-1]:
        out = out.setdefault(key, {})
        if not isinstance(out, dict):
            return
    out[path[-1]] = value


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
