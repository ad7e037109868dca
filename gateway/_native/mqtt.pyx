# cython: language_level=3
"""MQTT 3.1.1 and 5.0 codec: a zero-copy stream framer, decoders and encoders for all 15 packets.

Reading (server or client):

    framer = Framer(arena)                 # arena: one ReadArena shared by every connection of a loop
    view = framer.get_buffer(-1)           # asyncio.BufferedProtocol.get_buffer
    packets = framer.buffer_updated(n)     # every whole frame of that read, decoded in one call

`framer.feed(data)` does the same for bytes from anywhere (tests, clients). A partial frame is kept
across reads (any split); a frame over `max_packet_size` is refused from its fixed header alone.
Decoded PUBLISH packets are lazy: `topic` is validated at decode time but made into a `str` on
first access, and `payload` is a read-only memoryview of the read buffer (or, up to 512 bytes, a
copy: cheaper than a view). Those views are valid until the next read on the same arena:
`packet.detach()` (or `bytes(packet.payload)`) keeps one.

A frame that breaks the specification raises a subclass of `MqttError` whose `reason_code` is the
code the server must send (0x81 Malformed Packet, 0x82 Protocol Error, 0x95 Packet too large, ...);
`exc.packets` holds the packets decoded before it in the same read. The framer is then unusable:
the connection must be closed.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memchr, memcpy

from gateway._native._bytes cimport (
    CUR_OK,
    CUR_VARINT_TOO_LONG,
    UTF8_HAS_NUL,
    UTF8_OK,
    Cursor,
    cur_init,
    cur_left,
    cur_lstring,
    cur_u8,
    cur_u16,
    cur_u32,
    cur_varint,
    load_u16be,
    store_u16be,
    store_u32be,
    store_varint,
    utf8_check,
    varint_len,
)

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    object PyUnicode_DecodeUTF8(const char *s, Py_ssize_t size, const char *errors)
    object PyMemoryView_FromObject(object obj)


# ---- constants ------------------------------------------------------------------------------

# Packet types (the high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

PACKET_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

PINGREQ_FRAME = b"\xc0\x00"
PINGRESP_FRAME = b"\xd0\x00"

MAX_REMAINING_LENGTH = 268_435_455
MAX_PACKET_SIZE = MAX_REMAINING_LENGTH + 5

# Reason codes (MQTT 5.0 section 2.4); 3.1.1 CONNACK return codes are 0-5.
SUCCESS = NORMAL_DISCONNECTION = GRANTED_QOS_0 = 0x00
GRANTED_QOS_1 = 0x01
GRANTED_QOS_2 = 0x02
DISCONNECT_WITH_WILL_MESSAGE = 0x04
NO_MATCHING_SUBSCRIBERS = 0x10
NO_SUBSCRIPTION_EXISTED = 0x11
CONTINUE_AUTHENTICATION = 0x18
RE_AUTHENTICATE = 0x19
UNSPECIFIED_ERROR = 0x80
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
IMPLEMENTATION_SPECIFIC_ERROR = 0x83
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CLIENT_IDENTIFIER_NOT_VALID = 0x85
BAD_USER_NAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
SERVER_BUSY = 0x89
BANNED = 0x8A
SERVER_SHUTTING_DOWN = 0x8B
BAD_AUTHENTICATION_METHOD = 0x8C
KEEP_ALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_IDENTIFIER_IN_USE = 0x91
PACKET_IDENTIFIER_NOT_FOUND = 0x92
RECEIVE_MAXIMUM_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
ADMINISTRATIVE_ACTION = 0x98
PAYLOAD_FORMAT_INVALID = 0x99
RETAIN_NOT_SUPPORTED = 0x9A
QOS_NOT_SUPPORTED = 0x9B
USE_ANOTHER_SERVER = 0x9C
SERVER_MOVED = 0x9D
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
CONNECTION_RATE_EXCEEDED = 0x9F
MAXIMUM_CONNECT_TIME = 0xA0
SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2

REASON_NAMES = {
    0x00: "Success", 0x01: "Granted QoS 1", 0x02: "Granted QoS 2",
    0x04: "Disconnect with Will Message", 0x10: "No matching subscribers",
    0x11: "No subscription existed", 0x18: "Continue authentication", 0x19: "Re-authenticate",
    0x80: "Unspecified error", 0x81: "Malformed Packet", 0x82: "Protocol Error",
    0x83: "Implementation specific error", 0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid", 0x86: "Bad User Name or Password",
    0x87: "Not authorized", 0x88: "Server unavailable", 0x89: "Server busy", 0x8A: "Banned",
    0x8B: "Server shutting down", 0x8C: "Bad authentication method",
    0x8D: "Keep Alive timeout", 0x8E: "Session taken over", 0x8F: "Topic Filter invalid",
    0x90: "Topic Name invalid", 0x91: "Packet Identifier in use",
    0x92: "Packet Identifier not found", 0x93: "Receive Maximum exceeded",
    0x94: "Topic Alias invalid", 0x95: "Packet too large", 0x96: "Message rate too high",
    0x97: "Quota exceeded", 0x98: "Administrative action", 0x99: "Payload format invalid",
    0x9A: "Retain not supported", 0x9B: "QoS not supported", 0x9C: "Use another server",
    0x9D: "Server moved", 0x9E: "Shared Subscriptions not supported",
    0x9F: "Connection rate exceeded", 0xA0: "Maximum connect time",
    0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported",
}

# The reason codes each MQTT 5 packet may carry (5.0 sections 3.2.2.2, 3.4.2.1, ...).
_CONNACK_CODES = frozenset([0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
                            0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F])
_PUBACK_CODES = frozenset([0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99])
_PUBREL_CODES = frozenset([0x00, 0x92])
_SUBACK_CODES = frozenset([0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1,
                           0xA2])
_UNSUBACK_CODES = frozenset([0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91])
_DISCONNECT_CODES = frozenset([0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D,
                               0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
                               0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2])
_AUTH_CODES = frozenset([0x00, 0x18, 0x19])
_V4_CONNACK_CODES = frozenset([0, 1, 2, 3, 4, 5])
_V4_SUBACK_CODES = frozenset([0, 1, 2, 0x80])


# ---- errors ---------------------------------------------------------------------------------

class MqttError(ValueError):
    """A frame that breaks the specification. `reason_code` is what the server must answer
    (in CONNACK or DISCONNECT); `packets` holds the packets decoded before it in the same read;
    `version` is the protocol level known when it happened (0: no CONNECT seen yet)."""

    reason_code = UNSPECIFIED_ERROR

    def __init__(self, message, reason_code=None):
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code
        self.packets = []
        self.version = 0


class MalformedPacket(MqttError):
    reason_code = MALFORMED_PACKET


class ProtocolError(MqttError):
    reason_code = PROTOCOL_ERROR


class UnsupportedProtocolVersion(MqttError):
    reason_code = UNSUPPORTED_PROTOCOL_VERSION


class TopicFilterInvalid(MqttError):
    reason_code = TOPIC_FILTER_INVALID


class TopicNameInvalid(MqttError):
    reason_code = TOPIC_NAME_INVALID


class TopicAliasInvalid(MqttError):
    reason_code = TOPIC_ALIAS_INVALID


class PacketTooLarge(MqttError):
    reason_code = PACKET_TOO_LARGE


cdef object _malformed(str why):
    return MalformedPacket(why)


cdef object _short(str what):
    return MalformedPacket(f"{what} runs past the end of the packet")


# ---- strings and topics -------------------------------------------------------------------

cdef object _decode_str(const unsigned char *p, Py_ssize_t n):
    """A validated UTF-8 string (1.5.4: ill-formed UTF-8 and U+0000 are malformed)."""
    cdef int r = utf8_check(p, n)
    if r != UTF8_OK:
        if r == UTF8_HAS_NUL:
            raise _malformed("a string contains U+0000")
        raise _malformed("a string is not well-formed UTF-8")
    return PyUnicode_DecodeUTF8(<const char *>p, n, NULL)


cdef object _read_str(Cursor *c, str what):
    cdef Py_ssize_t start, n
    if cur_lstring(c, &start, &n) != CUR_OK:
        raise _short(what)
    return _decode_str(c.buf + start, n)


cdef bytes _read_bin(Cursor *c, str what):
    cdef Py_ssize_t start, n
    if cur_lstring(c, &start, &n) != CUR_OK:
        raise _short(what)
    return PyBytes_FromStringAndSize(<const char *>c.buf + start, n)


cdef inline int _check_topic_name(const unsigned char *p, Py_ssize_t n) except -1:
    """Topic names carry no wildcards (3.3.2-2) and are valid UTF-8 without U+0000."""
    cdef int r = utf8_check(p, n)
    if r != UTF8_OK:
        raise _malformed("topic name contains U+0000" if r == UTF8_HAS_NUL
                         else "topic name is not well-formed UTF-8")
    if memchr(p, b'+', n) != NULL or memchr(p, b'#', n) != NULL:
        raise TopicNameInvalid("topic name contains a wildcard (+ or #)")
    return 0


cdef int _check_filter_bytes(const unsigned char *p, Py_ssize_t n) except -1:
    """`#` only as the whole last level, `+` only as a whole level (4.7.1)."""
    cdef Py_ssize_t i
    cdef unsigned char ch
    if n == 0:
        raise ProtocolError("empty topic filter")
    for i in range(n):
        ch = p[i]
        if ch == b'#':
            if i != n - 1 or (i > 0 and p[i - 1] != b'/'):
                raise TopicFilterInvalid("'#' must be the last level, on its own")
        elif ch == b'+':
            if (i > 0 and p[i - 1] != b'/') or (i < n - 1 and p[i + 1] != b'/'):
                raise TopicFilterInvalid("'+' must fill a whole level")
    return 0


cdef object _read_filter(Cursor *c):
    cdef Py_ssize_t start, n
    if cur_lstring(c, &start, &n) != CUR_OK:
        raise _short("topic filter")
    text = _decode_str(c.buf + start, n)
    _check_filter_bytes(c.buf + start, n)
    if n >= 7 and memchr(c.buf + start, b'$', 1) != NULL and text.startswith("$share/"):
        parse_shared(text)  # raises TopicFilterInvalid for a bad share name or filter
    return text


def validate_topic_name(str topic):
    """Raise TopicNameInvalid/MalformedPacket unless `topic` may be published to."""
    cdef Py_ssize_t n
    cdef const char *p = PyUnicode_AsUTF8AndSize(topic, &n)
    if n == 0:
        raise TopicNameInvalid("empty topic name")
    if n > 65535:
        raise TopicNameInvalid("topic name longer than 65535 bytes")
    _check_topic_name(<const unsigned char *>p, n)


def validate_topic_filter(str topic_filter):
    """Raise TopicFilterInvalid/ProtocolError unless `topic_filter` may be subscribed to."""
    cdef Py_ssize_t n
    cdef const char *p = PyUnicode_AsUTF8AndSize(topic_filter, &n)
    if n > 65535:
        raise TopicFilterInvalid("topic filter longer than 65535 bytes")
    if memchr(p, 0, n) != NULL:
        raise MalformedPacket("topic filter contains U+0000")
    _check_filter_bytes(<const unsigned char *>p, n)
    if topic_filter.startswith("$share/"):
        parse_shared(topic_filter)


def parse_shared(str topic_filter):
    """(group, filter) for `$share/{group}/{filter}`, None for an ordinary filter (5.0 4.8.2)."""
    if not topic_filter.startswith("$share/"):
        return None
    rest = topic_filter[7:]
    group, sep, inner = rest.partition("/")
    if not group or not sep or not inner or "+" in group or "#" in group:
        raise TopicFilterInvalid(f"bad shared subscription {topic_filter!r}")
    return group, inner


# ---- properties (MQTT 5.0 section 2.2.2) ----------------------------------------------------

cdef enum PropKind:
    P_BYTE, P_U16, P_U32, P_VARINT, P_STR, P_BIN, P_PAIR

# Where a property may appear: a bit per packet type, and bit 0 for the will properties.
cdef enum:
    W = 1 << 0
    B_CONNECT = 1 << 1
    B_CONNACK = 1 << 2
    B_PUBLISH = 1 << 3
    B_PUBACK = 1 << 4
    B_PUBREC = 1 << 5
    B_PUBREL = 1 << 6
    B_PUBCOMP = 1 << 7
    B_SUBSCRIBE = 1 << 8
    B_SUBACK = 1 << 9
    B_UNSUBSCRIBE = 1 << 10
    B_UNSUBACK = 1 << 11
    B_DISCONNECT = 1 << 14
    B_AUTH = 1 << 15
    B_ACKS = B_PUBACK | B_PUBREC | B_PUBREL | B_PUBCOMP

# id: (attribute, kind, where allowed)
_PROPERTIES = {
    0x01: ("payload_format_indicator", P_BYTE, B_PUBLISH | W),
    0x02: ("message_expiry_interval", P_U32, B_PUBLISH | W),
    0x03: ("content_type", P_STR, B_PUBLISH | W),
    0x08: ("response_topic", P_STR, B_PUBLISH | W),
    0x09: ("correlation_data", P_BIN, B_PUBLISH | W),
    0x0B: ("subscription_identifiers", P_VARINT, B_PUBLISH | B_SUBSCRIBE),
    0x11: ("session_expiry_interval", P_U32, B_CONNECT | B_CONNACK | B_DISCONNECT),
    0x12: ("assigned_client_identifier", P_STR, B_CONNACK),
    0x13: ("server_keep_alive", P_U16, B_CONNACK),
    0x15: ("authentication_method", P_STR, B_CONNECT | B_CONNACK | B_AUTH),
    0x16: ("authentication_data", P_BIN, B_CONNECT | B_CONNACK | B_AUTH),
    0x17: ("request_problem_information", P_BYTE, B_CONNECT),
    0x18: ("will_delay_interval", P_U32, W),
    0x19: ("request_response_information", P_BYTE, B_CONNECT),
    0x1A: ("response_information", P_STR, B_CONNACK),
    0x1C: ("server_reference", P_STR, B_CONNACK | B_DISCONNECT),
    0x1F: ("reason_string", P_STR, B_CONNACK | B_ACKS | B_SUBACK | B_UNSUBACK | B_DISCONNECT
           | B_AUTH),
    0x21: ("receive_maximum", P_U16, B_CONNECT | B_CONNACK),
    0x22: ("topic_alias_maximum", P_U16, B_CONNECT | B_CONNACK),
    0x23: ("topic_alias", P_U16, B_PUBLISH),
    0x24: ("maximum_qos", P_BYTE, B_CONNACK),
    0x25: ("retain_available", P_BYTE, B_CONNACK),
    0x26: ("user_properties", P_PAIR, 0xFFFF),
    0x27: ("maximum_packet_size", P_U32, B_CONNECT | B_CONNACK),
    0x28: ("wildcard_subscription_available", P_BYTE, B_CONNACK),
    0x29: ("subscription_identifier_available", P_BYTE, B_CONNACK),
    0x2A: ("shared_subscription_available", P_BYTE, B_CONNACK),
}
PROPERTY_IDS = {name: pid for pid, (name, _, _) in _PROPERTIES.items()}

# Properties whose value must be 0 or 1, and ones that may not be 0 (Protocol Errors).
_BOOLEAN_PROPS = frozenset([0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A])
_NONZERO_PROPS = frozenset([0x0B, 0x21, 0x27])


@cython.freelist(64)
cdef class Properties:
    """MQTT 5 properties by name; an attribute is None when the property is absent.
    `user_properties` is a list of (name, value) pairs, `subscription_identifiers` a list."""

    cdef public object payload_format_indicator, message_expiry_interval, content_type
    cdef public object response_topic, correlation_data, subscription_identifiers
    cdef public object session_expiry_interval, assigned_client_identifier, server_keep_alive
    cdef public object authentication_method, authentication_data
    cdef public object request_problem_information, will_delay_interval
    cdef public object request_response_information, response_information, server_reference
    cdef public object reason_string, receive_maximum, topic_alias_maximum, topic_alias
    cdef public object maximum_qos, retain_available, user_properties, maximum_packet_size
    cdef public object wildcard_subscription_available, subscription_identifier_available
    cdef public object shared_subscription_available

    def __init__(self, **values):
        for name, value in values.items():
            if name not in PROPERTY_IDS:
                raise TypeError(f"no MQTT property named {name!r}")
            setattr(self, name, value)

    def to_dict(self):
        """The properties that are present, by name."""
        out = {}
        for name in PROPERTY_IDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def __eq__(self, other):
        if not isinstance(other, Properties):
            return NotImplemented
        return _norm_props(self) == _norm_props(other)

    def __repr__(self):
        inner = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"Properties({inner})"


cdef dict _norm_props(Properties p):
    d = p.to_dict()
    for key in ("user_properties", "subscription_identifiers"):
        if key in d:
            d[key] = [tuple(x) if isinstance(x, list) else x for x in d[key]]
            if not d[key]:
                del d[key]
    return d


cdef inline int _varint(Cursor *c, uint32_t *out, str what) except -1:
    """An MQTT variable byte integer in its shortest form (1.5.5-1), else MalformedPacket."""
    cdef Py_ssize_t start = c.pos
    if cur_varint(c, out) != CUR_OK:
        raise _malformed(f"bad {what}")
    if c.pos - start != varint_len(out[0]):
        raise _malformed(f"{what} not in its shortest form")
    return 0


cdef object _read_properties(Cursor *c, int where):
    """The property block at the cursor, validated for the packet `where` (a B_* bit)."""
    cdef uint32_t length, pid, value
    cdef Py_ssize_t start, n, end
    cdef uint64_t seen = 0
    cdef Properties props
    cdef Cursor sub
    _varint(c, &length, "property length")
    if length == 0:
        return None
    if <Py_ssize_t>length > cur_left(c):
        raise _short("property block")
    end = c.pos + length
    cur_init(&sub, c.buf, c.pos, end)
    c.pos = end
    props = Properties.__new__(Properties)
    while sub.pos < sub.end:
        _varint(&sub, &pid, "property identifier")
        info = _PROPERTIES.get(pid)
        if info is None:
            raise _malformed(f"unknown property 0x{pid:02x}")
        name, kind, allowed = info
        if not (<int>allowed & where):
            raise _malformed(f"property {name} is not allowed in this packet")
        if pid != 0x26 and not (pid == 0x0B and where == B_PUBLISH):
            if seen & ((<uint64_t>1) << pid):
                raise ProtocolError(f"property {name} appears more than once")
            seen |= (<uint64_t>1) << pid
        if kind == P_BYTE:
            if cur_u8(&sub, &value) != CUR_OK:
                raise _short(name)
            if pid in _BOOLEAN_PROPS and value > 1:
                raise ProtocolError(f"property {name} must be 0 or 1")
            setattr(props, name, value)
        elif kind == P_U16:
            if cur_u16(&sub, &value) != CUR_OK:
                raise _short(name)
            if value == 0 and (pid == 0x21 or pid == 0x23):
                if pid == 0x23:
                    raise TopicAliasInvalid("topic alias 0")
                raise ProtocolError("receive maximum 0")
            setattr(props, name, value)
        elif kind == P_U32:
            if cur_u32(&sub, &value) != CUR_OK:
                raise _short(name)
            if value == 0 and pid == 0x27:
                raise ProtocolError("maximum packet size 0")
            setattr(props, name, value)
        elif kind == P_VARINT:
            _varint(&sub, &value, name)
            if value == 0:
                raise ProtocolError("subscription identifier 0")
            if props.subscription_identifiers is None:
                props.subscription_identifiers = [value]
            else:
                props.subscription_identifiers.append(value)
        elif kind == P_STR:
            setattr(props, name, _read_str(&sub, name))
        elif kind == P_BIN:
            setattr(props, name, _read_bin(&sub, name))
        else:  # P_PAIR
            key = _read_str(&sub, name)
            val = _read_str(&sub, name)
            if props.user_properties is None:
                props.user_properties = [(key, val)]
            else:
                props.user_properties.append((key, val))
    return props


cdef class _Writer:
    """A growable output for the packets off the hot path (PUBLISH and acks write directly)."""

    cdef bytearray buf

    def __cinit__(self):
        self.buf = bytearray()

    cdef inline void u8(self, uint32_t v):
        self.buf.append(v & 0xFF)

    cdef inline void u16(self, uint32_t v):
        self.buf.append((v >> 8) & 0xFF)
        self.buf.append(v & 0xFF)

    cdef inline void u32(self, uint32_t v):
        self.u16(v >> 16)
        self.u16(v & 0xFFFF)

    cdef void varint(self, uint32_t v):
        cdef unsigned char tmp[4]
        cdef Py_ssize_t n = store_varint(tmp, v)
        self.buf += tmp[:n]

    cdef void raw(self, const unsigned char *p, Py_ssize_t n):
        self.buf += p[:n]

    cdef int string(self, str s) except -1:
        cdef Py_ssize_t n
        cdef const char *p = PyUnicode_AsUTF8AndSize(s, &n)
        if n > 65535:
            raise ValueError("an MQTT string is at most 65535 bytes")
        if memchr(p, 0, n) != NULL:
            raise ValueError("an MQTT string may not contain U+0000")
        self.u16(n)
        self.raw(<const unsigned char *>p, n)
        return 0

    cdef int binary(self, object data) except -1:
        cdef bytes b = bytes(data)
        if len(b) > 65535:
            raise ValueError("MQTT binary data is at most 65535 bytes")
        self.u16(len(b))
        self.buf += b
        return 0


cdef int _write_properties(_Writer w, Properties props) except -1:
    """The property block (length and properties) for `props` (None: an empty block)."""
    if props is None:
        w.u8(0)
        return 0
    cdef _Writer body = _Writer()
    for pid, (name, kind, _) in _PROPERTIES.items():
        value = getattr(props, name)
        if value is None:
            continue
        if kind == P_PAIR:
            for key, val in value:
                body.varint(pid)
                body.string(key)
                body.string(val)
            continue
        if kind == P_VARINT:
            for ident in value:
                if not 1 <= ident <= MAX_REMAINING_LENGTH:
                    raise ValueError(f"subscription identifier {ident} out of range")
                body.varint(pid)
                body.varint(ident)
            continue
        body.varint(pid)
        if kind == P_BYTE:
            if not 0 <= value <= 255:
                raise ValueError(f"{name}={value} is not a byte")
            body.u8(value)
        elif kind == P_U16:
            if not 0 <= value <= 65535:
                raise ValueError(f"{name}={value} is not a two byte integer")
            body.u16(value)
        elif kind == P_U32:
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name}={value} is not a four byte integer")
            body.u32(value)
        elif kind == P_STR:
            body.string(value)
        else:
            body.binary(value)
    if len(body.buf) > MAX_REMAINING_LENGTH:
        raise ValueError("property block too long")
    w.varint(len(body.buf))
    w.buf += body.buf
    return 0


cdef bytes _properties_block(Properties props):
    cdef _Writer w = _Writer()
    _write_properties(w, props)
    return bytes(w.buf)


cdef bytes _frame(int first_byte, _Writer body):
    """Fixed header + body."""
    cdef Py_ssize_t n = len(body.buf)
    if n > MAX_REMAINING_LENGTH:
        raise ValueError("packet longer than the MQTT maximum")
    cdef unsigned char head[5]
    head[0] = first_byte
    cdef Py_ssize_t h = 1 + store_varint(head + 1, n)
    return head[:h] + bytes(body.buf)


# ---- packets --------------------------------------------------------------------------------

cdef class Packet:
    """Base of every packet: `type` is the packet type number."""

    cdef readonly int type

    def detach(self):
        """Copy whatever still points into the read buffer (only PUBLISH does); returns self."""
        return self

    def encode(self, int version=4):
        raise NotImplementedError

    def __eq__(self, other):
        return _packet_eq(self, other)

    def __hash__(self):
        return id(self)

    def _key(self):
        return (self.type,)

    def __repr__(self):
        return _packet_repr(self)


cdef object _packet_eq(a, b):
    if type(a) is not type(b):
        return NotImplemented
    return a._key() == b._key()


cdef str _packet_repr(p):
    return f"{type(p).__name__}{p._key()[1:]!r}"


cdef class Will:
    """The will message of a CONNECT."""

    cdef public str topic
    cdef public object payload
    cdef public int qos
    cdef public bint retain
    cdef public object properties

    def __init__(self, str topic, payload=b"", int qos=0, bint retain=False, properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties

    def __eq__(self, other):
        if not isinstance(other, Will):
            return NotImplemented
        o = <Will>other
        return (self.topic, bytes(self.payload), self.qos, self.retain) == (
            o.topic, bytes(o.payload), o.qos, o.retain
        ) and _props_equal(self.properties, o.properties)

    def __repr__(self):
        return f"Will({self.topic!r}, {bytes(self.payload)!r}, qos={self.qos}, retain={self.retain})"


cdef bint _props_equal(a, b):
    """None and an empty Properties are the same on the wire."""
    if a is None and b is None:
        return True
    if a is None:
        return not _norm_props(b)
    if b is None:
        return not _norm_props(a)
    return a == b


cdef class Connect(Packet):
    cdef public str protocol_name
    cdef public int protocol_level
    cdef public str client_id
    cdef public bint clean_start
    cdef public int keep_alive
    cdef public object username  # str or None
    cdef public object password  # bytes or None
    cdef public object will      # Will or None
    cdef public object properties

    def __init__(self, str client_id="", int protocol_level=4, bint clean_start=True,
                 int keep_alive=60, username=None, password=None, will=None, properties=None,
                 str protocol_name="MQTT"):
        self.type = CONNECT
        self.client_id = client_id
        self.protocol_level = protocol_level
        self.clean_start = clean_start
        self.keep_alive = keep_alive
        self.username = username
        self.password = None if password is None else (
            password.encode() if isinstance(password, str) else bytes(password))
        self.will = will
        self.properties = properties
        self.protocol_name = protocol_name

    def _key(self):
        return (self.type, self.protocol_name, self.protocol_level, self.client_id,
                self.clean_start, self.keep_alive, self.username, self.password, self.will,
                _PropsKey(self.properties))

    def encode(self, int version=0):
        """The CONNECT frame; `version` defaults to `protocol_level`."""
        if version == 0:
            version = self.protocol_level
        if not 0 <= self.keep_alive <= 65535:
            raise ValueError("keep_alive is 0 to 65535 seconds")
        cdef _Writer w = _Writer()
        w.string(self.protocol_name)
        w.u8(self.protocol_level)
        cdef int flags = 0
        if self.clean_start:
            flags |= 0x02
        cdef Will will = self.will
        if will is not None:
            if not 0 <= will.qos <= 2:
                raise ValueError("will qos is 0, 1 or 2")
            flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if self.password is not None:
            if self.username is None and version != 5:
                raise ValueError("MQTT 3.1.1 needs a user name with a password")
            flags |= 0x40
        if self.username is not None:
            flags |= 0x80
        w.u8(flags)
        w.u16(self.keep_alive)
        if version == 5:
            _write_properties(w, self.properties)
        w.string(self.client_id)
        if will is not None:
            if version == 5:
                _write_properties(w, will.properties)
            validate_topic_name(will.topic)
            w.string(will.topic)
            w.binary(will.payload)
        if self.username is not None:
            w.string(self.username)
        if self.password is not None:
            w.binary(self.password)
        return _frame(CONNECT << 4, w)


cdef class _PropsKey:
    """Compares properties with None == empty, for packet equality."""

    cdef object props

    def __init__(self, props):
        self.props = props

    def __eq__(self, other):
        return _props_equal(self.props, (<_PropsKey>other).props)

    def __repr__(self):
        return repr(self.props)


cdef class Connack(Packet):
    cdef public bint session_present
    cdef public int reason_code
    cdef public object properties

    def __init__(self, bint session_present=False, int reason_code=0, properties=None):
        self.type = CONNACK
        self.session_present = session_present
        self.reason_code = reason_code
        self.properties = properties

    def _key(self):
        return (self.type, self.session_present, self.reason_code, _PropsKey(self.properties))

    def encode(self, int version=4):
        cdef _Writer w = _Writer()
        w.u8(1 if self.session_present else 0)
        w.u8(self.reason_code)
        if version == 5:
            _write_properties(w, self.properties)
        return _frame(CONNACK << 4, w)


# A small payload is copied into bytes when first read: measured, that is cheaper than making
# any view (a 64-byte copy ~30 ns, a memoryview ~60 ns); larger ones are zero-copy views.
cdef Py_ssize_t _COPY_PAYLOAD_UP_TO = 512


@cython.freelist(1024)
cdef class Publish:
    """A PUBLISH. Decoded ones are lazy: `topic` becomes a str on first access and `payload`
    bytes (up to 512 bytes: a copy is cheaper than a view) or a read-only memoryview of the
    read buffer (valid until the next read; `detach()` keeps it).
    (Not a Packet subclass: Cython keeps freelists for base classes only.)"""

    cdef readonly int type
    cdef public int qos
    cdef public bint retain
    cdef public bint dup
    cdef public int packet_id
    cdef public object properties
    cdef object _topic          # str once made
    cdef object _payload        # bytes-like once made
    cdef object _owner          # the read buffer the offsets point into
    cdef Py_ssize_t _topic_at, _topic_len, _payload_at, _payload_len

    def __init__(self, str topic, payload=b"", int qos=0, bint retain=False, bint dup=False,
                 int packet_id=0, properties=None):
        self.type = PUBLISH
        self._topic = topic
        self._payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = properties

    @property
    def topic(self):
        if self._topic is None:
            self._topic = PyUnicode_DecodeUTF8(
                _owner_ptr(self._owner) + self._topic_at, self._topic_len, NULL
            )
        return self._topic

    @topic.setter
    def topic(self, str value):
        self._topic = value

    @property
    def payload(self):
        if self._payload is None:
            if self._payload_len <= _COPY_PAYLOAD_UP_TO:
                self._payload = PyBytes_FromStringAndSize(
                    _owner_ptr(self._owner) + self._payload_at, self._payload_len
                )
            else:
                self._payload = PyMemoryView_FromObject(
                    _Slice.of(self._owner, self._payload_at, self._payload_len)
                )
        return self._payload

    @payload.setter
    def payload(self, value):
        self._payload = value

    @property
    def payload_size(self):
        return self._payload_len if self._payload is None else len(self._payload)

    def detach(self):
        if self._owner is not None:
            self.topic
            if self._payload is None or isinstance(self._payload, memoryview):
                self._payload = PyBytes_FromStringAndSize(
                    _owner_ptr(self._owner) + self._payload_at, self._payload_len
                )
            self._owner = None
        return self

    def _key(self):
        return (self.type, self.topic, bytes(self.payload), self.qos, self.retain, self.dup,
                self.packet_id, _PropsKey(self.properties))

    def __eq__(self, other):
        return _packet_eq(self, other)

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return _packet_repr(self)

    def encode(self, int version=4):
        return encode_publish(self.topic, self.payload, self.qos, self.retain, self.dup,
                              self.packet_id, self.properties, version)


@cython.freelist(256)
cdef class _Slice:
    """Exports `length` bytes of an owner's buffer from `offset` (read-only), holding the
    owner's buffer while a memoryview of it lives: one object instead of a view and a slice."""

    cdef Py_buffer src
    cdef bint held
    cdef const char *ptr
    cdef Py_ssize_t length

    @staticmethod
    cdef _Slice of(object owner, Py_ssize_t offset, Py_ssize_t length):
        cdef _Slice s = _Slice.__new__(_Slice)
        PyObject_GetBuffer(owner, &s.src, PyBUF_SIMPLE)
        s.held = True
        s.ptr = <const char *>s.src.buf + offset
        s.length = length
        return s

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, <void *>self.ptr, self.length, 1, flags)

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.src)


