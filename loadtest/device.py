"""Simulated devices: the classes a scenario file subclasses, like locust's `User`.

    from loadtest import MqttDevice, between, task

    class Thermostat(MqttDevice):
        wait_time = between(0.5, 1.5)
        weight = 3

        def on_start(self):
            self.heartbeat(1.0)          # PINGREQ every second
            self.answer_commands()       # subscribe devices/{id}/commands/#, reply on .../response

        @task(5)
        def telemetry(self):
            self.publish_telemetry({"temp": 21.5})

        @task(1)
        def setpoint(self):
            self.set_state(setpoint=random.choice([19, 20, 21]))   # shadow report on change

Tasks are plain methods (they send without waiting; responses are timed as they arrive), so a
sleeping device costs one scheduler entry. A task may also be `async def` (it then runs as an
asyncio task and the next one is scheduled when it returns). `on_start`/`on_stop` may be either.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

from gateway._native import coap, mqtt
from loadtest.coap_client import METHODS, CoapClient
from loadtest.mqtt_client import PUBLISH_TYPE, RECEIVE_TYPE, ConnectError, MqttClient
from loadtest.wait import ScenarioError, WaitTime, as_wait_time

if TYPE_CHECKING:
    from loadtest.runtime import Runtime

F = TypeVar("F", bound=Callable[..., Any])

TASK_TYPE = "TASK"


class StopDevice(Exception):
    """Raise in a task or on_start to stop this device (it disconnects and is not replaced)."""


@overload
def task(weight: F) -> F: ...
@overload
def task(weight: int = 1) -> Callable[[F], F]: ...
def task(weight: int | F = 1) -> Any:
    """Mark a method as a task; `@task(3)` makes it three times as likely as `@task(1)`."""
    if callable(weight):
        weight.task_weight = 1  # type: ignore[attr-defined]
        return weight

    def mark(fn: F) -> F:
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ScenarioError(
                f"@task({weight!r}) on {fn.__qualname__}: weight must be an int >= 0"
            )
        fn.task_weight = weight  # type: ignore[attr-defined]
        return fn

    return mark


def _now_us() -> int:
    return time.time_ns() // 1000


_PAD = "x" * 4096


def json_payload(seq: int, data: dict[str, Any] | None, size: int | None) -> bytes:
    """`{"seq": n, "ts": <epoch µs>, ...data}` padded with a "pad" string to `size` bytes."""
    body: dict[str, Any] = {"seq": seq, "ts": _now_us()}
    if data:
        body.update(data)
    raw = json.dumps(body, separators=(",", ":"))
    if size is not None and len(raw) + 9 <= size:
        raw = raw[:-1] + ',"pad":"' + _PAD[: size - len(raw) - 9] + '"}'
    return raw.encode()


class Device:
    """Base of every simulated device; subclass `MqttDevice` or `CoapDevice`."""

    abstract: ClassVar[bool] = True
    protocol: ClassVar[str] = ""
    wait_time: Any = None
    weight: ClassVar[int] = 1
    fixed_count: ClassVar[int] = 0
    host: ClassVar[str | None] = None
    id_template: ClassVar[str] = "{name}-{n}"
    tasks: ClassVar[Any] = None
    task_list: ClassVar[list[Callable[..., Any]]] = []
    wait: ClassVar[WaitTime | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "abstract" not in cls.__dict__:
            cls.abstract = False

    @classmethod
    def prepare(cls) -> None:
        """Collect tasks and check the class; ScenarioError says what is wrong."""
        name = cls.__name__
        weighted: list[tuple[Callable[..., Any], int]] = []
        explicit = cls.tasks
        if explicit is not None:
            items = explicit.items() if isinstance(explicit, dict) else ((f, 1) for f in explicit)
            for fn, w in items:
                if not callable(fn) or isinstance(w, bool) or not isinstance(w, int) or w < 0:
                    raise ScenarioError(f"{name}.tasks: {fn!r}: {w!r} is not a task and weight")
                weighted.append((fn, w))
        else:
            seen: set[str] = set()
            for klass in cls.__mro__:
                for attr, fn in vars(klass).items():
                    if attr in seen:
                        continue
                    seen.add(attr)
                    w = getattr(fn, "task_weight", None)
                    if w is not None and callable(fn):
                        weighted.append((fn, w))
        cls.task_list = [fn for fn, w in weighted for _ in range(w)]
        cls.wait = as_wait_time(name, cls.__dict__.get("wait_time", cls.wait_time))
        if cls.task_list and cls.wait is None:
            raise ScenarioError(
                f"{name} has tasks but no wait_time: set wait_time = between(a, b), constant(s), "
                "constant_pacing(s) or constant_throughput(n)"
            )
        for attr in ("weight", "fixed_count"):
            v = getattr(cls, attr)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ScenarioError(f"{name}.{attr} = {v!r}: must be an int >= 0")
        if "{n}" not in cls.id_template and "{id}" not in cls.id_template:
            raise ScenarioError(f"{name}.id_template {cls.id_template!r} needs {{n}}")

    # ---- instance ----------------------------------------------------------------------------

    def __init__(self, rt: Runtime, index: int) -> None:
        self.rt = rt
        self.stats = rt.stats
        self.index = index
        self.id = self.id_template.format(name=type(self).__name__.lower(), n=index, id=index)
        self.state: dict[str, Any] = {}
        self.seq = 0  # shadow reports and events
        self.telemetry_seq = 0  # telemetry only: what --kafka matches
        self.stopped = False
        self.running = False
        self._last_reported: dict[str, Any] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.rt.loop

    def on_start(self) -> Any:
        """Called once connected, before the first task (may be async)."""

    def on_stop(self) -> Any:
        """Called when the run stops, before disconnecting (may be async)."""

    def on_command(self, name: str, data: Any) -> dict[str, Any] | None:
        """A command arrived (MQTT devices/{id}/commands/{name}, CoAP observe). The default
        applies a "set" command's `args` to `self.state` and reports the shadow on change. The
        returned dict is merged into the response."""
        if name == "set" and isinstance(data, dict) and isinstance(data.get("args"), dict):
            self.set_state(**data["args"])
        return None

    def set_state(self, **changes: Any) -> None:
        """Change the device's state; reports the shadow if anything changed."""
        self.state.update(changes)
        self.report_shadow(self.state)

    def report_shadow(self, reported: dict[str, Any] | None = None, force: bool = False) -> bool:
        raise NotImplementedError

    def _shadow_changed(self, reported: dict[str, Any], force: bool) -> bool:
        if not force and self._last_reported == reported:
            return False
        self._last_reported = dict(reported)
        return True

    def every(self, seconds: float, fn: Callable[[], Any], *, jitter: bool = True) -> None:
        """Call `fn()` every `seconds` on an absolute schedule (first call after a random phase
        when `jitter`), until the device stops. Heartbeats use this."""
        if seconds <= 0:
            raise ValueError("every(seconds): seconds must be > 0")
        first = self.rt.loop.time() + (random.uniform(0, seconds) if jitter else seconds)
        self.rt.scheduler.at(first, _periodic, (self, fn, seconds))

    # ---- task loop (driven by the runner through the scheduler) ------------------------------

    def _schedule_first(self) -> None:
        if self.task_list and not self.stopped:
            self.rt.scheduler.at(self.rt.loop.time(), _run_task, self)

    def _task_failed(self, fn: Callable[..., Any], exc: BaseException) -> None:
        if isinstance(exc, StopDevice):
            self.rt.loop.create_task(self._stop())
            return
        self.stats.error(
            TASK_TYPE, getattr(fn, "__name__", "task"), f"{type(exc).__name__}: {exc}"[:300]
        )

    def _after_task(self, due: float) -> None:
        if self.stopped:
            return
        now = self.rt.loop.time()
        wait = self.wait
        assert wait is not None
        try:
            nxt = wait.next_run(self, due, now)
        except Exception as exc:
            self.stats.error(TASK_TYPE, "wait_time", f"{type(exc).__name__}: {exc}")
            nxt = now + 1.0
        self.rt.scheduler.at(nxt, _run_task, self)

    async def _async_task(self, coro: Any, fn: Callable[..., Any], due: float) -> None:
        try:
            await coro
        except Exception as exc:
            self._task_failed(fn, exc)
        self._after_task(due)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _start(self) -> bool:
        """Connect, run on_start, start tasks. False if the device could not start."""
        try:
            await self._connect()
        except ConnectError:
            return False
        except OSError as exc:
            self.stats.error("CONNECT", "connect", str(exc))
            return False
        if self.stopped:
            self._disconnect()
            return False
        self.running = True
        try:
            result = self.on_start()
            if inspect.isawaitable(result):
                await result
        except StopDevice:
            await self._stop()
            return False
        except Exception as exc:
            self.stats.error(TASK_TYPE, "on_start", f"{type(exc).__name__}: {exc}"[:300])
        self._schedule_first()
        return True

    async def _stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.running:
            self.running = False
            try:
                result = self.on_stop()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self.stats.error(TASK_TYPE, "on_stop", f"{type(exc).__name__}: {exc}"[:300])
        self._disconnect()

    def _disconnect(self) -> None:
        raise NotImplementedError

    def outstanding(self) -> int:
        """Requests still waiting for their response."""
        return 0


