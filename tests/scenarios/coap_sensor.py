"""An example CoAP scenario (used by the tests): sensors posting telemetry, pinging, and
reporting shadow state on change."""

from __future__ import annotations

import random

from loadtest import CoapDevice, constant_pacing, task


class CoapSensor(CoapDevice):
    wait_time = constant_pacing(0.05)
    access_token = "tok-%i"

    def on_start(self) -> None:
        self.heartbeat(0.5)
        self.report_shadow({"fw": "1.0"})

    @task(5)
    def telemetry(self) -> None:
        self.post_telemetry({"lux": random.randint(0, 1000)}, size=128)

    @task(1)
    def shadow(self) -> None:
        self.get_shadow()
