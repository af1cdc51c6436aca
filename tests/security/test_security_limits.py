"""The request size limits, over real HTTP (uvicorn): a body over LATHE_MAX_REQUEST_BYTES is a 413
problem before it is parsed, whether it announces its length or streams in chunks; oversized headers
are refused by the server; nothing of it is a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.security.security_helpers import LiveServer, auth


@pytest.fixture
def server(sec_settings) -> Iterator[LiveServer]:
    from service.api.app import create_app

    live = LiveServer(create_app(sec_settings(launcher="none", reconcile_interval_s=0, max_request_bytes=64 * 1024),
                                 use_settings_launcher=False))
    yield live
    live.stop()


def _body(size: int) -> bytes:
    head = b'{"spec": {"version": 1, "name": "'
    body = head + b"x" * (size - len(head) - 3) + b'"}}'
    assert len(body) == size
    return body


def test_bodies_over_the_limit_are_413_with_or_without_a_length(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path in ("/v1/jobs", "/v1/jobs:validate", "/v1/uploads"):
            r = http.post(path, content=_body(64 * 1024 + 1), headers={**auth(), "content-type": "application/json"})
            assert r.status_code == 413 and r.headers["content-type"].startswith("application/problem+json"), r.text

            def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count as it reads
                data = _body(1024 * 1024)
                for i in range(0, len(data), 16 * 1024):
                    yield data[i:i + 16 * 1024]

            r = http.post(path, content=chunks(), headers={**auth(), "content-type": "application/json"})
            assert r.status_code == 413, (path, r.status_code, r.text[:300])
        # Just under the limit the body is parsed (and judged on its content).
        r = http.post("/v1/jobs:validate", content=_body(60 * 1024),
                      headers={**auth(), "content-type": "application/json"})
        assert r.status_code == 422, r.text[:300]
        assert r.json()["problems"][0]["path"] == "name"  # over its own 200-character limit


def test_oversized_headers_are_refused_without_a_5xx(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for headers in ({"Authorization": "Bearer " + "t" * 200_000}, {"X-Filler": "f" * 200_000}):
            try:
                r = http.get("/v1/jobs", headers=headers)
            except httpx.TransportError:
                continue  # the server dropped the connection while the client was still sending: a refusal
            assert 400 <= r.status_code < 500, r.status_code
    assert [s for m in server.app.state.services.metrics.requests.collect() for s in m.samples
            if s.labels.get("status", "").startswith("5") and s.value] == []


def test_the_default_limit_is_one_mebibyte():
    from service.settings import Settings

    assert Settings(state_uri="s3://x/").max_request_bytes == 1024 * 1024
