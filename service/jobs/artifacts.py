"""What a job wrote, for reading: its per-step metrics, its samples and report, and its output files.

`metrics` reads `metrics.jsonl` (trainer/job/metrics_log.py) from the job directory; `details` sums up
spec.json and metadata.json with the sample images (step from `samples/<step>/<index>.png`, prompt from
the spec's `sample.prompts[index]`); `open_output` streams one listed output file. Each goes through
JobService's tenancy check first: another tenant's job is a 404, like everywhere else. A file is served
only when status.json lists it under that name and it lies inside the tenant's output locations, so no
name a client sends can reach any other object.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import msgspec

from service.api import errors
from service.jobs.operations import JobService
from service.reconcile.phase import effective
from service.tenants import Tenant
from trainer.core.status import OutputFile
from trainer.core.storage import NotFound, StorageError, Store, parse_uri
from trainer.core.jobkeys import METRICS_KEY

CHUNK = 1 << 20
MAX_POINTS = 100_000  # a longer history is thinned to this many points, keeping the last step
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".json": "application/json", ".jsonl": "application/x-ndjson", ".txt": "text/plain; charset=utf-8",
               ".log": "text/plain; charset=utf-8", ".toml": "text/plain; charset=utf-8"}


class MetricPoint(msgspec.Struct, kw_only=True, omit_defaults=True):
    step: int
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    time: float | None = None


class MetricsHistory(msgspec.Struct, kw_only=True):
    job_id: str
    points: list[MetricPoint] = []  # one per logged step, in step order (the trainer flushes in batches)


class SampleView(msgspec.Struct, kw_only=True):
    name: str  # output name: fetch it from GET /v1/jobs/{id}/files/{name} or the output's url
    step: int
    index: int  # the prompt's index in spec.sample.prompts
    prompt: str | None = None


class JobDetails(msgspec.Struct, kw_only=True):
    job_id: str
    spec: dict[str, Any]
    summary: dict[str, str] = {}  # label → value: base model, network, dataset, hashes, versions
    samples: list[SampleView] = []
    grids: list[str] = []  # output names of grid images
    plots: list[str] = []  # output names of plots (the shrink report's)
    shrink_report: dict[str, Any] | None = None


def metrics(jobs: JobService, tenant: Tenant, job_id: str) -> MetricsHistory:
    jobs.get_with_status(tenant, job_id)  # 404 for an unknown job or another tenant's
    try:
        raw = jobs._call(lambda: jobs.store.job_dir(tenant.name, job_id).get_bytes(METRICS_KEY))
    except errors.NotFound:
        return MetricsHistory(job_id=job_id)
    points = []
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            points.append(msgspec.json.decode(line, type=MetricPoint))
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue  # a torn last line while the trainer rewrites the file
    points.sort(key=lambda p: p.step)
    if len(points) > MAX_POINTS:
        stride = -(-len(points) // MAX_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return MetricsHistory(job_id=job_id, points=points)


def details(jobs: JobService, tenant: Tenant, job_id: str) -> JobDetails:
    stored = jobs._stored(tenant, job_id)
    spec, metadata = stored["spec"], stored.get("metadata") or {}
    outputs = _outputs(jobs, tenant, job_id)
    prompts = (spec.get("sample") or {}).get("prompts") or []
    samples = []
    for out in outputs:
        parts = out.name.split("/")
        if out.kind == "sample" and len(parts) == 3 and parts[0] == "samples" and parts[1].isdigit():
            index_text = parts[2].rsplit(".", 1)[0]
            index = int(index_text) if index_text.isdigit() else -1
            prompt = prompts[index].split(" --", 1)[0].strip() if 0 <= index < len(prompts) else None
            samples.append(SampleView(name=out.name, step=int(parts[1]), index=index, prompt=prompt))
    samples.sort(key=lambda s: (s.step, s.index))
    return JobDetails(
        job_id=job_id, spec=spec, summary=_summary(spec, metadata), samples=samples,
        grids=[o.name for o in outputs if o.kind == "grid"], plots=[o.name for o in outputs if o.kind == "plot"],
        shrink_report=metadata.get("shrink_report") if isinstance(metadata.get("shrink_report"), dict) else None,
    )


def _summary(spec: dict[str, Any], metadata: dict[str, Any]) -> dict[str, str]:
    model, network, dataset = spec.get("model") or {}, spec.get("network") or {}, spec.get("dataset") or {}
    packages = metadata.get("packages") or {}
    rows = {
        "kind": spec.get("kind"),
        "base model": f"{model.get('uri')} ({model.get('arch')})" if model else None,
        "network": (f"{network.get('algo')} dim {network.get('dim')} alpha {network.get('alpha')}"
                    if network else None),
        "dataset": dataset.get("uri"),
        "steps": metadata.get("steps"), "epochs": metadata.get("epochs"),
        "final average loss": (metadata.get("loss") or {}).get("final_avg"),
        "seed": metadata.get("seed"),
        "spec sha256": metadata.get("spec_sha256"),
        "base model sha256": metadata.get("base_model_sha256"),
        "dataset manifest sha256": metadata.get("dataset_manifest_sha256"),
        "lathe version": metadata.get("lathe_version"),
        "git commit": metadata.get("git_commit"),
        **{f"{name} version": packages.get(name) for name in ("torch", "diffusers", "transformers")
           if isinstance(packages, dict)},
    }
    return {k: str(v) for k, v in rows.items() if v not in (None, "", {})}


def _outputs(jobs: JobService, tenant: Tenant, job_id: str) -> list[OutputFile]:
    record, status = jobs.get_with_status(tenant, job_id)
    if status is None or not effective(record, status).status_current:
        return []
    return [o for o in status.outputs if tenant.allows("output", o.uri)]


def open_output(jobs: JobService, tenant: Tenant, job_id: str, name: str) -> tuple[Iterator[bytes], int, str]:
    """(chunks, size, media type) of the output listed as `name`; 404 for any name the job did not list."""
    name = name.lstrip("/")
    out = next((o for o in _outputs(jobs, tenant, job_id) if o.name == name), None)
    if out is None:
        raise errors.NotFound(f"job '{job_id}' has no output '{name}'")
    store, key = _store_and_key(jobs, out.uri)
    size = jobs._call(lambda: store.head(key)).size
    media = MEDIA_TYPES.get(posixpath.splitext(name)[1].lower(), "application/octet-stream")

    def chunks() -> Iterator[bytes]:
        for start in range(0, size, CHUNK):
            try:
                yield store.get_range(key, start, min(CHUNK, size - start))
            except (NotFound, StorageError):
                return  # removed or unreachable mid-stream: the client sees a short body

    return chunks(), size, media


def _store_and_key(jobs: JobService, uri: str) -> tuple[Store, str]:
    location = parse_uri(uri)
    if location.scheme == "s3":
        return jobs._open_cached(f"s3://{location.bucket}/"), location.key
    folder, _, base = uri.rstrip("/").rpartition("/")
    return jobs._opener(folder), base
