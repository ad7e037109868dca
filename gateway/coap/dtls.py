"""CoAP over DTLS 1.2 (`coaps`, RFC 7252 9): the DTLS layer under the CoAP endpoint.

DTLS is OpenSSL's, through pyOpenSSL (README, "CoAP over DTLS", says why this library); this
module only moves datagrams between the UDP socket and OpenSSL's memory BIOs, on the event
loop, and keeps the per-peer state bounded:

- A datagram from an address without a session must be a ClientHello. It goes to one shared
  listening `SSL` object (`DTLSv1_listen`): without a valid cookie it is answered with a
  HelloVerifyRequest whose cookie is an HMAC of the peer's address under a secret that
  rotates, and nothing is kept. Only a ClientHello that returns the cookie (the peer can
  receive at the address it claims) creates a session: spoofed ClientHellos cost one HMAC.
- Half-finished handshakes are bounded (`DtlsLimits.max_handshakes`) and must finish within
  `handshake_timeout`; their flights are retransmitted by the endpoint's sweep
  (`DTLSv1_handle_timeout`, OpenSSL's back-off), not by a timer per peer.
- Sessions are bounded (`max_sessions`) and end after `idle_timeout` without a datagram.
- The device is authenticated by the handshake: the PSK identity (whose key is the device's
  PSK in the registry), or the common name of a client certificate signed by --tls-client-ca.

A session is the CoAP endpoint's peer (`Addr`): exchanges, observers and Block1 transfers of a
DTLS device are keyed by its session, not by its address, as RFC 7252 9.1 asks. OpenSSL has no
DTLS Connection ID (RFC 9146): a device whose address changes must handshake again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from prometheus_client import CollectorRegistry

from gateway.auth import valid_device_id
from gateway.events import EventLog
from gateway.guard import AuthGuard
from gateway.metrics import DtlsMetrics, EventMetrics

log = logging.getLogger("iotgw.coaps")

_binding = Binding()
_lib: Any = _binding.lib
_ffi: Any = _binding.ffi

# RFC 7252 9.1.3.1 (PSK) and 9.1.3.2/3 (certificates) name the CCM_8 suites as mandatory;
# the others are what common clients (libcoap with OpenSSL, GnuTLS, tinydtls) offer.
PSK_CIPHERS = (
    "PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:"
    "PSK-CHACHA20-POLY1305:PSK-AES128-CBC-SHA256"
)
CERT_CIPHERS = (
    "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_DTLS1_2 = 0xFEFD  # DTLS1_2_VERSION (pyOpenSSL names only the TLS versions)
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_RECORD_HEADER = 13
_MAX_PLAINTEXT = 16384
_OUT_BUFFER = 65536
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_monotonic = time.monotonic

Addr = Any
PskLookup = Callable[[str], "bytes | None"]


class DtlsConfigError(ValueError):
    """The certificate, key or CA file cannot be used (a one-line message for the operator)."""


@dataclass(frozen=True, slots=True)
class DtlsLimits:
    max_sessions: int = 10_000
    max_handshakes: int = 1_000  # handshakes past the cookie, not finished yet
    max_handshakes_per_host: int = 32  # ... of them from one host address
    handshake_timeout: float = 10.0  # seconds from the verified cookie to the Finished
    idle_timeout: float = 300.0  # a session with no datagram for this long ends
    mtu: int = 1400  # largest datagram we send (handshake flights are split to fit)
    cookie_secret_lifetime: float = 60.0  # a cookie is good for one to two of these
    idle_check_interval: float = 5.0


class DtlsSession:
    """One peer's DTLS session: the endpoint's `Addr` for everything CoAP keeps per peer."""

    __slots__ = (
        "addr",
        "banned",
        "bio_in",
        "bio_out",
        "conn",
        "deadline",
        "device",
        "established",
        "last_seen",
        "server",
        "ssl",
        "tried",
    )

    def __init__(self, server: DtlsServer, conn: SSL.Connection, addr: Addr, now: float) -> None:
        self.server = server
        self.conn: SSL.Connection | None = conn
        # The OpenSSL objects under pyOpenSSL's Connection (which owns them): the per-record
        # calls go to them directly, without pyOpenSSL's exception per empty read.
        self.ssl: Any = conn._ssl
        self.bio_in: Any = conn._into_ssl
        self.bio_out: Any = conn._from_ssl
        self.addr = addr
        self.device: str | None = None
        self.tried: str | None = None  # the PSK identity the client named
        self.banned = False  # ... and the guard had banned it
        self.established = False
        self.last_seen = now
        self.deadline = now + server.limits.handshake_timeout

    def send(self, data: bytes) -> None:
        """One CoAP message, one DTLS record, one datagram."""
        if self.conn is None or not self.established:
            self.server.metrics.sends_dropped += 1
            return
        if _lib.SSL_write(self.ssl, data, len(data)) <= 0:
            _lib.ERR_clear_error()
            log.debug("coaps send to %s failed", self.addr)
            self.server.close(self, "error")
            return
        self.server.flush(self)

    def __repr__(self) -> str:
        return f"<DtlsSession {self.device} {self.addr}>"


def _cookie_hmac(secret: bytes, addr: Addr) -> bytes:
    return hmac.new(secret, f"{addr[0]}|{addr[1]}".encode(), hashlib.sha256).digest()[:16]


def split_records(data: bytes, mtu: int) -> Iterator[bytes]:
    """What OpenSSL wrote to the memory BIO, as datagrams of whole records, each at most `mtu`
    bytes when a record fits (a memory BIO keeps no datagram boundaries)."""
    if len(data) <= mtu:
        yield data
        return
    start = pos = 0
    n = len(data)
    while pos + _RECORD_HEADER <= n:
        end = pos + _RECORD_HEADER + int.from_bytes(data[pos + 11 : pos + 13], "big")
        if end - start > mtu and pos > start:
            yield data[start:pos]
            start = pos
        pos = end
    if start < n:
        yield data[start:]


# Handshake failures that count as failed credentials (a wrong PSK shows as a timeout).
_AUTH_FAILURES = frozenset({"unknown_identity", "bad_certificate", "timeout", "disabled"})


def _failure_reason(exc: SSL.Error) -> str:
    text = str(exc).lower()
    if "psk identity" in text:
        return "unknown_identity"
    if "certificate" in text:
        return "bad_certificate"
    if "alert" in text:
        return "alert"  # the client gave up (it rejected our certificate, or our key)
    if "no shared cipher" in text or "no suitable" in text:
        return "no_shared_cipher"
    return "error"


class DtlsServer(asyncio.DatagramProtocol):
    """The coaps socket: DTLS sessions by peer address; CoAP messages in and out of them go to
    and come from the CoAP endpoint (`deliver`, `DtlsSession.send`)."""

    def __init__(
        self,
        *,
        deliver: Callable[[bytes, DtlsSession], None],
        on_closed: Callable[[list[DtlsSession]], None],
        psk: PskLookup | None,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_ca: str | None = None,
        device_disabled: Callable[[str], bool] | None = None,
        metrics: DtlsMetrics,
        events: EventLog | None = None,
        guard: AuthGuard | None = None,
        limits: DtlsLimits | None = None,
    ) -> None:
        self.limits = limits or DtlsLimits()
        self.metrics = metrics
        self.events = events or EventLog(EventMetrics(CollectorRegistry()))
        # Failed handshakes count against the device id and the address as failed secrets do
        # on every protocol (gateway/guard.py): a banned one gets no handshake.
        self._throttle = guard.throttle if guard is not None else None
        self._psk = psk
        self._device_disabled = device_disabled or (lambda device: False)
        self.ctx = self._context(certfile, keyfile, client_ca)
        self.transport: asyncio.DatagramTransport | None = None
        self.port: int | None = None
        self.peers: dict[Addr, DtlsSession] = {}
        self.handshaking: dict[Addr, DtlsSession] = {}
        self._hosts: dict[str, int] = {}  # handshakes in progress per host address
        # The CoAP endpoint's: a decrypted CoAP message, and sessions that ended.
        self.deliver = deliver
        self.on_closed = on_closed
        self._secret = secrets.token_bytes(32)
        self._old_secret = self._secret
        now = time.monotonic()
        self._secret_since = now
        self._idle_checked = now
        # The peer whose ClientHello OpenSSL is reading (its callbacks do not say).
        self._hello_addr: Addr = None
        self._handshaking_now: DtlsSession | None = None  # the PSK callback's session
        self._listener = self._new_listener()
        self._inbuf = _ffi.new("char[]", _MAX_PLAINTEXT)
        self._outbuf = _ffi.new("char[]", _OUT_BUFFER)

    # ---- configuration -----------------------------------------------------------------------

    def _context(
        self, certfile: str | None, keyfile: str | None, client_ca: str | None
    ) -> SSL.Context:
        ctx = SSL.Context(SSL.DTLS_SERVER_METHOD)
        ctx.set_min_proto_version(_DTLS1_2)
        # No MTU to ask a memory BIO for; no tickets or renegotiation: nothing to keep per peer
        # beyond the session itself.
        ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # an idle session keeps no record buffers
        suites = []
        if self._psk is not None:
            suites.append(PSK_CIPHERS)
            # pyOpenSSL has no PSK API; cryptography's OpenSSL bindings do, on the SSL_CTX.
            self._psk_callback = _ffi.callback(
                "unsigned int(SSL *, const char *, unsigned char *, unsigned int)",
                self._psk_key,
            )
            _lib.SSL_CTX_set_psk_server_callback(ctx._context, self._psk_callback)
        if certfile:
            try:
                ctx.use_certificate_chain_file(certfile)
                ctx.use_privatekey_file(keyfile or certfile)
                ctx.check_privatekey()
            except SSL.Error as exc:
                raise DtlsConfigError(
                    f"--tls-cert {certfile}: cannot load the certificate and key for DTLS "
                    f"({exc})"
                ) from None
        if certfile and client_ca:
            # A certificate handshake must name the device: the client's certificate is
            # required (there is no other credential inside a DTLS session).
            suites.append(CERT_CIPHERS)
            try:
                ctx.load_verify_locations(client_ca)
            except SSL.Error as exc:
                raise DtlsConfigError(
                    f"--tls-client-ca {client_ca}: cannot load the CA certificates ({exc})"
                ) from None
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        if not suites:
            raise DtlsConfigError("coaps needs --dtls-psk, or --tls-cert with --tls-client-ca")
        # OpenSSL puts the CCM_8 suites (64-bit tags) at security level 0; RFC 7252 makes them
        # mandatory and small stacks (tinydtls) offer nothing else. The suites are listed one
        # by one above, so level 0 adds no other suite.
        ctx.set_cipher_list((":".join(suites) + ":@SECLEVEL=0").encode())
        ctx.set_cookie_generate_callback(self._cookie)
        ctx.set_cookie_verify_callback(self._cookie_ok)
        return ctx

    def _new_listener(self) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        conn.set_accept_state()
        conn.set_ciphertext_mtu(self.limits.mtu)
        return conn

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        loop = asyncio.get_running_loop()
        if sock is not None:
            await loop.create_datagram_endpoint(lambda: self, sock=sock)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            await loop.create_datagram_endpoint(
                lambda: self, local_addr=(host, port), family=family
            )
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError):  # bursts of handshakes: as the plain endpoint does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.port = int(sock.getsockname()[1])
        return self.port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def error_received(self, exc: Exception) -> None:
        log.debug("coaps socket error: %s", exc)

    def stop(self) -> None:
        """Send close_notify to every peer, forget them, close the socket."""
        for session in list(self.peers.values()):
            self.close(session, "shutdown", notify=True)
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # ---- datagrams in ------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        if len(data) <= _RECORD_HEADER:
            self.metrics.dropped += 1
            return
        session = self.peers.get(addr)
        if session is None or (
            session.established
            and data[0] == _HANDSHAKE
            and data[13] == _CLIENT_HELLO
            and data[3:5] == b"\0\0"
        ):
            # No session, or an epoch-0 ClientHello on an established one: a client that
            # restarted on the same port (RFC 6347 4.2.8). The cookie decides.
            self._hello(data, addr)
            return
        session.last_seen = _monotonic()
        _lib.BIO_write(session.bio_in, data, len(data))
        if not session.established:
            self._handshake(session)
            if not session.established:
                return
        deliver = self.deliver
        ssl = session.ssl
        buf = self._inbuf
        # One record in the datagram (the common case): once it is read, there is no other.
        single = len(data) == _RECORD_HEADER + int.from_bytes(data[11:13], "big")
        while True:
            n = _lib.SSL_read(ssl, buf, _MAX_PLAINTEXT)
            if n <= 0:
                error = _lib.SSL_get_error(ssl, n)
                if error == _WANT_READ:
                    break
                _lib.ERR_clear_error()
                if error != _ZERO_RETURN:  # not a close_notify: a fatal alert, or a bug
                    log.debug("coaps %s: SSL_read error %d", session, error)
                self.close(session, "closed" if error == _ZERO_RETURN else "error")
                return
            deliver(_ffi.unpack(buf, n), session)
            if session.conn is None:
                return
            if single:
                return
        self.flush(session)  # e.g. our last flight again, for a client that lost it

    def _hello(self, data: bytes, addr: Addr) -> None:
        m = self.metrics
        if data[0] != _HANDSHAKE or data[_RECORD_HEADER] != _CLIENT_HELLO:
            m.dropped += 1  # no session for it (expired, never made, or not DTLS at all)
            return
        listener = self._listener
        self._hello_addr = addr
        _lib.BIO_write(listener._into_ssl, data, len(data))
        try:
            listener.DTLSv1_listen()
        except SSL.WantReadError:  # no valid cookie: a HelloVerifyRequest, or nothing
            out = self._drain(listener._from_ssl)
            if out:
                m.hello_verify += 1
                self._sendto(out, addr)
            return
        except SSL.Error as exc:
            m.dropped += 1
            log.debug("coaps ClientHello from %s: %s", addr, exc)
            self._listener = self._new_listener()
            return
        finally:
            self._hello_addr = None
        # The peer proved it receives at addr: now it may cost state.
        self._listener = self._new_listener()
        limits = self.limits
        if len(self.handshaking) >= limits.max_handshakes or (
            len(self.peers) - (addr in self.peers) >= limits.max_sessions
        ):
            m.failed("full")
            return
        host = addr[0]
        throttle = self._throttle
        if throttle is not None and throttle.banned((f"addr:{host}",), _monotonic()):
            m.failed("banned")
            return
        if self._hosts.get(host, 0) >= limits.max_handshakes_per_host:
            m.failed("host_busy")  # one address may not take every handshake place
            return
        old = self.peers.get(addr)
        if old is not None:
            self.close(old, "restarted")
        now = time.monotonic()
        session = DtlsSession(self, listener, addr, now)
        self.peers[addr] = session
        self.handshaking[addr] = session
        self._hosts[host] = self._hosts.get(host, 0) + 1
        self._handshake(session)

    def _handshake(self, session: DtlsSession) -> None:
        conn = session.conn
        assert conn is not None
        self._handshaking_now = session
        self._hello_addr = session.addr  # OpenSSL checks the cookie once more
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            self.flush(session)
            return
        except SSL.Error as exc:
            self.flush(session)  # the alert
            log.debug("coaps handshake with %s failed: %s", session.addr, exc)
            self.close(session, _failure_reason(exc))
            return
        finally:
            self._handshaking_now = self._hello_addr = None
        self.flush(session)
        if session.device is None:  # no PSK: the certificate names the device
            cert = conn.get_peer_certificate(as_cryptography=True)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if cert else []
            cn = str(names[0].value) if names else None
            if cn is None or not valid_device_id(cn):
                self.close(session, "bad_certificate", notify=True)
                return
            try:
                disabled = self._device_disabled(cn)
            except Exception:  # the registry cannot be read: no session it cannot vouch for
                self.close(session, "registry_unavailable", notify=True)
                return
            if disabled:
                self.close(session, "disabled", notify=True)
                return
            session.device = cn
        session.established = True
        self._handshake_over(session)
        self.metrics.handshakes_ok += 1
        if self._throttle is not None:
            self._throttle.succeeded(
                (f"id:{session.device}", f"addr:{session.addr[0]}"), _monotonic()
            )
        peer = f"{session.addr[0]}:{session.addr[1]}"
        self.events.connected("coaps", session.device, peer, cipher=conn.get_cipher_name())

    # ---- callbacks from OpenSSL --------------------------------------------------------------

    def _cookie(self, conn: SSL.Connection) -> bytes:
        return _cookie_hmac(self._secret, self._hello_addr)

    def _cookie_ok(self, conn: SSL.Connection, cookie: bytes) -> bool:
        addr = self._hello_addr
        ok = hmac.compare_digest(cookie, _cookie_hmac(self._secret, addr)) or (
            hmac.compare_digest(cookie, _cookie_hmac(self._old_secret, addr))
        )
        if not ok:
            self.metrics.cookies_rejected += 1
        return ok

    def _psk_key(self, ssl: Any, identity: Any, out: Any, max_len: int) -> int:
        """OpenSSL asks for the key of a PSK identity: the device's PSK from the registry; 0
        (no key) fails the handshake with unknown_psk_identity."""
        session = self._handshaking_now
        try:
            if session is None or identity == _ffi.NULL or self._psk is None:
                return 0
            name = _ffi.string(identity).decode()
            session.tried = name[:128]
            if not valid_device_id(name):
                return 0
            throttle = self._throttle
            if throttle is not None and throttle.banned((f"id:{name}",), _monotonic()):
                session.banned = True
                return 0
            key = self._psk(name)
            if key is None or not 0 < len(key) <= max_len:
                return 0
            _ffi.memmove(out, key, len(key))
            session.device = name
            return len(key)
        except Exception:  # a registry that cannot be read, bad UTF-8: no key
            log.debug("coaps PSK lookup failed", exc_info=True)
            return 0

    # ---- datagrams out -----------------------------------------------------------------------

    def flush(self, session: DtlsSession) -> None:
        """Send what OpenSSL wrote for this session. (Once per response: the common case, one
        record that fits a datagram, takes no further call.)"""
        if session.conn is None:
            return
        buf = self._outbuf
        n = _lib.BIO_read(session.bio_out, buf, _OUT_BUFFER)
        if n <= 0:
            return
        transport = self.transport
        if n <= self.limits.mtu and transport is not None:
            transport.sendto(_ffi.unpack(buf, n), session.addr)
        else:
            self._sendto(self._drain(session.bio_out, _ffi.unpack(buf, n), n), session.addr)

    def _drain(self, bio: Any, out: bytes = b"", n: int = _OUT_BUFFER) -> bytes:
        """Everything OpenSSL wrote to a memory BIO (b"" when nothing), after `out` (`n` bytes,
        read already)."""
        buf = self._outbuf
        while n == _OUT_BUFFER and (n := _lib.BIO_read(bio, buf, _OUT_BUFFER)) > 0:
            out += _ffi.unpack(buf, n)  # a memory BIO gives all it has, up to the size
        return out

    def _sendto(self, data: bytes, addr: Addr) -> None:
        transport = self.transport
        if transport is None:
            return
        if len(data) <= self.limits.mtu:
            transport.sendto(data, addr)
            return
        for datagram in split_records(data, self.limits.mtu):
            transport.sendto(datagram, addr)

    # ---- ending sessions ---------------------------------------------------------------------

    def close(
        self, session: DtlsSession, reason: str, notify: bool = False, report: bool = True
    ) -> None:
        """End a session: why a handshake failed (counted, logged as refused), or why an
        established session ends (logged); `notify` sends close_notify first; `report` tells
        the endpoint (else the caller does, for many sessions at once)."""
        conn = session.conn
        if conn is None:
            return
        if notify:
            with contextlib.suppress(SSL.Error):
                conn.shutdown()
            self.flush(session)
        session.conn = session.ssl = session.bio_in = session.bio_out = None
        addr = session.addr
        if self.peers.get(addr) is session:
            del self.peers[addr]
        if self.handshaking.get(addr) is session:
            self._handshake_over(session)
        peer = f"{addr[0]}:{addr[1]}"
        if not session.established:
            if session.banned:
                reason = "banned"
            self.metrics.failed(reason)
            who = session.device or session.tried or ""
            self.events.refused("coaps", who, peer, reason)
            if reason in _AUTH_FAILURES and self._throttle is not None:
                keys = (f"id:{who}", f"addr:{addr[0]}") if who else (f"addr:{addr[0]}",)
                for key, seconds in self._throttle.failed(keys, _monotonic()):
                    self.events.banned("coaps", key, seconds)
        else:
            self.events.disconnected("coaps", session.device or "", peer, reason)
            if report:
                self.on_closed([session])

    def _handshake_over(self, session: DtlsSession) -> None:
        addr = session.addr
        del self.handshaking[addr]
        left = self._hosts[addr[0]] - 1
        if left:
            self._hosts[addr[0]] = left
        else:
            del self._hosts[addr[0]]

    def close_device(self, device: str) -> int:
        """End every session of a device (removed or disabled); returns how many."""
        found = [s for s in self.peers.values() if s.device == device and s.established]
        for session in found:
            self.close(session, "revoked", notify=True)
        return len(found)

    def sweep(self, now: float) -> None:
        """Called by the CoAP endpoint's sweep: handshake retransmissions and timeouts, idle
        sessions, the cookie secret."""
        for session in list(self.handshaking.values()):
            conn = session.conn
            assert conn is not None
            if now >= session.deadline:
                self.close(session, "timeout")
                continue
            try:
                if conn.DTLSv1_handle_timeout():
                    self.flush(session)
            except SSL.Error:
                self.close(session, "error")
        if now - self._secret_since >= self.limits.cookie_secret_lifetime:
            self._old_secret, self._secret = self._secret, secrets.token_bytes(32)
            self._secret_since = now
        if now - self._idle_checked >= self.limits.idle_check_interval:
            self._idle_checked = now
            limit = now - self.limits.idle_timeout
            idle = [s for s in self.peers.values() if s.established and s.last_seen < limit]
            for session in idle:
                self.metrics.expired += 1
                self.close(session, "idle", notify=True, report=False)
            if idle:
                self.on_closed(idle)
        m = self.metrics
        m.sessions = len(self.peers) - len(self.handshaking)
        m.handshaking = len(self.handshaking)

