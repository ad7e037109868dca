"""The native MQTT codec: round trips of every packet type (hypothesis), byte vectors, a corpus
of malformed frames with the reason code each must produce, and fragmented feeding."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._native import mqtt

# ---- strategies -----------------------------------------------------------------------------

# Valid MQTT strings: no U+0000, no surrogates (they cannot be encoded as UTF-8).
text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)
level = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/+#"), max_size=6
)
topic = st.lists(level, min_size=1, max_size=5).map("/".join).filter(bool)
topic_filter = st.lists(st.one_of(level, st.just("+")), min_size=1, max_size=4).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels, "#"])])
).filter(bool)
packet_id = st.integers(1, 65535)
u16 = st.integers(0, 65535)
u32 = st.integers(0, 0xFFFFFFFF)
blob = st.binary(max_size=40)
user_props = st.lists(st.tuples(text, text), max_size=3)


def props_for(names: list[str]) -> st.SearchStrategy[Any]:
    """Properties with any subset of `names`, values of the right type."""
    kinds: dict[str, st.SearchStrategy[Any]] = {
        "payload_format_indicator": st.integers(0, 1),
        "message_expiry_interval": u32,
        "content_type": text,
        "response_topic": topic,
        "correlation_data": blob,
        "subscription_identifiers": st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3),
        "session_expiry_interval": u32,
        "assigned_client_identifier": text,
        "server_keep_alive": u16,
        "authentication_method": text,
        "authentication_data": blob,
        "request_problem_information": st.integers(0, 1),
        "will_delay_interval": u32,
        "request_response_information": st.integers(0, 1),
        "response_information": text,
        "server_reference": text,
        "reason_string": text,
        "receive_maximum": st.integers(1, 65535),
        "topic_alias_maximum": u16,
        "topic_alias": st.integers(1, 65535),
        "maximum_qos": st.integers(0, 1),
        "retain_available": st.integers(0, 1),
        "user_properties": user_props,
        "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
        "wildcard_subscription_available": st.integers(0, 1),
        "subscription_identifier_available": st.integers(0, 1),
        "shared_subscription_available": st.integers(0, 1),
    }
    chosen = st.fixed_dictionaries({}, optional={n: kinds[n] for n in names})
    return st.one_of(st.none(), chosen.map(lambda d: mqtt.Properties(**d)))


CONNECT_PROPS = [
    "session_expiry_interval", "authentication_method", "authentication_data",
    "request_problem_information", "request_response_information", "receive_maximum",
    "topic_alias_maximum", "user_properties", "maximum_packet_size",
]
WILL_PROPS = [
    "payload_format_indicator", "message_expiry_interval", "content_type", "response_topic",
    "correlation_data", "will_delay_interval", "user_properties",
]
CONNACK_PROPS = [
    "session_expiry_interval", "assigned_client_identifier", "server_keep_alive",
    "authentication_method", "authentication_data", "response_information", "server_reference",
    "reason_string", "receive_maximum", "topic_alias_maximum", "maximum_qos", "retain_available",
    "user_properties", "maximum_packet_size", "wildcard_subscription_available",
    "subscription_identifier_available", "shared_subscription_available",
]
PUBLISH_PROPS = [
    "payload_format_indicator", "message_expiry_interval", "content_type", "response_topic",
    "correlation_data", "subscription_identifiers", "topic_alias", "user_properties",
]
REASON_PROPS = ["reason_string", "user_properties"]


@st.composite
def connects(draw: st.DrawFn) -> mqtt.Connect:
    v5 = draw(st.booleans())
    will = None
    if draw(st.booleans()):
        will = mqtt.Will(
            draw(topic),
            draw(blob),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(props_for(WILL_PROPS)) if v5 else None,
        )
    username = draw(st.none() | text)
    password = draw(st.none() | blob)
    if not v5 and username is None:
        password = None  # 3.1.1 forbids a password without a user name
    return mqtt.Connect(
        client_id=draw(text),
        protocol_level=5 if v5 else 4,
        clean_start=draw(st.booleans()),
        keep_alive=draw(u16),
        username=username,
        password=password,
        will=will,
        properties=draw(props_for(CONNECT_PROPS)) if v5 else None,
    )


def packets(version: int) -> st.SearchStrategy[Any]:
    v5 = version == 5

    def props(names: list[str]) -> st.SearchStrategy[Any]:
        return props_for(names) if v5 else st.none()

    reason = st.sampled_from([0x00, 0x10, 0x80, 0x87, 0x97]) if v5 else st.just(0)
    return st.one_of(
        st.builds(
            mqtt.Connack,
            st.booleans(),
            st.sampled_from([0, 0x80, 0x86, 0x87]) if v5 else st.integers(0, 5),
            props(CONNACK_PROPS),
        ),
        st.integers(0, 2).flatmap(
            lambda qos: st.builds(
                mqtt.Publish,
                topic,
                st.binary(max_size=300),
                st.just(qos),
                st.booleans(),
                st.booleans() if qos else st.just(False),
                packet_id if qos else st.just(0),
                props(PUBLISH_PROPS),
            )
        ),
        st.builds(
            mqtt.Ack, st.sampled_from([mqtt.PUBACK, mqtt.PUBREC]), packet_id, reason,
            props(REASON_PROPS),
        ),
        st.builds(
            mqtt.Ack,
            st.sampled_from([mqtt.PUBREL, mqtt.PUBCOMP]),
            packet_id,
            st.sampled_from([0, 0x92]) if v5 else st.just(0),
            props(REASON_PROPS),
        ),
        st.builds(
            mqtt.Subscribe,
            packet_id,
            st.lists(
                st.builds(
                    mqtt.Subscription,
                    topic_filter,
                    st.integers(0, 2),
                    st.booleans() if v5 else st.just(False),
                    st.booleans() if v5 else st.just(False),
                    st.integers(0, 2) if v5 else st.just(0),
                ),
                min_size=1,
                max_size=4,
            ),
            st.none() if not v5 else st.one_of(
                st.none(),
                st.builds(
                    lambda ident, up: mqtt.Properties(
                        subscription_identifiers=[ident], user_properties=up
                    ),
                    st.integers(1, 268_435_455),
                    user_props,
                ),
            ),
        ),
        st.builds(
            mqtt.Suback,
            packet_id,
            st.lists(
                st.sampled_from([0, 1, 2, 0x80, 0x87, 0x9E] if v5 else [0, 1, 2, 0x80]),
                min_size=1,
                max_size=5,
            ),
            props(REASON_PROPS),
        ),
        st.builds(
            mqtt.Unsubscribe, packet_id, st.lists(topic_filter, min_size=1, max_size=4),
            props(["user_properties"]),
        ),
        st.builds(
            mqtt.Unsuback,
            packet_id,
            st.lists(st.sampled_from([0, 0x11, 0x80]), min_size=1, max_size=4) if v5
            else st.just([]),
            props(REASON_PROPS),
        ),
        st.just(mqtt.Pingreq()),
        st.just(mqtt.Pingresp()),
        st.builds(
            mqtt.Disconnect,
            st.sampled_from([0, 4, 0x81, 0x8E, 0x93]) if v5 else st.just(0),
            props([*REASON_PROPS, "session_expiry_interval", "server_reference"]),
        ),
        *(
            [st.builds(mqtt.Auth, st.sampled_from([0, 0x18, 0x19]),
                       props([*REASON_PROPS, "authentication_method", "authentication_data"]))]
            if v5 else []
        ),
    )


# ---- round trips ------------------------------------------------------------------------------


@settings(max_examples=300)
@given(connects())
def test_connect_round_trips(packet: mqtt.Connect) -> None:
    frame = packet.encode()
    assert mqtt.decode(frame) == packet
    framer = mqtt.Framer()
    (got,) = framer.feed(frame)
    assert got == packet
    assert framer.version == packet.protocol_level


@pytest.mark.parametrize("version", [4, 5])
@settings(max_examples=400)
@given(data=st.data())
def test_every_packet_type_round_trips(version: int, data: st.DataObject) -> None:
    packet = data.draw(packets(version))
    frame = packet.encode(version)
    decoded = mqtt.decode(frame, version)
    assert decoded == packet
    assert decoded.type == packet.type
    assert decoded.encode(version) == frame


@pytest.mark.parametrize("version", [4, 5])
@settings(max_examples=100)
@given(data=st.data())
def test_a_stream_fed_one_byte_at_a_time_gives_the_same_packets(
    version: int, data: st.DataObject
) -> None:
    sent = data.draw(st.lists(packets(version), min_size=1, max_size=6))
    stream = b"".join(p.encode(version) for p in sent)
    framer = mqtt.Framer(version=version)
    got = []
    for i in range(len(stream)):
        got.extend(p.detach() for p in framer.feed(stream[i : i + 1]))
    assert got == sent
    assert framer.pending == 0


@pytest.mark.parametrize("version", [4, 5])
@settings(max_examples=60)
@given(data=st.data())
def test_every_split_point_through_the_shared_arena_gives_the_same_packets(
    version: int, data: st.DataObject
) -> None:
    sent = data.draw(st.lists(packets(version), min_size=1, max_size=5))
    stream = b"".join(p.encode(version) for p in sent)
    arena = mqtt.ReadArena()
    for split in range(len(stream) + 1):
        framer = mqtt.Framer(arena, version=version)
        got: list[Any] = []
        for chunk in (stream[:split], stream[split:]):
            view = framer.get_buffer(-1)
            view[: len(chunk)] = chunk
            got.extend(p.detach() for p in framer.buffer_updated(len(chunk)))
        assert got == sent, f"split at {split}"


def test_a_large_frame_is_assembled_in_its_own_buffer_across_many_reads() -> None:
    big = mqtt.Publish("big/one", bytes(range(256)) * 2000, qos=1, packet_id=1)
    small = mqtt.Publish("small", b"s")
    stream = small.encode() + big.encode() + small.encode()
    arena = mqtt.ReadArena(16384)
    framer = mqtt.Framer(arena, version=4)
    got: list[Any] = []
    pos = 0
    while pos < len(stream):
        view = framer.get_buffer(-1)
        n = min(len(view), 1000, len(stream) - pos)
        view[:n] = stream[pos : pos + n]
        pos += n
        got.extend(p.detach() for p in framer.buffer_updated(n))
    assert got == [small, big, small]


def test_decoded_publish_points_into_the_read_buffer_until_detached() -> None:
    payload = bytes(range(256)) * 4  # over 512 bytes: a view, not a copy
    frame = mqtt.encode_publish("a/b", payload, qos=0)
    arena = mqtt.ReadArena()
    framer = mqtt.Framer(arena, version=4)
    view = framer.get_buffer(-1)
    view[: len(frame)] = frame
    (p,) = framer.buffer_updated(len(frame))
    assert isinstance(p.payload, memoryview) and p.payload.readonly
    assert p.payload_size == 1024
    kept = p.detach()
    assert kept.payload == payload and isinstance(kept.payload, bytes)
    view = framer.get_buffer(-1)
    view[: len(frame)] = b"\xff" * len(frame)  # the next read overwrites the arena
    assert kept.payload == payload and kept.topic == "a/b"


def test_small_payload_is_copied_because_that_is_cheaper_than_a_view() -> None:
    (p,) = mqtt.Framer(version=4).feed(mqtt.encode_publish("a", b"x" * 512))
    assert isinstance(p.payload, bytes)
    (q,) = mqtt.Framer(version=4).feed(mqtt.encode_publish("a", b"x" * 513))
    assert isinstance(q.payload, memoryview)


def test_buffer_updated_must_follow_get_buffer_and_stay_within_it() -> None:
    framer = mqtt.Framer(mqtt.ReadArena(16384), version=4)
    with pytest.raises(ValueError):
        framer.buffer_updated(1)
    view = framer.get_buffer(-1)
    with pytest.raises(ValueError):
        framer.buffer_updated(len(view) + 1)


def test_one_read_of_many_frames_is_decoded_in_one_call() -> None:
    frames = b"".join(mqtt.encode_publish(f"t/{i}", b"%d" % i) for i in range(1000))
    (*_,) = got = mqtt.Framer(version=4).feed(frames)
    assert [p.topic for p in got] == [f"t/{i}" for i in range(1000)]


def test_server_framer_learns_the_version_from_connect() -> None:
    stream = mqtt.Connect("c", protocol_level=5).encode() + mqtt.encode_publish(
        "x", b"1", qos=1, packet_id=2, version=5, properties=mqtt.Properties(content_type="a")
    )
    framer = mqtt.Framer()
    _, publish = framer.feed(stream)
    assert framer.version == 5
    assert publish.properties.content_type == "a"


# ---- byte vectors --------------------------------------------------------------------------------


def test_known_frames() -> None:
    # 3.1.1 CONNECT: clean session, keep alive 60, client id "abc".
    connect = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc"
    assert mqtt.Connect("abc", keep_alive=60).encode() == connect
    assert mqtt.decode(connect) == mqtt.Connect("abc", keep_alive=60)
    assert mqtt.encode_publish("a/b", b"hi", qos=1, packet_id=10) == (
        b"\x32\x09\x00\x03a/b\x00\x0ahi"
    )
    assert mqtt.encode_publish("a", b"", version=5) == b"\x30\x04\x00\x01a\x00"
    assert mqtt.encode_ack(mqtt.PUBREL, 1) == b"\x62\x02\x00\x01"
    assert mqtt.encode_ack(mqtt.PUBACK, 1, 0x10, version=5) == b"\x40\x03\x00\x01\x10"
    assert mqtt.encode_ack(mqtt.PUBACK, 1, 0x10, version=4) == b"\x40\x02\x00\x01"
    assert mqtt.Disconnect().encode(5) == b"\xe0\x00"
    assert mqtt.Disconnect(0x8E).encode(5) == b"\xe0\x01\x8e"
    assert mqtt.Subscribe(1, [mqtt.Subscription("a/#", 1)]).encode(4) == (
        b"\x82\x08\x00\x01\x00\x03a/#\x01"
    )
    assert mqtt.Pingreq().encode() == mqtt.PINGREQ_FRAME
    # Remaining length 321 = 0xC1 0x02 (the spec's varint example).
    frame = mqtt.encode_publish("t", b"x" * 318)  # 2 + 1 + 318
    assert frame[1:3] == b"\xc1\x02"
    # A v5 PUBACK may leave out the reason code and properties (3.4.2.1).
    assert mqtt.decode(b"\x40\x02\x00\x07", 5) == mqtt.Ack(mqtt.PUBACK, 7)
    assert mqtt.decode(b"\x40\x04\x00\x07\x10\x00", 5) == mqtt.Ack(mqtt.PUBACK, 7, 0x10)


def test_encode_publish_into_appends_to_the_output() -> None:
    out = bytearray(b"head")
    n = mqtt.encode_publish_into(out, "a/b", memoryview(b"xyz"), qos=2, packet_id=3, dup=True)
    assert out[:4] == b"head" and n == len(out) - 4
    assert mqtt.decode(bytes(out[4:])) == mqtt.Publish("a/b", b"xyz", 2, False, True, 3)
    mqtt.encode_ack_into(out, mqtt.PUBCOMP, 3)
    assert out.endswith(b"\x70\x02\x00\x03")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mqtt.encode_publish("a/+", b""), "topic name"),
        (lambda: mqtt.encode_publish("a", b"", qos=1), "packet identifier"),
        (lambda: mqtt.encode_publish("a", b"", qos=3, packet_id=1), "QoS"),
        (lambda: mqtt.encode_publish("", b""), "empty topic"),
        (lambda: mqtt.encode_ack(mqtt.PUBACK, 0), "packet identifier"),
        (lambda: mqtt.Subscribe(1, []).encode(), "at least one"),
        (lambda: mqtt.Subscribe(1, [mqtt.Subscription("a/#/b")]).encode(), "#"),
        (lambda: mqtt.Connect("c", password=b"p").encode(4), "user name"),
        (lambda: mqtt.Properties(bogus=1), "no MQTT property"),
    ],
)
def test_encoders_refuse_what_the_spec_forbids(call: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_topic_helpers() -> None:
    assert mqtt.parse_shared("$share/g1/a/+") == ("g1", "a/+")
    assert mqtt.parse_shared("a/b") is None
    for bad in ("$share/g1", "$share//a", "$share/g+/a"):
        with pytest.raises(mqtt.TopicFilterInvalid):
            mqtt.parse_shared(bad)
    mqtt.validate_topic_filter("+/a/#")
    mqtt.validate_topic_name("a/b")
    with pytest.raises(mqtt.TopicNameInvalid):
        mqtt.validate_topic_name("a/#")
    with pytest.raises(mqtt.TopicFilterInvalid):
        mqtt.validate_topic_filter("a+/b")


# ---- malformed frames --------------------------------------------------------------------------


def _v5_publish(props: bytes, topic: bytes = b"\x00\x01t") -> bytes:
    body = topic + bytes([len(props)]) + props + b"x"
    return bytes([0x30, len(body)]) + body


MALFORMED: list[tuple[str, int, bytes, int]] = [
    # (what, protocol level, frame, expected reason code)
    ("reserved packet type 0", 4, b"\x00\x00", mqtt.MALFORMED_PACKET),
    ("reserved flags on PUBACK", 4, b"\x41\x02\x00\x01", mqtt.MALFORMED_PACKET),
    ("SUBSCRIBE flags not 0010", 4, b"\x80\x06\x00\x01\x00\x01a\x00", mqtt.MALFORMED_PACKET),
    ("PUBREL flags not 0010", 4, b"\x60\x02\x00\x01", mqtt.MALFORMED_PACKET),
    ("QoS 3 PUBLISH", 4, b"\x36\x05\x00\x01a\x00\x01", mqtt.MALFORMED_PACKET),
    ("DUP on QoS 0", 4, b"\x38\x03\x00\x01a", mqtt.MALFORMED_PACKET),
    ("packet id 0 with QoS 1", 4, b"\x32\x05\x00\x01a\x00\x00", mqtt.PROTOCOL_ERROR),
    ("remaining length of 5 bytes", 4, b"\x30\x80\x80\x80\x80\x01", mqtt.MALFORMED_PACKET),
    ("remaining length not minimal", 4, b"\xc0\x80\x00", mqtt.MALFORMED_PACKET),
    ("PINGREQ with a body", 4, b"\xc0\x01\x00", mqtt.MALFORMED_PACKET),
    ("ill-formed UTF-8 topic", 4, b"\x30\x04\x00\x02\xc3\x28", mqtt.MALFORMED_PACKET),
    ("overlong UTF-8 topic", 4, b"\x30\x04\x00\x02\xc0\xaf", mqtt.MALFORMED_PACKET),
    ("surrogate in topic", 4, b"\x30\x05\x00\x03\xed\xa0\x80", mqtt.MALFORMED_PACKET),
    ("U+0000 in topic", 4, b"\x30\x04\x00\x02a\x00", mqtt.MALFORMED_PACKET),
    ("wildcard + in topic name", 4, b"\x30\x05\x00\x03a/+", mqtt.TOPIC_NAME_INVALID),
    ("wildcard # in topic name", 4, b"\x30\x03\x00\x01#", mqtt.TOPIC_NAME_INVALID),
    ("empty topic in 3.1.1", 4, b"\x30\x02\x00\x00", mqtt.TOPIC_NAME_INVALID),
    ("empty topic, no alias, 5.0", 5, b"\x30\x03\x00\x00\x00", mqtt.PROTOCOL_ERROR),
    ("topic runs past the end", 4, b"\x30\x03\x00\x05a", mqtt.MALFORMED_PACKET),
    ("misplaced # in filter", 4, b"\x82\x08\x00\x01\x00\x03#/a\x00", mqtt.TOPIC_FILTER_INVALID),
    ("+ not a whole level", 4, b"\x82\x07\x00\x01\x00\x02a+\x00", mqtt.TOPIC_FILTER_INVALID),
    ("bad shared subscription", 5, b"\x82\x0e\x00\x01\x00\x00\x08$share/a\x00",
     mqtt.TOPIC_FILTER_INVALID),
    ("empty subscription list", 4, b"\x82\x02\x00\x01", mqtt.PROTOCOL_ERROR),
    ("subscription QoS 3", 4, b"\x82\x06\x00\x01\x00\x01a\x03", mqtt.MALFORMED_PACKET),
    ("3.1.1 reserved option bits", 4, b"\x82\x06\x00\x01\x00\x01a\x04", mqtt.MALFORMED_PACKET),
    ("retain handling 3", 5, b"\x82\x07\x00\x01\x00\x00\x01a\x30", mqtt.PROTOCOL_ERROR),
    ("no local on shared", 5,
     b"\x82\x10\x00\x01\x00\x00\x0a$share/g/a\x04", mqtt.PROTOCOL_ERROR),
    ("empty unsubscribe list", 4, b"\xa2\x02\x00\x01", mqtt.PROTOCOL_ERROR),
    ("AUTH in 3.1.1", 4, b"\xf0\x00", mqtt.MALFORMED_PACKET),
    ("unknown property", 5, _v5_publish(b"\x05\x00"), mqtt.MALFORMED_PACKET),
    ("property not allowed in PUBLISH", 5, _v5_publish(b"\x11\x00\x00\x00\x01"),
     mqtt.MALFORMED_PACKET),
    ("property twice", 5, _v5_publish(b"\x01\x00\x01\x01"), mqtt.PROTOCOL_ERROR),
    ("payload format indicator 2", 5, _v5_publish(b"\x01\x02"), mqtt.PROTOCOL_ERROR),
    ("topic alias 0", 5, _v5_publish(b"\x23\x00\x00"), mqtt.TOPIC_ALIAS_INVALID),
    ("subscription identifier 0", 5, _v5_publish(b"\x0b\x00"), mqtt.PROTOCOL_ERROR),
    ("property block too long", 5, b"\x30\x05\x00\x01t\x09\x01", mqtt.MALFORMED_PACKET),
    ("user property not a pair", 5, _v5_publish(b"\x26\x00\x01a"), mqtt.MALFORMED_PACKET),
    ("PUBACK reason not allowed", 5, b"\x40\x03\x00\x01\x04", mqtt.PROTOCOL_ERROR),
    ("DISCONNECT reason not allowed", 5, b"\xe0\x01\x10", mqtt.PROTOCOL_ERROR),
    ("bytes after DISCONNECT", 4, b"\xe0\x01\x00", mqtt.MALFORMED_PACKET),
    ("CONNACK reserved flags", 4, b"\x20\x02\x02\x00", mqtt.MALFORMED_PACKET),
    ("CONNACK return code 6", 4, b"\x20\x02\x00\x06", mqtt.PROTOCOL_ERROR),
    ("SUBACK bad code", 4, b"\x90\x03\x00\x01\x03", mqtt.PROTOCOL_ERROR),
]


def _connect_frame(flags: int, payload: bytes, level: int = 4, name: bytes = b"MQTT") -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes([level, flags]) + b"\x00\x3c"
    if level == 5:
        body += b"\x00"
    body += payload
    return bytes([0x10, len(body)]) + body


CONNECT_MALFORMED: list[tuple[str, bytes, int]] = [
    ("reserved connect flag", _connect_frame(0x03, b"\x00\x01c"), mqtt.MALFORMED_PACKET),
    ("will QoS without will flag", _connect_frame(0x0A, b"\x00\x01c"), mqtt.MALFORMED_PACKET),
    ("will retain without will flag", _connect_frame(0x22, b"\x00\x01c"), mqtt.MALFORMED_PACKET),
    ("will QoS 3", _connect_frame(0x1E, b"\x00\x01c\x00\x01w\x00\x00"), mqtt.MALFORMED_PACKET),
    ("password without user name", _connect_frame(0x42, b"\x00\x01c\x00\x01p"),
     mqtt.MALFORMED_PACKET),
    ("wildcard in will topic", _connect_frame(0x06, b"\x00\x01c\x00\x01#\x00\x00"),
     mqtt.TOPIC_NAME_INVALID),
    ("bytes after payload", _connect_frame(0x02, b"\x00\x01cX"), mqtt.MALFORMED_PACKET),
    ("client id runs past the end", _connect_frame(0x02, b"\x00\x09c"), mqtt.MALFORMED_PACKET),
    ("protocol level 3", _connect_frame(0x02, b"\x00\x01c", level=3),
     mqtt.UNSUPPORTED_PROTOCOL_VERSION),
    ("protocol name MQIsdp", _connect_frame(0x02, b"\x00\x01c", name=b"MQIsdp"),
     mqtt.UNSUPPORTED_PROTOCOL_VERSION),
    ("protocol level 6", _connect_frame(0x02, b"\x00\x01c", level=6),
     mqtt.UNSUPPORTED_PROTOCOL_VERSION),
    ("ill-formed UTF-8 client id", _connect_frame(0x02, b"\x00\x01\xff"), mqtt.MALFORMED_PACKET),
]


@pytest.mark.parametrize(
    ("version", "frame", "reason"),
    [(v, f, r) for _, v, f, r in MALFORMED],
    ids=[w for w, *_ in MALFORMED],
)
def test_malformed_frame_raises_with_the_reason_code_the_server_must_send(
    version: int, frame: bytes, reason: int
) -> None:
    with pytest.raises(mqtt.MqttError) as caught:
        mqtt.decode(frame, version)
    assert caught.value.reason_code == reason, str(caught.value)
    framer = mqtt.Framer(version=version)
    with pytest.raises(mqtt.MqttError) as caught:
        framer.feed(frame)
    assert caught.value.reason_code == reason


@pytest.mark.parametrize(
    ("frame", "reason"), [(f, r) for _, f, r in CONNECT_MALFORMED],
    ids=[w for w, *_ in CONNECT_MALFORMED],
)
def test_malformed_connect_raises_with_its_reason_code(frame: bytes, reason: int) -> None:
    with pytest.raises(mqtt.MqttError) as caught:
        mqtt.Framer().feed(frame)
    assert caught.value.reason_code == reason, str(caught.value)


def test_packets_before_a_bad_frame_are_handed_over_with_the_error() -> None:
    good = mqtt.encode_publish("a", b"1") + mqtt.encode_publish("b", b"2")
    framer = mqtt.Framer(version=4)
    with pytest.raises(mqtt.MalformedPacket) as caught:
        framer.feed(good + b"\x00\x00" + mqtt.encode_publish("c", b"3"))
    assert [p.topic for p in caught.value.packets] == ["a", "b"]
    assert caught.value.version == 4
    with pytest.raises(mqtt.MqttError):
        framer.feed(mqtt.PINGREQ_FRAME)  # a failed stream stays failed


def test_too_large_packet_is_refused_from_its_fixed_header_alone() -> None:
    framer = mqtt.Framer(version=4, max_packet_size=1000)
    # Only the fixed header of a 2,000-byte PUBLISH has arrived.
    with pytest.raises(mqtt.PacketTooLarge) as caught:
        framer.feed(b"\x30\xcd\x0f")
    assert caught.value.reason_code == mqtt.PACKET_TOO_LARGE


def test_first_packet_of_a_server_stream_must_be_connect() -> None:
    with pytest.raises(mqtt.ProtocolError):
        mqtt.Framer().feed(mqtt.PINGREQ_FRAME)


def test_unsupported_version_error_says_no_version_is_known() -> None:
    with pytest.raises(mqtt.UnsupportedProtocolVersion) as caught:
        mqtt.Framer().feed(_connect_frame(0x02, b"\x00\x01c", level=3))
    assert caught.value.version == 0


@settings(max_examples=300)
@given(st.binary(max_size=64), st.sampled_from([0, 4, 5]))
def test_arbitrary_bytes_decode_or_raise_mqtt_error(data: bytes, version: int) -> None:
    framer = mqtt.Framer(version=version)
    try:
        for packet in framer.feed(data):
            packet.detach()
    except mqtt.MqttError:
        pass


@given(st.integers(1, mqtt.MAX_REMAINING_LENGTH))
def test_any_remaining_length_waits_for_its_body(n: int) -> None:
    varint = bytearray()
    v = n
    while True:
        varint.append((v & 0x7F) | (0x80 if v >> 7 else 0))
        v >>= 7
        if not v:
            break
    framer = mqtt.Framer(version=4)
    assert framer.feed(b"\x30" + bytes(varint)) == []
    assert framer.pending == 1 + len(varint)
