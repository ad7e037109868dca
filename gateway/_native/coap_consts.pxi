# C-level constants of the CoAP codec (included by coap.pyx). The Python-level names
# (GET, URI_PATH, ...) are plain module ints defined in coap.pyx.

# Option numbers the codec knows (RFC 7252, 7641, 7959, 7967).
cdef enum:
    O_IF_MATCH = 1
    O_URI_HOST = 3
    O_ETAG = 4
    O_IF_NONE_MATCH = 5
    O_OBSERVE = 6
    O_URI_PORT = 7
    O_LOCATION_PATH = 8
    O_URI_PATH = 11
    O_CONTENT_FORMAT = 12
    O_MAX_AGE = 14
    O_URI_QUERY = 15
    O_ACCEPT = 17
    O_LOCATION_QUERY = 20
    O_BLOCK2 = 23
    O_BLOCK1 = 27
    O_SIZE2 = 28
    O_PROXY_URI = 35
    O_PROXY_SCHEME = 39
    O_SIZE1 = 60
    O_NO_RESPONSE = 258

# Option value formats (RFC 7252 3.2); F_BLOCK is a uint whose SZX 7 is reserved (RFC 7959 2.2).
cdef enum:
    F_UNKNOWN = 0
    F_EMPTY = 1
    F_OPAQUE = 2
    F_UINT = 3
    F_STRING = 4
    F_BLOCK = 5

cdef enum:
    SPEC_TABLE = 64            # option numbers below this are looked up in a table
    INLINE_OPTS = 12           # options held inside a Message before it mallocs
    MAX_EXT = 65804            # largest delta or length the 14 nibble can carry (269 + 65535)
    MAX_OPTION_NUMBER = 65535
    PAYLOAD_MARKER = 0xFF
