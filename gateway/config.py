"""One `Config` for the whole gateway, read from flags, `IOTGW_*` variables and a TOML file.

Every field is all three at once: `mqtt_port` is `--mqtt-port`, `IOTGW_MQTT_PORT` and the TOML key
`mqtt_port` (or `mqtt-port`). Precedence: flag > environment > file > default.

`Config` is a pydantic-settings model: pydantic converts and validates every value (an error is
one line naming the flag, `ConfigError`); pydantic-settings reads the environment
(`EnvSettingsSource`) and the file (`TomlConfigSettingsSource`), and `load` stacks them under
the flags. Constructed directly (`Config(mqtt_port=0)`), it takes only what it is given.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "IOTGW_"


class ConfigError(ValueError):
    """A setting has a value of the wrong kind, or the file is unreadable."""


def _opt(default: Any, help_text: str) -> Any:
    return Field(default=default, description=help_text)


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IOTGW_", frozen=True, extra="forbid", case_sensitive=False
    )

    bind: str = _opt("127.0.0.1", "address the listeners bind to")
    mqtt_port: int = _opt(1883, "MQTT listener port (0: any free port)")
    mqtts_port: int = _opt(8883, "MQTT over TLS port, used when --tls-cert is set")
    ws_port: int = _opt(0, "MQTT over WebSocket port, path /mqtt (0: off)")
    wss_port: int = _opt(0, "MQTT over WebSocket with TLS port, path /mqtt (0: off); needs "
                         "--tls-cert (the certificate of --mqtts-port)")
    ws_handshake_timeout: int = _opt(
        10, "seconds a WebSocket connection may take to finish its HTTP upgrade"
    )
    tls_cert: str | None = _opt(None, "server certificate (PEM)")
    tls_key: str | None = _opt(None, "server private key (PEM)")
    tls_client_ca: str | None = _opt(None, "CA bundle for device client certificates (PEM)")
    coap_port: int = _opt(5683, "CoAP UDP port (0: off, no plain CoAP; coaps may still be on)")
    coaps_port: int = _opt(
        5684, "CoAP over DTLS (coaps) UDP port, used with --dtls-psk, or --tls-cert and "
        "--tls-client-ca (device certificates)"
    )
    dtls_psk: bool = _opt(
        False, "serve coaps with the devices' pre-shared keys (iotgw devices add ID --psk)"
    )
    dtls_max_sessions: int = _opt(10_000, "coaps sessions kept at most (handshakes beyond "
                                  "are refused)")
    dtls_idle_timeout: float = _opt(300.0, "seconds without a datagram before a coaps "
                                    "session ends")
    http_port: int = _opt(8080, "REST, health and metrics port (0: any free port)")
    data_dir: str = _opt(
        "iotgw-data", "where sessions, registry and telemetry live; a relative path is taken "
        "from the current directory (every command prints the absolute one)"
    )
    allow_anonymous: bool = _opt(False, "accept MQTT clients without credentials")
    acl: Literal["device", "open"] = _opt(
        "device", "device: a device reaches only its own topics; open: a general broker"
    )
    max_packet_size: int = _opt(1 << 20, "largest MQTT packet accepted, bytes")
    max_keepalive: int = _opt(
        65535, "longest MQTT keep-alive, seconds: MQTT 5 clients are told (Server Keep Alive), "
        "3.1.1 clients asking more (or 0) are held to it"
    )
    max_queued_messages: int = _opt(
        1000, "QoS 1/2 messages queued per offline or slow session before dropping"
    )
    max_queued_bytes: int = _opt(
        16 << 20, "payload bytes queued per offline or slow session before dropping"
    )
    max_queued_bytes_total: int = _opt(
        256 << 20, "payload bytes queued by all sessions together before dropping"
    )
    max_publish_rate: int = _opt(
        0, "PUBLISH packets per second a client may send (0: no limit); a client over it is "
        "not read from until it is back under (nothing is dropped)"
    )
    max_publish_bytes_rate: int = _opt(
        0, "bytes per second a client may send (0: no limit), enforced the same way"
    )
    acl_file: str | None = _opt(
        None, "TOML file with deny rules and service accounts (see README, ACL)"
    )
    redis: str | None = _opt(None, "redis://host:port for shared shadows (default: SQLite)")
    node_id: str | None = _opt(None, "this gateway's writer id in shadow version vectors "
                               "and its name in a cluster (default: host name)")
    cluster: bool = _opt(False, "join the other gateways sharing --redis as one MQTT broker")
    workers: int = _opt(1, "gateway processes on this machine, sharing the ports "
                        "(SO_REUSEPORT); more than 1 needs --redis and runs them as a cluster")
    kafka: str | None = _opt(None, "host:port[,host:port] of Kafka")
    # telemetry to Kafka
    kafka_topics: str | None = _opt(
        None, "Kafka topic per record kind, over the defaults iot.telemetry, iot.events, "
        "iot.shadow, iot.commands: kind=topic[,kind=topic]"
    )
    kafka_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = _opt(
        "none", "Kafka compression (lz4, zstd, snappy need the cramjam package)"
    )
    kafka_ack_timeout_ms: int = _opt(
        3000, "how long a batch waits for Kafka's acks before it goes to the disk spool"
    )
    spool_max_bytes: int = _opt(1 << 30, "disk spool bound per lane; when full: backpressure")
    sys_interval: int = _opt(
        10, "seconds between broker statistics on $SYS/brokers/{node}/... (0: none)"
    )
    api_token: str | None = _opt(None, "bootstrap admin API token")
    auth_workers: int = _opt(1, "threads checking device and API secrets (PBKDF2): the most "
                             "cores failed logins can take")
    auth_max_pending: int = _opt(32, "secret checks waiting for a thread; more are refused "
                                 "as busy at once (MQTT 0x89, CoAP 5.03, HTTP 503)")
    log_level: str = _opt("info", "debug, info, warning or error")
    log_format: Literal["text", "json"] = _opt(
        "text", "text: one readable line per event; json: one JSON object per line"
    )
    http_access_log: bool = _opt(
        False, "log one line per REST request: method, path, status, duration, peer"
    )

    @property
    def coaps(self) -> bool:
        """The coaps listener is on: DTLS credentials are configured."""
        return self.dtls_psk or (self.tls_cert is not None and self.tls_client_ca is not None)

    def __init__(self, **values: Any) -> None:
        """ConfigError (one line naming the flag) for a value that does not fit."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_message(exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only what it is given: `load` stacks flags, environment and file itself."""
        return (init_settings,)

    @field_validator("*", mode="before")
    @classmethod
    def _plain(cls, value: Any, info: Any) -> Any:
        """As the flags and variables mean them: an empty or `none` value of an optional
        setting is None; a boolean is no number."""
        kind = cls.model_fields[info.field_name].annotation
        optional = type(None) in typing.get_args(kind)
        if optional and (value is None or (isinstance(value, str) and value.lower() in (
                "", "none"))):
            return None
        if kind is int and isinstance(value, bool):
            raise ValueError(f"{_flag(info.field_name)}: {value!r} is not an integer")
        return value

    @model_validator(mode="after")
    def _check(self) -> Config:
        """Values only (ranges, combinations); files, directories and ports are checked when
        the gateway starts (gateway/startup.py)."""
        if self.workers < 1:
            raise ConfigError(f"--workers: {self.workers} is not a number of processes (>= 1)")
        if (self.cluster or self.workers > 1) and not self.redis:
            raise ConfigError("--cluster and --workers above 1 need --redis (the nodes share it)")
        if self.workers > 1 and (self.mqtt_port == 0 or (self.coaps and self.coaps_port == 0)):
            raise ConfigError("--workers above 1 share their ports: give --mqtt-port and "
                              "--coaps-port (0 would pick one port per process)")
        for name in ("mqtt_port", "mqtts_port", "ws_port", "wss_port", "coap_port", "coaps_port",
                     "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= MAX_PORT:
                raise ConfigError(f"{_flag(name)}: {port} is not a port (0 to {MAX_PORT})")
        if self.http_port and self.http_port + self.workers - 1 > MAX_PORT:
            raise ConfigError(
                f"--http-port: worker {self.workers - 1} would serve HTTP on "
                f"{self.http_port + self.workers - 1}, past {MAX_PORT}: pick a lower port"
            )
        tcp = {"--mqtt-port": [self.mqtt_port], "--http-port": [
            self.http_port + i for i in range(self.workers) if self.http_port]}
        if self.tls_cert:
            tcp["--mqtts-port"] = [self.mqtts_port]
        tcp["--ws-port"] = [self.ws_port]
        tcp["--wss-port"] = [self.wss_port]
        owner: dict[int, str] = {}
        for flag, ports in tcp.items():
            for port in ports:
                if port and port in owner:
                    raise ConfigError(f"{flag}: port {port} is also {owner[port]}'s "
                                      "(workers serve HTTP on --http-port + i): give each "
                                      "listener its own port")
                owner.setdefault(port, flag)
        if self.coaps and self.coaps_port and self.coaps_port == self.coap_port:
            raise ConfigError(f"--coaps-port: port {self.coaps_port} is also --coap-port's: "
                              "give each its own port")
        if self.dtls_max_sessions < 1 or self.dtls_idle_timeout <= 0:
            raise ConfigError("--dtls-max-sessions and --dtls-idle-timeout must be above 0")
        for name in ("max_publish_rate", "max_publish_bytes_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)}: {getattr(self, name)} must be 0 (no limit) "
                                  "or more")
        if self.sys_interval < 0:
            raise ConfigError(f"--sys-interval: {self.sys_interval} must be 0 (off) or more")
        if not 1 <= self.max_keepalive <= 65535:
            raise ConfigError(
                f"--max-keepalive: {self.max_keepalive} is not a keep-alive (1 to 65535 seconds)"
            )
        if not MIN_PACKET_SIZE <= self.max_packet_size <= MAX_PACKET_SIZE:
            raise ConfigError(
                f"--max-packet-size: {self.max_packet_size} is not a packet size in bytes "
                f"({MIN_PACKET_SIZE} to {MAX_PACKET_SIZE}; smaller refuses every client)"
            )
        for name in ("max_queued_messages", "max_queued_bytes", "max_queued_bytes_total",
                     "kafka_ack_timeout_ms", "spool_max_bytes", "auth_workers",
                     "auth_max_pending"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)}: {getattr(self, name)} must be 1 or more")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"--log-level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        if not self.data_dir:
            raise ConfigError("--data-dir: give a directory (it is made if missing)")
        # Absolute from here on: a relative one would name another directory for every command
        # run from elsewhere (`iotgw devices add` writing a registry the gateway never reads).
        object.__setattr__(self, "data_dir", os.path.abspath(os.path.expanduser(self.data_dir)))
        if self.api_token is not None and (not self.api_token or any(
                c.isspace() for c in self.api_token)):
            raise ConfigError("--api-token: a bearer token is one word (no spaces)")
        if not self.bind.strip():
            raise ConfigError("--bind: give an address (0.0.0.0 or :: for every interface)")
        if self.wss_port and not self.tls_cert:
            raise ConfigError("--wss-port needs --tls-cert (and --tls-key): WSS serves the "
                              "certificate of --mqtts-port")
        if not 1 <= self.ws_handshake_timeout <= 3600:
            raise ConfigError(f"--ws-handshake-timeout: {self.ws_handshake_timeout} is not a "
                              "number of seconds (1 to 3600)")
        if self.tls_key and not self.tls_cert:
            raise ConfigError("--tls-key needs --tls-cert (the certificate the key belongs to)")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert (client certificates are "
                              "checked on the TLS listener only)")
        if self.redis and not self.redis.startswith(REDIS_SCHEMES):
            raise ConfigError(f"--redis: {self.redis!r} is not a Redis URL "
                              f"({', '.join(s + '...' for s in REDIS_SCHEMES)})")
        if self.kafka:
            for address in self.kafka.split(","):
                host, _, port = address.strip().rpartition(":")
                if not host or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
                    raise ConfigError(f"--kafka: {address.strip()!r} is not host:port "
                                      "(several: host:port,host:port)")
        if self.node_id is not None and (not self.node_id.strip() or "|" in self.node_id):
            raise ConfigError(f"--node-id: {self.node_id!r} must be a non-blank name without |")
        return self


