"""The README's quick start, pasted as a new user would: its shell block is taken from README.md
and run by bash at the top of the repository against a fresh data dir. Only the ports change
(free ones instead of 1883/8080/5683, which other gateways on this machine may hold)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import free_port

ROOT = Path(__file__).parent.parent


def quick_start_block() -> str:
    """The first ```sh block of the "## Quick start" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no ```sh block in README's Quick start"
    return match.group(1)


def run_block(script: str, env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """bash runs it; the whole process group (the backgrounded gateway too) ends with it."""
    proc = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", script], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, out, err


def test_quick_start_commands_work_when_pasted(tmp_path: Path) -> None:
    block = quick_start_block()
    http, mqtt, coap = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    assert "localhost:8080" in block and "-p 1883" in block  # what gets substituted below
    script = block.replace("localhost:8080", f"localhost:{http}").replace(
        "-p 1883", f"-p {mqtt}")
    data = tmp_path / "data"
    env = {**os.environ, "IOTGW_DATA_DIR": str(data), "IOTGW_COAP_PORT": str(coap),
           "IOTGW_HTTP_PORT": str(http), "IOTGW_MQTT_PORT": str(mqtt)}
    # scripts/run.sh installs first when its build inputs changed (minutes); else seconds.
    code, out, err = run_block(script, env, timeout=600)
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"

    docs: list[Any] = [json.loads(line) for line in out.splitlines() if line.strip()]
    records = [d for d in docs if d.get("device") == "dev-1" and d.get("kind") == "telemetry"]
    assert [json.loads(r["payload"]) for r in records] == [{"t": 21.5}], out
    patched, got, command = docs[len(records):]
    assert patched["state"]["desired"] == {"fan": "on"}, patched
    assert got["state"]["desired"] == {"fan": "on"} and got["version"] == patched["version"]
    assert command["error"] == "device_offline", command  # documented: 404, nobody to send to
    # The data dir is said as an absolute path by the gateway and by `devices add`.
    lines = err.splitlines()
    assert lines.count(f"iotgw: data dir {data}") == 2, err  # devices add, tokens create
    assert any(line.endswith(f"INFO iotgw: data dir {data}") for line in lines), err  # run
    assert (data / "registry.sqlite").exists()


def test_the_default_data_dir_is_ignored_by_git() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "iotgw-data/registry.sqlite"],
                             cwd=ROOT)
    assert ignored.returncode == 0


def test_readme_links_stay_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT.resolve()) and path.exists(), target
    assert "shared/DESIGN.md" not in readme and "(../" not in readme


def test_run_script_starts_at_once_when_nothing_changed() -> None:
    """scripts/run.sh installs only when its build inputs changed (stamp in .venv): the second
    of two runs goes straight to `iotgw run`, silently."""
    for _ in range(2):
        started = time.monotonic()
        result = subprocess.run(["bash", "scripts/run.sh", "--help"], cwd=ROOT, text=True,
                                capture_output=True, timeout=600)
        took = time.monotonic() - started
        assert result.returncode == 0 and "usage: iotgw run" in result.stdout, result.stderr
    assert took < 5 and result.stderr == "", (took, result.stderr)
