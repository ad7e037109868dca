"""No client reads or acts as another device, whatever its client id, credentials or way of
connecting: the ACL's grants (property-tested) and the CONNECT rules (over real sockets)."""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_mqtt_server import RawClient, _tls_connect
from test_mqtt_server import certificates as certificates  # a fixture

from gateway._native import coap, mqtt
from gateway.auth import valid_device_id
from gateway.mqtt.acl import Acl, ServiceAccount

_LEVEL_CHARS = st.sampled_from(["a", "b", "+", "#", "$", "/", "\x00", "é", "😀", "-", " "])
identities = st.one_of(
    st.sampled_from(["", "+", "#", "/", "$", "$SYS", "a/b", "dev-1", "dev-2", "d+", "billing"]),
    st.text(_LEVEL_CHARS, max_size=4),
)
levels = st.one_of(st.sampled_from(["devices", "$shadow", "commands", "+", "#", "dev-1", ""]),
                   st.text(_LEVEL_CHARS, max_size=3))
filters = st.lists(levels, min_size=1, max_size=5).map("/".join)


def _valid_filter(f: str) -> bool:
    try:
        mqtt.validate_topic_filter(f)
    except (TypeError, mqtt.MqttError):
        return False
    return True


def _valid_topic(t: str) -> bool:
    return _valid_filter(t) and "+" not in t and "#" not in t


def _owned_by(identity: str, topic_filter: str) -> bool:
    """True when every topic the filter can match is one of `identity`'s own topics."""
    parts = topic_filter.split("/")
    return (
        len(parts) >= 3
        and parts[0] in ("devices", "$shadow")
        and parts[1] == identity
        and valid_device_id(identity)
    )


ACLS = [
    Acl("device"),
    Acl("device", deny_publish=["$SYS/#"], deny_subscribe=["secret/#"],
        services=[ServiceAccount("billing", ("devices/+/commands/#",),
                                 ("devices/+/telemetry/#",))]),
]


@settings(max_examples=3000, deadline=None)
@given(acl=st.sampled_from(ACLS), identity=identities, topic_filter=filters)
def test_a_device_is_granted_only_its_own_topics(
    acl: Acl, identity: str, topic_filter: str
) -> None:
    if acl.is_service(identity):
        return  # service accounts get what the ACL file gives them, tested elsewhere
    if _valid_filter(topic_filter) and acl.can_subscribe(identity, topic_filter):
        assert _owned_by(identity, topic_filter), (identity, topic_filter)
    if _valid_topic(topic_filter) and acl.can_publish(identity, topic_filter):
        assert _owned_by(identity, topic_filter), (identity, topic_filter)


def _connack(client: RawClient, client_id: str, **kw: Any) -> int:
    packet = client.connect(client_id, **kw)
    assert packet is not None and packet.type == mqtt.CONNACK
    return int(packet.reason_code)


def test_an_anonymous_client_id_cannot_widen_the_acl(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True)
    for client_id in ("+", "#", "a/b", "$sys"):
        client = RawClient(gw.mqtt_port, version=5)
        assert _connack(client, client_id) == mqtt.CLIENT_IDENTIFIER_NOT_VALID, client_id
        client.close()


def test_an_anonymous_client_cannot_act_as_a_registered_device(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True)
    gw.gateway.registry.add("dev-1", "secret-1")
    owner = RawClient(gw.mqtt_port, version=5)
    assert _connack(owner, "dev-1", username="dev-1", password=b"secret-1") == 0
    intruder = RawClient(gw.mqtt_port, version=5)
    assert _connack(intruder, "dev-1") == mqtt.NOT_AUTHORIZED
    intruder.close()
    # The owner was not kicked: it still gets answers.
    owner.send(mqtt.PINGREQ_FRAME)
    assert owner.recv().type == mqtt.PINGRESP
    # An anonymous device of its own may not read the registered one's topics either.
    other = RawClient(gw.mqtt_port, version=5)
    assert _connack(other, "anon-7") == 0
    other.send(mqtt.Subscribe(1, [mqtt.Subscription("$shadow/dev-1/#", 1),
                                  mqtt.Subscription("devices/dev-1/commands/#", 1),
                                  mqtt.Subscription("$shadow/+/#", 1)]).encode(5))
    assert list(other.recv().reason_codes) == [mqtt.NOT_AUTHORIZED] * 3
    other.close()
    owner.close()


