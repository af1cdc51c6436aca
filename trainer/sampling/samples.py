"""Sample images during training, as sd-scripts makes them (`--sample_prompts`, `--sample_sampler`).

Prompt lines carry their own options (`--n --w --h --d --l --s`, parsed by trainer.core.spec); the sampler
names are sd-scripts' and map to diffusers schedulers configured from the training noise schedule.
With several processes each takes every world_size-th prompt. Images are PNGs whose text chunks hold
the prompt and an A1111-style `parameters` line, so they explain themselves wherever they are opened.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from trainer.core.spec import parse_sample_prompt

log = logging.getLogger("lathe.samples")

# sd-scripts sampler name → (diffusers scheduler class name, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD pipelines ship it; PRK needs ≥ 4 steps
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # DPM-Solver (not ++) cannot step to sigma 0, diffusers' default end: it refuses to build without this.
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def make_scheduler(sampler: str, training_scheduler: Any) -> Any:
    import diffusers

    class_name, extra = SAMPLERS[sampler]
    config = dict(training_scheduler.config)
    config.update(extra)
    return getattr(diffusers, class_name).from_config(config)


def build_pipeline(parts: Any, sampler: str) -> Any:
    """A diffusers pipeline over the training components (the adapter is hooked into them)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = make_scheduler(sampler, parts.noise_scheduler)
    if parts.arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1], unet=parts.unet, scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0], unet=parts.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _png_info(opts: dict[str, Any], sampler: str, seed: int, step: int) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", opts["prompt"])
    info.add_text("negative_prompt", opts["negative_prompt"])
    params = (f"{opts['prompt']}\nNegative prompt: {opts['negative_prompt']}\n"
              f"Steps: {opts['steps']}, Sampler: {sampler}, CFG scale: {opts['scale']}, Seed: {seed}, "
              f"Size: {opts['width']}x{opts['height']}, Training step: {step}")
    info.add_text("parameters", params)
    return info


@contextlib.contextmanager
def pipeline_for(parts: Any, sampler: str) -> Iterator[Any]:
    """A pipeline on the UNet's device with every part in eval mode; puts back what it borrowed."""
    pipe = build_pipeline(parts, sampler)
    device = next(parts.unet.parameters()).device
    # The training loop may have parked the VAE / text encoders on the CPU after caching: borrow them.
    parked = [m for m in (parts.vae, *parts.text_encoders) if next(m.parameters()).device != device]
    pipe.to(device)
    was_training = [m.training for m in (parts.unet, *parts.text_encoders)]
    for m in (parts.unet, *parts.text_encoders):
        m.eval()
    try:
        yield pipe
    finally:
        for m, flag in zip((parts.unet, *parts.text_encoders), was_training):
            m.train(flag)
        for m in parked:
            m.to("cpu")


def render_image(pipe: Any, parts: Any, opts: dict[str, Any], seed: int, clip_skip: int | None) -> Any:
    """One image for a parsed prompt line (`parse_sample_prompt`) at `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        prompt=opts["prompt"], negative_prompt=opts["negative_prompt"] or None,
        width=opts["width"], height=opts["height"], num_inference_steps=opts["steps"],
        guidance_scale=opts["scale"], generator=generator,
    )
    if clip_skip and parts.arch != "sdxl":
        kwargs["clip_skip"] = clip_skip - 1 if clip_skip > 1 else None
    return pipe(**kwargs).images[0]


@torch.no_grad()
def generate_samples(parts: Any, prompts: list[str], sampler: str, out_dir: str, *, step: int,
                     clip_skip: int | None = None, rank: int = 0, world_size: int = 1,
                     base_seed: int = 0) -> list[Path]:
    """Render this rank's share of the prompts into `out_dir/<index>.png`; returns the files written."""
    if not prompts:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with pipeline_for(parts, sampler) as pipe:
        for index in range(rank, len(prompts), world_size):
            opts = parse_sample_prompt(prompts[index])
            seed = opts["seed"] if opts["seed"] is not None else base_seed + index
            image = render_image(pipe, parts, opts, seed, clip_skip)
            path = out / f"{index}.png"
            image.save(path, pnginfo=_png_info(opts, sampler, seed, step))
            written.append(path)
            log.info("sample %d at step %d: %s", index, step, path)
    return written
