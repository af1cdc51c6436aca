"""The Store contract, run against the moto S3 server over HTTP and against a local folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import msgspec
import pytest

from trainer.core.failures import Reason
from trainer.core.storage import (
    LocalStore,
    NotFound,
    PreconditionFailed,
    S3Store,
    Store,
    StorageError,
    open_store,
    parse_uri,
)


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path) -> Store:
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return open_store(f"s3://{bucket}/root")
    return open_store(str(tmp_path / "root"))


class Job(msgspec.Struct):
    id: str
    steps: int


def test_bytes_json_head_exists(store: Store) -> None:
    store.put_bytes("jobs/a/spec.json", b'{"id":"a","steps":3}', content_type="application/json")
    assert store.get_bytes("jobs/a/spec.json") == b'{"id":"a","steps":3}'
    assert store.get_json("jobs/a/spec.json", Job) == Job("a", 3)
    store.put_json("jobs/a/status.json", {"phase": "training"})
    assert store.get_json("jobs/a/status.json") == {"phase": "training"}

    info = store.head("jobs/a/spec.json")
    assert (info.key, info.size) == ("jobs/a/spec.json", 20)
    assert info.etag and info.last_modified > 1.6e9
    assert store.exists("jobs/a/spec.json") and not store.exists("jobs/a/nope")
    with pytest.raises(NotFound) as err:
        store.get_bytes("jobs/a/nope")
    assert err.value.uri == store.uri("jobs/a/nope")
    with pytest.raises(NotFound):
        store.head("jobs/a/nope")


def test_get_range(store: Store) -> None:
    store.put_bytes("blob", bytes(range(100)))
    assert store.get_range("blob", 10, 5) == bytes(range(10, 15))
    assert store.get_range("blob", 95, 50) == bytes(range(95, 100))  # clipped at the end
    assert store.get_range("blob", 200, 5) == b""
    assert store.get_range("blob", 0, 0) == b""


def test_conditional_put_has_one_winner(store: Store) -> None:
    store.put_bytes("idempotency/k", b"job-1", if_none_match=True)
    with pytest.raises(PreconditionFailed) as err:
        store.put_json("idempotency/k", "job-2", if_none_match=True)
    assert err.value.reason == Reason.STORAGE_ERROR and err.value.exit_code == 21
    assert store.get_bytes("idempotency/k") == b"job-1"
    store.put_bytes("idempotency/k", b"job-3")  # unconditional writes still overwrite
    assert store.get_bytes("idempotency/k") == b"job-3"


def test_list_is_lexicographic_with_start_after_and_limit(store: Store) -> None:
    # "a-b" sorts before "a/…" ('-' < '/'): a folder walk must not list folders first.
    keys = ["a/x", "a-b", "a/y/z", "b", "a.txt", "ab/c", "index/003-j3", "index/001-j1", "index/002-j2"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list()] == sorted(keys)
    assert [o.size for o in store.list("a/")] == [3, 5]
    assert [o.key for o in store.list("a")] == sorted(k for k in keys if k.startswith("a"))
    assert [o.key for o in store.list("index/", limit=2)] == ["index/001-j1", "index/002-j2"]
    assert [o.key for o in store.list("index/", start_after="index/001-j1", limit=5)] == [
        "index/002-j2", "index/003-j3",
    ]
    assert [o.key for o in store.list(start_after="a/x")] == ["a/y/z", "ab/c", "b"] + [
        k for k in sorted(keys) if k.startswith("index/")
    ]
    assert list(store.list("nothing/")) == []
    assert list(store.list(limit=0)) == []


def test_an_object_deleted_while_it_is_listed_is_left_out(store: Store) -> None:
    for name in ("a", "b", "c"):
        store.put_bytes(f"gone/{name}.txt", b"x")
    listing = store.list("gone/")
    first = next(listing)
    store.delete("gone/b.txt")  # after the listing began, before it reached b
    rest = [info.key for info in listing]
    assert first.key == "gone/a.txt" and "gone/c.txt" in rest and set(rest) <= {"gone/b.txt", "gone/c.txt"}


def test_s3_list_pages_through_continuation_tokens(s3_bucket: str, monkeypatch) -> None:
    store = open_store(f"s3://{s3_bucket}/p")
    assert isinstance(store, S3Store)
    monkeypatch.setattr(S3Store, "page_size", 3)
    keys = [f"k{i:02d}" for i in range(11)]
    for key in keys:
        store.put_bytes(key, b"x")
    assert [o.key for o in store.list()] == keys
    assert [o.key for o in store.list(start_after="k04", limit=4)] == ["k05", "k06", "k07", "k08"]
    assert [o.key for o in store.list(start_after="k08")] == ["k09", "k10"]

    asked: list[int] = []  # MaxKeys of each LIST request, as sent
    store.client.meta.events.register("before-call.s3.ListObjectsV2",
                                      lambda params, **_: asked.append(params["query_string"]["max-keys"]))
    assert [o.key for o in store.list(first_page=2)] == keys
    assert asked == [2, 3, 3, 3]  # a short first page, then the usual pages: 2 + 3 + 3 + 3 keys
    asked.clear()
    assert [o.key for o in store.list(first_page=2, limit=1)] == ["k00"]
    assert asked == [1]


def test_listing_and_head_agree_on_last_modified(s3_bucket: str) -> None:
    # Listings carry ISO 8601 times ("…T…Z"); HEAD carries an RFC 1123 header date. Both must give
    # the same instant, to the second HTTP dates keep.
    store = open_store(f"s3://{s3_bucket}/times")
    store.put_bytes("a", b"x")
    (listed,) = list(store.list())
    assert abs(listed.last_modified - store.head("a").last_modified) < 1.0
    assert abs(listed.last_modified - time.time()) < 600


def test_delete_and_delete_prefix(store: Store) -> None:
    for key in ["jobs/a/1", "jobs/a/2/x", "jobs/ab", "jobs/b/1"]:
        store.put_bytes(key, b"1")
    store.delete("jobs/b/1")
    store.delete("jobs/b/1")  # deleting a missing object is not an error (as on S3)
    assert store.delete_prefix("jobs/a/") == 2
    assert [o.key for o in store.list()] == ["jobs/ab"]


def test_child_and_uri(store: Store) -> None:
    job = store.child("tenants/t1/jobs/j1")
    job.put_bytes("status.json", b"{}")
    assert store.exists("tenants/t1/jobs/j1/status.json")
    assert job.uri("status.json") == store.uri("tenants/t1/jobs/j1/status.json")
    assert [o.key for o in job.list()] == ["status.json"]
    reopened = open_store(job.root_uri)
    assert reopened.get_bytes("status.json") == b"{}"


def test_upload_download_file_verified(store: Store, tmp_path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(300_000))
    info = store.upload_file(src, "out/adapter.safetensors")
    assert info.size == 300_000
    dest = tmp_path / "dl" / "x.bin"
    assert store.download_file("out/adapter.safetensors", dest).size == 300_000
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(NotFound):
        store.download_file("out/missing", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_multipart_upload_and_download_of_large_file(s3_bucket: str, tmp_path) -> None:
    store = open_store(f"s3://{s3_bucket}")
    big = tmp_path / "big.bin"
    data = os.urandom(9 * 1024 * 1024 + 123)  # over the 8 MiB multipart threshold
    big.write_bytes(data)
    info = store.upload_file(big, "models/big.safetensors")
    assert info.size == len(data)
    assert info.etag.endswith("-2")  # S3's multipart ETag: "<md5 of part md5s>-<parts>"
    dest = tmp_path / "back.bin"
    store.download_file("models/big.safetensors", dest)
    assert dest.read_bytes() == data


def test_presigned_get_and_put_work_with_plain_urllib(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/uploads")
    store.put_bytes("a.txt", b"hello")
    with urllib.request.urlopen(store.presign_get("a.txt", expires_s=60)) as resp:
        assert resp.read() == b"hello"
    url = store.presign_put("b.png", content_type="image/png")
    req = urllib.request.Request(url, data=b"\x89PNG", method="PUT", headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 200
    assert store.get_bytes("b.png") == b"\x89PNG"
    # SigV4 URLs; the local S3 server checks neither their signature nor their expiry, so verify them
    # as S3 does: the signature covers the key and the content type.
    import datetime as dt

    from tests.security.security_helpers import presigned_url_accepted

    secret, now = os.environ["AWS_SECRET_ACCESS_KEY"], dt.datetime.now(dt.timezone.utc)
    assert presigned_url_accepted(url, secret, "PUT", now, {"Content-Type": "image/png"})
    assert not presigned_url_accepted(url.replace("b.png", "c.png"), secret, "PUT", now, {"Content-Type": "image/png"})
    assert not presigned_url_accepted(url, secret, "PUT", now, {"Content-Type": "text/html"})


def test_local_presign_is_a_file_uri(tmp_path) -> None:
    store = open_store(f"file://{tmp_path}")
    store.put_bytes("x/y.txt", b"ok")
    with urllib.request.urlopen(store.presign_get("x/y.txt")) as resp:
        assert resp.read() == b"ok"


def test_local_store_refuses_keys_escaping_its_root(tmp_path) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(ValueError, match="escapes"):
        store.put_bytes("../outside", b"x")
    assert not (tmp_path / "outside").exists()


def test_local_writes_leave_no_temporary_files(tmp_path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a/b", b"1")
    store.put_bytes("a/b", b"2")
    with pytest.raises(PreconditionFailed):
        store.put_bytes("a/b", b"3", if_none_match=True)
    assert sorted(os.listdir(tmp_path / "a")) == ["b"]


def test_missing_bucket_is_a_storage_error_naming_it(s3_server: str) -> None:
    store = open_store("s3://no-such-bucket-here/x")
    with pytest.raises(StorageError, match="no-such-bucket-here") as err:
        store.get_bytes("k")
    assert not isinstance(err.value, NotFound)


def test_parse_uri() -> None:
    assert parse_uri("s3://bucket/a/b.zip") == ("s3", "bucket", "a/b.zip")
    assert parse_uri("s3://bucket") == ("s3", "bucket", "")
    assert parse_uri("file:///data/x%20y") == ("file", "", "/data/x y")
    assert parse_uri("rel/dir")[2] == os.path.abspath("rel/dir")
    assert parse_uri("file:///data/50%25") == ("file", "", "/data/50%")
    assert parse_uri("s3://bucket/50%/x") == ("s3", "bucket", "50%/x")  # S3 keys: nothing decoded
    assert parse_uri("/data//x/") == ("file", "", "/data/x")
    for bad in ["", "s3://", "s3://ab/k", "gs://bucket/x", "file://host/x", "s3://b%2fx/k"]:
        with pytest.raises(ValueError):
            parse_uri(bad)


@pytest.mark.parametrize("uri, why", [
    ("file:///state/tenants/b/%2e%2e/a/x", "'.' or '..' segment"),
    ("file:///state/tenants/b/%2E%2E/a/x", "'.' or '..' segment"),
    ("file:///state/tenants/b/.%2e/a/x", "'.' or '..' segment"),
    ("file:///state/tenants/b/%2e/x", "'.' or '..' segment"),
    ("file:///state/tenants/b/../a/x", "'.' or '..' segment"),
    ("file:///state/tenants/b/..%2fa/x", "percent-encoded separator"),
    ("file:///state/tenants/b/..%2Fa/x", "percent-encoded separator"),
    ("file:///state/tenants/b/..%5ca", "percent-encoded separator"),
    ("file:///state/tenants/b/%252e%252e/a", "still a percent-encoded"),
    ("file:///state/tenants/b/x%00", "control character"),
    ("file:///state/tenants/b/x?/../../a", "query"),
    ("file:///state/tenants/b/a%5Cb", "percent-encoded separator"),
    ("file:///state/tenants/b/a%ff", "not UTF-8"),
    ("file://state/tenants/b", "remote host"),
    ("s3://bucket/tenants/b/%2e%2e/a/x", "percent-encoded '.'"),
    ("s3://bucket/tenants/b/%2E%2E/a/x", "percent-encoded '.'"),
    ("s3://bucket/tenants/b/..%2fa/x", "percent-encoded '.'"),
    ("s3://bucket/tenants/b/x%5C..", "percent-encoded '.'"),
    ("s3://bucket/tenants/b/../a/x", "'.' or '..' segment"),
    ("s3://bucket/tenants/b//x", "empty segment"),
    ("s3://bucket/tenants/b\\..\\a", "backslash"),
    ("/state/tenants/b/../a", "'.' or '..' segment"),
])
def test_parse_uri_refuses_what_could_name_another_place(uri: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_uri(uri)


def test_storage_module_does_not_import_torch() -> None:
    code = (
        "import sys, trainer.core.storage, trainer.job.fetch\n"
        "bad = [m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
