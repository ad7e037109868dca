"""CoAP over DTLS (coaps): interop with libcoap's clients (OpenSSL and GnuTLS builds), PSK and
certificates, refusals, the stateless cookie, replays, bounds and expiry."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import _require
from dtls_client import DtlsClient
from OpenSSL import SSL

from gateway._native import coap
from gateway.coap.dtls import DtlsLimits

CLIENTS = ("coap-client-openssl", "coap-client-gnutls")


def _coap_client(binary: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """libcoap's client; it exits 0 even when the handshake fails, so callers read its output."""
    return subprocess.run(
        [_require(binary), "-B", "5", *args], capture_output=True, text=True, timeout=timeout
    )


def _metric(gw: Any, attr: str) -> Any:
    return gw.call(lambda: getattr(gw.gateway.coap.dtls.metrics, attr))


def _psk_gateway(gateway_factory: Any, **settings: Any) -> Any:
    gw = gateway_factory(dtls_psk=True, coaps_port=0, **settings)
    gw.gateway.registry.add("d1", "password-1", psk="secret-1")
    gw.gateway.registry.add("d2", "password-2", psk="secret-2")
    gw.gateway.registry.add("nopsk", "password-3")
    return gw


@pytest.mark.parametrize("client", CLIENTS)
def test_psk_get_put_post_blockwise(gateway_factory: Any, client: str) -> None:
    gw = _psk_gateway(gateway_factory)
    url = f"coaps://127.0.0.1:{gw.coaps_port}"
    psk = ("-u", "d1", "-k", "secret-1")
    big = json.dumps({"state": {"reported": {"blob": "x" * 300}}})
    # PUT block-wise (Block1, 64-byte blocks), then GET block-wise (Block2).
    put = _coap_client(client, *psk, "-m", "put", "-b", "64", "-e", big, f"{url}/shadow/d1")
    assert "4." not in put.stdout and "5." not in put.stdout, put.stdout + put.stderr
    got = _coap_client(client, *psk, "-b", "64", f"{url}/shadow/d1")
    doc = json.loads(got.stdout)
    assert doc["state"]["reported"]["blob"] == "x" * 300
    assert doc["version"] == 1
    post = _coap_client(client, *psk, "-m", "post", "-e", "21.5", f"{url}/telemetry/d1")
    assert post.stdout.strip() == "", post.stdout + post.stderr  # 2.04, no payload
    requests = gw.call(lambda: dict(gw.gateway.coap.metrics.requests))
    assert requests.get((coap.POST, coap.CHANGED)) == 1
    assert _metric(gw, "handshakes_ok") == 3
    # No token in the URL: the session is the credential, and it is d1's only.
    other = _coap_client(client, *psk, f"{url}/shadow/d2")
    assert "4.03" in other.stdout + other.stderr


