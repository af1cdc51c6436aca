"""Schemathesis against the served OpenAPI 3.1 document: no 5xx, every status code documented, and
every response matching its schema and content type. Bounded: 30 examples per operation."""

from __future__ import annotations

import collections
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, reject, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from tests.service.conftest import TOKENS, spec


@pytest.fixture(scope="module")
def served(bucket, tokens_file, tmp_path_factory, s3_server):
    """The real app on 127.0.0.1 (no launcher: fuzzed submits must not start trainers) with one job."""
    from service.api.app import create_app
    from service.settings import Settings
    from tests.service.conftest import LiveServer

    settings = Settings(state_uri=f"s3://{bucket}/fuzz/", tokens_file=str(tokens_file), launcher="none",
                        reconcile_interval_s=0, local_dir=str(tmp_path_factory.mktemp("local")))
    server = LiveServer(create_app(settings, use_settings_launcher=False, events_poll_s=0.1))
    job = httpx.post(f"{server.url}/v1/jobs", json={"spec": spec(bucket)},
                     headers={"Authorization": f"Bearer {TOKENS['acme']}"}, timeout=60)
    assert job.status_code == 201, job.text
    yield server
    server.stop()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_api_conforms_to_its_openapi(served):
    schema = schemathesis.openapi.from_url(f"{served.url}/schema/openapi.json")
    headers = {"Authorization": f"Bearer {TOKENS['acme']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        if operation.path.endswith("/events"):
            continue  # an SSE stream of a job that never ends here; covered by the lifecycle tests

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            case.call_and_validate(base_url=served.url, headers=headers, timeout=30, checks=CHECKS)

        check()
    served_requests = sum(float(line.rsplit(" ", 1)[1]) for line in
                          httpx.get(f"{served.url}/metrics").text.splitlines()
                          if line.startswith("lathe_http_requests_total{"))
    assert served_requests >= 10 * len(operations) - 30  # the fuzzer really called every operation


def test_every_schema_reference_resolves_and_the_job_spec_is_published(served):
    document = httpx.get(f"{served.url}/schema/openapi.json").json()
    refs: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    schemas = document["components"]["schemas"]
    missing = sorted(r for r in refs if r.removeprefix("#/components/schemas/") not in schemas)
    assert not missing, missing
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/JobCreateDoc") and "JobSpec" in schemas and "NetworkSpec" in schemas


STATEFUL_BUDGET_S = 35.0  # of calls, then the run stops calling the API (what hypothesis still draws is discarded)


def test_stateful_sequences_conform_to_the_openapi(served):
    """Schemathesis' stateful mode: sequences of calls that feed one answer into the next request
    (links the schema declares or schemathesis infers: a submitted or listed job's id into get, cancel,
    logs and delete), each answer checked against the document. Fixed seed, bounded time."""
    schema = schemathesis.openapi.from_url(f"{served.url}/schema/openapi.json").exclude(path_regex=r"/events$")
    headers = {"Authorization": f"Bearer {TOKENS['acme']}"}
    started = time.monotonic()
    calls: list[str] = []

    class Workflow(schema.as_state_machine()):
        def before_call(self, case):
            if time.monotonic() - started > STATEFUL_BUDGET_S:
                reject()  # out of time: hypothesis discards the rest of this sequence and soon stops

        def get_call_kwargs(self, case):
            return {"base_url": served.url, "headers": headers, "timeout": 30}

        def after_call(self, response, case):
            calls.append(f"{case.method} {case.path} {response.status_code}")

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    seed(20261207)(Workflow)
    Workflow.run(settings=settings(max_examples=60, stateful_step_count=6, deadline=None, database=None,
                                   suppress_health_check=list(HealthCheck)))
    elapsed = time.monotonic() - started
    print(f"stateful: {len(calls)} calls in {elapsed:.1f} s; statuses: "
          f"{sorted(collections.Counter(c.rsplit(' ', 1)[1] for c in calls).items())}")
    assert len(calls) >= 30, calls
    chained = [c for c in calls if "{job_id}" in c and not c.endswith((" 400", " 404"))]
    assert chained, "no call reached an existing job through a link"


def _structs_refusing_unknown_fields() -> dict[str, type]:
    import msgspec

    import service.api.wire
    import trainer.core.spec

    out = {}
    for module in (service.api.wire, trainer.core.spec):
        for name, value in vars(module).items():
            if (isinstance(value, type) and issubclass(value, msgspec.Struct)
                    and value.__struct_config__.forbid_unknown_fields):
                out[name] = value
    return out


def test_the_document_says_what_the_api_does(served):
    document = httpx.get(f"{served.url}/schema/openapi.json").json()
    paths, schemas = document["paths"], document["components"]["schemas"]
    # The event stream is documented as what it sends.
    assert list(paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]
    # Every answer a {job_id} operation can give for a malformed request is documented as a problem.
    for path, item in paths.items():
        for method, operation in item.items():
            if "{job_id}" in path:
                assert list(operation["responses"]["400"]["content"]) == ["application/problem+json"], (method, path)
            if "requestBody" in operation:
                assert "415" in operation["responses"], (method, path)
    # Only version 1 is accepted, and the schema says so.
    assert schemas["JobSpec"]["properties"]["version"] == {"enum": [1]}
    # Every body Struct that refuses unknown fields is published with additionalProperties: false.
    refusing = _structs_refusing_unknown_fields()
    assert {"UploadFile", "UploadCreate", "JobCreate", "JobCreateDoc", "JobSpec"} <= set(refusing)
    for name in refusing:
        if name in schemas:
            assert schemas[name].get("additionalProperties") is False, name
    assert "UploadFile" in schemas and "JobSpec" in schemas
    # Parameters the API refuses when empty say minLength 1.
    params = {p["name"]: p["schema"] for p in paths["/v1/jobs"]["get"]["parameters"]}
    params.update({p["name"]: p["schema"] for p in paths["/v1/jobs"]["post"]["parameters"]})
    assert params["cursor"]["minLength"] == 1 and params["Idempotency-Key"]["minLength"] == 1
    headers = {"Authorization": f"Bearer {TOKENS['acme']}"}
    for query in ("cursor=", "limit=0"):
        r = httpx.get(f"{served.url}/v1/jobs?{query}", headers=headers)
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json", r.text
