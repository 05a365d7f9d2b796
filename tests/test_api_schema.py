"""schemathesis against the API's own OpenAPI schema, on a live uvicorn server.

Every operation is exercised with generated (valid and invalid) inputs: no
response may be a 5xx or break the documented schema. The server talks to the
session's real Ray; `max_concurrent_jobs = 0` makes every spec that passes
validation end in 429 after the real count of running jobs, so POST /v1/jobs runs
its whole validation path against Ray without starting training. Generated job
ids name no job, so the per-job routes take their real 404 path through Ray.

The schema is loaded with `from_dict` from the app the factory builds (the live
server's /openapi.json is checked to be the same document): schemathesis'
`from_fixture` does not run under pytest 9.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from api.settings import Settings
from tests.test_api_support import API_TOKEN, LiveServer, make_settings

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
OPENAPI = create_app(Settings(ray_address="http://127.0.0.1:8265")).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


@pytest.fixture(scope="module")
def schema_server(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("schema-runs")
    with LiveServer(make_settings(ray_cluster, storage, max_concurrent_jobs=0)) as server:
        yield server


def test_live_server_serves_the_schema_under_test(schema_server):
    assert httpx.get(f"{schema_server.url}/openapi.json").json() == OPENAPI


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_schema(case, schema_server):
    case.call_and_validate(
        base_url=schema_server.url,
        headers=AUTH,
        timeout=30,
        checks=[
            not_a_server_error,
            response_schema_conformance,
            status_code_conformance,
            content_type_conformance,
        ],
    )
