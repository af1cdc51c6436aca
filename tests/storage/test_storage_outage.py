"""The S3 server unreachable for ~3 s: requests and a running dataset download still finish."""

from __future__ import annotations

import glob
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from storage_helpers import png_bytes, read_tree

from trainer.job.fetch import fetch_dataset
from trainer.core.storage import S3Store, StorageError, open_store

OUTAGE_S = 3.0


def test_request_during_an_outage_succeeds_once_the_server_is_back(s3_bucket, s3_proxy) -> None:
    open_store(f"s3://{s3_bucket}").put_bytes("status.json", b'{"phase": "training"}')
    store = open_store(f"s3://{s3_bucket}", endpoint_url=s3_proxy.endpoint)
    assert store.get_bytes("status.json")  # warm connection, which the outage will reset
    outage = threading.Thread(target=s3_proxy.outage, args=(OUTAGE_S,))
    outage.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert store.get_bytes("status.json") == b'{"phase": "training"}'
    store.put_bytes("heartbeat", b"1")
    assert time.monotonic() - started >= OUTAGE_S - 0.5  # it really waited the outage out
    outage.join()


def test_outage_longer_than_the_retry_budget_is_a_storage_error(s3_bucket, s3_proxy) -> None:
    store = S3Store(s3_bucket, endpoint_url=s3_proxy.endpoint, max_attempts=2)
    s3_proxy.stop()
    with pytest.raises(StorageError, match="gave up after") as err:
        store.get_bytes("anything")
    assert err.value.uri == f"s3://{s3_bucket}/anything" and err.value.exit_code == 21


@pytest.fixture(scope="module")
def outage_dataset(s3_server: str) -> tuple[str, dict[str, bytes]]:
    """150 small images in their own bucket, uploaded once for the module."""
    bucket = f"outage-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    files = {f"1_concept/{i:04d}.png": png_bytes(8, 8, seed=i) for i in range(150)}
    store = open_store(f"s3://{bucket}/ds")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: store.put_bytes(*item), files.items()))
    return bucket, files


def test_dataset_download_survives_an_outage(outage_dataset, s3_proxy, tmp_path, monkeypatch) -> None:
    bucket, files = outage_dataset
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint)
    dest = tmp_path / "dataset"
    outcome: dict[str, object] = {}

    def download() -> None:
        try:
            outcome["path"] = fetch_dataset(f"s3://{bucket}/ds", str(dest), workers=4)
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            outcome["error"] = e

    worker = threading.Thread(target=download)
    worker.start()
    # Cut the server off once the download is under way.
    deadline = time.monotonic() + 60
    while len(glob.glob(f"{dest}.partial-*/1_concept/*.png")) < 10 and worker.is_alive():
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.002)
    assert worker.is_alive(), "the download finished before the outage; make it larger"
    landed_before = len(glob.glob(f"{dest}.partial-*/1_concept/*.png"))
    s3_proxy.outage(OUTAGE_S)
    worker.join(90)
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert landed_before < len(files)
    assert read_tree(dest) == files
