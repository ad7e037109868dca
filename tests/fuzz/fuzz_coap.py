"""Atheris fuzz target for the native CoAP codec (gateway._native.coap).

    cp -r tests/fuzz/corpus_coap /tmp/corpus_coap   # libFuzzer adds to it: give it a copy
    .venv/bin/python tests/fuzz/fuzz_coap.py -runs=1000000 /tmp/corpus_coap

Regenerate the seed corpus (committed): `.venv/bin/python tests/fuzz/fuzz_coap.py
--make-corpus [DIR]`.

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
    """Byte 0 picks the mode: a multiple of 4 checks the rest as a datagram as is (the seed
    corpus is datagrams), anything else shapes one from the rest."""
    if not data:
        return
    if data[0] % 4 == 0:
        check(data[1:])
    else:
        check(shape(atheris.FuzzedDataProvider(data[1:])))


def seed_datagrams() -> dict[str, bytes]:
    """Seed name -> datagram: the messages the gateway exchanges, and a few it refuses."""
    json_ = [(coap.CONTENT_FORMAT, coap.JSON)]
    path = [(coap.URI_PATH, b"shadow"), (coap.URI_PATH, b"dev-1")]
    e = coap.encode
    return {
        "con-post-telemetry": e(coap.CON, coap.POST, 0x1234, b"\x01\x02",
                                [(coap.URI_PATH, b"telemetry"), (coap.URI_PATH, b"dev-1"),
                                 *json_, (coap.URI_QUERY, b"t=secret")], b'{"t":21.5}'),
        "con-get-observe": e(coap.CON, coap.GET, 2, b"tok", [(coap.OBSERVE, b""), *path,
                                                            (coap.ACCEPT, b"\x32")], b""),
        "con-get-block2": e(coap.CON, coap.GET, 3, b"", [*path, (coap.BLOCK2, b"\x16")], b""),
        "con-put-block1": e(coap.CON, coap.PUT, 4, b"\xaa",
                            [(coap.IF_MATCH, b"\x07"), *path, *json_, (coap.BLOCK1, b"\x0e"),
                             (coap.SIZE1, b"\x04\x00")], b"{" + b"x" * 63),
        "con-patch-if-none-match": e(coap.CON, coap.PATCH, 5, b"", [(coap.IF_NONE_MATCH, b""),
                                                                   *path, *json_], b"{}"),
        "con-fetch": e(coap.CON, coap.FETCH, 6, b"", path, b"[]"),
        "con-delete-host-port": e(coap.CON, coap.DELETE, 7, b"", [
            (coap.URI_HOST, b"gw.example"), (coap.URI_PORT, b"\x16\x33"), *path], b""),
        "ack-content-etag": e(coap.ACK, coap.CONTENT, 8, b"tok", [
            (coap.ETAG, b"\x00\x07"), (coap.OBSERVE, b"\x05"), *json_,
            (coap.MAX_AGE, b"\x3c"), (coap.BLOCK2, b"\x08"), (coap.SIZE2, b"\x01\x00")],
            b'{"state":{}}'),
        "ack-changed": e(coap.ACK, coap.CHANGED, 9, b"\x01\x02", [], b""),
        "ack-empty": coap.encode_empty(coap.ACK, 10),
        "rst-empty": coap.encode_empty(coap.RST, 11),
        "con-ping": coap.encode_empty(coap.CON, 12),
        "non-notification": e(coap.NON, coap.CONTENT, 13, b"tok", [(coap.OBSERVE, b"\x01\x00"),
                                                                    *json_], b"{}"),
        "con-created-location": e(coap.ACK, coap.CREATED, 14, b"", [
            (coap.LOCATION_PATH, b"a"), (coap.LOCATION_PATH, b"b"),
            (coap.LOCATION_QUERY, b"q=1")], b""),
        "separate-response-con": e(coap.CON, coap.SERVICE_UNAVAILABLE, 15, b"tk", [
            (coap.MAX_AGE, b"\x05")], b"busy"),
        "proxy-uri-no-response": e(coap.CON, coap.GET, 16, b"", [
            (coap.PROXY_URI, b"coap://x/y"), (258, b"\x1a")], b""),
        "unknown-critical-option": e(coap.CON, coap.GET, 17, b"", [*path, (9, b"\x01")], b""),
        "long-option-delta-2049": e(coap.CON, coap.GET, 18, b"", [*path, (2049, b"v" * 300)],
                                    b""),
        "token-8-payload-marker": e(coap.CON, coap.POST, 19, b"12345678", path, b"\xff\x00"),
        "truncated-header": e(coap.CON, coap.GET, 20, b"", path, b"")[:3],
        "reserved-option-nibble": bytes([0x40, 0x01, 0x00, 0x15, 0xF1, 0x00]),
        "version-2": bytes([0x80, 0x01, 0x00, 0x16]),
    }


def make_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    seeds = seed_datagrams()
    for name, datagram in seeds.items():
        (directory / name).write_bytes(b"\x00" + datagram)  # mode 0: the datagram as is
    print(f"wrote {len(seeds)} seeds to {directory}")


CORPUS = Path(__file__).resolve().parent / "corpus_coap"

if __name__ == "__main__":
    if sys.argv[1:2] == ["--make-corpus"]:
        make_corpus(Path(sys.argv[2]) if len(sys.argv) > 2 else CORPUS)
    else:
        atheris.Setup(sys.argv, TestOneInput)
        atheris.Fuzz()
