"""What the HTTP middlewares (request metrics, access log) share: run the app for one request
and report its status and duration, also when the app raised."""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def observed(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send,
    done: Callable[[int, float], None],
) -> None:
    """Call `app`; then `done(status, seconds)` (status 500: it raised before responding)."""
    started = time.perf_counter()
    status = 500

    async def send_status(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    try:
        await app(scope, receive, send_status)
    finally:
        done(status, time.perf_counter() - started)
