"""`iotgw`: the gateway's command line."""

from __future__ import annotations

import argparse
import base64
import contextlib
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
    add.add_argument(
        "--psk", nargs="?", const="", metavar="KEY",
        help="a DTLS pre-shared key for coaps (the PSK identity is the device id; KEY is text, "
        "as `coap-client -k KEY` takes it); --psk alone generates one and prints it once",
    )
    psk = actions.add_parser(
        "psk", help="give a device a new DTLS pre-shared key (its coaps sessions end)"
    )
    psk.add_argument("device_id")
    psk.add_argument("key", nargs="?", help="the key (text); without it one is generated "
                     "and printed once")
    psk.add_argument("--none", action="store_true", help="take the device's key away")
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
    tail.add_argument(
        "--kafka", dest="tail_kafka", metavar="HOST:PORT",
        help="read Kafka instead, as a member of a consumer group (from the group's committed "
        "offsets; only processed records are committed, rebalances keep per-partition order); "
        "without -f it stops once nothing came for 2 s",
    )
    tail.add_argument("--group", default="iotgw-telemetry-tail",
                      help="(--kafka) the consumer group (default iotgw-telemetry-tail)")
    tail.add_argument("--topics", default="iot.telemetry,iot.events,iot.shadow,iot.commands",
                      help="(--kafka) comma-separated topics (default: the gateway's four)")

    _add_admin_commands(commands)
    commands.add_parser("selfcheck", help="check that the native codecs are built and work")
    return parser


def _add_admin_commands(commands: Any) -> None:
    """`iotgw clients|bans|retained`: the admin API of a running gateway (gateway/admin.py)."""

    def remote(name: str, text: str) -> Any:
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("--url", help="the gateway's REST API (default: http://127.0.0.1 on "
                         "the --http-port of the settings, as `iotgw run`)")
        cmd.add_argument("--token", help="an admin token (default: IOTGW_ADMIN_TOKEN, else "
                         "the bootstrap --api-token of the settings)")
        cmd.add_argument("--config", metavar="FILE", help="TOML file with settings")
        return cmd.add_subparsers(dest="action", required=True)

    clients = remote("clients", "connected MQTT clients of a running gateway (of every node "
                     "of a cluster)")
    ls = clients.add_parser("list", help="client id, protocol, peer, keep-alive, "
                            "subscriptions, in flight, queued, node (exit 1: a cluster node "
                            "did not answer)")
    ls.add_argument("--prefix", default="", help="only client ids starting with this")
    kick = clients.add_parser("kick", help="disconnect a client")
    kick.add_argument("client_id")
    kick.add_argument("--discard-session", action="store_true", help="end its session too")
    show = clients.add_parser("show", help="inspect a session (online or persistent)")
    show.add_argument("client_id")

    bans = remote("bans", "ban client ids and source addresses (MQTT, CoAP)")
    add = bans.add_parser("add", help="ban, and kick the clients it matches")
    remove = bans.add_parser("remove", help="lift a ban")
    for cmd in (add, remove):
        which = cmd.add_mutually_exclusive_group(required=True)
        which.add_argument("--client-id")
        which.add_argument("--address", help="an IP address")
    add.add_argument("--for", dest="seconds", type=float, metavar="SECONDS",
                     help="how long (default: until removed)")
    add.add_argument("--reason", default="")
    bans.add_parser("list", help="the bans in force")

    retained = remote("retained", "retained MQTT messages")
    rl = retained.add_parser("list", help="topic, size, QoS")
    rl.add_argument("--prefix", default="", help="only topics starting with this")
    rm = retained.add_parser("rm", help="delete a topic's retained message")
    rm.add_argument("topic")


class RemoteError(Exception):
    """The gateway said no, or did not answer: one line for the operator."""


