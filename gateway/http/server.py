"""uvicorn inside the gateway's event loop: no second process, no second loop, no signal
handlers of its own (the gateway owns the lifecycle)."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI


class HttpServer:
    def __init__(self, api: FastAPI, host: str, port: int) -> None:
        self.config = uvicorn.Config(
            api, lifespan="off", log_level="warning", access_log=False, server_header=False
        )
        self.server = uvicorn.Server(self.config)
        self.sock = socket.create_server((host, port), reuse_port=True)
        self.port: int = self.sock.getsockname()[1]
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # What uvicorn.Server.serve() does, minus its signal capture and blocking main loop.
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[self.sock])
        self._ticker = asyncio.create_task(self.server.main_loop())  # Date header, exit flag

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._ticker is not None:
            await self._ticker
        await self.server.shutdown(sockets=[self.sock])
        self.sock.close()
