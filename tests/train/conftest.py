"""Tiny pipelines and datasets built once per session, and a helper that trains on them."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def tiny_models(tiny_pipeline: Callable[..., str]) -> dict[str, str]:
    """Diffusers folders of tiny random sd1 / sd2 (v-prediction) / sdxl pipelines."""
    return {arch: tiny_pipeline(arch) for arch in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """6 images of mixed aspect ratios in sd-scripts folder layout, with .txt captions."""
    from trainer.tools.tinydata import make_tiny_dataset

    root = tmp_path_factory.mktemp("data")
    make_tiny_dataset(root, images=6, concepts=(("circle", 1), ("square", 1)))
    return str(root)
