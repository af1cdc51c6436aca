"""Bad requests around the spec: malformed and oversized bodies, bad query parameters, headers and path
segments, bad upload requests and bad credentials. Each must be a 4xx problem+json document naming what
was wrong, with no traceback, and must change nothing stored."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.badinput.badinput_helpers import auth, check_problem, spec

JSON = {"content-type": "application/json"}
JOB = "j-20250101t120000-0123abcd"  # well-formed, never created


def _deep(depth: int) -> bytes:
    return b'{"spec": {"version": 1, "deep": ' + b"[" * depth + b"]" * depth + b"}}"


# (id, method, path, raw body or JSON-able body or None, extra headers, status, words the problem must hold)
REQUEST_CASES: list[tuple[str, str, str, Any, dict[str, str], int, str | tuple[str, ...]]] = [
    ("body-not-json", "post", "/v1/jobs", b"version = 1", JSON, 400, "malformed"),
    ("body-not-utf8", "post", "/v1/jobs", b'\xff\xfe{"spec": {}}', JSON, 400, "malformed"),
    ("body-empty", "post", "/v1/jobs", b"", JSON, 400, "data"),
    ("body-array", "post", "/v1/jobs", [1, 2], {}, 400, "Expected `object`"),
    ("body-spec-missing", "post", "/v1/jobs", {"webhook_url": "https://example.com/h"}, {}, 400, "spec"),
    ("body-spec-not-object", "post", "/v1/jobs:validate", {"spec": "version = 1"}, {}, 400, "spec"),
    ("body-unknown-field", "post", "/v1/jobs", {"spec": {}, "priority": 9}, {}, 400, "priority"),
    ("webhook-not-http", "post", "/v1/jobs", {"spec": {}, "webhook_url": "file:///etc/passwd"}, {}, 400,
     "webhook_url"),
    ("webhook-oversized", "post", "/v1/jobs", {"spec": {}, "webhook_url": "https://x/" + "a" * 3000}, {}, 400,
     "webhook_url"),
    ("webhook-loopback", "post", "/v1/jobs", {"spec": {}, "webhook_url": "http://127.0.0.1:9/h"}, {}, 400,
     "webhook_url: host '127.0.0.1' is a private or loopback address"),
    ("webhook-private", "post", "/v1/jobs:validate", {"spec": {}, "webhook_url": "https://10.1.2.3/h"}, {}, 400,
     "webhook_url"),
    ("webhook-cloud-metadata", "post", "/v1/jobs", {"spec": {}, "webhook_url": "http://169.254.169.254/x"}, {},
     400, "webhook_url"),
    ("webhook-localhost-name", "post", "/v1/jobs", {"spec": {}, "webhook_url": "http://localhost:8080/h"}, {},
     400, "webhook_url"),
    ("number-out-of-range", "post", "/v1/jobs:validate", b'{"spec": {"version": 1e999}}', JSON, 400,
     "out of range"),
    ("nan-literal", "post", "/v1/jobs:validate", b'{"spec": {"version": NaN}}', JSON, 400, "malformed"),
    ("nested-2000-deep", "post", "/v1/jobs", _deep(2000), JSON, 400, "nested too deeply"),
    ("nested-100000-deep", "post", "/v1/jobs:validate", _deep(100_000), JSON, 400, "nested too deeply"),
    ("body-over-limit", "post", "/v1/jobs", b'{"spec": {"name": "' + b"x" * (2 * 1024 * 1024) + b'"}}', JSON, 413,
     "Request"),
    ("idempotency-key-oversized", "post", "/v1/jobs", {"spec": {}}, {"Idempotency-Key": "k" * 300}, 400,
     ("Idempotency-Key", "length <= 255")),
    ("idempotency-key-empty", "post", "/v1/jobs", {"spec": {}}, {"Idempotency-Key": ""}, 400,
     ("Idempotency-Key", "length >= 1")),
    ("content-type-text-plain", "post", "/v1/jobs", b'{"spec": {"version": 1}}', {"content-type": "text/plain"},
     415, "application/json or application/*+json; this request has Content-Type 'text/plain'"),
    ("content-type-form", "post", "/v1/jobs:validate", b"spec=1",
     {"content-type": "application/x-www-form-urlencoded"}, 415, "application/x-www-form-urlencoded"),
    ("content-type-multipart", "post", "/v1/uploads", b"--b\r\n\r\n--b--",
     {"content-type": "multipart/form-data; boundary=b"}, 415, "multipart/form-data"),
    ("content-type-missing", "post", "/v1/uploads", b'{"dataset": "d", "files": [{"path": "a.png"}]}', {}, 415,
     "no Content-Type"),
    ("content-type-json-lookalike", "post", "/v1/jobs", b'{"spec": {"version": 1}}',
     {"content-type": "application/jsonp"}, 415, "application/jsonp"),
    ("content-type-text-json", "post", "/v1/jobs:validate", b'{"spec": {"version": 1}}',
     {"content-type": "text/json"}, 415, "text/json"),
    ("body-lone-high-surrogate", "post", "/v1/jobs", b'{"spec": {"version": 1, "name": "a\\ud800b"}}', JSON, 400,
     "the string escape \\\\ud800 at byte 34 is half of a UTF-16 surrogate pair"),
    ("body-lone-high-surrogate-at-end", "post", "/v1/jobs:validate", b'{"spec": {"name": "\\udbff"}}', JSON, 400,
     "\\\\udbff at byte 19 is half of a UTF-16 surrogate pair"),
    ("body-lone-low-surrogate", "post", "/v1/uploads", b'{"dataset": "\\udc00", "files": []}', JSON, 400,
     "\\\\udc00 at byte 13 is half of a UTF-16 surrogate pair"),
    ("body-reversed-surrogate-pair", "post", "/v1/jobs", b'{"spec": {"name": "\\ude00\\ud83d"}}', JSON, 400,
     "\\\\ude00 at byte 19 is half of a UTF-16 surrogate pair"),
    ("list-limit-zero", "get", "/v1/jobs?limit=0", None, {}, 400, "limit"),
    ("list-limit-not-int", "get", "/v1/jobs?limit=ten", None, {}, 400, "limit"),
    ("list-limit-huge", "get", "/v1/jobs?limit=99999999999999999999", None, {}, 400, "limit"),
    ("list-status-unknown", "get", "/v1/jobs?status=exploded", None, {}, 400, "status"),
    ("list-cursor-empty", "get", "/v1/jobs?cursor=", None, {}, 400, ("cursor", "length >= 1")),
    ("list-cursor-forged", "get", "/v1/jobs?cursor=../../tenants/other/index/x", None, {}, 400, "cursor"),
    ("job-id-oversized", "get", "/v1/jobs/" + "j" * 100, None, {}, 400, "job_id"),
    ("job-id-malformed", "get", "/v1/jobs/not-a-job", None, {}, 404, "not-a-job"),
    ("job-id-unknown", "get", f"/v1/jobs/{JOB}", None, {}, 404, JOB),
    ("job-id-traversal", "get", "/v1/jobs/..%2F..%2Ftenants", None, {}, 404, "Not"),
    ("cancel-unknown", "post", f"/v1/jobs/{JOB}/cancel", None, {}, 404, JOB),
    ("delete-unknown", "delete", f"/v1/jobs/{JOB}", None, {}, 404, JOB),
    ("logs-tail-zero", "get", f"/v1/jobs/{JOB}/logs?tail=0", None, {}, 400, "tail"),
    ("logs-tail-huge", "get", f"/v1/jobs/{JOB}/logs?tail=100000", None, {}, 400, "tail"),
    ("events-last-id-oversized", "get", f"/v1/jobs/{JOB}/events", None, {"Last-Event-ID": "9" * 40}, 400,
     ("Last-Event-ID", "length <= 32")),
    ("events-unknown", "get", f"/v1/jobs/{JOB}/events", None, {"Last-Event-ID": "not-a-number"}, 404, JOB),
    ("upload-traversal", "post", "/v1/uploads", {"dataset": "d", "files": [{"path": "1_a/../../../other/x.png"}]},
     {}, 400, "files[0].path"),
    ("upload-absolute", "post", "/v1/uploads", {"dataset": "d", "files": [{"path": "/etc/passwd"}]}, {}, 400,
     "files[0].path"),
    ("upload-backslash", "post", "/v1/uploads", {"dataset": "d", "files": [{"path": "..\\..\\x.png"}]}, {}, 400,
     "files[0].path"),
    ("upload-crlf-path", "post", "/v1/uploads", {"dataset": "d", "files": [{"path": "1_a/x\r\nX-Evil: 1.png"}]},
     {}, 400, "files[0].path"),
    ("upload-crlf-content-type", "post", "/v1/uploads",
     {"dataset": "d", "files": [{"path": "1_a/x.png", "content_type": "image/png\r\nX-Evil: 1"}]}, {}, 400,
     "files[0].content_type"),
    ("upload-dataset-name", "post", "/v1/uploads", {"dataset": "../other", "files": [{"path": "a.png"}]}, {}, 400,
     "dataset"),
    ("upload-no-files", "post", "/v1/uploads", {"dataset": "d", "files": []}, {}, 400, "files"),
    ("upload-too-many-files", "post", "/v1/uploads",
     {"dataset": "d", "files": [{"path": f"1_a/{i}.png"} for i in range(1001)]}, {}, 400, "at most 1000"),
    ("method-not-allowed", "put", "/v1/jobs", None, {}, 405, "Method"),
    ("unknown-route", "get", "/v2/jobs", None, {}, 404, "Not"),
]

AUTH_CASES: list[tuple[str, dict[str, str]]] = [
    ("no-header", {}),
    ("empty-bearer", {"Authorization": "Bearer "}),
    ("basic-scheme", {"Authorization": "Basic YWNtZTpzZWNyZXQ="}),
    ("wrong-token", {"Authorization": "Bearer tok-guess-0000"}),
    ("token-oversized", {"Authorization": "Bearer " + "t" * 60_000}),
    ("token-hash-instead", {"Authorization": "Bearer " + "0" * 64}),
]


@pytest.mark.parametrize("case, method, path, body, headers, status, words", REQUEST_CASES,
                         ids=[c[0] for c in REQUEST_CASES])
def test_bad_request(bi_api, bi_bucket, bi_unchanged, case, method, path, body, headers, status, words):
    kwargs: dict[str, Any] = {"headers": {**auth(), **headers}}
    if isinstance(body, bytes):
        kwargs["content"] = body
    elif body is not None:
        if isinstance(body, dict) and body.get("spec") == {}:
            body = {**body, "spec": spec(bi_bucket)}  # a valid spec: only the rest of the request is wrong
        kwargs["content"] = json.dumps(body).encode()
        kwargs["headers"]["content-type"] = "application/json"
    check_problem(getattr(bi_api, "request")(method.upper(), path, **kwargs), status,
                  [words] if isinstance(words, str) else words)


@pytest.mark.parametrize("case, headers", AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_bad_credentials_are_401_everywhere(bi_api, bi_bucket, bi_unchanged, bi_existing_job, case, headers):
    job = bi_existing_job["id"]
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("POST", "/v1/jobs:validate"),
                         ("GET", f"/v1/jobs/{job}"), ("POST", f"/v1/jobs/{job}/cancel"), ("DELETE", f"/v1/jobs/{job}"),
                         ("GET", f"/v1/jobs/{job}/logs"), ("GET", f"/v1/jobs/{job}/events"), ("POST", "/v1/uploads")]:
        kwargs: dict[str, Any] = {"headers": headers}
        if method == "POST":
            kwargs["json"] = {"spec": spec(bi_bucket)}
        resp = bi_api.request(method, path, **kwargs)
        check_problem(resp, 401, ["Bearer"] if case in ("no-header", "empty-bearer", "basic-scheme") else ["not valid"])
        assert resp.headers["www-authenticate"].startswith("Bearer")
