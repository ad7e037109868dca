"""Routes: health, readiness, Prometheus metrics (and, as they land, shadows and devices).

Errors are JSON bodies `{"error": "...", "detail": ...}` with a 4xx status; validation errors of
request bodies come back as 422 with FastAPI's detail list, never as a 5xx.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import __version__
from gateway.metrics import Metrics

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_api(metrics: Metrics, ready: Callable[[], bool]) -> FastAPI:
    api = FastAPI(title="iotgw", version=__version__, docs_url="/docs", openapi_url="/openapi.json")

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": exc.detail if isinstance(exc.detail, str) else "error", "detail": exc.detail},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @api.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Listeners are up and the stores answer", response_model=None)
    async def readyz() -> Any:
        if ready():
            return {"status": "ready"}
        return JSONResponse({"status": "starting"}, status_code=503)

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_TYPE)

    return api
