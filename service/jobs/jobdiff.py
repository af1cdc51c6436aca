"""What differs between two jobs: spec fields, dataset files, model, versions and final loss.

Pure functions over what the jobs stored (spec.json, metadata.json, dataset-manifest.json), so the
CLI (`lathe diff`) and any console read the same answer from `GET /v1/jobs/{a}/diff/{b}`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

VERSION_KEYS = ("lathe_version", "git_commit")
MODEL_KEYS = ("base_model_sha256",)


class FieldChange(msgspec.Struct, kw_only=True):
    path: str  # dotted path, e.g. "optimizer.learning_rate", "packages.torch"
    a: Any = None
    b: Any = None


class FileChange(msgspec.Struct, kw_only=True):
    key: str
    change: Literal["added", "removed", "changed"]  # in b relative to a
    a: dict[str, Any] | None = None  # size, etag, sha256
    b: dict[str, Any] | None = None


class JobDiff(msgspec.Struct, kw_only=True):
    a: str
    b: str
    spec: list[FieldChange] = []
    dataset: list[FileChange] = []
    model: list[FieldChange] = []
    versions: list[FieldChange] = []
    final_loss: FieldChange | None = None
    # False when a job has no metadata.json / manifest yet (not succeeded): only the specs were compared.
    complete: bool = True


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def field_changes(a: Any, b: Any, prefix: str = "") -> list[FieldChange]:
    fa, fb = _flatten(a, prefix), _flatten(b, prefix)
    return [FieldChange(path=p, a=fa.get(p), b=fb.get(p)) for p in sorted(set(fa) | set(fb)) if fa.get(p) != fb.get(p)]


def _files(manifest: dict | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for dataset in (manifest or {}).get("datasets", []):
        if "archive" in dataset:
            archive = dataset["archive"]
            out[archive["key"]] = {k: archive.get(k) for k in ("size", "etag", "sha256")}
            for member in dataset.get("members", []):
                out[f"{archive['key']}!{member['name']}"] = {"size": member["size"], "sha256": member["sha256"]}
        for entry in dataset.get("files", []):
            out[entry["key"]] = {k: entry.get(k) for k in ("size", "etag", "sha256")}
    return out


def file_changes(a: dict | None, b: dict | None) -> list[FileChange]:
    fa, fb = _files(a), _files(b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if key not in fb:
            out.append(FileChange(key=key, change="removed", a=fa[key]))
        elif key not in fa:
            out.append(FileChange(key=key, change="added", b=fb[key]))
        elif fa[key] != fb[key]:
            out.append(FileChange(key=key, change="changed", a=fa[key], b=fb[key]))
    return out


def diff_jobs(a_id: str, b_id: str, a: dict, b: dict) -> JobDiff:
    """`a`/`b`: {"spec": …, "metadata": … or None, "manifest": … or None}."""
    ma, mb = a.get("metadata") or {}, b.get("metadata") or {}
    model = field_changes({k: ma.get(k) for k in MODEL_KEYS}, {k: mb.get(k) for k in MODEL_KEYS})
    model += field_changes((a["spec"].get("model") or {}).get("uri"), (b["spec"].get("model") or {}).get("uri"), "model.uri")
    versions = field_changes({k: ma.get(k) for k in VERSION_KEYS}, {k: mb.get(k) for k in VERSION_KEYS})
    versions += field_changes(ma.get("packages") or {}, mb.get("packages") or {}, "packages")
    la, lb = (ma.get("loss") or {}).get("final_avg"), (mb.get("loss") or {}).get("final_avg")
    return JobDiff(
        a=a_id, b=b_id, spec=field_changes(a["spec"], b["spec"]),
        dataset=file_changes(a.get("manifest"), b.get("manifest")), model=model, versions=versions,
        final_loss=FieldChange(path="loss.final_avg", a=la, b=lb) if la != lb else None,
        complete=all(x.get("metadata") is not None for x in (a, b)),
    )
