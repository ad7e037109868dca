"""`iotgw run` start-up: operator mistakes (busy ports, a data dir in use or unusable, bad
values, TLS files that do not load) are one line on stderr and exit 2, never a traceback nor a
gateway that starts anyway. Every case runs the real command in a subprocess."""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, free_ports, wait_for_tcp

from gateway.logs import QUEUED_RECORDS

RUN = [sys.executable, "-m", "gateway.cli", "run"]
TIMEOUT = 20  # seconds: a gateway that starts instead of refusing fails the test here


class Ports:
    def __init__(self, workers: int = 1) -> None:
        self.mqtt = free_port()
        self.http = free_ports(workers)
        self.coap = free_port(socket.SOCK_DGRAM)

    def args(self) -> list[str]:
        return ["--mqtt-port", str(self.mqtt), "--http-port", str(self.http),
                "--coap-port", str(self.coap)]


def run_bounded(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """subprocess.run in a session of its own: on a timeout (a gateway that started instead of
    refusing) its workers are killed with it, not left running."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(command, proc.returncode, out, err)


def refused(args: list[str], *, prefix: list[str] | None = None) -> str:
    """Run `iotgw run ARGS`, expect exit 2 with one line on stderr; return that line."""
    proc = run_bounded([*(prefix or []), *RUN, *args], TIMEOUT)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("iotgw: "), proc.stderr[-3000:]
    return lines[0]


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Started:
    """A gateway subprocess that has bound all its listeners (it logged `CoAP listening`, its
    last, once per process)."""

    def __init__(self, args: list[str], processes: int = 1) -> None:
        self.proc = subprocess.Popen([*RUN, *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        ready = threading.Event()

        def read() -> None:  # also keeps draining, so the gateway never blocks on the pipe
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if sum("CoAP listening" in seen for seen in self.log) >= processes:
                    ready.set()
            ready.set()  # exited

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60) or self.proc.poll() is not None:
            _stop(self.proc)
            raise RuntimeError("gateway did not start:\n" + "".join(self.log))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        _stop(self.proc)


@pytest.fixture
def started() -> Iterator[Any]:
    running: list[Started] = []

    def start(args: list[str], processes: int = 1) -> Started:
        gw = Started(args, processes)
        running.append(gw)
        return gw

    yield start
    for gw in running:
        gw.stop()


# ---- ports -------------------------------------------------------------------------------


def test_second_gateway_on_the_same_ports_is_refused(tmp_path: Path, started: Any) -> None:
    ports = Ports()
    first = started([*ports.args(), "--data-dir", str(tmp_path / "a")])
    line = refused([*ports.args(), "--data-dir", str(tmp_path / "b")])
    assert "--mqtt-port" in line and "in use" in line
    assert first.proc.poll() is None  # the first one is untouched
    wait_for_tcp(ports.mqtt)


def test_port_held_by_mosquitto_is_a_one_line_error(tmp_path: Path, mosquitto: Any) -> None:
    ports = Ports()
    line = refused([*ports.args(), "--mqtt-port", str(mosquitto.port),
                    "--data-dir", str(tmp_path)])
    assert f"127.0.0.1:{mosquitto.port}" in line and "--mqtt-port" in line


def test_http_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    ports = Ports()
    with socket.create_server(("127.0.0.1", ports.http)):
        line = refused([*ports.args(), "--data-dir", str(tmp_path)])
    assert "--http-port" in line and "in use" in line


def test_websocket_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    ports = Ports()
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = str(held.getsockname()[1])
        line = refused([*ports.args(), "--ws-port", port, "--data-dir", str(tmp_path)])
    assert "--ws-port" in line and "in use" in line and "WebSocket" in line


def test_coap_port_shared_with_reuse_port_is_refused(tmp_path: Path) -> None:
    """A UDP socket with SO_REUSEPORT (another gateway, another CoAP server) would otherwise get
    half of the devices' datagrams."""
    ports = Ports()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", ports.coap))
        line = refused([*ports.args(), "--data-dir", str(tmp_path)])
    assert "--coap-port" in line and "in use" in line


def test_mqtt_port_shared_with_reuse_port_is_refused(tmp_path: Path) -> None:
    ports = Ports()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", ports.mqtt))
        other.listen()
        line = refused([*ports.args(), "--data-dir", str(tmp_path)])
    assert "--mqtt-port" in line


def test_workers_refuse_ports_of_a_running_gateway(
    tmp_path: Path, started: Any, redis_server: Any
) -> None:
    ports = Ports(workers=2)
    started([*ports.args(), "--data-dir", str(tmp_path / "a")])
    line = refused([*ports.args(), "--data-dir", str(tmp_path / "b"), "--workers", "2",
                    "--redis", f"redis://{redis_server.url}"])
    assert "--mqtt-port" in line and "in use" in line


def test_gateway_refuses_ports_of_running_workers(
    tmp_path: Path, started: Any, redis_server: Any
) -> None:
    ports = Ports(workers=2)
    workers = started([*ports.args(), "--data-dir", str(tmp_path / "a"), "--workers", "2",
                       "--redis", f"redis://{redis_server.url}", "--node-id", "w"], 2)
    other = Ports()
    line = refused([*other.args(), "--mqtt-port", str(ports.mqtt),
                    "--data-dir", str(tmp_path / "b")])
    assert "--mqtt-port" in line
    line = refused([*other.args(), "--coap-port", str(ports.coap),
                    "--data-dir", str(tmp_path / "c")])
    assert "--coap-port" in line
    assert workers.proc.poll() is None


def test_a_worker_that_cannot_start_stops_the_run_with_exit_2(
    tmp_path: Path, redis_server: Any
) -> None:
    """Worker 1's state dir is held (by this test): starting it again and again would not help."""
    held = tmp_path / "data" / "workers" / "1"
    held.mkdir(parents=True)
    with open(held / "iotgw.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        ports = Ports(workers=2)
        proc = run_bounded(
            [*RUN, *ports.args(), "--data-dir", str(tmp_path / "data"), "--workers", "2",
             "--redis", f"redis://{redis_server.url}"], 60,
        )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("iotgw: ")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"worker 1: data dir {held} is in use by another gateway (pid {os.getpid()})" \
        in errors[0]
    assert "worker 1 could not start" in errors[1]


# ---- the data dir -------------------------------------------------------------------------


def test_data_dir_in_use_names_the_pid_holding_it(tmp_path: Path, started: Any) -> None:
    first = started([*Ports().args(), "--data-dir", str(tmp_path)])
    line = refused([*Ports().args(), "--data-dir", str(tmp_path)])
    assert str(tmp_path) in line and f"pid {first.pid}" in line


def test_data_dir_is_free_again_after_a_stop(tmp_path: Path, started: Any) -> None:
    ports = Ports()
    first = started([*ports.args(), "--data-dir", str(tmp_path)])
    first.stop()
    assert first.proc.returncode == 0
    started([*ports.args(), "--data-dir", str(tmp_path)])


def test_data_dir_that_is_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("not a directory")
    line = refused([*Ports().args(), "--data-dir", str(data)])
    assert str(data) in line and "not a directory" in line


def test_unwritable_data_dir_is_a_one_line_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if os.geteuid() != 0:
        data.chmod(0o500)
        prefix: list[str] = []
    else:  # root writes anywhere but on a read-only file system: mount one, privately
        if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True
        ).returncode:
            pytest.skip("needs unshare -m to mount a read-only file system as root")
        prefix = ["unshare", "-m", "sh", "-c",
                  f'mount -t tmpfs -o ro tmpfs "{data}" && exec "$0" "$@"']
    line = refused([*Ports().args(), "--data-dir", str(data)], prefix=prefix)
    assert str(data) in line and "writ" in line


# ---- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-level", "verbose"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--mqtt-port", "99999"], "--mqtt-port"),
        (["--coap-port", "-1"], "--coap-port"),
        (["--http-port", "65536"], "--http-port"),
        (["--mqtts-port", "70000"], "--mqtts-port"),
        (["--max-packet-size", "0"], "--max-packet-size"),
        (["--max-packet-size", "-5"], "--max-packet-size"),
        (["--max-queued-messages", "0"], "--max-queued-messages"),
        (["--spool-max-bytes", "0"], "--spool-max-bytes"),
        (["--kafka-ack-timeout-ms", "-1"], "--kafka-ack-timeout-ms"),
        (["--redis", "localhost:6379"], "--redis"),
        (["--workers", "3", "--redis", "redis://r", "--http-port", "65534"], "--http-port"),
        (["--mqtt-port", "1999", "--http-port", "1999"], "--http-port: port 1999 is also"),
        (["--workers", "2", "--redis", "redis://r", "--mqtt-port", "1999", "--http-port",
          "1998"], "--http-port: port 1999 is also --mqtt-port"),
        (["--mqtts-port", "1999", "--mqtt-port", "1999", "--tls-cert", "c.pem"],
         "--mqtts-port: port 1999 is also --mqtt-port"),
        (["--data-dir", ""], "--data-dir"),
        (["--api-token", "two words"], "--api-token"),
    ],
)
def test_bad_values_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    ports = Ports()
    line = refused([*ports.args(), "--data-dir", str(tmp_path), *args])
    assert message in line


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("key_without_cert", "--tls-key"),
        ("ca_without_cert", "--tls-client-ca"),
        ("missing_cert", "--tls-cert"),
        ("garbage_cert", "--tls-cert"),
        ("key_of_another_cert", "--tls-key"),
        ("missing_ca", "--tls-client-ca"),
        ("garbage_ca", "--tls-client-ca"),
        ("encrypted_key", "--tls-key"),
    ],
)
def test_tls_files_that_do_not_load_are_one_line_errors(
    case: str, message: str, tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    cert, key = _self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = _self_signed(other)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    missing = str(tmp_path / "missing.pem")
    locked = tmp_path / "locked.pem"  # the key, encrypted: the gateway must not prompt for it
    subprocess.run(["openssl", "pkey", "-in", str(key), "-out", str(locked), "-aes256",
                    "-passout", "pass:secret"], check=True, capture_output=True)
    args = {
        "key_without_cert": ["--tls-key", str(key)],
        "ca_without_cert": ["--tls-client-ca", str(cert)],
        "missing_cert": ["--tls-cert", missing, "--tls-key", str(key)],
        "garbage_cert": ["--tls-cert", str(garbage), "--tls-key", str(key)],
        "key_of_another_cert": ["--tls-cert", str(cert), "--tls-key", str(other_key)],
        "missing_ca": ["--tls-cert", str(cert), "--tls-key", str(key),
                       "--tls-client-ca", missing],
        "garbage_ca": ["--tls-cert", str(cert), "--tls-key", str(key),
                       "--tls-client-ca", str(garbage)],
        "encrypted_key": ["--tls-cert", str(cert), "--tls-key", str(locked)],
    }[case]
    line = refused([*Ports().args(), "--mqtts-port", str(free_port()),
                    "--data-dir", str(tmp_path / "data"), *args])
    assert message in line


def test_unreadable_acl_file_is_a_one_line_error(tmp_path: Path) -> None:
    acl = tmp_path / "acl.toml"
    acl.mkdir()  # exists, but cannot be read as a file
    line = refused([*Ports().args(), "--data-dir", str(tmp_path / "d"), "--acl-file", str(acl)])
    assert "--acl-file" in line or "ACL file" in line


# ---- logging and metrics ------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_for(log: list[str], text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(log):
            if text in line:
                return line
        time.sleep(0.05)
    raise TimeoutError(f"no log line with {text!r}:\n" + "".join(log))


def test_json_log_format_is_one_object_per_line_with_the_access_log(
    tmp_path: Path, started: Any
) -> None:
    ports = Ports()
    gw = started([*ports.args(), "--data-dir", str(tmp_path), "--log-format", "json",
                  "--http-access-log"])
    assert _get(ports.http, "/healthz")[0] == 200
    assert _get(ports.http, "/v1/devices/d1/shadow?x=1")[0] == 401
    line = _wait_for(gw.log, "/v1/devices/d1/shadow")
    records = [json.loads(raw) for raw in gw.log]  # every line is one JSON object
    assert {"time", "level", "logger", "message", "pid"} <= set(records[0])
    assert any(r["message"].startswith("MQTT listening") for r in records)
    access = json.loads(line)
    assert access["logger"] == "iotgw.http.access" and access["level"] == "INFO"
    assert (access["method"], access["path"], access["status"]) == (
        "GET", "/v1/devices/d1/shadow?x=1", 401)
    assert access["duration_ms"] >= 0 and access["peer"].startswith("127.0.0.1:")


def test_text_access_log_is_one_line_per_request_and_off_by_default(
    tmp_path: Path, started: Any
) -> None:
    ports = Ports()
    gw = started([*ports.args(), "--data-dir", str(tmp_path / "a"), "--http-access-log"])
    assert _get(ports.http, "/healthz")[0] == 200
    line = _wait_for(gw.log, "GET /healthz")
    assert re.search(r"iotgw\.http\.access: GET /healthz 200 [0-9.]+ms 127\.0\.0\.1:\d+$",
                     line.rstrip()), line
    quiet_ports = Ports()
    quiet = started([*quiet_ports.args(), "--data-dir", str(tmp_path / "b")])
    assert _get(quiet_ports.http, "/healthz")[0] == 200
    gw.stop()
    quiet.stop()
    assert not any("iotgw.http.access" in line for line in quiet.log)


def test_metrics_include_the_process_and_the_build(gateway_factory: Any) -> None:
    import platform

    import uvloop

    from gateway import __version__

    gw = gateway_factory()
    status, body = _get(gw.gateway.http.port, "/metrics")
    text = body.decode()
    assert status == 200
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds"):
        assert re.search(rf"^{name} [0-9.e+]+$", text, re.M), name
    (info,) = re.findall(r"^iotgw_build_info\{(.*)\} 1\.0$", text, re.M)
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info))
    assert labels["version"] == __version__
    assert labels["python"] == platform.python_version()
    assert labels["uvloop"] == uvloop.__version__
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", labels["cython"]), labels


def test_a_stderr_nobody_reads_does_not_stop_the_gateway(tmp_path: Path) -> None:
    """Logs go to a pipe that fills up (a stuck log collector): requests are still answered,
    and records that do not fit are dropped, not queued without bound."""
    ports = Ports()
    proc = subprocess.Popen([*RUN, *ports.args(), "--data-dir", str(tmp_path),
                             "--http-access-log", "--log-level", "debug"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for_tcp(ports.http, proc=proc, timeout=30)
        # Each request logs a line: more than the pipe's 64 KiB and the queue's bound hold.
        conn = http.client.HTTPConnection("127.0.0.1", ports.http, timeout=10)
        for _ in range(QUEUED_RECORDS + 2000):
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        conn.close()
        # Once the collector reads again, the next record says how many were dropped.
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(b.decode() for b in proc.stderr or ()),
                         daemon=True).start()
        deadline = time.monotonic() + 20
        while not any("log records dropped" in line for line in log):
            assert time.monotonic() < deadline, "".join(log[-5:])
            assert _get(ports.http, "/healthz")[0] == 200
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
