"""The chaos fleet: the design brief's traffic mix, with devices that remember what the gateway
acknowledged, so that the chaos runner can check it against what reached Kafka and the shadow
store afterwards.

| class | heartbeat | telemetry (QoS 1) | commands | shadow reports |
| --- | --- | --- | --- | --- |
| ChaosSensor (weight 3) | PINGREQ 1 Hz | 5-20 Hz, 128-512 B JSON | | |
| ChaosActuator (weight 1) | PINGREQ 1 Hz | | answered, 0.1-2 Hz | on change |
| ChaosCoapDevice (weight 1) | CoAP ping 1 Hz | POST 5 Hz (CON) | by Observe, 0.1-2 Hz | PATCH |
| Flooder (fixed 2) | | 200 Hz while a `flood` fault is on | | |

What counts as acknowledged: a telemetry PUBLISH whose PUBACK came (the gateway acknowledges it
once the record is in Kafka or the disk spool); a CoAP POST answered 2.xx; a shadow report that
came back on `$shadow/{id}/update/accepted` (MQTT: a PUBACK alone also follows a rejected write)
or was answered 2.xx (CoAP PATCH). Every device also times its reconnects:
("RECONNECT", "mqtt") from the lost connection to the next CONNACK.
"""

from __future__ import annotations

import json
import random
import time
from typing import TYPE_CHECKING, Any, ClassVar

from gateway._native import coap
from loadtest.device import CoapDevice, Device, MqttDevice, json_payload, task
from loadtest.mqtt_client import MqttClient
from loadtest.wait import between, constant_throughput

if TYPE_CHECKING:
    from loadtest.runtime import Runtime

RECONNECT_TYPE = "RECONNECT"


class Ledger:
    """What one device sent and what the gateway acknowledged."""

    def __init__(self) -> None:
        self.telemetry_acked: list[tuple[int, float]] = []  # (seq, wall time of the ack)
        self.reports: list[tuple[int, dict[str, Any]]] = []  # every shadow report sent
        self.report_acked = 0  # seq of the last report acknowledged as stored
        self.reports_acked = 0


class _ChaosMqtt(MqttDevice):
    abstract = True
    telemetry_name: ClassVar[str] = "telemetry"

    def __init__(self, rt: Runtime, index: int) -> None:
        super().__init__(rt, index)
        self.ledger = Ledger()
        self._sent: dict[int, int] = {}  # packet id -> telemetry seq, until its PUBACK
        self._lost_at: int | None = None  # perf_counter_ns of the lost connection

    async def _connect(self) -> None:
        await super()._connect()
        assert self.client is not None
        self._sent.clear()  # packet ids start again on a new connection
        self.client.on_ack = self._acked
        if self._lost_at is not None:
            self.stats.get(RECONNECT_TYPE, "mqtt").record(
                (time.perf_counter_ns() - self._lost_at) // 1000
            )
            self._lost_at = None

    def on_connection_lost(self, client: MqttClient, reason: str | None) -> None:
        if self._lost_at is None and not self.stopped:
            self._lost_at = time.perf_counter_ns()
        super().on_connection_lost(client, reason)

    def _acked(self, packet_id: int) -> None:
        seq = self._sent.pop(packet_id, None)
        if seq is not None:
            self.ledger.telemetry_acked.append((seq, time.time()))

    def send_telemetry(self, data: dict[str, Any], size: int | None = None) -> None:
        if self.publish_telemetry(data, size=size, qos=1, name=self.telemetry_name):
            assert self.client is not None
            self._sent[self.client.next_pid] = self.telemetry_seq


class ChaosSensor(_ChaosMqtt):
    weight = 3
    wait_time = constant_throughput(5, 20)
    telemetry_size = (128, 512)

    def on_start(self) -> None:
        self.heartbeat(1.0)

    @task
    def telemetry(self) -> None:
        self.send_telemetry({"temp": round(random.gauss(21, 2), 2)})


