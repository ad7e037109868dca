"""The package installs, its native codecs are built, and its console scripts exist."""

import importlib
import shutil
import subprocess
import sys


def test_native_codecs_are_importable() -> None:
    for name in ("gateway._native.mqtt", "gateway._native.coap"):
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
