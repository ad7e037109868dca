"""Type stub of the native MQTT 3.1.1/5.0 codec (gateway/_native/mqtt.pyx)."""

from collections.abc import Iterable
from typing import Any

from typing_extensions import Buffer

CONNECT: int
CONNACK: int
PUBLISH: int
PUBACK: int
PUBREC: int
PUBREL: int
PUBCOMP: int
SUBSCRIBE: int
SUBACK: int
UNSUBSCRIBE: int
UNSUBACK: int
PINGREQ: int
PINGRESP: int
DISCONNECT: int
AUTH: int
PACKET_NAMES: dict[int, str]
PINGREQ_FRAME: bytes
PINGRESP_FRAME: bytes
MAX_REMAINING_LENGTH: int
MAX_PACKET_SIZE: int

SUCCESS: int
NORMAL_DISCONNECTION: int
GRANTED_QOS_0: int
GRANTED_QOS_1: int
GRANTED_QOS_2: int
DISCONNECT_WITH_WILL_MESSAGE: int
NO_MATCHING_SUBSCRIBERS: int
NO_SUBSCRIPTION_EXISTED: int
CONTINUE_AUTHENTICATION: int
RE_AUTHENTICATE: int
UNSPECIFIED_ERROR: int
MALFORMED_PACKET: int
PROTOCOL_ERROR: int
IMPLEMENTATION_SPECIFIC_ERROR: int
UNSUPPORTED_PROTOCOL_VERSION: int
CLIENT_IDENTIFIER_NOT_VALID: int
BAD_USER_NAME_OR_PASSWORD: int
NOT_AUTHORIZED: int
SERVER_UNAVAILABLE: int
SERVER_BUSY: int
BANNED: int
SERVER_SHUTTING_DOWN: int
BAD_AUTHENTICATION_METHOD: int
KEEP_ALIVE_TIMEOUT: int
SESSION_TAKEN_OVER: int
TOPIC_FILTER_INVALID: int
TOPIC_NAME_INVALID: int
PACKET_IDENTIFIER_IN_USE: int
PACKET_IDENTIFIER_NOT_FOUND: int
RECEIVE_MAXIMUM_EXCEEDED: int
TOPIC_ALIAS_INVALID: int
PACKET_TOO_LARGE: int
MESSAGE_RATE_TOO_HIGH: int
QUOTA_EXCEEDED: int
ADMINISTRATIVE_ACTION: int
PAYLOAD_FORMAT_INVALID: int
RETAIN_NOT_SUPPORTED: int
QOS_NOT_SUPPORTED: int
USE_ANOTHER_SERVER: int
SERVER_MOVED: int
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: int
CONNECTION_RATE_EXCEEDED: int
MAXIMUM_CONNECT_TIME: int
SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: int
WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: int
REASON_NAMES: dict[int, str]
PROPERTY_IDS: dict[str, int]

class MqttError(ValueError):
    reason_code: int
    packets: list[AnyPacket]
    version: int
    def __init__(self, message: str, reason_code: int | None = None) -> None: ...

class MalformedPacket(MqttError): ...
class ProtocolError(MqttError): ...
class UnsupportedProtocolVersion(MqttError): ...
class TopicFilterInvalid(MqttError): ...
class TopicNameInvalid(MqttError): ...
class TopicAliasInvalid(MqttError): ...
class PacketTooLarge(MqttError): ...

def validate_topic_name(topic: str) -> None: ...
def validate_topic_filter(topic_filter: str) -> None: ...
def parse_shared(topic_filter: str) -> tuple[str, str] | None: ...

class Properties:
    payload_format_indicator: int | None
    message_expiry_interval: int | None
    content_type: str | None
    response_topic: str | None
    correlation_data: bytes | None
    subscription_identifiers: list[int] | None
    session_expiry_interval: int | None
    assigned_client_identifier: str | None
    server_keep_alive: int | None
    authentication_method: str | None
    authentication_data: bytes | None
    request_problem_information: int | None
    will_delay_interval: int | None
    request_response_information: int | None
    response_information: str | None
    server_reference: str | None
    reason_string: str | None
    receive_maximum: int | None
    topic_alias_maximum: int | None
    topic_alias: int | None
    maximum_qos: int | None
    retain_available: int | None
    user_properties: list[tuple[str, str]] | None
    maximum_packet_size: int | None
    wildcard_subscription_available: int | None
    subscription_identifier_available: int | None
    shared_subscription_available: int | None
    def __init__(self, **values: Any) -> None: ...
    def to_dict(self) -> dict[str, Any]: ...

class Packet:
    @property
    def type(self) -> int: ...
    def detach(self) -> Packet: ...
    def encode(self, version: int = ...) -> bytes: ...