def test_a_device_cannot_connect_with_another_devices_client_id(gateway_factory: Any) -> None:
    gw = gateway_factory(acl="open")  # even where every topic is open to everyone
    gw.gateway.registry.add("dev-1", "secret-1")
    gw.gateway.registry.add("dev-2", "secret-2")
    owner = RawClient(gw.mqtt_port, version=5)
    assert _connack(owner, "dev-1", username="dev-1", password=b"secret-1") == 0
    other = RawClient(gw.mqtt_port, version=5)
    assert _connack(other, "dev-1", username="dev-2", password=b"secret-2") == mqtt.NOT_AUTHORIZED
    other.close()
    owner.send(mqtt.PINGREQ_FRAME)
    assert owner.recv().type == mqtt.PINGRESP
    owner.close()


def test_anonymous_coap_requests_cannot_act_as_a_registered_device(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True)
    gw.gateway.registry.add("dev-1", "secret-1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)

    def code(path: str, query: list[tuple[int, Any]] | None = None) -> int:
        sock.sendto(coap.encode_request(coap.CON, coap.GET if "shadow" in path else coap.POST,
                                        code.mid, b"t%d" % code.mid, path, query or [], b"1"),
                    ("127.0.0.1", gw.coap_port))
        code.mid += 1
        while True:
            reply = coap.decode(sock.recv(2048))
            if reply.code:  # not an empty ACK
                return int(reply.code)

    code.mid = 1  # type: ignore[attr-defined]
    assert code("/telemetry/dev-1") == coap.UNAUTHORIZED
    assert code("/shadow/dev-1") == coap.UNAUTHORIZED
    assert code("/telemetry/dev-1", [(coap.URI_QUERY, "t=secret-1")]) == coap.CHANGED
    assert code("/telemetry/anon-7") == coap.CHANGED  # an unregistered id, as before
    sock.close()


def test_an_anonymous_client_goes_when_its_id_is_registered(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True)
    anon = RawClient(gw.mqtt_port, version=5)
    props = mqtt.Properties(session_expiry_interval=300)
    assert _connack(anon, "dev-9", properties=props) == 0
    anon.send(mqtt.Subscribe(1, [mqtt.Subscription("devices/dev-9/commands/#", 1)]).encode(5))
    assert anon.recv().type == mqtt.SUBACK
    gw.gateway.registry.add("dev-9", "secret-9")
    gw.call(gw.gateway.registry_changed)  # what the sweep does every half second
    gone = anon.recv()
    assert gone is not None and gone.type == mqtt.DISCONNECT
    assert gone.reason_code == mqtt.ADMINISTRATIVE_ACTION
    anon.close()
    owner = RawClient(gw.mqtt_port, version=5)
    ack = owner.connect("dev-9", username="dev-9", password=b"secret-9", clean_start=False,
                        properties=props)
    assert ack.reason_code == 0 and not ack.session_present  # nothing of the anonymous one
    owner.close()
    again = RawClient(gw.mqtt_port, version=5)  # the id is not remembered as free any more
    assert _connack(again, "dev-9") == mqtt.NOT_AUTHORIZED
    again.close()


def test_a_certificate_whose_name_is_no_device_id_is_refused(
    gateway_factory: Any, certificates: dict[str, str]
) -> None:
    """The CA signed it, but a CN of `#` must not become an identity that widens the ACL."""
    c = certificates
    gw = gateway_factory(
        tls_cert=c["srv.pem"], tls_key=c["srv.key"], tls_client_ca=c["ca.pem"], mqtts_port=0
    )
    refused = _tls_connect(gw.mqtts_port, "#", c["ca.pem"], c["#.pem"], c["#.key"])
    assert refused is not None and refused.value == mqtt.CLIENT_IDENTIFIER_NOT_VALID


def test_registering_an_id_ends_only_its_anonymous_coap_observations(
    gateway_factory: Any,
) -> None:
    from test_coap_endpoint import RawCoap

    gw = gateway_factory(allow_anonymous=True)
    anon, owner = RawCoap(gw.coap_port), RawCoap(gw.coap_port)
    try:
        anon.request(coap.GET, "/commands/dev-5", 1, b"a1", options=[(coap.OBSERVE, 0)])
        assert anon.recv().observe is not None
        gw.gateway.registry.add("dev-5", "secret-5")
        owner.request(coap.GET, "/commands/dev-5?t=secret-5", 2, b"o1",
                      options=[(coap.OBSERVE, 0)])
        assert owner.recv().observe is not None
        gw.call(gw.gateway.registry_changed)  # what the sweep does every half second
        last = anon.recv()
        assert last.code == coap.UNAUTHORIZED and last.token == b"a1"
        observers = gw.gateway.coap.observers
        assert gw.call(lambda: [o.token for o in observers.observers("commands", "dev-5")]) == [
            b"o1"
        ]
    finally:
        anon.close()
        owner.close()