cdef const char *_owner_ptr(object owner) except NULL:
    """The start of a read buffer that a packet points into (bytes, bytearray or other)."""
    cdef Py_buffer view
    if type(owner) is bytearray:
        return PyByteArray_AS_STRING(owner)
    if type(owner) is bytes:
        return PyBytes_AS_STRING(owner)
    # Any other exporter (memoryview, mmap) keeps its memory still while the packet holds it.
    PyObject_GetBuffer(owner, &view, PyBUF_SIMPLE)
    PyBuffer_Release(&view)
    return <const char *>view.buf


@cython.freelist(256)
cdef class Ack:
    """PUBACK, PUBREC, PUBREL or PUBCOMP (`type` says which; not a Packet subclass, as Publish)."""

    cdef readonly int type
    cdef public int packet_id
    cdef public int reason_code
    cdef public object properties

    def __init__(self, int packet_type, int packet_id, int reason_code=0, properties=None):
        if packet_type not in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            raise ValueError(f"packet type {packet_type} is not an acknowledgement")
        self.type = packet_type
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = properties

    def _key(self):
        return (self.type, self.packet_id, self.reason_code, _PropsKey(self.properties))

    def detach(self):
        return self

    def __eq__(self, other):
        return _packet_eq(self, other)

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return _packet_repr(self)

    def encode(self, int version=4):
        return encode_ack(self.type, self.packet_id, self.reason_code, version, self.properties)


