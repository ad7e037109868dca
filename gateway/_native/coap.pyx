# cython: language_level=3
"""CoAP message codec: RFC 7252, with Observe (RFC 7641), block-wise transfer (RFC 7959),
No-Response (RFC 7967) and the FETCH/PATCH/iPATCH methods (RFC 8132).

`decode()` parses a datagram in place. The Message keeps a reference to the buffer and a C
table of (number, offset, length) for its options; nothing per option is built in Python
until a getter is read. The whole header and option structure is checked at decode time:
structural faults raise CoapFormatError, bad options are flagged (see Message.bad_critical).

Encoding (Message.encode(), encode(), encode_request(), encode_empty()) writes the whole
datagram into one bytes object.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_AsUnsignedLongLong, PyLong_Check, PyLong_FromUnsignedLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.number cimport PyNumber_Index
from cpython.tuple cimport PyTuple_CheckExact, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memcpy

from gateway._native._bytes cimport (
    UTF8_ILL_FORMED,
    load_u16be,
    load_uint_be,
    store_u16be,
    store_uint_be,
    uint_be_len,
    utf8_check,
)

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    object PyMemoryView_FromObject(object o)
    int PyBuffer_FillInfo(Py_buffer *view, object exporter, void *buf, Py_ssize_t len,
                          int readonly, int flags) except -1
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void *PyUnicode_DATA(object o)

include "coap_consts.pxi"


# ---- public constants --------------------------------------------------------------------

CON, NON, ACK, RST = 0, 1, 2, 3

# Codes are class << 5 | detail: 2.05 is 69.
EMPTY = 0
GET = 1
POST = 2
PUT = 3
DELETE = 4
FETCH = 5
PATCH = 6
IPATCH = 7
CREATED = 65
DELETED = 66
VALID = 67
CHANGED = 68
CONTENT = 69
CONTINUE = 95
BAD_REQUEST = 128
UNAUTHORIZED = 129
BAD_OPTION = 130
FORBIDDEN = 131
NOT_FOUND = 132
METHOD_NOT_ALLOWED = 133
NOT_ACCEPTABLE = 134
REQUEST_ENTITY_INCOMPLETE = 136
CONFLICT = 137
PRECONDITION_FAILED = 140
REQUEST_ENTITY_TOO_LARGE = 141
UNSUPPORTED_CONTENT_FORMAT = 143
UNPROCESSABLE_ENTITY = 150
TOO_MANY_REQUESTS = 157  # 4.29, RFC 8516
INTERNAL_SERVER_ERROR = 160
NOT_IMPLEMENTED = 161
BAD_GATEWAY = 162
SERVICE_UNAVAILABLE = 163
GATEWAY_TIMEOUT = 164
PROXYING_NOT_SUPPORTED = 165

IF_MATCH = O_IF_MATCH
URI_HOST = O_URI_HOST
ETAG = O_ETAG
IF_NONE_MATCH = O_IF_NONE_MATCH
OBSERVE = O_OBSERVE
URI_PORT = O_URI_PORT
LOCATION_PATH = O_LOCATION_PATH
URI_PATH = O_URI_PATH
CONTENT_FORMAT = O_CONTENT_FORMAT
MAX_AGE = O_MAX_AGE
URI_QUERY = O_URI_QUERY
ACCEPT = O_ACCEPT
LOCATION_QUERY = O_LOCATION_QUERY
BLOCK2 = O_BLOCK2
BLOCK1 = O_BLOCK1
SIZE2 = O_SIZE2
PROXY_URI = O_PROXY_URI
PROXY_SCHEME = O_PROXY_SCHEME
SIZE1 = O_SIZE1
NO_RESPONSE = O_NO_RESPONSE

# Content-Format numbers (IANA CoAP Content-Formats registry).
TEXT_PLAIN = 0
LINK_FORMAT = 40
XML = 41
OCTET_STREAM = 42
EXI = 47
JSON = 50
JSON_PATCH = 51
MERGE_PATCH = 52
CBOR = 60
SENML_JSON = 110
SENML_CBOR = 112


class CoapError(ValueError):
    """A CoAP datagram or value that the codec rejects."""


class CoapFormatError(CoapError):
    """A message format error (RFC 7252 3, 4.1): the datagram is rejected as a whole.

    `mid` and `type` are set when the 4-byte header of a version 1 message was readable, so
    the endpoint can reject a CON with a matching RST; they are None otherwise (a datagram of
    another version must be ignored silently, RFC 7252 3)."""

    def __init__(self, message, mid=None, type=None):
        super().__init__(message)
        self.mid = mid
        self.type = type


# ---- option table --------------------------------------------------------------------------

cdef struct OptSpec:
    uint32_t lo           # shortest valid value (RFC 7252 table 4)
    uint32_t hi           # longest valid value
    uint8_t fmt           # F_*; F_UNKNOWN for numbers the codec does not recognize
    uint8_t repeatable

cdef OptSpec _SPECS[SPEC_TABLE]   # numbers 0..63; unknown ones set to _SPEC_UNKNOWN
cdef OptSpec _SPEC_NO_RESPONSE
cdef OptSpec _SPEC_UNKNOWN


cdef void _set_spec(OptSpec *s, int lo, int hi, int fmt, int repeatable) noexcept:
    s.lo = lo
    s.hi = hi
    s.fmt = fmt
    s.repeatable = repeatable


cdef void _init_specs() noexcept:
    cdef int i
    _set_spec(&_SPEC_UNKNOWN, 0, MAX_EXT, F_UNKNOWN, 1)
    for i in range(SPEC_TABLE):
        _SPECS[i] = _SPEC_UNKNOWN
    _set_spec(&_SPECS[O_IF_MATCH], 0, 8, F_OPAQUE, 1)
    _set_spec(&_SPECS[O_URI_HOST], 1, 255, F_STRING, 0)
    _set_spec(&_SPECS[O_ETAG], 1, 8, F_OPAQUE, 1)
    _set_spec(&_SPECS[O_IF_NONE_MATCH], 0, 0, F_EMPTY, 0)
    _set_spec(&_SPECS[O_OBSERVE], 0, 3, F_UINT, 0)
    _set_spec(&_SPECS[O_URI_PORT], 0, 2, F_UINT, 0)
    _set_spec(&_SPECS[O_LOCATION_PATH], 0, 255, F_STRING, 1)
    _set_spec(&_SPECS[O_URI_PATH], 0, 255, F_STRING, 1)
    _set_spec(&_SPECS[O_CONTENT_FORMAT], 0, 2, F_UINT, 0)
    _set_spec(&_SPECS[O_MAX_AGE], 0, 4, F_UINT, 0)
    _set_spec(&_SPECS[O_URI_QUERY], 0, 255, F_STRING, 1)
    _set_spec(&_SPECS[O_ACCEPT], 0, 2, F_UINT, 0)
    _set_spec(&_SPECS[O_LOCATION_QUERY], 0, 255, F_STRING, 1)
    _set_spec(&_SPECS[O_BLOCK2], 0, 3, F_BLOCK, 0)
    _set_spec(&_SPECS[O_BLOCK1], 0, 3, F_BLOCK, 0)
    _set_spec(&_SPECS[O_SIZE2], 0, 4, F_UINT, 0)
    _set_spec(&_SPECS[O_PROXY_URI], 1, 1034, F_STRING, 0)
    _set_spec(&_SPECS[O_PROXY_SCHEME], 1, 255, F_STRING, 0)
    _set_spec(&_SPECS[O_SIZE1], 0, 4, F_UINT, 0)
    _set_spec(&_SPEC_NO_RESPONSE, 0, 1, F_UINT, 0)


_init_specs()


cdef inline const OptSpec *_spec_of(uint32_t number) noexcept nogil:
    if number < SPEC_TABLE:
        return &_SPECS[number]
    if number == O_NO_RESPONSE:
        return &_SPEC_NO_RESPONSE
    return &_SPEC_UNKNOWN


cdef inline bint _is_bad(uint32_t number, uint32_t prev, const unsigned char *v,
                         Py_ssize_t n) noexcept nogil:
    """True when an option must be treated as unrecognized (RFC 7252 5.4.1, 5.4.3, 5.4.5)."""
    cdef const OptSpec *s = _spec_of(number)
    if s.fmt == F_UNKNOWN:
        return True
    if n < s.lo or n > s.hi:
        return True
    if number == prev and not s.repeatable:
        return True                         # a supernumerary occurrence
    if s.fmt == F_STRING:
        return utf8_check(v, n) == UTF8_ILL_FORMED
    if s.fmt == F_BLOCK:
        return n > 0 and (v[n - 1] & 7) == 7   # SZX 7 is reserved (RFC 7959 2.2)
    return False


# ---- Message -------------------------------------------------------------------------------

cdef struct Opt:
    uint32_t offset       # of the value, from Message._base
    uint32_t length
    uint16_t number
    uint16_t bad          # skipped by the typed getters


# No cycles are possible (the object fields hold bytes-like objects only), so no GC tracking.
@cython.final
@cython.no_gc
@cython.freelist(64)
cdef class Message:
    """A CoAP message: decoded from a datagram (zero copy) or built to be encoded.

    Message(type, code, mid=0, token=b"", options=(), payload=b"") builds one; options is a
    sequence of (number, value) with value an int (minimal uint), a str (UTF-8) or bytes-like,
    kept in order per number. Values are checked against the RFC's length limits here
    (ValueError), so encode() cannot fail.
    """

    cdef readonly int type
    cdef readonly int code
    cdef readonly int mid
    cdef object _data              # owns the bytes _base points into: datagram or our options
    cdef const unsigned char *_base
    cdef Py_buffer _view           # held while _data is not bytes: it cannot move or shrink
    cdef bint _has_view
    cdef bint _decoded
    cdef object _token             # bytes; made on first read for a decoded message
    cdef object _payload           # None until read (decoded) or the object given (built)
    cdef Py_ssize_t _tkl
    cdef Py_ssize_t _opt_start     # options region in _base, as it goes on the wire
    cdef Py_ssize_t _opt_end
    cdef Py_ssize_t _pay_start     # payload in _base (decoded messages)
    cdef Py_ssize_t _pay_len
    cdef Py_ssize_t _nopts
    cdef Py_ssize_t _nbadcrit      # bad critical options (with repeats)
    cdef Py_ssize_t _cap           # capacity of _heap
    cdef Opt *_heap                # NULL while the options fit in _inline
    cdef Opt _inline[INLINE_OPTS]

    def __init__(self, type, code, mid=0, token=b"", options=(), payload=b""):
        cdef bytes region
        self._release()
        self.type = _check_int(type, 0, 3, "type")
        self.code = _check_int(code, 0, 255, "code")
        self.mid = _check_int(mid, 0, 65535, "mid")
        self._token = _token_bytes(token)
        self._tkl = PyBytes_GET_SIZE(self._token)
        _payload_len(payload)      # a TypeError now rather than at encode()
        self._payload = payload
        region = _encode_options(options)
        if PyBytes_GET_SIZE(region) > <Py_ssize_t>0xFFFFFFFF:
            raise ValueError("options too long")
        self._data = region
        self._base = <const unsigned char *>PyBytes_AS_STRING(region)
        self._opt_start = 0
        self._decoded = False
        # Our own encoding of the options: scanning it fills the table and the bad flags
        # exactly as for a received message.
        _scan_options(self, 0, PyBytes_GET_SIZE(region))

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)
        if self._heap != NULL:
            PyMem_Free(self._heap)

    cdef void _release(self) noexcept:
        """Forget any previous content (only __init__ on an existing object needs this)."""
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False
        self._nopts = 0
        self._nbadcrit = 0
        self._pay_start = 0
        self._pay_len = 0

    cdef inline Opt *_table(self) noexcept:
        return self._heap if self._heap != NULL else &self._inline[0]

    cdef int _push(self, uint32_t number, Py_ssize_t offset, Py_ssize_t length,
                   bint bad) except -1:
        cdef Opt *t
        cdef Py_ssize_t cap
        if self._heap == NULL and self._nopts == INLINE_OPTS:
            cap = INLINE_OPTS * 4
            t = <Opt *>PyMem_Malloc(cap * sizeof(Opt))
            if t == NULL:
                raise MemoryError()
            memcpy(t, &self._inline[0], INLINE_OPTS * sizeof(Opt))
            self._heap = t
            self._cap = cap
        elif self._heap != NULL and self._nopts == self._cap:
            cap = self._cap * 2
            t = <Opt *>PyMem_Realloc(self._heap, cap * sizeof(Opt))
            if t == NULL:
                raise MemoryError()
            self._heap = t
            self._cap = cap
        t = self._table() + self._nopts
        t.number = <uint16_t>number
        t.offset = <uint32_t>offset
        t.length = <uint32_t>length
        t.bad = bad
        self._nopts += 1
        return 0

    cdef Py_ssize_t _find(self, uint32_t number) noexcept:
        """Index of the first good option with this number, or -1 (the table is sorted)."""
        cdef Opt *t = self._table()
        cdef Py_ssize_t i
        for i in range(self._nopts):
            if t[i].number == number:
                if not t[i].bad:
                    return i
            elif t[i].number > number:
                break
        return -1

    cdef object _uint(self, uint32_t number):
        cdef Py_ssize_t i = self._find(number)
        cdef Opt *o
        if i < 0:
            return None
        o = self._table() + i
        return PyLong_FromUnsignedLongLong(load_uint_be(self._base + o.offset, o.length))

    cdef object _str(self, uint32_t number):
        cdef Py_ssize_t i = self._find(number)
        cdef Opt *o
        if i < 0:
            return None
        o = self._table() + i
        return PyUnicode_DecodeUTF8(<char *>self._base + o.offset, o.length, NULL)

    cdef list _values(self, uint32_t number, bint text, bint all_):
        """Values of every option with this number: good ones only unless all_."""
        cdef Opt *t = self._table()
        cdef Py_ssize_t i
        cdef list out = []
        for i in range(self._nopts):
            if t[i].number == number:
                if t[i].bad and not all_:
                    continue
                if text:
                    out.append(PyUnicode_DecodeUTF8(<char *>self._base + t[i].offset,
                                                    t[i].length, NULL))
                else:
                    out.append(PyBytes_FromStringAndSize(<char *>self._base + t[i].offset,
                                                         t[i].length))
            elif t[i].number > number:
                break
        return out

    cdef object _block(self, uint32_t number):
        cdef object v = self._uint(number)
        cdef uint32_t x
        if v is None:
            return None
        x = v
        return (x >> 4, bool(x & 8), x & 7)

    # -- header fields --

    @property
    def token(self):
        """The token (0 to 8 bytes)."""
        if self._token is None:
            self._token = PyBytes_FromStringAndSize(<char *>self._base + 4, self._tkl)
        return self._token

    @property
    def payload(self):
        """A memoryview of the datagram (decoded; it keeps the message and its buffer alive),
        the object given (built), or b"" when there is none."""
        cdef _PayloadExport export
        if self._payload is None:
            if self._pay_len == 0:
                self._payload = b""
            else:
                # One memoryview straight onto the payload bytes, rather than a view of the
                # whole datagram and then a slice of it.
                export = _PayloadExport.__new__(_PayloadExport)
                if self._has_view:
                    # Not bytes: the export needs its own hold so the memory stays put.
                    PyObject_GetBuffer(self._data, &export.src, PyBUF_SIMPLE)
                    export.held = True
                else:
                    export.data = self._data        # bytes never move
                export.ptr = <const char *>self._base + self._pay_start
                export.length = self._pay_len
                self._payload = PyMemoryView_FromObject(export)
        return self._payload

    @property
    def bad_critical(self):
        """Critical option numbers (once each, ascending) that are unrecognized, have a value
        of a length out of range, are not valid UTF-8 (strings), repeat a non-repeatable
        option or, for Block1/Block2, use SZX 7. A request with any gets 4.02, a response an
        RST (RFC 7252 5.4.1). Bad elective options are only skipped by the typed getters."""
        cdef Opt *t
        cdef Py_ssize_t i
        cdef long last = -1
        cdef list out
        if self._nbadcrit == 0:
            return ()
        t = self._table()
        out = []
        for i in range(self._nopts):
            if t[i].bad and t[i].number & 1 and t[i].number != last:
                last = t[i].number
                out.append(last)
        return tuple(out)

    @property
    def is_request(self):
        return 1 <= self.code <= 31

    @property
    def is_response(self):
        return 64 <= self.code < 192

    @property
    def is_empty(self):
        return self.code == 0

    # -- typed option getters (bad options skipped) --

    @property
    def uri_host(self):
        return self._str(O_URI_HOST)

    @property
    def uri_port(self):
        return self._uint(O_URI_PORT)

    @property
    def uri_path(self):
        return self._values(O_URI_PATH, True, False)

    @property
    def uri_query(self):
        return self._values(O_URI_QUERY, True, False)

    @property
    def path(self):
        """The Uri-Path options joined as "/a/b" ("/" when there are none)."""
        cdef Opt *t = self._table()
        cdef Py_ssize_t i, j, size = 0, segments = 0
        cdef unsigned char ascii = 0
        cdef unsigned char *w
        cdef object out
        for i in range(self._nopts):
            if t[i].number == O_URI_PATH and not t[i].bad:
                size += 1 + t[i].length
                segments += 1
                for j in range(t[i].length):
                    ascii |= self._base[t[i].offset + j]
            elif t[i].number > O_URI_PATH:
                break
        if segments == 0:
            return "/"
        if ascii & 0x80:
            return "/" + "/".join(self._values(O_URI_PATH, True, False))
        # All ASCII (the usual case): write the string in place, one allocation.
        out = PyUnicode_New(size, 127)
        w = <unsigned char *>PyUnicode_DATA(out)
        for i in range(self._nopts):
            if t[i].number == O_URI_PATH and not t[i].bad:
                w[0] = 47                    # "/"
                memcpy(w + 1, self._base + t[i].offset, t[i].length)
                w += 1 + t[i].length
            elif t[i].number > O_URI_PATH:
                break
        return out

    @property
    def location_path(self):
        return self._values(O_LOCATION_PATH, True, False)

    @property
    def location_query(self):
        return self._values(O_LOCATION_QUERY, True, False)

    @property
    def content_format(self):
        return self._uint(O_CONTENT_FORMAT)

    @property
    def accept(self):
        return self._uint(O_ACCEPT)

    @property
    def max_age(self):
        """Max-Age in seconds, None when absent (the RFC's default is 60)."""
        return self._uint(O_MAX_AGE)

    @property
    def observe(self):
        return self._uint(O_OBSERVE)

    @property
    def etag(self):
        """The first ETag (as in a response)."""
        cdef Py_ssize_t i = self._find(O_ETAG)
        cdef Opt *o
        if i < 0:
            return None
        o = self._table() + i
        return PyBytes_FromStringAndSize(<char *>self._base + o.offset, o.length)

    @property
    def etags(self):
        return self._values(O_ETAG, False, False)

    @property
    def if_match(self):
        return self._values(O_IF_MATCH, False, False)

    @property
    def if_none_match(self):
        return self._find(O_IF_NONE_MATCH) >= 0

    @property
    def block1(self):
        """(num, more, szx) or None."""
        return self._block(O_BLOCK1)

    @property
    def block2(self):
        """(num, more, szx) or None."""
        return self._block(O_BLOCK2)

    @property
    def size1(self):
        return self._uint(O_SIZE1)

    @property
    def size2(self):
        return self._uint(O_SIZE2)

    @property
    def proxy_uri(self):
        return self._str(O_PROXY_URI)

    @property
    def proxy_scheme(self):
        return self._str(O_PROXY_SCHEME)

    @property
    def no_response(self):
        return self._uint(O_NO_RESPONSE)

    # -- raw options --

    def get_options(self, number):
        """The raw values of every option with this number, bad ones included."""
        return self._values(_check_int(number, 0, MAX_OPTION_NUMBER, "option number"),
                            False, True)

    @property
    def options(self):
        """Every option as (number, raw value), in message order, bad ones included."""
        cdef Opt *t = self._table()
        cdef Py_ssize_t i
        cdef list out = []
        for i in range(self._nopts):
            out.append((t[i].number,
                        PyBytes_FromStringAndSize(<char *>self._base + t[i].offset,
                                                  t[i].length)))
        return out

    # -- encoding --

    def encode(self):
        """The datagram (one allocation). A decoded message re-encodes its options as they
        arrived, so any message that decoded encodes again."""
        cdef const unsigned char *tok
        cdef const unsigned char *pay
        cdef Py_ssize_t plen, olen = self._opt_end - self._opt_start
        cdef Py_buffer view
        cdef bint has_view = False
        cdef bytes out
        if self._token is not None:
            tok = <const unsigned char *>PyBytes_AS_STRING(self._token)
        else:
            tok = self._base + 4
        if self._decoded:
            pay = self._base + self._pay_start
            plen = self._pay_len
        elif PyBytes_CheckExact(self._payload):
            pay = <const unsigned char *>PyBytes_AS_STRING(self._payload)
            plen = PyBytes_GET_SIZE(self._payload)
        else:
            PyObject_GetBuffer(self._payload, &view, PyBUF_SIMPLE)
            has_view = True
            pay = <const unsigned char *>view.buf
            plen = view.len
        try:
            out = PyBytes_FromStringAndSize(
                NULL, 4 + self._tkl + olen + (plen + 1 if plen else 0))
            _write(<unsigned char *>PyBytes_AS_STRING(out), self.type, self.code, self.mid,
                   tok, self._tkl, self._base + self._opt_start, olen, pay, plen)
        finally:
            if has_view:
                PyBuffer_Release(&view)
        return out

    def __repr__(self):
        cdef Py_ssize_t plen = self._pay_len if self._decoded else len(self._payload)
        return (f"<coap.Message {_TYPE_NAMES[self.type]} {code_str(self.code)} "
                f"mid={self.mid} token={self.token.hex() or '-'} options={self._nopts} "
                f"payload={plen}B>")


_TYPE_NAMES = ("CON", "NON", "ACK", "RST")


@cython.final
@cython.no_gc
@cython.freelist(64)
cdef class _PayloadExport:
    """Exports a decoded message's payload bytes (read-only) to a memoryview. It holds its
    own buffer on the datagram, not the Message: the Message caches the memoryview, and a
    reference back would be a cycle that nothing collects."""

    cdef object data               # the datagram when it is bytes
    cdef Py_buffer src             # else a hold on its buffer
    cdef bint held
    cdef const char *ptr
    cdef Py_ssize_t length

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, <void *>self.ptr, self.length, 1, flags)

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.src)


