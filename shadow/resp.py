"""RESP straight over asyncio streams, for the hot paths that talk to Redis: commands packed and
replies parsed by hiredis (in C), many commands per write. redis-py's own client costs tens of
microseconds of Python per command; these cost a few.

- `pack(*args)`: one command in RESP.
- `Pipe`: sends a list of packed commands on one of its connections and returns their replies;
  error replies come back as `hiredis.ReplyError` values, not raised.
- `Subscriber`: a pub/sub connection that yields `(channel, data)` for every message.

The connection settings (host, port or unix path, TLS, user, password, db) come from a
redis-py `Redis` client built from the same URL.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def pack(*args: str | int | bytes) -> bytes:
    """One command in RESP (hiredis' stub types its argument as a 1-tuple)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


async def _read_into(reader: asyncio.StreamReader, parser: hiredis.Reader) -> None:
    """Feeds the parser what the next read brings."""
    data = await reader.read(1 << 16)
    if not data:
        raise RedisConnectionError("Redis closed the connection")
    parser.feed(data)


async def _reply(reader: asyncio.StreamReader, parser: hiredis.Reader) -> Any:
    """The next reply, reading as much as it takes."""
    while (reply := parser.gets()) is False:
        await _read_into(reader, parser)
    return reply


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     commands: list[bytes]) -> list[Any]:
    writer.write(b"".join(commands))
    parser = hiredis.Reader()
    replies: list[Any] = []
    while True:  # every reply the data read so far holds, then read more
        while (reply := parser.gets()) is not False:
            replies.append(reply)
        if len(replies) >= len(commands):
            return replies
        await _read_into(reader, parser)


async def connect(redis: Redis) -> Streams:
    """A new connection with the client's settings, authenticated and on its database."""
    pool = redis.connection_pool
    kw: dict[str, Any] = pool.connection_kwargs
    tls = issubclass(pool.connection_class, SSLConnection)
    if "path" in kw:
        reader, writer = await asyncio.open_unix_connection(kw["path"])
    else:
        reader, writer = await asyncio.open_connection(
            kw.get("host", "localhost"),
            kw.get("port", 6379),
            ssl=ssl.create_default_context() if tls else None,
        )
    hello: list[bytes] = []
    if kw.get("password") is not None:
        user = () if kw.get("username") is None else (kw["username"],)
        hello.append(pack("AUTH", *user, kw["password"]))
    if kw.get("db"):
        hello.append(pack("SELECT", kw["db"]))
    if hello:
        try:
            for reply in await _roundtrip(reader, writer, hello):
                if isinstance(reply, hiredis.ReplyError):
                    raise RedisConnectionError(f"Redis refused the connection: {reply}")
        except BaseException:
            writer.close()
            raise
    return reader, writer


class Pipe:
    """Connections for pipelined commands: each `execute` takes an idle one (or opens one), so
    several batches can be in flight at once."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._idle: list[Streams] = []

    async def execute(self, commands: list[bytes]) -> list[Any]:
        """Sends the commands at once and returns their replies. Not retried: a write whose
        reply was lost may have been applied."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof():
                break
            writer.close()  # the server closed it while it was idle (restart, timeout, kill)
        else:
            reader, writer = await connect(self._redis)
        try:
            replies = await _roundtrip(reader, writer, commands)
        except OSError as exc:
            writer.close()
            raise RedisConnectionError(f"Redis connection lost: {exc}") from exc
        except BaseException:  # cancelled mid-reply: the stream is out of step, drop it
            writer.close()
            raise
        self._idle.append((reader, writer))
        return replies

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class Subscriber:
    """One pub/sub connection subscribed to fixed channels."""

    def __init__(self, redis: Redis, channels: list[str]) -> None:
        self._redis = redis
        self.channels = channels
        self._streams: Streams | None = None

    async def subscribe(self) -> None:
        """(Re)connect and subscribe; returns once Redis confirmed every channel."""
        self.close()
        reader, writer = await connect(self._redis)
        writer.write(pack("SUBSCRIBE", *self.channels))
        parser = hiredis.Reader()
        confirmed = 0
        while confirmed < len(self.channels):
            reply = await _reply(reader, parser)
            if isinstance(reply, list) and reply[0] == b"subscribe":
                confirmed += 1
        self._streams = reader, writer
        self._parser = parser  # it may already hold messages that came behind the confirmations

    async def messages(self) -> AsyncIterator[list[tuple[bytes, bytes]]]:
        """Every message as (channel, data), in batches of what one read brought. Ends when
        the connection is lost (subscribe again to go on)."""
        assert self._streams is not None
        reader = self._streams[0]
        parser = self._parser
        while True:
            batch: list[tuple[bytes, bytes]] = []
            while (reply := parser.gets()) is not False:
                if reply[0] == b"message":
                    batch.append((reply[1], reply[2]))
            if batch:
                yield batch
            data = await reader.read(1 << 18)
            if not data:
                return
            parser.feed(data)

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None
