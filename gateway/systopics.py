"""`$SYS/brokers/{node}/...`: broker statistics published by the gateway itself every
`--sys-interval` seconds (as EMQX names them: one subtree per node, so a cluster's nodes do not
overwrite each other). Not retained: a subscriber hears the next round. Who may read them is the
ACL's to say (a `[[service]]` with `subscribe = ["$SYS/#"]`; devices in `device` mode cannot);
no client may publish under `$SYS/` (gateway/mqtt/acl.py)."""

from __future__ import annotations

import time

from gateway import __version__
from gateway._native import mqtt
from gateway.metrics import MqttMetrics
from gateway.mqtt.broker import Broker
from gateway.mqtt.session import Message


class SysTopics:
    def __init__(self, broker: Broker, metrics: MqttMetrics, node_id: str, interval: float) -> None:
        self.broker = broker
        self.metrics = metrics
        self.prefix = f"$SYS/brokers/{node_id}/"
        self.interval = interval
        self.started = time.monotonic()
        self._last = self.started
        self._counts = self._totals()

    def _totals(self) -> tuple[int, int, int, int]:
        m = self.metrics
        return (m.packets_in[mqtt.PUBLISH], m.packets_out[mqtt.PUBLISH], m.bytes_in, m.bytes_out)

    def tick(self, now: float | None = None) -> bool:
        """Publish a round if `interval` passed since the last one (called by the app's
        sweep); True if it did."""
        now = time.monotonic() if now is None else now
        if not self.interval or now - self._last < self.interval:
            return False
        totals = self._totals()
        seconds = now - self._last
        rates = [(new - old) / seconds for new, old in zip(totals, self._counts, strict=True)]
        self._last, self._counts = now, totals
        values = {
            "version": __version__,
            "uptime": f"{now - self.started:.0f}",
            "clients/connected": len(self.broker.online),
            "sessions": len(self.broker.sessions),
            "messages/received": totals[0],
            "messages/sent": totals[1],
            "bytes/received": totals[2],
            "bytes/sent": totals[3],
            "messages/received/per_second": f"{rates[0]:.1f}",
            "messages/sent/per_second": f"{rates[1]:.1f}",
            "bytes/received/per_second": f"{rates[2]:.1f}",
            "bytes/sent/per_second": f"{rates[3]:.1f}",
        }
        for name, value in values.items():
            self.broker.publish(Message(self.prefix + name, str(value).encode(), 0, False,
                                        origin="$gateway"))
        self.broker.flush()
        return True
