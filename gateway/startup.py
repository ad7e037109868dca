"""What `iotgw run` checks and takes before it serves: the data dir (usable, and locked so that
one gateway owns it), the TLS files, and the listening sockets.

Sockets are bound here, outside the event loop, so that a port in use is known before anything
starts. A lone gateway binds without SO_REUSEPORT, so that any other holder of a port (another
gateway, Mosquitto) makes it fail with "address in use". Under `--workers N` the supervisor
proves each port free with a plain bind, then binds N SO_REUSEPORT sockets itself and hands one
to each worker: the kernel spreads devices over the workers, and no process outside the run
can join the group (a worker started again gets the same socket back).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import Config

LOCK_FILE = "iotgw.lock"
BACKLOG = 4096


class StartupError(Exception):
    """The gateway cannot start; the message says what is wrong and what to do (one line)."""


# ---- the data dir ------------------------------------------------------------------------


class DataDirLock:
    """An exclusive `flock` on DIR/iotgw.lock, which holds the owner's pid. The kernel drops it
    when the process dies, so a crash leaves nothing to clean up."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        usable_dir(self.directory)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"data dir {self.directory} is not writable ({exc.strerror}): "
                               "fix its permissions or choose another --data-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"data dir {self.directory} is in use by another gateway (pid {holder}): "
                "stop it, or give this one another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def usable_dir(directory: Path) -> None:
    """The directory exists (made if missing), is a directory, and files can be made in it."""
    if directory.exists() and not directory.is_dir():
        raise StartupError(f"data dir {directory} is not a directory: "
                           "give --data-dir a directory (it is made if missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".iotgw-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data dir {directory} is not writable ({exc.strerror}): "
                           "fix its permissions or choose another --data-dir") from None


# ---- files -------------------------------------------------------------------------------


def readable_file(flag: str, path: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise StartupError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


def tls_context(config: Config) -> ssl.SSLContext:
    """The server's TLS context. With --tls-client-ca, client certificates are verified when a
    device presents one (its common name is then the device id) and optional otherwise, so that
    devices with passwords can use TLS too."""
    assert config.tls_cert is not None
    readable_file("--tls-cert", config.tls_cert)
    if config.tls_key:
        readable_file("--tls-key", config.tls_key)
    if config.tls_client_ca:
        readable_file("--tls-client-ca", config.tls_client_ca)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    def encrypted() -> str:  # else OpenSSL prompts on the terminal (each worker again)
        raise StartupError(f"--tls-key {config.tls_key or config.tls_cert}: the private key is "
                           "encrypted: give it unencrypted (readable by the gateway only)")

    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key, password=encrypted)
    except ssl.SSLError as exc:
        flags = "--tls-cert" + (" and --tls-key" if config.tls_key else "")
        raise StartupError(
            f"{flags}: cannot load the certificate and key ({exc.reason or exc}): give a PEM "
            "certificate and the private key that belongs to it"
        ) from None
    if config.tls_client_ca:
        try:
            ctx.load_verify_locations(config.tls_client_ca)
        except ssl.SSLError as exc:
            raise StartupError(f"--tls-client-ca {config.tls_client_ca}: cannot load the CA "
                               f"certificates ({exc.reason or exc}): give PEM certificates"
                               ) from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def check_files(config: Config) -> None:
    """Files named by the settings exist and load; before any port is taken."""
    if config.tls_cert:
        tls_context(config)
    if config.acl_file:
        readable_file("--acl-file", config.acl_file)


# ---- listeners ---------------------------------------------------------------------------


@dataclass
class Listeners:
    """One process's bound sockets (picklable: multiprocessing hands the descriptors on)."""

    mqtt: list[socket.socket] = field(default_factory=list)
    mqtts: list[socket.socket] = field(default_factory=list)
    ws: list[socket.socket] = field(default_factory=list)
    wss: list[socket.socket] = field(default_factory=list)
    http: list[socket.socket] = field(default_factory=list)
    coap: socket.socket | None = None
    coaps: socket.socket | None = None

    def close(self) -> None:
        for sock in [*self.mqtt, *self.mqtts, *self.ws, *self.wss, *self.http, self.coap,
                     self.coaps]:
            if sock is not None:
                sock.close()


def _addresses(host: str, port: int, kind: int) -> list[tuple[int, tuple[str, int]]]:
    try:
        infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"--bind {host}: not an address of this host ({exc.strerror})"
                           ) from None
    seen: list[tuple[int, tuple[str, int]]] = []
    for family, _, _, _, address in infos:
        item = (family, (str(address[0]), int(address[1])))
        if family in (socket.AF_INET, socket.AF_INET6) and item not in seen:
            seen.append(item)
    return seen