cdef class Subscription:
    """One topic filter of a SUBSCRIBE with its options."""

    cdef public str topic_filter
    cdef public int qos
    cdef public bint no_local
    cdef public bint retain_as_published
    cdef public int retain_handling

    def __init__(self, str topic_filter, int qos=0, bint no_local=False,
                 bint retain_as_published=False, int retain_handling=0):
        self.topic_filter = topic_filter
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling

    def __eq__(self, other):
        if not isinstance(other, Subscription):
            return NotImplemented
        o = <Subscription>other
        return (self.topic_filter, self.qos, self.no_local, self.retain_as_published,
                self.retain_handling) == (o.topic_filter, o.qos, o.no_local,
                                          o.retain_as_published, o.retain_handling)

    def __repr__(self):
        return (f"Subscription({self.topic_filter!r}, qos={self.qos}, no_local={self.no_local}, "
                f"rap={self.retain_as_published}, rh={self.retain_handling})")


cdef class Subscribe(Packet):
    cdef public int packet_id
    cdef public list subscriptions
    cdef public object properties

    def __init__(self, int packet_id, subscriptions, properties=None):
        self.type = SUBSCRIBE
        self.packet_id = packet_id
        self.subscriptions = list(subscriptions)
        self.properties = properties

    def _key(self):
        return (self.type, self.packet_id, self.subscriptions, _PropsKey(self.properties))

    def encode(self, int version=4):
        if not self.subscriptions:
            raise ValueError("a SUBSCRIBE needs at least one subscription")
        _check_packet_id(self.packet_id)
        cdef _Writer w = _Writer()
        w.u16(self.packet_id)
        if version == 5:
            _write_properties(w, self.properties)
        cdef Subscription s
        for s in self.subscriptions:
            validate_topic_filter(s.topic_filter)
            if not 0 <= s.qos <= 2 or not 0 <= s.retain_handling <= 2:
                raise ValueError("qos and retain_handling are 0, 1 or 2")
            w.string(s.topic_filter)
            options = s.qos
            if version == 5:
                options |= (0x04 if s.no_local else 0) | (0x08 if s.retain_as_published else 0)
                options |= s.retain_handling << 4
            w.u8(options)
        return _frame((SUBSCRIBE << 4) | 0x02, w)


