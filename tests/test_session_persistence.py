"""Persistent sessions and retained messages on disk: saved incrementally, bounded in memory,
failed saves retried, unreadable state set aside, a restart restoring what was there.

Real gateways, real clients (raw frames and paho-mqtt), real files; the fault cases run a
gateway in a subprocess whose file limits (RLIMIT_NOFILE, RLIMIT_FSIZE) are lowered for real.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as paho
import pytest
from conftest import free_port, wait_for_tcp
from test_mqtt_server import PahoClient, RawClient

from gateway._native import mqtt

ROOT = Path(__file__).parent.parent


def park(port: int, client_id: str, topic_filter: str, qos: int = 1) -> None:
    """Leave a persistent 3.1.1 session subscribed to `topic_filter` offline."""
    dev = RawClient(port)
    assert dev.connect(client_id, clean_start=False).reason_code == 0
    dev.send(mqtt.Subscribe(1, [mqtt.Subscription(topic_filter, qos)]).encode(4))
    assert dev.recv().type == mqtt.SUBACK
    dev.send(mqtt.Disconnect().encode(4))
    assert dev.recv() is None


def publish_many(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish at QoS 1 in one go and wait for every PUBACK."""
    app = RawClient(port)
    app.connect("app")
    app.send(b"".join(
        mqtt.encode_publish(topic, p, qos=1, packet_id=i + 1) for i, p in enumerate(payloads)
    ))
    for _ in payloads:
        assert app.recv().type == mqtt.PUBACK
    app.close()


def offline(gw: Any, client_id: str) -> None:
    deadline = time.monotonic() + 5
    while client_id in gw.call(lambda: set(gw.gateway.broker.online)):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def resume(port: int, client_id: str, count: int) -> list[bytes]:
    back = RawClient(port)
    assert back.connect(client_id, clean_start=False).session_present
    got = []
    for _ in range(count):
        p = back.recv(timeout=2)
        assert p is not None and p.type == mqtt.PUBLISH
        got.append(bytes(p.payload))
        back.send(mqtt.encode_ack(mqtt.PUBACK, p.packet_id))
    try:
        extra = back.recv(timeout=0.3)
    except TimeoutError:
        extra = None
    assert extra is None or extra.type != mqtt.PUBLISH, "more was queued than the bound allows"
    back.close()
    return got


def dropped(gw: Any, reason: str) -> float:
    text = gw.gateway.metrics.render().decode()
    key = f'iotgw_mqtt_dropped_messages_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(key):
            return float(line[len(key):])
    return 0.0


# ---- bounds -------------------------------------------------------------------------------------