# ---- decoding ------------------------------------------------------------------------------

cdef object _format_error(str what, Message m):
    return CoapFormatError(what, m.mid, m.type)


cdef int _scan_options(Message m, Py_ssize_t pos, Py_ssize_t end) except -1:
    """Record the options from pos in m's table and find the payload (RFC 7252 3.1)."""
    cdef const unsigned char *p = m._base
    cdef uint32_t number = 0
    cdef uint32_t prev = 0xFFFFFFFF     # no previous option
    cdef uint32_t delta, length
    cdef unsigned char b
    cdef bint bad
    while pos < end:
        b = p[pos]
        if b == PAYLOAD_MARKER:
            if pos + 1 == end:
                raise _format_error("payload marker with no payload", m)
            m._opt_end = pos
            m._pay_start = pos + 1
            m._pay_len = end - pos - 1
            return 0
        pos += 1
        delta = b >> 4
        length = b & 0x0F
        if delta >= 13:
            if delta == 13:
                if pos >= end:
                    raise _format_error("truncated option delta", m)
                delta = p[pos] + 13
                pos += 1
            elif delta == 14:
                if end - pos < 2:
                    raise _format_error("truncated option delta", m)
                delta = load_u16be(p + pos) + 269
                pos += 2
            else:
                raise _format_error("option delta 15 outside a payload marker", m)
        if length >= 13:
            if length == 13:
                if pos >= end:
                    raise _format_error("truncated option length", m)
                length = p[pos] + 13
                pos += 1
            elif length == 14:
                if end - pos < 2:
                    raise _format_error("truncated option length", m)
                length = load_u16be(p + pos) + 269
                pos += 2
            else:
                raise _format_error("option length 15", m)
        number += delta
        if number > MAX_OPTION_NUMBER:
            raise _format_error("option number above 65535", m)
        if end - pos < length:
            raise _format_error("truncated option value", m)
        bad = _is_bad(number, prev, p + pos, length)
        if bad and number & 1:
            m._nbadcrit += 1
        m._push(number, pos, length, bad)
        prev = number
        pos += length
    m._opt_end = end
    return 0


