"""/docs and /redoc render without internet: a real headless Chromium (Debian's `chromium`,
installed by scripts/test.sh) loads them from a gateway on loopback with every other host name
unresolvable, and every operation of the OpenAPI document must be rendered."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest


def chromium_dom(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran (virtual time: waits for loads, not the clock).
    Name resolution fails for everything but 127.0.0.1: a CDN cannot be reached."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: scripts/test.sh installs it")
    result = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def operation_ids(http_port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/openapi.json", timeout=5) as r:
        schema: dict[str, Any] = json.load(r)
    return [op["operationId"] for path in schema["paths"].values() for op in path.values()]


@pytest.fixture
def http_port(gateway_factory: Any) -> int:
    gw = gateway_factory(api_token="t0")
    port: int = gw.gateway.http.port
    return port


def test_swagger_ui_renders_every_operation_offline(http_port: int, tmp_path: Path) -> None:
    dom = chromium_dom(f"http://127.0.0.1:{http_port}/docs", tmp_path / "profile")
    rendered = set(re.findall(r'id="operations-[^"-]+-([^"]+)"', dom))
    expected = operation_ids(http_port)
    assert len(expected) >= 10 and rendered >= set(expected), sorted(set(expected) - rendered)


def test_redoc_renders_every_operation_offline(http_port: int, tmp_path: Path) -> None:
    dom = chromium_dom(f"http://127.0.0.1:{http_port}/redoc", tmp_path / "profile")
    rendered = set(re.findall(r'data-section-id="operation/([^"]+)"', dom))
    expected = operation_ids(http_port)
    assert rendered >= set(expected), sorted(set(expected) - rendered)


def test_docs_pages_reference_no_other_host(http_port: int) -> None:
    for page in ("/docs", "/redoc"):
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{page}", timeout=5) as r:
            html = r.read().decode()
        assert not re.search(r"https?://", html), (page, html)
