"""A small DTLS 1.2 PSK client for tests and benchmarks: OpenSSL (pyOpenSSL, memory BIOs) over
a plain UDP socket, so that a test can see and replay the datagrams it sends, and send
ClientHellos that never go on."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

_binding = Binding()
_lib: Any = _binding.lib
_ffi: Any = _binding.ffi


class DtlsClient:
    def __init__(self, port: int, identity: str, key: bytes, host: str = "127.0.0.1") -> None:
        self.addr = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(self.addr)
        ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
        ctx.set_options(SSL.OP_NO_QUERY_MTU)
        ctx.set_cipher_list(b"PSK-AES128-CCM8:@SECLEVEL=0")  # RFC 7252's suite
        ident, secret = identity.encode(), key

        def psk(ssl: Any, hint: Any, id_out: Any, id_max: int, key_out: Any, key_max: int) -> int:
            _ffi.memmove(id_out, ident + b"\0", len(ident) + 1)
            _ffi.memmove(key_out, secret, len(secret))
            return len(secret)

        self._psk = _ffi.callback(
            "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *, "
            "unsigned int)", psk,
        )
        _lib.SSL_CTX_set_psk_client_callback(ctx._context, self._psk)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.conn.set_ciphertext_mtu(1400)
        self.sent: list[bytes] = []  # every datagram sent, for replays

    def _flush(self) -> None:
        while True:
            try:
                data = self.conn.bio_read(65536)
            except SSL.WantReadError:
                return
            self.sent.append(data)
            self.sock.send(data)

    def client_hello(self) -> bytes:
        """The first ClientHello (without a cookie), not sent."""
        with contextlib.suppress(SSL.WantReadError):
            self.conn.do_handshake()
        return self.conn.bio_read(65536)

    def handshake(self, timeout: float = 5.0, drop: int | None = None) -> None:
        """`drop`: lose the server's datagram with this index (0: the first), once."""
        deadline = time.monotonic() + timeout
        received = 0
        while True:
            try:
                self.conn.do_handshake()
                self._flush()
                return
            except SSL.WantReadError:
                self._flush()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("DTLS handshake did not finish")
            self.sock.settimeout(min(left, 0.5))
            try:
                datagram = self.sock.recv(65536)
            except TimeoutError:
                self.conn.DTLSv1_handle_timeout()
                continue
            received += 1
            if received - 1 != drop:
                self.conn.bio_write(datagram)

    def send(self, data: bytes) -> bytes:
        """Send one CoAP message; returns the datagram it went in."""
        self.conn.send(data)
        datagram = self.conn.bio_read(65536)
        self.sent.append(datagram)
        self.sock.send(datagram)
        return datagram

    def receive(self, timeout: float = 2.0) -> bytes | None:
        """The next CoAP message, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.conn.recv(65536)
            except SSL.WantReadError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                self.conn.bio_write(self.sock.recv(65536))
            except TimeoutError:
                return None

    def close(self) -> None:
        self.sock.close()
