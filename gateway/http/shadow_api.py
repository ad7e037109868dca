"""REST routes of device shadows: `/v1/devices/{id}/shadow` (GET, PATCH, PUT, DELETE) and
`/v1/devices/{id}/shadow/changes`.

Writes go through `ShadowService` (gateway/shadows.py), so a desired change made here reaches
the device as a delta over MQTT and CoAP like any other write; reads go to the store. The
writer id of a write is the name of the token it was made with.

Versions and preconditions: the ETag of a shadow is `"<version>"`. `If-Match: "<v>"` makes a
write (or DELETE) apply only to version v, else 412 with the current document; `If-Match: *`
needs the shadow to exist, and a list of tags needs one of them to be current.
`If-None-Match: *` on PATCH/PUT creates only (412 if the shadow exists). `"version": N` in the
body is the MQTT/AWS form of the same check and answers 409. `If-Match: "0"` (or body version
0) means "only if there is no shadow yet", as in shadow.model. A GET with an `If-None-Match`
that matches answers 304.
"""

# No `from __future__ import annotations`: FastAPI evaluates the routes' annotations, and they
# name closure-local dependencies (`Depends(reader)`).

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import RegistryError, check_device_id
from gateway.http.api import (
    ANY,
    ApiContext,
    ApiError,
    Auth,
    ErrorBody,
    error_responses,
    etag,
    parse_etags,
)
from gateway.tokens import SHADOW_READ, SHADOW_WRITE, Principal
from shadow import (
    InvalidUpdate,
    Shadow,
    ShadowError,
    ShadowTooLarge,
    UpdateResult,
    VersionConflict,
)

T = TypeVar("T")
_PRECONDITION_ROUNDS = 20  # re-reads of a conditional write that keeps losing the race

# --------------------------------------------------------------------------- models

NonNegative = Annotated[int, Field(strict=True, ge=0)]


class StateUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    desired: dict[str, Any] | None = Field(
        None, description="merged into desired (JSON merge patch; null deletes a key); "
        "`null` clears the section"
    )
    reported: dict[str, Any] | None = Field(
        None, description="merged into reported, like desired"
    )


class ShadowUpdate(BaseModel):
    """PATCH body: an AWS IoT style update document (see the README for the merge rules)."""

    model_config = ConfigDict(extra="forbid")

    state: StateUpdate | None = Field(description="`null` clears both sections")
    version: NonNegative | None = Field(
        None, description="apply only if this is the current version (else 409)"
    )
    clientToken: str | None = Field(None, description="echoed in the reply")
    context: dict[str, NonNegative] | None = Field(
        None, description="the version vector (`vv`) the writer read, for concurrent-write "
        "detection"
    )
    seq: NonNegative | None = Field(
        None, description="a device report sequence: later, lower ones never overwrite it"
    )


class StateReplace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    desired: dict[str, Any] | None = Field(None, description="the new desired section")
    reported: dict[str, Any] | None = Field(None, description="the new reported section")


class ShadowReplace(BaseModel):
    """PUT body: both sections become exactly these (absent or null: empty); no nulls inside."""

    model_config = ConfigDict(extra="forbid")

    state: StateReplace | None
    version: NonNegative | None = Field(
        None, description="apply only if this is the current version (else 409)"
    )
    clientToken: str | None = None


class ShadowState(BaseModel):
    desired: dict[str, Any] | None = Field(None, description="omitted when empty")
    reported: dict[str, Any] | None = Field(None, description="omitted when empty")
    delta: dict[str, Any] | None = Field(
        None, description="desired keys whose value differs from reported; omitted when empty"
    )


class ShadowDocument(BaseModel):
    state: ShadowState
    metadata: dict[str, Any] = Field(description="per-field `{\"timestamp\": epoch seconds}`")
    version: int = Field(description="+1 per accepted write; the ETag")
    vv: dict[str, int] = Field(description="version vector: writer id -> counter")
    timestamp: int = Field(description="time of the last write, epoch seconds")


class WriteInfo(BaseModel):
    concurrent: bool = Field(description="the write's context did not dominate the stored vv")
    conflicting_fields: list[str] = Field(
        description="JSON pointers a concurrent write had also set (resolved by the rule)"
    )
    overruled_fields: list[str] = Field(description="those where this write lost")
    suppressed_fields: list[str] = Field(
        description="reported fields not applied: a newer seq is stored"
    )
    cas_retries: int
    clientToken: str | None = None


class ShadowWriteResult(ShadowDocument):
    write: WriteInfo


class ConflictBody(ErrorBody):
    version: int = Field(description="the current version (a deleted shadow keeps its number)")
    current: ShadowDocument | None = Field(description="the current document (null: none)")


class ChangeRecordModel(BaseModel):
    version: int
    writer: str
    timestamp: int
    ts_ms: int
    state: dict[str, Any] = Field(description="the merge patch from version-1 to version")
    delta: dict[str, Any] = Field(description="the delta after this write")


class ChangeLogModel(BaseModel):
    version: int = Field(description="the current version")
    complete: bool = Field(
        description="false: the history no longer reaches back; `document` is the whole shadow"
    )
    changes: list[ChangeRecordModel]
    document: ShadowDocument | None = None


