"""Loading tiny pipelines from diffusers folders and SGM/LDM single files; text conditioning."""

from __future__ import annotations

import shutil

import pytest
import torch

from trainer.core.failures import JobFailure, Reason
from trainer.core.spec import ModelSpec
from trainer.models.load import encode_prompts, load_model


def _ids(parts, prompt: str, chunks: int = 1):
    """sd-scripts-style ids: `chunks` windows of 77 tokens, each BOS + 75 tokens + EOS/PAD."""
    out = []
    for tok in parts.tokenizers:
        body = tok(prompt, add_special_tokens=False).input_ids[: 75 * chunks]
        body += [tok.pad_token_id] * (75 * chunks - len(body))
        windows = []
        for c in range(chunks):
            part = body[75 * c : 75 * (c + 1)]
            windows.append([tok.bos_token_id, *part, tok.eos_token_id])
        out.append(torch.tensor([windows]))
    return out


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_like_the_folder(tiny_models, parts_for, arch):
    folder_parts = parts_for(arch)
    single = load_model(ModelSpec(uri=tiny_models[arch][1], arch=arch), weight_dtype=torch.float32)
    assert single.arch == arch and len(single.text_encoders) == (2 if arch == "sdxl" else 1)
    for a, b in [(folder_parts.unet, single.unet), (folder_parts.vae, single.vae),
                 *zip(folder_parts.text_encoders, single.text_encoders)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = _ids(single, "a photo of a cat")
    h1, p1 = encode_prompts(folder_parts, ids, clip_skip=None, max_token_length=None)
    h2, p2 = encode_prompts(single, ids, clip_skip=None, max_token_length=None)
    assert torch.equal(h1, h2)
    if arch == "sdxl":
        assert torch.equal(p1, p2)


def test_folder_loads_with_diffusers_and_single_file_with_from_single_file(tiny_models):
    """The tiny-model contract: DiffusionPipeline and from_single_file(config=folder) read them offline."""
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    folder, single = tiny_models["sdxl"]
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time"
    other = StableDiffusionXLPipeline.from_single_file(single, config=folder, local_files_only=True)
    assert torch.equal(other.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert torch.equal(other.text_encoder_2.text_projection.weight, pipe.text_encoder_2.text_projection.weight)
    sd2 = DiffusionPipeline.from_pretrained(tiny_models["sd2"][0], local_files_only=True)
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.text_encoder.config.hidden_act == "gelu"


def test_parts_and_training_scheduler(parts_for):
    sd1, sd2 = parts_for("sd1"), parts_for("sd2")
    assert sd1.noise_scheduler.config.prediction_type == "epsilon"
    assert sd2.v_parameterization and sd2.noise_scheduler.config.prediction_type == "v_prediction"
    cfg = sd1.noise_scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, cfg.clip_sample) == (
        "scaled_linear", 0.00085, 0.012, 1000, False)
    assert sd1.vae_scaling_factor == pytest.approx(0.18215)
    assert parts_for("sdxl").vae_scaling_factor == pytest.approx(0.13025)
    assert not any(p.requires_grad for p in sd1.unet.parameters())


def test_encode_prompts_clip_skip_and_long_prompts(parts_for):
    parts = parts_for("sd1")
    ids = _ids(parts, "a photo of a cat")
    last, _ = encode_prompts(parts, ids, clip_skip=None, max_token_length=None)
    skip1, _ = encode_prompts(parts, ids, clip_skip=1, max_token_length=None)
    skip2, _ = encode_prompts(parts, ids, clip_skip=2, max_token_length=None)
    assert torch.equal(last, skip1) and not torch.allclose(last, skip2)
    te = parts.text_encoders[0]
    manual = te.final_layer_norm(te(ids[0][:, 0], output_hidden_states=True).hidden_states[-2])
    assert torch.allclose(skip2, manual)
    long_ids = _ids(parts, "a photo of a cat " * 40, chunks=3)
    states, _ = encode_prompts(parts, long_ids, clip_skip=2, max_token_length=225)
    assert states.shape == (1, 227, 32)  # BOS + 3 x 75 + EOS


def test_encode_prompts_sdxl(parts_for):
    parts = parts_for("sdxl")
    ids = _ids(parts, "a cat", chunks=2)
    states, pooled = encode_prompts(parts, ids, clip_skip=None, max_token_length=150)
    assert states.shape == (1, 152, 32 + 64) and pooled.shape == (1, 64)
    # Pooled = TE2's text_embeds of the first window (HF computes it the same way).
    ref = parts.text_encoders[1](ids[1][:, 0]).text_embeds
    assert torch.allclose(pooled, ref, atol=1e-6)


def test_separate_vae_and_no_half_vae(tiny_models):
    folder = tiny_models["sd1"][0]
    spec = ModelSpec(uri=folder, arch="sd1", vae=folder + "/vae", no_half_vae=True)
    parts = load_model(spec, weight_dtype=torch.bfloat16)
    assert parts.vae.dtype == torch.float32 and parts.unet.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_wrong_architecture_is_model_invalid(tiny_models, arch):
    other = "sdxl" if arch == "sd1" else "sd1"
    for uri in tiny_models[arch]:
        with pytest.raises(JobFailure) as err:
            load_model(ModelSpec(uri=uri, arch=other), weight_dtype=torch.float32)
        assert err.value.reason == Reason.MODEL_INVALID
        assert uri in err.value.message and f"arch={other!r}" in err.value.message


def test_bad_files_are_model_invalid(tmp_path, tiny_models):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"garbage that is not a torch file")
    lonely = tmp_path / "alone" / "model.safetensors"
    lonely.parent.mkdir()
    shutil.copy(tiny_models["sd1"][1], lonely)
    cases = {empty: "empty file", corrupt: "not a readable", pickle: "convert it to .safetensors",
             lonely: "no tokenizer found", tmp_path / "missing.safetensors": "not found"}
    for path, words in cases.items():
        with pytest.raises(JobFailure) as err:
            load_model(ModelSpec(uri=str(path), arch="sd1"), weight_dtype=torch.float32)
        assert err.value.reason == Reason.MODEL_INVALID
        assert str(path) in err.value.message and words in err.value.message


def test_ckpt_single_file(tmp_path, tiny_models, parts_for):
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_models["sd2"][1]), "global_step": 10}, ckpt)
    for sub in ("tokenizer",):
        shutil.copytree(f"{tiny_models['sd2'][0]}/{sub}", tmp_path / sub)
    parts = load_model(ModelSpec(uri=str(ckpt), arch="sd2", v_parameterization=True), weight_dtype=torch.float32)
    assert torch.equal(parts.unet.conv_in.weight, parts_for("sd2").unet.conv_in.weight)
    assert parts.text_encoders[0].config.num_hidden_layers == 3  # SD2's extra OpenCLIP block dropped


def test_tiny_model_cli(tmp_path):
    from trainer.models.tiny import main

    assert main(["--arch", "sd15", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").exists()
    with pytest.raises(SystemExit):
        main(["--arch", "sd3", str(tmp_path / "x")])
