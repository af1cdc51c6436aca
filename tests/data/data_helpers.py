"""Helpers for the dataset tests: specs, bucket settings at the tiny scale, offline CLIP tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from trainer.core.spec import JobSpec, spec_from_obj

def make_spec(**dataset: Any):
    """A checked JobSpec whose dataset section is `dataset` (uri defaults to a placeholder)."""
    dataset.setdefault("uri", "data")
    return spec_from_obj({"version": 1, "model": {"uri": "model"}, "dataset": dataset})


def make_unchecked_spec(**dataset: Any):
    """A JobSpec that skipped the spec check (which refuses what these tests give the layout itself)."""
    dataset.setdefault("uri", "data")
    return msgspec.convert({"version": 1, "model": {"uri": "model"}, "dataset": dataset}, JobSpec)


# Bucket settings near the tiny dataset's scale (the spec's smallest bucket side is 64 px).
TINY_BUCKETS = dict(resolution=96, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128,
                    bucket_reso_steps=16, caption_extension=".txt")


def _byte_symbols() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def build_tokenizer(directory: Path, pad_token: str):
    """A CLIP tokenizer over a byte-level vocabulary with no merges: one token per byte, offline."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def list_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
