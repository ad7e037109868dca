"""`iotgw-load`: the command line.

    iotgw-load -f scenario.py -H mqtt://127.0.0.1:1883 -c 10000 -r 500 -d 60s --headless \\
               --csv out --html report.html --processes 2
    iotgw-load conn -H mqtt://127.0.0.1:1883 -c 20000 -r 2000 -I 1000
    iotgw-load pub  -c 100 -I 10 -t 'devices/%c/telemetry' -s 256 -q 1 -d 30s
    iotgw-load sub  -c 10 -t 'devices/+/telemetry' -q 0
    iotgw-load coap -H coap://127.0.0.1:5683 -c 100 -I 1000 -t '/telemetry/%c'

Settings come from flags, then IOTGW_LOAD_* variables, then a TOML file (--config FILE,
IOTGW_LOAD_CONFIG, or ./iotgw-load.toml), then defaults. See SHORT_FLAGS for the one short-flag
scheme shared by every command.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.runtime import Settings, UsageError, parse_host
from loadtest.wait import ScenarioError

SUBCOMMANDS = ("conn", "pub", "sub", "coap")
ENV_PREFIX = "IOTGW_LOAD_"
DEFAULT_CONFIG = "iotgw-load.toml"

SHORT_FLAGS = """\
short flags (one scheme for every command; each letter means one thing everywhere):
  -f FILE   scenario file           -H URL   host (mqtt://, mqtts://, coap://)
  -p PORT   port (overrides -H)     -c N     devices/clients (--users)
  -r R      spawn rate, per second  -i MS    ms between connects (= -r 1000/MS)
  -d TIME   run time (30s, 1h30m)   -n N     number of the first device (%i)
  -I MS     ms between messages per client (pub, coap; conn: pings)
  -t TOPIC  topic (pub, sub) or path (coap), with %i (number) and %c (client id)
  -s BYTES  payload size            -m TEXT  fixed payload instead of a stamped one
  -q QOS    MQTT QoS                -L N     messages per client, then stop (0: no limit)
  -F N      max inflight QoS 1/2 messages per connection
  -k SEC    keep-alive              -V 4|5   MQTT version (3.1.1 or 5.0)
  -U USER   user name               -P PASS  password
  -C TMPL   client id template (conn, pub, sub; %i)
  -h        help
  locust's -u/-t/-s (users, run time, stop timeout) and emqtt-bench's -h/-u (host, user) are
  not used: in this scheme they are -c, -d, --stop-timeout, -H and -U.
"""

EPILOG = (
    SHORT_FLAGS
    + """
subcommands (emqtt-bench style; `iotgw-load SUBCOMMAND -h` for their flags):
  conn   connect -c clients and hold them (-I MS: PINGREQ heartbeat every MS ms)
  pub    publish on an absolute schedule; overrun counts messages sent more than one interval
         (+1 ms timer resolution) late
  sub    subscribe and count (publish->receive latency from stamped payloads)
  coap   CoAP requests on an absolute schedule

settings: flag > IOTGW_LOAD_<NAME> variable (e.g. IOTGW_LOAD_USERS=100, IOTGW_LOAD_HOST=...) >
TOML file (--config, IOTGW_LOAD_CONFIG or ./iotgw-load.toml; top-level keys for every command,
tables [conn], [pub], [sub], [coap] for one) > default.

exit codes: 0 passed; 1 a --fail-on condition held (default: any failure or error);
2 usage or scenario error; 3 the run could not be carried out.
"""
)


# ---- durations -------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `1h30m`, `2m`, `500ms` -> seconds."""
    t = str(text).strip().lower()
    if not t:
        raise argparse.ArgumentTypeError("empty duration")
    try:
        return float(t)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for m in _DURATION.finditer(t):
        if m.start() != pos:
            break
        pos = m.end()
        total += float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m[2]]
    if pos != len(t) or pos == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 5m or 1h30m")
    return total


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def _qos(text: str) -> int:
    v = int(text)
    if v not in (0, 1, 2):
        raise argparse.ArgumentTypeError("QoS is 0, 1 or 2")
    return v


def _version(text: str) -> int:
    t = str(text).strip()
    if t in ("4", "3.1.1", "311"):
        return 4
    if t in ("5", "5.0"):
        return 5
    raise argparse.ArgumentTypeError("MQTT version is 4 (3.1.1) or 5 (5.0)")


