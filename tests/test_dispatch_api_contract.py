"""A schemathesis contract run of the reference dispatch API against its own OpenAPI document.

Every operation of `/openapi.json` is called with generated requests, valid and
invalid ones, on a real server on loopback with a bearer token configured, and
every response goes through all of schemathesis's default checks: no 5xx,
declared status codes, content types, headers and response schemas, invalid
data refused, valid data accepted, missing required headers refused, auth
enforced, undeclared methods 405 with an `Allow` header. Requests are sent as
generated: the document alone must say how the API answers them, including a
schema-valid `POST /api/trigger` whose `Idempotency-Key` is not its
`trigger_id` (declared 409).

The run is deterministic: a fixed seed, no example database, and at most
`MAX_EXAMPLES` fuzzed requests per operation (plus the document's examples and
schemathesis's coverage cases, a fixed set).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings

from nudgeflow.dispatch_api.server import ServerThread, create_app

TOKEN: Final = "contract-token"
SEED: Final = 20260301
MAX_EXAMPLES: Final = 100

# schemathesis's built-in checks, all on by default; named so that a config that switches
# one off (a schemathesis.toml, an env var) fails here rather than weakening the run.
DEFAULT_CHECKS: Final = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    "object_level_authorization",
)


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    with ServerThread(make_app()) as server:
        yield server.url


def make_app() -> FastAPI:
    return create_app(token=TOKEN, scheduler_interval_s=0.01)


# Built from the app's own document (pytest 9 breaks schemathesis's lazy fixture loader);
# `test_served_document_is_the_one_tested` checks that the server serves exactly this.
DOCUMENT = make_app().openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config(seed=SEED))


def test_served_document_is_the_one_tested(api_url: str) -> None:
    assert httpx.get(f"{api_url}/openapi.json").json() == DOCUMENT


def test_every_default_check_is_enabled_for_every_operation() -> None:
    operations = [
        schema[path][method] for path, methods in DOCUMENT["paths"].items() for method in methods
    ]

    assert len(operations) == 8
    for operation in operations:
        config = schema.config.checks_config_for(operation=operation, phase=None)
        disabled = [name for name in DEFAULT_CHECKS if not config.get_by_name(name=name).enabled]
        assert disabled == [], operation.label


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    # Replaying saved failures would make a run depend on what ran before on this machine.
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_honours_its_openapi_document(api_url: str, case: schemathesis.Case) -> None:  # type: ignore[type-arg]
    case.call_and_validate(base_url=api_url, headers={"Authorization": f"Bearer {TOKEN}"})
