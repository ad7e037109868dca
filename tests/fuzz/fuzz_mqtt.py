"""atheris (libFuzzer) target for the native MQTT codec, gateway/_native/mqtt.pyx.

An input is two control bytes and a byte stream. Byte 0 picks where the stream is split into two
reads, byte 1 picks `max_packet_size` and the read size of the arena path. For each framer
version (0: a server learning it from CONNECT, 4, 5) the stream is read

  - by `Framer.feed()` of the whole stream (the reference),
  - by `feed()` of the two halves,
  - by `feed()` one byte at a time (short streams only),
  - the server's way: `get_buffer()` / `buffer_updated()` on a small `ReadArena`,

and `mqtt.decode(stream, 4 | 5)` is tried on it. Checked:

  - nothing but `MqttError` escapes the codec, and its reason code is one the codec documents;
  - every way of reading gives the same packets, pending bytes and version, or the same error;
  - every packet has every attribute readable before and after `detach()`, and `encode()` of it
    (in the version it was decoded with; CONNECT in its own) decodes to an equal packet that
    encodes to the same bytes again.

Run it (libFuzzer adds what it finds to the corpus directory, so give it a copy):

    cp -r tests/fuzz/corpus_mqtt /tmp/corpus_mqtt
    .venv/bin/python tests/fuzz/fuzz_mqtt.py -runs=1000000 -max_len=8192 /tmp/corpus_mqtt

Regenerate the seed corpus (small files, committed): `.venv/bin/python tests/fuzz/fuzz_mqtt.py
--make-corpus [DIR]`.

The codec is C built without coverage instrumentation (that needs clang and
`-fsanitize=fuzzer-no-link`), so libFuzzer is guided by the branches of this harness, which tell
packet types, properties and reason codes apart.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple

import atheris

from gateway._native import mqtt

VERSIONS = (0, 4, 5)
# Not the codec's default maximum (256 MiB): a partial frame gets a buffer of its whole declared
# size as soon as its header is in, which would make every long-length input slow.
MAX_SIZES = (1 << 20, 2, 5, 64, 300, 4096, 70_000)
READ_SIZES = (1, 3, 64, 1500, 65536)
SHORT = 128  # streams up to this long are also fed one byte at a time
ARENA_SIZE = 8192  # the smallest arena: partial frames go to its front or into their own buffer
OWN_BUFFER_FROM = 4096  # partial frames this large wait in a buffer of their own
ACKS = (mqtt.PUBACK, mqtt.PUBREC, mqtt.PUBREL, mqtt.PUBCOMP)
CORPUS = Path(__file__).parent / "corpus_mqtt"


class Outcome(NamedTuple):
    packets: list[Any]  # detached
    error: tuple[type, int] | None  # (class, reason code) of the MqttError that ended the stream
    pending: int
    version: int


# ---- looking at packets -----------------------------------------------------------------------


@atheris.instrument_func
def touch_props(props: mqtt.Properties | None) -> None:
    """Read every property; one branch per property so that libFuzzer tells them apart."""
    if props is None:
        return
    repr(props)
    for name, value in props.to_dict().items():
        match name:
            case "payload_format_indicator":
                assert value in (0, 1)
            case "message_expiry_interval":
                assert type(value) is int
            case "content_type":
                assert type(value) is str
            case "response_topic":
                assert type(value) is str
            case "correlation_data":
                assert type(value) is bytes
            case "subscription_identifiers":
                assert all(type(v) is int and v for v in value)
            case "session_expiry_interval":
                assert type(value) is int
            case "assigned_client_identifier":
                assert type(value) is str
            case "server_keep_alive":
                assert type(value) is int
            case "authentication_method":
                assert type(value) is str
            case "authentication_data":
                assert type(value) is bytes
            case "request_problem_information":
                assert value in (0, 1)
            case "will_delay_interval":
                assert type(value) is int
            case "request_response_information":
                assert value in (0, 1)
            case "response_information":
                assert type(value) is str
            case "server_reference":
                assert type(value) is str
            case "reason_string":
                assert type(value) is str
            case "receive_maximum":
                assert type(value) is int and value
            case "topic_alias_maximum":
                assert type(value) is int
            case "topic_alias":
                assert type(value) is int and value
            case "maximum_qos":
                assert value in (0, 1)
            case "retain_available":
                assert value in (0, 1)
            case "user_properties":
                assert all(type(k) is type(v) is str for k, v in value)
            case "maximum_packet_size":
                assert type(value) is int and value
            case "wildcard_subscription_available":
                assert value in (0, 1)
            case "subscription_identifier_available":
                assert value in (0, 1)
            case "shared_subscription_available":
                assert value in (0, 1)
            case _:
                raise AssertionError(f"unknown property {name}")


@atheris.instrument_func
def touch(p: Any) -> None:
    """Read every attribute of a decoded packet (lazy ones are made here)."""
    repr(p)
    assert p == p
    kind = p.type
    if kind == mqtt.PUBLISH:
        assert p.qos in (0, 1, 2) and (p.packet_id > 0) == (p.qos > 0)
        assert len(bytes(p.payload)) == p.payload_size
        _ = (p.topic, p.retain, p.dup)
        touch_props(p.properties)
    elif kind in ACKS:
        _ = (p.packet_id, p.reason_code)
        touch_props(p.properties)
    elif kind == mqtt.CONNECT:
        _ = (p.protocol_name, p.protocol_level, p.client_id, p.clean_start, p.keep_alive)
        _ = (p.username, p.password)
        touch_props(p.properties)
        if p.will is not None:
            w = p.will
            _ = (w.topic, bytes(w.payload), w.qos, w.retain, repr(w))
            touch_props(w.properties)
    elif kind == mqtt.CONNACK:
        _ = (p.session_present, p.reason_code)
        touch_props(p.properties)
    elif kind == mqtt.SUBSCRIBE:
        for s in p.subscriptions:
            _ = (s.topic_filter, s.qos, s.no_local, s.retain_as_published, s.retain_handling)
            repr(s)
        touch_props(p.properties)
    elif kind in (mqtt.SUBACK, mqtt.UNSUBACK):
        _ = (p.packet_id, list(p.reason_codes))
        touch_props(p.properties)
    elif kind == mqtt.UNSUBSCRIBE:
        _ = (p.packet_id, list(p.topic_filters))
        touch_props(p.properties)
    elif kind in (mqtt.DISCONNECT, mqtt.AUTH):
        _ = p.reason_code
        touch_props(p.properties)
    elif kind not in (mqtt.PINGREQ, mqtt.PINGRESP):
        raise AssertionError(f"packet of unknown type {kind}")


def take(packets: list[Any]) -> list[Any]:
    """Touch, detach (before the buffer they point into is reused) and touch again."""
    for p in packets:
        touch(p)
        assert p.detach() is p
        if p.type == mqtt.PUBLISH:
            assert not isinstance(p.payload, memoryview)
        touch(p)
    return packets


@atheris.instrument_func
def error_of(exc: mqtt.MqttError) -> tuple[type, int]:
    """(class, reason code) of a codec error; one branch per reason code for libFuzzer."""
    code = exc.reason_code
    if code == mqtt.MALFORMED_PACKET:
        assert isinstance(exc, mqtt.MalformedPacket)
    elif code == mqtt.PROTOCOL_ERROR:
        assert isinstance(exc, mqtt.ProtocolError)
    elif code == mqtt.PACKET_TOO_LARGE:
        assert isinstance(exc, mqtt.PacketTooLarge)
    elif code == mqtt.TOPIC_NAME_INVALID:
        assert isinstance(exc, mqtt.TopicNameInvalid)
    elif code == mqtt.TOPIC_FILTER_INVALID:
        assert isinstance(exc, mqtt.TopicFilterInvalid)
    elif code == mqtt.TOPIC_ALIAS_INVALID:
        assert isinstance(exc, mqtt.TopicAliasInvalid)
    elif code == mqtt.UNSUPPORTED_PROTOCOL_VERSION:
        assert isinstance(exc, mqtt.UnsupportedProtocolVersion)
    else:
        raise AssertionError(f"reason code 0x{code:02x} from {exc!r}")
    return type(exc), code


def check_reencodes(packets: list[Any], version: int) -> None:
    """encode() of each packet decodes to an equal packet that encodes to the same bytes."""
    for p in packets:
        if p.type == mqtt.CONNECT:
            version = p.protocol_level  # and the packets after it are in that version
        frame = p.encode(version)
        again = mqtt.decode(frame, version)
        assert again == p, (p, frame, again)
        assert again.encode(version) == frame, (p, frame)


# ---- the ways of reading a stream -------------------------------------------------------------


def read_by_feed(version: int, max_size: int, chunks: list[bytes]) -> Outcome:
    framer = mqtt.Framer(version=version, max_packet_size=max_size)
    packets: list[Any] = []
    try:
        for chunk in chunks:
            packets += take(framer.feed(chunk))
    except mqtt.MqttError as exc:
        return Outcome(packets + take(exc.packets), error_of(exc), 0, exc.version)
    return Outcome(packets, None, framer.pending, framer.version)


def read_by_arena(version: int, max_size: int, stream: bytes, first: int, size: int) -> Outcome:
    """The server's path: the transport writes into get_buffer() and calls buffer_updated()."""
    framer = mqtt.Framer(mqtt.ReadArena(ARENA_SIZE), max_size, version)
    packets: list[Any] = []
    pos = 0
    try:
        while pos < len(stream):
            view = framer.get_buffer(-1)
            assert len(view) > 0
            n = min(len(view), first if pos == 0 and first else size, len(stream) - pos)
            view[:n] = stream[pos : pos + n]
            pos += n
            packets += take(framer.buffer_updated(n))
            note_pending(framer.pending, max_size)
    except mqtt.MqttError as exc:
        return Outcome(packets + take(exc.packets), error_of(exc), 0, exc.version)
    return Outcome(packets, None, framer.pending, framer.version)