# --------------------------------------------------------------------------- helpers


def device_id(value: str) -> str:
    try:
        check_device_id(value)
    except RegistryError as exc:
        raise ApiError(400, "invalid_device_id", str(exc)) from None
    return value


def _doc_response(shadow: Shadow, body: dict[str, Any] | None = None) -> JSONResponse:
    return JSONResponse(
        shadow.document() if body is None else body, headers={"ETag": etag(shadow.version)}
    )


def _conflict(exc: VersionConflict, precondition: bool) -> ApiError:
    current = exc.current
    headers = {"ETag": etag(exc.current_version)}
    return ApiError(
        412 if precondition else 409,
        "precondition_failed" if precondition else "version_conflict",
        str(exc),
        headers=headers,
        extra={
            "version": exc.current_version,
            "current": current.document() if current is not None else None,
        },
    )


def _shadow_error(exc: ShadowError, precondition: bool) -> ApiError:
    if isinstance(exc, VersionConflict):
        return _conflict(exc, precondition)
    if isinstance(exc, ShadowTooLarge):
        return ApiError(413, "shadow_too_large", str(exc))
    name = "invalid_update" if isinstance(exc, InvalidUpdate) else "rejected"
    return ApiError(400, name, str(exc))


def _write_result(result: UpdateResult, token: str | None) -> JSONResponse:
    body = result.shadow.document()
    write: dict[str, Any] = {
        "concurrent": result.concurrent,
        "conflicting_fields": list(result.conflicting_fields),
        "overruled_fields": list(result.overruled_fields),
        "suppressed_fields": list(result.suppressed_fields),
        "cas_retries": result.cas_retries,
    }
    if token is not None:
        write["clientToken"] = token
    body["write"] = write
    return _doc_response(result.shadow, body)


async def conditional(
    ctx: ApiContext,
    device: str,
    if_match: str | None,
    if_none_match: str | None,
    body_version: int | None,
    write: Callable[[int | None], Awaitable[T]],
) -> T:
    """Runs `write(expected_version)` under the request's preconditions, exactly: a single
    `If-Match` version is the store's own CAS; `*`, lists and `If-None-Match` read the current
    version, check it, and write with it as the expected version (re-read if it moved)."""
    match = parse_etags(if_match, "If-Match", weak=False)
    none_match = parse_etags(if_none_match, "If-None-Match", weak=True)
    if match is None and none_match is None:
        try:
            return await write(None)
        except ShadowError as exc:
            raise _shadow_error(exc, precondition=False) from None
    if isinstance(match, set) and len(match) == 1 and none_match is None:
        try:
            return await write(next(iter(match)))
        except ShadowError as exc:
            raise _shadow_error(exc, precondition=True) from None
    tombstone: int | None = None  # the version of a deleted shadow, once a conflict tells it
    for _ in range(_PRECONDITION_ROUNDS):
        current = await ctx.shadows.store.get(device)
        ok = True
        if match == ANY:
            ok = current is not None
        elif isinstance(match, set):
            ok = current is not None and current.version in match
        if none_match == ANY:
            ok = ok and current is None
        elif isinstance(none_match, set):
            ok = ok and (current is None or current.version not in none_match)
        version = current.version if current is not None else (tombstone or 0)
        if not ok:
            raise _conflict(
                VersionConflict("the precondition does not hold", current, version), True
            )
        if body_version is not None and body_version != version:
            raise _conflict(
                VersionConflict(
                    f"version conflict: expected {body_version}, current is {version}",
                    current,
                    version,
                ),
                False,
            )
        try:
            return await write(version)
        except VersionConflict as exc:  # it moved since the read: check again
            tombstone = exc.current_version if exc.current is None else None
        except ShadowError as exc:
            raise _shadow_error(exc, precondition=True) from None
    raise ApiError(
        412, "precondition_failed", "the shadow kept changing; try again",
        extra={"version": 0, "current": None},
    )


# --------------------------------------------------------------------------- routes

DeviceId = Annotated[
    str,
    PathParam(
        description="the device id: 1 to 128 UTF-8 bytes, no `/ + #` or U+0000, not starting "
        "with `$`"
    ),
]
IfMatch = Annotated[
    str | None,
    Header(description='`"<version>"`, a list of them, or `*`: write only if one is current'),
]
IfNoneMatch = Annotated[str | None, Header()]

_WRITE_ERRORS = {
    **error_responses(400, 401, 403, 413),
    409: {"model": ConflictBody, "description": "`version` in the body is not current"},
    412: {"model": ConflictBody, "description": "`If-Match` / `If-None-Match` does not hold"},
}


