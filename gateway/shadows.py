"""The gateway's door to device shadows: every write, from MQTT, CoAP or REST, goes through
`ShadowService`, which calls the store (shadow/) and then tells everyone who must know:

- MQTT, the AWS IoT topic scheme under `$shadow/`: `$shadow/{id}/update/accepted` (the applied
  update), `/update/documents` (previous and current), `/update/delta` (the whole delta, stamped
  with the new version) when desired changed; `/get/accepted`, `/delete/accepted`; and
  `/update|get|delete/rejected` with `{"code", "message", "clientToken"}` to the requester.
- `on_version` (CoAP observers of `/shadow/{id}`) with the new version;
- the telemetry pipeline: a `shadow` record per accepted write (Kafka topic `iot.shadow`).

Requests over MQTT: publish a JSON document to `$shadow/{id}/update` (an update document,
`{"state": {"desired"|"reported": {...}}, "version"?: N, "clientToken"?: "..."}`, plus two
iotgw fields: `"seq"`, the device's report sequence for out-of-order suppression, and
`"context"`, the version vector the writer read), to `$shadow/{id}/get` (empty, or
`{"since": N}` for the changes after version N: resync after a reconnect) or to
`$shadow/{id}/delete`. A QoS 1 request is acknowledged once the store has it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.mqtt.channel import REFUSED, TAKEN, MqttChannel
from gateway.mqtt.session import Message
from shadow import ShadowError, ShadowStore, UpdateResult
from shadow.model import InvalidUpdate

log = logging.getLogger("iotgw.shadow")

OPERATIONS = ("update", "get", "delete")

Publish = Callable[[str, bytes], None]  # (topic, payload): route one message to subscribers
Listener = Callable[[str, int], None]  # (device, new version): a shadow changed or went away


def parse_request_topic(topic: str) -> tuple[str, str] | None:
    """(device, operation) for `$shadow/{id}/update|get|delete`, else None."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "$shadow" and parts[1] and parts[2] in OPERATIONS:
        return parts[1], parts[2]
    return None


def _extension(doc: dict[str, Any], key: str) -> Any:
    """Take an iotgw-only field out of an update document (the store knows AWS's fields)."""
    return doc.pop(key) if key in doc else None


def split_update(doc: Any) -> tuple[Any, int | None, dict[str, int] | None]:
    """(AWS update document, seq, context) from a request body; InvalidUpdate if malformed."""
    if not isinstance(doc, dict):
        raise InvalidUpdate("the update must be a JSON object")
    doc = dict(doc)
    seq = _extension(doc, "seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        raise InvalidUpdate('"seq" must be a non-negative integer')
    context = _extension(doc, "context")
    if context is not None and not (
        isinstance(context, dict)
        and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in context.items()
        )
    ):
        raise InvalidUpdate('"context" must map writer ids to non-negative integers')
    return doc, seq, context


