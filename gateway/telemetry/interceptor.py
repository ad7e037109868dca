"""Telemetry from MQTT: the publish interceptor that turns `devices/{id}/telemetry|events`
PUBLISHes into records and holds their acknowledgement until the record is durable."""

from __future__ import annotations

from gateway.mqtt.channel import ROUTE, MqttChannel
from gateway.mqtt.session import Message
from gateway.telemetry.pipeline import TelemetryPipeline
from gateway.telemetry.records import Record, classify_topic


class TelemetryInterceptor:
    prefix = "devices/"

    def __init__(self, pipeline: TelemetryPipeline) -> None:
        self.pipeline = pipeline

    def on_publish(self, channel: MqttChannel, message: Message) -> int:
        kind = classify_topic(message.topic)
        if kind is None:
            return ROUTE
        message.own()  # one copy of the payload, shared by the record and the routed message
        record = Record(kind[1], kind[0], "mqtt", message.topic, bytes(message.payload))
        if message.properties is not None:
            record.content_type = message.properties.content_type
        token = channel.hold_ack()
        if token is None:
            self.pipeline.submit(record)
        else:
            self.pipeline.submit(record, channel, token)
        self.pipeline.over_high_water(channel)
        return ROUTE  # routed to subscribers too; acknowledged once durable

    def forget(self, channel: MqttChannel) -> None:
        self.pipeline.forget(channel)
