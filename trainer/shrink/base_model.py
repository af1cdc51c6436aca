"""Base-model weights by LoRA layer name, read with `safetensors` only (no diffusers import).

Accepts an original-SGM/LDM single file (SD1.x/2.x/SDXL `.safetensors`) or a diffusers folder
(`unet/`, `text_encoder/`, `text_encoder_2/`). Every 2-D+ weight is registered under the sd-scripts
LoRA name(s) it can have, so both diffusers-named (SD1.x/2.x) and SGM-named (SDXL) adapters resolve.
OpenCLIP's fused `attn.in_proj_weight` (SD2.x, SDXL TE2) is split into q, k, v thirds, in that order.

Norms used by the recipe scores are cached on disk per checkpoint (path, size, mtime), like
resize_lora's norms cache, so a second shrink against the same base reads no base weight at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from trainer.models.keys import canonical_text_encoder_path, unet_ldm_path

from trainer.core.shrink_errors import ShrinkError
from trainer.core.settings import trainer_settings
from .unet_names import layers_per_block_from_ldm, ldm_to_diffusers, up_blocks_with_attention

_OPENCLIP_NAMES = {
    "attn.out_proj.weight": "self_attn_out_proj",
    "mlp.c_fc.weight": "mlp_fc1",
    "mlp.c_proj.weight": "mlp_fc2",
}
_QKV = ("q", "k", "v")


@dataclass(frozen=True)
class _Source:
    file: int  # index into BaseModel._files
    key: str
    chunk: int = 0
    chunks: int = 1


def _lora_name(prefix: str, module_path: str) -> str:
    return prefix + module_path.replace(".", "_")


def default_cache_dir() -> Path:
    return trainer_settings().model_cache() / "shrink-norms"


class BaseModel:
    def __init__(self, path: str, cache_dir: Path | None = None) -> None:
        self.path = Path(path)
        self._files: list = []
        self._file_paths: list[Path] = []
        self._index: dict[str, _Source] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        if self.path.is_dir():
            self._index_diffusers_folder()
        elif self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise ShrinkError(
                    f"--base {path}: only .safetensors single files or diffusers folders are read"
                    " (pickled .ckpt files are not loaded for safety); convert it to .safetensors"
                )
            self._index_single_file()
        else:
            raise ShrinkError(f"--base {path}: no such file or folder")
        if not self._index:
            raise ShrinkError(
                f"--base {path}: found no UNet/text-encoder weights (expected SGM keys"
                " 'model.diffusion_model.…' or a diffusers folder with unet/diffusion_pytorch_model.safetensors)"
            )
        self._lock = threading.Lock()
        self.seconds_reading = 0.0  # time spent reading base weights and computing their norms
        self._cache_path = (cache_dir or default_cache_dir()) / f"{self._identity()}.json"
        self._cache = self._load_cache()
        self._cache_dirty = False

    # --- indexing -----------------------------------------------------------------------------

    def _open(self, file: Path) -> int:
        self._files.append(safe_open(str(file), framework="pt"))
        self._file_paths.append(file)
        return len(self._files) - 1

    def _register(self, name: str, source: _Source, shape: tuple[int, ...]) -> None:
        self._index.setdefault(name, source)
        if source.chunks > 1:
            shape = (shape[0] // source.chunks, *shape[1:])
        self._shapes.setdefault(name, shape)

    def _index_single_file(self) -> None:
        fid = self._open(self.path)
        handle = self._files[fid]
        keys = list(handle.keys())
        unet_prefix = "model.diffusion_model."
        unet_paths = [k[len(unet_prefix) :] for k in keys if k.startswith(unet_prefix)]
        lpb = layers_per_block_from_ldm(unet_paths)
        for key in keys:
            shape = tuple(handle.get_slice(key).get_shape())
            if not shape or not key.endswith("weight"):
                continue
            if key.startswith(unet_prefix):
                ldm = key[len(unet_prefix) :].removesuffix(".weight")
                self._register(_lora_name("lora_unet_", ldm), _Source(fid, key), shape)
                diffusers = ldm_to_diffusers(ldm + ".weight", lpb)
                if diffusers is not None:
                    self._register(_lora_name("lora_unet_", diffusers.removesuffix(".weight")), _Source(fid, key), shape)
                continue
            for prefix, lora_prefix in (
                ("cond_stage_model.transformer.", "lora_te_"),
                ("conditioner.embedders.0.transformer.", "lora_te1_"),
            ):
                if key.startswith(prefix):
                    path = key[len(prefix) :].removesuffix(".weight")
                    self._register(_lora_name(lora_prefix, path), _Source(fid, key), shape)
            for prefix, lora_prefix in (
                ("cond_stage_model.model.transformer.resblocks.", "lora_te_"),
                ("conditioner.embedders.1.model.transformer.resblocks.", "lora_te2_"),
            ):
                if key.startswith(prefix):
                    self._register_openclip(key, key[len(prefix) :], lora_prefix, fid, shape)

    def _register_openclip(self, key: str, rest: str, lora_prefix: str, fid: int, shape: tuple[int, ...]) -> None:
        m = re.match(r"(\d+)\.(.+)$", rest)
        if not m:
            return
        layer, tail = m.group(1), m.group(2)
        stem = f"{lora_prefix}text_model_encoder_layers_{layer}_"
        if tail == "attn.in_proj_weight":
            for i, part in enumerate(_QKV):
                self._register(f"{stem}self_attn_{part}_proj", _Source(fid, key, i, 3), shape)
        elif tail in _OPENCLIP_NAMES:
            self._register(stem + _OPENCLIP_NAMES[tail], _Source(fid, key), shape)

    def _index_diffusers_folder(self) -> None:
        unet = self._component_files("unet")
        if unet:
            paths: list[tuple[int, str, tuple[int, ...]]] = []
            for file in unet:
                fid = self._open(file)
                for key in self._files[fid].keys():
                    paths.append((fid, key, tuple(self._files[fid].get_slice(key).get_shape())))
            lpb, with_attention = self._unet_layout([k for _, k, _ in paths])
            for fid, key, shape in paths:
                if not shape or not key.endswith("weight"):
                    continue
                module = key.removesuffix(".weight")
                self._register(_lora_name("lora_unet_", module), _Source(fid, key), shape)
                try:  # SDXL adapters name UNet layers after the SGM layout
                    ldm = unet_ldm_path(module, layers_per_block=lpb, up_attention=with_attention)
                except KeyError:
                    continue
                self._register(_lora_name("lora_unet_", ldm), _Source(fid, key), shape)
        for folder, prefixes in (("text_encoder", ("lora_te_", "lora_te1_")), ("text_encoder_2", ("lora_te2_",))):
            for file in self._component_files(folder):
                fid = self._open(file)
                for key in self._files[fid].keys():
                    shape = tuple(self._files[fid].get_slice(key).get_shape())
                    if not shape or not key.endswith("weight"):
                        continue
                    module = canonical_text_encoder_path(key.removesuffix(".weight"))
                    for prefix in prefixes:
                        self._register(_lora_name(prefix, module), _Source(fid, key), shape)

    def _unet_layout(self, keys: list[str]) -> tuple[int, set[int]]:
        """(layers_per_block, up blocks with attention) from unet/config.json, else from the keys."""
        config_path = self.path / "unet" / "config.json"
        try:
            config = json.loads(config_path.read_text())
            layers = int(config["layers_per_block"])
            up_types = config["up_block_types"]
            return layers, {i for i, t in enumerate(up_types) if "CrossAttn" in t}
        except (OSError, ValueError, KeyError, TypeError):
            resnets = [int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))]
            return (max(resnets) + 1 if resnets else 2), up_blocks_with_attention(keys)

    def _component_files(self, folder: str) -> list[Path]:
        directory = self.path / folder
        if not directory.is_dir():
            return []
        files = sorted(directory.glob("*.safetensors"))
        plain = [f for f in files if ".fp16." not in f.name]
        return plain or files  # prefer full-precision weights when both variants exist

    # --- lookups --------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self._shapes.get(name)

    def source(self, name: str) -> tuple[Path, str, int, int] | None:
        """Where a layer's weight lives: (file, key, chunk, chunks); None if the base has no such layer."""
        source = self._index.get(name)
        if source is None:
            return None
        return self._file_paths[source.file], source.key, source.chunk, source.chunks

    def weight(self, name: str) -> Tensor:
        source = self._index.get(name)
        if source is None:
            raise ShrinkError(
                f"--base {self.path}: no base weight for adapter layer '{name}'; is this the model the"
                " adapter was trained on (SD1.x/2.x vs SDXL)?"
            )
        handle = self._files[source.file]
        if source.chunks == 1:
            return handle.get_tensor(source.key)
        rows = handle.get_slice(source.key).get_shape()[0] // source.chunks
        return handle.get_slice(source.key)[source.chunk * rows : (source.chunk + 1) * rows]

    def frobenius_norm(self, name: str) -> float:
        return self._cached("fro", name, lambda w: torch.linalg.matrix_norm(w, ord="fro").item())

    def spectral_norm(self, name: str) -> float:
        def top_singular_value(w: Tensor) -> float:
            # Randomised subspace iteration as resize_lora does, but seeded: reruns give equal ranks.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return torch.svd_lowrank(w, q=1, niter=64)[1][0].item()

        return self._cached("spn", name, top_singular_value)

    def _cached(self, kind: str, name: str, compute) -> float:
        with self._lock:
            table = self._cache.setdefault(kind, {})
            if name in table:
                return table[name]
        t0 = time.perf_counter()
        w = self.weight(name).to(torch.float32).flatten(1)
        value = float(compute(w))
        if not math.isfinite(value):
            raise ShrinkError(f"--base {self.path}: weight of '{name}' is not finite")
        with self._lock:
            table[name] = value
            self._cache_dirty = True
            self.seconds_reading += time.perf_counter() - t0
        return value

    # --- on-disk norm cache ---------------------------------------------------------------------

    def _identity(self) -> str:
        parts = []
        for f in sorted(self._file_paths):
            st = f.stat()
            parts.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]

    def _load_cache(self) -> dict[str, dict[str, float]]:
        try:
            return json.loads(self._cache_path.read_text())
        except (OSError, ValueError):
            return {}

    def save_cache(self) -> None:
        if not self._cache_dirty:
            return
        try:
            self._cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._cache_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self._cache))
            tmp.replace(self._cache_path)
            self._cache_dirty = False
        except OSError:
            pass  # a read-only cache only costs time on the next run
