"""Tenants: bearer tokens (stored as sha256 hashes) → tenant, allowed URI prefixes, limits.

The tokens file (LATHE_TOKENS_FILE) is JSON or TOML:

    [[tenants]]
    name = "acme"                       # DNS label; the tenant's state lives under tenants/acme/
    token_sha256 = ["<64 hex>"]         # sha256 of each accepted token (rotate by listing two)
    model_prefixes = ["s3://models/"]   # where model.uri / model.vae / network.weights may point
    dataset_prefixes = ["s3://data/acme/"]
    output_prefixes = ["s3://results/acme/"]
    [tenants.limits]
    max_concurrent_jobs = 4             # queued + running jobs at once
    max_gpus_per_job = 8                # resources.gpus × resources.nodes
    max_runtime_s = 86400               # resources.max_runtime_s (and its default)

Every tenant may also use its own area of the state root (`<state>/tenants/<name>/`, where
`POST /v1/uploads` puts datasets and jobs put their outputs).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from trainer.core.storage import parse_uri

TenantName = Annotated[str, Meta(min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
TokenHash = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
UriKind = Literal["model", "dataset", "output"]


class TenantLimits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    max_concurrent_jobs: Annotated[int, Meta(ge=1, le=10000)] = 4
    max_gpus_per_job: Annotated[int, Meta(ge=0, le=1024)] = 8
    max_runtime_s: Annotated[int, Meta(ge=60)] = 7 * 86400


class TenantConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: TenantName
    token_sha256: list[TokenHash]
    model_prefixes: list[str] = []
    dataset_prefixes: list[str] = []
    output_prefixes: list[str] = []
    limits: TenantLimits = TenantLimits()


class TokensFile(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    tenants: list[TenantConfig]


class TokensFileError(ValueError):
    """The tokens file is missing or malformed; the message names the file and the field."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    config: TenantConfig
    own_prefix: str  # <state root>/tenants/<name>/ — always allowed

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def limits(self) -> TenantLimits:
        return self.config.limits

    def prefixes(self, kind: UriKind) -> list[str]:
        configured = {
            "model": self.config.model_prefixes,
            "dataset": self.config.dataset_prefixes,
            "output": self.config.output_prefixes,
        }[kind]
        return [*configured, self.own_prefix]

    def allows(self, kind: UriKind, uri: str) -> bool:
        return any(uri_under(uri, prefix) for prefix in self.prefixes(kind))


def uri_under(uri: str, prefix: str) -> bool:
    """Whether `uri` lies under `prefix` as a folder: `s3://b/acme` covers `s3://b/acme/x` but not
    `s3://b/acme-evil/x`. Both are compared in the canonical form the stores open (`parse_uri`), so
    what passes here is exactly what the preflight and the trainer read or write; a URI that form
    refuses (dot segments, encoded dots or separators, empty S3 segments) is never under anything.
    Relative paths are refused too: the service and the trainer would resolve them differently."""
    if not uri or not prefix or not uri.startswith(("s3://", "file://", "/")):
        return False
    try:
        return parse_uri(uri).is_under(parse_uri(prefix))
    except ValueError:
        return False


def uri_problem(uri: str) -> str | None:
    """Why `uri` names no storage location at all (the canonical form refuses it), or None."""
    try:
        parse_uri(uri)
    except ValueError as exc:
        return str(exc)
    return None


class TenantRegistry:
    """Tenants by name, and constant-time token lookup."""

    def __init__(self, tenants: list[TenantConfig], state_root: str) -> None:
        names = [t.name for t in tenants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TokensFileError(f"tenant names must be unique; repeated: {', '.join(duplicates)}")
        root = state_root.rstrip("/")
        self._tenants = {t.name: Tenant(t, f"{root}/tenants/{t.name}/") for t in tenants}
        self._hashes = [(h, t.name) for t in tenants for h in t.token_sha256]

    @classmethod
    def from_file(cls, path: str, state_root: str) -> TenantRegistry:
        return cls(load_tokens_file(path).tenants, state_root)

    def authenticate(self, token: str) -> Tenant | None:
        """The tenant whose token hash matches. Every hash is compared (constant time per hash, no
        early exit), so timing reveals neither which tenant matched nor how much of a hash did."""
        digest = hash_token(token)
        found: str | None = None
        for stored, name in self._hashes:
            if hmac.compare_digest(stored, digest):
                found = name
        return self._tenants[found] if found is not None else None

    def get(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def __iter__(self):
        return iter(self._tenants.values())


def load_tokens_file(path: str) -> TokensFile:
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise TokensFileError(f"tokens file {path}: cannot read it ({exc.strerror}); set LATHE_TOKENS_FILE") from None
    try:
        if path.endswith(".toml"):
            obj = tomllib.loads(data.decode("utf-8"))
        else:
            obj = json.loads(data)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise TokensFileError(f"tokens file {path}: not valid {kind}: {exc}") from None
    try:
        return msgspec.convert(obj, TokensFile, strict=True)
    except msgspec.ValidationError as exc:
        raise TokensFileError(
            f"tokens file {path}: {exc} (token_sha256 holds lowercase hex sha256 digests of the tokens; "
            "see docs/api.md)"
        ) from None
