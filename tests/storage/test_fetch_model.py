"""Base-model fetching into the node-local cache keyed by content, with a lock between jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from storage_helpers import read_tree

from trainer.core.failures import JobFailure, Reason
from trainer.job.fetch import ensure_model, fetch_model
from trainer.core.storage import open_store

REPO = Path(__file__).resolve().parents[2]


def diffusers_folder(size: int = 50_000) -> dict[str, bytes]:
    return {
        "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
        "unet/config.json": b'{"sample_size": 8}',
        "unet/diffusion_pytorch_model.safetensors": os.urandom(size),
        "vae/diffusion_pytorch_model.safetensors": os.urandom(size // 2),
        "tokenizer/merges.txt": b"",  # empty non-weight files are legitimate
    }


def upload(bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    store = open_store(f"s3://{bucket}/{prefix}")
    for rel, data in files.items():
        store.put_bytes(rel, data)


def test_folder_model_is_cached_by_content(s3_bucket, tmp_path) -> None:
    files = diffusers_folder()
    upload(s3_bucket, "models/tiny-sd", files)
    cache = str(tmp_path / "cache")
    uri = f"s3://{s3_bucket}/models/tiny-sd"

    first = ensure_model(uri, cache)
    assert first.downloaded and first.bytes == sum(map(len, files.values()))
    assert read_tree(first.path) == files
    weights = Path(first.path) / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns

    again = ensure_model(uri + "/", cache)  # same prefix, other spelling: a hit, nothing downloaded
    assert (again.path, again.content_key, again.downloaded) == (first.path, first.content_key, False)
    assert weights.stat().st_mtime_ns == mtime
    assert fetch_model(uri, cache) == first.path

    # The same content under another URI shares the entry; changed content is a new entry.
    upload(s3_bucket, "models/copy", files)
    assert ensure_model(f"s3://{s3_bucket}/models/copy", cache).path == first.path
    upload(s3_bucket, "models/tiny-sd", {"unet/config.json": b'{"sample_size": 16}'})
    changed = ensure_model(uri, cache)
    assert changed.downloaded and changed.path != first.path
    assert (Path(changed.path) / "unet" / "config.json").read_bytes() == b'{"sample_size": 16}'
    # Only complete entries and their markers are left in the cache.
    names = sorted(n for n in os.listdir(Path(cache) / "models") if not n.endswith(".lock"))
    assert len(names) == 4 and all(".partial" not in n for n in names)


def test_single_file_model(s3_bucket, tmp_path) -> None:
    data = os.urandom(30_000)
    open_store(f"s3://{s3_bucket}").put_bytes("ckpt/v1-5-pruned.safetensors", data)
    path = fetch_model(f"s3://{s3_bucket}/ckpt/v1-5-pruned.safetensors", str(tmp_path))
    assert path.endswith("/v1-5-pruned.safetensors") and Path(path).read_bytes() == data
    assert not ensure_model(f"s3://{s3_bucket}/ckpt/v1-5-pruned.safetensors", str(tmp_path)).downloaded


def test_bad_models_are_model_invalid(s3_bucket, tmp_path) -> None:
    store = open_store(f"s3://{s3_bucket}")
    store.put_bytes("empty.safetensors", b"")
    upload(s3_bucket, "broken", {**diffusers_folder(), "unet/diffusion_pytorch_model.safetensors": b""})
    local_empty = tmp_path / "local.ckpt"
    local_empty.write_bytes(b"")
    cases = [
        (f"s3://{s3_bucket}/empty.safetensors", "empty.safetensors is empty (0 bytes)"),
        (f"s3://{s3_bucket}/broken", "broken/unet/diffusion_pytorch_model.safetensors is empty"),
        (f"s3://{s3_bucket}/missing.safetensors", "does not exist"),
        (f"s3://{s3_bucket}/no/such/folder", "no model at"),
        (str(local_empty), "local.ckpt is empty"),
        (str(tmp_path / "nowhere"), "does not exist"),
    ]
    for uri, fragment in cases:
        with pytest.raises(JobFailure) as err:
            fetch_model(uri, str(tmp_path / "cache"))
        assert err.value.reason == Reason.MODEL_INVALID and err.value.exit_code == 12
        assert fragment in err.value.message, err.value.message
    assert not (tmp_path / "cache" / "models").exists() or not [
        n for n in os.listdir(tmp_path / "cache" / "models") if n.endswith(".complete")
    ]


def test_local_model_paths_are_returned_as_is(tmp_path) -> None:
    folder = tmp_path / "sd"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    assert fetch_model(str(folder), str(tmp_path / "cache")) == str(folder)
    assert fetch_model(folder.as_uri(), str(tmp_path / "cache")) == str(folder)
    assert not (tmp_path / "cache").exists()


_FETCH_TOGETHER = """
import json, os, sys, time
from trainer.job.fetch import ensure_model
from trainer.core.storage import s3_client
s3_client()  # imports and client set up first: then wait for the other process (a file barrier)
open(os.path.join(sys.argv[3], str(os.getpid())), "w").close()
while len(os.listdir(sys.argv[3])) < 2:
    time.sleep(0.01)
began = time.time()
r = ensure_model(sys.argv[1], sys.argv[2])
print(json.dumps({"path": r.path, "downloaded": r.downloaded, "began": began, "ended": time.time()}))
"""


def test_two_processes_on_one_node_download_once(s3_bucket, tmp_path) -> None:
    files = diffusers_folder(size=9 * 1024 * 1024)  # multipart-sized, so the download takes a while
    upload(s3_bucket, "models/shared", files)
    uri, cache = f"s3://{s3_bucket}/models/shared", str(tmp_path / "cache")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _FETCH_TOGETHER, uri, cache, str(barrier)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["downloaded"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    # The other process began before the download had finished, so it found no complete entry
    # and waited on the lock instead of downloading too.
    waiter = next(r for r in results if not r["downloaded"])
    downloader = next(r for r in results if r["downloaded"])
    assert waiter["began"] < downloader["ended"] <= waiter["ended"]
    assert read_tree(results[0]["path"]) == files