@atheris.instrument_func
def note_pending(pending: int, max_size: int) -> None:
    """Branches for libFuzzer: a partial frame kept in the arena or in a buffer of its own."""
    if pending >= OWN_BUFFER_FROM:
        assert pending < max_size
    elif pending:
        assert pending < OWN_BUFFER_FROM


def assert_same(reference: Outcome, other: Outcome, how: str) -> None:
    if reference.error is not None or other.error is not None:
        assert other.error == reference.error, (how, reference.error, other.error)
        assert other.packets == reference.packets, (how, reference.packets, other.packets)
        return
    assert other == reference, (how, reference, other)


@atheris.instrument_func
def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    stream = data[2:]
    split = data[0] * len(stream) // 255
    max_size = MAX_SIZES[data[1] % len(MAX_SIZES)]
    read_size = READ_SIZES[(data[1] >> 4) % len(READ_SIZES)]
    for version in VERSIONS:
        whole = read_by_feed(version, max_size, [stream])
        check_reencodes(whole.packets, version)
        halves = read_by_feed(version, max_size, [stream[:split], stream[split:]])
        assert_same(whole, halves, "two halves")
        arena = read_by_arena(version, max_size, stream, split, read_size)
        assert_same(whole, arena, "arena")
        if len(stream) <= SHORT:
            bytewise = read_by_feed(version, max_size, [bytes([b]) for b in stream])
            assert_same(whole, bytewise, "one byte at a time")
    for version in (4, 5):
        try:
            packet = mqtt.decode(stream, version)
        except mqtt.MqttError as exc:
            error_of(exc)
            continue
        take([packet])
        check_reencodes([packet], version)
        framed = read_by_feed(version, mqtt.MAX_PACKET_SIZE, [stream])
        assert framed == Outcome([packet], None, 0, framed.version), (packet, framed)