def decode(data):
    """Parse one CoAP datagram (bytes, bytearray, memoryview or any C-contiguous buffer)
    without copying it. Raises CoapFormatError for a message format error.

    The Message refers into data: a bytearray stays pinned (cannot be resized) while the
    Message or its payload view lives."""
    cdef Message m = Message.__new__(Message)
    cdef const unsigned char *p
    cdef Py_ssize_t n, tkl
    cdef int cls
    if PyBytes_CheckExact(data):
        p = <const unsigned char *>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    else:
        PyObject_GetBuffer(data, &m._view, PyBUF_SIMPLE)
        m._has_view = True
        p = <const unsigned char *>m._view.buf
        n = m._view.len
    m._data = data
    m._base = p
    m._decoded = True
    if n < 4:
        raise CoapFormatError("shorter than the 4-byte header")
    if p[0] >> 6 != 1:
        raise CoapFormatError(f"version {p[0] >> 6}, not 1")
    if n > <Py_ssize_t>0xFFFFFFFF:
        raise CoapFormatError("datagram too long")
    m.type = (p[0] >> 4) & 3
    m.code = p[1]
    m.mid = load_u16be(p + 2)
    tkl = p[0] & 0x0F
    if tkl > 8:
        raise _format_error("token length 9..15 is reserved", m)
    cls = m.code >> 5
    if cls == 1 or cls >= 6:
        raise _format_error(f"code class {cls} is reserved", m)
    if m.code == 0 and (tkl or n > 4):
        raise _format_error("an Empty message has bytes after the header", m)
    if n < 4 + tkl:
        raise _format_error("truncated token", m)
    m._tkl = tkl
    m._opt_start = 4 + tkl
    _scan_options(m, 4 + tkl, n)
    return m


