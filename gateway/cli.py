"""`iotgw`: the gateway's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import __version__, config


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iotgw", description=__doc__)
    parser.add_argument("--version", action="version", version=f"iotgw {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the gateway")
    config.add_arguments(run)
    commands.add_parser("selfcheck", help="check that the native codecs are built and work")
    return parser


def _selfcheck() -> int:
    from gateway._native import coap, mqtt

    frame = mqtt.encode_publish("devices/d1/telemetry", b"{}", qos=1, packet_id=1)
    packet = mqtt.decode(frame, version=4)
    datagram = coap.encode_request(coap.CON, coap.POST, 1, b"t", "telemetry/d1", payload=b"{}")
    message = coap.decode(datagram)
    print(f"mqtt: {packet!r}\ncoap: {message!r}\nnative codecs OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "selfcheck":
        return _selfcheck()
    try:
        cfg = config.load(args)
    except config.ConfigError as exc:
        print(f"iotgw: {exc}", file=sys.stderr)
        return 2
    # The MQTT, CoAP and HTTP servers are not built yet (issues 3-5); say so instead of pretending.
    print(
        "iotgw: this build has the native MQTT and CoAP codecs but no servers yet; "
        f"nothing to serve on {cfg.bind}:{cfg.mqtt_port}. Try `iotgw selfcheck`.",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":
    sys.exit(main())
