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

