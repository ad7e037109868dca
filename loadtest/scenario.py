"""Loading scenario files (the locustfile of iotgw-load) and sharing devices out among classes."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from loadtest.device import Device
from loadtest.wait import ScenarioError

__all__ = ["ScenarioError", "assign_classes", "load_scenario", "select_classes"]

_loaded = 0


def _where(path: Path, exc: BaseException) -> str:
    """`file:line` of the innermost frame of `exc` that is in the scenario file."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path:
            line = frame.lineno
    return f"{path}:{line}" if line else str(path)


def load_scenario(filename: str | Path) -> list[type[Device]]:
    """Import a scenario file and return its concrete device classes, checked.

    Raises ScenarioError with a message that names the file, the line and the problem: missing
    file, syntax error, an exception while importing, no device class, a bad wait_time, weight
    or task."""
    global _loaded
    path = Path(filename).expanduser().resolve()
    if not path.is_file():
        raise ScenarioError(f"scenario file {filename} does not exist")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario file {filename}: {exc}") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        text = (exc.text or "").rstrip("\n")
        caret = ""
        if text and exc.offset:
            caret = "\n    " + " " * (exc.offset - 1 - (len(text) - len(text.lstrip()))) + "^"
        detail = f"\n    {text.strip()}{caret}" if text else ""
        raise ScenarioError(f"{path}:{exc.lineno}: syntax error: {exc.msg}{detail}") from None
    _loaded += 1
    module_name = f"iotgw_scenario_{_loaded}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    parent = str(path.parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)
    try:
        exec(code, module.__dict__)
    except ScenarioError as exc:
        raise ScenarioError(f"{_where(path, exc)}: {exc}") from None
    except Exception as exc:
        raise ScenarioError(
            f"{_where(path, exc)}: importing the scenario failed: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        if added:
            sys.path.remove(parent)
    classes = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Device) and not obj.abstract
    ]
    if not classes:
        raise ScenarioError(
            f"{path}: no device class: define a subclass of MqttDevice or CoapDevice "
            "(from loadtest import MqttDevice, task, between)"
        )
    for cls in classes:
        try:
            cls.prepare()
        except ScenarioError as exc:
            raise ScenarioError(f"{path}: {exc}") from None
    return classes


def select_classes(classes: list[type[Device]], names: Sequence[str]) -> list[type[Device]]:
    """Keep the classes named on the command line (all when none are named)."""
    if not names:
        return classes
    by_name = {c.__name__: c for c in classes}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ScenarioError(
            f"unknown device class {', '.join(unknown)}; the scenario has {', '.join(by_name)}"
        )
    return [by_name[n] for n in names]


def assign_classes(classes: Sequence[type[Device]], users: int) -> list[type[Device]]:
    """The class of each of `users` devices, by global index: `fixed_count` devices of the
    classes that set it, the rest shared by `weight` in an interleaved, deterministic order
    (smooth weighted round robin), so every process spawns the same mix."""
    fixed = [c for c in classes if c.fixed_count]
    weighted = [c for c in classes if not c.fixed_count and c.weight > 0]
    out: list[type[Device]] = []
    # fixed ones first, interleaved
    remaining = {c: c.fixed_count for c in fixed}
    while remaining and len(out) < users:
        for c in list(remaining):
            if len(out) >= users:
                break
            out.append(c)
            remaining[c] -= 1
            if remaining[c] == 0:
                del remaining[c]
    rest = users - len(out)
    if rest > 0:
        if not weighted:
            if fixed:
                return out
            raise ScenarioError("every device class has weight 0")
        total = sum(c.weight for c in weighted)
        current = dict.fromkeys(weighted, 0)
        for _ in range(rest):
            for c in weighted:
                current[c] += c.weight
            pick = max(weighted, key=lambda c: current[c])
            current[pick] -= total
            out.append(pick)
    return out
