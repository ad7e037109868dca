"""The REST API: health, readiness and Prometheus metrics (no token), and under `/v1` the device
shadows (gateway/http/shadow_api.py), devices and commands (gateway/http/devices_api.py), behind
bearer tokens with scopes (gateway/tokens.py).

Every error is a JSON body `{"error": "<code>", "detail": <message or list>}` with a 4xx status:
400 malformed (bad JSON, a body that does not fit the schema, a shadow rule broken), 401 no or
invalid bearer token (with `WWW-Authenticate: Bearer`), 403 a token without the scope, 404,
409/412 version conflicts (with the current document), 413 too large. Request validation errors
are 400, not FastAPI's 422. Bad input never gets a 5xx.
"""

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import __version__
from gateway.admin import Admin
from gateway.auth import DeviceRegistry
from gateway.cluster import Cluster
from gateway.guard import BUSY, DENIED, OK, THROTTLED, UNAVAILABLE, AuthGuard
from gateway.http.docs import install_docs
from gateway.http.observe import observed
from gateway.metrics import HttpMetrics, Metrics, ShadowMetrics
from gateway.mqtt.broker import Broker
from gateway.shadows import ShadowService
from gateway.tokens import ADMIN, Principal, Token, TokenError, TokenStore

log = logging.getLogger("iotgw.http")

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_BODY_BYTES: Final = 64 * 1024  # a shadow state is at most 8 KiB; updates carry some more
_WWW_AUTHENTICATE = 'Bearer realm="iotgw"'
_NO_TOKENS = (
    "this gateway has no API tokens yet: create one with "
    "`iotgw tokens create --name NAME --scope shadow:read,shadow:write` (it prints the token "
    "once), or start the gateway with --api-token / IOTGW_API_TOKEN (a bootstrap admin token)"
)


# --------------------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="a short machine-readable code, e.g. `version_conflict`")
    detail: Any = Field(description="what went wrong: a message, or a list of problems")


class ApiError(Exception):
    """Raised by a route; rendered as `{"error", "detail", **extra}` with `status`."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: Any,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers
        self.extra = extra or {}

    def response(self) -> JSONResponse:
        body = {"error": self.error, "detail": self.detail, **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error codes (all with ErrorBody)."""
    return {code: {"model": ErrorBody, "description": HTTPStatus(code).phrase} for code in codes}


