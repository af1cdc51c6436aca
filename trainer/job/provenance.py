"""What a job ran on, by content: the base model's sha256 and the dataset manifest.

- `base_model_sha256`: of the single file, or for a diffusers folder the sha256 of the lines
  `<relative path>\\t<sha256 of the file>\\n` of its weight files (`.safetensors`, `.bin`, `.ckpt`, `.pt`),
  sorted by path. Computed once per model: the result is kept in the model cache, keyed by the
  files' paths, sizes and modification times.
- `dataset_manifest`: every dataset file's key, size, ETag (where the store gives one) and the sha256 of
  the bytes as read; for an archive, the archive's own key, size, ETag and sha256 and its member list.
  Stored beside the outputs as `dataset-manifest.json`; its sha256 goes into `metadata.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trainer.core.jobdir import sha256_file
from trainer.core.jobkeys import DATASET_MANIFEST_NAME

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
MANIFEST_NAME = DATASET_MANIFEST_NAME


def _weight_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES),
                  key=lambda p: p.relative_to(root).as_posix())


def base_model_sha256(path: str, cache_dir: str | None) -> str:
    root = Path(path)
    files = _weight_files(root)
    identity = hashlib.sha256("\n".join(
        f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}" for f in files).encode()).hexdigest()
    cached = Path(cache_dir) / "model-sha256" / identity if cache_dir else None
    if cached is not None and cached.is_file():
        value = cached.read_text().strip()
        if len(value) == 64:
            return value
    if root.is_file():
        value = sha256_file(root)
    else:
        lines = "".join(f"{f.relative_to(root).as_posix()}\t{sha256_file(f)}\n" for f in files)
        value = hashlib.sha256(lines.encode()).hexdigest()
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{identity}.tmp{os.getpid()}")
            tmp.write_text(value + "\n")
            tmp.replace(cached)
        except OSError:
            pass  # a read-only cache costs a second hash next time, nothing else
    return value


def dataset_entry(field: str, uri: str, local_root: str, sources: dict) -> dict:
    """One dataset's part of the manifest. `sources` is what `fetch_dataset` recorded."""
    root = Path(local_root)
    objects = sources.get("objects") or {}
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        key, size, etag = objects.get(rel, (rel, path.stat().st_size, None))
        files.append({"key": key, "size": size, "etag": etag, "sha256": sha256_file(path)})
    entry: dict = {"field": field, "uri": uri, "files": files}
    if "archive" in sources:
        entry["archive"] = sources["archive"]
        entry["members"] = [{"name": f["key"], "size": f["size"], "sha256": f["sha256"]} for f in files]
        del entry["files"]
    return entry


def manifest_changes(expected: dict, entries: list[dict]) -> list[str]:
    """Files whose bytes differ from an earlier manifest: '<key>: added|removed|changed', by sha256."""
    def by_key(datasets: list[dict]) -> dict[str, str]:
        out = {}
        for d in datasets:
            if "archive" in d:
                out[d["archive"]["key"]] = d["archive"]["sha256"]
            for f in d.get("files", []):
                out[f["key"]] = f["sha256"]
        return out

    old, new = by_key(expected.get("datasets", [])), by_key(entries)
    return [f"{k}: {'added' if k not in old else 'removed' if k not in new else 'changed'}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def manifest_bytes(entries: list[dict]) -> bytes:
    """The manifest document, canonical (sorted keys) so equal inputs give equal hashes."""
    return (json.dumps({"version": 1, "datasets": entries}, sort_keys=True, indent=1) + "\n").encode()