cdef class Suback(Packet):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public object properties

    def __init__(self, int packet_id, reason_codes, properties=None):
        self.type = SUBACK
        self.packet_id = packet_id
        self.reason_codes = list(reason_codes)
        self.properties = properties

    def _key(self):
        return (self.type, self.packet_id, self.reason_codes, _PropsKey(self.properties))

    def encode(self, int version=4):
        cdef _Writer w = _Writer()
        w.u16(self.packet_id)
        if version == 5:
            _write_properties(w, self.properties)
        for code in self.reason_codes:
            w.u8(code)
        return _frame(SUBACK << 4, w)


cdef class Unsubscribe(Packet):
    cdef public int packet_id
    cdef public list topic_filters
    cdef public object properties

    def __init__(self, int packet_id, topic_filters, properties=None):
        self.type = UNSUBSCRIBE
        self.packet_id = packet_id
        self.topic_filters = list(topic_filters)
        self.properties = properties

    def _key(self):
        return (self.type, self.packet_id, self.topic_filters, _PropsKey(self.properties))

    def encode(self, int version=4):
        if not self.topic_filters:
            raise ValueError("an UNSUBSCRIBE needs at least one topic filter")
        _check_packet_id(self.packet_id)
        cdef _Writer w = _Writer()
        w.u16(self.packet_id)
        if version == 5:
            _write_properties(w, self.properties)
        for f in self.topic_filters:
            validate_topic_filter(f)
            w.string(f)
        return _frame((UNSUBSCRIBE << 4) | 0x02, w)


