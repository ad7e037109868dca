"""iotgw: an IoT device-access gateway (MQTT 3.1.1/5.0, CoAP, device shadows, telemetry)."""

__version__ = "0.1.0"
