"""HTTP semantics every path shares, over real HTTP (uvicorn): HEAD wherever GET works (RFC 9110 §9.3.2),
OPTIONS listing every method of the path, `Allow` on every 405, and what counts as a JSON body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.service.conftest import LiveServer, TOKENS, spec

AUTH = {"Authorization": f"Bearer {TOKENS['acme']}"}


@pytest.fixture(scope="module")
def site(bucket: str, tokens_file: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    """The real app (no launcher: the job stays queued, its event stream never ends) and one job."""
    from service.api.app import create_app
    from service.settings import Settings

    settings = Settings(state_uri=f"s3://{bucket}/methods/", tokens_file=str(tokens_file), launcher="none",
                        reconcile_interval_s=0, local_dir=str(tmp_path_factory.mktemp("local")))
    server = LiveServer(create_app(settings, use_settings_launcher=False, events_poll_s=0.1))
    job = httpx.post(f"{server.url}/v1/jobs", json={"spec": spec(bucket)}, headers=AUTH, timeout=60)
    assert job.status_code == 201, job.text
    yield server, job.json()["id"]
    server.stop()


def _documented(server: LiveServer, job_id: str) -> dict[str, set[str]]:
    """path (with the job's id) → the methods the OpenAPI document gives it."""
    document = httpx.get(f"{server.url}/schema/openapi.json").json()
    return {path.replace("{job_id}", job_id): {m.upper() for m in item} for path, item in document["paths"].items()}


def _allow(resp: httpx.Response) -> set[str]:
    return {m.strip() for m in resp.headers["allow"].split(",")}


def test_head_answers_wherever_get_does(site):
    server, job_id = site
    gets = [path for path, methods in _documented(server, job_id).items() if "GET" in methods]
    assert len(gets) >= 7 and f"/v1/jobs/{job_id}/events" in gets
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as http:
        for path in [*gets, "/schema/openapi.json", "/v1/jobs/j-20250101t120000-0123abcd", "/v1/jobs/" + "j" * 80]:
            head = http.head(path)
            assert head.content == b"", path
            if path.endswith("/events"):  # a stream that never ends: HEAD gets its status and headers, then the end
                assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
                continue
            get = http.get(path)
            assert head.status_code == get.status_code, (path, head.status_code, get.status_code)
            assert head.headers["content-type"] == get.headers["content-type"], path
            if path != "/metrics":  # the metrics grow between the two calls
                assert head.headers["content-length"] == str(len(get.content)), path
        # Authentication is the GET's: no token, 401 and no body.
        bare = httpx.head(f"{server.url}/v1/jobs/{job_id}", timeout=10)
        assert bare.status_code == 401 and bare.content == b"" and bare.headers["www-authenticate"].startswith("Bearer")


def test_options_lists_every_method_of_the_path(site):
    server, job_id = site
    documented = _documented(server, job_id)
    assert documented["/v1/jobs"] >= {"GET", "POST"} and documented[f"/v1/jobs/{job_id}"] >= {"GET", "DELETE"}
    for path, methods in documented.items():
        resp = httpx.options(f"{server.url}{path}", timeout=10)  # open, like CORS preflights
        assert resp.status_code == 204, (path, resp.status_code)
        expected = methods | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
        assert _allow(resp) == expected, (path, resp.headers["allow"])


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "POST", "GET", "HEAD", "TRACE"])
def test_every_405_carries_allow(site, method):
    server, job_id = site
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as http:
        for path, methods in _documented(server, job_id).items():
            if method in methods or (method == "HEAD" and "GET" in methods):
                continue
            resp = http.request(method, path)
            assert resp.status_code == 405, (method, path, resp.status_code)
            assert resp.headers["content-type"] == "application/problem+json"
            assert _allow(resp) == _allow(http.options(path)), (method, path, resp.headers.get("allow"))


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.lathe.job+json"])
def test_json_bodies_are_read_under_every_json_media_type(site, bucket, content_type):
    server, _ = site
    body = json.dumps({"spec": spec(bucket)}).encode()
    resp = httpx.post(f"{server.url}/v1/jobs:validate", content=body, headers={**AUTH, "content-type": content_type},
                      timeout=60)
    assert resp.status_code == 200 and resp.json()["ok"] is True, resp.text
