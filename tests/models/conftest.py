"""Shared tiny pipelines (built once per session: building is fast, importing diffusers is not)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")


@dataclass
class ModelSpecStub:
    """The fields of trainer.core.spec.ModelSpec that load_model reads."""

    uri: str
    arch: str
    v_parameterization: bool = False
    vae: str | None = None
    clip_skip: int | None = None
    no_half_vae: bool = False
    lowram: bool = False


@dataclass
class NetworkSpecStub:
    """The fields of trainer.core.spec.NetworkSpec that build_network reads (sd-scripts defaults)."""

    module: str = "lycoris.kohya"
    algo: str = "lora"
    preset: str = "full"
    dim: int = 4
    alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    use_tucker: bool = False
    use_scalar: bool = False
    rank_dropout_scale: bool = False
    train_norm: bool = False
    factor: int = -1
    decompose_both: bool = False
    block_size: int = 4
    block_dims: list | None = None
    block_alphas: list | None = None
    conv_block_dims: list | None = None
    conv_block_alphas: list | None = None
    weights: str | None = None


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{arch: (folder, single_file)} for sd1, sd2 and sdxl."""
    from trainer.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ("sd1", "sd2", "sdxl"):
        folder = root / arch
        single = build_tiny_pipeline(arch, str(folder), single_file=True, seed=1)
        out[arch] = (str(folder), single)
    return out


@pytest.fixture(scope="session")
def parts_for(tiny_models):
    """Load (and cache) ModelParts of a tiny folder: parts_for("sd1")."""
    import torch

    from trainer.models.load import load_model

    cache = {}

    def get(arch: str):
        if arch not in cache:
            spec = ModelSpecStub(uri=tiny_models[arch][0], arch=arch, v_parameterization=arch == "sd2")
            cache[arch] = load_model(spec, weight_dtype=torch.float32)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def model_spec():
    return ModelSpecStub


@pytest.fixture(scope="session")
def network_spec():
    return NetworkSpecStub