def _float(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def _bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


# ---- parsers ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # exit code 2 with a short message, as argparse
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser, *, kind: str) -> None:
    bench = kind != "scenario"
    g = p.add_argument_group("target and devices")
    g.add_argument("-H", "--host", help="mqtt://HOST:PORT, mqtts://HOST:PORT or coap://HOST:PORT "
                   "(default mqtt://127.0.0.1:1883, or the scenario class's host)")
    g.add_argument("-p", "--port", type=int, help="port, overriding the one in --host")
    g.add_argument("-c", "--count", "--users", dest="count", type=_positive_int,
                   default=200 if bench else 1, help="number of simulated devices/clients "
                   "(default %(default)s)")
    g.add_argument("-r", "--spawn-rate", type=_float, default=100.0,
                   help="devices started per second, all processes together (default 100; "
                   "0: as fast as possible)")
    g.add_argument("-i", "--connect-interval", type=_float,
                   help="milliseconds between connects (emqtt-bench's -i; sets -r 1000/MS)")
    g.add_argument("-n", "--start-number", type=int, default=1,
                   help="number of the first device: %%i and the {n} of device ids (default 1)")
    g.add_argument("--source-ips", help="comma-separated local addresses to connect from, in "
                   "turn (127.0.0.1,127.0.0.2,...: more than ~28k connections to one port)")
    g = p.add_argument_group("MQTT")
    g.add_argument("-V", "--mqtt-version", type=_version, default=4,
                   help="4 (3.1.1, default) or 5 (5.0)")
    g.add_argument("-k", "--keepalive", type=_positive_int, default=300 if bench else 60,
                   help="keep-alive seconds (default %(default)s)")
    g.add_argument("-q", "--qos", type=_qos, default=1 if kind == "scenario" else 0,
                   help="QoS of publishes and subscriptions (default %(default)s)")
    g.add_argument("-U", "--username", help="user name (%%i and %%c are replaced)")
    g.add_argument("-P", "--password", help="password")
    g.add_argument("-F", "--inflight", type=_positive_int, default=64 if bench else 65535,
                   help="max unacknowledged QoS 1/2 publishes per connection "
                   "(default %(default)s)")
    g.add_argument("--cafile", help="CA bundle to verify the server (mqtts://)")
    g.add_argument("--certfile", help="client certificate (PEM) for mqtts://")
    g.add_argument("--keyfile", help="client key (PEM)")
    g.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    g.add_argument("--connect-timeout", type=_float, default=10.0,
                   help="seconds for TCP + CONNACK (default 10)")
    g.add_argument("--ack-timeout", type=_float, default=10.0,
                   help="seconds to wait for a PUBACK/SUBACK before it is a failure (default 10)")
    g = p.add_argument_group("CoAP")
    g.add_argument("--coap-token", help="access token sent as ?t= (%%i, %%c are replaced)")
    g.add_argument("--coap-timeout", type=_float, default=10.0,
                   help="seconds before a CoAP request without response fails (default 10)")
    g = p.add_argument_group("run")
    g.add_argument("-d", "--run-time", type=parse_duration,
                   help="stop after this long (30s, 5m, 1h30m); default: until Ctrl-C"
                   + (" or -L" if bench else ""))
    g.add_argument("--stop-timeout", type=_float, default=5.0,
                   help="seconds to wait for outstanding acknowledgements at the end (default 5)")
    g.add_argument("--headless", action="store_true",
                   help="no live display: one status line per second")
    g.add_argument("--csv", metavar="PREFIX",
                   help="write PREFIX_stats.csv, PREFIX_stats_history.csv, PREFIX_failures.csv")
    g.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    g.add_argument("--fail-on", metavar="CONDITIONS",
                   help='exit 1 when one holds, e.g. "p99>50ms,errors>0.1%%,rps<1000" '
                   "(default: errors>0)")
    g.add_argument("--kafka", metavar="HOST:PORT",
                   help="measure publish -> Kafka latency by consuming the telemetry topic")
    g.add_argument("--kafka-topic", default="iot.telemetry", help="(default iot.telemetry)")
    g.add_argument("--kafka-drain", type=_float, default=10.0,
                   help="seconds to wait for the last records in Kafka (default 10)")
    g.add_argument("--config", help="TOML settings file (default ./iotgw-load.toml if present)")
    g = p.add_argument_group("distribution")
    g.add_argument("--processes", type=_positive_int, default=0,
                   help="run N worker processes on this machine (one event loop each)")
    g.add_argument("--master", action="store_true",
                   help="coordinate workers started elsewhere with --worker")
    g.add_argument("--worker", action="store_true", help="take orders from a --master")
    g.add_argument("--master-host", default="127.0.0.1", help="(worker) the master's address")
    g.add_argument("--master-port", type=int, default=5557, help="(worker) the master's port")
    g.add_argument("--master-bind-host", default="127.0.0.1",
                   help="(master) address to listen on (default 127.0.0.1)")
    g.add_argument("--master-bind-port", type=int, default=5557,
                   help="(master) port to listen on (default 5557)")
    g.add_argument("--expect-workers", type=_positive_int, default=1,
                   help="(master) workers to wait for before starting (default 1)")
    g.add_argument("--expect-workers-max-wait", type=_float, default=60.0,
                   help="(master) seconds to wait for the workers; (worker) seconds to wait "
                   "for the master (default 60)")


