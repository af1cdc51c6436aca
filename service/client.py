"""A small HTTP client of API v1 (httpx), used by the `lathe` CLI and the demo.

Configured by LATHE_URL and LATHE_TOKEN (or arguments). Problem responses raise ApiError carrying
the problem document, so callers can print the field paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (502, 503, 504)  # the service (or a proxy before it) is restarting or briefly unavailable


class ApiError(Exception):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status, self.problem = status, problem
        super().__init__(f"HTTP {status}: {problem.get('title', '')}: {problem.get('detail', '')}")

    def explain(self) -> str:
        lines = [f"error ({self.status}): {self.problem.get('title', 'request failed')}: {self.problem.get('detail', '')}"]
        for p in self.problem.get("problems") or []:
            lines.append(f"  {p.get('severity', 'error')}: {p['path']}: {p['message']}")
        if self.problem.get("limit"):
            lines.append(f"  limit: {self.problem['limit']}")
        return "\n".join(lines)


def read_spec_file(path: str) -> dict[str, Any]:
    """A spec file as a JSON object (TOML is converted); the service does the validation."""
    data = Path(path).read_bytes()
    text = data.decode("utf-8")
    if path.endswith(".toml") or not text.lstrip().startswith("{"):
        return tomllib.loads(text)
    return json.loads(text)


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = (url or os.environ.get("LATHE_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("LATHE_TOKEN", "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            try:
                problem = resp.json()
            except ValueError:
                problem = {"title": resp.reason_phrase, "detail": resp.text[:500]}
            raise ApiError(resp.status_code, problem)
        return resp

    # -- jobs -----------------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None,
               webhook_url: str | None = None, retry_s: float = 0.0) -> dict[str, Any]:
        """Submit a job. With an `idempotency_key`, a submit whose answer was lost (connection reset,
        the service restarting, 503) is sent again with the same key for up to `retry_s` seconds:
        the service answers with the one job the key stands for, never a second one."""
        body: dict[str, Any] = {"spec": spec}
        if webhook_url:
            body["webhook_url"] = webhook_url
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        deadline = time.monotonic() + (retry_s if idempotency_key else 0.0)
        delay = 0.2
        while True:
            try:
                resp = self.http.post("/v1/jobs", json=body, headers=headers)
                if resp.status_code not in RETRY_STATUSES or time.monotonic() >= deadline:
                    return self._check(resp).json()
            except httpx.TransportError:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def validate(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._check(self.http.post("/v1/jobs:validate", json={"spec": spec})).json()

    def dataset_report(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._check(self.http.post("/v1/datasets:report", json=request)).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def list(self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._check(self.http.get("/v1/jobs", params=params)).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def delete(self, job_id: str) -> None:
        self._check(self.http.delete(f"/v1/jobs/{job_id}"))

    def rerun(self, job_id: str, *, force: bool = False) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/rerun", json={"force": force})).json()

    def diff(self, a: str, b: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{a}/diff/{b}")).json()

    def logs(self, job_id: str, tail: int = 200) -> str:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/logs", params={"tail": tail})).text

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(event id, event type, data) from the SSE stream until the job's terminal event."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            event: dict[str, str] = {}
            for line in resp.iter_lines():
                if not line:
                    if "data" in event:
                        yield event.get("id", ""), event.get("event", "message"), json.loads(event["data"])
                    event = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                event[name] = event[name] + "\n" + value if name == "data" and name in event else value

    # -- files ----------------------------------------------------------------------------------
    def pull(self, job_id: str, dest: str) -> list[Path]:
        """Download the job's outputs (presigned URLs) into `dest`, checking size and sha256."""
        job = self.get(job_id)
        out_dir = Path(dest)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for out in job.get("outputs", []):
            if not out.get("url"):
                continue
            target = (out_dir / out["name"]).resolve()
            if out_dir.resolve() not in target.parents:
                raise ApiError(0, {"title": "unsafe output name", "detail": out["name"]})
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with httpx.stream("GET", out["url"], timeout=None) as resp, open(target, "wb") as fh:
                if resp.status_code >= 400:
                    raise ApiError(resp.status_code, {"title": "download failed", "detail": out["name"]})
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
                    digest.update(chunk)
            if digest.hexdigest() != out["sha256"] or target.stat().st_size != out["size"]:
                raise ApiError(0, {"title": "checksum mismatch", "detail": f"{out['name']} does not match its sha256"})
            written.append(target)
        return written

    def upload_adapter(self, path: str) -> str:
        """Send one adapter file through a presigned PUT; returns its URI (for merge/shrink jobs)."""
        file = Path(path)
        stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in file.stem)[:80] or "adapter"
        body = {"dataset": stem, "kind": "adapter", "files": [{"path": file.name}]}
        (target,) = self._check(self.http.post("/v1/uploads", json=body)).json()["files"]
        resp = httpx.put(target["url"], content=file.read_bytes(), headers=target.get("headers") or {}, timeout=300)
        if resp.status_code >= 300:
            raise ApiError(resp.status_code, {"title": "upload failed", "detail": f"{path}: {resp.text[:300]}"})
        return target["uri"]

    def upload(self, folder: str, dataset: str) -> dict[str, Any]:
        """Send every file under `folder` through presigned PUT URLs; returns the grant (dataset_uri)."""
        root = Path(folder)
        files = sorted(p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
        if not files:
            raise ApiError(0, {"title": "nothing to upload", "detail": f"{folder} has no files"})
        grant: dict[str, Any] = {}
        for start in range(0, len(files), 500):
            batch = files[start:start + 500]
            body = {"dataset": dataset, "files": [{"path": p.relative_to(root).as_posix()} for p in batch]}
            grant = self._check(self.http.post("/v1/uploads", json=body)).json()
            for path, target in zip(batch, grant["files"]):
                resp = httpx.put(target["url"], content=path.read_bytes(), headers=target.get("headers") or {},
                                 timeout=300)
                if resp.status_code >= 300:
                    raise ApiError(resp.status_code, {"title": "upload failed", "detail": f"{path}: {resp.text[:300]}"})
        return grant
