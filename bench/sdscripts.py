"""kohya sd-scripts' training step on the same GPU, for the training bench's comparison rows.

sd-scripts is not part of Lathe: it runs from its own checkout with its own Python environment (it pins
other diffusers/transformers versions and imports cv2), both in a folder outside the project given by
$SDSCRIPTS_DIR (`$SDSCRIPTS_DIR/sd-scripts`, `$SDSCRIPTS_DIR/venv/bin/python`). This script builds its
inputs with the trainer's environment: the standard architecture with random weights as a diffusers
folder (as `bench/train.py` builds it), byte-level CLIP tokenizers in a `--tokenizer_cache_dir` (the
machine has no hub access), and square images of one bucket. Then it runs `sdxl_train_network.py` /
`train_network.py` with the settings docs/benchmarks.md lists and reads it/s from its progress bar.

    .venv/bin/python bench/sdscripts.py --model sdxl --batch-size 1 --steps 20 --json row.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESOLUTION = {"sd15": 512, "sdxl": 1024}
SCRIPT = {"sd15": "train_network.py", "sdxl": "sdxl_train_network.py"}
TOKENIZER_NAMES = ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")


def write_inputs(model: str, work: Path, images: int) -> tuple[Path, Path, Path]:
    """(model folder, tokenizer cache, dataset folder) under `work`, reused when present."""
    import torch
    from PIL import Image

    from bench.train import MODELS, _random_parts
    from trainer.models.tiny import _tokenizer

    model_dir, tok_dir, data_dir = work / f"{model}-random", work / "tokenizers", work / f"data-{model}"
    tokenizer = _tokenizer(work / "vocab", "<|endoftext|>")
    for name in TOKENIZER_NAMES:
        tokenizer.save_pretrained(str(tok_dir / name))
    if not (model_dir / "model_index.json").exists():
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        parts = _random_parts(MODELS[model], "cpu", torch.float16)
        common = {"unet": parts.unet, "vae": parts.vae, "scheduler": parts.noise_scheduler}
        if model == "sdxl":
            pipe = StableDiffusionXLPipeline(text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
                                             tokenizer=tokenizer, tokenizer_2=tokenizer, **common)
        else:
            pipe = StableDiffusionPipeline(text_encoder=parts.text_encoders[0], tokenizer=tokenizer, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False, **common)
        pipe.save_pretrained(str(model_dir), safe_serialization=True)
    folder = data_dir / "1_thing"
    folder.mkdir(parents=True, exist_ok=True)
    size = RESOLUTION[model]
    for i in range(images):
        if not (folder / f"{i}.png").exists():
            Image.new("RGB", (size, size), (40 * i % 255, 90, 160)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text("a thing")
    return model_dir, tok_dir, data_dir


def command(sd: Path, python: str, model: str, batch_size: int, steps: int, paths: tuple[Path, Path, Path],
            out: Path) -> list[str]:
    model_dir, tok_dir, data_dir = paths
    size = RESOLUTION[model]
    args = [python, str(sd / SCRIPT[model]), f"--pretrained_model_name_or_path={model_dir}",
            f"--train_data_dir={data_dir}", f"--output_dir={out}", f"--tokenizer_cache_dir={tok_dir}",
            f"--resolution={size},{size}", f"--train_batch_size={batch_size}", f"--max_train_steps={steps}",
            "--network_module=networks.lora", "--network_dim=32", "--network_alpha=16", "--network_train_unet_only",
            "--mixed_precision=bf16", "--sdpa", "--cache_latents", "--optimizer_type=AdamW", "--learning_rate=1e-4",
            "--max_data_loader_n_workers=1", "--save_model_as=safetensors", "--seed=0"]
    if model == "sdxl":
        args.append("--cache_text_encoder_outputs")
    return args


def it_per_s(log: str) -> float | None:
    """The last rate tqdm printed (`2.31it/s` or `1.45s/it`)."""
    rates = re.findall(r"([0-9.]+)(it/s|s/it)", log)
    if not rates:
        return None
    value, unit = rates[-1]
    return float(value) if unit == "it/s" else 1.0 / float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(RESOLUTION), default="sdxl")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", default=os.environ.get("SDSCRIPTS_WORK") or os.path.join(tempfile.gettempdir(), "sdscripts-work"),
                        help="its inputs (random-weight model, tokenizers, images) and outputs; reused when present")
    parser.add_argument("--json", required=True)
    a = parser.parse_args()
    root = Path(os.environ.get("SDSCRIPTS_DIR", ""))
    sd, python = root / "sd-scripts", root / "venv" / "bin" / "python"
    if not os.environ.get("SDSCRIPTS_DIR") or not (sd / SCRIPT[a.model]).exists() or not python.exists():
        print(f"SKIP sd-scripts {a.model} bs {a.batch_size}: set SDSCRIPTS_DIR to a folder holding sd-scripts/ "
              "(its checkout) and venv/ (its environment)", file=sys.stderr)
        sys.exit(0)
    work = Path(a.work)
    paths = write_inputs(a.model, work, images=max(8, 4 * a.batch_size))
    t0 = time.monotonic()
    proc = subprocess.run(command(sd, str(python), a.model, a.batch_size, a.steps, paths, work / "out"),
                          cwd=sd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log = proc.stdout + proc.stderr
    row = {"contender": "sd-scripts", "model": a.model, "batch_size": a.batch_size, "steps": a.steps,
           "rc": proc.returncode, "wall_s": time.monotonic() - t0, "it_per_s": it_per_s(log), "log_tail": log[-3000:]}
    Path(a.json).write_text(json.dumps(row, indent=1) + "\n")
    print(f"sd-scripts {a.model} bs {a.batch_size}: rc {proc.returncode}, {row['it_per_s']} it/s", file=sys.stderr)


if __name__ == "__main__":
    main()