# ---- encoding ------------------------------------------------------------------------------

cdef struct OptIn:
    const unsigned char *ptr   # the value's bytes (unused for a uint)
    Py_ssize_t length
    uint64_t uint_value
    uint32_t number
    uint32_t index             # position given, for a stable sort
    bint is_uint


cdef int _cmp_opt(const void *a, const void *b) noexcept nogil:
    cdef const OptIn *x = <const OptIn *>a
    cdef const OptIn *y = <const OptIn *>b
    if x.number != y.number:
        return -1 if x.number < y.number else 1
    return -1 if x.index < y.index else (1 if x.index > y.index else 0)


cdef int _check_int(object v, long lo, long hi, str what) except -1:
    """v as a C int in lo..hi (lo >= 0), else ValueError (OverflowError included)."""
    cdef long x
    if not PyLong_Check(v):
        v = PyNumber_Index(v)           # a TypeError for floats, which would truncate
    try:
        x = v
    except OverflowError:
        x = -1
    if x < lo or x > hi:
        raise ValueError(f"{what} must be in {lo}..{hi}, not {v!r}")
    return <int>x


cdef bytes _token_bytes(object token):
    cdef bytes b = token if PyBytes_CheckExact(token) else bytes(memoryview(token))
    if PyBytes_GET_SIZE(b) > 8:
        raise ValueError(f"a token has at most 8 bytes, not {PyBytes_GET_SIZE(b)}")
    return b


