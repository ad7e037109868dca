"""REST request metrics: counted by route template (never the raw path, so labels stay few),
method and status, and timed."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any


def _get(port: int, path: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_requests_are_counted_by_route_template_method_and_status(gateway_factory: Any) -> None:
    gw = gateway_factory(api_token="t0")
    port = gw.gateway.http.port
    for device in ("a", "b", "c"):
        assert _get(port, f"/v1/devices/{device}/shadow", "t0") == 404
    assert _get(port, "/v1/devices/a/shadow") == 401
    assert _get(port, "/no/such/path/1") == 404
    assert _get(port, "/no/such/path/2") == 404
    sample = gw.gateway.metrics.registry.get_sample_value
    shadow = "/v1/devices/{device}/shadow"
    assert sample("iotgw_http_requests_total",
                  {"route": shadow, "method": "GET", "status": "404"}) == 3
    assert sample("iotgw_http_requests_total",
                  {"route": shadow, "method": "GET", "status": "401"}) == 1
    assert sample("iotgw_http_requests_total",
                  {"route": "unmatched", "method": "GET", "status": "404"}) == 2
    assert sample("iotgw_http_request_duration_seconds_count",
                  {"route": shadow, "method": "GET"}) == 4
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "/v1/devices/a/" not in text  # no raw paths as labels
