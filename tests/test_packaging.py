"""The package installs, its native codecs are built, and its console scripts exist."""

import importlib
import shutil
import subprocess
import sys


def test_native_codecs_are_importable() -> None:
    for name in ("gateway._native.mqtt", "gateway._native.coap", "gateway._native.envelope"):
        assert importlib.import_module(name).__file__.endswith(".so")


def test_console_scripts_are_installed() -> None:
    for script in ("iotgw", "iotgw-load"):
        assert shutil.which(script, path=str(__import__("pathlib").Path(sys.executable).parent))


def test_missing_extension_explains_how_to_build(tmp_path) -> None:
    # A copy of the package without compiled modules must say how to build them.
    src = __import__("pathlib").Path(importlib.import_module("gateway").__file__).parent
    dst = tmp_path / "gateway"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-c", "import gateway._native"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "pip install -e ." in proc.stderr


def test_shadow_model_is_compiled_and_its_source_runs_the_same_uncompiled(tmp_path) -> None:
    # setup.py compiles shadow/model.py with Cython; the .py stays the source and imports alone.
    compiled = importlib.import_module("shadow.model")
    assert compiled.__file__.endswith(".so")
    src = __import__("pathlib").Path(compiled.__file__).parent
    ignore = shutil.ignore_patterns("*.so", "*.c", "__pycache__")
    shutil.copytree(src, tmp_path / "shadow", ignore=ignore)
    script = (
        "import shadow.model as m\n"
        "assert m.__file__.endswith('.py'), m.__file__\n"
        "r = m.apply_update(None, {'state': {'desired': {'a': [1, 2.0]}, 'reported': {'a': 1}}},"
        " writer='w', ts_ms=1700000000123, seq=3)\n"
        "print(r.shadow.to_bytes().hex(), r.change.to_bytes().hex(), r.accepted, r.delta)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    r = compiled.apply_update(
        None, {"state": {"desired": {"a": [1, 2.0]}, "reported": {"a": 1}}},
        writer="w", ts_ms=1700000000123, seq=3,
    )  # fmt: skip
    expected = f"{r.shadow.to_bytes().hex()} {r.change.to_bytes().hex()} {r.accepted} {r.delta}"
    assert proc.stdout.strip() == expected