cdef Py_ssize_t _payload_len(object payload) except -1:
    cdef Py_buffer view
    cdef Py_ssize_t n
    if PyBytes_CheckExact(payload):
        return PyBytes_GET_SIZE(payload)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    n = view.len
    PyBuffer_Release(&view)
    return n


cdef inline Py_ssize_t _ext_len(Py_ssize_t v) noexcept nogil:
    """Extended bytes after the option header byte for a delta or length of v."""
    return 0 if v < 13 else (1 if v < 269 else 2)


cdef object _gather(tuple opts, OptIn *items, Py_ssize_t *wire_size):
    """Check each (number, value) into items, sort them stably by number and add up their
    wire size. Returns the objects that must stay alive while items is used (or None)."""
    cdef Py_ssize_t i, n = PyTuple_GET_SIZE(opts), size = 0
    cdef uint32_t prev = 0
    cdef bint ordered = True
    cdef object item, number, value, keep = None
    cdef OptIn *o
    cdef const OptSpec *spec
    for i in range(n):
        item = <object>PyTuple_GET_ITEM(opts, i)
        if PyTuple_CheckExact(item) and PyTuple_GET_SIZE(item) == 2:
            number = <object>PyTuple_GET_ITEM(item, 0)
            value = <object>PyTuple_GET_ITEM(item, 1)
        else:
            # A list or other pair could change under us: hold the value itself.
            number, value = item
            if keep is None:
                keep = []
            keep.append(value)
        o = items + i
        o.index = <uint32_t>i
        o.number = _check_int(number, 0, MAX_OPTION_NUMBER, "option number")
        o.is_uint = False
        if PyBytes_CheckExact(value):
            o.ptr = <const unsigned char *>PyBytes_AS_STRING(value)
            o.length = PyBytes_GET_SIZE(value)
        elif PyUnicode_Check(value):
            o.ptr = <const unsigned char *>PyUnicode_AsUTF8AndSize(value, &o.length)
        elif PyLong_Check(value):
            try:
                o.uint_value = PyLong_AsUnsignedLongLong(value)
            except OverflowError:
                raise ValueError(f"option {number}: {value!r} is not a uint of 0..8 bytes")
            o.is_uint = True
            o.length = uint_be_len(o.uint_value)
        else:
            value = bytes(memoryview(value))       # any other buffer: one copy
            if keep is None:
                keep = []
            keep.append(value)
            o.ptr = <const unsigned char *>PyBytes_AS_STRING(value)
            o.length = PyBytes_GET_SIZE(value)
        spec = _spec_of(o.number)
        if o.length < spec.lo or o.length > spec.hi:
            raise ValueError(f"option {o.number}: a value of {o.length} bytes is outside "
                             f"{spec.lo}..{spec.hi}")
        if o.number < prev:
            ordered = False
        prev = o.number
    if not ordered:
        qsort(items, n, sizeof(OptIn), _cmp_opt)
    prev = 0
    for i in range(n):
        o = items + i
        size += 1 + _ext_len(o.number - prev) + _ext_len(o.length) + o.length
        prev = o.number
    wire_size[0] = size
    return keep