class ShadowService:
    def __init__(
        self,
        store: ShadowStore,
        publish: Publish,
        *,
        node_id: str,
        on_change: Callable[[str, bytes], None] | None = None,
        on_version: Listener | None = None,
    ) -> None:
        self.store = store
        self.publish = publish
        self.node_id = node_id
        self.on_change = on_change  # (device, accepted JSON): the telemetry pipeline's record
        self.on_version = on_version  # (device, new version): CoAP observers of the shadow
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the operations (REST and CoAP call these directly) ---------------------------------

    async def update(
        self,
        device: str,
        doc: Mapping[str, Any],
        *,
        writer: str | None = None,
        expected_version: int | None = None,
        context: Mapping[str, int] | None = None,
        seq: int | None = None,
    ) -> UpdateResult:
        result = await self.store.update(
            device, doc, writer=writer or self.node_id, expected_version=expected_version,
            context=context, seq=seq,
        )
        self._accepted(device, "update", result)
        return result

    async def replace(
        self,
        device: str,
        doc: Mapping[str, Any],
        *,
        writer: str | None = None,
        expected_version: int | None = None,
    ) -> UpdateResult:
        result = await self.store.replace(
            device, doc, writer=writer or self.node_id, expected_version=expected_version
        )
        self._accepted(device, "update", result)
        return result

    async def delete(self, device: str, *, expected_version: int | None = None) -> int | None:
        """The version of the delete, or None when there was no shadow."""
        version = await self.store.delete(device, expected_version=expected_version)
        if version is not None:
            body = {"version": version, "timestamp": int(time.time())}
            self.publish(f"$shadow/{device}/delete/accepted", _json(body))
            self._notify(device, version)
        return version

    def _accepted(self, device: str, operation: str, result: UpdateResult) -> None:
        accepted = _json(result.accepted)
        self.publish(f"$shadow/{device}/{operation}/accepted", accepted)
        documents = {
            "current": result.shadow.document(),
            "version": result.version,
            "timestamp": int(time.time()),
        }
        self.publish(f"$shadow/{device}/update/documents", _json(documents))
        delta = result.delta  # built on each access
        if delta is not None:
            self.publish(f"$shadow/{device}/update/delta", _json(delta))
        if self.on_change is not None:
            self.on_change(device, accepted)
        self._notify(device, result.version)

    def _notify(self, device: str, version: int) -> None:
        if self.on_version is None:
            return
        try:
            self.on_version(device, version)
        except Exception:  # a broken observer must not fail the write that was stored
            log.exception("shadow change listener failed")

    # ---- MQTT requests ------------------------------------------------------------------------

    def submit_mqtt(
        self, device: str, operation: str, payload: bytes, done: Callable[[], None]
    ) -> None:
        """Handle `$shadow/{device}/{operation}` in the background; `done()` when it is stored
        (or rejected), so that a QoS 1 request is acknowledged only then."""
        task = asyncio.get_running_loop().create_task(
            self._mqtt_request(device, operation, payload, done)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mqtt_request(
        self, device: str, operation: str, payload: bytes, done: Callable[[], None]
    ) -> None:
        token: Any = None
        try:
            body = json.loads(payload) if payload.strip() else {}
            if isinstance(body, dict):
                token = body.get("clientToken")
            if operation == "update":
                doc, seq, context = split_update(body)
                await self.update(device, doc, context=context, seq=seq)
            elif operation == "get":
                await self._mqtt_get(device, body, token)
            else:
                version = body.get("version") if isinstance(body, dict) else None
                if await self.delete(device, expected_version=version) is None:
                    self._reject(device, operation, 404, "no shadow", token)
        except json.JSONDecodeError as exc:
            self._reject(device, operation, 400, f"the payload is not JSON: {exc}", token)
        except ShadowError as exc:
            reply = exc.document()
            if token is not None:
                reply["clientToken"] = token
            self.publish(f"$shadow/{device}/{operation}/rejected", _json(reply))
        except Exception:
            log.exception("shadow %s of %s failed", operation, device)
            self._reject(device, operation, 500, "internal error", token)
        finally:
            done()

    async def _mqtt_get(self, device: str, body: Any, token: Any) -> None:
        since = body.get("since") if isinstance(body, dict) else None
        if since is not None:
            if isinstance(since, bool) or not isinstance(since, int) or since < 0:
                raise InvalidUpdate('"since" must be a non-negative integer')
            log_ = await self.store.changes_since(device, since)
            if log_ is None:
                self._reject(device, "get", 404, "no shadow", token)
                return
            reply: dict[str, Any] = {
                "version": log_.version,
                "complete": log_.complete,
                "changes": [c.document() for c in log_.changes],
            }
            if not log_.complete:  # the history does not reach back: the whole document
                current = await self.store.get(device)
                if current is not None:
                    reply["document"] = current.document()
        else:
            current = await self.store.get(device)
            if current is None:
                self._reject(device, "get", 404, "no shadow", token)
                return
            reply = current.document()
        if token is not None:
            reply["clientToken"] = token
        self.publish(f"$shadow/{device}/get/accepted", _json(reply))

    def _reject(self, device: str, operation: str, code: int, message: str, token: Any) -> None:
        reply: dict[str, Any] = {"code": code, "message": message, "timestamp": int(time.time())}
        if token is not None:
            reply["clientToken"] = token
        self.publish(f"$shadow/{device}/{operation}/rejected", _json(reply))

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class ShadowInterceptor:
    """`$shadow/{id}/update|get|delete` over MQTT: the PUBLISH goes to the shadow service, not
    to subscribers, and its QoS 1/2 acknowledgement waits until the store has it. The other
    `$shadow/` topics (the replies) are the gateway's alone to publish: refused."""

    prefix = "$shadow/"

    def __init__(self, shadows: ShadowService) -> None:
        self.shadows = shadows

    def on_publish(self, channel: MqttChannel, message: Message) -> int:
        request = parse_request_topic(message.topic)
        if request is None:
            return REFUSED
        token = channel.hold_ack()

        def done() -> None:
            if token is not None:
                channel.records_durable([token])

        self.shadows.submit_mqtt(request[0], request[1], bytes(message.payload), done)
        return TAKEN

    def forget(self, channel: MqttChannel) -> None:
        pass  # a request in progress finds the channel closed and acknowledges nothing

