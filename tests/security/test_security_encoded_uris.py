"""Percent-encoded dot segments and separators in URI fields, against a `file://` state root (where the
store decodes the URI) and an `s3://` one (where it decodes nothing). Tenant `acme-evil` points
`dataset.uri` or `save.output_uri` through its own area at `acme`'s: each form, field and endpoint is a
case of its own, and each must be a 422 naming the field, with nothing listed, created or written.

The property test: whatever a URI holds, if the tenant check accepts it, the location the stores open
(decoded once, as `parse_uri` does) and the location S3 or a decoding proxy would read both lie under
the prefix."""

from __future__ import annotations

import posixpath
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.common_helpers import app_clients
from tests.security.security_helpers import auth, png, spec
from tests.security.test_security_fuzz import FUZZ

# `{root}` is the state root; each form climbs from acme-evil's area into acme's.
FORMS = {
    "dotdot-lower": "{root}tenants/acme-evil/%2e%2e/acme/{rest}",
    "dotdot-upper": "{root}tenants/acme-evil/%2E%2E/acme/{rest}",
    "dotdot-mixed": "{root}tenants/acme-evil/.%2E/acme/{rest}",
    "encoded-slash": "{root}tenants/acme-evil/..%2facme/{rest}",
    "encoded-slash-upper": "{root}tenants/acme-evil/%2e%2e%2Facme/{rest}",
    "encoded-backslash": "{root}tenants/acme-evil/..%5cacme/{rest}",
    "double-encoded": "{root}tenants/acme-evil/%252e%252e/acme/{rest}",
}
FIELDS = {"dataset.uri": "datasets/x", "save.output_uri": "results/"}
ENDPOINTS = {"validate": "/v1/jobs:validate", "submit": "/v1/jobs"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, sec_bucket: str, sec_s3: Any) -> dict[str, str]:
    """A file:// and an s3:// state root, each with a dataset in acme's area."""
    base = tmp_path_factory.mktemp("file-state")
    dataset = base / "state" / "tenants" / "acme" / "datasets" / "x" / "2_cat"
    dataset.mkdir(parents=True)
    for i in range(2):
        (dataset / f"{i}.png").write_bytes(png())
        (dataset / f"{i}.txt").write_text("acme's private caption")
    s3_root = f"state-{uuid.uuid4().hex[:8]}/"
    for i in range(2):
        sec_s3.put_object(Bucket=sec_bucket, Key=f"{s3_root}tenants/acme/datasets/x/2_cat/{i}.png", Body=png())
        sec_s3.put_object(Bucket=sec_bucket, Key=f"{s3_root}tenants/acme/datasets/x/2_cat/{i}.txt", Body=b"a cat")
    return {"file": (base / "state").as_uri() + "/", "s3": f"s3://{sec_bucket}/{s3_root}"}


@pytest.fixture(scope="module")
def apis(roots: dict[str, str], sec_tokens_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One API per state root; no launcher, so a submit only records the job."""
    from service.settings import Settings

    def settings(**overrides: Any) -> Any:
        return Settings(**{"tokens_file": str(sec_tokens_file), "launcher": "none", "reconcile_interval_s": 0,
                           **overrides})

    clients = app_clients(settings)
    make = next(clients)
    yield {scheme: make(state_uri=root) for scheme, root in roots.items()}
    next(clients, None)


def _jobs_of(api: Any, tenant: str) -> list[str]:
    r = api.get("/v1/jobs", headers=auth(tenant))
    assert r.status_code == 200, r.text
    return [j["id"] for j in r.json()["items"]]


# S3 decodes nothing: a doubly encoded '%252e' is a literal key inside acme-evil's own area there.
CASES = [(scheme, form) for scheme in ("file", "s3") for form in sorted(FORMS)
         if not (scheme == "s3" and form == "double-encoded")]


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("scheme, form", CASES)
def test_encoded_dot_segments_do_not_cross_tenants(apis, roots, sec_bucket, scheme, form, field, endpoint):
    api, root = apis[scheme], roots[scheme]
    target = FORMS[form].format(root=root, rest=FIELDS[field])
    before = _jobs_of(api, "acme-evil")
    r = api.post(ENDPOINTS[endpoint], json={"spec": spec(sec_bucket, "acme-evil", **{field: target})},
                 headers=auth("acme-evil"))
    assert r.status_code == 422, (target, r.status_code, r.text)
    body = r.json()
    assert body["type"].endswith("/uri-not-allowed"), body
    assert [p["path"] for p in body["problems"]] == [field], body
    assert target in body["problems"][0]["message"], body  # names the URI and why, not a traceback
    assert "caption" not in r.text and "2_cat" not in r.text  # nothing of acme's was listed
    assert _jobs_of(api, "acme-evil") == before  # nothing created


def test_the_plain_form_of_the_same_location_is_still_allowed(apis, roots, sec_bucket):
    """The refusals are about encodings, not the places: acme's own dataset, named plainly, validates."""
    for scheme, root in roots.items():
        r = apis[scheme].post("/v1/jobs:validate", json={"spec": spec(sec_bucket, "acme", **{
            "dataset.uri": f"{root}tenants/acme/datasets/x", "save.output_uri": f"{root}tenants/acme/results/"})},
            headers=auth("acme"))
        assert r.status_code == 200, (scheme, r.text)
        assert r.json()["preflight"]["images"] == 2, r.json()


# ------------------------------------------------------------------------------ the property

PIECES = st.sampled_from(["acme", "acme-evil", "other", "tenants", "x", "..", ".", "", "%2e%2e", "%2E%2E", "%2e",
                          ".%2e", "%2f", "%2F", "%5c", "%5C", "..%2f", "%252e%252e", "%25", "%", "a\\b", "%00",
                          "%41", "?", "#", ";", "~"])


@FUZZ
@given(st.sampled_from(["file", "path", "s3"]), st.sampled_from(["tenants/acme/", "tenants/"]),
       st.lists(st.lists(PIECES, min_size=1, max_size=3).map("".join), min_size=1, max_size=6), st.booleans())
@example("file", "tenants/acme/", ["%2e%2e", "acme-evil", "x"], False)
@example("file", "tenants/acme/", ["..%2facme-evil"], True)
@example("s3", "tenants/acme/", ["..%2facme-evil"], False)
@example("path", "tenants/acme/", ["..", "acme-evil"], False)
def test_no_accepted_uri_resolves_outside_its_prefix(scheme, start, segments, trailing):
    from service.tenants import uri_under
    from trainer.core.storage import open_store

    root = {"file": "file:///srv/state/", "path": "/srv/state/", "s3": "s3://bucket/state/"}[scheme]
    prefix = root + "tenants/acme/"
    uri = root + start + "/".join(segments) + ("/" if trailing else "")
    if not uri_under(uri, prefix):
        return
    store = open_store(uri)
    if scheme in ("file", "path"):
        opened = store.root  # what a LocalStore reads and writes
        assert posixpath.normpath(opened) == opened and (opened + "/").startswith("/srv/state/tenants/acme/"), opened
        assert ".." not in opened.split("/")
    else:
        key = store.prefix  # the key S3 sees, and what a proxy that decodes once would see
        for seen in (key, urllib.parse.unquote(key)):
            assert ".." not in seen.split("/") and "." not in seen.split("/") and "\\" not in seen, (uri, seen)
            assert (posixpath.normpath(seen) + "/").startswith("state/tenants/acme/"), (uri, seen)
