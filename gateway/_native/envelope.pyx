# cython: language_level=3
"""Telemetry envelopes (gateway/telemetry/records.py) and their segment frames
(gateway/telemetry/filesink.py), written in one pass.

`envelope(record)` returns exactly `msgpack.packb({"device": ..., "ts_ms": ..., "seq": ...,
"kind": ..., "protocol": ..., "topic_or_path": ..., "payload": ...}, use_bin_type=True)`, and
`frame_records(records)` exactly `filesink.frame([envelope(r) for r in records])`. Building the
map and framing it in Python was a tenth of the CPU of a durable CoAP request. A record this
code does not handle itself (a field of another type, a negative or huge number) is packed by
`fallback(record)`, msgpack in Python, so the bytes and the errors stay msgpack's.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_CheckExact
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
# PyErr_Occurred returns a borrowed reference: cpython.exc declares it so (an `object` return
# would be released once per call, and the exception type freed at exit).
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.long cimport PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport PyUnicode_CheckExact
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy


cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL
    bint PyMemoryView_Check(object o)
    # Without an except clause: _uint64 checks for (and clears) the error itself.
    unsigned long long PyLong_AsUnsignedLongLong(object o)


cdef uint32_t CRC[8][256]  # slicing-by-8 tables of the IEEE polynomial (zlib.crc32)


cdef void _crc_init() noexcept:
    cdef uint32_t c
    cdef int n, k
    for n in range(256):
        c = <uint32_t>n
        for k in range(8):
            c = (0xEDB88320U ^ (c >> 1)) if (c & 1) else (c >> 1)
        CRC[0][n] = c
    for n in range(256):
        for k in range(1, 8):
            CRC[k][n] = (CRC[k - 1][n] >> 8) ^ CRC[0][CRC[k - 1][n] & 0xFFU]


_crc_init()


cdef inline uint32_t _crc32(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """zlib.crc32, eight bytes a step."""
    cdef uint32_t c = 0xFFFFFFFFU
    cdef uint32_t lo, hi
    while n >= 8:
        lo = (p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)) ^ c
        hi = p[4] | (<uint32_t>p[5] << 8) | (<uint32_t>p[6] << 16) | (<uint32_t>p[7] << 24)
        c = (CRC[7][lo & 0xFFU] ^ CRC[6][(lo >> 8) & 0xFFU] ^ CRC[5][(lo >> 16) & 0xFFU]
             ^ CRC[4][lo >> 24] ^ CRC[3][hi & 0xFFU] ^ CRC[2][(hi >> 8) & 0xFFU]
             ^ CRC[1][(hi >> 16) & 0xFFU] ^ CRC[0][hi >> 24])
        p += 8
        n -= 8
    while n > 0:
        c = CRC[0][(c ^ p[0]) & 0xFFU] ^ (c >> 8)
        p += 1
        n -= 1
    return c ^ 0xFFFFFFFFU


cdef struct Buf:
    uint8_t *data
    Py_ssize_t len
    Py_ssize_t cap


cdef int _reserve(Buf *b, Py_ssize_t more) except -1:
    cdef Py_ssize_t cap
    cdef uint8_t *grown
    if b.len + more <= b.cap:
        return 0
    cap = max(b.cap * 2, b.len + more, 256)
    grown = <uint8_t *>PyMem_Realloc(b.data, cap)
    if grown == NULL:
        raise MemoryError()
    b.data = grown
    b.cap = cap
    return 0


cdef inline int _put(Buf *b, const void *src, Py_ssize_t n) except -1:
    _reserve(b, n)
    memcpy(b.data + b.len, src, n)
    b.len += n
    return 0


cdef int _head(Buf *b, uint8_t small_base, uint8_t small_max, uint8_t code8, uint8_t code16,
               uint8_t code32, Py_ssize_t n) except -1:
    """A str or bin header of length n (msgpack's shortest form)."""
    cdef uint8_t h[5]
    if small_max and n <= small_max:
        h[0] = small_base | <uint8_t>n
        return _put(b, h, 1)
    if n < 0x100:
        h[0] = code8
        h[1] = <uint8_t>n
        return _put(b, h, 2)
    if n < 0x10000:
        h[0] = code16
        h[1] = <uint8_t>(n >> 8)
        h[2] = <uint8_t>n
        return _put(b, h, 3)
    if n > 0xFFFFFFFFLL:
        raise ValueError("too long for msgpack")
    h[0] = code32
    h[1] = <uint8_t>(n >> 24)
    h[2] = <uint8_t>(n >> 16)
    h[3] = <uint8_t>(n >> 8)
    h[4] = <uint8_t>n
    return _put(b, h, 5)


cdef int _str(Buf *b, object s) except -1:
    cdef Py_ssize_t n
    cdef const char *utf8 = PyUnicode_AsUTF8AndSize(s, &n)
    _head(b, 0xA0, 31, 0xD9, 0xDA, 0xDB, n)
    return _put(b, utf8, n)


cdef int _key(Buf *b, bytes packed) except -1:
    return _put(b, PyBytes_AS_STRING(packed), len(packed))


cdef int _uint(Buf *b, object value) except -1:
    cdef uint64_t v = PyLong_AsUnsignedLongLong(value)
    cdef uint8_t h[9]
    cdef int n, i
    if v < 0x80:
        h[0] = <uint8_t>v
        return _put(b, h, 1)
    if v < 0x100:
        h[0] = 0xCC
        n = 1
    elif v < 0x10000:
        h[0] = 0xCD
        n = 2
    elif v < 0x100000000ULL:
        h[0] = 0xCE
        n = 4
    else:
        h[0] = 0xCF
        n = 8
    for i in range(n):
        h[n - i] = <uint8_t>(v >> (8 * i))
    return _put(b, h, n + 1)


# The keys, packed (fixstr), in the envelope's order.
_K_DEVICE = b"\xa6device"
_K_TS_MS = b"\xa5ts_ms"
_K_SEQ = b"\xa3seq"
_K_KIND = b"\xa4kind"
_K_PROTOCOL = b"\xa8protocol"
_K_TOPIC = b"\xadtopic_or_path"
_K_PAYLOAD = b"\xa7payload"


cdef inline bint _uint64(object n):
    """An int (not a bool) from 0 to 2**64 - 1."""
    if not PyLong_CheckExact(n):
        return False
    if PyLong_AsUnsignedLongLong(n) == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        PyErr_Clear()  # negative, or too big
        return False
    return True


cdef bint _plain(object record):
    """Whether every field is of a type and range this code packs itself."""
    p = record.payload
    return (
        PyUnicode_CheckExact(record.device)
        and PyUnicode_CheckExact(record.kind)
        and PyUnicode_CheckExact(record.protocol)
        and PyUnicode_CheckExact(record.topic_or_path)
        and _uint64(record.ts_ms)
        and _uint64(record.seq)
        and (PyBytes_CheckExact(p) or PyByteArray_CheckExact(p) or PyMemoryView_Check(p))
    )


cdef int _envelope(Buf *b, object record) except -1:
    cdef Py_buffer view
    cdef uint8_t fixmap = 0x87
    _put(b, &fixmap, 1)
    _key(b, _K_DEVICE)
    _str(b, record.device)
    _key(b, _K_TS_MS)
    _uint(b, record.ts_ms)
    _key(b, _K_SEQ)
    _uint(b, record.seq)
    _key(b, _K_KIND)
    _str(b, record.kind)
    _key(b, _K_PROTOCOL)
    _str(b, record.protocol)
    _key(b, _K_TOPIC)
    _str(b, record.topic_or_path)
    _key(b, _K_PAYLOAD)
    PyObject_GetBuffer(record.payload, &view, PyBUF_SIMPLE)
    try:
        _head(b, 0, 0, 0xC4, 0xC5, 0xC6, view.len)
        _put(b, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef int _escaped(Buf *out, const uint8_t *p, Py_ssize_t n) except -1:
    """Append p[:n] with every FE byte stuffed as FE 00."""
    cdef const uint8_t *end = p + n
    cdef const uint8_t *fe
    cdef uint8_t zero = 0
    while True:
        fe = <const uint8_t *>memchr(p, 0xFE, end - p)
        if fe == NULL:
            return _put(out, p, end - p)
        _put(out, p, fe + 1 - p)
        _put(out, &zero, 1)
        p = fe + 1


cdef int _frame(Buf *out, const uint8_t *body, Py_ssize_t n) except -1:
    cdef uint8_t head[8]
    cdef uint32_t crc = _crc32(body, n)
    cdef uint8_t marker[2]
    marker[0] = 0xFE
    marker[1] = 0xFF
    _put(out, marker, 2)
    head[0] = <uint8_t>(n >> 24)
    head[1] = <uint8_t>(n >> 16)
    head[2] = <uint8_t>(n >> 8)
    head[3] = <uint8_t>n
    head[4] = <uint8_t>(crc >> 24)
    head[5] = <uint8_t>(crc >> 16)
    head[6] = <uint8_t>(crc >> 8)
    head[7] = <uint8_t>crc
    _escaped(out, head, 8)
    return _escaped(out, body, n)


def envelope(record, fallback):
    """The record's envelope (msgpack map); `fallback(record)` packs one this code does not."""
    cdef Buf b
    if not _plain(record):
        return fallback(record)
    b.data = NULL
    b.len = b.cap = 0
    try:
        _envelope(&b, record)
        return PyBytes_FromStringAndSize(<char *>b.data, b.len)
    finally:
        PyMem_Free(b.data)


def frame_records(list records, fallback):
    """`filesink.frame([envelope(r) for r in records])`, in one pass."""
    cdef Buf body, out
    cdef bytes packed
    body.data = out.data = NULL
    body.len = body.cap = out.len = out.cap = 0
    try:
        for record in records:
            body.len = 0
            if _plain(record):
                _envelope(&body, record)
                _frame(&out, body.data, body.len)
            else:
                packed = fallback(record)
                _frame(&out, <const uint8_t *>PyBytes_AS_STRING(packed), len(packed))
        return PyBytes_FromStringAndSize(<char *>out.data, out.len)
    finally:
        PyMem_Free(body.data)
        PyMem_Free(out.data)
