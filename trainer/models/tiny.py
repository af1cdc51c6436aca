"""Tiny random Stable Diffusion pipelines that load offline, for tests, demos and CPU benchmarks.

Shapes follow a few rules that `trainer.models.load` also uses to rebuild a model from a
single-file checkpoint (where heads and activations cannot be read from tensor shapes):
attention heads = 8 (SD1) or channels // 64, at least 1 (SD2/SDXL); text encoder heads =
hidden // 64, at least 1; HF-layout CLIP uses quick_gelu, OpenCLIP layout gelu; group norms of 32.
The layout mirrors the real models at a small scale: 2 resnets per level, a 4-level VAE (latents
are 1/8 of the image), SD1/SD2 attention at the high-resolution level and SDXL at the low one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ARCH_ALIASES = {"sd15": "sd1", "sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
TEXT_HIDDEN = 32
# SDXL's second encoder is wider than the first, as in the real model (768 vs 1280): diffusers'
# single-file loader tells the two apart by width.
TEXT_HIDDEN_2 = 64
TEXT_LAYERS = 3
MAX_POSITIONS = 77
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def _byte_symbols() -> list[str]:
    """CLIP's byte → printable unicode table: printable Latin-1 bytes map to themselves, the
    others to code points from 256 upwards, so every byte string has a text form."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def write_byte_level_vocab(directory: str | Path) -> tuple[Path, Path]:
    """A byte-level CLIP vocabulary (514 tokens, no merges): every text tokenizes, one token per byte."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n")
    return vocab_path, merges_path


def _tokenizer(work: Path, pad_token: str):
    from transformers import CLIPTokenizer

    vocab, merges = write_byte_level_vocab(work)
    return CLIPTokenizer(str(vocab), str(merges), pad_token=pad_token, model_max_length=MAX_POSITIONS)


def _text_config(tokenizer, *, hidden_act: str, hidden: int = TEXT_HIDDEN, projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=MAX_POSITIONS,
        hidden_act=hidden_act,
        projection_dim=hidden if projection else 512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def unet_config(arch: str) -> dict:
    common = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        norm_num_groups=32,
    )
    if arch == "sd1":
        return dict(common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
                    attention_head_dim=8)
    if arch == "sd2":
        return dict(common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
                    attention_head_dim=(1, 1), use_linear_projection=True)
    time_dim = 8
    return dict(common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN_2,
                attention_head_dim=(1, 1), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + TEXT_HIDDEN_2)


def vae_config(arch: str) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=VAE_SCALING[arch],
    )


def build_pipeline(arch: str, *, seed: int = 0, work_dir: str | Path):
    """The tiny pipeline object (random weights from `seed`)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch = ARCH_ALIASES[arch]
    torch.manual_seed(seed)
    work = Path(work_dir)
    unet = UNet2DConditionModel(**unet_config(arch))
    vae = AutoencoderKL(**vae_config(arch))
    if arch == "sdxl":
        tok1 = _tokenizer(work / "vocab1", "<|endoftext|>")
        tok2 = _tokenizer(work / "vocab2", "!")
        te1 = CLIPTextModel(_text_config(tok1, hidden_act="quick_gelu"))
        te2 = CLIPTextModelWithProjection(_text_config(tok2, hidden_act="gelu", hidden=TEXT_HIDDEN_2, projection=True))
        scheduler = EulerDiscreteScheduler(**SCHEDULER, steps_offset=1, timestep_spacing="leading")
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=unet, scheduler=scheduler)
    v_pred = arch == "sd2"
    tok = _tokenizer(work / "vocab", "!" if v_pred else "<|endoftext|>")
    te = CLIPTextModel(_text_config(tok, hidden_act="gelu" if v_pred else "quick_gelu"))
    scheduler = DDIMScheduler(**SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if v_pred else "epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# ---------------------------------------------------------------- single-file (original LDM/SGM keys)

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_ldm_key(key: str, levels: int) -> str:
    parts = key.split(".")
    side = parts[0]
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    rest = ".".join(parts[1:])
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
    if parts[1] in simple:
        return ".".join([side, simple[parts[1]], *parts[2:]])
    if parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2])
        ldm_level = level if side == "encoder" else levels - 1 - level
        group = "down" if side == "encoder" else "up"
        if parts[3] in ("downsamplers", "upsamplers"):
            sampler = "downsample" if side == "encoder" else "upsample"
            return ".".join([side, group, str(ldm_level), sampler, *parts[5:]])
        return ".".join([side, group, str(ldm_level), "block", parts[4], _VAE_RESNET[parts[5]], *parts[6:]])
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return ".".join([side, "mid", f"block_{int(parts[3]) + 1}", _VAE_RESNET[parts[4]], *parts[5:]])
        sub = ".".join(parts[4:-1])
        return ".".join([side, "mid", "attn_1", _VAE_ATTENTION[sub], parts[-1]])
    raise KeyError(f"no LDM name for VAE key {rest}")


