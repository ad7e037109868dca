"""Atheris fuzz target for the native CoAP codec (gateway._native.coap).

    .venv/bin/python tests/fuzz/fuzz_coap.py -runs=1000000 [CORPUS_DIR]

Each input is decoded either as raw bytes or after being shaped into a datagram with a valid
header and option framing (so that mutations reach the option checks, since the C extension
carries no coverage instrumentation). Only CoapError may escape decode(); every decoded message
must read through every getter, re-encode to the very same bytes (the wire form is canonical),
decode again to the same fields, and rebuild through Message() unless a value length is out of
the RFC's range.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from gateway._native import coap

# Value lengths the codec accepts when building (RFC 7252 table 4, 7641, 7959, 7967).
LENGTHS = {
    1: (0, 8),
    3: (1, 255),
    4: (1, 8),
    5: (0, 0),
    6: (0, 3),
    7: (0, 2),
    8: (0, 255),
    11: (0, 255),
    12: (0, 2),
    14: (0, 4),
    15: (0, 255),
    17: (0, 2),
    20: (0, 255),
    23: (0, 3),
    27: (0, 3),
    28: (0, 4),
    35: (1, 1034),
    39: (1, 255),
    60: (0, 4),
    258: (0, 1),
}
GETTERS = (
    "type",
    "code",
    "mid",
    "token",
    "options",
    "bad_critical",
    "is_request",
    "is_response",
    "is_empty",
    "uri_host",
    "uri_port",
    "uri_path",
    "uri_query",
    "path",
    "location_path",
    "location_query",
    "content_format",
    "accept",
    "max_age",
    "observe",
    "etag",
    "etags",
    "if_match",
    "if_none_match",
    "block1",
    "block2",
    "size1",
    "size2",
    "proxy_uri",
    "proxy_scheme",
    "no_response",
)
NUMBERS = [*sorted(LENGTHS), 0, 2, 9, 16, 2048, 2049, 65535]
CODES = [0, 1, 2, 3, 4, 5, 6, 7, 65, 68, 69, 95, 128, 130, 132, 143, 160, 165]


def snapshot(msg: coap.Message) -> dict[str, Any]:
    out = {name: getattr(msg, name) for name in GETTERS}
    out["payload"] = bytes(msg.payload)
    out["repr"] = repr(msg)
    for number, _ in out["options"]:
        out[f"get_options({number})"] = msg.get_options(number)
    return out


def _ext(v: int) -> tuple[int, bytes]:
    if v < 13:
        return v, b""
    if v < 269:
        return 13, bytes([v - 13])
    return 14, (v - 269).to_bytes(2, "big")


@atheris.instrument_func
def shape(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A datagram with a valid header and option framing, drawn from the input."""
    tkl = fdp.ConsumeIntInRange(0, 8)
    # Mostly valid codes; sometimes any byte (reserved classes included).
    code = fdp.ConsumeIntInRange(0, 255) if fdp.ConsumeIntInRange(0, 7) == 7 else None
    if code is None:
        code = fdp.PickValueInList(CODES)
    out = bytearray([0x40 | fdp.ConsumeIntInRange(0, 3) << 4 | tkl, code])
    out += fdp.ConsumeBytes(2).ljust(2, b"\0") + fdp.ConsumeBytes(tkl).ljust(tkl, b"\0")
    number = 0
    for _ in range(fdp.ConsumeIntInRange(0, 16)):
        target = fdp.PickValueInList(NUMBERS) if fdp.ConsumeBool() else number
        if target < number:
            target = number + fdp.ConsumeIntInRange(0, 300)
        target = min(target, 65535)
        lo, hi = LENGTHS.get(target, (0, 300))
        length = fdp.ConsumeIntInRange(max(0, lo - 1), min(hi + 1, 300))
        value = fdp.ConsumeBytes(length).ljust(length, b"\x01")
        (dn, dx), (ln, lx) = _ext(target - number), _ext(length)
        out += bytes([dn << 4 | ln]) + dx + lx + value
        number = target
    if fdp.ConsumeBool():
        out += b"\xff" + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if fdp.ConsumeIntInRange(0, 7) == 7:  # damage it a little (not when the input ran out)
        out[fdp.ConsumeIntInRange(0, len(out) - 1)] = fdp.ConsumeIntInRange(0, 255)
    return bytes(out)


@atheris.instrument_func
def check(data: bytes) -> None:
    try:
        msg = coap.decode(data)
    except coap.CoapError:
        return
    snap = snapshot(msg)
    wire = msg.encode()
    assert wire == data, (data.hex(), wire.hex())
    assert snapshot(coap.decode(wire)) == snap
    assert snapshot(coap.decode(bytearray(data))) == snap
    try:
        built = coap.Message(msg.type, msg.code, msg.mid, msg.token, msg.options, msg.payload)
    except ValueError:
        assert any(
            not lo <= len(v) <= hi
            for n, v in msg.options
            for lo, hi in [LENGTHS.get(n, (0, 65804))]
        ), data.hex()
    else:
        assert built.encode() == data, data.hex()
        assert snapshot(built) == snap, data.hex()


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        check(fdp.ConsumeBytes(fdp.remaining_bytes()))
    else:
        check(shape(fdp))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
