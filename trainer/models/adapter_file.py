"""Adapter files: safetensors with sd-scripts' header metadata.

`sshs_model_hash` / `sshs_legacy_hash` are computed as sd-scripts' `precalculate_safetensors_hashes`
does (for sd-webui-additional-networks): serialise the tensors with only the `ss_*` metadata, then
hash everything after the header (model hash) and 64 KiB at offset 1 MiB (legacy hash, 8 hex
digits). The model hash therefore equals the SHA-256 of the saved file's tensor bytes: `write_hashed`
reads it back from the written file's data section, never from a second serialisation.
`modelspec.*` keys follow sd-scripts' `library/sai_model_spec.py` for LoRA files.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.core.precision import PRECISION_ALIASES, SAVE_PRECISIONS, TORCH_DTYPE_NAMES, canonical_precision

SAVE_DTYPES = {name: getattr(torch, attr) for name, attr in TORCH_DTYPE_NAMES.items()}  # fp32, fp16, bf16
SAVE_PRECISION_CHOICES = sorted([*SAVE_PRECISIONS, *PRECISION_ALIASES])
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


@dataclass
class SavedAdapter:
    path: str
    size: int
    sha256: str
    zero_tensors: list[str] = field(default_factory=list)


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them."""
    return _sshs_of(_serialize_for_hash(tensors, metadata))


def _serialize_for_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    arrays = _as_numpy(tensors)
    if arrays is not None:
        from safetensors.numpy import save

        return save(arrays, ss_only)
    from safetensors.torch import save

    return save(tensors, ss_only)


# dtypes numpy holds natively (bf16 is not one of them)
_NUMPY_SAFE = frozenset({torch.float16, torch.float32, torch.float64})


def _as_numpy(tensors: dict[str, torch.Tensor]) -> dict | None:
    """The tensors as numpy views when numpy can hold them all (CPU, contiguous, fp16/32/64), else None.
    safetensors' numpy front end writes the same bytes as its torch one, without the torch front end's
    scan for tensors sharing storage (~50 µs a tensor; ours are all freshly made)."""
    if all(t.dtype in _NUMPY_SAFE and t.device.type == "cpu" and t.is_contiguous() for t in tensors.values()):
        return {k: t.numpy() for k, t in tensors.items()}
    return None


