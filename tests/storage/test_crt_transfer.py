"""The CRT transfer engine against the local moto S3 server: what it fetches itself, what it hands back.

The boto3 fallback is switched off where a test must show that the CRT did the transfer on its own.
"""

from __future__ import annotations

import logging
import os

import pytest

from trainer.core.storage import NotFound, S3Store, StorageError, open_store

pytest.importorskip("awscrt")


def _no_fallback(monkeypatch) -> None:
    def refuse(self, info, dest):
        raise AssertionError(f"boto3 fallback used for {info.key}")

    monkeypatch.setattr(S3Store, "_download_expected", refuse)


AWKWARD = {
    "ds/1_a/plain.png": os.urandom(3000),
    "ds/1_a/with space & plus+.png": os.urandom(100),
    "ds/1_a/ünïcödé 雪.txt": "a caption".encode(),
    "ds/1_a/percent%20 and ~tilde=.txt": b"p",
    "ds/1_a/empty.txt": b"",
    "ds/2_b/deep/er/x.txt": b"deep",
    "ds/2_b/large.bin": os.urandom(20 * 1024 * 1024 + 123),  # above the 8 MiB part size: ranged parts
}


def test_crt_fetches_awkward_keys_empty_and_multipart_objects_by_itself(s3_bucket, tmp_path, monkeypatch) -> None:
    store = open_store(f"s3://{s3_bucket}")
    for key, body in AWKWARD.items():
        store.put_bytes(key, body)
    _no_fallback(monkeypatch)
    dest = tmp_path / "dest"
    listing = list(store.list("ds/"))
    total = store.download_tree("ds/", ((info, dest / info.key[3:]) for info in listing), dest, engine="crt")
    assert total == sum(len(b) for b in AWKWARD.values())
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == {key[3:]: body for key, body in AWKWARD.items()}


def test_auto_prefers_crt_unless_a_proxy_applies_to_the_endpoint(s3_bucket, monkeypatch) -> None:
    store = open_store(f"s3://{s3_bucket}")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
                 "LATHE_TRANSFER_ENGINE"):
        monkeypatch.delenv(name, raising=False)
    assert store.transfer_engine() == "crt"
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # for https only: the test server is plain http
    assert store.transfer_engine() == "crt"
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert store.transfer_engine() in ("s5cmd", "boto3")  # the CRT would not go through it
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # as clusters exempt their own object store
    assert store.transfer_engine() == "crt"
    monkeypatch.delenv("NO_PROXY")
    assert store.transfer_engine("crt") == "crt"  # asked for by name, it is used anyway
    with pytest.raises(ValueError, match="use auto, crt, s5cmd, boto3"):
        store.transfer_engine("aria2")


def test_a_link_at_the_destination_is_replaced_not_followed(s3_bucket, tmp_path, monkeypatch) -> None:
    store = open_store(f"s3://{s3_bucket}")
    store.put_bytes("m/model.bin", b"new weights")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    dest = tmp_path / "cache" / "model.bin"
    dest.parent.mkdir()
    dest.symlink_to(outside)
    _no_fallback(monkeypatch)
    store.download_many([(store.head("m/model.bin"), dest)], engine="crt")
    assert not dest.is_symlink() and dest.read_bytes() == b"new weights"
    assert outside.read_bytes() == b"keep me"


def test_objects_the_crt_cannot_get_end_in_the_usual_errors(s3_bucket, tmp_path, caplog) -> None:
    store = open_store(f"s3://{s3_bucket}")
    store.put_bytes("gone/a.txt", b"a")
    info = store.head("gone/a.txt")
    store.delete("gone/a.txt")  # listed, then deleted before the download
    with caplog.at_level(logging.WARNING, logger="trainer"), pytest.raises(NotFound, match="gone/a.txt"):
        store.download_many([(info, tmp_path / "a.txt")], engine="crt")
    assert any("crt" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)


def test_credentials_come_from_the_boto3_session(s3_bucket, tmp_path, monkeypatch) -> None:
    # moto accepts any signature, so what is checked is that the CRT signs with what boto3's
    # session returns, asking it afresh (refreshed credentials are picked up).
    store = open_store(f"s3://{s3_bucket}")
    store.put_bytes("c/a.txt", b"a")
    asked = []
    real = store.session.get_credentials

    def counting():
        asked.append(1)
        return real()

    monkeypatch.setattr(store.session, "get_credentials", counting)
    _no_fallback(monkeypatch)
    from trainer.core import crt_transfer

    monkeypatch.setattr(crt_transfer, "_clients", {})  # a client made now, with the counting session
    store.download_many([(store.head("c/a.txt"), tmp_path / "a.txt")], engine="crt")
    assert (tmp_path / "a.txt").read_bytes() == b"a"
    assert len(asked) >= 2  # once to decide on signing, then by the CRT's delegate when it signed


def test_crt_requested_without_awscrt_is_a_clear_error(s3_bucket, monkeypatch) -> None:
    from trainer.core import crt_transfer

    monkeypatch.setattr(crt_transfer, "crt_available", lambda: False)
    store = open_store(f"s3://{s3_bucket}")
    with pytest.raises(StorageError, match="pip install awscrt"):
        store.transfer_engine("crt")
    assert store.transfer_engine("auto") in ("s5cmd", "boto3")


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_garbage_collector_is_paused_only_while_the_crt_transfers(
    s3_bucket, tmp_path, enabled_before, monkeypatch,
) -> None:
    import gc

    store = open_store(f"s3://{s3_bucket}")
    for i in range(3):
        store.put_bytes(f"gc/{i}.txt", b"x" * i)
    seen = []

    def listing():  # read by the downloader while its transfers run
        for info in store.list("gc/"):
            seen.append(gc.isenabled())
            yield info, tmp_path / info.key

    _no_fallback(monkeypatch)
    (gc.enable if enabled_before else gc.disable)()
    try:
        store.download_tree("gc/", listing(), tmp_path, engine="crt")
        assert gc.isenabled() is enabled_before  # restored as it was
    finally:
        gc.enable()
    assert seen == [False, False, False]
    assert sorted(p.name for p in (tmp_path / "gc").iterdir()) == ["0.txt", "1.txt", "2.txt"]


def test_without_credentials_a_pull_ends_in_the_clear_storage_error(s3_bucket, tmp_path, monkeypatch) -> None:
    from trainer.job.fetch import fetch_dataset

    open_store(f"s3://{s3_bucket}").put_bytes("ds/1_a/x.txt", b"x")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_store(f"s3://{s3_bucket}")
    assert store.session.get_credentials() is None
    assert store.transfer_engine() != "crt"  # nothing to sign with: not chosen, and no traceback
    with pytest.raises(StorageError, match="no S3 credentials found"):
        fetch_dataset(f"s3://{s3_bucket}/ds/", str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()
