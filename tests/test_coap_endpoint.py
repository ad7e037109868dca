"""The CoAP endpoint against real peers: aiocoap's client on a real gateway, paho for the MQTT
side, and raw datagrams made with our codec for what a library client will not send. The
message-layer timing cases (separate responses, retransmission, overload) run an endpoint on
its own with a telemetry sink the test holds back, and short transmission parameters."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiocoap
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from test_mqtt_server import PahoClient, RawClient
from test_shadow_mqtt import Device

from gateway._native import coap, mqtt
from gateway.coap import CoapEndpoint, CoapLimits, Timing
from gateway.coap.blockwise import (
    COMPLETE,
    CONTINUE,
    INCOMPLETE,
    TOO_LARGE,
    Block1Assembler,
    block2_slice,
)
from gateway.coap.exchanges import Deduplicator
from gateway.telemetry.filesink import read_records
from gateway.telemetry.pipeline import TelemetryPipeline
from gateway.telemetry.records import Record

# ---- helpers -----------------------------------------------------------------------------------


def _base(gw: Any) -> str:
    return f"coap://127.0.0.1:{gw.coap_port}"


def _on_gateway(gw: Any, coro: Any) -> Any:
    """Run a coroutine on the gateway's loop from a synchronous test."""
    return asyncio.run_coroutine_threadsafe(coro, gw.loop).result(10)


async def _on_gateway_async(gw: Any, coro: Any) -> Any:
    """The same from a coroutine of the test's own loop (without blocking it)."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, gw.loop))


async def _request(ctx: Any, code: Any, uri: str, payload: bytes = b"", **opts: Any) -> Any:
    msg = aiocoap.Message(code=code, uri=uri, payload=payload)
    for name, value in opts.items():
        setattr(msg.opt, name, value)
    return await asyncio.wait_for(ctx.request(msg).response, 10)


def _coap(fn: Any) -> Any:
    """Run `fn(ctx)` with an aiocoap client context, in a fresh event loop."""

    async def main() -> Any:
        ctx = await aiocoap.Context.create_client_context()
        try:
            return await fn(ctx)
        finally:
            await ctx.shutdown()

    return asyncio.run(main())


class RawCoap:
    """One UDP socket speaking datagrams made with our codec."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addr = ("127.0.0.1", port)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.addr)

    def request(
        self, code: int, path: str, mid: int, token: bytes = b"tk", *,
        type_: int = coap.CON, options: Any = (), payload: bytes = b"",
    ) -> bytes:
        data = coap.encode_request(type_, code, mid, token, path, list(options), payload)
        self.send(data)
        return data

    def recv_raw(self, timeout: float = 3.0) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None

    def recv(self, timeout: float = 3.0) -> coap.Message:
        data = self.recv_raw(timeout)
        assert data is not None, "no datagram"
        return coap.decode(data)

    def close(self) -> None:
        self.sock.close()


def _device(gw: Any, device_id: str) -> str:
    """Register a device; returns its `t` query."""
    gw.gateway.registry.add(device_id, "secret-" + device_id)
    return "t=secret-" + device_id


# ---- telemetry -----------------------------------------------------------------------------------


def test_telemetry_post_is_changed_once_durable_and_recorded(gateway_factory: Any) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-1")

    async def run(ctx: Any) -> None:
        r = await _request(ctx, aiocoap.POST, f"{_base(gw)}/telemetry/dev-1?{t}", b'{"temp":21}',
                           content_format=50)
        assert r.code == aiocoap.CHANGED
        r = await _request(ctx, aiocoap.POST, f"{_base(gw)}/events/dev-1?{t}", b"boot")
        assert r.code == aiocoap.CHANGED

    _coap(run)
    # 2.04 went out only after the sink had the record: it is on disk without a drain.
    records = list(read_records(gw.gateway.data_dir / "telemetry"))
    got = [(r.device, r.kind, r.protocol, r.topic_or_path, r.payload) for r in records]
    assert got == [
        ("dev-1", "telemetry", "coap", "/telemetry/dev-1", b'{"temp":21}'),
        ("dev-1", "events", "coap", "/events/dev-1", b"boot"),
    ]