class ChaosActuator(_ChaosMqtt):
    weight = 1
    wait_time = between(2, 6)

    def on_start(self) -> None:
        self.heartbeat(1.0)
        self.state = {"setpoint": 20, "mode": "auto", "n": 0}
        prefix = f"$shadow/{self.id}/update/"
        self.subscribe(prefix + "accepted", 1, self._accepted)
        self.subscribe(prefix + "rejected", 1, self._rejected)
        self.answer_commands((0.1, 2.0))
        self.report_shadow(force=True)

    @task
    def local_change(self) -> None:
        self.set_state(mode=random.choice(("auto", "eco", "boost")), n=self.state["n"] + 1)

    def report_shadow(self, reported: dict[str, Any] | None = None, force: bool = False) -> bool:
        sent = super().report_shadow(reported, force)
        if sent:
            self.ledger.reports.append((self.seq, dict(self.state)))
        return sent

    def _accepted(self, topic: str, payload: bytes) -> None:
        try:
            reported = json.loads(payload)["state"]["reported"]
        except (ValueError, KeyError, TypeError):
            return
        for seq, sent in reversed(self.ledger.reports):
            if seq <= self.ledger.report_acked:
                break
            if all(reported.get(k) == v for k, v in sent.items()):
                self.ledger.report_acked = seq
                self.ledger.reports_acked += 1
                break

    def _rejected(self, topic: str, payload: bytes) -> None:
        self.stats.failure("SHADOW", "rejected", payload[:120].decode("utf-8", "replace"))


class Flooder(_ChaosMqtt):
    """Idle until a `flood` fault sets `flooding`; then telemetry at 200 Hz."""

    fixed_count = 2
    wait_time = constant_throughput(200)
    telemetry_size = 256
    telemetry_name = "flood"
    flooding = False  # set on the instances by the chaos runner

    @task
    def flood(self) -> None:
        if self.flooding:
            self.send_telemetry({"flood": 1})


class ChaosCoapDevice(CoapDevice):
    weight = 1
    wait_time = constant_throughput(5)
    telemetry_size = (128, 256)

    def __init__(self, rt: Runtime, index: int) -> None:
        super().__init__(rt, index)
        self.ledger = Ledger()

    def on_start(self) -> None:
        self.heartbeat(1.0)
        self.state = {"mode": "auto", "n": 0}
        self.report_shadow(force=True)
        # Commands by Observe, answered with POST; the observation is renewed every 10 s (a
        # server that lost it, a killed worker, would otherwise never notify again) and the
        # old one ends with the RST to its next notification.
        self.observe_commands()
        self.every(10.0, self._renew_observation)
        from loadtest.commands import commander_of

        commander_of(self.rt).add(self.id, random.uniform(0.1, 2.0))

    def _renew_observation(self) -> None:
        if self.client is not None:
            self.client.forget("observe commands")
        self.observe_commands()

    @task
    def telemetry(self) -> None:
        if random.random() < 0.05:
            self.set_state(n=self.state["n"] + 1)
            return
        self.telemetry_seq += 1
        seq = self.telemetry_seq
        payload = json_payload(seq, {"temp": 21.0}, self._size)
        ledger = self.ledger

        def done(_: Any) -> None:
            ledger.telemetry_acked.append((seq, time.time()))

        self.request("POST", f"/telemetry/{self.id}", payload, content_format=coap.JSON,
                     name="telemetry", done=done)

    def report_shadow(self, reported: dict[str, Any] | None = None, force: bool = False) -> bool:
        reported = self.state if reported is None else reported
        if not self._shadow_changed(reported, force):
            return False
        self.seq += 1
        seq = self.seq
        self.ledger.reports.append((seq, dict(reported)))
        body = json.dumps({"state": {"reported": reported}, "seq": seq}, separators=(",", ":"))
        ledger = self.ledger

        def done(_: Any) -> None:
            if seq > ledger.report_acked:
                ledger.report_acked = seq
            ledger.reports_acked += 1

        return self.request("PATCH", f"/shadow/{self.id}", body, content_format=coap.JSON,
                            name="shadow update", done=done)


FLEET: list[type[Device]] = [ChaosSensor, ChaosActuator, ChaosCoapDevice, Flooder]


def fleet() -> list[type[Device]]:
    for c in FLEET:
        c.prepare()
    return FLEET