# ---- the seed corpus --------------------------------------------------------------------------


def seed_packets(version: int) -> dict[str, Any]:
    """One packet of every type, with most fields and (in 5.0) properties set."""
    v5 = version == 5

    def props(**values: Any) -> mqtt.Properties | None:
        return mqtt.Properties(**values) if v5 else None

    reason = props(reason_string="why", user_properties=[("k", "v")])
    packets = {
        "connect": mqtt.Connect(
            "dev-1", version, False, 30, "user", b"pass",
            mqtt.Will("devices/dev-1/status", b"gone", 1, True,
                      props(will_delay_interval=5, content_type="text/plain")),
            props(session_expiry_interval=60, receive_maximum=10, maximum_packet_size=4096,
                  topic_alias_maximum=4, user_properties=[("a", "b")]),
        ),
        "connack": mqtt.Connack(True, 0, props(assigned_client_identifier="x",
                                                server_keep_alive=20, maximum_qos=1)),
        "publish-qos0": mqtt.Publish("devices/dev-1/telemetry", b"21.5", 0, True),
        "publish-qos1": mqtt.Publish(
            "devices/dev-1/telemetry", b'{"t":1}', 1, False, True, 7,
            props(payload_format_indicator=1, message_expiry_interval=9, topic_alias=2,
                  response_topic="r/t", correlation_data=b"\x01", content_type="json",
                  user_properties=[("u", "p")], subscription_identifiers=[1, 300])),
        "publish-qos2": mqtt.Publish("a/b", b"", 2, False, False, 65535),
        "puback": mqtt.Ack(mqtt.PUBACK, 7, 0x10 if v5 else 0, reason),
        "pubrec": mqtt.Ack(mqtt.PUBREC, 8),
        "pubrel": mqtt.Ack(mqtt.PUBREL, 8, 0x92 if v5 else 0),
        "pubcomp": mqtt.Ack(mqtt.PUBCOMP, 8),
        "subscribe": mqtt.Subscribe(9, [
            mqtt.Subscription("devices/+/telemetry", 1, v5, v5, 2 if v5 else 0),
            mqtt.Subscription("$share/g/a/#", 2),
        ], props(subscription_identifiers=[5])),
        "suback": mqtt.Suback(9, [1, 2, 0x80], reason),
        "unsubscribe": mqtt.Unsubscribe(10, ["devices/+/telemetry", "#"],
                                        props(user_properties=[("x", "y")])),
        "unsuback": mqtt.Unsuback(10, [0, 0x11] if v5 else [], reason),
        "pingreq": mqtt.Pingreq(),
        "pingresp": mqtt.Pingresp(),
        "disconnect": mqtt.Disconnect(0x04 if v5 else 0, props(session_expiry_interval=0)),
    }
    if v5:
        packets["auth"] = mqtt.Auth(0x18, props(authentication_method="SCRAM",
                                                authentication_data=b"\x00\x01"))
    return packets


