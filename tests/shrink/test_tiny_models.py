"""Against tiny real pipelines: base lookup by LoRA name, recipes on both base formats, diffusers loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from shrink_fixtures import lora_delta, lora_layer

from trainer.core.settings import trainer_settings
from trainer.models.keys import sd_scripts_text_encoder_name, sd_scripts_unet_name
from trainer.shrink import shrink_file
from trainer.shrink.base_model import BaseModel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_pipeline):
    out = {}
    for arch in ("sd1", "sdxl"):
        single = Path(tiny_pipeline(arch, single_file=True))
        out[arch] = (single.parent, single)
    return out


def adapter_for(folder: Path, arch: str, *, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA on every UNet attention/conv and text-encoder linear of the tiny model, random factors."""
    config = json.loads((folder / "unet" / "config.json").read_text())
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for key, w in unet.items():
        module = key.removesuffix(".weight")
        if w.dim() < 2 or "norm" in module or not key.endswith(".weight"):
            continue
        if not any(p in module for p in ("attn", "proj_in", "proj_out", "ff.net", "conv1", "conv_shortcut")):
            continue
        name = sd_scripts_unet_name(module, arch, unet_config=config)
        tensors |= lora_layer(name, w.shape[0], w.shape[1], rank, rank / 2, kernel=tuple(w.shape[2:]), std=0.2)
    encoders = [("text_encoder", 0)] + ([("text_encoder_2", 1)] if arch == "sdxl" else [])
    for folder_name, index in encoders:
        for key, w in load_file(str(folder / folder_name / "model.safetensors")).items():
            if key.endswith(("q_proj.weight", "k_proj.weight", "fc1.weight")):
                name = sd_scripts_text_encoder_name(key.removesuffix(".weight"), arch, index)
                tensors |= lora_layer(name, w.shape[0], w.shape[1], rank, rank / 2, std=0.2)
    return tensors


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_layer_finds_its_base_weight_in_both_formats(tiny, arch):
    folder, single = tiny[arch]
    names = {k.split(".")[0] for k in adapter_for(folder, arch)}
    by_folder, by_file = BaseModel(str(folder)), BaseModel(str(single))
    for name in names:
        assert by_folder.has(name) and by_file.has(name), name
        torch.testing.assert_close(by_folder.weight(name).float(), by_file.weight(name).float(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_recipe_ranks_agree_between_base_formats_and_use_the_norm_cache(tiny, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("LATHE_CACHE_DIR", str(tmp_path / "cache"))
    trainer_settings.cache_clear()
    folder, single = tiny[arch]
    adapter = tmp_path / "a.safetensors"
    save_file(adapter_for(folder, arch), str(adapter))
    recipe = "fro_ckpt=1,thr=-0.7"
    by_folder = shrink_file(str(adapter), str(tmp_path / "f.safetensors"), base=str(folder), recipe=recipe)
    by_file = shrink_file(str(adapter), str(tmp_path / "s.safetensors"), base=str(single), recipe=recipe)
    ranks = [r.new_rank for r in by_folder.layers]
    assert ranks == [r.new_rank for r in by_file.layers]
    assert 0 < sum(ranks) < sum(r.old_rank for r in by_folder.layers)  # the threshold cuts some, not all
    # Each kept σ is above 10^thr·‖W_base‖_F, each dropped one not (checked on one layer by hand).
    row = by_folder.layers[0]
    base = BaseModel(str(folder))
    assert base._cache.get("fro", {}).get(row.name) is not None  # norms were cached on disk
    cached_norm = base._cache["fro"][row.name]
    assert cached_norm == pytest.approx(float(base.weight(row.name).float().norm()), rel=1e-6)


def test_shrunk_file_loads_in_diffusers_and_applies_its_delta(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, _ = tiny["sd1"]
    adapter = tmp_path / "a.safetensors"
    save_file(adapter_for(folder, "sd1"), str(adapter))
    out = tmp_path / "shrunk.safetensors"
    shrink_file(str(adapter), str(out), base=None, rank=2, save_precision="fp32")
    shrunk = load_file(str(out))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    config = dict(pipe.unet.config)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    after = pipe.unet.state_dict()
    checked = 0
    for key, w0 in before.items():
        if not key.endswith(".weight") or w0.dim() < 2:
            continue
        module = key.removesuffix(".weight")
        name = sd_scripts_unet_name(module, "sd1", unet_config=config)
        expected = lora_delta(shrunk, name).reshape(w0.shape) if f"{name}.alpha" in shrunk else torch.zeros_like(w0)
        got = after[key.replace(".weight", ".base_layer.weight")] if key not in after else after[key]
        torch.testing.assert_close(got - w0, expected, rtol=1e-4, atol=1e-5)
        checked += f"{name}.alpha" in shrunk
    assert checked == sum(1 for k in shrunk if k.endswith(".alpha") and k.startswith("lora_unet_"))


def test_cli_runs_without_diffusers_or_transformers(tiny, tmp_path):
    folder, _ = tiny["sd1"]
    adapter = tmp_path / "a.safetensors"
    save_file(adapter_for(folder, "sd1"), str(adapter))
    out, plot, report = tmp_path / "o.safetensors", tmp_path / "p.png", tmp_path / "r.json"
    probe = (
        "import sys; from trainer.shrink.cli import main; "
        f"rc = main([{str(adapter)!r}, '-o', {str(out)!r}, '--method', 'sv_fro', '--param', '0.9',"
        f" '--plot', {str(plot)!r}, '--report', {str(report)!r}, '-q']); "
        "heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
        "print(rc, heavy)"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "0 []", result.stderr
    assert plot.stat().st_size > 1000 and json.loads(report.read_text())["rule"] == "method"
    bad = subprocess.run(
        [sys.executable, "-m", "trainer", "shrink", str(adapter), "-o", str(out), "--recipe", "fro_ckpt=1,thr=-3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "--base" in bad.stderr  # a usage error, found before torch is imported
