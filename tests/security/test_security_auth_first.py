"""Authentication comes before the request body, over real HTTP (uvicorn): without a valid token every
authenticated route answers 401, whatever the body is (malformed, not JSON, oversized, hostile), so an
anonymous client learns nothing from how the service reads bodies and costs it no parsing."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.security.security_helpers import LiveServer, auth

JSON = {"content-type": "application/json"}
LIMIT = 64 * 1024

# (id, raw body, headers): each is a 400, 413 or 415 with a valid token.
BAD_BODIES: list[tuple[str, bytes, dict[str, str]]] = [
    ("malformed-json", b'{"spec": {"version": 1', JSON),
    ("not-json-at-all", b"version = 1", JSON),
    ("not-utf8", b'\xff\xfe{"spec": {}}', JSON),
    ("lone-surrogate", b'{"spec": {"name": "\\ud800"}}', JSON),
    ("empty-body", b"", JSON),
    ("wrong-content-type", b'{"spec": {"version": 1}}', {"content-type": "text/plain"}),
    ("no-content-type", b'{"spec": {"version": 1}}', {}),
    ("nested-deep", b'{"spec": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON),
    ("unknown-field", b'{"spec": {}, "priority": 9}', JSON),
    ("over-the-size-limit", b'{"spec": {"name": "' + b"x" * (2 * LIMIT) + b'"}}', JSON),
]
CREDENTIALS = [("no-token", {}), ("wrong-token", {"Authorization": "Bearer tok-guess-0000"}),
               ("not-bearer", {"Authorization": "Basic YWNtZTpzZWNyZXQ="})]
BODY_ROUTES = ["/v1/jobs", "/v1/jobs:validate", "/v1/uploads"]


@pytest.fixture(scope="module")
def server(sec_bucket, sec_tokens_file, tmp_path_factory) -> Iterator[LiveServer]:
    from service.api.app import create_app
    from service.settings import Settings

    settings = Settings(state_uri=f"s3://{sec_bucket}/auth-first/", tokens_file=str(sec_tokens_file), launcher="none",
                        reconcile_interval_s=0, max_request_bytes=LIMIT,
                        local_dir=str(tmp_path_factory.mktemp("local")))
    live = LiveServer(create_app(settings, use_settings_launcher=False))
    yield live
    live.stop()


@pytest.mark.parametrize("case, body, headers", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
@pytest.mark.parametrize("who, credentials", CREDENTIALS, ids=[c[0] for c in CREDENTIALS])
def test_a_bad_body_without_a_valid_token_is_401(server, case, body, headers, who, credentials):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path in BODY_ROUTES:
            resp = http.post(path, content=body, headers={**headers, **credentials})
            assert resp.status_code == 401, (path, resp.status_code, resp.text[:300])
            assert resp.headers["www-authenticate"].startswith("Bearer")
            assert resp.headers["content-type"] == "application/problem+json"
            # With the tenant's token the same request is refused for its body.
            resp = http.post(path, content=body, headers={**headers, **auth()})
            assert resp.status_code in (400, 413, 415), (path, resp.status_code, resp.text[:300])
