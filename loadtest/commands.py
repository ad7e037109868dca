"""The command issuer: the "backend" side of command traffic, one MQTT client per process.

Devices that call `answer_commands(rate)` register here; the issuer publishes
`devices/{id}/commands/set` to each at its rate (absolute schedule on the process scheduler) with
`{"cid": ..., "ts": ..., "name": "set", "args": {...}}` and times the round trip when the device's
reply with the same `cid` arrives on `devices/{id}/commands/set/response`:
("COMMAND", "round trip"). A reply that does not come within --command-timeout is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import TYPE_CHECKING, Any

from loadtest.mqtt_client import ConnectError, MqttClient

if TYPE_CHECKING:
    from loadtest.runtime import Runtime

COMMAND_TYPE = "COMMAND"
ROUND_TRIP = "round trip"
RESPONSE_FILTER = "devices/+/commands/+/response"


class Commander:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.prefix = f"{os.getpid():x}-{rt.worker_index}-"
        self.client = MqttClient(rt, f"iotgw-load-commander-{self.prefix}"
                                 f"{random.randrange(1 << 30):x}", self)
        self.client.device = False
        self.pending: dict[str, int] = {}  # cid -> send time ns
        self.count = 0
        self.ready = False
        self.stopped = False
        self.task = rt.loop.create_task(self._start())

    async def _start(self, again: bool = False) -> None:
        try:
            await self.client.connect(clean_start=True, name="commander")
            await self.client.subscribe([(RESPONSE_FILTER, 1)], name="command responses")
            self.ready = True
        except ConnectError:
            self.client.abort()
            if again and not self.stopped:  # the server went away: keep trying, as devices do
                self.rt.scheduler.after(self.rt.settings.reconnect_delay, _restart, self)
            else:
                self.stopped = True

    def add(self, device_id: str, per_second: float) -> None:
        if per_second <= 0:
            return
        period = 1.0 / per_second
        first = self.rt.loop.time() + random.uniform(0, period)
        self.rt.scheduler.at(first, self._fire, (device_id, period))

    def _fire(self, arg: tuple[str, float], due: float) -> None:
        if self.stopped:
            return
        device_id, period = arg
        if self.ready and self.client.connected:
            self.count += 1
            cid = f"{self.prefix}{self.count}"
            body = json.dumps(
                {
                    "cid": cid,
                    "ts": time.time_ns() // 1000,
                    "name": "set",
                    "args": {"setpoint": random.choice((18, 19, 20, 21, 22, 23))},
                },
                separators=(",", ":"),
            ).encode()
            if self.client.publish(f"devices/{device_id}/commands/set", body, 1, "command"):
                self.pending[cid] = time.perf_counter_ns()
        now = self.rt.loop.time()
        nxt = due + period
        if nxt < now - period:
            nxt = now
        self.rt.scheduler.at(nxt, self._fire, arg)

    # ---- MessageSink -------------------------------------------------------------------------

    def on_publish(self, client: MqttClient, packet: Any) -> None:
        raw = bytes(packet.payload)
        if self.prefix.encode() not in raw:
            return  # another process's command, or not one of ours
        try:
            cid = json.loads(raw).get("cid")
        except (ValueError, AttributeError):
            return
        t0 = self.pending.pop(cid, None) if isinstance(cid, str) else None
        if t0 is not None:
            self.rt.stats.get(COMMAND_TYPE, ROUND_TRIP).record(
                (time.perf_counter_ns() - t0) // 1000
            )

    def on_connection_lost(self, client: MqttClient, reason: str | None) -> None:
        self.ready = False
        if not self.stopped and client is self.client and not self.task.done():
            return  # still connecting: _start decides what comes next
        if not self.stopped and client is self.client:
            self.rt.scheduler.after(self.rt.settings.reconnect_delay, _restart, self)

    def sweep(self) -> None:
        deadline = time.perf_counter_ns() - int(self.rt.settings.command_timeout * 1e9)
        expired = [cid for cid, t0 in self.pending.items() if t0 < deadline]
        for cid in expired:
            del self.pending[cid]
        if expired:
            self.rt.stats.failure(COMMAND_TYPE, ROUND_TRIP, "no response (timeout)", len(expired))

    def stop(self) -> None:
        """Send no more commands (answers still count)."""
        self.stopped = True

    def close(self) -> None:
        self.stopped = True
        if self.pending:
            self.rt.stats.failure(
                COMMAND_TYPE, ROUND_TRIP, "no response before the run ended", len(self.pending)
            )
            self.pending.clear()
        self.client.close()


def _restart(commander: Commander, due: float) -> None:
    if commander.stopped:
        return
    commander.client = MqttClient(commander.rt, commander.client.client_id, commander)
    commander.client.device = False
    commander.task = asyncio.ensure_future(commander._start(again=True))


def commander_of(rt: Runtime) -> Commander:
    """This process's command issuer (created and connected on first use)."""
    if rt.commander is None:
        rt.commander = Commander(rt)
    return rt.commander
