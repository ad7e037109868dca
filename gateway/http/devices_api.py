"""REST routes of devices and commands: `GET /v1/devices`, `GET /v1/devices/{id}`,
`POST /v1/devices/{id}/commands`, and provisioning (scope `devices:write`): `POST /v1/devices`,
`DELETE /v1/devices/{id}`, `POST /v1/devices/{id}/disable`, `POST /v1/devices/{id}/enable`.

Provisioning writes the registry database (gateway/auth.py) in a worker thread (PBKDF2 and a
transaction that may wait for another writer), then lets the app act on the change at once:
a removed or disabled device's connections close and its observations end.

A device is known when it is registered (gateway/auth.py), has an MQTT session (online, or
offline with a persistent session) or has a shadow. Its status comes from the broker of this
node: `online`, `node` (the gateway node holding its connection or session), `protocol`, `peer`
and `last_seen` (the last packet received, or the disconnect of an offline session).

Commands go to `devices/{id}/commands/{name}` at QoS 1 with the MQTT 5 response topic
`devices/{id}/commands/{name}/response` and the command id as correlation data. With
`timeout_s > 0` the request waits for the device's reply on the response topic (matched by
correlation data; a reply without it, as from an MQTT 3.1.1 device, answers the oldest command
waiting on that topic) and returns 200 with it; otherwise, or when no reply came in time, 202
with the command id. A device that is offline with a persistent session gets the command
queued (202, `queued`); offline without one: 404.
"""

# No `from __future__ import annotations`: FastAPI evaluates the routes' annotations, and they
# name closure-local dependencies (`Depends(reader)`).

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway._native import mqtt
from gateway.auth import DeviceExists, DeviceUnavailableError, UnknownDevice, generate_password
from gateway.http.api import ApiContext, ApiError, Auth, error_responses
from gateway.http.shadow_api import DeviceId, device_id
from gateway.mqtt.session import Message, monotonic
from gateway.tokens import COMMANDS_WRITE, DEVICES_READ, DEVICES_WRITE, Principal

MAX_PAGE: Final = 1000

# --------------------------------------------------------------------------- models


class DeviceSession(BaseModel):
    persistent: bool = Field(description="kept while the device is offline")
    expiry_interval_s: int | None = Field(description="null: never expires")
    queued_messages: int = Field(description="messages waiting for the device")
    subscriptions: list[str]


class DeviceInfo(BaseModel):
    id: str
    registered: bool = Field(description="in the device registry (`iotgw devices add`)")
    online: bool
    node: str | None = Field(description="the gateway node holding its connection or session")
    protocol: Literal["mqtt3.1.1", "mqtt5.0"] | None
    peer: str | None = Field(description="address:port of its connection, when online")
    last_seen: datetime | None = Field(
        description="last packet received (online) or disconnect time (offline), UTC"
    )
    shadow_version: int | None = Field(description="null: no shadow")
    session: DeviceSession | None


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        min_length=1, max_length=128,
        description="one topic level: no `/ + #` or U+0000, not starting with `$`",
    )
    password: str | None = Field(
        None, min_length=1, max_length=1024,
        description="omit to have one generated (returned once, in the response)",
    )


class DeviceCreated(BaseModel):
    id: str
    password: str | None = Field(
        description="the generated password (shown only here); null when you gave one"
    )


class DeviceSummary(BaseModel):
    id: str
    registered: bool
    online: bool
    shadow: bool = Field(description="has a shadow")


class DevicePage(BaseModel):
    devices: list[DeviceSummary]
    next: str | None = Field(
        description="pass as `after` for the next page; null on the last page"
    )


CommandName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[^/+#\x00]+$",
        description="one topic level: no `/ + #` or U+0000",
    ),
]


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: CommandName
    payload: Any = Field(
        None, description="a string is sent as UTF-8 text, anything else as JSON"
    )
    timeout_s: float = Field(
        0, ge=0, le=30, description="wait this long for the device's reply (0: do not wait)"
    )
    expiry_s: int | None = Field(
        None, ge=1, le=86400 * 7,
        description="drop the command if it is not delivered within this many seconds",
    )