cdef Py_ssize_t _write_options(unsigned char *p, const OptIn *items, Py_ssize_t n) noexcept:
    """Write sorted options at p; returns the bytes written."""
    cdef Py_ssize_t i, pos = 0, hdr, d, ln
    cdef uint32_t prev = 0
    cdef unsigned char nib_d, nib_l
    cdef const OptIn *o
    for i in range(n):
        o = items + i
        d = o.number - prev
        ln = o.length
        hdr = pos
        pos += 1
        if d < 13:
            nib_d = <unsigned char>d
        elif d < 269:
            nib_d = 13
            p[pos] = <unsigned char>(d - 13)
            pos += 1
        else:
            nib_d = 14
            store_u16be(p + pos, <uint32_t>(d - 269))
            pos += 2
        if ln < 13:
            nib_l = <unsigned char>ln
        elif ln < 269:
            nib_l = 13
            p[pos] = <unsigned char>(ln - 13)
            pos += 1
        else:
            nib_l = 14
            store_u16be(p + pos, <uint32_t>(ln - 269))
            pos += 2
        p[hdr] = (nib_d << 4) | nib_l
        if o.is_uint:
            store_uint_be(p + pos, o.uint_value, ln)
        else:
            memcpy(p + pos, o.ptr, ln)
        pos += ln
        prev = o.number
    return pos


