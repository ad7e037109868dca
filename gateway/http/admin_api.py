"""`/v1/admin` (scope `admin`): connected clients, sessions, bans and retained messages of the
gateway (of every node of a cluster), through gateway/admin.py. The CLI's
`iotgw clients|bans|retained` call these."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from gateway.admin import Admin, NodeUnavailable, ban_json
from gateway.http.api import ApiError, Auth, error_responses
from gateway.tokens import ADMIN, Principal


class Client(BaseModel):
    client_id: str
    node: str = Field(description="the gateway node (cluster node) it is connected to")
    identity: str | None = Field(description="the authenticated device id (None: anonymous)")
    protocol: Literal["mqtt3.1.1", "mqtt5"]
    peer: str = Field(description="host:port the client connects from")
    keep_alive: int = Field(description="seconds, as granted")
    subscriptions: int
    inflight: int = Field(description="QoS 1/2 messages sent and not yet acknowledged")
    queued: int = Field(description="QoS 1/2 messages waiting for a send slot")


class ClientPage(BaseModel):
    clients: list[Client]
    next: str | None = Field(description="`after` for the next page; null: the last page")
    incomplete: list[str] = Field(
        description="cluster nodes that did not answer in time: their clients are missing")


class Subscription(BaseModel):
    filter: str
    qos: int
    no_local: bool
    retain_as_published: bool
    retain_handling: int
    identifier: int | None


class SessionInfo(BaseModel):
    client_id: str
    node: str = Field(description="the gateway node (cluster node) holding it")
    identity: str
    anonymous: bool
    online: bool
    peer: str | None
    protocol: Literal["mqtt3.1.1", "mqtt5"]
    expiry_interval: int = Field(description="seconds the session outlives its connection")
    subscriptions: list[Subscription]
    inflight: int
    queued: int
    queued_bytes: int
    awaiting_pubrel: int
    dropped: int


class BanRequest(BaseModel):
    kind: Literal["client_id", "address"]
    value: str = Field(min_length=1, max_length=256, description="the client id or IP address")
    seconds: float | None = Field(default=None, gt=0, le=10 * 365 * 86400,
                                  description="how long; omitted: until removed")
    reason: str = Field(default="", max_length=256)


class Ban(BaseModel):
    kind: Literal["client_id", "address"]
    value: str
    until: float | None = Field(description="Unix time it ends; null: until removed")
    reason: str


class BanList(BaseModel):
    bans: list[Ban]


class Retained(BaseModel):
    topic: str
    bytes: int
    qos: int


class RetainedPage(BaseModel):
    retained: list[Retained]
    next: str | None


Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many")]
After = Annotated[str | None, Query(max_length=65535, description="the previous page's `next`")]
Prefix = Annotated[str, Query(max_length=65535, description="only those starting with this")]


@contextmanager
def _cluster_errors() -> Iterator[None]:
    """A cluster call that could not be made: 503, saying which part is away."""
    try:
        yield
    except NodeUnavailable as exc:
        raise ApiError(503, "node_unavailable", str(exc)) from None
    except RedisError as exc:
        raise ApiError(503, "cluster_unavailable", f"the cluster's Redis: {exc}") from None


def admin_router(admin: Admin, require: Callable[[str], Auth]) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"])
    operator = require(ADMIN)
    Operator = Annotated[Principal, Depends(operator)]

    @router.get("/clients", operation_id="listClients", response_model=ClientPage,
                summary="Connected MQTT clients of every node, by client id (paged)",
                responses=error_responses(400, 401, 403))
    async def list_clients(_: Operator, prefix: Prefix = "", after: After = None,
                           limit: Limit = 100) -> ClientPage:
        page = await admin.clients(prefix, after, limit)
        return ClientPage.model_validate(
            {"clients": page.items, "next": page.next, "incomplete": page.incomplete})

    @router.delete("/clients/{client_id}", operation_id="kickClient", status_code=204,
                   summary="Disconnect a client, on whichever node it is (MQTT 5: 0x98 "
                   "Administrative action)", responses=error_responses(400, 401, 403, 404, 503))
    async def kick_client(
        client_id: str, _: Operator,
        discard_session: Annotated[bool, Query(description="end its session too")] = False,
    ) -> Response:
        with _cluster_errors():
            kicked = await admin.kick(client_id, discard_session)
        if not kicked:
            raise ApiError(404, "unknown_client",
                           f"no client {client_id!r} is connected"
                           + (" or has a session" if discard_session else ""))
        return Response(status_code=204)

    @router.get("/sessions/{client_id}", operation_id="getSession", response_model=SessionInfo,
                summary="A session, online or persistent, on whichever node holds it: "
                "subscriptions, in flight, queued",
                responses=error_responses(400, 401, 403, 404, 503))
    async def get_session(client_id: str, _: Operator) -> SessionInfo:
        with _cluster_errors():
            found = await admin.session(client_id)
        if found is None:
            raise ApiError(404, "unknown_session", f"no session {client_id!r}")
        return SessionInfo.model_validate(found)

    @router.get("/bans", operation_id="listBans", response_model=BanList,
                summary="Client ids and addresses banned by an operator",
                responses=error_responses(401, 403))
    async def list_bans(_: Operator) -> BanList:
        return BanList.model_validate({"bans": admin.bans()})

    @router.post("/bans", operation_id="addBan", response_model=Ban, status_code=201,
                 summary="Ban a client id or a source address (MQTT and CoAP; REST for "
                 "tokens without the admin scope); its connected clients are kicked",
                 responses=error_responses(400, 401, 403, 503))
    async def add_ban(body: BanRequest, _: Operator) -> Ban:
        try:
            ban = await admin.ban(body.kind, body.value, body.seconds, body.reason)
        except ValueError as exc:
            raise ApiError(400, "invalid_ban", str(exc)) from None
        except RedisError as exc:
            raise ApiError(503, "cluster_unavailable", "the ban holds on this node only until "
                           f"Redis is back (it is stored there then): {exc}") from None
        return Ban.model_validate(ban_json(ban))

    @router.delete("/bans/{kind}/{value}", operation_id="removeBan", status_code=204,
                   summary="Lift a ban", responses=error_responses(400, 401, 403, 404, 503))
    async def remove_ban(kind: Literal["client_id", "address"], value: str,
                         _: Operator) -> Response:
        try:
            removed = await admin.unban(kind, value)
        except ValueError as exc:
            raise ApiError(400, "invalid_ban", str(exc)) from None
        except RedisError as exc:
            raise ApiError(503, "cluster_unavailable", "lifted on this node only until Redis is "
                           f"back (it is removed there then): {exc}") from None
        if not removed:
            raise ApiError(404, "unknown_ban", f"{kind} {value!r} is not banned")
        return Response(status_code=204)

    @router.get("/retained", operation_id="listRetained", response_model=RetainedPage,
                summary="Retained messages by topic (paged)",
                responses=error_responses(400, 401, 403))
    async def list_retained(_: Operator, prefix: Prefix = "", after: After = None,
                            limit: Limit = 100) -> RetainedPage:
        page = admin.retained(prefix, after, limit)
        return RetainedPage.model_validate({"retained": page.items, "next": page.next})

    @router.delete("/retained", operation_id="deleteRetained", status_code=204,
                   summary="Delete the retained message of a topic (on every cluster node)",
                   responses=error_responses(400, 401, 403, 404))
    async def delete_retained(
        topic: Annotated[str, Query(min_length=1, max_length=65535)], _: Operator
    ) -> Response:
        if not admin.delete_retained(topic):
            raise ApiError(404, "unknown_retained", f"no retained message on {topic!r}")
        return Response(status_code=204)

    return router
