"""Packaging: the systemd unit shipped in deploy/systemd/ passes `systemd-analyze verify` (its
directives known, its command executable: pointed at this checkout's venv for the check), and
the Dockerfile's final stage runs as it says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "deploy" / "systemd" / "iotgw.service"


def test_systemd_unit_verifies_cleanly(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: scripts/test.sh installs systemd")
    text = UNIT.read_text()
    assert "ExecStart=/opt/iotgw/.venv/bin/iotgw run" in text
    unit = tmp_path / "iotgw.service"
    unit.write_text(text.replace("/opt/iotgw/.venv/bin/iotgw", str(ROOT / ".venv/bin/iotgw")))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "iotgw.service" not in result.stdout + result.stderr, (
        result.stdout + result.stderr)


DOCKERFILE = ROOT / "Dockerfile"


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        logical += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if line.endswith("\\"):
            continue
        instruction, _, args = logical.partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def test_dockerfile_image_runs_as_its_instructions_say(tmp_path: Path) -> None:
    """No container engine runs here (the image is not built): this holds the Dockerfile to its
    design (two stages, the venv copied from the build stage, a non-root user, the data dir a
    volume, the default ports exposed) and runs what its final stage says (ENV, ENTRYPOINT +
    CMD, HEALTHCHECK) with this checkout's venv standing for /opt/iotgw: the gateway must start
    on those variables, pass the health check, keep its data in the volume, and stop cleanly on
    SIGTERM (what `docker stop` sends)."""
    import json
    import os
    import signal
    import sys
    import time

    from conftest import free_port

    from gateway.config import Config

    stages = _dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: the compiler stays out of the image"
    final = dict(stages[-1])  # the last of each instruction counts, as in Docker
    copies = [args for instruction, args in stages[-1] if instruction == "COPY"]
    assert any(c.startswith("--from=") and "/opt/iotgw" in c for c in copies)
    assert final["USER"] not in ("root", "0"), "the gateway must not run as root"
    env = dict(pair.split("=", 1) for pair in final["ENV"].split())
    assert final["VOLUME"] == env["IOTGW_DATA_DIR"], "the data dir is the volume"
    defaults = Config()
    exposed = {p.split("/")[0] for p in final["EXPOSE"].split()}
    assert exposed == {str(defaults.mqtt_port), str(defaults.mqtts_port),
                       str(defaults.http_port), str(defaults.coap_port)}

    venv_bin = str(Path(sys.executable).parent)
    data = tmp_path / "volume"
    data.mkdir()
    http = free_port()
    run_env = {
        **{k: v.replace("/opt/iotgw/bin", venv_bin) for k, v in env.items()},
        "PATH": env["PATH"].replace("/opt/iotgw/bin", venv_bin).replace("$PATH",
                                                                        os.environ["PATH"]),
        "IOTGW_DATA_DIR": str(data),
        "IOTGW_BIND": "127.0.0.1",  # servers started here listen on loopback only
        "IOTGW_MQTT_PORT": str(free_port()),
        "IOTGW_HTTP_PORT": str(http),
        "IOTGW_COAP_PORT": str(free_port(__import__("socket").SOCK_DGRAM)),
    }
    command = json.loads(final["ENTRYPOINT"]) + json.loads(final["CMD"])
    health = json.loads(final["HEALTHCHECK"].split(" CMD ", 1)[1])
    proc = subprocess.Popen(command, env=run_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            check = subprocess.run(health, env=run_env, capture_output=True, timeout=10)
            if check.returncode == 0:
                break
            assert time.monotonic() < deadline, check.stderr.decode()
            time.sleep(0.2)
        assert (data / "registry.sqlite").exists(), sorted(p.name for p in data.iterdir())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stopped = subprocess.run(health, env=run_env, capture_output=True, timeout=10)
        assert stopped.returncode != 0, "the health check fails once the gateway is gone"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
