"""Shared tiny pipelines (built once per session: building is fast, importing diffusers is not)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")


@pytest.fixture(scope="session")
def tiny_models(tiny_pipeline):
    """{arch: (folder, single_file)} for sd1, sd2 and sdxl."""
    out = {}
    for arch in ("sd1", "sd2", "sdxl"):
        single = tiny_pipeline(arch, single_file=True, seed=1)
        out[arch] = (os.path.dirname(single), single)
    return out


@pytest.fixture(scope="session")
def parts_for(tiny_models):
    """ModelParts of a tiny folder: parts_for("sd1"). Loaded once per architecture; each call gets its
    own copy, since building a network hooks the modules it adapts."""
    import copy

    import torch

    from trainer.core.spec import ModelSpec
    from trainer.models.load import load_model

    cache = {}

    def get(arch: str):
        if arch not in cache:
            spec = ModelSpec(uri=tiny_models[arch][0], arch=arch, v_parameterization=arch == "sd2")
            cache[arch] = load_model(spec, weight_dtype=torch.float32)
        return copy.deepcopy(cache[arch])

    return get

