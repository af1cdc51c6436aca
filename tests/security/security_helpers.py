"""Plain helpers of the security tests (imported by name, not from conftest): tenants and tokens with
distinctive secrets, a uvicorn server in a thread, a SigV4 presigned-URL verifier and a scanner that
looks for secrets in every stored object, log and response."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.common_helpers import image_bytes, job_spec, wait_for  # noqa: F401 (wait_for: re-exported)

REPO = Path(__file__).resolve().parents[2]
FAKE_TRAINER = REPO / "tests" / "service" / "fake_trainer.py"  # the service tests' stand-in trainer

# Distinctive values, so that finding one anywhere cannot be a coincidence.
TOKENS = {
    "acme": "tok-acme-SECRET-5b1e9c0f7a",
    "acme-evil": "tok-acmeevil-SECRET-93d0b2e4",  # a name that extends "acme": prefix confusion
    "other": "tok-other-SECRET-2c7f4a61d8",
}
AWS_KEY_ID = "AKIALATHESECURITYTEST"
AWS_SECRET = "lathe/SecretAccessKey+DoNotLeak/0123456789abcdef"
WEBHOOK_SECRET = "whsec_TGF0aGVXZWJob29rU2VjcmV0RG9Ob3RMZWFr"
IDEMPOTENCY_KEY = "idem-SECRET-4e8a1b7c"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def auth(tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


def tenants_doc(bucket: str) -> dict[str, Any]:
    return {"tenants": [
        {"name": name, "token_sha256": [sha(token)], "model_prefixes": [f"s3://{bucket}/models/"],
         "dataset_prefixes": [f"s3://{bucket}/datasets/{name}/"], "output_prefixes": [f"s3://{bucket}/results/{name}/"],
         "limits": {"max_concurrent_jobs": 4, "max_gpus_per_job": 2, "max_runtime_s": 3600}}
        for name, token in TOKENS.items()
    ]}


def spec(bucket: str, tenant: str = "acme", **changes: Any) -> dict[str, Any]:
    """A small valid spec on the tenant's dataset, one attempt only; dotted keys override."""
    return job_spec(bucket, f"datasets/{tenant}/tiny", **{"resources.max_attempts": 1, **changes})


def png(w: int = 64, h: int = 64) -> bytes:
    return image_bytes(w, h, (10, 120, 200))


class LiveServer:
    """The app under uvicorn on 127.0.0.1 in a thread: real HTTP, real access logs, chunked bodies."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from service.dev.stack import free_port

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # log_config=None: uvicorn's loggers (the access log too) propagate to the root logger, where
        # tests can read them, instead of going to uvicorn's own stderr handlers.
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="debug",
                                                    lifespan="on", access_log=True, log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, what="uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        launcher = self.app.state.services.extra.get("launcher")
        if launcher is not None and hasattr(launcher, "shutdown"):
            launcher.shutdown(kill=True, timeout_s=5)


# ------------------------------------------------------------------------------------- scanning


def secret_variants(secret: str) -> set[str]:
    """The secret as it could appear: plain, URL-encoded, JSON-escaped, base64 of itself."""
    import base64

    return {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret),
            json.dumps(secret)[1:-1], base64.b64encode(secret.encode()).decode()}


def find_secrets(blobs: Iterable[tuple[str, bytes]], secrets: dict[str, str]) -> list[tuple[str, str]]:
    """(where, which secret) for every blob holding any variant of any secret."""
    found = []
    for where, data in blobs:
        for name, secret in secrets.items():
            if any(v.encode() in data for v in secret_variants(secret)):
                found.append((where, name))
    return found


def bucket_blobs(s3: Any, bucket: str) -> list[tuple[str, bytes]]:
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            head = s3.head_object(Bucket=bucket, Key=obj["Key"])
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            meta = json.dumps(head.get("Metadata", {})).encode()
            out.append((f"s3://{bucket}/{obj['Key']}", obj["Key"].encode() + b"\n" + meta + b"\n" + body))
    return out


def tree_blobs(root: Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


# ------------------------------------------------------------------------------- SigV4 presigning


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_query_signature(url: str, secret: str, method: str, headers: dict[str, str] | None = None) -> str:
    """The signature AWS computes for a SigV4 presigned URL (query auth, UNSIGNED-PAYLOAD), from the
    URL's own parameters minus X-Amz-Signature: what S3 checks before anything else."""
    parts = urllib.parse.urlsplit(url)
    params = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
              if k != "X-Amz-Signature"]
    query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                     for k, v in sorted(params))
    given = dict(params)
    signed = given["X-Amz-SignedHeaders"].split(";")
    all_headers = {"host": parts.netloc, **{k.lower(): v for k, v in (headers or {}).items()}}
    canonical_headers = "".join(f"{h}:{all_headers[h].strip()}\n" for h in signed)
    canonical = "\n".join([method, parts.path, query, canonical_headers, ";".join(signed), "UNSIGNED-PAYLOAD"])
    scope = given["X-Amz-Credential"].split("/", 1)[1]
    date, region, service, _ = scope.split("/")
    to_sign = "\n".join(["AWS4-HMAC-SHA256", given["X-Amz-Date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = _sign(_sign(_sign(_sign(("AWS4" + secret).encode(), date), region), service), "aws4_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def presigned_url_accepted(url: str, secret: str, method: str, now: dt.datetime,
                           headers: dict[str, str] | None = None) -> bool:
    """What S3 decides for a presigned URL at time `now`: a valid signature and not yet expired
    (X-Amz-Date + X-Amz-Expires, both covered by the signature)."""
    given = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    if given.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        return False
    if not hmac.compare_digest(sigv4_query_signature(url, secret, method, headers), given["X-Amz-Signature"]):
        return False
    signed_at = dt.datetime.strptime(given["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    return now <= signed_at + dt.timedelta(seconds=int(given["X-Amz-Expires"]))