class Will:
    topic: str
    payload: bytes | memoryview
    qos: int
    retain: bool
    properties: Properties | None
    def __init__(
        self,
        topic: str,
        payload: Buffer = b"",
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None: ...

class Connect(Packet):
    protocol_name: str
    protocol_level: int
    client_id: str
    clean_start: bool
    keep_alive: int
    username: str | None
    password: bytes | None
    will: Will | None
    properties: Properties | None
    def __init__(
        self,
        client_id: str = "",
        protocol_level: int = 4,
        clean_start: bool = True,
        keep_alive: int = 60,
        username: str | None = None,
        password: bytes | str | None = None,
        will: Will | None = None,
        properties: Properties | None = None,
        protocol_name: str = "MQTT",
    ) -> None: ...
    def encode(self, version: int = 0) -> bytes: ...

class Connack(Packet):
    session_present: bool
    reason_code: int
    properties: Properties | None
    def __init__(
        self,
        session_present: bool = False,
        reason_code: int = 0,
        properties: Properties | None = None,
    ) -> None: ...

class Publish:
    @property
    def type(self) -> int: ...
    topic: str
    payload: bytes | memoryview
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    properties: Properties | None
    @property
    def payload_size(self) -> int: ...
    def __init__(
        self,
        topic: str,
        payload: Buffer = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        packet_id: int = 0,
        properties: Properties | None = None,
    ) -> None: ...
    def detach(self) -> Publish: ...
    def encode(self, version: int = 4) -> bytes: ...

class Ack:
    @property
    def type(self) -> int: ...
    packet_id: int
    reason_code: int
    properties: Properties | None
    def __init__(
        self,
        packet_type: int,
        packet_id: int,
        reason_code: int = 0,
        properties: Properties | None = None,
    ) -> None: ...
    def detach(self) -> Ack: ...
    def encode(self, version: int = 4) -> bytes: ...

class Subscription:
    topic_filter: str
    qos: int
    no_local: bool
    retain_as_published: bool
    retain_handling: int
    def __init__(
        self,
        topic_filter: str,
        qos: int = 0,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
    ) -> None: ...

class Subscribe(Packet):
    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties | None
    def __init__(
        self,
        packet_id: int,
        subscriptions: Iterable[Subscription],
        properties: Properties | None = None,
    ) -> None: ...

class Suback(Packet):
    packet_id: int
    reason_codes: list[int]
    properties: Properties | None
    def __init__(
        self, packet_id: int, reason_codes: Iterable[int], properties: Properties | None = None
    ) -> None: ...

class Unsubscribe(Packet):
    packet_id: int
    topic_filters: list[str]
    properties: Properties | None
    def __init__(
        self, packet_id: int, topic_filters: Iterable[str], properties: Properties | None = None
    ) -> None: ...

class Unsuback(Packet):
    packet_id: int
    reason_codes: list[int]
    properties: Properties | None
    def __init__(
        self, packet_id: int, reason_codes: Iterable[int] = (), properties: Properties | None = None
    ) -> None: ...

class Pingreq(Packet):
    def __init__(self) -> None: ...

class Pingresp(Packet):
    def __init__(self) -> None: ...

class Disconnect(Packet):
    reason_code: int
    properties: Properties | None
    def __init__(self, reason_code: int = 0, properties: Properties | None = None) -> None: ...

class Auth(Packet):
    reason_code: int
    properties: Properties | None
    def __init__(self, reason_code: int = 0, properties: Properties | None = None) -> None: ...

AnyPacket = Packet | Publish | Ack

def decode(data: Buffer, version: int = 4) -> Any: ...

class ReadArena:
    @property
    def size(self) -> int: ...
    def __init__(self, size: int = 262144) -> None: ...

class Framer:
    version: int
    max_packet_size: int
    @property
    def pending(self) -> int: ...
    def __init__(
        self, arena: ReadArena | None = None, max_packet_size: int = ..., version: int = 0
    ) -> None: ...
    def get_buffer(self, sizehint: int = -1) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> list[Any]: ...
    def feed(self, data: Buffer) -> list[Any]: ...

def encode_publish(
    topic: str,
    payload: Buffer,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int = 0,
    properties: Properties | None = None,
    version: int = 4,
) -> bytes: ...
def encode_publish_into(
    out: bytearray,
    topic: str,
    payload: Buffer,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int = 0,
    properties: Properties | None = None,
    version: int = 4,
) -> int: ...
def encode_ack(
    packet_type: int,
    packet_id: int,
    reason_code: int = 0,
    version: int = 4,
    properties: Properties | None = None,
) -> bytes: ...
def encode_ack_into(
    out: bytearray, packet_type: int, packet_id: int, reason_code: int = 0, version: int = 4
) -> None: ...