def _open_clip_state(te_state: dict, *, projection: bool) -> dict:
    """HF CLIP text encoder weights → OpenCLIP layout (fused q/k/v, `resblocks`, `ln_final`)."""
    import torch

    from trainer.models.keys import canonical_text_encoder_path

    out, fused = {}, {}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    for key, value in te_state.items():
        key = canonical_text_encoder_path(key)
        if key.endswith("position_ids"):
            continue
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            if projection:
                out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            layer, sub = key[len("text_model.encoder.layers."):].split(".", 1)
            module, kind = sub.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, kind), {})[module[-6]] = value
                continue
            out[f"transformer.resblocks.{layer}.{renames[module]}.{kind}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key}")
    for (layer, kind), qkv in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def ldm_state_dict(pipe, arch: str) -> dict:
    """The pipeline's weights under original LDM (SD1/SD2) or SGM (SDXL) key names."""
    from trainer.models.keys import canonical_text_encoder_path, unet_layout, unet_ldm_path

    arch = ARCH_ALIASES[arch]
    layers, up_attention = unet_layout(pipe.unet.config, arch)
    sd = {}
    for key, value in pipe.unet.state_dict().items():
        sd["model.diffusion_model." + unet_ldm_path(key, layers_per_block=layers, up_attention=up_attention)] = value
    levels = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        ldm_key = _vae_ldm_key(key, levels)
        if ldm_key.rsplit(".", 1)[0].endswith(("attn_1.q", "attn_1.k", "attn_1.v", "attn_1.proj_out")) and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        sd["first_stage_model." + ldm_key] = value
    te_state = {k: v for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if arch == "sd1":
        for key, value in te_state.items():
            sd["cond_stage_model.transformer." + canonical_text_encoder_path(key)] = value
    elif arch == "sd2":
        open_clip = _open_clip_state(te_state, projection=False)
        # Real SD2 checkpoints carry one more OpenCLIP block than diffusers uses (SD2 conditions on
        # the penultimate layer); mirror that so loaders see the genuine layout.
        last = max(int(k.split(".")[2]) for k in open_clip if k.startswith("transformer.resblocks."))
        for key in [k for k in open_clip if k.startswith(f"transformer.resblocks.{last}.")]:
            open_clip[key.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.")] = open_clip[key].clone()
        for key, value in open_clip.items():
            sd["cond_stage_model.model." + key] = value
    else:
        for key, value in te_state.items():
            sd["conditioner.embedders.0.transformer." + canonical_text_encoder_path(key)] = value
        te2 = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
        for key, value in _open_clip_state(te2, projection=True).items():
            sd["conditioner.embedders.1.model." + key] = value
    return {k: v.detach().contiguous() for k, v in sd.items()}


def build_tiny_pipeline(arch: str, out_dir: str, *, single_file: bool = False, seed: int = 0) -> str:
    """Write a tiny random pipeline as a diffusers folder at `out_dir`.

    With `single_file`, also write `<out_dir>/tiny-<arch>.safetensors` with original LDM/SGM key
    names and return its path; otherwise return `out_dir`.
    """
    import tempfile

    from safetensors.torch import save_file

    if arch not in ARCH_ALIASES:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCH_ALIASES)}")
    arch = ARCH_ALIASES[arch]
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as work:
        pipe = build_pipeline(arch, seed=seed, work_dir=work)
        pipe.save_pretrained(out, safe_serialization=True)
    if not single_file:
        return str(out)
    path = out / f"tiny-{arch}.safetensors"
    save_file(ldm_state_dict(pipe, arch), str(path), metadata={"format": "pt", "lathe.tiny_arch": arch})
    return str(path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer tiny-model",
                                     description="Write a tiny random Stable Diffusion pipeline (diffusers layout).")
    parser.add_argument("--arch", required=True, choices=sorted(ARCH_ALIASES), help="sd15/sd1, sd2 (v-prediction) or sdxl")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--single-file", action="store_true",
                        help="also write an SGM/LDM-named .safetensors checkpoint inside OUT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = build_tiny_pipeline(args.arch, args.out, single_file=args.single_file, seed=args.seed)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
