"""Every setting is a flag, an IOTGW_* variable and a TOML key, with flag > env > file > default."""

from pathlib import Path

import pytest

from gateway import config


def test_defaults_bind_loopback_with_embedded_stores() -> None:
    cfg = config.load(None, environ={})
    assert (cfg.bind, cfg.mqtt_port, cfg.redis, cfg.kafka) == ("127.0.0.1", 1883, None, None)
    assert cfg.allow_anonymous is False and cfg.acl == "device"


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    toml = tmp_path / "iotgw.toml"
    toml.write_text('mqtt-port = 1000\ncoap_port = 1001\nhttp_port = 1002\nacl = "open"\n')
    parser = __import__("argparse").ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--config", str(toml), "--mqtt-port", "3000"])
    cfg = config.load(args, environ={"IOTGW_MQTT_PORT": "2000", "IOTGW_COAP_PORT": "2001"})
    assert (cfg.mqtt_port, cfg.coap_port, cfg.http_port, cfg.acl) == (3000, 2001, 1002, "open")


def test_boolean_flags_and_variables() -> None:
    assert config.parse(["--allow-anonymous"]).allow_anonymous is True
    assert config.load(None, environ={"IOTGW_ALLOW_ANONYMOUS": "yes"}).allow_anonymous is True
    assert config.load(None, environ={"IOTGW_ALLOW_ANONYMOUS": "off"}).allow_anonymous is False


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"IOTGW_MQTT_PORT": "eighty"}, "--mqtt-port: 'eighty' is not an integer"),
        ({"IOTGW_ACL": "closed"}, "--acl: 'closed' is not one of device, open"),
        ({"IOTGW_ALLOW_ANONYMOUS": "maybe"}, "not a boolean"),
        ({"IOTGW_WORKERS": "0"}, "--workers: 0 is not a number of processes"),
        ({"IOTGW_WORKERS": "2"}, "need --redis"),
        ({"IOTGW_CLUSTER": "1"}, "need --redis"),
        ({"IOTGW_WORKERS": "2", "IOTGW_REDIS": "redis://r", "IOTGW_MQTT_PORT": "0"},
         "share their ports"),
        ({"IOTGW_COAP_PORT": "-2"}, "--coap-port: -2 is not a port"),
        ({"IOTGW_DTLS_PSK": "1", "IOTGW_COAP_PORT": "7000", "IOTGW_COAPS_PORT": "7000"},
         "--coaps-port: port 7000 is also --coap-port's"),
        ({"IOTGW_DTLS_PSK": "1", "IOTGW_DTLS_MAX_SESSIONS": "0"}, "must be above 0"),
        ({"IOTGW_WSS_PORT": "8884"}, "--wss-port needs --tls-cert"),
        ({"IOTGW_WS_PORT": "1883"}, "--ws-port: port 1883 is also --mqtt-port's"),
        ({"IOTGW_WS_PORT": "70000"}, "--ws-port: 70000 is not a port"),
        ({"IOTGW_WS_HANDSHAKE_TIMEOUT": "0"}, "--ws-handshake-timeout: 0 is not"),
    ],
)
def test_bad_values_are_named_in_the_error(environ: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, environ=environ)


def test_unknown_file_keys_and_bad_toml_are_errors(tmp_path: Path) -> None:
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("mqtt_prot = 1\n")
    with pytest.raises(config.ConfigError, match="unknown settings: mqtt_prot"):
        config.load(None, environ={"IOTGW_CONFIG": str(bad_key)})
    bad_toml = tmp_path / "b.toml"
    bad_toml.write_text("mqtt_port = = 1\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(None, environ={"IOTGW_CONFIG": str(bad_toml)})
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(None, environ={"IOTGW_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--acl-file", "/nonexistent/acl.toml"], "ACL file"),
        (["--kafka", "127.0.0.1:9", "--kafka-topics", "nonsense"], "kind=topic"),
        (["--kafka", "127.0.0.1:9", "--kafka-compression", "zstd"], "zstd"),
    ],
)
def test_bad_settings_stop_run_with_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    assert main(["run", "--data-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iotgw: ") and message in err and "Traceback" not in err


def test_coaps_is_on_with_dtls_credentials_and_plain_coap_can_be_off() -> None:
    assert not config.load(None, environ={}).coaps
    assert config.load(None, environ={"IOTGW_DTLS_PSK": "1"}).coaps
    assert config.parse(["--tls-cert", "c.pem", "--tls-client-ca", "ca.pem"]).coaps
    assert not config.parse(["--tls-cert", "c.pem"]).coaps  # no device credential for DTLS
    assert config.parse(["--coap-port", "0"]).coap_port == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("mqtt_port = true", "--mqtt-port: True is not an integer"),
        ("max_packet_size = 1.5", "--max-packet-size: 1.5 is not an integer"),
        ("bind = 5", "--bind: 5 is not a string"),
        ('log-level = "loud"', "--log-level: 'loud' is not one of"),
    ],
)
def test_file_values_of_the_wrong_kind_are_named(
    tmp_path: Path, line: str, message: str
) -> None:
    toml = tmp_path / "iotgw.toml"
    toml.write_text(line + "\n")
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, environ={"IOTGW_CONFIG": str(toml)})


def test_a_config_built_directly_is_checked_the_same_way() -> None:
    with pytest.raises(config.ConfigError, match="--coap-port: 70000 is not a port"):
        config.Config(coap_port=70000)
    with pytest.raises(config.ConfigError, match="--workers: 'two' is not an integer"):
        config.Config(workers="two")
