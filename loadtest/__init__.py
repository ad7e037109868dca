"""iotgw-load: simulated device fleets over MQTT and CoAP (see loadtest/README.md).

Scenario files import their building blocks from here:

    from loadtest import MqttDevice, CoapDevice, task, between, constant, constant_pacing,
                         constant_throughput, StopDevice
"""

from loadtest.device import CoapDevice, Device, MqttDevice, StopDevice, task
from loadtest.wait import ScenarioError, between, constant, constant_pacing, constant_throughput

__all__ = [
    "CoapDevice",
    "Device",
    "MqttDevice",
    "ScenarioError",
    "StopDevice",
    "between",
    "constant",
    "constant_pacing",
    "constant_throughput",
    "task",
]
