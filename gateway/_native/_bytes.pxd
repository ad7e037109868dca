# cython: language_level=3
"""Byte primitives shared by the MQTT and CoAP codecs (cimported, all inline).

A `Cursor` walks a borrowed buffer without slicing (asyncpg's FRBuffer idea): the
readers return 0 on success and a negative status on short or bad input, and never
raise, so each codec turns a status into its own typed error.
"""
from libc.stdint cimport uint32_t, uint64_t


cdef struct Cursor:
    const unsigned char *buf   # start of the buffer (not of the cursor)
    Py_ssize_t pos             # next byte to read
    Py_ssize_t end             # one past the last readable byte


# Status codes of the readers.
cdef enum:
    CUR_OK = 0
    CUR_SHORT = -1             # not enough bytes left
    CUR_VARINT_TOO_LONG = -2   # an MQTT variable byte integer of more than 4 bytes

# Results of utf8_check.
cdef enum:
    UTF8_OK = 0
    UTF8_HAS_NUL = 1           # well-formed, but contains U+0000
    UTF8_ILL_FORMED = 2        # not well-formed UTF-8 (RFC 3629), incl. surrogates, overlongs


cdef inline void cur_init(Cursor *c, const unsigned char *buf, Py_ssize_t pos,
                          Py_ssize_t end) noexcept nogil:
    c.buf = buf
    c.pos = pos
    c.end = end


cdef inline Py_ssize_t cur_left(const Cursor *c) noexcept nogil:
    return c.end - c.pos


cdef inline int cur_u8(Cursor *c, uint32_t *out) noexcept nogil:
    if c.pos >= c.end:
        return CUR_SHORT
    out[0] = c.buf[c.pos]
    c.pos += 1
    return CUR_OK


cdef inline int cur_u16(Cursor *c, uint32_t *out) noexcept nogil:
    if c.end - c.pos < 2:
        return CUR_SHORT
    out[0] = load_u16be(c.buf + c.pos)
    c.pos += 2
    return CUR_OK


cdef inline int cur_u32(Cursor *c, uint32_t *out) noexcept nogil:
    if c.end - c.pos < 4:
        return CUR_SHORT
    out[0] = load_u32be(c.buf + c.pos)
    c.pos += 4
    return CUR_OK


cdef inline int cur_varint(Cursor *c, uint32_t *out) noexcept nogil:
    """MQTT variable byte integer: 1 to 4 bytes, 7 bits each, least significant first."""
    cdef uint32_t value = 0
    cdef unsigned int shift = 0
    cdef unsigned char b
    while True:
        if c.pos >= c.end:
            return CUR_SHORT
        if shift == 28:
            return CUR_VARINT_TOO_LONG
        b = c.buf[c.pos]
        c.pos += 1
        value |= (<uint32_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            out[0] = value
            return CUR_OK
        shift += 7


cdef inline int cur_take(Cursor *c, Py_ssize_t n, Py_ssize_t *start) noexcept nogil:
    """Skip n bytes; their offset in the buffer goes to *start."""
    if n < 0 or c.end - c.pos < n:
        return CUR_SHORT
    start[0] = c.pos
    c.pos += n
    return CUR_OK


cdef inline int cur_lstring(Cursor *c, Py_ssize_t *start, Py_ssize_t *n) noexcept nogil:
    """A 2-byte big-endian length followed by that many bytes (MQTT strings and binary data)."""
    cdef uint32_t length
    if cur_u16(c, &length) < 0:
        return CUR_SHORT
    if c.end - c.pos < <Py_ssize_t>length:
        return CUR_SHORT
    start[0] = c.pos
    n[0] = length
    c.pos += length
    return CUR_OK


# ---- big-endian loads and stores ----------------------------------------------------------

cdef inline uint32_t load_u16be(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t load_u32be(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t load_uint_be(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """A big-endian unsigned integer of n bytes (0 to 8); 0 bytes is the value 0 (CoAP uint)."""
    cdef uint64_t v = 0
    cdef Py_ssize_t i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef inline void store_u16be(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v


cdef inline void store_u32be(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline Py_ssize_t uint_be_len(uint64_t v) noexcept nogil:
    """Bytes in the shortest big-endian form of v (0 for 0, as CoAP's uint format wants)."""
    cdef Py_ssize_t n = 0
    while v:
        n += 1
        v >>= 8
    return n


cdef inline void store_uint_be(unsigned char *p, uint64_t v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = n - 1
    while i >= 0:
        p[i] = <unsigned char>v
        v >>= 8
        i -= 1


cdef inline Py_ssize_t varint_len(uint32_t v) noexcept nogil:
    """Bytes in the MQTT variable byte integer for v (v < 268,435,456)."""
    if v < 128:
        return 1
    if v < 16384:
        return 2
    if v < 2097152:
        return 3
    return 4


cdef inline Py_ssize_t store_varint(unsigned char *p, uint32_t v) noexcept nogil:
    """Write v as an MQTT variable byte integer; returns the bytes written."""
    cdef Py_ssize_t n = 0
    while True:
        if v < 128:
            p[n] = <unsigned char>v
            return n + 1
        p[n] = <unsigned char>((v & 0x7F) | 0x80)
        v >>= 7
        n += 1


# ---- UTF-8 ---------------------------------------------------------------------------------

cdef inline int utf8_check(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    """Classify s as UTF8_OK, UTF8_HAS_NUL or UTF8_ILL_FORMED (RFC 3629 well-formedness:
    no overlong forms, no surrogates U+D800..U+DFFF, nothing above U+10FFFF)."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, c1
    cdef int nul = 0
    while i < n:
        c = s[i]
        if c < 0x80:
            if c == 0:
                nul = 1
            i += 1
            continue
        if c < 0xC2:                        # stray continuation byte or overlong 2-byte lead
            return UTF8_ILL_FORMED
        if c < 0xE0:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return UTF8_ILL_FORMED
            i += 2
            continue
        if c < 0xF0:
            if i + 2 >= n:
                return UTF8_ILL_FORMED
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return UTF8_ILL_FORMED
            if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0):
                return UTF8_ILL_FORMED      # overlong 3-byte form, or a surrogate
            i += 3
            continue
        if c < 0xF5:
            if i + 3 >= n:
                return UTF8_ILL_FORMED
            c1 = s[i + 1]
            if ((c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80
                    or (s[i + 3] & 0xC0) != 0x80):
                return UTF8_ILL_FORMED
            if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):
                return UTF8_ILL_FORMED      # overlong 4-byte form, or above U+10FFFF
            i += 4
            continue
        return UTF8_ILL_FORMED
    return UTF8_HAS_NUL if nul else UTF8_OK
