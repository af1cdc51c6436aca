"""Sample images (trainer/sampling/samples.py) on the tiny SD1 pipeline: sd-scripts' prompt options, the
sampler names, the PNG text chunks, and the split of the prompts between processes. The 2-process
run through the job runner is in test_ddp.py."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.sampling.samples import SAMPLERS, generate_samples, make_scheduler
from trainer.core.spec import Sampler

PROMPTS = [
    "a red circle --n blurry, dark --w 96 --h 64 --d 7 --l 5.5 --s 2",
    "a blue square --w 64 --h 64 --s 1",
    "a circle and a square --s 1 --h 96 --w 64",
]


@pytest.fixture(scope="module")
def parts(tiny_models: dict[str, str]) -> Any:
    from trainer.models.load import load_model
    from trainer.core.spec import ModelSpec

    return load_model(ModelSpec(uri=tiny_models["sd1"], arch="sd1"), weight_dtype=torch.float32, device="cpu")


def _png(path: Path) -> tuple[tuple[int, int], dict[str, str], np.ndarray]:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.size, dict(image.text), np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_pngs_have_the_requested_size_and_carry_prompt_and_options(parts: Any, tmp_path: Path, sampler: str) -> None:
    files = generate_samples(parts, PROMPTS[:2], sampler, str(tmp_path), step=5, base_seed=100)
    assert [p.name for p in files] == ["0.png", "1.png"]
    size, text, pixels = _png(files[0])
    assert size == (96, 64) and pixels.shape == (64, 96, 3)
    assert text["prompt"] == "a red circle" and text["negative_prompt"] == "blurry, dark"
    assert text["parameters"] == ("a red circle\nNegative prompt: blurry, dark\nSteps: 2, Sampler: " + sampler +
                                  ", CFG scale: 5.5, Seed: 7, Size: 96x64, Training step: 5")
    size, text, _ = _png(files[1])
    assert size == (64, 64) and text["prompt"] == "a blue square" and text["negative_prompt"] == ""
    # No --d: the seed is base_seed + the prompt's index, so every image is reproducible from its header.
    assert "Steps: 1," in text["parameters"] and "CFG scale: 7.5, Seed: 101," in text["parameters"]


def test_prompts_are_split_between_ranks_without_changing_an_image(parts: Any, tmp_path: Path) -> None:
    alone = generate_samples(parts, PROMPTS, "euler_a", str(tmp_path / "alone"), step=0, base_seed=3)
    rank0 = generate_samples(parts, PROMPTS, "euler_a", str(tmp_path / "r0"), step=0, rank=0, world_size=2, base_seed=3)
    rank1 = generate_samples(parts, PROMPTS, "euler_a", str(tmp_path / "r1"), step=0, rank=1, world_size=2, base_seed=3)
    assert [p.name for p in alone] == ["0.png", "1.png", "2.png"]
    assert [p.name for p in rank0] == ["0.png", "2.png"] and [p.name for p in rank1] == ["1.png"]
    for path in [*rank0, *rank1]:
        size, text, pixels = _png(path)
        size_alone, text_alone, pixels_alone = _png(tmp_path / "alone" / path.name)
        assert size == size_alone and text == text_alone
        assert np.array_equal(pixels, pixels_alone), path.name  # seeded per prompt, not per process
    assert _png(tmp_path / "alone" / "2.png")[0] == (64, 96)


def test_the_sampler_names_are_the_specs_and_k_names_are_aliases() -> None:
    assert set(typing.get_args(Sampler)) == set(SAMPLERS)
    for name in SAMPLERS:
        if name.startswith("k_"):
            assert SAMPLERS[name] == SAMPLERS[name[2:]], name


@pytest.mark.parametrize("name", [name for name in SAMPLERS if not name.startswith("k_")])
def test_every_sampler_renders_with_its_scheduler(parts: Any, name: str, tmp_path: Path) -> None:
    class_name, extra = SAMPLERS[name]
    scheduler = make_scheduler(name, parts.noise_scheduler)
    assert type(scheduler).__name__ == class_name
    # The training noise schedule carries over; sampler-specific settings on top.
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert scheduler.config[key] == parts.noise_scheduler.config[key], key
    assert all(scheduler.config[k] == v for k, v in extra.items())
    steps = 4 if name == "pndm" else 2  # PNDM's Runge-Kutta warm-up alone takes 4 steps (diffusers fails below)
    [path] = generate_samples(parts, [f"a circle --w 64 --h 64 --s {steps}"], name, str(tmp_path), step=1)
    size, text, pixels = _png(path)
    assert size == (64, 64) and f"Sampler: {name}," in text["parameters"] and pixels.std() > 0


def test_no_prompts_renders_nothing(parts: Any, tmp_path: Path) -> None:
    assert generate_samples(parts, [], "ddim", str(tmp_path / "none"), step=1) == []
    assert not (tmp_path / "none").exists()
