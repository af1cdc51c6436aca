"""Fixtures for the dataset tests: a generated tiny dataset and offline CLIP tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from data_helpers import build_tokenizer


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict[str, Any]:
    """'eos': pads with EOS (SD1.x, SDXL's first encoder); 'bang': pads with '!' (SD2.x, SDXL's second)."""
    base = tmp_path_factory.mktemp("tok")
    return {"eos": build_tokenizer(base / "eos", "<|endoftext|>"), "bang": build_tokenizer(base / "bang", "!")}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from trainer.tools.tinydata import make_tiny_dataset

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_dataset(root, images=12)
    return root