cdef class Unsuback(Packet):
    cdef public int packet_id
    cdef public list reason_codes  # MQTT 5 only; empty for 3.1.1
    cdef public object properties

    def __init__(self, int packet_id, reason_codes=(), properties=None):
        self.type = UNSUBACK
        self.packet_id = packet_id
        self.reason_codes = list(reason_codes)
        self.properties = properties

    def _key(self):
        return (self.type, self.packet_id, self.reason_codes, _PropsKey(self.properties))

    def encode(self, int version=4):
        cdef _Writer w = _Writer()
        w.u16(self.packet_id)
        if version == 5:
            _write_properties(w, self.properties)
            for code in self.reason_codes:
                w.u8(code)
        return _frame(UNSUBACK << 4, w)


cdef class Pingreq(Packet):
    def __init__(self):
        self.type = PINGREQ

    def encode(self, int version=4):
        return PINGREQ_FRAME


cdef class Pingresp(Packet):
    def __init__(self):
        self.type = PINGRESP

    def encode(self, int version=4):
        return PINGRESP_FRAME


cdef class Disconnect(Packet):
    cdef public int reason_code
    cdef public object properties

    def __init__(self, int reason_code=0, properties=None):
        self.type = DISCONNECT
        self.reason_code = reason_code
        self.properties = properties

    def _key(self):
        return (self.type, self.reason_code, _PropsKey(self.properties))

    def encode(self, int version=4):
        return _reason_packet(DISCONNECT << 4, self.reason_code, self.properties, version)


cdef class Auth(Packet):
    cdef public int reason_code
    cdef public object properties

    def __init__(self, int reason_code=0, properties=None):
        self.type = AUTH
        self.reason_code = reason_code
        self.properties = properties

    def _key(self):
        return (self.type, self.reason_code, _PropsKey(self.properties))

    def encode(self, int version=5):
        if version != 5:
            raise ValueError("AUTH exists in MQTT 5 only")
        return _reason_packet(AUTH << 4, self.reason_code, self.properties, version)


cdef bytes _reason_packet(int first_byte, int reason_code, object props, int version):
    """DISCONNECT and AUTH: empty in 3.1.1; in 5.0 the reason code and properties may be
    left out when they are 0 and empty (3.14.2.1, 3.15.2.1)."""
    if version != 5 or (reason_code == 0 and _props_equal(props, None)):
        return bytes([first_byte, 0])
    cdef _Writer w = _Writer()
    w.u8(reason_code)
    if not _props_equal(props, None):
        _write_properties(w, props)
    return _frame(first_byte, w)


cdef int _check_packet_id(int packet_id) except -1:
    if not 1 <= packet_id <= 65535:
        raise ValueError(f"packet identifier {packet_id} is not 1 to 65535")
    return 0


# ---- decoding -------------------------------------------------------------------------------

cdef inline uint32_t _packet_id(Cursor *c) except? 0:
    cdef uint32_t pid
    if cur_u16(c, &pid) != CUR_OK:
        raise _short("packet identifier")
    if pid == 0:
        raise ProtocolError("packet identifier 0")
    return pid


cdef object _decode_connect(Cursor *c, int *version_out):
    cdef uint32_t level, flags, keep_alive, will_qos
    cdef Py_ssize_t start, n
    if cur_lstring(c, &start, &n) != CUR_OK:
        raise _short("protocol name")
    name = _decode_str(c.buf + start, n)
    if cur_u8(c, &level) != CUR_OK:
        raise _short("protocol level")
    if not ((name == "MQTT" and (level == 4 or level == 5))):
        # 3.1 ("MQIsdp", level 3) and anything else: answered with "unsupported version".
        raise UnsupportedProtocolVersion(
            f"protocol {name!r} level {level} is not MQTT 3.1.1 or 5.0")
    version_out[0] = level
    if cur_u8(c, &flags) != CUR_OK or cur_u16(c, &keep_alive) != CUR_OK:
        raise _short("CONNECT header")
    if flags & 0x01:
        raise _malformed("reserved CONNECT flag set")
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise _malformed("will QoS 3")
    elif will_qos or flags & 0x20:
        raise _malformed("will QoS or retain set without the will flag")
    if level == 4 and (flags & 0x40) and not (flags & 0x80):
        raise _malformed("password flag without user name flag")
    cdef Connect p = Connect.__new__(Connect)
    p.type = CONNECT
    p.protocol_name = name
    p.protocol_level = level
    p.clean_start = (flags & 0x02) != 0
    p.keep_alive = keep_alive
    p.properties = _read_properties(c, B_CONNECT) if level == 5 else None
    p.client_id = _read_str(c, "client identifier")
    cdef Will will
    if flags & 0x04:
        will = Will.__new__(Will)
        will.properties = _read_properties(c, W) if level == 5 else None
        if cur_lstring(c, &start, &n) != CUR_OK:
            raise _short("will topic")
        if n == 0:
            raise TopicNameInvalid("empty will topic")
        _check_topic_name(c.buf + start, n)
        will.topic = PyUnicode_DecodeUTF8(<const char *>c.buf + start, n, NULL)
        will.payload = _read_bin(c, "will payload")
        will.qos = will_qos
        will.retain = (flags & 0x20) != 0
        p.will = will
    if flags & 0x80:
        p.username = _read_str(c, "user name")
    if flags & 0x40:
        p.password = _read_bin(c, "password")
    if cur_left(c):
        raise _malformed("bytes after the CONNECT payload")
    return p