class CommandReply(BaseModel):
    id: str
    status: Literal["answered"]
    response: Any = Field(
        description="the reply: parsed JSON, else text; null if it was not UTF-8"
    )
    response_base64: str | None = Field(None, description="the raw reply, when not UTF-8")
    content_type: str | None = None


class CommandAccepted(BaseModel):
    id: str
    status: Literal["delivered", "queued"] = Field(
        description="delivered: sent to the online device (no reply awaited or none in time); "
        "queued: the device is offline, its persistent session holds the command"
    )
    topic: str
    response_topic: str


# --------------------------------------------------------------------------- helpers


def _wall(monotonic_ts: float) -> str:
    """A monotonic timestamp as ISO 8601 UTC wall-clock time."""
    ts = time.time() - (monotonic() - monotonic_ts)
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def _protocol(version: int) -> str:
    return "mqtt5.0" if version == 5 else "mqtt3.1.1"


Reply = tuple[bytes, str | None]  # a device's reply: payload, content type


class CommandWaiters:
    """Commands awaiting a reply, by response topic: one internal broker subscription per
    topic while at least one command waits on it."""

    def __init__(self, ctx: ApiContext) -> None:
        self.broker = ctx.broker
        self._waiting: dict[str, dict[str, asyncio.Future[Reply]]] = {}
        self._unsubscribe: dict[str, Callable[[], None]] = {}

    def wait(self, topic: str, command_id: str) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(topic, {})
        waiting[command_id] = future
        if topic not in self._unsubscribe:
            self._unsubscribe[topic] = self.broker.subscribe_internal(
                topic, lambda message: self._reply(topic, message)
            )
        return future

    def forget(self, topic: str, command_id: str) -> None:
        waiting = self._waiting.get(topic)
        if waiting is None:
            return
        waiting.pop(command_id, None)
        if not waiting:
            del self._waiting[topic]
            self._unsubscribe.pop(topic)()

    def _reply(self, topic: str, message: Message) -> None:
        waiting = self._waiting.get(topic, {})
        props = message.properties
        correlation = getattr(props, "correlation_data", None) if props is not None else None
        future: asyncio.Future[Reply] | None = None
        if correlation:
            future = waiting.get(bytes(correlation).decode("ascii", "replace"))
        else:  # no correlation data (MQTT 3.1.1): the oldest command still waiting
            future = next((f for f in waiting.values() if not f.done()), None)
        if future is None or future.done():
            return
        content_type = getattr(props, "content_type", None) if props is not None else None
        future.set_result((bytes(message.payload), content_type))  # copied: it outlives the read


def _reply_body(command_id: str, reply: Reply) -> dict[str, Any]:
    payload, content_type = reply
    body: dict[str, Any] = {"id": command_id, "status": "answered", "response": None}
    if content_type:
        body["content_type"] = content_type
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        body["response_base64"] = base64.b64encode(payload).decode()
        return body
    try:
        body["response"] = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        body["response"] = text
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unavailable(exc: DeviceUnavailableError) -> ApiError:
    return ApiError(503, "registry_unavailable", str(exc), headers={"Retry-After": "5"})


# --------------------------------------------------------------------------- routes


