"""The native CoAP codec (gateway._native.coap): RFC vectors, round trips, a Python model of
RFC 7252's message format, differential checks against aiocoap, malformed datagrams, and a
short atheris run."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap import optiontypes
from aiocoap.numbers.optionnumbers import OptionNumber
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway._native import coap

ROOT = Path(__file__).resolve().parent.parent

# ---- an independent Python model of the format (RFC 7252 3, 5.4, 5.10; 7641; 7959; 7967) --

# number: (shortest, longest, format, repeatable)
SPECS: dict[int, tuple[int, int, str, bool]] = {
    1: (0, 8, "opaque", True),
    3: (1, 255, "string", False),
    4: (1, 8, "opaque", True),
    5: (0, 0, "empty", False),
    6: (0, 3, "uint", False),
    7: (0, 2, "uint", False),
    8: (0, 255, "string", True),
    11: (0, 255, "string", True),
    12: (0, 2, "uint", False),
    14: (0, 4, "uint", False),
    15: (0, 255, "string", True),
    17: (0, 2, "uint", False),
    20: (0, 255, "string", True),
    23: (0, 3, "block", False),
    27: (0, 3, "block", False),
    28: (0, 4, "uint", False),
    35: (1, 1034, "string", False),
    39: (1, 255, "string", False),
    60: (0, 4, "uint", False),
    258: (0, 1, "uint", False),
}
MAX_LEN = 65804  # the longest value the option length field can express


class ModelFormatError(Exception):
    def __init__(self, mid: int | None, type_: int | None) -> None:
        super().__init__(mid, type_)
        self.mid, self.type = mid, type_


def raw_options(options: list[tuple[int, bytes]]) -> bytes:
    """Options (already in order) in wire form, written by the model, not by the codec."""
    out = bytearray()
    prev = 0
    for number, value in options:
        fields = []
        for v in (number - prev, len(value)):
            if v < 13:
                fields.append((v, b""))
            elif v < 269:
                fields.append((13, bytes([v - 13])))
            else:
                fields.append((14, (v - 269).to_bytes(2, "big")))
        out.append(fields[0][0] << 4 | fields[1][0])
        out += fields[0][1] + fields[1][1] + value
        prev = number
    return bytes(out)


def datagram(
    type_: int,
    code: int,
    mid: int,
    token: bytes = b"",
    options: list[tuple[int, bytes]] | None = None,
    payload: bytes = b"",
) -> bytes:
    head = bytes([0x40 | type_ << 4 | len(token), code]) + mid.to_bytes(2, "big") + token
    return head + raw_options(options or []) + (b"\xff" + payload if payload else b"")


def _is_bad(number: int, prev: int | None, value: bytes) -> bool:
    spec = SPECS.get(number)
    if spec is None:
        return True
    lo, hi, fmt, repeatable = spec
    if not lo <= len(value) <= hi or (number == prev and not repeatable):
        return True
    if fmt == "string":
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return True
    return fmt == "block" and bool(value) and value[-1] & 7 == 7


def model_decode(data: bytes) -> dict[str, Any]:
    """What decode() must give for data, as comparable fields; ModelFormatError otherwise."""
    if len(data) < 4 or data[0] >> 6 != 1:
        raise ModelFormatError(None, None)
    type_, tkl, code, mid = data[0] >> 4 & 3, data[0] & 15, data[1], (data[2] << 8) | data[3]
    fail = ModelFormatError(mid, type_)
    if tkl > 8 or code >> 5 in (1, 6, 7) or (code == 0 and len(data) > 4):
        raise fail
    if len(data) < 4 + tkl:
        raise fail
    pos, number, options, payload = 4 + tkl, 0, [], b""
    while pos < len(data):
        if data[pos] == 0xFF:
            if pos + 1 == len(data):
                raise fail
            payload = data[pos + 1 :]
            break
        nibbles = [data[pos] >> 4, data[pos] & 15]
        pos += 1
        for i, nib in enumerate(nibbles):
            if nib == 13:
                if pos + 1 > len(data):
                    raise fail
                nibbles[i] = data[pos] + 13
                pos += 1
            elif nib == 14:
                if pos + 2 > len(data):
                    raise fail
                nibbles[i] = int.from_bytes(data[pos : pos + 2], "big") + 269
                pos += 2
            elif nib == 15:
                raise fail
        number += nibbles[0]
        if number > 65535 or pos + nibbles[1] > len(data):
            raise fail
        options.append((number, data[pos : pos + nibbles[1]]))
        pos += nibbles[1]
    good, bad_critical, prev = [], [], None
    for number, value in options:
        if _is_bad(number, prev, value):
            if number & 1 and number not in bad_critical:
                bad_critical.append(number)
        else:
            good.append((number, value))
        prev = number
    return {
        "type": type_,
        "code": code,
        "mid": mid,
        "token": data[4 : 4 + tkl],
        "options": options,
        "payload": payload,
        "bad_critical": tuple(bad_critical),
        **model_getters(good),
    }


def model_getters(good: list[tuple[int, bytes]]) -> dict[str, Any]:
    """The typed getters from the good options alone."""

    def all_(n: int) -> list[bytes]:
        return [v for k, v in good if k == n]

    def first(n: int) -> bytes | None:
        values = all_(n)
        return values[0] if values else None

    def uint(n: int) -> int | None:
        v = first(n)
        return None if v is None else int.from_bytes(v, "big")

    def text(n: int) -> str | None:
        v = first(n)
        return None if v is None else v.decode()

    def block(n: int) -> tuple[int, bool, int] | None:
        v = uint(n)
        return None if v is None else (v >> 4, bool(v & 8), v & 7)

    return {
        "uri_host": text(3),
        "uri_port": uint(7),
        "uri_path": [v.decode() for v in all_(11)],
        "uri_query": [v.decode() for v in all_(15)],
        "path": "/" + "/".join(v.decode() for v in all_(11)),
        "location_path": [v.decode() for v in all_(8)],
        "location_query": [v.decode() for v in all_(20)],
        "content_format": uint(12),
        "accept": uint(17),
        "max_age": uint(14),
        "observe": uint(6),
        "etag": first(4),
        "etags": all_(4),
        "if_match": all_(1),
        "if_none_match": first(5) is not None,
        "block1": block(27),
        "block2": block(23),
        "size1": uint(60),
        "size2": uint(28),
        "proxy_uri": text(35),
        "proxy_scheme": text(39),
        "no_response": uint(258),
    }


GETTERS = list(model_getters([]))


def fields(msg: coap.Message) -> dict[str, Any]:
    """Every field and getter of a Message, comparable to model_decode()."""
    out: dict[str, Any] = {
        "type": msg.type,
        "code": msg.code,
        "mid": msg.mid,
        "token": msg.token,
        "options": msg.options,
        "payload": bytes(msg.payload),
        "bad_critical": msg.bad_critical,
    }
    out.update({name: getattr(msg, name) for name in GETTERS})
    return out


def check_against_model(data: bytes) -> coap.Message | None:
    """decode(data) agrees with the model; a decoded datagram re-encodes to itself (the wire
    form is canonical: extended fields cannot encode small values)."""
    try:
        expected = model_decode(data)
    except ModelFormatError as exc:
        with pytest.raises(coap.CoapFormatError) as info:
            coap.decode(data)
        assert (info.value.mid, info.value.type) == (exc.mid, exc.type)
        return None
    msg = coap.decode(data)
    assert fields(msg) == expected
    assert msg.encode() == data
    return msg


# ---- RFC vectors ---------------------------------------------------------------------------

TEMPERATURE = b"temperature"


def test_rfc7252_figure16_get_and_piggybacked_response() -> None:
    # CON GET MID=0x7d34, Uri-Path "temperature"; ACK 2.05 MID=0x7d34, Payload "22.3 C".
    req = coap.decode(bytes.fromhex("40017d34bb") + TEMPERATURE)
    assert (req.type, req.code, req.mid, req.token) == (coap.CON, coap.GET, 0x7D34, b"")
    assert req.uri_path == ["temperature"] and req.path == "/temperature"
    assert req.payload == b"" and req.is_request and not req.is_response
    resp = coap.decode(bytes.fromhex("60457d34ff") + b"22.3 C")
    assert (resp.type, resp.code, resp.mid) == (coap.ACK, coap.CONTENT, 0x7D34)
    assert bytes(resp.payload) == b"22.3 C" and resp.options == [] and resp.is_response


def test_rfc7252_figure18_token_and_separate_response() -> None:
    # CON GET MID=0x7d38 Token 0x53; empty ACK; CON 2.05 MID=0xad7b Token 0x53; empty ACK.
    req = coap.decode(bytes.fromhex("41017d3853bb") + TEMPERATURE)
    assert (req.mid, req.token, req.uri_path) == (0x7D38, b"\x53", ["temperature"])
    ack = coap.decode(bytes.fromhex("60007d38"))
    assert (ack.type, ack.code, ack.mid, ack.is_empty) == (coap.ACK, coap.EMPTY, 0x7D38, True)
    assert coap.encode_empty(coap.ACK, 0x7D38) == bytes.fromhex("60007d38")
    resp = coap.decode(bytes.fromhex("4145ad7b53ff") + b"22.3 C")
    assert (resp.type, resp.code, resp.mid, resp.token) == (coap.CON, 69, 0xAD7B, b"\x53")
    assert coap.encode_empty(coap.ACK, 0xAD7B) == bytes.fromhex("6000ad7b")


def test_rfc7252_non_request_and_ping_reset() -> None:
    req = coap.decode(bytes.fromhex("51017d4075bb") + TEMPERATURE)
    assert (req.type, req.mid, req.token) == (coap.NON, 0x7D40, b"\x75")
    ping = coap.decode(bytes.fromhex("40001234"))
    assert (ping.type, ping.is_empty, ping.is_request) == (coap.CON, True, False)
    assert coap.encode_empty(coap.RST, 0x1234) == bytes.fromhex("70001234")


def test_rfc7641_observe_registration_and_notification() -> None:
    # GET /temperature, Token 0x4a, Observe: 0 (an empty uint); 2.05, Observe: 12, "22.9 Cel".
    req = coap.decode(bytes.fromhex("410112344a605b") + TEMPERATURE)
    assert (req.observe, req.uri_path, req.token) == (0, ["temperature"], b"\x4a")
    note = coap.decode(bytes.fromhex("614512354a610cff") + b"22.9 Cel")
    assert (note.observe, bytes(note.payload)) == (12, b"22.9 Cel")


def test_rfc7959_block2_get_exchange() -> None:
    # CON GET /status; ACK 2.05 2:0/1/128; ... CON GET /status 2:2/0/128; ACK 2.05 2:2/0/128.
    first = coap.decode(bytes.fromhex("604504d2d10a0b") + b"\xff" + bytes(128))
    assert first.block2 == (0, True, 3) and coap.block_size(3) == 128
    assert first.options == [(23, b"\x0b")]
    last = coap.decode(bytes.fromhex("400104d4b6") + b"status" + bytes.fromhex("c123"))
    assert (last.path, last.block2) == ("/status", (2, False, 3))
    assert coap.block_value(2, False, 3) == 0x23 and coap.block_value(0, True, 3) == 0x0B


def test_rfc7959_block1_put_with_size1() -> None:
    # CON PUT /options 1:0/1/128 Size1 1280; ACK 2.31 Continue 1:0/1/128.
    put = datagram(
        0, coap.PUT, 1234, b"", [(11, b"options"), (27, b"\x0b"), (60, b"\x05\x00")], bytes(128)
    )
    msg = coap.decode(put)
    assert (msg.block1, msg.size1, msg.path) == ((0, True, 3), 1280, "/options")
    cont = coap.decode(datagram(2, coap.CONTINUE, 1234, b"", [(27, b"\x0b")]))
    assert (coap.code_str(cont.code), cont.block1) == ("2.31", (0, True, 3))


def test_extended_option_deltas_and_lengths() -> None:
    # No-Response (258): delta 258 = 13 + 245; option 1300: delta 1042 = 269 + 0x0305.
    data = bytes.fromhex("50020001d1f51ae0 0305".replace(" ", ""))
    msg = coap.decode(data)
    assert msg.options == [(258, b"\x1a"), (1300, b"")] and msg.no_response == 26
    assert msg.bad_critical == ()  # 1300 is elective: ignored
    # Option 2050 with 512 bytes: delta 2050 = 269 + 0x06f5, length 512 = 269 + 0x00f3.
    long_value = bytes(range(256)) * 2
    data = datagram(0, coap.GET, 1, b"", [(2050, long_value), (2050, b"x" * 13)])
    assert data[4:9] == bytes.fromhex("ee06f500f3")
    assert data[9 + 512 : 11 + 512] == b"\x0d\x00"  # same number again, length 13 + 0
    assert coap.decode(data).get_options(2050) == [long_value, b"x" * 13]


def test_every_getter_on_a_full_request() -> None:
    opts = [
        (coap.IF_MATCH, b"\x01"),
        (coap.IF_MATCH, b""),
        (coap.URI_HOST, "example.net"),
        (coap.ETAG, b"e1"),
        (coap.ETAG, b"e2"),
        (coap.IF_NONE_MATCH, b""),
        (coap.OBSERVE, 0x010203),
        (coap.URI_PORT, 5683),
        (coap.LOCATION_PATH, "loc"),
        (coap.URI_PATH, "ünï"),
        (coap.URI_PATH, ""),
        (coap.CONTENT_FORMAT, coap.CBOR),
        (coap.MAX_AGE, 0xFFFFFFFF),
        (coap.URI_QUERY, "a=1"),
        (coap.ACCEPT, coap.JSON),
        (coap.LOCATION_QUERY, "q"),
        (coap.BLOCK2, coap.block_value(0xFFFFF, True, 6)),
        (coap.BLOCK1, coap.block_value(5, False, 0)),
        (coap.SIZE2, 7),
        (coap.PROXY_URI, "coap://x/" + "p" * 1025),
        (coap.PROXY_SCHEME, "coap"),
        (coap.SIZE1, 0),
        (coap.NO_RESPONSE, 2),
    ]
    msg = coap.decode(coap.encode(coap.CON, coap.FETCH, 7, b"tok", opts[::-1], b"p"))
    assert msg.if_match == [b"", b"\x01"]  # stable sort of the reversed list
    assert (msg.uri_host, msg.uri_port, msg.etag, msg.etags) == (
        "example.net",
        5683,
        b"e2",
        [b"e2", b"e1"],
    )
    assert (msg.if_none_match, msg.observe, msg.location_path) == (True, 0x010203, ["loc"])
    assert (msg.uri_path, msg.path, msg.uri_query) == (["", "ünï"], "//ünï", ["a=1"])
    assert (msg.content_format, msg.max_age, msg.accept) == (60, 0xFFFFFFFF, 50)
    assert (msg.block2, msg.block1) == ((0xFFFFF, True, 6), (5, False, 0))
    assert (msg.size1, msg.size2, msg.no_response) == (0, 7, 2)
    assert msg.proxy_uri == "coap://x/" + "p" * 1025 and msg.proxy_scheme == "coap"
    assert msg.location_query == ["q"] and msg.bad_critical == ()
    empty = coap.decode(coap.encode(coap.NON, coap.GET, 1))
    assert model_getters([]) == {name: getattr(empty, name) for name in GETTERS}


# ---- building and encoding -----------------------------------------------------------------


def test_message_and_module_encode_give_the_same_datagram() -> None:
    opts = [(coap.URI_QUERY, "b"), (coap.URI_PATH, "x"), (coap.URI_QUERY, b"a"), (2049, 7)]
    built = coap.Message(coap.CON, coap.POST, 0xBEEF, b"tk", opts, b"payload")
    data = coap.encode(coap.CON, coap.POST, 0xBEEF, b"tk", opts, b"payload")
    assert built.encode() == data
    assert built.options == [(11, b"x"), (15, b"b"), (15, b"a"), (2049, b"\x07")]
    assert built.uri_query == ["b", "a"] and built.bad_critical == (2049,)
    assert (built.token, built.payload) == (b"tk", b"payload")
    assert fields(coap.decode(data)) == fields(built)


def test_encode_accepts_any_bytes_like_and_iterables() -> None:
    opts = iter([[coap.ETAG, bytearray(b"ab")], (coap.IF_MATCH, memoryview(b"cd"))])
    data = coap.encode(coap.ACK, coap.CONTENT, 1, bytearray(b"t"), opts, memoryview(b"xy"))
    msg = coap.decode(data)
    assert msg.options == [(1, b"cd"), (4, b"ab")] and bytes(msg.payload) == b"xy"
    assert coap.Message(coap.ACK, coap.VALID, payload=bytearray(b"z")).encode()[-2:] == b"\xffz"


def test_encode_request_splits_path_and_query() -> None:
    msg = coap.decode(
        coap.encode_request(
            coap.CON,
            coap.POST,
            1,
            b"t",
            "/telemetry/d1?t=x&y",
            [(coap.CONTENT_FORMAT, coap.JSON)],
            b"{}",
        )
    )
    assert (msg.uri_path, msg.uri_query, msg.content_format) == (
        ["telemetry", "d1"],
        ["t=x", "y"],
        50,
    )
    assert coap.decode(coap.encode_request(0, 1, 1, b"", "a/b")).path == "/a/b"
    assert coap.decode(coap.encode_request(0, 1, 1, b"", "/")).uri_path == []


def test_uint_values_are_minimal() -> None:
    msg = coap.decode(
        coap.encode(0, 1, 1, b"", [(coap.OBSERVE, 0), (coap.URI_PORT, 255), (coap.MAX_AGE, 256)])
    )
    assert msg.options == [(6, b""), (7, b"\xff"), (14, b"\x01\x00")]
    # A receiver must accept leading zeros (RFC 7252 3.2).
    assert coap.decode(datagram(0, 1, 1, b"", [(12, b"\x00\x32")])).content_format == 50


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"token": bytes(9)}, ValueError),
        ({"mid": 65536}, ValueError),
        ({"mid": -1}, ValueError),
        ({"mid": 2**80}, ValueError),
        ({"code": 256}, ValueError),
        ({"type": 4}, ValueError),
        ({"options": [(-1, b"")]}, ValueError),
        ({"options": [(65536, b"")]}, ValueError),
        ({"options": [(coap.URI_HOST, "")]}, ValueError),
        ({"options": [(coap.URI_PATH, "x" * 256)]}, ValueError),
        ({"options": [(coap.PROXY_URI, "x" * 1035)]}, ValueError),
        ({"options": [(coap.ETAG, b"")]}, ValueError),
        ({"options": [(coap.IF_MATCH, bytes(9))]}, ValueError),
        ({"options": [(coap.IF_NONE_MATCH, b"x")]}, ValueError),
        ({"options": [(coap.CONTENT_FORMAT, 65536)]}, ValueError),
        ({"options": [(coap.OBSERVE, 2**24)]}, ValueError),
        ({"options": [(coap.NO_RESPONSE, 256)]}, ValueError),
        ({"options": [(2048, -1)]}, ValueError),
        ({"options": [(2048, 2**64)]}, ValueError),
        ({"options": [(2048, bytes(MAX_LEN + 1))]}, ValueError),
        ({"options": [(coap.URI_PATH, "\ud800")]}, ValueError),
        ({"options": [(2048, 1.5)]}, TypeError),
        ({"options": [(2048,)]}, ValueError),
        ({"options": [(1.0, b"")]}, TypeError),
        ({"payload": "text"}, TypeError),
        ({"token": "t"}, TypeError),
    ],
)
def test_encode_rejects_out_of_range_fields(kwargs: dict[str, Any], error: type) -> None:
    args = {"type": coap.CON, "code": coap.GET, "mid": 1, **kwargs}
    with pytest.raises(error):
        coap.encode(**args)
    with pytest.raises(error):
        coap.Message(**args)


def test_encode_accepts_the_longest_values() -> None:
    opts = [(coap.PROXY_URI, "x" * 1034), (2048, bytes(MAX_LEN)), (coap.ETAG, bytes(8))]
    msg = coap.decode(coap.encode(coap.CON, coap.GET, 65535, bytes(8), opts, bytes(70000)))
    assert [len(v) for _, v in msg.options] == [8, 1034, MAX_LEN] and msg.mid == 65535
    assert len(msg.payload) == 70000 and msg.token == bytes(8)


def test_helpers() -> None:
    assert [coap.code_str(c) for c in (0, 1, 69, 95, 132, 165)] == [
        "0.00",
        "0.01",
        "2.05",
        "2.31",
        "4.04",
        "5.05",
    ]
    assert (coap.CONFLICT, coap.UNPROCESSABLE_ENTITY, coap.IPATCH) == (137, 150, 7)
    assert [coap.block_size(s) for s in range(7)] == [16, 32, 64, 128, 256, 512, 1024]
    assert coap.block_value(1, True, 6) == 0x1E
    for bad in (
        lambda: coap.block_size(7),
        lambda: coap.block_value(2**20, False, 0),
        lambda: coap.block_value(0, False, 7),
        lambda: coap.code_str(256),
    ):
        with pytest.raises(ValueError):
            bad()
    assert coap.encode_empty(coap.CON, 0) == b"\x40\x00\x00\x00"
    with pytest.raises(ValueError):
        coap.encode_empty(coap.ACK, 65536)


def test_codes_and_numbers_match_aiocoap() -> None:
    for name in (
        "GET",
        "POST",
        "PUT",
        "DELETE",
        "FETCH",
        "PATCH",
        "IPATCH",
        "CONTENT",
        "CHANGED",
        "CONTINUE",
        "BAD_OPTION",
        "CONFLICT",
        "UNPROCESSABLE_ENTITY",
        "REQUEST_ENTITY_INCOMPLETE",
        "PROXYING_NOT_SUPPORTED",
    ):
        theirs = "iPATCH" if name == "IPATCH" else name
        assert getattr(coap, name) == int(getattr(aiocoap.numbers.codes.Code, theirs)), name
    for name in (
        "IF_MATCH",
        "OBSERVE",
        "URI_PATH",
        "BLOCK1",
        "BLOCK2",
        "SIZE1",
        "SIZE2",
        "PROXY_SCHEME",
        "NO_RESPONSE",
        "LOCATION_QUERY",
    ):
        assert getattr(coap, name) == int(getattr(OptionNumber, name)), name


# ---- zero copy -----------------------------------------------------------------------------


def test_payload_is_a_view_of_the_datagram() -> None:
    buf = bytearray(coap.encode(coap.NON, coap.POST, 1, b"", [], b"abc"))
    msg = coap.decode(buf)
    view = msg.payload
    assert isinstance(view, memoryview) and view.readonly
    buf[-1] = ord("z")
    assert bytes(view) == b"abz"
    with pytest.raises(BufferError):
        buf.extend(b"!")  # pinned while the message or its payload is alive
    del msg
    with pytest.raises(BufferError):
        buf.extend(b"!")
    del view
    buf.extend(b"!")


def test_decode_accepts_memoryview_slices_and_other_buffers() -> None:
    import array

    data = coap.encode(coap.CON, coap.PUT, 9, b"", [(coap.URI_PATH, "a")], b"\x80\xff")
    framed = memoryview(b"junk" + data + b"junk")[4:-4]
    assert fields(coap.decode(framed)) == fields(coap.decode(data))
    for other in (array.array("B", data), memoryview(data).cast("c")):
        payload = coap.decode(other).payload
        assert isinstance(payload, memoryview) and payload.format == "B"
        assert payload == b"\x80\xff"
    with pytest.raises(TypeError):
        coap.decode("text")  # type: ignore[arg-type]


def test_many_options_outgrow_the_inline_table() -> None:
    opts = [(coap.URI_PATH, str(i)) for i in range(200)] + [(coap.URI_QUERY, "q")]
    msg = coap.decode(coap.encode(coap.CON, coap.GET, 1, b"", opts))
    assert msg.uri_path == [str(i) for i in range(200)] and msg.uri_query == ["q"]
    assert len(msg.options) == 201


# ---- malformed datagrams -------------------------------------------------------------------

HDR = bytes.fromhex("4002abcd")  # CON POST mid 0xabcd


@pytest.mark.parametrize(
    ("data", "mid", "type_"),
    [
        pytest.param(b"", None, None, id="empty"),
        pytest.param(b"\x40\x01\x12", None, None, id="3-bytes"),
        pytest.param(b"\x00\x01\x12\x34", None, None, id="version-0"),
        pytest.param(b"\x80\x01\x12\x34", None, None, id="version-2"),
        pytest.param(b"\xc0\x01\x12\x34", None, None, id="version-3"),
        pytest.param(b"\x49\x01\x12\x34" + bytes(9), 0x1234, 0, id="tkl-9"),
        pytest.param(b"\x5f\x01\x12\x34" + bytes(15), 0x1234, 1, id="tkl-15"),
        pytest.param(b"\x44\x01\x12\x34ab", 0x1234, 0, id="truncated-token"),
        pytest.param(b"\x40\x20\x12\x34", 0x1234, 0, id="class-1"),
        pytest.param(b"\x60\xc5\x12\x34", 0x1234, 2, id="class-6"),
        pytest.param(b"\x70\xff\x12\x34", 0x1234, 3, id="class-7"),
        pytest.param(b"\x41\x00\x12\x34t", 0x1234, 0, id="empty-with-token"),
        pytest.param(b"\x41\x00\x12\x34", 0x1234, 0, id="empty-with-tkl-only"),
        pytest.param(b"\x60\x00\x12\x34\xffx", 0x1234, 2, id="empty-with-payload"),
        pytest.param(b"\x70\x00\x12\x34\xb0", 0x1234, 3, id="empty-with-option"),
        pytest.param(HDR + b"\xff", 0xABCD, 0, id="marker-without-payload"),
        pytest.param(HDR + b"\xb1a\xff", 0xABCD, 0, id="marker-without-payload-after-option"),
        pytest.param(HDR + b"\xf0", 0xABCD, 0, id="delta-15"),
        pytest.param(HDR + b"\xf3abc", 0xABCD, 0, id="delta-15-len-3"),
        pytest.param(HDR + b"\x1f", 0xABCD, 0, id="length-15"),
        pytest.param(HDR + b"\xbfa", 0xABCD, 0, id="length-15-after-delta"),
        pytest.param(HDR + b"\xd0", 0xABCD, 0, id="truncated-delta-13"),
        pytest.param(HDR + b"\xe0\x01", 0xABCD, 0, id="truncated-delta-14"),
        pytest.param(HDR + b"\x1d", 0xABCD, 0, id="truncated-length-13"),
        pytest.param(HDR + b"\x1e\x00", 0xABCD, 0, id="truncated-length-14"),
        pytest.param(HDR + b"\xd3\x01ab", 0xABCD, 0, id="truncated-value"),
        pytest.param(HDR + b"\x1e\xff\xff", 0xABCD, 0, id="truncated-longest-value"),
        pytest.param(HDR + b"\xe0\xfe\xf3\xe0\x00\x01", 0xABCD, 0, id="number-above-65535"),
    ],
)
def test_format_errors(data: bytes, mid: int | None, type_: int | None) -> None:
    with pytest.raises(coap.CoapFormatError) as info:
        coap.decode(data)
    assert (info.value.mid, info.value.type) == (mid, type_)
    assert isinstance(info.value, coap.CoapError) and isinstance(info.value, ValueError)
    check_against_model(data)


def test_highest_option_number_decodes() -> None:
    # 269 + 0xfde5 = 65266, then 65266 + 269 = 65535
    msg = coap.decode(HDR + b"\xe0\xfd\xe5\xe0\x00\x00")
    assert msg.options == [(65266, b""), (65535, b"")] and msg.bad_critical == (65535,)


@pytest.mark.parametrize(
    ("options", "bad_critical", "getter", "value"),
    [
        # unrecognized (5.4.1)
        pytest.param([(9, b"x")], (9,), None, None, id="unknown-critical-9"),
        pytest.param([(2049, b"")], (2049,), None, None, id="unknown-critical-2049"),
        pytest.param([(16, b"\x01")], (), None, None, id="unknown-elective"),
        # value length out of range (5.4.3)
        pytest.param([(3, b"")], (3,), "uri_host", None, id="uri-host-empty"),
        pytest.param([(1, bytes(9))], (1,), "if_match", [], id="if-match-9"),
        pytest.param([(5, b"x")], (5,), "if_none_match", False, id="if-none-match-1"),
        pytest.param([(7, b"\x01\x02\x03")], (7,), "uri_port", None, id="uri-port-3"),
        pytest.param([(11, b"p" * 256)], (11,), "uri_path", [], id="uri-path-256"),
        pytest.param([(15, b"q" * 256)], (15,), "uri_query", [], id="uri-query-256"),
        pytest.param([(17, bytes(3))], (17,), "accept", None, id="accept-3"),
        pytest.param([(23, bytes(4))], (23,), "block2", None, id="block2-4"),
        pytest.param([(27, bytes(4))], (27,), "block1", None, id="block1-4"),
        pytest.param([(35, b"")], (35,), "proxy_uri", None, id="proxy-uri-empty"),
        pytest.param([(35, b"u" * 1035)], (35,), "proxy_uri", None, id="proxy-uri-1035"),
        pytest.param([(39, b"")], (39,), "proxy_scheme", None, id="proxy-scheme-empty"),
        pytest.param([(4, b"")], (), "etag", None, id="etag-empty-elective"),
        pytest.param([(4, bytes(9))], (), "etags", [], id="etag-9-elective"),
        pytest.param([(6, bytes(4))], (), "observe", None, id="observe-4-elective"),
        pytest.param([(8, b"l" * 256)], (), "location_path", [], id="location-path-256"),
        pytest.param([(12, bytes(3))], (), "content_format", None, id="content-format-3"),
        pytest.param([(14, bytes(5))], (), "max_age", None, id="max-age-5"),
        pytest.param([(20, b"l" * 256)], (), "location_query", [], id="location-query-256"),
        pytest.param([(28, bytes(5))], (), "size2", None, id="size2-5"),
        pytest.param([(60, bytes(5))], (), "size1", None, id="size1-5"),
        pytest.param([(258, bytes(2))], (), "no_response", None, id="no-response-2"),
        # a non-repeatable option repeated (5.4.5): the first occurrence stands
        pytest.param([(3, b"a"), (3, b"b")], (3,), "uri_host", "a", id="uri-host-twice"),
        pytest.param([(17, b"\x32"), (17, b"")], (17,), "accept", 50, id="accept-twice"),
        pytest.param(
            [(23, b"\x01"), (23, b"\x02")], (23,), "block2", (0, False, 1), id="block2-twice"
        ),
        pytest.param([(5, b""), (5, b"")], (5,), "if_none_match", True, id="inm-twice"),
        pytest.param(
            [(12, b"\x32"), (12, b"")], (), "content_format", 50, id="content-format-twice-elective"
        ),
        pytest.param([(6, b"\x01"), (6, b"\x02")], (), "observe", 1, id="observe-twice"),
        pytest.param(
            [(12, bytes(3)), (12, b"\x01")],
            (),
            "content_format",
            None,
            id="bad-first-then-supernumerary",
        ),
        # strings that are not UTF-8
        pytest.param([(11, b"ok"), (11, b"\xff")], (11,), "uri_path", ["ok"], id="path-utf8"),
        pytest.param([(15, b"\xed\xa0\x80")], (15,), "uri_query", [], id="query-surrogate"),
        pytest.param([(3, b"\xc0\xaf")], (3,), "uri_host", None, id="host-overlong"),
        pytest.param([(8, b"\xf4\x90\x80\x80")], (), "location_path", [], id="location-utf8"),
        # SZX 7 (RFC 7959 2.2)
        pytest.param([(23, b"\x07")], (23,), "block2", None, id="block2-szx7"),
        pytest.param([(27, b"\x01\x2f")], (27,), "block1", None, id="block1-szx7"),
        # several at once, each number once, ascending
        pytest.param(
            [(3, b""), (3, b""), (9, b""), (11, b"\xff"), (11, b"\xfe")],
            (3, 9, 11),
            "path",
            "/",
            id="several",
        ),
    ],
)
def test_bad_options_decode_and_are_flagged(
    options: list[tuple[int, bytes]],
    bad_critical: tuple[int, ...],
    getter: str | None,
    value: Any,
) -> None:
    data = datagram(coap.CON, coap.GET, 0x4242, b"\x01", options, b"body")
    msg = coap.decode(data)
    assert msg.bad_critical == bad_critical
    assert msg.options == options  # still listed raw, and re-encoded as received
    if getter is not None:
        assert getattr(msg, getter) == value
    assert bytes(msg.payload) == b"body" and msg.encode() == data
    check_against_model(data)


# ---- properties ----------------------------------------------------------------------------

STRING_OPTS = {
    3: (1, 60),
    8: (0, 60),
    11: (0, 60),
    15: (0, 60),
    20: (0, 60),
    35: (1, 1034),
    39: (1, 60),
}
UINT_OPTS = {6: 3, 7: 2, 12: 2, 14: 4, 17: 2, 28: 4, 60: 4, 258: 1}


def _sized(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


unknown_numbers = st.one_of(
    st.integers(0, 300), st.integers(269, 2000), st.integers(60000, 65535)
).filter(lambda n: n not in SPECS)
opaque_values = st.one_of(
    st.binary(max_size=16),
    st.integers(13, 300).map(_sized),
    st.integers(269, 1100).map(_sized),
    st.sampled_from([MAX_LEN - 1, MAX_LEN]).map(_sized),
)


@st.composite
def typed_option(draw: st.DrawFn) -> tuple[int, int | str | bytes]:
    """One option whose value is valid for its number (so the constructor accepts it)."""
    kind = draw(st.sampled_from(["string", "uint", "opaque", "block", "empty", "unknown"]))
    if kind == "string":
        number = draw(st.sampled_from(sorted(STRING_OPTS)))
        lo, hi = STRING_OPTS[number]
        text = draw(st.text(min_size=lo, max_size=min(hi, 40)))
        while len(text.encode()) > SPECS[number][1]:
            text = text[:-1]
        return number, text or "x" * lo
    if kind == "uint":
        number = draw(st.sampled_from(sorted(UINT_OPTS)))
        return number, draw(st.integers(0, 2 ** (8 * UINT_OPTS[number]) - 1))
    if kind == "opaque":
        number = draw(st.sampled_from([1, 4]))
        return number, draw(st.binary(min_size=SPECS[number][0], max_size=8))
    if kind == "block":
        value = coap.block_value(
            draw(st.integers(0, 2**20 - 1)), draw(st.booleans()), draw(st.integers(0, 6))
        )
        return draw(st.sampled_from([23, 27])), value
    if kind == "empty":
        return 5, b""
    return draw(unknown_numbers), draw(opaque_values)


def _wire_value(value: int | str | bytes) -> bytes:
    if isinstance(value, int):
        return value.to_bytes((value.bit_length() + 7) // 8, "big")
    return value.encode() if isinstance(value, str) else value


messages = st.fixed_dictionaries(
    {
        "type": st.integers(0, 3),
        "code": st.one_of(st.integers(1, 31), st.integers(64, 191)),
        "mid": st.integers(0, 65535),
        "token": st.binary(max_size=8),
        "options": st.lists(typed_option(), max_size=30),
        "payload": st.one_of(st.binary(max_size=64), st.integers(65, 3000).map(_sized)),
    }
)
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(messages)
def test_round_trip(m: dict[str, Any]) -> None:
    data = coap.encode(m["type"], m["code"], m["mid"], m["token"], m["options"], m["payload"])
    built = coap.Message(**m)
    assert built.encode() == data
    expected_opts = sorted(((n, _wire_value(v)) for n, v in m["options"]), key=lambda o: o[0])
    msg = check_against_model(data)
    assert msg is not None
    assert (msg.type, msg.code, msg.mid, msg.token) == (m["type"], m["code"], m["mid"], m["token"])
    assert msg.options == expected_opts and bytes(msg.payload) == m["payload"]
    assert fields(msg) == fields(built) | {"payload": bytes(m["payload"])}
    for number in {n for n, _ in expected_opts}:
        assert msg.get_options(number) == [v for n, v in expected_opts if n == number]


@SETTINGS
@given(messages, st.data())
def test_every_prefix_decodes_or_is_a_format_error(m: dict[str, Any], data: st.DataObject) -> None:
    full = coap.encode(m["type"], m["code"], m["mid"], m["token"], m["options"], m["payload"])
    cuts = (
        range(len(full))
        if len(full) < 400
        else data.draw(st.lists(st.integers(0, len(full) - 1), min_size=50, max_size=50))
    )
    for cut in cuts:
        prefix = full[:cut]
        msg = check_against_model(prefix)  # also: a decoded prefix re-encodes to itself
        if msg is not None:
            # Only a cut at an option boundary or inside the payload leaves a valid message.
            assert msg.options == coap.decode(full).options[: len(msg.options)]


mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4)


@SETTINGS
@given(messages, mutations, st.integers(0, 10**6))
def test_mutated_datagrams_agree_with_the_model(
    m: dict[str, Any], flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(
        coap.encode(m["type"], m["code"], m["mid"], m["token"], m["options"], m["payload"])
    )
    for pos, byte in flips:
        data[pos % len(data)] = byte
    check_against_model(bytes(data[: max(4, len(data) - cut % 8)]))


@SETTINGS
@given(st.binary(max_size=64))
def test_arbitrary_bytes_agree_with_the_model(data: bytes) -> None:
    check_against_model(b"\x40" + data[:1] + data[1:])
    check_against_model(data)


# ---- differential: aiocoap -----------------------------------------------------------------


def _aiocoap_options(msg: aiocoap.Message) -> list[tuple[int, bytes]]:
    return [(int(o.number), o.encode()) for o in msg.opt.option_list()]


def _as_aiocoap_encodes(options: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """aiocoap re-encodes the integer options it knows minimally (RFC 7252 3.2): leading
    zero bytes go. It knows some that iotgw keeps opaque (0.4.17: 13, Uri-Path-Abbrev)."""
    uint = optiontypes.UintOption
    return [(n, v.lstrip(b"\0") if OptionNumber(n).format is uint else v) for n, v in options]


@SETTINGS
@given(messages)
def test_aiocoap_decodes_what_we_encode(m: dict[str, Any]) -> None:
    data = coap.encode(m["type"], m["code"], m["mid"], m["token"], m["options"], m["payload"])
    theirs = aiocoap.Message.decode(data)
    assert (int(theirs.mtype), int(theirs.code), theirs.mid, theirs.token) == (
        m["type"],
        m["code"],
        m["mid"],
        m["token"],
    )
    assert bytes(theirs.payload) == m["payload"]
    assert _aiocoap_options(theirs) == _as_aiocoap_encodes(coap.decode(data).options)


raw_pairs = st.lists(
    st.tuples(st.one_of(unknown_numbers, st.sampled_from(sorted(SPECS))), st.binary(max_size=300)),
    max_size=12,
)


@SETTINGS
@given(messages, raw_pairs)
def test_we_decode_what_aiocoap_encodes(m: dict[str, Any], raw: list[tuple[int, bytes]]) -> None:
    theirs = aiocoap.Message(
        code=m["code"], payload=m["payload"], _mid=m["mid"], _mtype=m["type"], _token=m["token"]
    )
    for number, value in raw:  # as opaque bytes, even for known numbers: any value goes
        theirs.opt.add_option(optiontypes.OpaqueOption(OptionNumber(number), value))
    data = theirs.encode()
    ours = coap.decode(data)
    assert (ours.type, ours.code, ours.mid, ours.token) == (
        m["type"],
        m["code"],
        m["mid"],
        m["token"],
    )
    assert ours.options == _aiocoap_options(theirs) and bytes(ours.payload) == m["payload"]
    check_against_model(data)


@SETTINGS
@given(
    path=st.lists(st.text(max_size=12), max_size=4),
    query=st.lists(st.text(min_size=1, max_size=12), max_size=3),
    content_format=st.integers(0, 65535) | st.none(),
    observe=st.integers(0, 2**24 - 1) | st.none(),
    block2=st.tuples(st.integers(0, 2**20 - 1), st.booleans(), st.integers(0, 6)) | st.none(),
    etag=st.binary(min_size=1, max_size=8) | st.none(),
    max_age=st.integers(0, 2**32 - 1) | st.none(),
)
def test_aiocoap_typed_options_read_the_same(
    path: list[str],
    query: list[str],
    content_format: int | None,
    observe: int | None,
    block2: tuple[int, bool, int] | None,
    etag: bytes | None,
    max_age: int | None,
) -> None:
    theirs = aiocoap.Message(
        code=aiocoap.GET,
        _mid=1,
        _mtype=0,
        uri_path=path,
        uri_query=query,
        content_format=content_format,
        observe=observe,
        block2=block2,
        etag=etag,
        max_age=max_age,
    )
    ours = coap.decode(theirs.encode())
    assert ours.uri_path == path and ours.uri_query == query
    assert (ours.content_format, ours.observe, ours.etag, ours.max_age) == (
        content_format,
        observe,
        etag,
        max_age,
    )
    assert ours.block2 == block2 and ours.bad_critical == ()
    back = aiocoap.Message.decode(coap.Message(coap.CON, coap.GET, 1, b"", ours.options).encode())
    assert back.opt.uri_path == tuple(path) and back.opt.observe == observe
    assert (back.opt.block2 is None) == (block2 is None)


# ---- fuzz smoke test -----------------------------------------------------------------------


FUZZ_COAP = ROOT / "tests" / "fuzz" / "fuzz_coap.py"
CORPUS_COAP = ROOT / "tests" / "fuzz" / "corpus_coap"


@pytest.mark.fuzz
def test_fuzz_target_runs_clean_from_its_seed_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # libFuzzer adds what it finds: keep the committed seeds as is
    shutil.copytree(CORPUS_COAP, corpus)
    proc = subprocess.run(
        [sys.executable, str(FUZZ_COAP), "-runs=20000", "-seed=1",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 20000 runs" in proc.stderr


def test_every_coap_seed_decodes_and_passes_the_target_checks() -> None:
    spec = importlib.util.spec_from_file_location("fuzz_coap", FUZZ_COAP)
    assert spec is not None and spec.loader is not None
    target = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(target)
    seeds = sorted(CORPUS_COAP.iterdir())
    assert len(seeds) >= 20
    refused = []
    for seed in seeds:
        data = seed.read_bytes()
        target.TestOneInput(data)
        try:
            coap.decode(data[1:])
        except coap.CoapError:
            refused.append(seed.name)
    # The seeds that are meant to be refused, and only those.
    assert sorted(refused) == ["reserved-option-nibble", "truncated-header", "version-2"]