cdef object _decode_connack(Cursor *c, int version):
    cdef uint32_t flags, code
    if cur_u8(c, &flags) != CUR_OK or cur_u8(c, &code) != CUR_OK:
        raise _short("CONNACK")
    if flags & 0xFE:
        raise _malformed("reserved CONNACK flags set")
    cdef Connack p = Connack.__new__(Connack)
    p.type = CONNACK
    p.session_present = flags & 1
    p.reason_code = code
    if version == 5:
        if code not in _CONNACK_CODES:
            raise ProtocolError(f"reason code 0x{code:02x} in CONNACK")
        p.properties = _read_properties(c, B_CONNACK)
    elif code not in _V4_CONNACK_CODES:
        raise ProtocolError(f"return code {code} in CONNACK")
    if cur_left(c):
        raise _malformed("bytes after the CONNACK")
    return p


cdef object _decode_publish(Cursor *c, int flags, int version, object owner):
    cdef Py_ssize_t topic_at, topic_len
    cdef int qos = (flags >> 1) & 0x03
    if qos == 3:
        raise _malformed("PUBLISH with QoS 3")
    if qos == 0 and flags & 0x08:
        raise _malformed("DUP set on a QoS 0 PUBLISH")
    if cur_lstring(c, &topic_at, &topic_len) != CUR_OK:
        raise _short("topic name")
    _check_topic_name(c.buf + topic_at, topic_len)
    cdef Publish p = Publish.__new__(Publish)
    p.type = PUBLISH
    p.qos = qos
    p.retain = flags & 0x01
    p.dup = (flags & 0x08) != 0
    p.packet_id = _packet_id(c) if qos else 0
    p._owner = owner
    p._topic_at = topic_at
    p._topic_len = topic_len
    if version == 5:
        p.properties = _read_properties(c, B_PUBLISH)
        if topic_len == 0 and (p.properties is None
                               or (<Properties>p.properties).topic_alias is None):
            raise ProtocolError("empty topic name without a topic alias")
    elif topic_len == 0:
        raise TopicNameInvalid("empty topic name")
    p._payload_at = c.pos
    p._payload_len = c.end - c.pos
    return p


cdef object _decode_ack(Cursor *c, int ptype, int version):
    cdef Ack p = Ack.__new__(Ack)
    cdef uint32_t code
    p.type = ptype
    p.packet_id = _packet_id(c)
    if version == 5 and cur_left(c):
        cur_u8(c, &code)
        if code not in (_PUBREL_CODES if ptype >= PUBREL else _PUBACK_CODES):
            raise ProtocolError(f"reason code 0x{code:02x} in {PACKET_NAMES[ptype]}")
        p.reason_code = code
        if cur_left(c):
            p.properties = _read_properties(c, 1 << ptype)
    if cur_left(c):
        raise _malformed(f"bytes after the {PACKET_NAMES[ptype]}")
    return p


cdef object _decode_subscribe(Cursor *c, int version):
    cdef uint32_t options
    cdef Subscribe p = Subscribe.__new__(Subscribe)
    cdef Subscription s
    p.type = SUBSCRIBE
    p.packet_id = _packet_id(c)
    p.properties = _read_properties(c, B_SUBSCRIBE) if version == 5 else None
    p.subscriptions = []
    while cur_left(c):
        topic_filter = _read_filter(c)
        if cur_u8(c, &options) != CUR_OK:
            raise _short("subscription options")
        s = Subscription.__new__(Subscription)
        s.topic_filter = topic_filter
        s.qos = options & 0x03
        if s.qos == 3:
            raise _malformed("subscription with QoS 3")
        if version == 5:
            if options & 0xC0:
                raise _malformed("reserved subscription option bits set")
            s.no_local = (options & 0x04) != 0
            s.retain_as_published = (options & 0x08) != 0
            s.retain_handling = (options >> 4) & 0x03
            if s.retain_handling == 3:
                raise ProtocolError("retain handling 3")
            if s.no_local and topic_filter.startswith("$share/"):
                raise ProtocolError("no local on a shared subscription")
        elif options & 0xFC:
            raise _malformed("reserved subscription option bits set")
        p.subscriptions.append(s)
    if not p.subscriptions:
        raise ProtocolError("SUBSCRIBE without a topic filter")
    return p


cdef object _decode_suback(Cursor *c, int version):
    cdef Suback p = Suback.__new__(Suback)
    p.type = SUBACK
    p.packet_id = _packet_id(c)
    p.properties = _read_properties(c, B_SUBACK) if version == 5 else None
    valid = _SUBACK_CODES if version == 5 else _V4_SUBACK_CODES
    p.reason_codes = list(c.buf[c.pos:c.end])
    c.pos = c.end
    if not p.reason_codes:
        raise ProtocolError("SUBACK without a reason code")
    for code in p.reason_codes:
        if code not in valid:
            raise ProtocolError(f"reason code 0x{code:02x} in SUBACK")
    return p


cdef object _decode_unsubscribe(Cursor *c, int version):
    cdef Unsubscribe p = Unsubscribe.__new__(Unsubscribe)
    p.type = UNSUBSCRIBE
    p.packet_id = _packet_id(c)
    p.properties = _read_properties(c, B_UNSUBSCRIBE) if version == 5 else None
    p.topic_filters = []
    while cur_left(c):
        p.topic_filters.append(_read_filter(c))
    if not p.topic_filters:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")
    return p


cdef object _decode_unsuback(Cursor *c, int version):
    cdef Unsuback p = Unsuback.__new__(Unsuback)
    p.type = UNSUBACK
    p.packet_id = _packet_id(c)
    p.reason_codes = []
    if version == 5:
        p.properties = _read_properties(c, B_UNSUBACK)
        p.reason_codes = list(c.buf[c.pos:c.end])
        c.pos = c.end
        if not p.reason_codes:
            raise ProtocolError("UNSUBACK without a reason code")
        for code in p.reason_codes:
            if code not in _UNSUBACK_CODES:
                raise ProtocolError(f"reason code 0x{code:02x} in UNSUBACK")
    elif cur_left(c):
        raise _malformed("bytes after the UNSUBACK")
    return p


cdef object _decode_reason_packet(Cursor *c, int ptype, int version):
    """DISCONNECT or AUTH."""
    cdef uint32_t code = 0
    props = None
    if version == 5 and cur_left(c):
        cur_u8(c, &code)
        if code not in (_DISCONNECT_CODES if ptype == DISCONNECT else _AUTH_CODES):
            raise ProtocolError(f"reason code 0x{code:02x} in {PACKET_NAMES[ptype]}")
        if cur_left(c):
            props = _read_properties(c, 1 << ptype)
    if cur_left(c):
        raise _malformed(f"bytes after the {PACKET_NAMES[ptype]}")
    if ptype == DISCONNECT:
        d = Disconnect.__new__(Disconnect)
        (<Disconnect>d).type = DISCONNECT
        (<Disconnect>d).reason_code = code
        (<Disconnect>d).properties = props
        return d
    a = Auth.__new__(Auth)
    (<Auth>a).type = AUTH
    (<Auth>a).reason_code = code
    (<Auth>a).properties = props
    return a


# Required flag nibble per packet type (-1: PUBLISH, checked by its decoder).
cdef int[16] _FLAGS
_FLAGS[:] = [-2, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0]


cdef inline int _check_first_byte(unsigned char b1, int version) except -1:
    cdef int ptype = b1 >> 4
    cdef int want = _FLAGS[ptype]
    if want == -2:
        raise _malformed("packet type 0 is reserved")
    if want >= 0 and (b1 & 0x0F) != want:
        raise _malformed(f"reserved flags of {PACKET_NAMES[ptype]} are wrong")
    if ptype == AUTH and version == 4:
        raise _malformed("AUTH does not exist in MQTT 3.1.1")
    return 0


cdef object _decode_body(unsigned char b1, const unsigned char *buf, Py_ssize_t start,
                         Py_ssize_t end, object owner, int *version):
    """One packet whose body is buf[start:end]. `version` is 0 until a CONNECT sets it."""
    cdef Cursor c
    cur_init(&c, buf, start, end)
    cdef int ptype = b1 >> 4
    if ptype == PUBLISH:
        return _decode_publish(&c, b1 & 0x0F, version[0], owner)
    if ptype == PUBACK or ptype == PUBREC or ptype == PUBREL or ptype == PUBCOMP:
        return _decode_ack(&c, ptype, version[0])
    if ptype == CONNECT:
        return _decode_connect(&c, version)
    if ptype == PINGREQ or ptype == PINGRESP:
        if end != start:
            raise _malformed(f"{PACKET_NAMES[ptype]} with a body")
        return _PINGREQ if ptype == PINGREQ else _PINGRESP
    if ptype == SUBSCRIBE:
        return _decode_subscribe(&c, version[0])
    if ptype == SUBACK:
        return _decode_suback(&c, version[0])
    if ptype == UNSUBSCRIBE:
        return _decode_unsubscribe(&c, version[0])
    if ptype == UNSUBACK:
        return _decode_unsuback(&c, version[0])
    if ptype == CONNACK:
        return _decode_connack(&c, version[0])
    return _decode_reason_packet(&c, ptype, version[0])


