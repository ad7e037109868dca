"""Built-in device profiles, usable without a scenario file (`--profile NAME`).

`fleet` (the default for MQTT hosts) is the traffic mix of a typical fleet:
  * every device: a heartbeat at 1 Hz (PINGREQ, the keep-alive of a real device);
  * Sensor (weight 3): telemetry at 5-20 Hz per device (drawn once per device), 128-512-byte JSON;
  * Actuator (weight 1): answers commands that arrive at 0.1-2 Hz per device, and reports its
    shadow when its state changes (a command changed it, or a local change every 10-30 s).
`coap` (the default for coap:// hosts): the same mix over CoAP (CoAP ping heartbeat, POST
telemetry, PATCH shadow on change). The other profiles are one part of the mix each; `chaos` is
the chaos suite's fleet (loadtest/chaosfleet.py).
"""

from __future__ import annotations

import random

from loadtest.chaosfleet import FLEET
from loadtest.device import CoapDevice, Device, MqttDevice, task
from loadtest.wait import ScenarioError, between, constant_throughput


class Heartbeat(MqttDevice):
    """Only a 1 Hz heartbeat (PINGREQ)."""

    def on_start(self) -> None:
        self.heartbeat(1.0)


class Sensor(MqttDevice):
    """1 Hz heartbeat, telemetry 5-20 Hz of 128-512-byte JSON."""

    weight = 3
    wait_time = constant_throughput(5, 20)
    telemetry_size = (128, 512)

    def on_start(self) -> None:
        self.heartbeat(1.0)

    @task
    def telemetry(self) -> None:
        self.publish_telemetry(
            {"temp": round(random.gauss(21, 2), 2), "hum": round(random.uniform(30, 60), 1)}
        )


class Actuator(MqttDevice):
    """1 Hz heartbeat, commands at 0.1-2 Hz, shadow reports on change."""

    weight = 1
    wait_time = between(10, 30)

    def on_start(self) -> None:
        self.heartbeat(1.0)
        self.state = {"setpoint": 20, "mode": "auto", "on": True}
        self.report_shadow(force=True)
        self.answer_commands((0.1, 2.0))

    @task
    def local_change(self) -> None:
        self.set_state(mode=random.choice(("auto", "eco", "boost")))


class ShadowReporter(MqttDevice):
    """Reports its shadow on change; its state changes with probability 0.3 each second."""

    wait_time = constant_throughput(1)

    def on_start(self) -> None:
        self.state = {"v": 0}
        self.report_shadow(force=True)

    @task
    def maybe_change(self) -> None:
        if random.random() < 0.3:
            self.set_state(v=self.state["v"] + 1)


class CoapSensor(CoapDevice):
    weight = 3
    wait_time = constant_throughput(5, 20)
    telemetry_size = (128, 512)

    def on_start(self) -> None:
        self.heartbeat(1.0)

    @task
    def telemetry(self) -> None:
        self.post_telemetry({"temp": round(random.gauss(21, 2), 2)})


class CoapActuator(CoapDevice):
    weight = 1
    wait_time = between(10, 30)

    def on_start(self) -> None:
        self.heartbeat(1.0)
        self.state = {"setpoint": 20, "mode": "auto"}
        self.report_shadow(force=True)

    @task
    def local_change(self) -> None:
        self.set_state(mode=random.choice(("auto", "eco", "boost")))


PROFILES: dict[str, list[type[Device]]] = {
    "chaos": FLEET,
    "fleet": [Sensor, Actuator],
    "heartbeat": [Heartbeat],
    "telemetry": [Sensor],
    "commands": [Actuator],
    "shadow": [ShadowReporter],
    "coap": [CoapSensor, CoapActuator],
}


def profile(name: str) -> list[type[Device]]:
    classes = PROFILES.get(name)
    if classes is None:
        raise ScenarioError(f"unknown profile {name!r}; the profiles are {', '.join(PROFILES)}")
    for c in classes:
        c.prepare()
    return classes
