"""Scenario files: loading errors are reported clearly with a non-zero exit, and the device
life cycle (on_start, async tasks, StopDevice, on_stop) works against Mosquitto."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from test_loadtest_mqtt import Subscriber, count, iotgw_load, stats_csv

BROKEN = {
    "syntax": (
        """
        from loadtest import MqttDevice, task, constant

        class Broken(MqttDevice):
            wait_time = constant(1)
            @task
            def t(self)
                pass
        """,
        r"broken\.py:7: syntax error",
    ),
    "no_class": (
        """
        import random
        WAIT = 5
        """,
        r"no device class: define a subclass of MqttDevice or CoapDevice",
    ),
    "bad_between": (
        """
        from loadtest import MqttDevice, task, between

        class Thermo(MqttDevice):
            wait_time = between(5, 1)

            @task
            def t(self):
                pass
        """,
        r"broken\.py:5: between\(5, 1\): high is smaller than low",
    ),
    "not_a_wait_time": (
        """
        from loadtest import MqttDevice, task

        class Thermo(MqttDevice):
            wait_time = "fast"

            @task
            def t(self):
                pass
        """,
        r"Thermo\.wait_time = 'fast' is not a wait time",
    ),
    "tasks_without_wait_time": (
        """
        from loadtest import MqttDevice, task

        class Thermo(MqttDevice):
            @task
            def t(self):
                pass
        """,
        r"Thermo has tasks but no wait_time",
    ),
    "import_error": (
        """
        import no_such_module_here
        """,
        r"broken\.py:2: importing the scenario failed: ModuleNotFoundError",
    ),
    "bad_weight": (
        """
        from loadtest import MqttDevice

        class Thermo(MqttDevice):
            weight = -2
        """,
        r"Thermo\.weight = -2: must be an int >= 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_scenario_files_are_reported_with_exit_code_2(tmp_path: Path, case: str) -> None:
    source, message = BROKEN[case]
    path = tmp_path / "broken.py"
    path.write_text("\n" + textwrap.dedent(source).lstrip("\n"))  # line 1 is empty
    result = iotgw_load(tmp_path, "-f", str(path), "-c", "1", "-d", "1s", "--headless")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_a_missing_scenario_file_and_an_unknown_class_are_usage_errors(tmp_path: Path) -> None:
    missing = iotgw_load(tmp_path, "-f", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    thermostat = str(Path(__file__).parent / "scenarios" / "thermostat.py")
    unknown = iotgw_load(tmp_path, "-f", thermostat, "Boiler")
    assert unknown.returncode == 2
    assert "unknown device class Boiler; the scenario has Thermostat, Meter" in unknown.stderr
    listed = iotgw_load(tmp_path, "-f", thermostat, "--list")
    assert listed.returncode == 0
    assert "Thermostat  protocol=mqtt weight=3" in listed.stdout
    assert "Meter  protocol=mqtt weight=1 fixed_count=1" in listed.stdout


def test_bad_settings_exit_2(tmp_path: Path) -> None:
    (tmp_path / "iotgw-load.toml").write_text("users = 'many'\n")
    result = iotgw_load(tmp_path, "--headless")
    assert result.returncode == 2 and "users" in result.stderr
    (tmp_path / "iotgw-load.toml").unlink()
    result = iotgw_load(tmp_path, "pub", "-H", "coap://127.0.0.1")
    assert result.returncode == 2 and "needs an mqtt://" in result.stderr
    result = iotgw_load(tmp_path, "-d", "soon")
    assert result.returncode == 2 and "duration" in result.stderr


LIFECYCLE = """
import asyncio
from loadtest import MqttDevice, StopDevice, constant, task


class Lifecycle(MqttDevice):
    wait_time = constant(0.05)
    qos = 1

    def on_start(self):
        self.publish(f"life/{self.id}/start", b"hello")
        self.done = 0

    @task
    async def work(self):
        await asyncio.sleep(0.01)
        self.done += 1
        self.publish(f"life/{self.id}/work", str(self.done), name="work")
        if self.done == 5:
            raise StopDevice()

    async def on_stop(self):
        self.publish(f"life/{self.id}/stop", b"bye", name="bye")


class Faulty(MqttDevice):
    fixed_count = 1
    wait_time = constant(0.1)

    @task
    def explode(self):
        raise RuntimeError("sensor unplugged")
"""


def test_device_life_cycle_runs_start_async_tasks_stop_device_and_on_stop(
    mosquitto: Any, tmp_path: Path
) -> None:
    path = tmp_path / "life.py"
    path.write_text(LIFECYCLE)
    sub = Subscriber(mosquitto.port, ["life/#"])
    try:
        out = tmp_path / "life"
        result = iotgw_load(
            tmp_path, "-f", str(path), "-H", f"mqtt://127.0.0.1:{mosquitto.port}", "-c", "4",
            "-r", "100", "-d", "2s", "--headless", "--csv", str(out),
        )
        sub.settle()
    finally:
        sub.close()
    # the Faulty device's exceptions are errors: the default rule (errors>0) fails the run
    assert result.returncode == 1, result.stdout + result.stderr
    stats = stats_csv(out)
    lifecycles = [f"lifecycle-{n}" for n in (2, 3, 4)]
    assert all(sub.topics[f"life/{d}/start"] == 1 for d in lifecycles)
    assert all(sub.topics[f"life/{d}/work"] == 5 for d in lifecycles)  # stopped after 5
    assert all(sub.topics[f"life/{d}/stop"] == 1 for d in lifecycles)
    assert count(stats, "PUBLISH", "work") == 15 and count(stats, "PUBLISH", "bye") == 3
    failures = Path(f"{out}_failures.csv").read_text()
    assert "TASK,explode,RuntimeError: sensor unplugged" in failures


def test_an_unreachable_master_makes_a_worker_exit_3(tmp_path: Path) -> None:
    port = free_port()
    result = iotgw_load(tmp_path, "--worker", "--master-port", str(port),
                        "--expect-workers-max-wait", "1", timeout=30)
    assert result.returncode == 3
    assert "no master" in result.stderr


def test_an_unreachable_kafka_is_reported_with_exit_code_3(tmp_path: Path) -> None:
    port = free_port()
    result = iotgw_load(tmp_path, "pub", "-H", f"mqtt://127.0.0.1:{free_port()}", "-c", "1",
                        "--headless", "--kafka", f"127.0.0.1:{port}", timeout=60)
    assert result.returncode == 3
    assert f"--kafka 127.0.0.1:{port}: cannot consume 'iot.telemetry'" in result.stderr
