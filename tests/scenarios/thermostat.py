"""An example scenario (used by the tests): thermostats and one energy meter over MQTT."""

from __future__ import annotations

import random

from loadtest import MqttDevice, constant, constant_throughput, task


class Thermostat(MqttDevice):
    """Telemetry at 10/s, a setpoint change now and then (shadow report on change), answers
    commands, 1 Hz heartbeat."""

    weight = 3
    wait_time = constant_throughput(10)
    telemetry_size = (128, 256)

    def on_start(self) -> None:
        self.heartbeat(1.0)
        self.state = {"setpoint": 20}
        self.report_shadow(force=True)
        self.answer_commands(rate=2.0)

    @task(4)
    def telemetry(self) -> None:
        self.publish_telemetry({"temp": round(random.gauss(21, 1), 2)})

    @task(1)
    def setpoint(self) -> None:
        self.set_state(setpoint=random.choice((19, 20, 21, 22)))


class Meter(MqttDevice):
    """Exactly one per run: a reading every 100 ms on devices/{id}/telemetry/energy."""

    fixed_count = 1
    wait_time = constant(0.1)

    @task
    def reading(self) -> None:
        self.publish_telemetry({"kwh": round(random.uniform(0, 5), 3)}, subtopic="energy")
