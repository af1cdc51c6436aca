"""Reproducibility inputs: base_model_sha256 (computed once per model) and the dataset manifest."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

from tests.common_helpers import image_bytes
from trainer.job.fetch import fetch_dataset
from trainer.job.provenance import base_model_sha256, dataset_entry, manifest_bytes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_base_model_sha256_of_a_file_and_of_a_folder_in_path_order_cached(tmp_path):
    single = tmp_path / "m.safetensors"
    single.write_bytes(b"weights")
    assert base_model_sha256(str(single), None) == _sha(b"weights")
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"u")
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"t")
    (folder / "model_index.json").write_text("{}")  # not a weight file
    lines = f"text_encoder/model.safetensors\t{_sha(b't')}\nunet/diffusion_pytorch_model.safetensors\t{_sha(b'u')}\n"
    cache = tmp_path / "cache"
    assert base_model_sha256(str(folder), str(cache)) == _sha(lines.encode())
    (cached,) = (cache / "model-sha256").iterdir()
    cached.write_text("f" * 64 + "\n")  # a second call reads the cache, not the files
    assert base_model_sha256(str(folder), str(cache)) == "f" * 64
    os.utime(folder / "unet" / "diffusion_pytorch_model.safetensors", ns=(1, 1))  # changed file: computed again
    assert base_model_sha256(str(folder), str(cache)) == _sha(lines.encode())


def test_dataset_manifest_of_a_folder_and_of_an_archive(tmp_path):
    data = tmp_path / "data" / "10_cat"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("a cat")
    png = image_bytes(8, 8)
    (data / "a.png").write_bytes(png)
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("10_cat/a.png", png)
        zf.writestr("10_cat/a.txt", "a cat")
    sources: dict = {}
    root = fetch_dataset(str(tmp_path / "data"), str(tmp_path / "w1"), sources=sources)
    entry = dataset_entry("dataset.uri", "data", root, sources)
    assert entry["files"] == [{"key": "10_cat/a.png", "size": len(png), "etag": None, "sha256": _sha(png)},
                              {"key": "10_cat/a.txt", "size": 5, "etag": None, "sha256": _sha(b"a cat")}]
    sources = {}
    root = fetch_dataset(str(archive), str(tmp_path / "w2"), sources=sources)
    entry = dataset_entry("dataset.uri", "data.zip", root, sources)
    assert entry["archive"]["sha256"] == _sha(archive.read_bytes()) and entry["archive"]["size"] == archive.stat().st_size
    assert entry["members"] == [{"name": "10_cat/a.png", "size": len(png), "sha256": _sha(png)},
                                {"name": "10_cat/a.txt", "size": 5, "sha256": _sha(b"a cat")}]
    body = manifest_bytes([entry])
    assert json.loads(body)["datasets"][0]["members"] and manifest_bytes([entry]) == body


def test_manifest_changes_name_added_removed_and_changed_files():
    from trainer.job.provenance import manifest_changes

    def files(**sha):
        return [{"field": "dataset.uri", "uri": "u", "files": [{"key": k, "size": 1, "etag": None, "sha256": v}
                                                             for k, v in sha.items()]}]

    expected = {"version": 1, "datasets": files(a="1", b="2", c="3")}
    assert manifest_changes(expected, files(a="1", b="2", c="3")) == []
    assert manifest_changes(expected, files(a="1", b="9", d="4")) == ["b: changed", "c: removed", "d: added"]