def _remote(args: argparse.Namespace, cfg: config.Config) -> int:
    """`iotgw clients|bans|retained`: one REST call (several for a paged list) per command."""
    import os
    import urllib.error
    import urllib.parse
    import urllib.request

    url = (args.url or f"http://127.0.0.1:{cfg.http_port}").rstrip("/")
    token = args.token or os.environ.get("IOTGW_ADMIN_TOKEN") or cfg.api_token
    if not token:
        raise ValueError("give an admin token: --token, IOTGW_ADMIN_TOKEN or --api-token "
                         "(`iotgw tokens create --name ops --scope admin` makes one)")

    def call(method: str, path: str, body: object = None, **query: Any) -> Any:
        params = {k: v for k, v in query.items() if v is not None}
        full = f"{url}/v1/admin{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        request = urllib.request.Request(
            full, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail")
            except ValueError:
                detail = exc.reason
            raise RemoteError(f"{method} {full}: {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"no gateway answers at {url} ({reason}): is it running? "
                              "(--url)") from None
        return json.loads(data) if data else None

    incomplete: set[str] = set()  # cluster nodes that did not answer (the list lacks theirs)

    def paged(path: str, key: str, **query: Any) -> list[Any]:
        items: list[Any] = []
        after = None
        while True:
            page = call("GET", path, after=after, limit=1000, **query)
            items.extend(page[key])
            incomplete.update(page.get("incomplete", ()))
            after = page["next"]
            if after is None:
                return items

    quote = urllib.parse.quote
    if args.command == "clients":
        if args.action == "list":
            rows = paged("/clients", "clients", prefix=args.prefix)
            print("\t".join(("client_id", "protocol", "peer", "keep_alive", "subscriptions",
                             "inflight", "queued", "node")))
            for c in rows:
                print(f"{c['client_id']}	{c['protocol']}	{c['peer']}	{c['keep_alive']}	"
                      f"{c['subscriptions']}	{c['inflight']}	{c['queued']}	{c['node']}")
            if incomplete:
                print(f"iotgw: incomplete: cluster nodes {', '.join(sorted(incomplete))} did "
                      "not answer in time (their clients are missing)", file=sys.stderr)
                return 1
        elif args.action == "kick":
            call("DELETE", f"/clients/{quote(args.client_id, safe='')}",
                 discard_session="true" if args.discard_session else None)
            print(f"kicked {args.client_id}")
        else:
            print(json.dumps(call("GET", f"/sessions/{quote(args.client_id, safe='')}"),
                             indent=2))
    elif args.command == "bans":
        if args.action == "list":
            print("kind	value	until	reason")
            for b in call("GET", "/bans")["bans"]:
                until = "-" if b["until"] is None else time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(b["until"]))
                print(f"{b['kind']}	{b['value']}	{until}	{b['reason']}")
        else:
            kind, value = (("client_id", args.client_id) if args.client_id is not None
                           else ("address", args.address))
            if args.action == "add":
                call("POST", "/bans", {"kind": kind, "value": value, "seconds": args.seconds,
                                       "reason": args.reason})
                print(f"banned {kind} {value}")
            else:
                call("DELETE", f"/bans/{kind}/{quote(value, safe='')}")
                print(f"unbanned {kind} {value}")
    elif args.action == "list":
        print("topic	bytes	qos")
        for r in paged("/retained", "retained", prefix=args.prefix):
            print(f"{r['topic']}	{r['bytes']}	{r['qos']}")
    else:
        call("DELETE", "/retained", topic=args.topic)
        print(f"deleted the retained message of {args.topic}")
    return 0


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
    from gateway.auth import DeviceRegistry, generate_password, generate_psk

    registry = DeviceRegistry(cfg.data_dir)
    if args.action == "add":
        password = args.password or generate_password()
        psk = args.psk if args.psk != "" else generate_psk()
        registry.add(args.device_id, password, psk)
        print(f"{args.device_id}\t{password}" if not args.password else args.device_id)
        if args.psk == "":
            print(f"psk\t{psk}")
        _said_where(cfg)
    elif args.action == "psk":
        if args.none and args.key:
            raise ValueError("give a key or --none, not both")
        key = None if args.none else args.key or generate_psk()
        registry.set_psk(args.device_id, key)
        if key is not None and not args.key:
            print(f"psk\t{key}")
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


def _kafka_tail(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.telemetry.kafkatail import KafkaTail

    host, _, port = args.tail_kafka.rpartition(":")
    if not host or not port.isdigit():
        raise config.ConfigError(f"--kafka: {args.tail_kafka!r} is not host:port")

    async def main() -> None:
        stop = asyncio.Event()
        last = [time.monotonic()]

        def show(record: Any, msg: Any) -> None:
            last[0] = time.monotonic()
            print(_record_json(record), flush=True)

        tail = KafkaTail(args.tail_kafka, [t for t in args.topics.split(",") if t.strip()],
                         args.group, show)
        task = asyncio.create_task(tail.run(stop))
        while not task.done():
            await asyncio.sleep(0.2)
            if not args.follow and time.monotonic() - last[0] > 2.0:
                stop.set()
        await task

    with contextlib.suppress(KeyboardInterrupt):  # ^C ends --follow
        asyncio.run(main())
    return 0


def _telemetry_tail(args: argparse.Namespace, cfg: config.Config) -> int:
    if args.tail_kafka:
        return _kafka_tail(args)
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
        if args.command in ("clients", "bans", "retained"):
            return _remote(args, cfg)
        from gateway.auth import DeviceRegistry

        usable_dir(Path(cfg.data_dir))  # a file, or not writable: said before anything opens it
        DeviceRegistry(cfg.data_dir).check()  # a corrupt registry is said plainly, at start
        from gateway.mqtt.acl import Acl

        Acl.from_config(cfg.acl, cfg.acl_file)  # a bad ACL file is a usage error, said plainly
        if cfg.kafka:
            from gateway.telemetry.kafkasink import compression_type, parse_topics

            compression_type(cfg.kafka_compression)
            parse_topics(cfg.kafka_topics)
    except (ValueError, StartupError, RemoteError) as exc:  # ConfigError, RegistryError, ...
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
