"""Toxiproxy (Shopify), the TCP fault proxy of the chaos suite: its server process and a small
client of its HTTP API (https://github.com/Shopify/toxiproxy#http-api).

A proxy listens on one port and forwards to an upstream; toxics on it add latency and jitter,
limit bandwidth, stop the data (`timeout`) or reset connections (`reset_peer`); disabling a proxy
closes its connections and refuses new ones (a partition). The server is built by
scripts/test.sh into .cache/go-bin/toxiproxy-server (`go install .../cmd/server@v2.5.0`).

The client is synchronous (http.client, one request per call, short timeouts): the chaos runner
calls it from a thread (asyncio.to_thread).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BINARY_NAMES = ("toxiproxy-server",)
TOXIC_TYPES = ("latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer",
               "limit_data")


class ToxiproxyError(Exception):
    """The server refused a request or cannot be reached; str() says which and why."""


def find_binary(explicit: str | None = None) -> str | None:
    """The toxiproxy-server to run: `explicit`, $IOTGW_TOXIPROXY, the one scripts/test.sh built
    (.cache/go-bin), or one on PATH."""
    for candidate in (explicit, os.environ.get("IOTGW_TOXIPROXY"),
                      str(ROOT / ".cache" / "go-bin" / "toxiproxy-server")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    for name in BINARY_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Proxy:
    name: str
    listen: str  # host:port the clients connect to
    upstream: str  # host:port it forwards to
    enabled: bool = True

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class Toxiproxy:
    """A client of one Toxiproxy server's HTTP API."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8474, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except OSError as exc:
            raise ToxiproxyError(
                f"toxiproxy at {self.host}:{self.port}: {method} {path}: {exc}"
            ) from None
        finally:
            conn.close()
        if resp.status >= 300:
            text = raw.decode("utf-8", "replace").strip()
            raise ToxiproxyError(f"toxiproxy: {method} {path}: {resp.status} {text}")
        if not raw:
            return None
        return json.loads(raw)

    def version(self) -> str:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", "/version")
            return conn.getresponse().read().decode().strip()
        except OSError as exc:
            raise ToxiproxyError(f"toxiproxy at {self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()

    def create(self, name: str, listen: str, upstream: str) -> Proxy:
        """A new proxy (an existing one of that name is replaced)."""
        with contextlib.suppress(ToxiproxyError):
            self._call("DELETE", f"/proxies/{name}")
        got = self._call("POST", "/proxies",
                         {"name": name, "listen": listen, "upstream": upstream, "enabled": True})
        return Proxy(got["name"], got["listen"], got["upstream"], got["enabled"])

    def proxies(self) -> dict[str, Proxy]:
        got = self._call("GET", "/proxies")
        return {n: Proxy(p["name"], p["listen"], p["upstream"], p["enabled"])
                for n, p in got.items()}

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Disabled: every connection through the proxy is closed and new ones are refused."""
        self._call("POST", f"/proxies/{name}", {"enabled": enabled})

    def add_toxic(self, proxy: str, toxic: str, kind: str, attributes: dict[str, int],
                  stream: str = "downstream", toxicity: float = 1.0) -> None:
        """Add a toxic: `kind` one of TOXIC_TYPES, `stream` downstream (to the client) or
        upstream (to the server), `toxicity` the share of connections it applies to."""
        if kind not in TOXIC_TYPES:
            raise ToxiproxyError(f"unknown toxic type {kind!r} (types: {', '.join(TOXIC_TYPES)})")
        self._call("POST", f"/proxies/{proxy}/toxics", {
            "name": toxic, "type": kind, "stream": stream, "toxicity": toxicity,
            "attributes": attributes,
        })

    def remove_toxic(self, proxy: str, toxic: str) -> None:
        self._call("DELETE", f"/proxies/{proxy}/toxics/{toxic}")

    def toxics(self, proxy: str) -> list[dict[str, Any]]:
        got = self._call("GET", f"/proxies/{proxy}/toxics")
        return list(got)

    def reset(self) -> None:
        """Every proxy enabled, every toxic removed."""
        self._call("POST", "/reset")


class ToxiproxyServer:
    """A toxiproxy-server process on a loopback port."""

    def __init__(self, binary: str, port: int, log: Path | None = None) -> None:
        self.binary = binary
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Toxiproxy("127.0.0.1", port)

    def start(self, timeout: float = 10.0) -> Toxiproxy:
        out = self.log.open("ab") if self.log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [self.binary, "-host", "127.0.0.1", "-port", str(self.port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if self.log is not None:
            out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ToxiproxyError(f"toxiproxy-server exited with {self.proc.returncode} "
                                     f"while starting (port {self.port} taken?)")
            try:
                self.client.version()
                return self.client
            except ToxiproxyError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ToxiproxyError(
                        f"toxiproxy-server did not answer on port {self.port} in {timeout:.0f} s"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
