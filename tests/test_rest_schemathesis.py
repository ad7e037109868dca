"""The REST API fuzzed by schemathesis from the OpenAPI document the running gateway serves:
every operation, with requests that fit the schema and requests that do not, sent with the
admin token. No response may be a 5xx, and each must match the schema the document gives for
its status.

(Driven through `APIOperation.as_strategy()` and Hypothesis rather than schemathesis' pytest
plugin: its lazy `from_fixture` loader writes `request.node._nodeid`, which pytest 9 dropped.)
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

TOKEN = "t0"
EXAMPLES = 30  # per operation and mode


@pytest.mark.parametrize("device", [None, "d1"], ids=["any-device", "existing-device"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error_and_responses_match_the_schema(
    gateway_factory: Any, mode: GenerationMode, device: str | None
) -> None:
    gw = gateway_factory(api_token=TOKEN)
    gw.gateway.registry.add("d1", "pw")  # something to find: a device with a shadow history
    for n in range(3):
        gw.call(lambda n=n: gw.loop.create_task(
            gw.gateway.shadows.update("d1", {"state": {"desired": {"n": n}}}, writer="seed")))
    schema = schemathesis.openapi.from_url(
        f"http://127.0.0.1:{gw.gateway.http.port}/openapi.json"
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11

    auth = {"Authorization": f"Bearer {TOKEN}"}
    for operation in operations:
        fixed = {"device": device} if device and "{device}" in operation.path else None
        strategy = operation.as_strategy(generation_mode=mode, headers=auth,
                                         path_parameters=fixed)

        @given(case=strategy)
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            case.call_and_validate(
                headers=auth,
                checks=[not_a_server_error, response_schema_conformance],
                timeout=10,
            )

        try:
            run()
        except Unsatisfiable:
            # nothing to make invalid (no parameters, no body): only the positive run applies
            assert mode is GenerationMode.NEGATIVE, operation.path
        except Exception as exc:
            exc.add_note(f"operation: {operation.method.upper()} {operation.path} ({mode})")
            raise