def _code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def _install_error_handlers(api: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if exc.detail else HTTPStatus(exc.status_code).phrase
        return JSONResponse(
            {"error": _code(exc.status_code), "detail": detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = [
            {
                "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=400)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"error": "internal_error", "detail": "the gateway failed; see its log"},
            status_code=500,
        )

    api.add_exception_handler(ApiError, api_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413 before any route
    reads it (by Content-Length, or by counting a chunked body)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        error = ApiError(
            413, "payload_too_large", f"the request body is larger than {self.limit} bytes"
        )
        response = error.response()
        response.headers["connection"] = "close"
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - a response never reads
    return {"type": "http.disconnect"}


class Utf8Path:
    """ASGI middleware: a path whose %-escapes do not decode as UTF-8 (`%FF%FE`) is 400. The
    server would decode them to U+FFFD, and `/devices/%FF/...` would then name the device
    "\ufffd" (which `%EF%BF%BD` names properly)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and b"%" in raw:
            try:
                unquote_to_bytes(raw).decode()
            except UnicodeDecodeError as exc:
                error = ApiError(400, "invalid_path", "the path's %-escapes are not UTF-8 "
                                 f"(byte {exc.start + 1} of the decoded path)")
                await error.response()({"type": "http"}, _no_receive, send)
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """ASGI middleware: counts each request by its route template (`/v1/devices/{device}/shadow`;
    `unmatched` for paths no route has), method and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        def done(status: int, seconds: float) -> None:
            route = _route_template(scope)
            method = scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.duration.labels(route, method).observe(seconds)

        await observed(self.app, scope, receive, send, done)


def _route_template(scope: Scope) -> str:
    """The matched route's path template, with the prefix of the router that included it: the
    route knows only its own part (`/devices/{device}/shadow`), the path gives the prefix (its
    leading segments; a parameter never holds a `/`)."""
    route = scope.get("route")
    own = getattr(route, "path", None)
    if not isinstance(own, str):
        return "unmatched"
    if isinstance(route, Mount):
        return own
    segments = scope["path"].split("/")
    return "/".join(segments[: len(segments) - own.count("/")]) + own


# --------------------------------------------------------------------------- what routes use


@dataclass
class ApiContext:
    """What the /v1 routes work with; built by the app (gateway/app.py)."""

    shadows: ShadowService
    broker: Broker
    registry: DeviceRegistry
    tokens: TokenStore
    guard: AuthGuard
    node_id: str
    shadow_metrics: ShadowMetrics | None = None
    # the app acts on devices removed or disabled (closes connections): called after a change
    registry_changed: Callable[[], None] = lambda: None
    cluster: Cluster | None = None  # where other nodes' devices are, in a cluster
    admin: Admin | None = None  # /v1/admin (gateway/admin.py)

    @asynccontextmanager
    async def timed(self, operation: str) -> AsyncIterator[None]:
        """Observe the request latency of a shadow operation (iotgw_shadow_request_*)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.shadow_metrics is not None:
                self.shadow_metrics.observe(operation, "rest", time.perf_counter() - start)


# Declared in the OpenAPI document by _Api.openapi() for every /v1 operation. (Not FastAPI's
# HTTPBearer dependency: two fewer levels of dependency solving on every request.)
SECURITY_SCHEMES: Final = {
    "bearerToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <token>`: the bootstrap admin token "
        "(--api-token) or one made by `iotgw tokens create`",
    }
}

Auth = Callable[..., Awaitable[Principal]]


def _host(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


def auth_dependencies(tokens: TokenStore, guard: AuthGuard) -> Callable[[str], Auth]:
    """`require(scope)`: a dependency that yields the request's Principal or raises 401/403
    (429 while the token or the address is banned for failures, 503 when the checks are
    saturated)."""

    def unauthorized(error: str, detail: str, code: str | None = None) -> ApiError:
        challenge = _WWW_AUTHENTICATE if code is None else f'{_WWW_AUTHENTICATE}, error="{code}"'
        return ApiError(401, error, detail, headers={"WWW-Authenticate": challenge})

    async def authenticate(request: Request) -> Principal:
        try:
            if tokens.empty():
                raise unauthorized("no_api_tokens", _NO_TOKENS)
            header = request.headers.get("authorization")
            if not header:
                raise unauthorized("missing_token", "send `Authorization: Bearer <token>`")
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise unauthorized(
                    "invalid_request",
                    "the Authorization header must be `Bearer <token>`",
                    "invalid_request",
                )
            found, final = tokens.lookup(token)
            if not final:  # first use of a stored token: the guard checks it
                assert isinstance(found, Token)
                found = await _check_token(request, found, token)
        except TokenError as exc:  # logged by the registry database, once a minute
            raise ApiError(503, "token_store_unavailable", str(exc)) from None
        if not isinstance(found, Principal):
            guard.events.refused("http", "", _host(request), "invalid_token")
            raise unauthorized(
                "invalid_token", "the token is unknown, revoked or malformed", "invalid_token"
            )
        return found

    async def _check_token(request: Request, stored: Token, token: str) -> Principal | None:
        host = _host(request)
        verdict = guard.check(
            "http", "token", stored.token_id, token.encode(),
            lambda: tokens.verify_slow(stored, token) is not None,
            (f"token:{stored.token_id}", f"addr:{host}"),
            stored.secret_hash,
        )
        if not isinstance(verdict, str):
            verdict = await verdict
        if verdict == OK:
            return Principal(stored.name, stored.scopes)
        if verdict != DENIED:
            guard.events.refused("http", stored.name, host, verdict)
        if verdict == THROTTLED:
            raise ApiError(429, "too_many_failures",
                           "too many failed attempts from this address or with this token: "
                           "try again later", headers={"Retry-After": "60"})
        if verdict in (BUSY, UNAVAILABLE):
            raise ApiError(503, "auth_busy", "credentials cannot be checked now",
                           headers={"Retry-After": "1"})
        return None

    def require(scope: str) -> Auth:
        async def dependency(request: Request) -> Principal:
            principal = await authenticate(request)
            if guard.bans.banned((f"addr:{_host(request)}",)) and not principal.allows(ADMIN):
                # (admin tokens pass: an operator cannot lock out the way to lift the ban)
                raise ApiError(403, "banned", "this address is banned by an operator")
            if not principal.allows(scope):
                guard.events.denied(
                    "http", principal.name, _host(request), "scope", f"{request.url.path}"
                )
                raise ApiError(
                    403,
                    "insufficient_scope",
                    f"the token {principal.name!r} lacks the scope {scope!r}",
                    headers={
                        "WWW-Authenticate": f'{_WWW_AUTHENTICATE}, error="insufficient_scope", '
                        f'scope="{scope}"'
                    },
                )
            return principal

        return dependency

    return require


# --------------------------------------------------------------------------- entity tags

ANY: Final = "*"
_TAG = re.compile(r'\s*(W/)?"([^"]*)"\s*|\s*(\d+)\s*')


def etag(version: int) -> str:
    return f'"{version}"'


def parse_etags(header: str | None, name: str, *, weak: bool) -> set[int] | str | None:
    """`If-Match` / `If-None-Match`: None when absent, ANY for `*`, else the versions listed.
    `weak`: W/"3" counts as 3 (If-None-Match); else weak tags never match (If-Match).
    A bare number (`3`) is taken for `"3"`. Tags that are not versions match nothing."""
    if header is None:
        return None
    if header.strip() == "*":
        return ANY
    versions: set[int] = set()
    for part in header.split(","):
        m = _TAG.fullmatch(part)
        if m is None:
            raise ApiError(
                400,
                "invalid_header",
                f'{name} must be "*" or a comma-separated list of quoted versions such as "3"',
            )
        value = m.group(2) if m.group(3) is None else m.group(3)
        if (m.group(1) and not weak) or not (value.isascii() and value.isdigit()):
            continue
        if len(value) <= 19:
            versions.add(int(value))
    return versions


# --------------------------------------------------------------------------- the app


class _Api(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema, minus its 422 responses (validation errors are 400 here), plus
        the bearer token security scheme on every /v1 operation."""
        if self.openapi_schema is None:
            schema = super().openapi()
            for path_name, path in schema.get("paths", {}).items():
                for operation in path.values():
                    if isinstance(operation, dict):
                        operation.get("responses", {}).pop("422", None)
                    if isinstance(operation, dict) and path_name.startswith("/v1/"):
                        operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
            components = schema.setdefault("components", {})
            components["securitySchemes"] = dict(SECURITY_SCHEMES)
            schemas = components.get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            self.openapi_schema = schema
        return self.openapi_schema


class Status(BaseModel):
    status: str


def build_api(
    metrics: Metrics, ready: Callable[[], bool], context: ApiContext | None = None
) -> FastAPI:
    """The ASGI app. Without `context` only the health and metrics routes exist."""
    api = _Api(
        title="iotgw",
        version=__version__,
        description="Device shadows, devices and commands of an iotgw gateway. "
        "Errors: `{\"error\": \"<code>\", \"detail\": ...}`.",
        docs_url=None,  # served offline by install_docs below
        redoc_url=None,
        openapi_url="/openapi.json",
        # FastAPI's built-in OpenTelemetry: off (metrics are Prometheus, at /metrics); even
        # unconfigured it looks up the global providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    _install_error_handlers(api)
    install_docs(api)
    api.add_middleware(BodyLimit)
    api.add_middleware(Utf8Path)
    api.add_middleware(RequestMetrics, metrics=metrics.http)

    @api.get(
        "/healthz", operation_id="healthz", summary="The process is alive", response_model=Status
    )
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/readyz",
        operation_id="readyz",
        summary="Listeners are up and the stores answer",
        response_model=Status,
        responses={503: {"model": Status, "description": "Starting"}},
    )
    async def readyz() -> Any:
        if ready():
            return {"status": "ready"}
        return JSONResponse({"status": "starting"}, status_code=503)

    @api.head("/metrics", include_in_schema=False)  # probes: the content type, no body
    @api.get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "The Prometheus text format",
            }
        },
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_TYPE)

    if context is not None:
        from gateway.http.devices_api import devices_router
        from gateway.http.shadow_api import shadow_router

        require = auth_dependencies(context.tokens, context.guard)
        api.include_router(shadow_router(context, require), prefix="/v1")
        api.include_router(devices_router(context, require), prefix="/v1")
        if context.admin is not None:
            from gateway.http.admin_api import admin_router

            api.include_router(admin_router(context.admin, require), prefix="/v1")

    return api