def seed_streams() -> dict[str, bytes]:
    """Seed name -> input (two control bytes, then the stream)."""
    middle, any_size = b"\x80", b"\x00"
    seeds: dict[str, bytes] = {}
    for version in (4, 5):
        packets = seed_packets(version)
        session = b"".join(p.encode(version) for p in packets.values())
        seeds[f"v{version}-session"] = middle + any_size + session
        seeds[f"v{version}-session-truncated"] = middle + b"\x13" + session[:-3]
        for name, p in packets.items():
            seeds[f"v{version}-{name}"] = middle + any_size + p.encode(version)
    connect = seed_packets(4)["connect"].encode(4)
    large = mqtt.Publish("devices/dev-1/blob", bytes(range(256)) * 17, 1, packet_id=3)
    seeds["v4-large-publish"] = b"\x10" + b"\x22" + connect + large.encode(4)
    seeds["v5-empty-topic-with-alias"] = middle + any_size + mqtt.encode_publish(
        "", b"x", properties=mqtt.Properties(topic_alias=1), version=5)
    mqtt31 = b"\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01x"
    seeds["mqtt31-connect"] = middle + any_size + bytes([0x10, len(mqtt31)]) + mqtt31
    seeds["non-minimal-remaining-length"] = middle + any_size + b"\xc0\x80\x00"
    seeds["five-byte-remaining-length"] = middle + any_size + b"\x30\xff\xff\xff\xff\x7f"
    seeds["reserved-flags"] = middle + any_size + b"\x62\x02\x00\x01\x82\x02\x00\x01"
    return seeds


def make_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seed_streams().items():
        (directory / name).write_bytes(data)
    print(f"wrote {len(seed_streams())} seeds to {directory}")


def main() -> None:
    if sys.argv[1:2] == ["--make-corpus"]:
        make_corpus(Path(sys.argv[2]) if len(sys.argv) > 2 else CORPUS)
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
