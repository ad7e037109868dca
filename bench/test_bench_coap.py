"""CoAP codec: ours (gateway._native.coap) side by side with aiocoap on the same datagrams.

    .venv/bin/pytest bench/test_bench_coap.py --benchmark-only

Two datagrams: a telemetry CON POST /telemetry/dev-42?t=token123 (Content-Format 50, 64-byte
payload) and the 2.04 ACK that answers it (2-byte token). Each group times ours and aiocoap on
identical bytes; under --benchmark-disable every case runs once, as a test.
"""

from __future__ import annotations

from typing import Any

import aiocoap
import pytest

from gateway._native import coap

MID = 0x1234
POST_TOKEN = b"\xa1\xb2\xc3\xd4"
ACK_TOKEN = b"\x51\x52"
PAYLOAD = bytes(range(64))
POST_OPTIONS = [
    (coap.URI_PATH, "telemetry"),
    (coap.URI_PATH, "dev-42"),
    (coap.CONTENT_FORMAT, coap.JSON),
    (coap.URI_QUERY, "t=token123"),
]


def _aiocoap_post() -> aiocoap.Message:
    return aiocoap.Message(
        code=aiocoap.POST,
        _mid=MID,
        _mtype=aiocoap.CON,
        _token=POST_TOKEN,
        uri_path=("telemetry", "dev-42"),
        uri_query=("t=token123",),
        content_format=50,
        payload=PAYLOAD,
    )


def _aiocoap_ack() -> aiocoap.Message:
    return aiocoap.Message(code=aiocoap.CHANGED, _mid=MID, _mtype=aiocoap.ACK, _token=ACK_TOKEN)


POST = coap.encode(coap.CON, coap.POST, MID, POST_TOKEN, POST_OPTIONS, PAYLOAD)
ACK = coap.encode(coap.ACK, coap.CHANGED, MID, ACK_TOKEN)
DATAGRAMS = {"post": POST, "ack": ACK}

# Warm up and use rounds of at least 20 us, so that calibration does not settle on a single
# call per round (a cold first call would do that) and the timer's own cost is amortized.
pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=20000, min_time=20e-6)


def test_both_codecs_see_the_same_bytes() -> None:
    assert _aiocoap_post().encode() == POST
    assert _aiocoap_ack().encode() == ACK


# ---- decode --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["post", "ack"])
@pytest.mark.parametrize("codec", ["ours", "aiocoap"])
def test_decode(benchmark: Any, kind: str, codec: str) -> None:
    benchmark.group = f"coap decode {kind}"
    data = DATAGRAMS[kind]
    decode = coap.decode if codec == "ours" else aiocoap.Message.decode
    msg = benchmark(decode, data)
    assert msg.mid == MID


def test_decode_read_ours(benchmark: Any) -> None:
    benchmark.group = "coap decode post + read path and payload"

    def run() -> tuple[str, Any]:
        msg = coap.decode(POST)
        return msg.path, msg.payload

    path, payload = benchmark(run)
    assert (path, bytes(payload)) == ("/telemetry/dev-42", PAYLOAD)


def test_decode_read_aiocoap(benchmark: Any) -> None:
    benchmark.group = "coap decode post + read path and payload"

    def run() -> tuple[str, Any]:
        msg = aiocoap.Message.decode(POST)
        return "/" + "/".join(msg.opt.uri_path), msg.payload

    path, payload = benchmark(run)
    assert (path, bytes(payload)) == ("/telemetry/dev-42", PAYLOAD)


# ---- encode --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["post", "ack"])
def test_encode_ours_prebuilt_message(benchmark: Any, kind: str) -> None:
    benchmark.group = f"coap encode {kind}"
    if kind == "post":
        msg = coap.Message(coap.CON, coap.POST, MID, POST_TOKEN, POST_OPTIONS, PAYLOAD)
    else:
        msg = coap.Message(coap.ACK, coap.CHANGED, MID, ACK_TOKEN)
    assert benchmark(msg.encode) == DATAGRAMS[kind]


@pytest.mark.parametrize("kind", ["post", "ack"])
def test_encode_ours_module_function(benchmark: Any, kind: str) -> None:
    benchmark.group = f"coap encode {kind}"
    if kind == "post":
        args: tuple[Any, ...] = (coap.CON, coap.POST, MID, POST_TOKEN, POST_OPTIONS, PAYLOAD)
    else:
        args = (coap.ACK, coap.CHANGED, MID, ACK_TOKEN, (), b"")
    assert benchmark(coap.encode, *args) == DATAGRAMS[kind]


@pytest.mark.parametrize("kind", ["post", "ack"])
def test_encode_aiocoap_prebuilt_message(benchmark: Any, kind: str) -> None:
    benchmark.group = f"coap encode {kind}"
    msg = _aiocoap_post() if kind == "post" else _aiocoap_ack()
    assert benchmark(msg.encode) == DATAGRAMS[kind]
