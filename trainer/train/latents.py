"""Latent caching: every training image encoded by the VAE once, kept in memory and optionally on disk.

A disk entry is keyed by the SHA-256 of what the VAE actually sees (the bucketed, cropped pixels,
flipped copy included) plus the settings that change its latents (the VAE's weights fingerprint,
dtype, scaling factor, format version). A changed image, bucket, crop or VAE therefore gets a new
key and can never be served a stale latent; an entry whose stored key or shape disagrees with
what is expected (a truncated or foreign file) is counted as stale and recomputed. Entries are
safetensors files, so a cache directory can be shared between runs and jobs on one node.
Encoding draws from the VAE's latent distribution with a generator seeded from the key, so the
cached latents do not depend on when or where they were made.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("lathe.train")

CACHE_FORMAT = "lathe-latents-1"


@dataclass
class CacheStats:
    hits: int = 0  # read back from disk
    misses: int = 0  # no entry: encoded (and written)
    stale: int = 0  # an entry that failed validation: re-encoded and rewritten

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "stale": self.stale}


@dataclass
class LatentCache:
    """In-memory latents by image key: (latents, flipped latents or None), already scaled."""

    entries: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)

    def get(self, key: str, flipped: bool) -> torch.Tensor:
        plain, mirrored = self.entries[key]
        if flipped:
            if mirrored is None:
                raise KeyError(f"{key}: no flipped latents cached (flip_aug changed?)")
            return mirrored
        return plain

    def batch(self, keys: list[str], flipped: list[bool]) -> torch.Tensor:
        return torch.stack([self.get(k, f) for k, f in zip(keys, flipped)])


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of the VAE encoder's weights: the cache must not outlive a VAE change."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def entry_key(pixels: torch.Tensor, flipped: torch.Tensor | None, settings: str) -> str:
    h = hashlib.sha256(settings.encode())
    h.update(str(tuple(pixels.shape)).encode())
    h.update(pixels.contiguous().numpy().tobytes())
    if flipped is not None:
        h.update(b"flipped")
        h.update(flipped.contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_entry(path: str, key: str, shape: tuple[int, ...], want_flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The stored latents, or None when the file is not a valid entry for `key`."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                return None
            plain = f.get_tensor("latents")
            mirrored = f.get_tensor("latents_flipped") if want_flipped else None
    except Exception:  # truncated / foreign file: recompute
        return None
    if tuple(plain.shape) != shape or (mirrored is not None and tuple(mirrored.shape) != shape):
        return None
    return plain, mirrored


def _write_entry(path: str, key: str, plain: torch.Tensor, mirrored: torch.Tensor | None) -> None:
    tensors = {"latents": plain.contiguous()}
    if mirrored is not None:
        tensors["latents_flipped"] = mirrored.contiguous()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": CACHE_FORMAT, "key": key})
        os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@torch.no_grad()
def encode(vae: torch.nn.Module, pixels: torch.Tensor, scaling: float, key: str) -> torch.Tensor:
    """Scaled latents of a (B, 3, H, W) batch, sampled with a generator seeded from `key`."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    dist = vae.encode(pixels.to(device, dtype)).latent_dist
    gen = torch.Generator(device=device).manual_seed(int(key[:15], 16))
    noise = torch.randn(dist.mean.shape, generator=gen, device=device, dtype=dist.mean.dtype)
    return ((dist.mean + dist.std * noise) * scaling).float().cpu()


def build_latent_cache(dataset: Any, vae: torch.nn.Module, scaling: float, *, disk_dir: str | None,
                       item_indices: list[int] | None = None) -> LatentCache:
    """Encode (or read back) every item of `dataset`; `disk_dir` None keeps them in memory only."""
    cache = LatentCache()
    dtype = str(next(vae.parameters()).dtype)
    settings = f"{CACHE_FORMAT}|vae={vae_fingerprint(vae)}|dtype={dtype}|scale={scaling}"
    indices = range(len(dataset.items)) if item_indices is None else item_indices
    for idx in indices:
        item = dataset.items[idx]
        pixels, flipped = dataset.load_for_cache(idx)
        key = entry_key(pixels, flipped, settings)
        w, h = item.bucket
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (vae.config.latent_channels, h // down, w // down)
        path = os.path.join(disk_dir, key[:2], key + ".safetensors") if disk_dir else None
        if path and os.path.exists(path):
            found = _read_entry(path, key, shape, flipped is not None)
            if found is not None:
                cache.entries[item.key] = found
                cache.stats.hits += 1
                continue
            cache.stats.stale += 1
            log.info("latent cache entry for %s is stale; re-encoding", item.rel_path)
        else:
            cache.stats.misses += 1
        stack = torch.stack([pixels] + ([flipped] if flipped is not None else []))
        latents = encode(vae, stack, scaling, key)
        plain, mirrored = latents[0], (latents[1] if flipped is not None else None)
        cache.entries[item.key] = (plain, mirrored)
        if path:
            _write_entry(path, key, plain, mirrored)
    return cache
