"""The systemd unit shipped in deploy/systemd/ passes `systemd-analyze verify` (its directives
known, its command executable: pointed at this checkout's venv for the check)."""

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