MAX_PORT = 65535
# Below this even a CONNECT does not fit (Mosquitto refuses max_packet_size under 20 too);
# above it MQTT cannot encode the length.
MIN_PACKET_SIZE = 20
MAX_PACKET_SIZE = 268_435_455 + 5
LOG_LEVELS = ("debug", "info", "warning", "error")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_KINDS = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "bool_parsing": "a boolean (true/false)", "bool_type": "a boolean (true/false)",
    "string_type": "a string",
}


def _message(exc: ValidationError) -> str:
    """The first error as one line naming the flag, in the words of the checks above."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    kind = error["type"]
    if kind == "value_error":  # our own checks: their message is the line
        return str(error["ctx"]["error"])
    raw = error.get("input")
    if kind == "literal_error":
        choices = typing.get_args(Config.model_fields[name].annotation)
        choices = typing.get_args(next((a for a in choices if typing.get_args(a)), None)) or \
            choices
        return f"{_flag(name)}: {raw!r} is not one of {', '.join(map(str, choices))}"
    if kind in _KINDS:
        return f"{_flag(name)}: {raw!r} is not {_KINDS[kind]}"
    return f"{_flag(name)}: {raw!r}: {error['msg']}"


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (tests pass their own)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Config, case_sensitive=False, env_prefix=ENV_PREFIX)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--kebab-case` flag per Config field, plus --config FILE. Unset flags stay None."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    for name, info in Config.model_fields.items():
        flag = _flag(name)
        env = ENV_PREFIX + name.upper()
        help_text = f"{info.description or ''} (default: {info.default}; env {env})"
        if info.annotation is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                                help=help_text)


def load(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Flags (`args`) over the environment over the `--config`/`IOTGW_CONFIG` file over the
    defaults; ConfigError (one line) for anything that does not fit."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(_read_file(Path(path)))
    values.update(_Environment(environ)())
    for name in Config.model_fields:
        flag_value = getattr(args, name, None) if args is not None else None
        if flag_value is not None:
            values[name] = flag_value
    unknown = set(values) - set(Config.model_fields)
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    return Config(**values)


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        try:
            path.open("rb").close()  # the reason, in the system's words
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        raise ConfigError(f"cannot read config file {path}: not a file")  # pragma: no cover
    try:
        data = TomlConfigSettingsSource(Config, toml_file=path).toml_data
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def parse(argv: Sequence[str] | None = None) -> Config:
    """Convenience for tests: build a Config from flags only (plus environment and file)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load(parser.parse_args(argv))