def _bind(what: str, flag: str, family: int, address: tuple[str, int], kind: int,
          reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            # TIME_WAIT leftovers of a previous run only; on Linux two listeners still clash.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        host, port = address
        shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"{what} address {shown} is in use (another gateway, or a server such as "
                f"mosquitto, holds it): stop that, or choose another {flag}"
            ) from None
        raise StartupError(f"{what} address {shown}: cannot listen ({exc.strerror}): "
                           f"check --bind and {flag}") from None
    return sock


def _group(what: str, flag: str, host: str, port: int, kind: int,
           copies: int | None) -> list[list[socket.socket]]:
    """The sockets of one listener: for each address of `host`, one plain socket
    (copies=None), or `copies` SO_REUSEPORT sockets on a port first proven free.
    Returned as one list per copy."""
    out: list[list[socket.socket]] = [[] for _ in range(copies or 1)]
    picked = port
    try:
        for family, (ip, _) in _addresses(host, port, kind):
            address = (ip, picked)  # port 0: every address gets the one the first was given
            if copies is None:
                sock = _bind(what, flag, family, address, kind, reuse_port=False)
                out[0].append(sock)
                picked = sock.getsockname()[1]
                continue
            # A plain bind fails if anyone holds the port, SO_REUSEPORT or not; then the
            # group is made at once by this process alone.
            _bind(what, flag, family, address, kind, reuse_port=False).close()
            for i in range(copies):
                out[i].append(_bind(what, flag, family, address, kind, reuse_port=True))
    except BaseException:
        for socks in out:
            for sock in socks:
                sock.close()
        raise
    return out


def bind_listeners(config: Config, workers: int | None = None) -> list[Listeners]:
    """Bind every listener of the config: one Listeners for a lone gateway (workers=None),
    else one per worker (MQTT, MQTTS, WS, WSS and CoAP shared with SO_REUSEPORT, HTTP on
    --http-port + i). Raises StartupError, having closed what it bound."""
    count = workers or 1
    shared = workers  # None: plain sockets
    result = [Listeners() for _ in range(count)]
    try:
        host = config.bind
        for i, socks in enumerate(_group("MQTT", "--mqtt-port", host, config.mqtt_port,
                                         socket.SOCK_STREAM, shared)):
            result[i].mqtt = socks
        if config.tls_cert:
            for i, socks in enumerate(_group("MQTT over TLS", "--mqtts-port", host,
                                             config.mqtts_port, socket.SOCK_STREAM, shared)):
                result[i].mqtts = socks
        if config.ws_port:
            for i, socks in enumerate(_group("MQTT over WebSocket", "--ws-port", host,
                                             config.ws_port, socket.SOCK_STREAM, shared)):
                result[i].ws = socks
        if config.wss_port:
            for i, socks in enumerate(_group("MQTT over secure WebSocket", "--wss-port", host,
                                             config.wss_port, socket.SOCK_STREAM, shared)):
                result[i].wss = socks
        for i in range(count):
            port = config.http_port + i if config.http_port else 0
            (result[i].http,) = _group("HTTP", "--http-port", host, port,
                                       socket.SOCK_STREAM, None)
        # CoAP binds one address (the endpoint is one datagram socket), as before; coaps too.
        # With SO_REUSEPORT the kernel sends a peer's datagrams to one worker (a hash of the
        # addresses), so each DTLS session lives in one process.
        udp = [("CoAP", "--coap-port", config.coap_port, "coap")] if config.coap_port else []
        if config.coaps:
            udp.append(("CoAP over DTLS", "--coaps-port", config.coaps_port, "coaps"))
        for what, flag, udp_port, attr in udp:
            family, address = _addresses(host, udp_port, socket.SOCK_DGRAM)[0]
            for i in range(count):
                if shared is None:
                    sock = _bind(what, flag, family, address, socket.SOCK_DGRAM,
                                 reuse_port=False)
                else:
                    if i == 0:
                        _bind(what, flag, family, address, socket.SOCK_DGRAM,
                              reuse_port=False).close()
                    sock = _bind(what, flag, family, address, socket.SOCK_DGRAM,
                                 reuse_port=True)
                setattr(result[i], attr, sock)
    except BaseException:
        for listeners in result:
            with contextlib.suppress(OSError):
                listeners.close()
        raise
    return result