def devices_router(ctx: ApiContext, require: Callable[[str], Auth]) -> APIRouter:
    router = APIRouter(tags=["devices"])
    reader = require(DEVICES_READ)
    commander = require(COMMANDS_WRITE)
    waiters = CommandWaiters(ctx)

    async def _where(device: str) -> tuple[str | None, bool]:
        """(the node holding the device's connection or session, whether it is connected)."""
        if device in ctx.broker.online:
            return ctx.node_id, True
        if device in ctx.broker.sessions:
            return ctx.node_id, False
        if ctx.cluster is not None:
            found = await ctx.cluster.locate([device])
            if device in found:
                return found[device]
        return None, False

    @router.get(
        "/devices",
        operation_id="listDevices",
        summary="Known devices (registered, with a session or with a shadow), by id, paged",
        response_model=DevicePage,
        responses=error_responses(400, 401, 403, 503),
    )
    async def list_devices(
        principal: Annotated[Principal, Depends(reader)],
        after: Annotated[
            str | None, Query(max_length=512, description="the last id of the previous page")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> Response:
        def later(ids: list[str]) -> list[str]:
            return [d for d in ids if after is None or d > after]

        try:
            registered = set(ctx.registry.ids(after, limit))
        except DeviceUnavailableError as exc:
            raise _unavailable(exc) from None
        sessions = set(later(list(ctx.broker.sessions)))
        shadows = set(await ctx.shadows.store.list_devices(after, limit))
        # each source's first `limit` ids after `after` are enough for the union's first `limit`
        # (in a cluster, sessions on other nodes are listed when registered or shadowed)
        page = sorted(registered | sessions | shadows)[:limit]
        elsewhere = {}
        if ctx.cluster is not None:
            elsewhere = await ctx.cluster.locate(
                [d for d in page if d not in ctx.broker.online]
            )
        devices = [
            {
                "id": d,
                "registered": d in registered,
                "online": d in ctx.broker.online or elsewhere.get(d, ("", False))[1],
                "shadow": d in shadows,
            }
            for d in page
        ]
        nxt = page[-1] if len(page) == limit else None
        return JSONResponse({"devices": devices, "next": nxt})

    @router.get(
        "/devices/{device}",
        operation_id="getDevice",
        summary="A device's status: registration, connection, session, shadow version",
        response_model=DeviceInfo,
        responses=error_responses(400, 401, 403, 404, 503),
    )
    async def get_device(
        device: DeviceId, principal: Annotated[Principal, Depends(reader)]
    ) -> Response:
        device_id(device)
        try:
            registered = ctx.registry.get(device) is not None
        except DeviceUnavailableError as exc:
            raise _unavailable(exc) from None
        shadow = await ctx.shadows.store.get(device)
        conn = ctx.broker.online.get(device)
        session = ctx.broker.sessions.get(device)
        node, online = await _where(device)
        if not registered and shadow is None and node is None:
            raise ApiError(404, "unknown_device", f"no device {device!r} is known here")
        body: dict[str, Any] = {
            "id": device,
            "registered": registered,
            "online": online,
            "node": node,
            "protocol": None,
            "peer": None,
            "last_seen": None,
            "shadow_version": shadow.version if shadow is not None else None,
            "session": None,
        }
        if conn is not None:
            body["protocol"] = _protocol(conn.version)
            body["peer"] = conn.peer
            body["last_seen"] = _wall(conn.last_received)
        if session is not None:
            if conn is None:
                body["protocol"] = _protocol(session.version)
                if session.disconnected_at is not None:
                    body["last_seen"] = _wall(session.disconnected_at)
            expiry = session.expiry_interval
            body["session"] = {
                "persistent": expiry > 0,
                "expiry_interval_s": None if expiry == 0xFFFFFFFF else expiry,
                "queued_messages": len(session.queue),
                "subscriptions": sorted(session.subscriptions),
            }
        return JSONResponse(body)

    @router.post(
        "/devices/{device}/commands",
        operation_id="sendCommand",
        summary="Send a command to a device over MQTT; optionally wait for its reply",
        response_model=CommandReply,
        responses={
            **error_responses(400, 401, 403, 404, 409, 413),
            202: {"model": CommandAccepted, "description": "Sent or queued, no reply (yet)"},
        },
    )
    async def send_command(
        device: DeviceId,
        body: CommandRequest,
        principal: Annotated[Principal, Depends(commander)],
    ) -> Response:
        device_id(device)
        broker = ctx.broker
        node, online = await _where(device)
        if node is None:
            raise ApiError(
                404, "device_offline",
                f"device {device!r} is not connected and has no persistent session",
            )
        command_id = uuid.uuid4().hex
        topic = f"devices/{device}/commands/{body.name}"
        response_topic = f"{topic}/response"
        if isinstance(body.payload, str):
            payload, content_type = body.payload.encode(), "text/plain; charset=utf-8"
        else:
            payload = json.dumps(body.payload, separators=(",", ":")).encode()
            content_type = "application/json"
        props = mqtt.Properties(
            response_topic=response_topic,
            correlation_data=command_id.encode(),
            content_type=content_type,
            payload_format_indicator=1,
        )
        props.user_properties = [("command-id", command_id), ("issuer", principal.name)]
        expires_at = monotonic() + body.expiry_s if body.expiry_s is not None else None
        message = Message(topic, payload, 1, False, props, expires_at, "$gateway")
        if node == ctx.node_id:
            subscribed = any(client == device for client, _ in broker.subscriptions.match(topic))
        else:  # held by another cluster node: it has a route for the topic (maybe the device's)
            assert ctx.cluster is not None
            subscribed = any(n == node for n, _ in ctx.cluster.routes.match(topic))
        if not subscribed:
            raise ApiError(
                409, "not_subscribed", f"device {device!r} has no subscription matching {topic!r}"
            )
        future = waiters.wait(response_topic, command_id) if body.timeout_s > 0 and online else None
        try:
            broker.publish(message)
            broker.flush()
            if future is not None:
                try:
                    reply = await asyncio.wait_for(future, body.timeout_s)
                except TimeoutError:
                    pass
                else:
                    return JSONResponse(_reply_body(command_id, reply))
        finally:
            if future is not None:
                waiters.forget(response_topic, command_id)
        accepted = {
            "id": command_id,
            "status": "delivered" if online else "queued",
            "topic": topic,
            "response_topic": response_topic,
        }
        return JSONResponse(accepted, status_code=202)

    writer = require(DEVICES_WRITE)

    @router.post(
        "/devices",
        operation_id="createDevice",
        summary="Register a device; a generated password is returned once",
        status_code=201,
        response_model=DeviceCreated,
        responses=error_responses(400, 401, 403, 409, 503),
    )
    async def create_device(
        body: DeviceCreate, principal: Annotated[Principal, Depends(writer)]
    ) -> Response:
        device_id(body.id)
        password = body.password or generate_password()
        try:
            await asyncio.to_thread(ctx.registry.add, body.id, password)
        except DeviceExists as exc:
            raise ApiError(409, "device_exists", str(exc)) from None
        except DeviceUnavailableError as exc:
            raise _unavailable(exc) from None
        created = {"id": body.id, "password": None if body.password else password}
        location = f"/v1/devices/{quote(body.id, safe='')}"  # headers are Latin-1: encoded
        return JSONResponse(created, status_code=201, headers={"Location": location})

    async def change(device: str, action: str) -> Response:
        device_id(device)
        try:
            await asyncio.to_thread(getattr(ctx.registry, action), device)
        except UnknownDevice as exc:
            raise ApiError(404, "unknown_device", str(exc)) from None
        except DeviceUnavailableError as exc:
            raise _unavailable(exc) from None
        ctx.registry_changed()  # its connections and observations end now, not at the sweep
        return Response(status_code=204)

    @router.delete(
        "/devices/{device}",
        operation_id="deleteDevice",
        summary="Unregister a device: its connection closes, its sessions and observations end",
        status_code=204,
        responses=error_responses(400, 401, 403, 404, 503),
    )
    async def delete_device(
        device: DeviceId, principal: Annotated[Principal, Depends(writer)]
    ) -> Response:
        return await change(device, "remove")

    @router.post(
        "/devices/{device}/disable",
        operation_id="disableDevice",
        summary="Refuse a device's connections (a connected one is disconnected)",
        status_code=204,
        responses=error_responses(400, 401, 403, 404, 503),
    )
    async def disable_device(
        device: DeviceId, principal: Annotated[Principal, Depends(writer)]
    ) -> Response:
        return await change(device, "disable")

    @router.post(
        "/devices/{device}/enable",
        operation_id="enableDevice",
        summary="Let a disabled device connect again",
        status_code=204,
        responses=error_responses(400, 401, 403, 404, 503),
    )
    async def enable_device(
        device: DeviceId, principal: Annotated[Principal, Depends(writer)]
    ) -> Response:
        return await change(device, "enable")

    return router