def shadow_router(ctx: ApiContext, require: Callable[[str], Auth]) -> APIRouter:
    router = APIRouter(tags=["shadows"])
    reader = require(SHADOW_READ)
    writer = require(SHADOW_WRITE)

    @router.get(
        "/devices/{device}/shadow",
        operation_id="getShadow",
        summary="The device's shadow document",
        response_model=ShadowDocument,
        responses={
            **error_responses(400, 401, 403, 404),
            304: {"description": "Not modified: `If-None-Match` matched the current version"},
        },
    )
    async def get_shadow(
        device: DeviceId,
        principal: Annotated[Principal, Depends(reader)],
        if_none_match: Annotated[
            str | None,
            Header(description='`"<version>"` (or a list, or `*`): 304 if it is current'),
        ] = None,
    ) -> Response:
        async with ctx.timed("get"):
            device_id(device)
            shadow = await ctx.shadows.store.get(device)
            if shadow is None:
                raise ApiError(404, "no_shadow", f"device {device!r} has no shadow")
            none_match = parse_etags(if_none_match, "If-None-Match", weak=True)
            if none_match == ANY or (
                isinstance(none_match, set) and shadow.version in none_match
            ):
                return Response(status_code=304, headers={"ETag": etag(shadow.version)})
            return _doc_response(shadow)

    @router.patch(
        "/devices/{device}/shadow",
        operation_id="updateShadow",
        summary="Merge an update document into the shadow (creates it when missing)",
        response_model=ShadowWriteResult,
        responses=_WRITE_ERRORS,
    )
    async def update_shadow(
        device: DeviceId,
        body: ShadowUpdate,
        principal: Annotated[Principal, Depends(writer)],
        if_match: IfMatch = None,
        if_none_match: Annotated[
            str | None, Header(description="`*`: only if the shadow does not exist yet")
        ] = None,
    ) -> Response:
        async with ctx.timed("update"):
            device_id(device)
            doc = body.model_dump(exclude_unset=True, exclude={"context", "seq"})

            async def write(expected: int | None) -> UpdateResult:
                return await ctx.shadows.update(
                    device, doc, writer=principal.name, expected_version=expected,
                    context=body.context, seq=body.seq,
                )

            result = await conditional(
                ctx, device, if_match, if_none_match, body.version, write
            )
            return _write_result(result, body.clientToken)

    @router.put(
        "/devices/{device}/shadow",
        operation_id="replaceShadow",
        summary="Replace both sections of the shadow (creates it when missing)",
        response_model=ShadowWriteResult,
        responses=_WRITE_ERRORS,
    )
    async def replace_shadow(
        device: DeviceId,
        body: ShadowReplace,
        principal: Annotated[Principal, Depends(writer)],
        if_match: IfMatch = None,
        if_none_match: Annotated[
            str | None, Header(description="`*`: only if the shadow does not exist yet")
        ] = None,
    ) -> Response:
        async with ctx.timed("replace"):
            device_id(device)
            doc = body.model_dump(exclude_unset=True)

            async def write(expected: int | None) -> UpdateResult:
                return await ctx.shadows.replace(
                    device, doc, writer=principal.name, expected_version=expected
                )

            result = await conditional(
                ctx, device, if_match, if_none_match, body.version, write
            )
            return _write_result(result, body.clientToken)

    @router.delete(
        "/devices/{device}/shadow",
        operation_id="deleteShadow",
        summary="Delete the shadow (its version numbering continues if it is re-created)",
        status_code=204,
        response_class=Response,
        responses={
            **error_responses(400, 401, 403, 404),
            412: {"model": ConflictBody, "description": "`If-Match` does not hold"},
        },
    )
    async def delete_shadow(
        device: DeviceId,
        principal: Annotated[Principal, Depends(writer)],
        if_match: IfMatch = None,
    ) -> Response:
        async with ctx.timed("delete"):
            device_id(device)

            async def write(expected: int | None) -> bool:
                return await ctx.shadows.delete(device, expected_version=expected) is not None

            # A precondition does not turn "there is nothing to delete" into 412 (RFC 9110
            # 13.1: the 404 the request would get without it comes first).
            missing = ApiError(404, "no_shadow", f"device {device!r} has no shadow")
            if if_match is not None and await ctx.shadows.store.get(device) is None:
                raise missing
            if not await conditional(ctx, device, if_match, None, None, write):
                raise missing
            return Response(status_code=204)

    @router.get(
        "/devices/{device}/shadow/changes",
        operation_id="getShadowChanges",
        summary="The changes after a version (resync); the whole document if they are gone",
        response_model=ChangeLogModel,
        responses=error_responses(400, 401, 403, 404),
    )
    async def shadow_changes(
        device: DeviceId,
        principal: Annotated[Principal, Depends(reader)],
        since: Annotated[
            int, Query(ge=0, description="the last version the client has seen")
        ] = 0,
    ) -> Response:
        async with ctx.timed("changes"):
            device_id(device)
            log = await ctx.shadows.store.changes_since(device, since)
            if log is None:
                raise ApiError(404, "no_shadow", f"device {device!r} has no shadow")
            body: dict[str, Any] = {
                "version": log.version,
                "complete": log.complete,
                "changes": [c.document() for c in log.changes],
            }
            if not log.complete:
                current = await ctx.shadows.store.get(device)
                if current is not None:
                    body["document"] = current.document()
            return JSONResponse(body, headers={"ETag": etag(log.version)})

    return router