def test_queued_bytes_per_session_are_bounded_newest_shed_and_counted(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open", max_queued_bytes=35_000)
    park(gw.mqtt_port, "dev", "cmd/#")
    offline(gw, "dev")
    payloads = [bytes([i]) * 10_000 for i in range(10)]
    publish_many(gw.mqtt_port, "cmd/x", payloads)
    assert dropped(gw, "queue_full_bytes") == 7
    assert resume(gw.mqtt_port, "dev", 3) == payloads[:3]  # the oldest kept, the newest shed


def test_queued_bytes_across_sessions_are_bounded_and_counted(gateway_factory: Any) -> None:
    gw = gateway_factory(
        allow_anonymous=True, acl="open", max_queued_bytes=1 << 20, max_queued_bytes_total=25_000
    )
    for name in ("a", "b"):
        park(gw.mqtt_port, name, f"to/{name}")
        offline(gw, name)
    publish_many(gw.mqtt_port, "to/a", [b"a" * 10_000, b"A" * 10_000])
    publish_many(gw.mqtt_port, "to/b", [b"b" * 10_000, b"B" * 10_000])
    assert dropped(gw, "queue_full_total") == 2
    assert resume(gw.mqtt_port, "a", 2) == [b"a" * 10_000, b"A" * 10_000]
    # Delivered: their bytes are free again, so b's next message is queued.
    publish_many(gw.mqtt_port, "to/b", [b"c" * 10_000])
    assert resume(gw.mqtt_port, "b", 1) == [b"c" * 10_000]
    assert dropped(gw, "queue_full_total") == 2


def test_queued_message_count_bound_is_counted_by_its_own_reason(gateway_factory: Any) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open", max_queued_messages=2)
    park(gw.mqtt_port, "dev", "cmd/#")
    offline(gw, "dev")
    publish_many(gw.mqtt_port, "cmd/x", [b"1", b"2", b"3", b"4"])
    assert dropped(gw, "queue_full_messages") == 2
    assert resume(gw.mqtt_port, "dev", 2) == [b"1", b"2"]


def test_shed_messages_are_logged_in_one_line_per_interval(
    gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gw = gateway_factory(allow_anonymous=True, acl="open", max_queued_messages=1)
    park(gw.mqtt_port, "dev", "cmd/#")
    offline(gw, "dev")

    def shed_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "shed" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="iotgw.mqtt"):
        publish_many(gw.mqtt_port, "cmd/x", [b"%d" % i for i in range(50)])
        deadline = time.monotonic() + 5
        while not shed_lines():
            assert time.monotonic() < deadline, "shedding was never logged"
            time.sleep(0.05)
        publish_many(gw.mqtt_port, "cmd/x", [b"%d" % i for i in range(20)])
        time.sleep(1.5)  # three sweeps, well inside the interval
    assert dropped(gw, "queue_full_messages") == 69
    lines = shed_lines()
    assert len(lines) == 1 and "49 queue_full_messages" in lines[0], lines


# ---- the cost of a save -------------------------------------------------------------------------

def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def _save(gw: Any) -> None:
    asyncio.run_coroutine_threadsafe(gw.gateway.save_state(), gw.loop).result(30)


def _bytes_written_saving_one_new_message(gw: Any, stored: int) -> int:
    gw.call(lambda: gw.gateway._sweeper.cancel())  # saves happen when the test says
    park(gw.mqtt_port, "dev", "cmd/#")
    offline(gw, "dev")
    publish_many(gw.mqtt_port, "cmd/x", [b"%06d" % i + b"x" * 4090 for i in range(stored)])
    _save(gw)
    publish_many(gw.mqtt_port, "cmd/x", [b"one more"])
    before = _wchar()
    _save(gw)
    return _wchar() - before


def test_saving_one_new_message_writes_little_whatever_is_stored(gateway_factory: Any) -> None:
    """Measured through the process's write() calls (/proc/self/io wchar): the state files
    are all it writes while the clients are idle."""
    small = _bytes_written_saving_one_new_message(
        gateway_factory(allow_anonymous=True, acl="open"), 50
    )
    large = _bytes_written_saving_one_new_message(
        gateway_factory(allow_anonymous=True, acl="open"), 500
    )
    assert 0 < small < 64 * 1024, small
    assert large < small + 16 * 1024, (small, large)


def test_the_state_file_shrinks_once_its_queues_are_delivered(
    gateway_factory: Any, tmp_path: Path
) -> None:
    data = tmp_path / "state"
    settings: dict[str, Any] = {"allow_anonymous": True, "acl": "open", "data_dir": str(data)}
    gw = gateway_factory(**settings)
    park(gw.mqtt_port, "dev", "cmd/#")
    offline(gw, "dev")
    payloads = [b"%06d" % i + b"x" * 8000 for i in range(300)]
    publish_many(gw.mqtt_port, "cmd/x", payloads)
    gw.stop()
    full = (data / "mqtt-state.sqlite").stat().st_size
    assert full > 300 * 8000
    again = gateway_factory(**settings)
    assert resume(again.mqtt_port, "dev", 300) == payloads
    again.stop()
    assert (data / "mqtt-state.sqlite").stat().st_size < full // 4


# ---- failed saves -------------------------------------------------------------------------------

FAULT_SCRIPT = r"""
import asyncio, json, os, resource, signal, sys
from gateway._native import mqtt
from gateway.app import Gateway
from gateway.config import Config

KIND, DATA = sys.argv[1], sys.argv[2]


async def exchange(gw, client_id, frames, replies):
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.mqtt_port)
    framer = mqtt.Framer(version=4)
    writer.write(mqtt.Connect(client_id, clean_start=False).encode(4) + b"".join(frames))
    got = []
    while len(got) < replies:
        got.extend(p.detach() for p in framer.feed(await reader.read(65536)))
    writer.close()
    await writer.wait_closed()
    while client_id in gw.broker.online:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the server closed its side too: no descriptor is freed later
    return got


def lower():
    if KIND == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
        return []
    fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(fds) + 1, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    fillers = []  # every free descriptor below the limit taken: no file can be opened
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        return fillers


def restore(fillers, limits):
    for fd in fillers:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_FSIZE, limits[0])
    resource.setrlimit(resource.RLIMIT_NOFILE, limits[1])


async def main():
    config = Config(data_dir=DATA, mqtt_port=0, http_port=0, coap_port=0,
                    allow_anonymous=True, acl="open")
    gw = Gateway(config)
    await gw.start()
    gw._sweeper.cancel()  # saves happen when this script says
    sub = mqtt.Subscribe(1, [mqtt.Subscription("cmd/#", 1)]).encode(4)
    await exchange(gw, "dev", [sub], 2)
    await gw.save_state()
    pub = mqtt.encode_publish("cmd/x", b"p" * 8192, qos=1, packet_id=1)
    await exchange(gw, "app", [pub], 2)
    limits = (resource.getrlimit(resource.RLIMIT_FSIZE), resource.getrlimit(resource.RLIMIT_NOFILE))
    fillers = lower()
    try:
        first = await gw.save_state()
    except OSError as exc:
        first = f"raised {exc.__class__.__name__}"
    restore(fillers, limits)
    second = await gw.save_state()
    await gw.stop()
    again = Gateway(config)
    await again.start()
    session = again.broker.sessions.get("dev")
    queued = [bytes(d.message.payload) for d in session.queue] if session else None
    await again.stop()
    print(json.dumps({"first": repr(first), "second": repr(second),
                      "queued": None if queued is None else [len(q) for q in queued]}))


asyncio.run(main())
"""


@pytest.mark.parametrize("fault", ["nofile", "fsize"])
def test_a_save_that_fails_is_not_marked_saved_and_the_next_one_writes_it(
    tmp_path: Path, fault: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", FAULT_SCRIPT, fault, str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["queued"] == [8192], (result, out.stderr[-3000:])
    # Without a free descriptor the save still works (the store holds its files open and
    # uses no temporary files); a write past the file size limit fails, and the next save
    # writes what it carried.
    assert result["first"] == {"nofile": "True", "fsize": "False"}[fault], result


# ---- unreadable state ---------------------------------------------------------------------------

def _damage(path: Path) -> None:
    """Overwrite the start of every other page after the first (b-tree page headers, overflow
    chain pointers): a database whose header is fine and whose tables are not."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        for offset in range(4096, size, 2 * 4096):
            f.seek(offset)
            f.write(b"\xa5" * 16)


@pytest.mark.parametrize(
    ("name", "how"),
    [("mqtt-state.sqlite", "garbage"), ("mqtt-state.sqlite", "damaged pages"),
     ("mqtt-state.msgpack", "garbage")],
)
def test_unreadable_session_state_is_set_aside_with_one_line_and_clients_are_served(
    gateway_factory: Any, tmp_path: Path, name: str, how: str
) -> None:
    data = tmp_path / "data"
    if how == "garbage":
        data.mkdir()
        (data / name).write_bytes(b"not session state, torn or overwritten\n" * 200)
    else:
        gw = gateway_factory(allow_anonymous=True, acl="open", data_dir=str(data))
        park(gw.mqtt_port, "dev", "cmd/#")
        offline(gw, "dev")
        publish_many(gw.mqtt_port, "cmd/x", [b"y" * 3000 for _ in range(50)])
        gw.stop()
        _damage(data / name)
    garbage = (data / name).read_bytes()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--data-dir", str(data),
         "--mqtt-port", str(port), "--http-port", "0", "--coap-port", "0",
         "--allow-anonymous", "--acl", "open"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT,
    )
    try:
        wait_for_tcp(port, proc=proc)  # type: ignore[arg-type]
        client = RawClient(port)
        assert client.connect("dev", clean_start=False).reason_code == 0
        client.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    stderr = err.decode()
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "set aside" in line]
    assert len(lines) == 1, stderr
    kept = list(data.glob(name + ".corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == garbage


# ---- restart ------------------------------------------------------------------------------------

def test_restart_restores_in_flight_queued_incoming_qos2_and_retained_state(
    gateway_factory: Any, tmp_path: Path
) -> None:
    data = str(tmp_path / "state")
    settings: dict[str, Any] = {"allow_anonymous": True, "acl": "open", "data_dir": data}
    gw = gateway_factory(**settings)
    port = gw.mqtt_port
    props = mqtt.Properties(session_expiry_interval=3600)
    dev = RawClient(port, version=5)
    assert dev.connect("dev", clean_start=False, properties=props).reason_code == 0
    sub_props = mqtt.Properties(subscription_identifiers=[7])
    dev.send(mqtt.Subscribe(1, [mqtt.Subscription("cmd/#", 2, no_local=True)],
                            properties=sub_props).encode(5))
    assert dev.recv().type == mqtt.SUBACK
    app = PahoClient(port, "app", paho.MQTTv311)
    app.publish("cmd/a", b"qos1 in flight", 1)
    app.publish("cmd/b", b"qos2 released", 2)
    first, second = dev.recv(), dev.recv()
    assert (bytes(first.payload), bytes(second.payload)) == (b"qos1 in flight", b"qos2 released")
    dev.send(mqtt.encode_ack(mqtt.PUBREC, second.packet_id, 0, 5))  # -> awaits PUBCOMP
    assert dev.recv().type == mqtt.PUBREL
    dev.send(mqtt.encode_publish("cmd/up", b"once", qos=2, packet_id=9, version=5))
    assert dev.recv().type == mqtt.PUBREC  # its PUBREL never comes before the restart
    dev.close()
    offline(gw, "dev")
    app.publish("cmd/c", b"queued", 1)
    app.publish("cfg/r", b"retained", 1, retain=True)
    app.close()
    gw.stop()

    again = gateway_factory(**settings)
    session = again.call(lambda: again.gateway.broker.sessions["dev"])
    assert session.expiry_interval == 3600
    assert session.anonymous is True  # it connected without credentials
    back = RawClient(again.mqtt_port, version=5)
    ack = back.connect("dev", clean_start=False, properties=props)
    assert ack.session_present
    got = [back.recv() for _ in range(3)]
    resent = next(p for p in got if p.type == mqtt.PUBLISH and p.dup)
    assert (resent.packet_id, bytes(resent.payload)) == (first.packet_id, b"qos1 in flight")
    assert list(resent.properties.subscription_identifiers) == [7]
    rel = next(p for p in got if p.type == mqtt.PUBREL)
    assert rel.packet_id == second.packet_id
    queued = next(p for p in got if p.type == mqtt.PUBLISH and not p.dup)
    assert bytes(queued.payload) == b"queued"
    # The QoS 2 publish it had acknowledged with PUBREC is not delivered a second time.
    back.send(mqtt.encode_publish("cmd/up", b"once", qos=2, dup=True, packet_id=9, version=5))
    assert back.recv().type == mqtt.PUBREC
    back.send(mqtt.encode_ack(mqtt.PUBREL, 9, 0, 5))
    assert back.recv().type == mqtt.PUBCOMP
    back.send(mqtt.Subscribe(2, [mqtt.Subscription("cfg/#", 1)]).encode(5))
    assert back.recv().type == mqtt.SUBACK
    retained = back.recv()
    assert (retained.topic, bytes(retained.payload), retained.retain) == (
        "cfg/r", b"retained", True
    )
    back.close()


def test_qos2_flows_in_flight_both_ways_survive_a_crash(gateway_process: Any) -> None:
    """SIGKILL, not a clean stop: what the periodic save wrote is all there is. An outgoing
    QoS 2 PUBLISH not yet PUBRECed is resent with DUP, one PUBRECed gets its PUBREL again,
    and an incoming one answered with PUBREC is not delivered a second time."""
    gw = gateway_process()
    props = mqtt.Properties(session_expiry_interval=3600)
    dev = RawClient(gw.mqtt_port, version=5)
    assert dev.connect("dev", clean_start=False, properties=props).reason_code == 0
    dev.send(mqtt.Subscribe(1, [mqtt.Subscription("cmd/#", 2)]).encode(5))
    assert dev.recv().type == mqtt.SUBACK
    app = RawClient(gw.mqtt_port, version=5)
    assert app.connect("app").reason_code == 0
    for pid, topic in ((1, "cmd/unacked"), (2, "cmd/received")):
        app.send(mqtt.encode_publish(topic, topic.encode(), qos=2, packet_id=pid, version=5))
        assert app.recv().type == mqtt.PUBREC
        app.send(mqtt.encode_ack(mqtt.PUBREL, pid, 0, 5))
        assert app.recv().type == mqtt.PUBCOMP
    unacked, received = dev.recv(), dev.recv()
    assert (unacked.topic, received.topic) == ("cmd/unacked", "cmd/received")
    dev.send(mqtt.encode_ack(mqtt.PUBREC, received.packet_id, 0, 5))
    assert dev.recv().type == mqtt.PUBREL  # left without PUBCOMP
    dev.send(mqtt.encode_publish("up/once", b"once", qos=2, packet_id=9, version=5))
    assert dev.recv().type == mqtt.PUBREC  # its PUBREL comes only after the crash
    assert dev.until_pingresp() == []
    time.sleep(2.5)  # two save intervals (1 s each): the state is on disk
    gw.kill()
    for client in (dev, app):
        client.close()

    gw.start()
    watcher = RawClient(gw.mqtt_port, version=5)
    assert watcher.connect("watcher").reason_code == 0
    watcher.send(mqtt.Subscribe(1, [mqtt.Subscription("up/#", 2)]).encode(5))
    assert watcher.recv().type == mqtt.SUBACK
    back = RawClient(gw.mqtt_port, version=5)
    assert back.connect("dev", clean_start=False, properties=props).session_present
    got = back.until_pingresp()
    assert sorted((p.type, p.packet_id, getattr(p, "dup", False)) for p in got) == sorted([
        (mqtt.PUBLISH, unacked.packet_id, True), (mqtt.PUBREL, received.packet_id, False),
    ]), got
    back.send(mqtt.encode_ack(mqtt.PUBREC, unacked.packet_id, 0, 5))
    assert back.recv().type == mqtt.PUBREL
    for pid in (unacked.packet_id, received.packet_id):
        back.send(mqtt.encode_ack(mqtt.PUBCOMP, pid, 0, 5))
    # The incoming one it had answered with PUBREC: a DUP resend is not delivered again.
    back.send(mqtt.encode_publish("up/once", b"once", qos=2, dup=True, packet_id=9, version=5))
    assert back.recv().type == mqtt.PUBREC
    back.send(mqtt.encode_ack(mqtt.PUBREL, 9, 0, 5))
    assert back.recv().type == mqtt.PUBCOMP
    assert back.until_pingresp() == []
    assert watcher.until_pingresp() == []  # "up/once" was not routed a second time
    back.close()
    watcher.close()


def test_a_snapshot_left_by_the_previous_version_is_read_once_and_renamed(
    gateway_factory: Any, tmp_path: Path
) -> None:
    data = tmp_path / "state"
    data.mkdir()
    now = time.time()
    message = ["cmd/x", b"from the old snapshot", 1, False, None, None, "app"]
    session = {
        "client_id": "dev", "version": 4, "identity": "dev", "expiry": 0xFFFFFFFF,
        "offline_since": now - 5, "subscriptions": {"cmd/#": [1, False, False, 0, None]},
        "outgoing": {}, "queue": [[message, 1, False, [], 0]], "incoming_qos2": [],
    }
    retained = ["cfg/r", b"old retained", 1, True, None, None, "app"]
    (data / "mqtt-state.msgpack").write_bytes(msgpack.packb(
        {"format": 1, "saved_at": now, "sessions": [session], "retained": [retained]},
        use_bin_type=True,
    ))
    gw = gateway_factory(allow_anonymous=True, acl="open", data_dir=str(data))
    assert not (data / "mqtt-state.msgpack").exists()
    assert (data / "mqtt-state.msgpack.migrated").exists()
    gw.stop()
    again = gateway_factory(allow_anonymous=True, acl="open", data_dir=str(data))
    assert resume(again.mqtt_port, "dev", 1) == [b"from the old snapshot"]
    sub = RawClient(again.mqtt_port)
    sub.connect("sub")
    sub.send(mqtt.Subscribe(1, [mqtt.Subscription("cfg/#", 1)]).encode(4))
    assert sub.recv().type == mqtt.SUBACK
    assert bytes(sub.recv().payload) == b"old retained"
    sub.close()