def build_parser(kind: str) -> argparse.ArgumentParser:
    if kind == "scenario":
        p = _Parser(
            prog="iotgw-load",
            description="Simulate a fleet of MQTT/CoAP devices (locust-style scenario files or "
            "built-in profiles) and measure throughput, latency and errors.",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("classes", nargs="*", help="device classes to run (default: all)")
        g = p.add_argument_group("scenario")
        g.add_argument("-f", "--file", help="scenario file (device classes); without it, "
                       "--profile")
        g.add_argument("--profile", help="built-in profile: fleet (default for MQTT), coap "
                       "(default for coap://), heartbeat, telemetry, commands, shadow")
        g.add_argument("--list", action="store_true", help="list the device classes and exit")
        g.add_argument("--coap-host", help="coap://HOST:PORT for CoAP device classes when "
                       "--host is an MQTT URL")
        g.add_argument("--command-timeout", type=_float, default=10.0,
                       help="seconds for a device to answer a command (default 10)")
        _common(p, kind=kind)
        return p
    help_ = {
        "conn": "connect and hold clients",
        "pub": "publish on an absolute schedule",
        "sub": "subscribe and count",
        "coap": "CoAP requests on an absolute schedule",
    }[kind]
    p = _Parser(prog=f"iotgw-load {kind}", description=help_, epilog=SHORT_FLAGS,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group(kind)
    if kind in ("pub", "sub", "coap"):
        default_topic = {"pub": "iotgw-load/%i", "sub": "iotgw-load/#",
                         "coap": "/telemetry/%c"}[kind]
        g.add_argument("-t", "--topic", "--path", dest="topic", default=default_topic,
                       help=f"topic{' filter' if kind == 'sub' else ''}"
                       f"{' (CoAP path)' if kind == 'coap' else ''} with %%i/%%c "
                       f"(default {default_topic})")
    if kind in ("pub", "coap"):
        g.add_argument("-s", "--size", type=_positive_int, default=256,
                       help="payload bytes (default 256; 43 or more carry seq and timestamp)")
        g.add_argument("-m", "--message", help="fixed payload text")
        g.add_argument("-L", "--limit", type=_positive_int, default=0,
                       help="messages per client, then stop (default 0: no limit)")
        g.add_argument("--retain", action="store_true", help="retained publishes")
    if kind in ("pub", "coap", "conn"):
        g.add_argument("-I", "--interval", type=_float,
                       default=0.0 if kind == "conn" else 1000.0,
                       help="ms between messages of a client (default %(default)s"
                       + ("; conn: PINGREQ every MS, 0 = keep-alive only)" if kind == "conn"
                          else "; 0: as fast as the connection takes)"))
    if kind == "coap":
        g.add_argument("--method", default="POST", choices=["GET", "POST", "PUT", "PATCH",
                                                             "DELETE", "FETCH", "iPATCH"])
        g.add_argument("--non", action="store_true", help="NON requests instead of CON")
    if kind != "coap":
        g.add_argument("-C", "--client-id", help="client id template with %%i (default "
                       f"iotgw-load-{kind}-RUN-%%i)")
    _common(p, kind=kind)
    return p


# ---- settings from environment and file --------------------------------------------------------


def _config_values(parser: argparse.ArgumentParser, kind: str, argv: Sequence[str],
                   environ: dict[str, str]) -> dict[str, Any]:
    """Defaults from the TOML file and IOTGW_LOAD_* variables, converted by the flags' types."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "classes")}
    aliases: dict[str, str] = {}
    for a in actions.values():
        for opt in a.option_strings:
            if opt.startswith("--"):
                aliases[opt[2:].replace("-", "_")] = a.dest
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    path = known.config or environ.get(ENV_PREFIX + "CONFIG")
    raw: dict[str, Any] = {}
    if path or Path(DEFAULT_CONFIG).is_file():
        file = Path(path or DEFAULT_CONFIG)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"--config {file}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"--config {file}: {exc}") from None
        for key, value in data.items():
            if isinstance(value, dict):
                if key not in SUBCOMMANDS:
                    raise UsageError(f"{file}: unknown table [{key}] (tables: conn, pub, sub, "
                                     "coap)")
                continue
            raw[key] = (value, f"{file}: {key}")
        section = data.get(kind)
        if isinstance(section, dict):
            for key, value in section.items():
                raw[key] = (value, f"{file}: [{kind}] {key}")
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name != ENV_PREFIX + "CONFIG":
            raw[name[len(ENV_PREFIX):].lower()] = (value, name)
    out: dict[str, Any] = {}
    for key, (value, origin) in raw.items():
        if isinstance(value, list):  # source-ips = ["127.0.0.1", "127.0.0.2"]
            value = ",".join(map(str, value))
        dest = aliases.get(key.replace("-", "_"))
        if dest is None:
            if origin.startswith(ENV_PREFIX):
                continue  # a variable for another command
            raise UsageError(f"{origin}: unknown setting")
        action = actions[dest]
        try:
            if isinstance(action, argparse._StoreTrueAction):
                out[dest] = _bool(value)
            elif action.type is not None:
                out[dest] = action.type(value if isinstance(value, str) else str(value))  # type: ignore[operator]
            else:
                out[dest] = value
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise UsageError(f"{origin}: {value!r}: {exc}") from None
        if action.choices is not None and out[dest] not in action.choices:
            raise UsageError(f"{origin}: {value!r} is not one of {list(action.choices)}")
    return out


def parse_args(argv: Sequence[str], environ: dict[str, str] | None = None
               ) -> tuple[str, argparse.Namespace]:
    environ = dict(os.environ) if environ is None else environ
    kind = "scenario"
    args = list(argv)
    if args and args[0] in SUBCOMMANDS:
        kind = args.pop(0)
    parser = build_parser(kind)
    parser.set_defaults(**_config_values(parser, kind, args, environ))
    return kind, parser.parse_args(args)


# ---- from options to a run ---------------------------------------------------------------------


def make_settings(opts: argparse.Namespace, kind: str, default_host: str | None) -> Settings:
    host = opts.host or default_host or ("coap://127.0.0.1" if kind == "coap" else
                                        "mqtt://127.0.0.1")
    ep = parse_host(host, opts.port)
    if kind == "coap" and ep.scheme != "coap":
        raise UsageError(f"iotgw-load coap needs a coap:// host, not {host}")
    if kind in ("conn", "pub", "sub") and ep.scheme == "coap":
        raise UsageError(f"iotgw-load {kind} needs an mqtt:// or mqtts:// host, not {host}")
    s = Settings(
        mqtt_version=opts.mqtt_version,
        keepalive=opts.keepalive,
        qos=opts.qos,
        username=opts.username,
        password=opts.password,
        cafile=opts.cafile,
        certfile=opts.certfile,
        keyfile=opts.keyfile,
        insecure=opts.insecure,
        source_ips=[ip.strip() for ip in (opts.source_ips or "").split(",") if ip.strip()],
        connect_timeout=opts.connect_timeout,
        ack_timeout=opts.ack_timeout,
        max_inflight=max(1, opts.inflight),
        coap_token=opts.coap_token,
        coap_timeout=opts.coap_timeout,
        command_timeout=getattr(opts, "command_timeout", 10.0),
    )
    if ep.scheme == "coap":
        s.coap_host, s.coap_port = ep.host, ep.port
    else:
        s.mqtt_host, s.mqtt_port, s.tls = ep.host, ep.port, ep.scheme == "mqtts"
        s.coap_host = ep.host
    coap_host = getattr(opts, "coap_host", None)
    if coap_host:
        cep = parse_host(coap_host)
        if cep.scheme != "coap":
            raise UsageError(f"--coap-host {coap_host}: not a coap:// URL")
        s.coap_host, s.coap_port = cep.host, cep.port
    return s


def build_spec(kind: str, opts: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The run spec and a one-line description of the target."""
    if opts.connect_interval:
        opts.spawn_rate = 1000.0 / opts.connect_interval
    spec: dict[str, Any] = {"kind": kind, "users": opts.count, "spawn_rate": opts.spawn_rate,
                            "first_number": opts.start_number}
    default_host = None
    if kind == "scenario":
        from loadtest.driver import load_classes
        from loadtest.profiles import profile
        from loadtest.scenario import load_scenario

        if opts.file and opts.profile:
            raise UsageError("give -f FILE or --profile, not both")
        if opts.file:
            classes = load_scenario(opts.file)
        else:
            name = opts.profile or ("coap" if (opts.host or "").startswith("coap") else "fleet")
            classes = profile(name)
            opts.profile = name
        hosts = [c.host for c in classes if c.host]
        default_host = hosts[0] if hosts else None
        if opts.list:
            for c in classes:
                print(f"{c.__name__}  protocol={c.protocol} weight={c.weight} "
                      f"fixed_count={c.fixed_count} wait_time={c.wait!r} "
                      f"tasks={sorted({f.__name__ for f in c.task_list})}")
            raise SystemExit(0)
        spec["scenario"] = {"file": str(Path(opts.file).resolve()) if opts.file else None,
                            "profile": opts.profile, "classes": list(opts.classes)}
        spec["_classes"] = load_classes(spec)
    else:
        run_id = f"{random.randrange(1 << 16):04x}"
        spec["bench"] = {
            "client_id": opts.client_id or f"iotgw-load-{kind}-{run_id}-%i"
            if kind != "coap" else "coap-%i",
            "topic": getattr(opts, "topic", ""),
            "size": getattr(opts, "size", 0),
            "message": getattr(opts, "message", None),
            "qos": opts.qos,
            "interval_ms": getattr(opts, "interval", 0.0),
            "limit": getattr(opts, "limit", 0),
            "inflight": max(1, opts.inflight),
            "retain": getattr(opts, "retain", False),
            "method": getattr(opts, "method", "POST"),
            "confirmable": not getattr(opts, "non", False),
            "first_number": opts.start_number,
        }
    settings = make_settings(opts, kind, default_host)
    spec["settings"] = settings.to_dict()
    mqtt_url = f"{'mqtts' if settings.tls else 'mqtt'}://{settings.mqtt_host}:{settings.mqtt_port}"
    coap_url = f"coap://{settings.coap_host}:{settings.coap_port}"
    if kind == "coap":
        target = coap_url
    elif kind != "scenario":
        target = mqtt_url
    else:
        protocols = {c.protocol for c in spec["_classes"]}
        target = " + ".join(
            u for p, u in (("mqtt", mqtt_url), ("coap", coap_url)) if p in protocols
        )
    return spec, target


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "chaos":
        from loadtest.chaos import main as chaos_main

        return chaos_main(argv[1:])
    try:
        kind, opts = parse_args(argv)
    except UsageError as exc:
        print(f"iotgw-load: error: {exc}", file=sys.stderr)
        return 2
    from loadtest.app import run

    try:
        if opts.worker:
            return run_worker_cli(opts)
        spec, target = build_spec(kind, opts)
        return run(kind, opts, spec, target)
    except (UsageError, ScenarioError) as exc:
        print(f"iotgw-load: error: {exc}", file=sys.stderr)
        return 2


def run_worker_cli(opts: argparse.Namespace) -> int:
    import uvloop

    from loadtest.driver import run_worker

    if opts.file:
        from loadtest.scenario import load_scenario

        load_scenario(opts.file)  # report a broken file here, before the master starts us
    return int(uvloop.run(run_worker(opts.master_host, opts.master_port,
                                     str(Path(opts.file).resolve()) if opts.file else None,
                                     opts.expect_workers_max_wait)))


if __name__ == "__main__":
    raise SystemExit(main())
