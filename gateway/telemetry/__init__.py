"""Telemetry: classify device traffic, wrap it in the msgpack envelope, and hand it to a sink;
a device is acknowledged only once its record is durable (DESIGN.md)."""