def test_psk_observe_sees_a_change(gateway_factory: Any) -> None:
    gw = _psk_gateway(gateway_factory)
    url = f"coaps://127.0.0.1:{gw.coaps_port}/shadow/d1"
    psk = ("-u", "d1", "-k", "secret-1")
    _coap_client("coap-client-openssl", *psk, "-m", "put", "-e",
                 '{"state":{"reported":{"n":1}}}', url)
    observer = subprocess.Popen(
        [_require("coap-client-gnutls"), "-u", "d1", "-k", "secret-1", "-s", "4", "-w", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 5
    while not gw.call(lambda: len(gw.gateway.coap.observers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    _coap_client("coap-client-openssl", *psk, "-m", "put", "-e",
                 '{"state":{"reported":{"n":2}}}', url)
    out, err = observer.communicate(timeout=15)
    versions = [json.loads(line)["state"]["reported"]["n"] for line in out.splitlines() if line]
    assert versions == [1, 2], out + err


def test_psk_refusals_are_counted(gateway_factory: Any) -> None:
    gw = _psk_gateway(gateway_factory)
    gw.gateway.coap.dtls.limits = DtlsLimits(handshake_timeout=1.0)
    url = f"coaps://127.0.0.1:{gw.coaps_port}/shadow/d1"
    unknown = _coap_client("coap-client-openssl", "-u", "d9", "-k", "secret-1", url)
    assert "unknown PSK identity" in unknown.stdout + unknown.stderr
    nopsk = _coap_client("coap-client-openssl", "-u", "nopsk", "-k", "x", url)
    assert "unknown PSK identity" in nopsk.stdout + nopsk.stderr
    assert _metric(gw, "failures") == {"unknown_identity": 2}
    # A wrong key: the client's Finished does not decrypt; DTLS drops it silently (RFC 6347
    # 4.1.2.7), and the handshake times out.
    wrong = DtlsClient(gw.coaps_port, "d1", b"not-the-key")
    with pytest.raises(TimeoutError):
        wrong.handshake(timeout=2.5)
    wrong.close()
    assert _metric(gw, "failures") == {"unknown_identity": 2, "timeout": 1}
    assert _metric(gw, "handshakes_ok") == 0
    assert gw.call(lambda: len(gw.gateway.coap.dtls.peers)) == 0


def test_repeated_failures_ban_the_address(gateway_factory: Any) -> None:
    """Five refused handshakes from one address within a minute ban it (gateway/guard.py, as
    for wrong passwords): its next handshake is refused after the cookie, even a good one."""
    gw = _psk_gateway(gateway_factory)
    for i in range(5):
        guesser = DtlsClient(gw.coaps_port, f"guess-{i}", b"secret-1")
        with pytest.raises(SSL.Error):  # unknown_psk_identity alert
            guesser.handshake(timeout=2.0)
        guesser.close()
    good = DtlsClient(gw.coaps_port, "d1", b"secret-1")
    with pytest.raises(TimeoutError):
        good.handshake(timeout=1.0)
    good.close()
    failures = _metric(gw, "failures")
    assert failures["unknown_identity"] == 5 and failures["banned"] >= 1
    assert _metric(gw, "handshakes_ok") == 0


def _get(mid: int, path: list[str]) -> bytes:
    return bytes(coap.encode(coap.CON, coap.GET, mid, b"\x01", [(coap.URI_PATH, p) for p in path]))


def test_cookie_exchange_keeps_no_state_and_replays_are_dropped(gateway_factory: Any) -> None:
    gw = _psk_gateway(gateway_factory)
    port = gw.coaps_port
    # ClientHellos without a cookie from 200 ports: each gets a HelloVerifyRequest, and the
    # gateway keeps nothing for any of them.
    hello = DtlsClient(port, "d1", b"secret-1").client_hello()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
    for s in socks:
        s.sendto(hello, ("127.0.0.1", port))
    answered = 0
    for s in socks:
        s.settimeout(2)
        reply = s.recv(2048)
        assert reply[0] == 22 and reply[13] == 3  # handshake: HelloVerifyRequest
        answered += 1
        s.close()
    assert answered == 200
    assert gw.call(lambda: len(gw.gateway.coap.dtls.peers)) == 0
    assert _metric(gw, "hello_verify") >= 200
    # A cookie made for another address is rejected.
    client = DtlsClient(port, "d1", b"secret-1")
    client.handshake()
    assert _metric(gw, "handshakes_ok") == 1
    # A request, then the same datagram again (a replay): DTLS drops it (its record sequence
    # number was seen), so CoAP does not even answer it as a duplicate.
    datagram = client.send(_get(0x1234, ["shadow", "d1"]))
    response = client.receive()
    assert response is not None and response[1] == coap.NOT_FOUND  # no shadow yet
    client.sock.send(datagram)
    assert client.receive(timeout=0.5) is None
    requests = gw.call(lambda: dict(gw.gateway.coap.metrics.requests))
    assert sum(requests.values()) == 1
    assert gw.gateway.coap.metrics.duplicates_con == 0
    client.close()


def test_lost_final_flight_is_sent_again(gateway_factory: Any) -> None:
    """The server's ChangeCipherSpec + Finished is lost: the client sends its last flight
    again (an epoch-0 handshake record to an established session), and gets it again."""
    gw = _psk_gateway(gateway_factory)
    client = DtlsClient(gw.coaps_port, "d1", b"secret-1")
    client.handshake(timeout=5.0, drop=2)  # 0: HelloVerifyRequest, 1: ServerHello..Done
    client.send(_get(7, ["shadow", "d1"]))
    response = client.receive()
    assert response is not None and response[1] == coap.NOT_FOUND
    assert _metric(gw, "handshakes_ok") == 1
    client.close()


def _half_handshake(port: int) -> DtlsClient:
    """A client past the cookie that stops there (it sent the ClientHello with the cookie)."""
    client = DtlsClient(port, "d1", b"secret-1")
    client.sock.send(client.client_hello())
    client.sock.settimeout(2)
    client.conn.bio_write(client.sock.recv(2048))  # HelloVerifyRequest
    with pytest.raises(SSL.WantReadError):
        client.conn.do_handshake()
    client._flush()  # the ClientHello with the cookie
    return client


def test_server_flight_is_retransmitted_by_the_sweep(gateway_factory: Any) -> None:
    """The client's answer to ServerHello..ServerHelloDone is lost: the gateway's sweep sends
    that flight again (OpenSSL's timer, 1 s), then gives the handshake up at its deadline."""
    gw = _psk_gateway(gateway_factory)
    gw.gateway.coap.dtls.limits = DtlsLimits(handshake_timeout=2.0)
    client = _half_handshake(gw.coaps_port)
    first = client.sock.recv(65536)
    again = client.sock.recv(65536)  # not answered: sent again
    for flight in (first, again):
        assert flight[0] == 22 and flight[13] == 2  # handshake: ServerHello
    assert again[5:11] != first[5:11]  # a new record sequence number: not a copy in the net
    time.sleep(2.0)
    assert _metric(gw, "failures") == {"timeout": 1}
    assert gw.call(lambda: len(gw.gateway.coap.dtls.handshaking)) == 0
    client.close()


def test_half_finished_handshakes_per_host_are_bounded(gateway_factory: Any) -> None:
    gw = _psk_gateway(gateway_factory)
    dtls = gw.gateway.coap.dtls
    dtls.limits = DtlsLimits(max_handshakes_per_host=2)
    stalled = [_half_handshake(gw.coaps_port) for _ in range(3)]
    time.sleep(0.2)
    assert gw.call(lambda: len(dtls.handshaking)) == 2
    assert _metric(gw, "failures") == {"host_busy": 1}
    for c in stalled:
        c.close()


def test_sessions_and_handshakes_are_bounded_and_expire(gateway_factory: Any) -> None:
    gw = _psk_gateway(gateway_factory)
    dtls = gw.gateway.coap.dtls
    dtls.limits = DtlsLimits(max_sessions=2, idle_timeout=0.5, idle_check_interval=0.1)
    clients = [DtlsClient(gw.coaps_port, "d1", b"secret-1") for _ in range(3)]
    clients[0].handshake()
    clients[1].handshake()
    with pytest.raises(TimeoutError):  # the third is refused after its cookie: no room
        clients[2].handshake(timeout=1.0)
    assert _metric(gw, "failures").get("full", 0) >= 1
    time.sleep(1.0)  # idle: both sessions end (close_notify) and free their places
    assert gw.call(lambda: [s for s in dtls.peers.values() if s.established]) == []
    assert _metric(gw, "expired") == 2
    with pytest.raises(SSL.ZeroReturnError):
        clients[0].receive(timeout=0.5)
    late = DtlsClient(gw.coaps_port, "d1", b"secret-1")
    late.handshake()
    for c in (*clients, late):
        c.close()


@pytest.mark.parametrize("change", ["remove", "rekey"])
def test_removed_or_rekeyed_device_loses_its_session(gateway_factory: Any, change: str) -> None:
    gw = _psk_gateway(gateway_factory)
    client = DtlsClient(gw.coaps_port, "d2", b"secret-2")
    client.handshake()
    other = DtlsClient(gw.coaps_port, "d1", b"secret-1")
    other.handshake()
    if change == "remove":
        gw.gateway.registry.remove("d2")
    else:
        gw.gateway.registry.set_psk("d2", "secret-3")
    gw.call(gw.gateway.registry_changed)
    assert gw.call(lambda: [s.device for s in gw.gateway.coap.dtls.peers.values()]) == ["d1"]
    with pytest.raises(SSL.ZeroReturnError):  # close_notify
        client.receive(timeout=0.5)
    client.close()
    if change == "rekey":
        old_key = DtlsClient(gw.coaps_port, "d2", b"secret-2")
        with pytest.raises(TimeoutError):
            old_key.handshake(timeout=1.0)
        old_key.close()
        new_key = DtlsClient(gw.coaps_port, "d2", b"secret-3")
        new_key.handshake()
        new_key.close()
    other.close()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """EC P-256: a CA, the gateway's certificate, d1's (CA-signed), and d1's from another CA."""
    d = tmp_path_factory.mktemp("dtls-pki")
    p: dict[str, str] = {}
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        p[f"{ca}.key"], p[f"{ca}.pem"] = str(d / f"{ca}.key"), str(d / f"{ca}.pem")
        _openssl("req", "-x509", *ec, "-keyout", p[f"{ca}.key"], "-out", p[f"{ca}.pem"],
                 "-days", "2", "-subj", f"/CN=iotgw {ca}")
    for name, cn, ca in (("srv", "127.0.0.1", "ca"), ("d1", "d1", "ca"),
                         ("rogue", "d1", "other-ca")):
        key, csr, pem = (str(d / f"{name}.{x}") for x in ("key", "csr", "pem"))
        _openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        _openssl("x509", "-req", "-in", csr, "-CA", p[f"{ca}.pem"], "-CAkey", p[f"{ca}.key"],
                 "-CAcreateserial", "-out", pem, "-days", "2")
        p[f"{name}.key"], p[f"{name}.pem"] = key, pem
    return p


@pytest.mark.parametrize("client", CLIENTS)
def test_certificates(gateway_factory: Any, pki: dict[str, str], client: str) -> None:
    gw = gateway_factory(tls_cert=pki["srv.pem"], tls_key=pki["srv.key"],
                         tls_client_ca=pki["ca.pem"], mqtts_port=0, coaps_port=0)
    url = f"coaps://127.0.0.1:{gw.coaps_port}"
    cert = ("-c", pki["d1.pem"], "-j", pki["d1.key"], "-C", pki["ca.pem"])
    put = _coap_client(client, *cert, "-m", "put", "-e", '{"state":{"reported":{"c":1}}}',
                       f"{url}/shadow/d1")
    assert put.stdout.strip() == "", put.stdout + put.stderr
    got = _coap_client(client, *cert, "-b", "32", f"{url}/shadow/d1")  # block-wise
    assert json.loads(got.stdout)["state"]["reported"] == {"c": 1}
    post = _coap_client(client, *cert, "-m", "post", "-e", "1", f"{url}/telemetry/d1")
    assert post.stdout.strip() == "", post.stdout + post.stderr
    assert gw.call(lambda: gw.gateway.coap.metrics.requests.get((coap.POST, coap.CHANGED))) == 1
    assert _metric(gw, "handshakes_ok") == 3
    # A certificate for d1 signed by another CA: refused in the handshake.
    rogue = ("-c", pki["rogue.pem"], "-j", pki["rogue.key"], "-C", pki["ca.pem"])
    refused = _coap_client(client, *rogue, f"{url}/shadow/d1")
    assert "reported" not in refused.stdout, refused.stdout
    assert _metric(gw, "failures").get("bad_certificate") == 1
    # No PSKs configured (no --dtls-psk): a PSK client finds no common suite.
    psk = _coap_client(client, "-u", "d1", "-k", "secret-1", f"{url}/shadow/d1")
    assert "reported" not in psk.stdout
    assert _metric(gw, "handshakes_ok") == 3


def test_devices_add_psk_cli(tmp_path: Path) -> None:
    from gateway import cli
    from gateway.auth import DeviceRegistry

    data = str(tmp_path / "data")
    assert cli.main(["devices", "--data-dir", data, "add", "d1", "--psk", "key-1"]) == 0
    assert DeviceRegistry(data).psk("d1") == b"key-1"
    assert cli.main(["devices", "--data-dir", data, "add", "d2", "--psk"]) == 0
    generated = DeviceRegistry(data).psk("d2")
    assert generated is not None and len(generated) >= 24
    assert cli.main(["devices", "--data-dir", data, "add", "d3", "--psk", "has space"]) == 2
    assert cli.main(["devices", "--data-dir", data, "psk", "d1", "key-2"]) == 0
    assert DeviceRegistry(data).psk("d1") == b"key-2"
    assert cli.main(["devices", "--data-dir", data, "psk", "d1", "--none"]) == 0
    assert DeviceRegistry(data).psk("d1") is None
    assert cli.main(["devices", "--data-dir", data, "psk", "nobody", "k"]) == 2
    DeviceRegistry(data).disable("d1")
    assert DeviceRegistry(data).psk("d1") is None  # a disabled device has no key to offer


def test_fetch_and_idempotent_ipatch(gateway_factory: Any) -> None:
    gw = _psk_gateway(gateway_factory)
    url = f"coaps://127.0.0.1:{gw.coaps_port}/shadow/d1"
    psk = ("-u", "d1", "-k", "secret-1")
    put = _coap_client("coap-client-openssl", *psk, "-m", "put", "-e",
                       '{"state":{"reported":{"t":20,"h":50},"desired":{"t":21}}}', url)
    assert "4." not in put.stdout, put.stdout
    fetch = _coap_client("coap-client-openssl", *psk, "-m", "fetch", "-t", "json", "-e",
                         '["state.reported.t", "state.desired", "version", "no.such"]', url)
    assert json.loads(fetch.stdout) == {
        "state": {"reported": {"t": 20}, "desired": {"t": 21}}, "version": 1
    }
    bad = _coap_client("coap-client-openssl", *psk, "-m", "fetch", "-e", '{"a": 1}', url)
    assert "4.00" in bad.stdout + bad.stderr
    # iPATCH twice with the same token and body (a client's retransmission, new message id):
    # applied once; a different body is applied.
    patch = ("-m", "ipatch", "-T", "cafe", "-e", '{"state":{"reported":{"h":55}}}')
    for _ in range(2):
        out = _coap_client("coap-client-gnutls", *psk, *patch, url)
        assert "4." not in out.stdout and "5." not in out.stdout, out.stdout
    assert gw.call(lambda: gw.gateway.coap.metrics.ipatch_repeats) == 1
    version = _coap_client("coap-client-openssl", *psk, "-m", "fetch", "-e", '["version"]', url)
    assert json.loads(version.stdout) == {"version": 2}
    _coap_client("coap-client-gnutls", *psk, "-m", "ipatch", "-T", "cafe", "-e",
                 '{"state":{"reported":{"h":56}}}', url)
    got = _coap_client("coap-client-openssl", *psk, url)
    doc = json.loads(got.stdout)
    assert doc["version"] == 3 and doc["state"]["reported"] == {"t": 20, "h": 56}


def test_coaps_only_and_metrics(gateway_factory: Any) -> None:
    from prometheus_client import generate_latest

    gw = _psk_gateway(gateway_factory, coap_port=0)
    assert gw.coap_port is None  # no plain CoAP socket
    client = DtlsClient(gw.coaps_port, "d1", b"secret-1")
    client.handshake()
    client.send(_get(9, ["shadow", "d1"]))
    assert client.receive() is not None
    time.sleep(0.4)  # a sweep refreshes the gauges
    text = generate_latest(gw.gateway.metrics.registry).decode()
    assert 'iotgw_coaps_handshakes_total{reason="",result="ok"} 1.0' in text
    assert "iotgw_coaps_sessions 1.0" in text
    assert "iotgw_coaps_hello_verify_total 1.0" in text
    client.close()


def test_registry_of_schema_1_gets_the_psk_column(tmp_path: Path) -> None:
    import sqlite3

    from gateway.auth import DeviceRegistry

    DeviceRegistry(tmp_path).add("old", "password")
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    db.execute("CREATE TABLE d AS SELECT id, salt, hash, iterations, created, disabled "
               "FROM devices")
    db.execute("DROP TABLE devices")
    db.execute("ALTER TABLE d RENAME TO devices")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    registry = DeviceRegistry(tmp_path)
    assert registry.psk("old") is None
    assert registry.verify("old", b"password")
    registry.add("new", "password", psk="k")
    assert registry.psk("new") == b"k"


def test_aiocoap_dtls_client_with_psk(gateway_factory: Any) -> None:
    """aiocoap's DTLS transport (tinydtls through DTLSSocket: PSK, TLS_PSK_WITH_AES_128_CCM_8)."""
    import asyncio

    from aiocoap import GET, POST, PUT, Context, Message

    gw = _psk_gateway(gateway_factory)
    base = f"coaps://127.0.0.1:{gw.coaps_port}"

    async def run() -> list[Any]:
        ctx = await Context.create_client_context()
        ctx.client_credentials.load_from_dict({f"{base}/*": {"dtls": {
            "psk": {"ascii": "secret-1"}, "client-identity": {"ascii": "d1"}}}})
        try:
            out = []
            for code, path, body in ((PUT, "shadow/d1", b'{"state":{"reported":{"a":1}}}'),
                                     (GET, "shadow/d1", b""), (POST, "telemetry/d1", b"1")):
                request = Message(code=code, uri=f"{base}/{path}", payload=body)
                out.append(await asyncio.wait_for(ctx.request(request).response, 15))
            return out
        finally:
            await ctx.shutdown()

    put, get, post = asyncio.run(run())
    assert str(put.code) == "2.04 Changed" and str(post.code) == "2.04 Changed"
    assert json.loads(get.payload)["state"]["reported"] == {"a": 1}
    assert _metric(gw, "handshakes_ok") == 1  # one session for the three requests


def test_split_records_packs_whole_records_up_to_the_mtu() -> None:
    from gateway.coap.dtls import split_records

    def record(n: int, fill: bytes) -> bytes:
        return bytes([22, 0xFE, 0xFD]) + bytes(8) + n.to_bytes(2, "big") + fill * n

    a, b, c = record(100, b"a"), record(150, b"b"), record(40, b"c")
    assert list(split_records(a + b + c, 1400)) == [a + b + c]
    assert list(split_records(a + b + c, 300)) == [a + b, c]
    assert list(split_records(a + b + c, 220)) == [a, b + c]
    assert list(split_records(a + b + c, 100)) == [a, b, c]  # a record over the MTU goes alone


def test_certificate_flight_over_a_small_mtu(gateway_factory: Any, pki: dict[str, str]) -> None:
    """With a 300-byte MTU the certificate flight is fragmented by OpenSSL and packed into
    datagrams of whole records by the gateway; libcoap reassembles it."""
    gw = gateway_factory(tls_cert=pki["srv.pem"], tls_key=pki["srv.key"],
                         tls_client_ca=pki["ca.pem"], mqtts_port=0, coaps_port=0)
    dtls = gw.gateway.coap.dtls

    def small() -> None:
        dtls.limits = DtlsLimits(mtu=300)
        dtls._listener = dtls._new_listener()

    gw.call(small)
    cert = ("-c", pki["d1.pem"], "-j", pki["d1.key"], "-C", pki["ca.pem"])
    url = f"coaps://127.0.0.1:{gw.coaps_port}/shadow/d1"
    out = _coap_client("coap-client-openssl", *cert, url)
    assert "4.04" in out.stdout + out.stderr  # answered: no shadow yet
    assert _metric(gw, "handshakes_ok") == 1
