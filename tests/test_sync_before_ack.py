"""README's delivery guarantee: a QoS 1 PUBLISH or a CoAP CON is acknowledged only after its
record is fsynced, by the file sink or by the Kafka spool. A SIGKILL test cannot tell the page
cache from the disk, so this one watches the system calls: the gateway runs under
`strace -f`, and for every record the trace must show the write of its bytes, then an
fdatasync of that file that has returned, then the acknowledgement leaving on the socket.
(A thread stopped at a syscall's exit is held there until strace has printed it, so a
completion printed after a later write never happened after it.)"""

from __future__ import annotations

import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GatewayProcess, free_port
from test_mqtt_server import RawClient

from gateway._native import coap, mqtt

COUNT = 40  # records per protocol: enough for several batches and group commits
FIRST_ID = 0x2101  # packet ids and CoAP message ids whose bytes are easy to find


@dataclass
class Call:
    index: int  # the line's position in the trace
    pid: int
    name: str
    fd: int
    data: bytes  # the written buffer as strace printed it (-xx: every byte escaped)
    done: bool  # the line shows a return value of 0 (not an `<unfinished ...>` entry)


_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\((\d+),?)(.*)$")


def _parse(trace: str) -> list[Call]:
    calls: list[Call] = []
    for index, line in enumerate(trace.splitlines()):
        m = _LINE.match(line)
        if m is None:
            continue
        pid, resumed, name, fd, rest = m.groups()
        strings = re.findall(r'"((?:\\x[0-9a-f]{2})*)"', rest)
        data = b"".join(bytes.fromhex(s.replace("\\x", "")) for s in strings)
        calls.append(Call(index, int(pid), resumed or name, int(fd) if fd else -1, data,
                          rest.rstrip().endswith("= 0")))
    return calls


def _synced_before_acked(calls: list[Call], marker: bytes, ack: bytes) -> str | None:
    """None when the record holding `marker` was written, its file fdatasynced (returned),
    and only then `ack` sent; otherwise what went wrong."""
    write = next((c for c in calls if c.name.startswith("pwrite") and marker in c.data), None)
    if write is None:
        return f"{marker!r} was never written to a file"
    sent = next((c for c in calls if c.name in ("write", "writev", "sendto", "sendmsg")
                 and c.fd != write.fd and ack in c.data), None)
    if sent is None:
        return f"the acknowledgement {ack.hex()} of {marker!r} was never sent"
    # An fdatasync of the file whose return is printed between the write and the ack. A
    # resumed line carries no fd: it is the next one of the entry's thread.
    for c in calls:
        if c.name not in ("fdatasync", "fsync") or c.fd != write.fd:
            continue
        if write.index < c.index < sent.index:
            if c.done:
                return None
            resumed = next((r for r in calls if r.index > c.index and r.pid == c.pid
                            and r.fd == -1 and r.name == c.name), None)
            if resumed is not None and resumed.done and resumed.index < sent.index:
                return None
    return f"{marker!r} acknowledged (trace line {sent.index}) before an fdatasync of its file"


def _trace_gateway(tmp_path: Path, extra: list[str]) -> tuple[GatewayProcess, Path]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed: scripts/test.sh installs it")
    trace = tmp_path / "trace"
    prefix = [
        strace, "-f", "--seccomp-bpf", "-qq", "-xx", "-s", "65536", "-o", str(trace),
        "-e", "trace=pwrite64,pwritev,write,writev,sendto,sendmsg,fdatasync,fsync",
    ]
    return GatewayProcess(tmp_path / "data", *extra, prefix=prefix).start(), trace


def _send_and_collect(mqtt_port: int, coap_port: int) -> None:
    """COUNT QoS 1 telemetry PUBLISHes in one burst and COUNT CoAP CON POSTs, each
    acknowledged before this returns."""
    client = RawClient(mqtt_port)
    assert client.connect("dev-1").type == mqtt.CONNACK
    client.send(b"".join(
        mqtt.encode_publish("devices/dev-1/telemetry", b"mqtt-probe-%04x" % (FIRST_ID + i),
                            qos=1, packet_id=FIRST_ID + i)
        for i in range(COUNT)
    ))
    acked = set()
    while len(acked) < COUNT:
        packet = client.recv(timeout=30)
        assert packet is not None and packet.type == mqtt.PUBACK
        acked.add(packet.packet_id)
    assert acked == set(range(FIRST_ID, FIRST_ID + COUNT))
    client.close()

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(30)
        for i in range(COUNT):
            mid = FIRST_ID + i
            udp.sendto(coap.encode(coap.CON, coap.POST, mid, b"tk",
                                   [(coap.URI_PATH, b"telemetry"), (coap.URI_PATH, b"dev-2")],
                                   b"coap-probe-%04x" % mid), ("127.0.0.1", coap_port))
            while True:
                reply = coap.decode(udp.recv(2048))
                if reply.mid == mid and reply.type == coap.ACK:
                    break
            assert reply.code == coap.CHANGED, reply.code


def _syncs_of_the_mqtt_burst(calls: list[Call]) -> int:
    """fdatasync calls on the file the MQTT burst was written to, between its first write and
    its last: how many syncs its COUNT records took."""
    writes = [c for c in calls if c.name.startswith("pwrite") and b"mqtt-probe-" in c.data]
    first, last = writes[0], writes[-1]
    return sum(1 for c in calls if c.name in ("fdatasync", "fsync") and c.fd == first.fd
               and first.index <= c.index <= last.index + 1)


def _check(tmp_path: Path, extra: list[str]) -> list[Call]:
    gw, trace = _trace_gateway(tmp_path, extra)
    try:
        _send_and_collect(gw.mqtt_port, gw.coap_port)
    finally:
        gw.stop()
    calls = _parse(trace.read_text())
    problems = []
    for i in range(COUNT):
        ident = FIRST_ID + i
        puback = bytes([0x40, 0x02]) + ident.to_bytes(2, "big")
        changed = bytes([0x62, coap.CHANGED]) + ident.to_bytes(2, "big") + b"tk"
        for marker, ack in ((b"mqtt-probe-%04x" % ident, puback),
                            (b"coap-probe-%04x" % ident, changed)):
            problem = _synced_before_acked(calls, marker, ack)
            if problem is not None:
                problems.append(problem)
    assert problems == [], (len(problems), problems[:3])
    return calls


def test_file_sink_acknowledges_mqtt_and_coap_only_after_fdatasync(tmp_path: Path) -> None:
    calls = _check(tmp_path, [])
    # README: "fsynced in groups": the burst's records arrived in one read, so they share a
    # few syncs instead of taking one each.
    syncs = _syncs_of_the_mqtt_burst(calls)
    assert 1 <= syncs <= COUNT // 4, f"{COUNT} records of one burst took {syncs} fdatasyncs"


def test_kafka_spool_acknowledges_mqtt_and_coap_only_after_fdatasync(tmp_path: Path) -> None:
    """Kafka unreachable: every batch times out waiting for Kafka and goes to the spool, whose
    fdatasync is then what the acknowledgement waits for."""
    _check(tmp_path, ["--kafka", f"127.0.0.1:{free_port()}", "--kafka-ack-timeout-ms", "200"])
