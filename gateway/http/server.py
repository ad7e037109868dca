"""uvicorn inside the gateway's event loop: no second process, no second loop, no signal
handlers of its own (the gateway owns the lifecycle), and no logging setup of its own (its
records go through the gateway's handlers, text or JSON)."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.http.observe import observed

access_log = logging.getLogger("iotgw.http.access")


class AccessLog:
    """One log record per HTTP request, when its response has started: method, path (with the
    query), status, duration in milliseconds, peer. Fields are also attached to the record
    (`extra`), so the JSON format carries them as keys."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        def done(status: int, seconds: float) -> None:
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else "-"
            path = scope.get("raw_path", b"").decode("ascii", "replace") or scope["path"]
            if scope.get("query_string"):
                path += "?" + scope["query_string"].decode("ascii", "replace")
            ms = seconds * 1000
            access_log.info(
                "%s %s %d %.1fms %s", scope["method"], path, status, ms, peer,
                extra={"method": scope["method"], "path": path, "status": status,
                       "duration_ms": round(ms, 3), "peer": peer},
            )

        await observed(self.app, scope, receive, send, done)


class HttpServer:
    def __init__(
        self, api: FastAPI, host: str, port: int, *,
        sockets: list[socket.socket] | None = None, access_log: bool = False,
    ) -> None:
        """Serves `sockets` when given (bound already), else binds host:port itself."""
        app: ASGIApp = AccessLog(api) if access_log else api
        self.config = uvicorn.Config(
            app, lifespan="off", log_level="warning", access_log=False, server_header=False,
            log_config=None,
        )
        self.server = uvicorn.Server(self.config)
        self.sockets = sockets or [socket.create_server((host, port))]
        self.port: int = self.sockets[0].getsockname()[1]
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # What uvicorn.Server.serve() does, minus its signal capture and blocking main loop.
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=self.sockets)
        self._ticker = asyncio.create_task(self.server.main_loop())  # Date header, exit flag

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._ticker is not None:
            await self._ticker
        await self.server.shutdown(sockets=self.sockets)
        for sock in self.sockets:
            sock.close()