_PINGREQ = Pingreq()
_PINGRESP = Pingresp()


cdef inline Py_ssize_t _fixed_header(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end,
                                     uint32_t *remaining) except -2:
    """The fixed header at pos: its size (2 to 5 bytes), or -1 when it is not all there yet."""
    cdef uint32_t value = 0
    cdef Py_ssize_t i = pos + 1
    cdef unsigned int shift = 0
    cdef unsigned char b
    while True:
        if i >= end:
            return -1
        b = buf[i]
        i += 1
        value |= (<uint32_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            break
        shift += 7
        if shift == 28:
            raise _malformed("remaining length of more than 4 bytes")
    if i - pos - 1 > varint_len(value):
        raise _malformed("remaining length not in its shortest form")
    remaining[0] = value
    return i - pos


def decode(data, int version=4):
    """The one packet that is the whole of `data` (bytes-like). CONNECT brings its own version.
    The packet points into `data`; raises MqttError for a bad or incomplete frame."""
    cdef Py_buffer view
    cdef uint32_t remaining
    cdef Py_ssize_t hdr
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        buf = <const unsigned char *>view.buf
        if view.len < 2:
            raise _malformed("a frame is at least 2 bytes")
        _check_first_byte(buf[0], version)
        hdr = _fixed_header(buf, 0, view.len, &remaining)
        if hdr < 0 or hdr + <Py_ssize_t>remaining != view.len:
            raise _malformed("the data is not exactly one frame")
        return _decode_body(buf[0], buf, hdr, view.len, data, &version)
    finally:
        PyBuffer_Release(&view)


# ---- the framer -----------------------------------------------------------------------------

# A partial frame at least this large waits in a buffer of its own instead of being copied to
# the front of the shared arena on every read while the rest of it arrives.
cdef Py_ssize_t _OWN_BUFFER_FROM = 4096


cdef class ReadArena:
    """One read buffer for every connection of an event loop. The transport reads into it; the
    frames are decoded from it in place before the next read on the loop overwrites it."""

    cdef bytearray buf
    cdef object view
    cdef readonly Py_ssize_t size

    def __init__(self, Py_ssize_t size=256 * 1024):
        if size < 2 * _OWN_BUFFER_FROM:
            raise ValueError(f"an arena is at least {2 * _OWN_BUFFER_FROM} bytes")
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.size = size


cdef class Framer:
    """Finds whole frames in a byte stream and decodes them; see the module docstring.

    `version` is the protocol level used for packets other than CONNECT: a server leaves it 0
    and the CONNECT sets it; a client passes the level it connects with."""

    cdef ReadArena arena
    cdef bytes rem            # start of a small partial frame, copied to the arena's front
    cdef bytearray own        # a large partial frame, assembled in a buffer of its own that
    cdef Py_ssize_t own_fill  # grows with what arrives (doubling), up to the frame's size
    cdef Py_ssize_t own_total
    cdef Py_ssize_t base      # where this read's bytes start in the arena (after `rem`)
    cdef Py_ssize_t given     # bytes of the buffer get_buffer handed out; -1: none out
    cdef public int version
    cdef public Py_ssize_t max_packet_size
    cdef bint failed

    def __init__(self, ReadArena arena=None, Py_ssize_t max_packet_size=MAX_PACKET_SIZE,
                 int version=0):
        self.arena = arena
        self.max_packet_size = max_packet_size
        self.version = version
        self.given = -1

    @property
    def pending(self):
        """Bytes of an incomplete frame held between reads."""
        if self.own is not None:
            return self.own_fill
        return 0 if self.rem is None else len(self.rem)

    def get_buffer(self, Py_ssize_t sizehint=-1):
        """Where the transport writes the next read (asyncio.BufferedProtocol.get_buffer)."""
        if self.own is not None:
            self._own_reserve(self.own_fill + 1)
            self.given = PyByteArray_GET_SIZE(self.own) - self.own_fill
            return memoryview(self.own)[self.own_fill:]
        if self.arena is None:
            self.arena = ReadArena(4 * _OWN_BUFFER_FROM)
        cdef Py_ssize_t r = 0
        if self.rem is not None:
            r = PyBytes_GET_SIZE(self.rem)
            memcpy(PyByteArray_AS_STRING(self.arena.buf), PyBytes_AS_STRING(self.rem), r)
            self.rem = None
        self.base = r
        self.given = self.arena.size - r
        return self.arena.view[r:]

    def buffer_updated(self, Py_ssize_t nbytes):
        """Decode every whole frame now in the buffer; returns the packets in order."""
        cdef list packets
        cdef Py_ssize_t used, end
        if self.failed:
            raise ProtocolError("the stream already failed")
        if self.given < 0:
            raise ValueError("buffer_updated() without a get_buffer() before it")
        if not 0 <= nbytes <= self.given:
            raise ValueError(f"buffer_updated({nbytes}) after get_buffer gave {self.given} bytes")
        self.given = -1
        if self.own is not None:
            return self._own_added(nbytes)
        end = self.base + nbytes
        buf = <const unsigned char *>PyByteArray_AS_STRING(self.arena.buf)
        packets = self._frames(self.arena.buf, buf, end, &used)
        if used < end:
            self._keep(buf + used, end - used)
        return packets

    def feed(self, data):
        """Decode the whole frames in `data` plus what was pending; keeps an incomplete tail.
        The packets may point into `data` (zero copy) until detached."""
        cdef Py_buffer view
        cdef Py_ssize_t used, take, off = 0
        cdef list packets = []
        if self.failed:
            raise ProtocolError("the stream already failed")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const unsigned char *>view.buf
            while off < view.len:
                if self.own is not None:
                    take = min(view.len - off, self.own_total - self.own_fill)
                    self._own_reserve(self.own_fill + take)
                    memcpy(PyByteArray_AS_STRING(self.own) + self.own_fill, p + off, take)
                    off += take
                    packets.extend(self._own_added(take))
                    continue
                if self.rem is not None:
                    joined = self.rem + PyBytes_FromStringAndSize(<const char *>p + off,
                                                                  view.len - off)
                    self.rem = None
                    packets.extend(self._feed_whole(joined))
                else:
                    packets.extend(self._feed_whole(data if off == 0 else
                                                    PyBytes_FromStringAndSize(
                                                        <const char *>p + off, view.len - off)))
                break
        except MqttError as exc:
            exc.packets = packets + exc.packets  # those decoded earlier in this call too
            raise
        finally:
            PyBuffer_Release(&view)
        return packets

    cdef int _own_reserve(self, Py_ssize_t need) except -1:
        """Room for `need` bytes of the large frame: double, up to its size (a peer announcing
        a large frame costs memory only as its bytes arrive)."""
        cdef Py_ssize_t cap = PyByteArray_GET_SIZE(self.own)
        if need <= cap:
            return 0
        cap = min(self.own_total, max(need, 2 * cap))
        grown = bytearray(cap)
        memcpy(PyByteArray_AS_STRING(grown), PyByteArray_AS_STRING(self.own), self.own_fill)
        self.own = grown
        return 0

    cdef list _own_added(self, Py_ssize_t n):
        cdef Py_ssize_t used
        self.own_fill += n
        if self.own_fill < self.own_total:
            return []
        whole, self.own = self.own, None
        return self._frames(whole, <const unsigned char *>PyByteArray_AS_STRING(whole),
                            self.own_fill, &used)

    cdef list _feed_whole(self, object chunk):
        cdef Py_buffer view
        cdef Py_ssize_t used
        PyObject_GetBuffer(chunk, &view, PyBUF_SIMPLE)
        try:
            p = <const unsigned char *>view.buf
            packets = self._frames(chunk, p, view.len, &used)
            if used < view.len:
                self._keep(p + used, view.len - used)
            return packets
        finally:
            PyBuffer_Release(&view)

    cdef int _keep(self, const unsigned char *tail, Py_ssize_t n) except -1:
        """Hold an incomplete frame until its other bytes arrive."""
        cdef uint32_t remaining
        cdef Py_ssize_t hdr = _fixed_header(tail, 0, n, &remaining)  # checked by _frames
        cdef Py_ssize_t total
        if hdr > 0:
            total = hdr + remaining
            if total >= _OWN_BUFFER_FROM:
                self.own = bytearray(min(total, max(2 * n, _OWN_BUFFER_FROM)))
                memcpy(PyByteArray_AS_STRING(self.own), tail, n)
                self.own_fill = n
                self.own_total = total
                return 0
        self.rem = PyBytes_FromStringAndSize(<const char *>tail, n)
        return 0

    cdef list _frames(self, object owner, const unsigned char *buf, Py_ssize_t end,
                      Py_ssize_t *used):
        """Decode the whole frames in buf[0:end]; *used = bytes they took."""
        cdef list out = []
        cdef Py_ssize_t pos = 0, hdr, total
        cdef uint32_t remaining
        cdef int version = self.version
        try:
            while pos < end:
                _check_first_byte(buf[pos], version)
                if version == 0 and (buf[pos] >> 4) != CONNECT:
                    raise ProtocolError("the first packet must be CONNECT")
                hdr = _fixed_header(buf, pos, end, &remaining)
                if hdr < 0:
                    break
                total = hdr + remaining
                if total > self.max_packet_size:
                    raise PacketTooLarge(
                        f"a {total} byte packet is over the maximum of {self.max_packet_size}")
                if end - pos < total:
                    break
                out.append(_decode_body(buf[pos], buf, pos + hdr, pos + total, owner,
                                        &version))
                pos += total
        except MqttError as exc:
            self.failed = True
            exc.packets = out
            exc.version = version
            self.version = version
            raise
        self.version = version
        used[0] = pos
        return out


# ---- encoding (the hot path writes straight into the output) ------------------------------

cdef struct _PubSizes:
    Py_ssize_t topic_len
    Py_ssize_t props_len      # property block incl. its length varint; 0 in 3.1.1
    Py_ssize_t payload_len
    Py_ssize_t body
    Py_ssize_t total


cdef int _publish_sizes(_PubSizes *s, const char *topic, Py_ssize_t topic_len,
                        Py_ssize_t payload_len, int qos, int packet_id, Py_ssize_t props_len,
                        bint has_alias) except -1:
    if topic_len > 65535:
        raise ValueError("topic name longer than 65535 bytes")
    if memchr(topic, b'+', topic_len) != NULL or memchr(topic, b'#', topic_len) != NULL:
        raise ValueError("a topic name may not contain + or #")
    if memchr(topic, 0, topic_len) != NULL:
        raise ValueError("a topic name may not contain U+0000")
    if topic_len == 0 and not has_alias:
        raise ValueError("empty topic name (allowed only with a topic alias in MQTT 5)")
    if qos < 0 or qos > 2:
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    if qos and not 1 <= packet_id <= 65535:
        raise ValueError(f"packet identifier {packet_id} is not 1 to 65535")
    s.topic_len = topic_len
    s.props_len = props_len
    s.payload_len = payload_len
    s.body = 2 + topic_len + (2 if qos else 0) + props_len + payload_len
    if s.body > MAX_REMAINING_LENGTH:
        raise ValueError("PUBLISH longer than the MQTT maximum")
    s.total = 1 + varint_len(<uint32_t>s.body) + s.body
    return 0


cdef void _write_publish(unsigned char *out, const _PubSizes *s, const char *topic,
                         const char *payload, const char *props, int qos, bint retain, bint dup,
                         int packet_id) noexcept:
    cdef Py_ssize_t i = 1
    out[0] = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    i += store_varint(out + 1, <uint32_t>s.body)
    store_u16be(out + i, <uint32_t>s.topic_len)
    i += 2
    memcpy(out + i, topic, s.topic_len)
    i += s.topic_len
    if qos:
        store_u16be(out + i, <uint32_t>packet_id)
        i += 2
    if s.props_len:
        memcpy(out + i, props, s.props_len)
        i += s.props_len
    memcpy(out + i, payload, s.payload_len)


cdef object _publish_encoder(object out, str topic, object payload, int qos, bint retain,
                             bint dup, int packet_id, object properties, int version):
    """Encode into bytearray `out` (appending; returns the bytes written), or to new bytes
    when out is None."""
    cdef Py_ssize_t topic_len
    cdef const char *t = PyUnicode_AsUTF8AndSize(topic, &topic_len)
    cdef Py_buffer view
    cdef _PubSizes s
    cdef bytes props = None
    cdef Py_ssize_t old
    cdef bint has_alias = False
    if version == 5:
        if properties is not None:
            has_alias = (<Properties>properties).topic_alias is not None
            props = _properties_block(properties)
        else:
            props = b"\x00"
    cdef const char *pp = NULL if props is None else PyBytes_AS_STRING(props)
    cdef Py_ssize_t pl = 0 if props is None else PyBytes_GET_SIZE(props)
    if type(payload) is bytes:
        _publish_sizes(&s, t, topic_len, PyBytes_GET_SIZE(payload), qos, packet_id, pl, has_alias)
        return _emit_publish(out, &s, t, PyBytes_AS_STRING(payload), pp, qos, retain, dup,
                             packet_id)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        _publish_sizes(&s, t, topic_len, view.len, qos, packet_id, pl, has_alias)
        return _emit_publish(out, &s, t, <const char *>view.buf, pp, qos, retain, dup,
                             packet_id)
    finally:
        PyBuffer_Release(&view)


cdef object _emit_publish(object out, const _PubSizes *s, const char *topic,
                          const char *payload, const char *props, int qos, bint retain,
                          bint dup, int packet_id):
    cdef Py_ssize_t old
    if out is None:
        frame = PyBytes_FromStringAndSize(NULL, s.total)
        _write_publish(<unsigned char *>PyBytes_AS_STRING(frame), s, topic, payload, props,
                       qos, retain, dup, packet_id)
        return frame
    old = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, old + s.total)
    _write_publish(<unsigned char *>PyByteArray_AS_STRING(out) + old, s, topic, payload, props,
                   qos, retain, dup, packet_id)
    return s.total