def _sshs_of(blob: bytes) -> tuple[str, str]:
    (header_len,) = struct.unpack("<Q", blob[:8])
    view = memoryview(blob)
    model_hash = hashlib.sha256(view[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(view[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def write_hashed(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str], *,
                 file_sha256: bool = True) -> tuple[int, str | None]:
    """Write `tensors` with `metadata` plus the sshs hashes; atomic (temporary file + rename). Returns
    (file size, sha256 of the file, or None when `file_sha256` is off).

    safetensors streams the tensors to disk with placeholder hashes of the final length; the hashes are
    then patched into the header in place. The data section is the same bytes in the `ss_*`-only
    serialisation sd-scripts hashes (tensor offsets are relative to it), and the legacy window's position
    there follows from that serialisation's header length. This never holds a second in-memory copy of
    the file, whose fresh pages cost more than the write itself.
    """
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    placeholders = dict(metadata, sshs_model_hash="0" * 64, sshs_legacy_hash="0" * 8)
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    _save_file(tensors, tmp, placeholders)
    with open(tmp, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = f.read(header_len)
        ss_header_len = _pad8(len(header.rstrip(b" ")) - _json_len(placeholders) + _json_len(ss_only))
        window = LEGACY_OFFSET - 8 - ss_header_len  # where the legacy window starts in the data section
        if window < 0:  # a header past 1 MiB: the window holds header bytes, hash a real serialisation
            model_hash, legacy_hash = sshs_hashes(tensors, metadata)
        else:
            model_hash, legacy_hash = _hash_data(f, window)
        for key, value in (("sshs_model_hash", model_hash), ("sshs_legacy_hash", legacy_hash)):
            field_at = header.index(json.dumps({key: placeholders[key]}, separators=(",", ":"))[1:-1].encode())
            f.seek(8 + field_at)
            f.write(json.dumps({key: value}, separators=(",", ":"))[1:-1].encode())
        size = f.seek(0, os.SEEK_END)
        digest = None
        if file_sha256:
            f.seek(0)
            digest = _sha256_of_stream(f).hexdigest()
    os.replace(tmp, target)
    return size, digest


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    arrays = _as_numpy(tensors)
    if arrays is not None:
        from safetensors.numpy import save_file

        save_file(arrays, str(path), metadata)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata)


def _json_len(metadata: dict[str, str]) -> int:
    """Bytes of `metadata` in a safetensors header (serde_json escapes as Python does without ensure_ascii)."""
    return len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())


def _pad8(n: int) -> int:
    return n + (-n % 8)


def _hash_data(f, window: int) -> tuple[str, str]:
    """(sha256 of the rest of `f`, first 8 hex digits of the sha256 of its LEGACY_LENGTH bytes at `window`)."""
    model, legacy = hashlib.sha256(), hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    position = 0
    while got := f.readinto(buffer):
        chunk = view[:got]
        model.update(chunk)
        legacy.update(_legacy_part(chunk, position, window))
        position += got
    return model.hexdigest(), legacy.hexdigest()[:8]


def _legacy_part(chunk: memoryview, position: int, window: int) -> memoryview:
    """The part of `chunk` (at `position` in the data section) inside the legacy window at `window`;
    empty when they do not overlap."""
    lo, hi = max(window, position), min(window + LEGACY_LENGTH, position + len(chunk))
    return chunk[lo - position : max(lo, hi) - position]


def _sha256_of_stream(f):
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    while got := f.readinto(buffer):
        digest.update(view[:got])
    return digest


def zero_tensor_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Tensors that are all zeros (fp16 underflow; sd-scripts' check_lora_weights.py counts them).
    `alpha` scalars are not weights and are skipped."""
    return sorted(k for k, v in tensors.items() if v.numel() > 1 and not torch.any(v != 0))


ZERO_WARN_FRACTION = 0.05  # more all-zero weight tensors than this is a job warning


@dataclass
class ZeroCheck:
    """sd-scripts' check_lora_weights.py for one saved adapter: its all-zero weight tensors."""

    tensors: int  # weight tensors scanned (alpha and other scalars excluded)
    zero: list[str]  # keys of the all-zero ones

    def warning(self, name: str) -> str | None:
        if not self.tensors or len(self.zero) / self.tensors <= ZERO_WARN_FRACTION:
            return None
        layers = sorted({key.split(".", 1)[0] for key in self.zero})
        shown = ", ".join(layers[:10]) + (f" and {len(layers) - 10} more" if len(layers) > 10 else "")
        return (f"{name}: {len(self.zero)} of {self.tensors} weight tensors are all zeros ({shown}); fp16 underflow "
                "(try bf16 or fp32 saves, a higher learning rate) or layers that were not trained (learning rate 0)")

    def summary(self) -> dict:
        return {"tensors": self.tensors, "zero": len(self.zero), "zero_names": self.zero[:50]}


def zero_tensor_check(path: str) -> ZeroCheck:
    from safetensors import safe_open

    tensors, zero = 0, []
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            value = fh.get_tensor(key)
            if value.numel() <= 1:
                continue
            tensors += 1
            if not torch.any(value != 0):
                zero.append(key)
    return ZeroCheck(tensors, sorted(zero))


def save_dtype(name: str) -> torch.dtype:
    """The torch dtype of a save precision name (sd-scripts' aliases accepted); ValueError when unknown."""
    canonical = canonical_precision(name)
    if canonical is None:
        raise ValueError(f"save precision {name!r}: choose one of {', '.join(SAVE_PRECISIONS)}")
    return SAVE_DTYPES[canonical]


def save_adapter(tensors: dict[str, torch.Tensor], path: str, *, metadata: dict[str, str], dtype) -> SavedAdapter:
    """Write `tensors` (cast to `dtype`: torch dtype or fp32/fp16/bf16) with `metadata` plus the
    sshs hashes; atomic (temporary file + rename)."""
    if isinstance(dtype, str):
        dtype = save_dtype(dtype)
    cast = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        cast[key] = value.contiguous()
    size, sha256 = write_hashed(cast, path, metadata)
    return SavedAdapter(str(Path(path)), size, sha256, zero_tensor_names(cast))


def modelspec_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """`modelspec.hash_sha256` as sd-scripts' sai_model_spec computes it: tensor by tensor."""
    from safetensors.torch import save

    digest = hashlib.sha256()
    for tensor in tensors.values():
        data = save({"tensor": tensor})
        header_len = int.from_bytes(data[:8], "little")
        digest.update(memoryview(data)[8 + header_len :])
    return f"0x{digest.hexdigest()}"


def read_header(path: str) -> dict:
    """The raw safetensors JSON header (tensor entries and `__metadata__`), without loading tensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024 or n > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} is impossible)")
        try:
            return json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from e


def read_metadata(path: str) -> dict[str, str]:
    return dict(read_header(path).get("__metadata__") or {})


def modelspec_metadata(arch: str, v_parameterization: bool, title: str | None, resolution, *,
                       timestamp: float | None = None, author: str | None = None, description: str | None = None,
                       license: str | None = None, tags: str | None = None, clip_skip: int | None = None,
                       timesteps: tuple[int, int] | None = None) -> dict[str, str]:
    """`modelspec.*` keys of a LoRA file, as sd-scripts writes them.

    resolution: int, (w, h) or "w,h"; None gives the architecture's default (512 / 768 for SD2-v / 1024).
    """
    timestamp = datetime.datetime.now().timestamp() if timestamp is None else timestamp
    if arch == "sd2":
        base = "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"
    elif arch in MODELSPEC_ARCH:
        base = MODELSPEC_ARCH[arch]
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    if resolution is None:
        resolution = 1024 if arch == "sdxl" else 768 if (arch == "sd2" and v_parameterization) else 512
    if isinstance(resolution, str):
        resolution = tuple(int(x) for x in resolution.split(","))
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if len(resolution) == 1:
        resolution = (resolution[0], resolution[0])
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{base}/lora",
        "modelspec.implementation": IMPL_STABILITY_AI if arch == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": title if title else f"LoRA@{timestamp}",
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    optional = {"modelspec.author": author, "modelspec.description": description, "modelspec.license": license,
                "modelspec.tags": tags, "modelspec.encoder_layer": None if clip_skip is None else str(clip_skip),
                "modelspec.timestep_range": None if timesteps is None else f"{timesteps[0]},{timesteps[1]}"}
    meta.update({k: v for k, v in optional.items() if v is not None})
    return meta