cdef inline void _write(unsigned char *p, int type_, int code, int mid,
                        const unsigned char *tok, Py_ssize_t tkl,
                        const unsigned char *opts, Py_ssize_t olen,
                        const unsigned char *pay, Py_ssize_t plen) noexcept:
    """Header, token, already-encoded options and payload into p."""
    p[0] = <unsigned char>(0x40 | (type_ << 4) | tkl)
    p[1] = <unsigned char>code
    store_u16be(p + 2, <uint32_t>mid)
    p += 4
    memcpy(p, tok, tkl)
    p += tkl
    memcpy(p, opts, olen)
    p += olen
    if plen:
        p[0] = PAYLOAD_MARKER
        memcpy(p + 1, pay, plen)


cdef bytes _encode_options(object options):
    """The options alone, as they go on the wire."""
    cdef OptIn stack[16]
    cdef OptIn *items = stack
    cdef tuple opts = options if PyTuple_CheckExact(options) else tuple(options)
    cdef Py_ssize_t n = PyTuple_GET_SIZE(opts), size
    cdef object keep
    cdef bytes out
    if n == 0:
        return b""
    if n > 16:
        items = <OptIn *>PyMem_Malloc(n * sizeof(OptIn))
        if items == NULL:
            raise MemoryError()
    try:
        keep = _gather(opts, items, &size)
        out = PyBytes_FromStringAndSize(NULL, size)
        _write_options(<unsigned char *>PyBytes_AS_STRING(out), items, n)
    finally:
        if items != stack:
            PyMem_Free(items)
    return out


