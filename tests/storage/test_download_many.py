"""`S3Store.download_many` on both download paths (the CRT and s3transfer's threads), against the
local moto S3 server."""

from __future__ import annotations

import collections
import os

import pytest

from trainer.core.failures import JobFailure, Reason
from trainer.core.storage import AccessDenied, NotFound, ObjectInfo, StorageError, open_store, transfers

AWKWARD = {
    "ds/1_a/plain.png": os.urandom(3000),
    "ds/1_a/with space & plus+.png": os.urandom(100),
    "ds/1_a/ünïcödé 雪.txt": "a caption".encode(),
    "ds/1_a/percent%20 and ~tilde=.txt": b"p",
    "ds/1_a/empty.txt": b"",
    "ds/2_b/deep/er/x.txt": b"deep",
    "ds/2_b/large.bin": os.urandom(20 * 1024 * 1024 + 123),  # above the 8 MiB part size: ranged parts
}


@pytest.fixture(params=["crt", "classic"])
def manager(request, monkeypatch) -> str:
    """Each test runs on both download paths: the CRT's S3 client (awscrt installed, as in the trainer
    image) and s3transfer's classic TransferManager (without awscrt)."""
    if request.param == "classic":
        monkeypatch.setattr(transfers, "_crt_client_and_requests", lambda client, endpoint: None)
    return request.param


def test_awkward_keys_empty_and_multipart_objects_with_one_get_per_small_object(s3_bucket, tmp_path, manager) -> None:
    store = open_store(f"s3://{s3_bucket}")
    for key, body in AWKWARD.items():
        store.put_bytes(key, body)
    dest = tmp_path / "dest"
    listing = list(store.list("ds/"))
    calls: collections.Counter[str] = collections.Counter()
    # The classic manager calls our client; for the CRT botocore builds the first request only.
    client = store.client if manager == "classic" else transfers._crt_client_and_requests(
        store.client, store.endpoint_url)[1].serializer._client
    client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    total = store.download_many((info, dest / info.key[3:]) for info in listing)
    assert total == sum(len(b) for b in AWKWARD.values())
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == {key[3:]: body for key, body in AWKWARD.items()}  # and no temporary file left
    # Size and ETag come from the listing: no HEAD. The classic manager fetches the 20 MiB object in
    # three ranged parts. The CRT splits it into parts itself, and botocore's first GET is the
    # template of the others: the awkward keys arriving intact shows they were quoted alike.
    assert calls == {"GetObject": len(AWKWARD) - 1 + 3 if manager == "classic" else 1}


def test_a_link_at_the_destination_is_replaced_not_followed(s3_bucket, tmp_path, manager) -> None:
    store = open_store(f"s3://{s3_bucket}")
    store.put_bytes("m/model.bin", b"new weights")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    dest = tmp_path / "cache" / "model.bin"
    dest.parent.mkdir()
    dest.symlink_to(outside)
    store.download_many([(store.head("m/model.bin"), dest)])
    assert not dest.is_symlink() and dest.read_bytes() == b"new weights"
    assert outside.read_bytes() == b"keep me"


def test_an_object_deleted_or_changed_after_the_listing_is_an_error_naming_it(s3_bucket, tmp_path, manager) -> None:
    store = open_store(f"s3://{s3_bucket}")
    store.put_bytes("gone/a.txt", b"a")
    info = store.head("gone/a.txt")
    store.delete("gone/a.txt")  # listed, then deleted before the download
    with pytest.raises(NotFound, match="gone/a.txt"):
        store.download_many([(info, tmp_path / "a.txt")])
    store.put_bytes("grew/b.txt", b"bbbb")
    listed = ObjectInfo("grew/b.txt", 2, "", 0.0)  # as a listing taken before it was rewritten
    with pytest.raises(StorageError, match="grew/b.txt changed during the download"):
        store.download_many([(listed, tmp_path / "b.txt")])


def test_without_credentials_a_pull_fails_at_once_with_the_clear_error(s3_bucket, tmp_path, monkeypatch) -> None:
    from trainer.job.fetch import fetch_dataset

    open_store(f"s3://{s3_bucket}").put_bytes("ds/1_a/x.txt", b"x")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(AccessDenied, match="no S3 credentials found"):
        open_store(f"s3://{s3_bucket}").get_bytes("ds/1_a/x.txt")
    # Not retried through the job-level backoff: nobody will add credentials meanwhile.
    with pytest.raises(JobFailure, match="no S3 credentials found") as err:
        fetch_dataset(f"s3://{s3_bucket}/ds/", str(tmp_path / "dest"))
    assert err.value.reason == Reason.STORAGE_ERROR
    assert not (tmp_path / "dest").exists()


def test_one_failure_among_many_stops_the_rest_and_leaves_no_temporary_file(s3_bucket, tmp_path, manager) -> None:
    store = open_store(f"s3://{s3_bucket}")
    for i in range(300):
        store.put_bytes(f"many/{i:03d}.txt", os.urandom(2000))
    listing = list(store.list("many/"))
    store.delete("many/150.txt")  # listed, gone before its turn
    with pytest.raises(NotFound, match="many/150.txt"):
        store.download_many((info, tmp_path / info.key) for info in listing)
    left = [p.name for p in (tmp_path / "many").iterdir()]
    assert left and not [name for name in left if not name.endswith(".txt") or "150" in name], left


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", None])
def test_a_templated_get_is_the_request_botocore_builds(endpoint, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    _, requests = transfers._new_crt_parts(endpoint, "eu-west-1")

    def seen(request) -> tuple:
        return request.method, request.path, sorted((k, v) for k, v in request.headers
                                                    if k not in ("amz-sdk-invocation-id", "amz-sdk-request"))

    requests.get("bkt", "first")  # becomes the bucket's template
    for key in [k[3:] for k in AWKWARD] + ["?q=1&x", "a//b", "#frag", "a+b c", "ü/雪.png"]:
        assert seen(requests.get("bkt", key)) == seen(requests.botocore_get("bkt", key)), key