def _run_task(device: Device, due: float) -> None:
    if device.stopped:
        return
    fn = random.choice(device.task_list)
    try:
        result = fn(device)
    except Exception as exc:
        device._task_failed(fn, exc)
        device._after_task(due)
        return
    if inspect.iscoroutine(result):
        device.rt.loop.create_task(device._async_task(result, fn, due))
        return
    device._after_task(due)


def _periodic(arg: tuple[Device, Callable[[], Any], float], due: float) -> None:
    device, fn, period = arg
    if device.stopped:
        return
    try:
        fn()
    except StopDevice:
        device.rt.loop.create_task(device._stop())
        return
    except Exception as exc:
        device._task_failed(fn, exc)
    now = device.rt.loop.time()
    nxt = due + period
    if nxt < now - period:  # fell behind: skip the missed beats
        device.stats.incr("overrun", int((now - nxt) / period))
        nxt = now
    device.rt.scheduler.at(nxt, _periodic, arg)


class MqttDevice(Device):
    """A device on MQTT (3.1.1 or 5.0, plain or TLS, as --host and --mqtt-version say)."""

    abstract = True
    protocol = "mqtt"
    qos: ClassVar[int | None] = None  # None: --qos
    clean_start: ClassVar[bool] = True
    keepalive: ClassVar[int | None] = None  # None: --keepalive
    username: ClassVar[str | None] = None  # None: --username; %i and %c are replaced
    password: ClassVar[str | None] = None
    telemetry_size: ClassVar[int | tuple[int, int] | None] = None  # bytes of JSON (padded)
    reconnect: ClassVar[bool] = True

    def __init__(self, rt: Runtime, index: int) -> None:
        super().__init__(rt, index)
        self.client: MqttClient | None = None
        self.subscriptions: list[tuple[str, int]] = []
        self._handlers: dict[str, Callable[[str, bytes], Any]] = {}
        self._commands_prefix: str | None = None
        self._command_rate: tuple[float, float] | None = None
        self._reconnecting = False
        size = self.telemetry_size
        self._size = random.randint(*size) if isinstance(size, tuple) else size

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected

    def _qos(self, qos: int | None) -> int:
        if qos is not None:
            return qos
        q = type(self).qos
        return self.rt.settings.qos if q is None else q

    def _fill(self, template: str | None) -> str | None:
        if template is None:
            return None
        return template.replace("%i", str(self.index)).replace("%c", self.id)

    async def _connect(self) -> None:
        client = MqttClient(self.rt, self.id, self)
        self.client = client
        s = self.rt.settings
        await client.connect(
            clean_start=self.clean_start,
            keepalive=self.keepalive,
            username=self._fill(self.username if self.username is not None else s.username),
            password=self._fill(self.password if self.password is not None else s.password),
        )
        if self.subscriptions:  # a reconnect: subscribe again
            await client.subscribe(self.subscriptions)

    def _disconnect(self) -> None:
        if self.client is not None:
            self.client.close()

    def outstanding(self) -> int:
        c = self.client
        return len(c.inflight) if c is not None and c.inflight else 0

    # ---- MessageSink ---------------------------------------------------------------------------

    def on_publish(self, client: MqttClient, packet: Any) -> None:
        topic: str = packet.topic
        prefix = self._commands_prefix
        if prefix is not None and topic.startswith(prefix):
            self._command(topic, packet)
            return
        self.stats.get(RECEIVE_TYPE, "message").count(1, packet.payload_size)
        handler = self._handlers.get(topic)
        if handler is None:
            for f, h in self._handlers.items():
                if _matches(f, topic):
                    handler = h
                    break
        payload = bytes(packet.payload)
        try:
            if handler is not None:
                handler(topic, payload)
            else:
                self.on_message(topic, payload)
        except Exception as exc:
            self.stats.error(TASK_TYPE, "on_message", f"{type(exc).__name__}: {exc}"[:300])

    def on_message(self, topic: str, payload: bytes) -> None:
        """A message on a subscribed topic without a handler of its own."""

    def on_connection_lost(self, client: MqttClient, reason: str | None) -> None:
        # One reconnect at a time, for the current client only: a connect that fails calls
        # this and also raises to the reconnect in progress, and two reconnects would run two
        # clients with one client id, taking each other's session over without end.
        if self.stopped or not self.reconnect or client is not self.client or self._reconnecting:
            return
        self._reconnecting = True
        delay = self.rt.settings.reconnect_delay * random.uniform(1.0, 2.0)
        self.rt.scheduler.after(delay, _reconnect, self)

    # ---- helpers for tasks -----------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str,
        qos: int | None = None,
        retain: bool = False,
        name: str | None = None,
    ) -> bool:
        """Publish; counts as ("PUBLISH", name), name defaulting to the topic with the device id
        replaced by {id}. QoS 1/2: the time to PUBACK/PUBCOMP is recorded."""
        if isinstance(payload, str):
            payload = payload.encode()
        if name is None:
            name = topic.replace(self.id, "{id}")
        if self.client is None:
            self.stats.failure(PUBLISH_TYPE, name, "not connected")
            return False
        return self.client.publish(topic, payload, self._qos(qos), name, retain)

    def publish_telemetry(
        self,
        data: dict[str, Any] | None = None,
        *,
        size: int | None = None,
        subtopic: str = "",
        qos: int | None = None,
        name: str = "telemetry",
    ) -> bool:
        """JSON telemetry on devices/{id}/telemetry[/subtopic] with a per-device sequence number
        and a send timestamp (epoch µs), padded to `size` (or the class's telemetry_size)."""
        self.telemetry_seq += 1
        topic = f"devices/{self.id}/telemetry" + (f"/{subtopic}" if subtopic else "")
        size = size if size is not None else self._size
        payload = json_payload(self.telemetry_seq, data, size)
        ok = self.publish(topic, payload, qos, name=name)
        if not ok:
            self.telemetry_seq -= 1
        return ok

    def publish_event(self, data: dict[str, Any] | None = None, qos: int | None = None) -> bool:
        self.seq += 1
        payload = json_payload(self.seq, data, None)
        return self.publish(f"devices/{self.id}/events", payload, qos, name="event")

    def report_shadow(self, reported: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Publish {"state": {"reported": ...}} on $shadow/{id}/update when it differs from the
        last report (or always with force). True if sent."""
        reported = self.state if reported is None else reported
        if not self._shadow_changed(reported, force):
            return False
        self.seq += 1
        body = json.dumps(
            {"state": {"reported": reported}, "seq": self.seq},
            separators=(",", ":"),
        )
        return self.publish(f"$shadow/{self.id}/update", body, name="shadow update")

    def ping(self, name: str = "heartbeat") -> None:
        """PINGREQ; the PINGRESP time is recorded as ("PING", name)."""
        if self.client is not None and self.client.connected:
            self.client.ping(name)
        else:
            self.stats.failure("PING", name, "not connected")

    def heartbeat(self, period: float = 1.0) -> None:
        """A PINGREQ every `period` seconds (the keep-alive heartbeat of a real device)."""
        self.every(period, self.ping)

    def subscribe(
        self,
        topic_filter: str,
        qos: int | None = None,
        handler: Callable[[str, bytes], Any] | None = None,
    ) -> asyncio.Task[Any]:
        """Subscribe (in the background; the SUBACK time is recorded). `handler(topic,
        payload)` gets matching messages, otherwise on_message does."""
        q = self._qos(qos)
        self.subscriptions.append((topic_filter, q))
        if handler is not None:
            self._handlers[topic_filter] = handler
        return self.rt.loop.create_task(self._subscribe([(topic_filter, q)]))

    async def _subscribe(self, filters: list[tuple[str, int]], then: Any = None) -> bool:
        if self.client is None:
            return False
        try:
            codes = await self.client.subscribe(filters)
        except ConnectError:
            return False
        ok = all(c < 0x80 for c in codes)
        if ok and then is not None:
            then()
        return ok

    def answer_commands(self, rate: float | tuple[float, float] | None = (0.1, 2.0)) -> None:
        """Subscribe to devices/{id}/commands/# and answer each command on
        devices/{id}/commands/{name}/response (or the MQTT 5 response topic, with its
        correlation data). With `rate`, this process's command issuer also sends this device
        commands at that rate (per second; a (low, high) range draws one per device), timing
        the round trip as ("COMMAND", "round trip")."""
        self._commands_prefix = f"devices/{self.id}/commands/"
        q = self._qos(None)
        self.subscriptions.append((self._commands_prefix + "#", q))
        register = None
        if rate is not None:
            lo, hi = rate if isinstance(rate, tuple) else (rate, rate)
            per_second = random.uniform(lo, hi)
            device_id = self.id

            def register() -> None:
                from loadtest.commands import commander_of

                commander_of(self.rt).add(device_id, per_second)

        self.rt.loop.create_task(self._subscribe([(self._commands_prefix + "#", q)], register))

    def _command(self, topic: str, packet: Any) -> None:
        prefix = self._commands_prefix
        assert prefix is not None
        name = topic[len(prefix) :]
        if name.endswith("/response") or not name:
            return
        self.stats.get(RECEIVE_TYPE, "command").count(1, packet.payload_size)
        raw = bytes(packet.payload)
        try:
            data: Any = json.loads(raw) if raw else {}
        except ValueError:
            data = raw
        try:
            extra = self.on_command(name, data)
            status = "ok"
        except Exception as exc:
            extra = {"error": f"{type(exc).__name__}: {exc}"}
            status = "error"
        reply: dict[str, Any] = {"status": status}
        if isinstance(data, dict) and "cid" in data:
            reply["cid"] = data["cid"]
        if extra:
            reply.update(extra)
        props = packet.properties
        response_topic = props.response_topic if props is not None else None
        body = json.dumps(reply, separators=(",", ":")).encode()
        if response_topic and self.client is not None:
            out = mqtt.Properties(correlation_data=props.correlation_data) if (
                props.correlation_data is not None
            ) else None
            self.client.publish(response_topic, body, self._qos(None), "command response",
                                properties=out)
        else:
            self.publish(f"{topic}/response", body, name="command response")


def _reconnect(device: MqttDevice, due: float) -> None:
    if device.stopped:
        device._reconnecting = False
        return

    async def again() -> None:
        try:
            await device._connect()
        except (ConnectError, OSError):
            if device.client is not None:
                device.client.abort()  # connected but not subscribed: not half a device
            if not device.stopped:
                device.rt.scheduler.after(
                    device.rt.settings.reconnect_delay * random.uniform(1.0, 3.0),
                    _reconnect,
                    device,
                )
            return
        device._reconnecting = False

    device.rt.loop.create_task(again())


def _matches(topic_filter: str, topic: str) -> bool:
    fp = topic_filter.split("/")
    tp = topic.split("/")
    for i, part in enumerate(fp):
        if part == "#":
            return True
        if i >= len(tp) or (part != "+" and part != tp[i]):
            return False
    return len(fp) == len(tp)


class CoapDevice(Device):
    """A device on CoAP over UDP (one socket per device), as --host coap://... says."""

    abstract = True
    protocol = "coap"
    confirmable: ClassVar[bool] = True
    access_token: ClassVar[str | None] = None  # the `t` query; None: --coap-token; %i/%c
    telemetry_size: ClassVar[int | tuple[int, int] | None] = None
    shadow_method: ClassVar[str] = "PATCH"

    def __init__(self, rt: Runtime, index: int) -> None:
        super().__init__(rt, index)
        self.client: CoapClient | None = None
        size = self.telemetry_size
        self._size = random.randint(*size) if isinstance(size, tuple) else size
        token = self.access_token if self.access_token is not None else rt.settings.coap_token
        self._query = (
            "?t=" + token.replace("%i", str(index)).replace("%c", self.id) if token else ""
        )

    async def _connect(self) -> None:
        self.client = CoapClient(self.rt)
        await self.client.start()

    def _disconnect(self) -> None:
        if self.client is not None:
            self.client.close()

    def outstanding(self) -> int:
        return self.client.outstanding if self.client is not None else 0

    def request(
        self,
        method: str | int,
        path: str,
        payload: bytes | str = b"",
        *,
        confirmable: bool | None = None,
        content_format: int | None = None,
        name: str | None = None,
        observe: Callable[[Any], None] | None = None,
        done: Callable[[Any], None] | None = None,
    ) -> bool:
        """Send a request; the response time is recorded as (METHOD, name), name defaulting to
        the path with the device id replaced by {id}. The access token is added as ?t=.
        `done(response)` is called for a successful (2.xx) response."""
        code = METHODS[method.upper()] if isinstance(method, str) else method
        if isinstance(payload, str):
            payload = payload.encode()
        if name is None:
            name = path.partition("?")[0].replace(self.id, "{id}")
        if self._query and "?" not in path:
            path += self._query
        opts = [(coap.CONTENT_FORMAT, content_format)] if content_format is not None else []
        if self.client is None:
            self.stats.failure(str(method), name, "socket not open")
            return False
        return self.client.request(
            code,
            path,
            payload,
            confirmable=self.confirmable if confirmable is None else confirmable,
            options=opts,
            name=name,
            observe=observe,
            done=done,
        )

    def post_telemetry(
        self, data: dict[str, Any] | None = None, *, size: int | None = None,
        name: str = "telemetry",
    ) -> bool:
        """POST /telemetry/{id} with JSON telemetry (sequence number and timestamp inside)."""
        self.telemetry_seq += 1
        size = size if size is not None else self._size
        payload = json_payload(self.telemetry_seq, data, size)
        return self.request(
            "POST", f"/telemetry/{self.id}", payload, content_format=coap.JSON, name=name
        )

    publish_telemetry = post_telemetry

    def report_shadow(self, reported: dict[str, Any] | None = None, force: bool = False) -> bool:
        """PATCH /shadow/{id} with {"state": {"reported": ...}} when it changed."""
        reported = self.state if reported is None else reported
        if not self._shadow_changed(reported, force):
            return False
        self.seq += 1
        body = json.dumps(
            {"state": {"reported": reported}, "seq": self.seq},
            separators=(",", ":"),
        )
        return self.request(
            self.shadow_method, f"/shadow/{self.id}", body, content_format=coap.JSON,
            name="shadow update",
        )

    def get_shadow(self) -> bool:
        return self.request("GET", f"/shadow/{self.id}", name="shadow get")

    def observe_commands(self) -> bool:
        """GET /commands/{id} with Observe: each notification (iotgw's form: `{"name": ...,
        "payload": <the command's JSON>}`, or "text"/"base64" for other payloads) is passed to
        on_command, and the answer goes back as POST /commands/{id}/{name}, as on MQTT."""

        def notified(msg: Any) -> None:
            raw = bytes(msg.payload)
            if not raw:
                return
            try:
                note: Any = json.loads(raw)
            except ValueError:
                note = raw
            if not isinstance(note, dict) or "name" not in note:
                return  # the first answer to the GET: no command yet
            name = str(note["name"])
            data = note.get("payload", note.get("text", note.get("base64")))
            try:
                extra = self.on_command(name, data)
                reply: dict[str, Any] = {"status": "ok"}
            except Exception as exc:
                self.stats.error(TASK_TYPE, "on_command", f"{type(exc).__name__}: {exc}")
                extra, reply = None, {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            if isinstance(data, dict) and "cid" in data:
                reply["cid"] = data["cid"]
            if extra:
                reply.update(extra)
            body = json.dumps(reply, separators=(",", ":")).encode()
            self.request("POST", f"/commands/{self.id}/{name}", body,
                         content_format=coap.JSON, name="command response")

        return self.request("GET", f"/commands/{self.id}", name="observe commands",
                            observe=notified)

    def ping(self, name: str = "heartbeat") -> None:
        """A CoAP ping (empty CON, answered by RST): ("PING", name)."""
        if self.client is not None:
            self.client.ping(name)
        else:
            self.stats.failure("PING", name, "socket not open")

    def heartbeat(self, period: float = 1.0) -> None:
        self.every(period, self.ping)