def test_coap_telemetry_reaches_mqtt_subscribers_as_if_published(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open")
    app = RawClient(gw.mqtt_port, version=5)
    assert app.connect("app").reason_code == 0
    app.send(mqtt.Subscribe(1, [mqtt.Subscription("devices/+/telemetry", 1)]).encode(5))
    assert app.recv().type == mqtt.SUBACK
    raw = RawCoap(gw.coap_port)
    raw.request(coap.POST, "telemetry/dev-9", 1, options=[(coap.CONTENT_FORMAT, coap.JSON)],
                payload=b'{"t":1}')
    assert raw.recv().code == coap.CHANGED
    got = app.recv()
    assert (got.topic, bytes(got.payload), got.qos) == ("devices/dev-9/telemetry", b'{"t":1}', 1)
    assert got.properties.content_type == "application/json"
    raw.close()


def test_requests_without_a_valid_token_are_unauthorized(gateway_factory: Any) -> None:
    gw = gateway_factory()
    _device(gw, "dev-2")

    async def run(ctx: Any) -> list[Any]:
        base = _base(gw)
        return [
            (await _request(ctx, aiocoap.POST, f"{base}/telemetry/dev-2", b"1")).code,
            (await _request(ctx, aiocoap.POST, f"{base}/telemetry/dev-2?t=wrong", b"1")).code,
            (await _request(ctx, aiocoap.GET, f"{base}/shadow/dev-2?t=wrong")).code,
            (await _request(ctx, aiocoap.POST, f"{base}/telemetry/dev-9?t=secret-dev-2")).code,
            (await _request(ctx, aiocoap.POST, f"{base}/telemetry/a+b", b"1")).code,
        ]

    assert _coap(run) == [aiocoap.UNAUTHORIZED] * 5
    assert list(read_records(gw.gateway.data_dir / "telemetry")) == []


def test_anonymous_devices_are_served_only_when_allowed(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True)

    async def run(ctx: Any) -> Any:
        return await _request(ctx, aiocoap.POST, f"{_base(gw)}/telemetry/anon-1", b"x")

    assert _coap(run).code == aiocoap.CHANGED


def test_unknown_paths_methods_and_formats_get_precise_errors(gateway_factory: Any) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-3")

    async def run(ctx: Any) -> list[Any]:
        base = _base(gw)
        out = []
        for code, path, payload, opts in [
            (aiocoap.GET, "/nowhere", b"", {}),
            (aiocoap.GET, f"/telemetry/dev-3?{t}", b"", {}),
            (aiocoap.POST, f"/shadow/dev-3/delta?{t}", b"{}", {}),
            (aiocoap.POST, f"/telemetry/dev-3?{t}", b"x", {"content_format": 9999}),
            (aiocoap.PATCH, f"/shadow/dev-3?{t}", b"x", {"content_format": 0}),
            (aiocoap.GET, f"/shadow/dev-3?{t}", b"", {"accept": 60}),
            (aiocoap.PATCH, f"/shadow/dev-3?{t}", b"{not json", {}),
            (aiocoap.PATCH, f"/shadow/dev-3?{t}", b'{"state": 5}', {}),
        ]:
            r = await _request(ctx, code, base + path, payload, **opts)
            out.append((r.code, r.payload.decode()))
        return out

    got = _coap(run)
    assert [c for c, _ in got] == [
        aiocoap.NOT_FOUND,
        aiocoap.METHOD_NOT_ALLOWED,
        aiocoap.METHOD_NOT_ALLOWED,
        aiocoap.UNSUPPORTED_CONTENT_FORMAT,
        aiocoap.UNSUPPORTED_CONTENT_FORMAT,
        aiocoap.NOT_ACCEPTABLE,
        aiocoap.BAD_REQUEST,
        aiocoap.BAD_REQUEST,
    ]
    assert got[6][1].startswith("the payload is not JSON")  # a diagnostic payload
    assert "state" in got[7][1]


# ---- shadows ------------------------------------------------------------------------------------


def test_shadow_over_coap_and_mqtt_is_one_document(gateway_factory: Any) -> None:
    gw = gateway_factory()
    dev = Device(gw, "dev-4")  # MQTT, password "pw", subscribed to $shadow/dev-4/#
    dev.request("update", {"state": {"reported": {"temp": 20}}})
    dev.next_message("update/accepted")
    uri = f"{_base(gw)}/shadow/dev-4?t=pw"

    async def read(ctx: Any) -> Any:
        return await _request(ctx, aiocoap.GET, uri)

    r = _coap(read)
    assert r.code == aiocoap.CONTENT and r.opt.content_format == 50
    assert r.opt.etag == b"\x01"
    doc = json.loads(r.payload)
    assert doc["state"]["reported"] == {"temp": 20} and doc["version"] == 1

    async def patch(ctx: Any) -> Any:
        body = json.dumps({"state": {"desired": {"fan": "on"}}, "seq": 5}).encode()
        return await _request(ctx, aiocoap.PATCH, uri, body, content_format=50)

    r = _coap(patch)
    assert r.code == aiocoap.CHANGED and r.opt.etag == b"\x02"
    assert dev.next_message("update/delta")["state"] == {"fan": "on"}  # seen over MQTT

    async def put(ctx: Any) -> Any:
        body = json.dumps({"state": {"reported": {"temp": 22}}}).encode()
        return await _request(ctx, aiocoap.PUT, uri, body)

    assert _coap(put).code == aiocoap.CHANGED
    dev.request("get", {})
    got = dev.next_message("get/accepted")
    assert got["state"] == {"reported": {"temp": 22}} and got["version"] == 3

    async def delete_then_get(ctx: Any) -> tuple[Any, Any, Any]:
        first = await _request(ctx, aiocoap.DELETE, uri)
        second = await _request(ctx, aiocoap.DELETE, uri)
        return first.code, second.code, (await _request(ctx, aiocoap.GET, uri)).code

    assert _coap(delete_then_get) == (aiocoap.DELETED, aiocoap.NOT_FOUND, aiocoap.NOT_FOUND)
    assert "version" in dev.next_message("delete/accepted")


def test_if_match_is_compare_and_set_and_a_stale_body_version_conflicts(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-5")
    uri = f"{_base(gw)}/shadow/dev-5?{t}"
    _on_gateway(gw, gw.gateway.shadows.update("dev-5", {"state": {"reported": {"a": 1}}}))

    async def run(ctx: Any) -> list[Any]:
        body = json.dumps({"state": {"reported": {"a": 2}}}).encode()
        stale = await _request(ctx, aiocoap.PATCH, uri, body, if_match=[b"\x07"])
        fresh = await _request(ctx, aiocoap.PATCH, uri, body, if_match=[b"\x01"])
        versioned = json.dumps({"state": {"reported": {"a": 3}}, "version": 1}).encode()
        conflict = await _request(ctx, aiocoap.PATCH, uri, versioned)
        exists = await _request(ctx, aiocoap.PUT, uri, body, if_none_match=True)
        valid = await _request(ctx, aiocoap.GET, uri, etags=[b"\x02"])
        delete_stale = await _request(ctx, aiocoap.DELETE, uri, if_match=[b"\x01"])
        return [(r.code, r.opt.etag) for r in
                (stale, fresh, conflict, exists, valid, delete_stale)]

    assert _coap(run) == [
        (aiocoap.PRECONDITION_FAILED, b"\x01"),
        (aiocoap.CHANGED, b"\x02"),
        (aiocoap.CONFLICT, b"\x02"),
        (aiocoap.PRECONDITION_FAILED, None),
        (aiocoap.VALID, b"\x02"),
        (aiocoap.PRECONDITION_FAILED, b"\x02"),
    ]


def test_large_shadow_goes_up_block1_and_down_block2(gateway_factory: Any) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-6")
    uri = f"{_base(gw)}/shadow/dev-6?{t}"
    reported = {f"sensor{i:03d}": "x" * 20 for i in range(120)}  # ~3.6 KB, under 8 KB state
    body = json.dumps({"state": {"reported": reported}}).encode()
    assert len(body) > 3000

    async def run(ctx: Any) -> tuple[Any, Any]:
        put = await _request(ctx, aiocoap.PUT, uri, body, content_format=50)
        got = await _request(ctx, aiocoap.GET, uri)
        return put, got

    put, got = _coap(run)
    assert put.code == aiocoap.CHANGED
    assert got.code == aiocoap.CONTENT and json.loads(got.payload)["state"]["reported"] == reported
    # aiocoap went block-wise both ways: check the blocks on the wire with a raw client.
    raw = RawCoap(gw.coap_port)
    try:
        raw.request(coap.GET, f"/shadow/dev-6?{t}", 1, b"b2")
        first = raw.recv()
        num, more, szx = first.block2
        assert (num, more, szx) == (0, True, 6) and len(first.payload) == 1024
        assert first.size2 == len(got.payload) and first.etag == b"\x01"
        raw.request(coap.GET, f"/shadow/dev-6?{t}", 2, b"b2",
                    options=[(coap.BLOCK2, coap.block_value(3, False, 4))])  # 256-byte blocks
        third = raw.recv()
        assert third.block2 == (3, True, 4)
        assert bytes(third.payload) == got.payload[768:1024]
    finally:
        raw.close()


def test_block1_out_of_order_or_too_large_is_refused(gateway_factory: Any) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-7")
    raw = RawCoap(gw.coap_port)
    try:
        block = [(coap.BLOCK1, coap.block_value(2, True, 4))]
        raw.request(coap.PUT, f"/shadow/dev-7?{t}", 1, options=block, payload=b"x" * 256)
        assert raw.recv().code == coap.REQUEST_ENTITY_INCOMPLETE
        big = [(coap.BLOCK1, coap.block_value(0, True, 6)), (coap.SIZE1, 10_000_000)]
        raw.request(coap.PUT, f"/shadow/dev-7?{t}", 2, options=big, payload=b"x" * 1024)
        answer = raw.recv()
        assert answer.code == coap.REQUEST_ENTITY_TOO_LARGE and answer.size1 == 64 << 10
        first = [(coap.BLOCK1, coap.block_value(0, True, 4))]
        raw.request(coap.PUT, f"/shadow/dev-7?{t}", 3, options=first, payload=b"{" * 256)
        answer = raw.recv()
        assert answer.code == coap.CONTINUE and answer.block1 == (0, True, 4)
    finally:
        raw.close()


def test_observe_delta_notifies_when_desired_changes(gateway_factory: Any) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-8")
    shadows = gw.gateway.shadows
    _on_gateway(gw, shadows.update("dev-8", {"state": {"reported": {"fan": "off"}}}))

    async def run(ctx: Any) -> tuple[Any, list[Any]]:
        msg = aiocoap.Message(code=aiocoap.GET, uri=f"{_base(gw)}/shadow/dev-8/delta?{t}",
                              observe=0)
        pr = ctx.request(msg)
        first = await asyncio.wait_for(pr.response, 10)
        notifications = pr.observation.__aiter__()
        # Reported only: the delta stays empty, so no notification; then desired changes.
        await _on_gateway_async(gw, shadows.update(
            "dev-8", {"state": {"reported": {"temp": 20}}}))
        await _on_gateway_async(gw, shadows.update(
            "dev-8", {"state": {"desired": {"fan": "on"}}}, writer="app-1"))
        got = [await asyncio.wait_for(notifications.__anext__(), 5)]
        await _on_gateway_async(gw, shadows.update(
            "dev-8", {"state": {"reported": {"fan": "on"}}}))
        got.append(await asyncio.wait_for(notifications.__anext__(), 5))
        pr.observation.cancel()
        return first, got

    first, got = _coap(run)
    assert first.code == aiocoap.CONTENT and first.opt.observe is not None
    assert json.loads(first.payload)["state"] == {}
    first_note, second_note = (json.loads(n.payload) for n in got)
    assert first_note["state"] == {"fan": "on"} and first_note["version"] == 3
    assert second_note["state"] == {} and second_note["version"] == 4
    assert got[0].opt.observe < got[1].opt.observe


def test_deleting_an_observed_shadow_ends_the_observation_with_not_found(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-9")
    _on_gateway(gw, gw.gateway.shadows.update("dev-9", {"state": {"reported": {"a": 1}}}))
    raw = RawCoap(gw.coap_port)
    try:
        raw.request(coap.GET, f"/shadow/dev-9?{t}", 1, b"ob", options=[(coap.OBSERVE, 0)])
        registered = raw.recv()
        assert registered.code == coap.CONTENT and registered.observe is not None
        _on_gateway(gw, gw.gateway.shadows.update("dev-9", {"state": {"reported": {"a": 2}}}))
        note = raw.recv()
        assert note.type == coap.NON and note.token == b"ob" and note.observe is not None
        assert note.observe > registered.observe
        _on_gateway(gw, gw.gateway.shadows.delete("dev-9"))
        end = raw.recv()
        assert end.code == coap.NOT_FOUND and end.observe is None
        assert gw.call(lambda: len(gw.gateway.coap.observers)) == 0
    finally:
        raw.close()


def test_delta_is_observable_before_the_shadow_exists_and_observe_1_deregisters(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-14")
    raw = RawCoap(gw.coap_port)
    try:
        raw.request(coap.GET, f"/shadow/dev-14/delta?{t}", 1, b"d", options=[(coap.OBSERVE, 0)])
        first = raw.recv()
        assert first.code == coap.CONTENT and first.observe is not None
        assert json.loads(bytes(first.payload))["state"] == {}
        _on_gateway(gw, gw.gateway.shadows.update("dev-14", {"state": {"desired": {"led": 1}}}))
        note = raw.recv()
        assert json.loads(bytes(note.payload))["state"] == {"led": 1} and note.token == b"d"
        raw.request(coap.GET, f"/shadow/dev-14/delta?{t}", 2, b"d", options=[(coap.OBSERVE, 1)])
        last = raw.recv()
        assert last.code == coap.CONTENT and last.observe is None
        assert gw.call(lambda: len(gw.gateway.coap.observers)) == 0
    finally:
        raw.close()


# ---- commands ----------------------------------------------------------------------------------


def test_mqtt_command_reaches_coap_observer_and_its_answer_reaches_mqtt(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory(acl="open", allow_anonymous=True)  # the MQTT application: anonymous
    t = _device(gw, "dev-10")
    app = PahoClient(gw.mqtt_port, "app", 5)
    try:
        app.subscribe("devices/dev-10/commands/+/response", 1)
        app.subscribe("app/replies", 1)

        async def run(ctx: Any) -> tuple[list[Any], list[Any]]:
            base = _base(gw)
            msg = aiocoap.Message(code=aiocoap.GET, uri=f"{base}/commands/dev-10?{t}", observe=0)
            pr = ctx.request(msg)
            first = await asyncio.wait_for(pr.response, 10)
            assert first.code == aiocoap.CONTENT and first.opt.observe is not None
            notifications = pr.observation.__aiter__()
            props = PahoProperties(PacketTypes.PUBLISH)
            props.ResponseTopic = "app/replies"
            props.CorrelationData = b"corr-1"
            app.publish("devices/dev-10/commands/reboot", b'{"delay":5}', 1, properties=props)
            app.publish("devices/dev-10/commands/blink", b"\xff\x00", 0)
            notes = [await asyncio.wait_for(notifications.__anext__(), 5) for _ in range(2)]
            answers = [
                await _request(ctx, aiocoap.POST, f"{base}/commands/dev-10/reboot?{t}",
                               b'{"status":"ok"}', content_format=50),
                await _request(ctx, aiocoap.POST, f"{base}/commands/dev-10/blink?{t}", b"done"),
            ]
            pr.observation.cancel()
            return notes, answers

        notes, answers = _coap(run)
        assert [json.loads(n.payload) for n in notes] == [
            {"name": "reboot", "payload": {"delay": 5}},
            {"name": "blink", "base64": "/wA="},
        ]
        assert notes[0].mtype == aiocoap.CON  # QoS 1: confirmable
        assert [a.code for a in answers] == [aiocoap.CHANGED, aiocoap.CHANGED]
        received = app.wait_messages(2)
        by_topic = {m.topic: m for m in received}
        reply = by_topic["app/replies"]  # the MQTT 5 response topic, with its correlation data
        assert reply.payload == b'{"status":"ok"}'
        assert reply.properties.CorrelationData == b"corr-1"
        assert by_topic["devices/dev-10/commands/blink/response"].payload == b"done"
    finally:
        app.close()


def test_rst_to_a_notification_and_an_unacknowledged_con_notification_end_observations(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory(acl="open", allow_anonymous=True)
    t = _device(gw, "dev-11")
    coap_ep = gw.gateway.coap
    # Short transmission parameters for this gateway: a CON gives up after ~0.1 + 0.2 s.
    gw.call(setattr, coap_ep.retransmitter, "timing", Timing(ack_timeout=0.1, max_retransmit=1))
    app = PahoClient(gw.mqtt_port, "app", 5)
    raw = RawCoap(gw.coap_port)
    try:
        raw.request(coap.GET, f"/commands/dev-11?{t}", 1, b"o1", options=[(coap.OBSERVE, 0)])
        assert raw.recv().observe is not None
        app.publish("devices/dev-11/commands/ping", b"{}", 0)
        note = raw.recv()
        assert note.type == coap.NON and note.token == b"o1"
        raw.send(coap.encode_empty(coap.RST, note.mid))  # "not interested any more"
        deadline = time.monotonic() + 5
        while gw.call(lambda: len(coap_ep.observers)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gw.call(lambda: len(coap_ep.observers)) == 0

        raw.request(coap.GET, f"/commands/dev-11?{t}", 2, b"o2", options=[(coap.OBSERVE, 0)])
        assert raw.recv().observe is not None
        app.publish("devices/dev-11/commands/ping", b"{}", 1)
        first = raw.recv()
        assert first.type == coap.CON
        again = raw.recv()  # not ACKed: retransmitted once, then the observer is dropped
        assert (again.mid, again.type) == (first.mid, coap.CON)
        deadline = time.monotonic() + 5
        while gw.call(lambda: len(coap_ep.observers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.call(lambda: len(coap_ep.observers)) == 0
        assert coap_ep.metrics.observers_dropped >= 1 or coap_ep.observers.dropped == 1
    finally:
        raw.close()
        app.close()


# ---- message layer -------------------------------------------------------------------------------


def test_duplicate_con_is_processed_once_and_answered_with_the_same_bytes(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-12")
    raw = RawCoap(gw.coap_port)
    try:
        data = raw.request(coap.POST, f"/telemetry/dev-12?{t}", 77, b"d1", payload=b"once")
        raw.send(data)  # while in progress: not processed again
        first = raw.recv_raw()
        assert first is not None
        assert raw.recv_raw(0.3) is None  # one answer for both copies so far
        raw.send(data)  # after the answer: the cached answer again
        second = raw.recv_raw()
        assert second == first
        answer = coap.decode(first)
        assert (answer.type, answer.code, answer.mid, answer.token) == (
            coap.ACK, coap.CHANGED, 77, b"d1")
    finally:
        raw.close()
    assert [r.payload for r in read_records(gw.gateway.data_dir / "telemetry")] == [b"once"]
    assert gw.gateway.coap.metrics.duplicates_con == 2
    assert b'iotgw_coap_duplicates_total{type="CON"} 2.0' in gw.gateway.metrics.render()


def test_format_errors_pings_and_bad_critical_options(gateway_factory: Any) -> None:
    gw = gateway_factory()
    t = _device(gw, "dev-13")
    raw = RawCoap(gw.coap_port)
    try:
        raw.send(bytes([0x49, 0x01, 0x12, 0x34]))  # CON GET with token length 9: reserved
        rst = raw.recv()
        assert (rst.type, rst.code, rst.mid) == (coap.RST, coap.EMPTY, 0x1234)
        raw.send(bytes([0x59, 0x01, 0x12, 0x35]))  # the same as NON: ignored
        raw.send(bytes([0x80, 0x01, 0x12, 0x36]))  # version 2: ignored
        raw.send(coap.encode_empty(coap.CON, 0x2222))  # a ping
        pong = raw.recv()
        assert (pong.type, pong.mid) == (coap.RST, 0x2222)  # the NON and v2 got nothing
        raw.request(coap.GET, f"/shadow/dev-13?{t}", 5, options=[(9, b"?")])  # critical, unknown
        bad = raw.recv()
        assert (bad.type, bad.code, bad.mid) == (coap.ACK, coap.BAD_OPTION, 5)
        raw.request(coap.GET, "/.well-known/core", 6, b"nn", type_=coap.NON)
        non = raw.recv()
        assert (non.type, non.code, non.token) == (coap.NON, coap.CONTENT, b"nn")
        assert non.content_format == coap.LINK_FORMAT and b'</shadow>;rt="iotgw.shadow"' in bytes(
            non.payload)
        raw.request(coap.GET, "/.well-known/core?rt=iotgw.commands", 7)
        assert bytes(raw.recv().payload).startswith(b"</commands>")
    finally:
        raw.close()
    assert gw.gateway.coap.metrics.format_errors == 3


# -- an endpoint on its own, with a telemetry sink the test releases ------------------------------


class HeldSink:
    """Writes complete only once `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.records: list[Record] = []

    async def write(self, records: list[Record]) -> None:
        await self.release.wait()
        self.records.extend(records)

    async def close(self) -> None:
        pass


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)

    async def recv(self, timeout: float = 2.0) -> bytes:
        return await asyncio.wait_for(self.received.get(), timeout)


async def _endpoint_and_peer(
    pipeline: TelemetryPipeline,
) -> tuple[CoapEndpoint, Peer]:
    endpoint = CoapEndpoint(
        shadows=None, pipeline=pipeline, broker=None, registry=None, allow_anonymous=True,
        limits=CoapLimits(sweep_interval=0.02, overload_max_age=7),
        timing=Timing(ack_timeout=0.2, separate_after=0.1),
    )
    port = await endpoint.start("127.0.0.1", 0)
    _, peer = await asyncio.get_running_loop().create_datagram_endpoint(
        Peer, remote_addr=("127.0.0.1", port))
    return endpoint, peer


def test_slow_durability_gets_an_empty_ack_then_a_con_response_retransmitted_until_acked(
) -> None:
    async def run() -> None:
        sink = HeldSink()
        endpoint, peer = await _endpoint_and_peer(TelemetryPipeline(sink))
        post = coap.encode_request(coap.CON, coap.POST, 100, b"s1", "/telemetry/dev-1", (), b"v")
        peer.transport.sendto(post)
        empty = coap.decode(await peer.recv())
        assert (empty.type, empty.code, empty.mid) == (coap.ACK, coap.EMPTY, 100)
        peer.transport.sendto(post)  # the duplicate gets the empty ACK again
        assert await peer.recv() == empty.encode()
        sink.release.set()
        first = await peer.recv()
        response = coap.decode(first)
        assert (response.type, response.code, response.token) == (coap.CON, coap.CHANGED, b"s1")
        assert await peer.recv() == first  # not ACKed: retransmitted, same bytes
        peer.transport.sendto(coap.encode_empty(coap.ACK, response.mid))
        with pytest.raises(TimeoutError):
            await peer.recv(1.0)  # acknowledged: no more retransmissions
        assert endpoint.metrics.separate_responses == 1
        assert endpoint.retransmitter.retransmissions >= 1
        assert [r.payload for r in sink.records] == [b"v"]
        await endpoint.stop()
        peer.transport.close()

    asyncio.run(run())


def test_telemetry_over_high_water_gets_service_unavailable_with_max_age() -> None:
    async def run() -> None:
        sink = HeldSink()
        endpoint, peer = await _endpoint_and_peer(TelemetryPipeline(sink, high_water=1))
        for mid in (1, 2):
            peer.transport.sendto(coap.encode_request(
                coap.NON, coap.POST, mid, b"h%d" % mid, "/telemetry/dev-1", (), b"v"))
        busy = coap.decode(await peer.recv())
        assert (busy.type, busy.code, busy.token) == (coap.NON, coap.SERVICE_UNAVAILABLE, b"h2")
        assert busy.max_age == 7
        sink.release.set()
        done = coap.decode(await peer.recv())
        assert (done.type, done.code, done.token) == (coap.NON, coap.CHANGED, b"h1")
        assert endpoint.metrics.overloaded == 1
        await endpoint.stop()
        peer.transport.close()

    asyncio.run(run())


# ---- the bounded structures on their own ---------------------------------------------------------


def test_dedup_cache_is_bounded_and_sheds_the_oldest_exchange() -> None:
    dedup = Deduplicator(Timing(), max_entries=2, max_bytes=1 << 20)
    for mid in (1, 2, 3):
        dedup.add(("h", 1), mid, coap.CON, b"", float(mid))
    assert dedup.get((("h", 1), 1), 3.0) is None and dedup.shed == 1
    assert dedup.get((("h", 1), 3), 3.0) is not None
    assert dedup.get((("h", 1), 3), 3.0 + 247.0) is None  # past its lifetime
    dedup.expire(3.0 + 247.0)
    assert len(dedup) == 0


def test_block1_reassembly_checks_order_and_size_and_expires() -> None:
    blocks = Block1Assembler(max_body=2048, max_transfers=4, lifetime=60.0)
    key = ("peer", "path")
    assert blocks.feed(key, (0, True, 6), b"a" * 1024, None, 0.0) == (CONTINUE, None)
    assert blocks.feed(key, (2, True, 6), b"c" * 1024, None, 1.0)[0] == INCOMPLETE
    assert blocks.feed(key, (1, False, 6), b"b" * 10, None, 1.0) == (
        COMPLETE, b"a" * 1024 + b"b" * 10)
    assert blocks.feed(key, (0, True, 6), b"a" * 1024, 4096, 2.0)[0] == TOO_LARGE
    blocks.feed(key, (0, True, 6), b"a" * 1024, None, 3.0)
    blocks.expire(62.0)
    assert len(blocks) == 1
    blocks.expire(63.0)
    assert len(blocks) == 0


def test_block2_slices_and_refuses_a_block_past_the_end() -> None:
    payload = bytes(range(256)) * 5  # 1280 bytes
    opts, chunk = block2_slice([], payload, None) or ([], b"")
    assert chunk == payload[:1024] and (coap.BLOCK2, coap.block_value(0, True, 6)) in opts
    assert (coap.SIZE2, 1280) in opts
    last = block2_slice([], payload, (1, False, 6))
    assert last is not None and last[1] == payload[1024:]
    assert block2_slice([], payload, (2, False, 6)) is None
