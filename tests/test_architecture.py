"""Dependencies point one way: the MQTT room (gateway/mqtt/) defines what it needs of a cluster
(`ClusterLink`) and never imports gateway/cluster.py, not even for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

MQTT = Path(__file__).parent.parent / "gateway" / "mqtt"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_of_the_mqtt_room_imports_the_cluster() -> None:
    offenders = {
        path.name: sorted(n for n in _imports(path) if n.startswith("gateway.cluster"))
        for path in sorted(MQTT.glob("*.py"))
    }
    assert {name: found for name, found in offenders.items() if found} == {}
    assert len(offenders) >= 8  # the room's modules were found



def test_the_channel_does_no_io_and_knows_no_telemetry_or_shadows() -> None:
    """The protocol state machine: no sockets, no asyncio, and what a PUBLISH means to
    telemetry or shadows is theirs (interceptors registered by app.py)."""
    found = _imports(MQTT / "channel.py")
    forbidden = ("asyncio", "socket", "ssl", "gateway.telemetry", "gateway.shadows", "uvloop")
    assert sorted(n for n in found if n.split(".")[0] in forbidden or n.startswith(forbidden)) == []
    for path in sorted(MQTT.glob("*.py")):
        assert not any(
            n.startswith(("gateway.telemetry", "gateway.shadows")) for n in _imports(path)
        ), path.name


def test_transports_hold_no_protocol_state() -> None:
    """The TCP/TLS transport keeps its transport, framer and closing state only: what it sets
    on itself is that short list (anything of the protocol belongs to the channel)."""
    tree = ast.parse((MQTT / "connection.py").read_text())
    assigned = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and isinstance(node.ctx, ast.Store)
    }
    assert assigned == {
        "broker", "framer", "transport", "channel", "_draining", "_discard", "_writing_paused",
    }