cdef bytes _encode(object type_, object code, object mid, object token, object options,
                   object payload):
    cdef OptIn stack[16]
    cdef OptIn *items = stack
    cdef int t = _check_int(type_, 0, 3, "type")
    cdef int c = _check_int(code, 0, 255, "code")
    cdef int m = _check_int(mid, 0, 65535, "mid")
    cdef bytes tok = _token_bytes(token)
    cdef tuple opts = options if PyTuple_CheckExact(options) else tuple(options)
    cdef Py_ssize_t n = PyTuple_GET_SIZE(opts), osize = 0, plen, tkl = PyBytes_GET_SIZE(tok)
    cdef object keep = None
    cdef Py_buffer view
    cdef bint has_view = False
    cdef const unsigned char *pay
    cdef unsigned char *p
    cdef bytes out
    if n > 16:
        items = <OptIn *>PyMem_Malloc(n * sizeof(OptIn))
        if items == NULL:
            raise MemoryError()
    try:
        if n:
            keep = _gather(opts, items, &osize)
        if PyBytes_CheckExact(payload):
            pay = <const unsigned char *>PyBytes_AS_STRING(payload)
            plen = PyBytes_GET_SIZE(payload)
        else:
            PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
            has_view = True
            pay = <const unsigned char *>view.buf
            plen = view.len
        out = PyBytes_FromStringAndSize(NULL, 4 + tkl + osize + (plen + 1 if plen else 0))
        p = <unsigned char *>PyBytes_AS_STRING(out)
        p[0] = <unsigned char>(0x40 | (t << 4) | tkl)
        p[1] = <unsigned char>c
        store_u16be(p + 2, <uint32_t>m)
        memcpy(p + 4, PyBytes_AS_STRING(tok), tkl)
        p += 4 + tkl
        p += _write_options(p, items, n)
        if plen:
            p[0] = PAYLOAD_MARKER
            memcpy(p + 1, pay, plen)
    finally:
        if has_view:
            PyBuffer_Release(&view)
        if items != stack:
            PyMem_Free(items)
    return out


def encode(type, code, mid, token=b"", options=(), payload=b""):
    """One datagram from its fields, in one allocation (the hot path: no Message made).
    options as for Message(); ValueError for a field or value out of range."""
    return _encode(type, code, mid, token, options, payload)


def encode_request(type, code, mid, token, path, options=(), payload=b""):
    """A request for path ("a/b" or "/a/b?x=1&y=2": Uri-Path and Uri-Query options, not
    percent-decoded) plus any other options."""
    cdef str p, q
    cdef list opts
    p, _, q = path.partition("?")
    if p.startswith("/"):
        p = p[1:]
    opts = [(O_URI_PATH, s) for s in p.split("/")] if p else []
    if q:
        opts += [(O_URI_QUERY, s) for s in q.split("&")]
    opts += options
    return _encode(type, code, mid, token, opts, payload)


def encode_empty(type, mid):
    """An Empty message (4 bytes): an ACK, an RST or a CON ping."""
    cdef int t = _check_int(type, 0, 3, "type")
    cdef int m = _check_int(mid, 0, 65535, "mid")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 4)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    p[0] = <unsigned char>(0x40 | (t << 4))
    p[1] = 0
    store_u16be(p + 2, <uint32_t>m)
    return out


# ---- helpers -------------------------------------------------------------------------------

def code_str(code):
    """69 -> "2.05"."""
    cdef int c = _check_int(code, 0, 255, "code")
    return f"{c >> 5}.{c & 31:02d}"


def block_value(num, more, szx):
    """The uint value of a Block1/Block2 option (RFC 7959 2.2)."""
    cdef long n = _check_int(num, 0, 0xFFFFF, "block number")
    cdef long s = _check_int(szx, 0, 6, "szx")
    return (n << 4) | (8 if more else 0) | s


def block_size(szx):
    """The block size of an SZX: 16 << szx."""
    return 16 << _check_int(szx, 0, 6, "szx")
