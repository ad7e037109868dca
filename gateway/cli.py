"""`iotgw`: the gateway's command line."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import __version__, config
from gateway.auth import Hashed, parse_password_hash
from gateway.startup import StartupError, usable_dir


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iotgw", description=__doc__)
    parser.add_argument("--version", action="version", version=f"iotgw {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the gateway")
    config.add_arguments(run)

    devices = commands.add_parser("devices", help="manage the device registry")
    devices.add_argument("--data-dir", help="the gateway's data dir (default: as `iotgw run`)")
    devices.add_argument("--config", metavar="FILE", help="TOML file with settings")
    actions = devices.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a device (prints a generated password)")
    add.add_argument("device_id")
    add.add_argument("--password", help="use this password instead of a generated one")
    actions.add_parser("list", help="list registered devices (disabled ones are marked)")
    for action, text in (
        ("remove", "unregister a device (a connected one is disconnected)"),
        ("disable", "refuse a device's connections (a connected one is disconnected)"),
        ("enable", "let a disabled device connect again"),
    ):
        actions.add_parser(action, help=text).add_argument("device_id")
    imp = actions.add_parser(
        "import",
        help="register many devices, all or none: CSV with the header `id,password` (or "
        "`id,password_hash`: $pbkdf2-sha256$ITERATIONS$SALT$HASH, moved from another system "
        "without hashing again) or a JSON list of {id, password|password_hash}; missing "
        "passwords are generated and printed",
    )
    imp.add_argument("file", help="a .csv or .json file; `-` reads CSV from stdin")

    # REST API bearer tokens
    tokens = commands.add_parser("tokens", help="manage REST API bearer tokens")
    tokens.add_argument("--data-dir", help="the gateway's data dir (default: as `iotgw run`)")
    tokens.add_argument("--config", metavar="FILE", help="TOML file with settings")
    tk_actions = tokens.add_subparsers(dest="action", required=True)
    create = tk_actions.add_parser("create", help="make a token (it is printed once)")
    create.add_argument("--name", required=True, help="its name: the writer id of its writes")
    create.add_argument(
        "--scope", required=True,
        help="comma-separated: shadow:read, shadow:write, devices:read, devices:write, "
        "commands:write, admin",
    )
    tk_actions.add_parser("list", help="list tokens: names and scopes (secrets are not kept)")
    revoke = tk_actions.add_parser("revoke", help="revoke a token (at once, without a restart)")
    revoke.add_argument("name")

    telemetry = commands.add_parser("telemetry", help="read the embedded telemetry store")
    telemetry.add_argument("--data-dir", help="the gateway's data dir (default: as `iotgw run`)")
    telemetry.add_argument("--config", metavar="FILE", help="TOML file with settings")
    t_actions = telemetry.add_subparsers(dest="action", required=True)
    tail = t_actions.add_parser("tail", help="print the newest records as JSON lines")
    tail.add_argument("-n", "--lines", type=int, default=10, help="how many (default 10; 0: all)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    tail.add_argument(
        "--strict", action="store_true",
        help="exit 1 if any byte range had to be skipped (each is always reported on stderr)",
    )

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


def _read_devices(name: str) -> list[tuple[str, str | Hashed | None]]:
    """(id, password, ready hash or None) from a CSV file (header `id`, then `password` and/or
    `password_hash`) or a JSON file (a list of {"id", "password"} or {"id", "password_hash"});
    ValueError naming the file and line for anything else. None: generate a password."""
    import csv
    import io

    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {name}: {exc}") from None
    entries: list[tuple[str, str | Hashed | None]] = []

    def entry(where: str, device_id: object, password: object, hashed: object) -> None:
        if not isinstance(device_id, str) or not isinstance(password, str | None) or (
            not isinstance(hashed, str | None)
        ):
            raise ValueError(f"{name}: {where}: expected an id and a password or password_hash")
        if password and hashed:
            raise ValueError(f"{name}: {where}: give a password or a password_hash, not both")
        try:
            secret = parse_password_hash(hashed) if hashed else password or None
        except ValueError as exc:
            raise ValueError(f"{name}: {where}: {exc}") from None
        entries.append((device_id.strip(), secret))

    if name.lower().endswith(".json"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{name} is not JSON: {exc}") from None
        if not isinstance(doc, list):
            raise ValueError(f"{name}: expected a JSON list of {{\"id\", \"password\"}}")
        for i, item in enumerate(doc):
            if not isinstance(item, dict):
                raise ValueError(f"{name}: item {i}: expected an object")
            entry(f"item {i}", item.get("id"), item.get("password"), item.get("password_hash"))
        return entries
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader, [])]
    known = ("id", "password", "password_hash")
    if not header or header[0] != "id" or any(h not in known for h in header) or len(
        set(header)
    ) != len(header):
        raise ValueError(
            f"{name}: the first line must be a header: id, then password and/or password_hash"
        )
    for row in reader:
        if not row or not "".join(row).strip():
            continue
        if len(row) > len(header):
            raise ValueError(f"{name}: line {reader.line_num}: more fields than the header")
        fields = dict(zip(header, row, strict=False))
        entry(f"line {reader.line_num}", fields["id"], fields.get("password"),
              fields.get("password_hash"))
    return entries


def _import_devices(registry: Any, name: str) -> None:
    import os
    from concurrent.futures import ProcessPoolExecutor

    from gateway.auth import generate_password

    start = time.perf_counter()
    read = _read_devices(name)
    generated = {i for i, (_, p) in enumerate(read) if p is None}
    entries = [(d, p if p is not None else generate_password()) for d, p in read]
    to_hash = sum(1 for _, p in entries if isinstance(p, str))
    workers = os.cpu_count() or 1
    if to_hash >= 64 and workers > 1:  # PBKDF2 is the cost: one process per core
        with ProcessPoolExecutor(workers) as pool:
            count = registry.add_many(entries, pool)
    else:
        count = registry.add_many(entries)
    for i in sorted(generated):
        print(f"{entries[i][0]}\t{entries[i][1]}")
    took = time.perf_counter() - start
    rate = count / took if took > 0 else 0.0
    print(f"imported {count} devices in {took:.2f} s ({rate:.0f}/s)", file=sys.stderr)


def _said_where(cfg: config.Config) -> None:
    """Which data dir a command wrote to, on stderr (stdout stays what scripts read): one run
    from another directory would otherwise write a registry the gateway never reads."""
    print(f"iotgw: data dir {cfg.data_dir}", file=sys.stderr)


def _devices(args: argparse.Namespace, cfg: config.Config) -> int:
    from gateway.auth import DeviceRegistry, generate_password

    registry = DeviceRegistry(cfg.data_dir)
    if args.action == "add":
        password = args.password or generate_password()
        registry.add(args.device_id, password)
        print(f"{args.device_id}\t{password}" if not args.password else args.device_id)
        _said_where(cfg)
    elif args.action == "list":
        for device in registry.list():
            print(f"{device.device_id}\tdisabled" if device.disabled else device.device_id)
    elif args.action == "import":
        _import_devices(registry, args.file)
        _said_where(cfg)
    else:
        getattr(registry, args.action)(args.device_id)
    return 0


def _tokens(args: argparse.Namespace, cfg: config.Config) -> int:
    from datetime import UTC, datetime

    from gateway.tokens import TokenStore

    store = TokenStore(cfg.data_dir)
    if args.action == "create":
        print(store.create(args.name, args.scope))
        _said_where(cfg)
    elif args.action == "list":
        for t in store.list():
            created = datetime.fromtimestamp(t.created, UTC).isoformat(timespec="seconds")
            print(f"{t.name}\t{','.join(sorted(t.scopes))}\t{created}")
    else:
        store.revoke(args.name)
    return 0


def _record_json(record: Any) -> str:
    payload = record.payload
    try:
        shown: dict[str, str] = {"payload": payload.decode()}
    except UnicodeDecodeError:
        shown = {"payload_base64": base64.b64encode(payload).decode()}
    fields = {k: getattr(record, k) for k in ("device", "ts_ms", "seq", "kind", "protocol")}
    return json.dumps({**fields, "topic_or_path": record.topic_or_path, **shown})


def _telemetry_tail(args: argparse.Namespace, cfg: config.Config) -> int:
    from gateway.telemetry.filesink import Skipped, read_records

    root = Path(cfg.data_dir)
    # One store per gateway process: the data dir's own, and each `--workers` worker's.
    directories = [root / "telemetry", *sorted(root.glob("workers/*/telemetry"))]
    seen = dict.fromkeys(directories, 0)
    reported: set[Skipped] = set()
    tails: set[Skipped] = set()  # --follow: torn-looking tails seen once (maybe a write going on)
    fresh_tails: set[Skipped] = set()

    def warn(skipped: Skipped) -> None:
        """One stderr line per unreadable byte range, once. Following, a range at the very end
        of a segment may be a write in progress: it is reported when the next poll still
        finds it."""
        if skipped in reported:
            return
        if args.follow and skipped.offset + skipped.length >= _size(skipped.segment):
            fresh_tails.add(skipped)
            if skipped not in tails:
                return
        reported.add(skipped)
        print(
            f"iotgw telemetry tail: {skipped.segment}: skipped {skipped.length} unreadable bytes"
            f" at offset {skipped.offset} ({skipped.reason})",
            file=sys.stderr,
            flush=True,
        )

    def new_records() -> list[Any]:
        """What was appended to any store since the last call, oldest first."""
        fresh: list[Any] = []
        for d in directories:
            records = list(read_records(d, on_skip=warn)) if d.is_dir() else []
            fresh.extend(records[seen[d] :])
            seen[d] = len(records)
        tails.clear()
        tails.update(fresh_tails)
        fresh_tails.clear()
        return sorted(fresh, key=lambda r: r.ts_ms)

    records = new_records()
    for record in records[-args.lines :] if args.lines else records:
        print(_record_json(record), flush=True)
    while args.follow:  # segments are append-only: poll and print what is new
        time.sleep(0.5)
        for record in new_records():
            print(_record_json(record), flush=True)
    return 1 if args.strict and reported else 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "selfcheck":
        return _selfcheck()
    try:
        cfg = config.load(args)
        if args.command == "devices":
            return _devices(args, cfg)
        if args.command == "tokens":
            return _tokens(args, cfg)
        if args.command == "telemetry":
            return _telemetry_tail(args, cfg)
        from gateway.auth import DeviceRegistry

        usable_dir(Path(cfg.data_dir))  # a file, or not writable: said before anything opens it
        DeviceRegistry(cfg.data_dir).check()  # a corrupt registry is said plainly, at start
        from gateway.mqtt.acl import Acl

        Acl.from_config(cfg.acl, cfg.acl_file)  # a bad ACL file is a usage error, said plainly
        if cfg.kafka:
            from gateway.telemetry.kafkasink import compression_type, parse_topics

            compression_type(cfg.kafka_compression)
            parse_topics(cfg.kafka_topics)
    except (ValueError, StartupError) as exc:  # ConfigError, RegistryError, TokenError, ...
        print(f"iotgw: {exc}", file=sys.stderr)
        return 2
    from gateway import app

    try:
        app.run(cfg)
    except StartupError as exc:  # busy port, data dir in use or unusable, TLS files
        print(f"iotgw: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