def encode_publish(str topic, payload, int qos=0, bint retain=False, bint dup=False,
                   int packet_id=0, properties=None, int version=4):
    """A PUBLISH frame as bytes (one allocation)."""
    return _publish_encoder(None, topic, payload, qos, retain, dup, packet_id, properties,
                            version)


def encode_publish_into(bytearray out, str topic, payload, int qos=0, bint retain=False,
                        bint dup=False, int packet_id=0, properties=None, int version=4):
    """Append a PUBLISH frame to `out`; returns its size."""
    return _publish_encoder(out, topic, payload, qos, retain, dup, packet_id, properties,
                            version)


cdef Py_ssize_t _ack_size(int packet_type, int packet_id, int reason_code, int version,
                          object properties) except -1:
    if packet_type < PUBACK or packet_type > PUBCOMP:
        raise ValueError(f"packet type {packet_type} is not an acknowledgement")
    if not 1 <= packet_id <= 65535:
        raise ValueError(f"packet identifier {packet_id} is not 1 to 65535")
    if not 0 <= reason_code <= 255:
        raise ValueError(f"reason code {reason_code} is not a byte")
    if version != 5 or (reason_code == 0 and _props_equal(properties, None)):
        return 4
    return 5


def encode_ack(int packet_type, int packet_id, int reason_code=0, int version=4,
               properties=None):
    """PUBACK, PUBREC, PUBREL or PUBCOMP. In 3.1.1 the reason code is not sent."""
    cdef Py_ssize_t n = _ack_size(packet_type, packet_id, reason_code, version, properties)
    cdef _Writer w
    if n == 5 and not _props_equal(properties, None):
        w = _Writer()
        w.u16(packet_id)
        w.u8(reason_code)
        _write_properties(w, properties)
        return _frame((packet_type << 4) | (2 if packet_type == PUBREL else 0), w)
    frame = PyBytes_FromStringAndSize(NULL, n)
    _write_ack(<unsigned char *>PyBytes_AS_STRING(frame), packet_type, packet_id, reason_code, n)
    return frame


def encode_ack_into(bytearray out, int packet_type, int packet_id, int reason_code=0,
                    int version=4):
    """Append an acknowledgement without properties to `out`."""
    cdef Py_ssize_t n = _ack_size(packet_type, packet_id, reason_code, version, None)
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, old + n)
    _write_ack(<unsigned char *>PyByteArray_AS_STRING(out) + old, packet_type, packet_id,
               reason_code, n)


cdef inline void _write_ack(unsigned char *p, int packet_type, int packet_id, int reason_code,
                            Py_ssize_t n) noexcept:
    p[0] = (packet_type << 4) | (2 if packet_type == PUBREL else 0)
    p[1] = n - 2
    store_u16be(p + 2, packet_id)
    if n == 5:
        p[4] = reason_code
