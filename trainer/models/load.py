"""Load a base model (diffusers folder or single-file checkpoint) into `ModelParts`.

Single files (`.safetensors` / `.ckpt` with original LDM/SGM keys) are read with diffusers'
`from_single_file`, which needs a diffusers config folder. Offline we cannot fetch one from the
Hub, so we write it: the shipped standard configs (`configs/<arch>.json`) with every shape that the
checkpoint's tensors reveal (channels, depths, widths, vocabulary) filled in from the file. Values
no tensor shape shows (attention heads, activations) follow the standard models' rules.
`.ckpt` files are read with `weights_only=True`: a pickled checkpoint never runs code here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from trainer.core.failures import JobFailure, Reason
from trainer.core.settings import trainer_settings
from trainer.core.spec import ModelSpec

log = logging.getLogger(__name__)

ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
MIN_VOCAB = 256  # any real CLIP vocabulary has at least the 256 byte symbols
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each architecture keeps its text encoders in a single file: (prefix, layout).
TEXT_ENCODER_PREFIXES = {
    "sd1": [("cond_stage_model.transformer.", "hf")],
    "sd2": [("cond_stage_model.model.", "open_clip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "open_clip")],
}
# sd-scripts' training noise schedule (train_network.py builds this DDPMScheduler for every model).
NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False)


@dataclass
class ModelParts:
    arch: str
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    v_parameterization: bool
    vae_scaling_factor: float
    source: str


def _invalid(message: str) -> JobFailure:
    return JobFailure(Reason.MODEL_INVALID, message)


def standard_config(arch: str) -> dict:
    return json.loads(resources.files("trainer.models").joinpath("configs", f"{arch}.json").read_text())


# ------------------------------------------------------------------------------------ detection

def detect_folder_arch(folder: Path) -> str:
    if (folder / "text_encoder_2").is_dir() or (folder / "unet" / "config.json").exists() and json.loads(
        (folder / "unet" / "config.json").read_text()
    ).get("addition_embed_type") == "text_time":
        return "sdxl"
    te_config = folder / "text_encoder" / "config.json"
    if te_config.exists() and json.loads(te_config.read_text()).get("hidden_act") == "gelu":
        return "sd2"  # OpenCLIP (SD2) uses gelu, OpenAI CLIP (SD1) quick_gelu
    return "sd1"


def detect_checkpoint_arch(keys) -> str | None:
    keys = set(keys)
    if "conditioner.embedders.1.model.positional_embedding" in keys or any(
        k.startswith(UNET_PREFIX + "label_emb.") for k in keys
    ):
        return "sdxl"
    if "cond_stage_model.model.token_embedding.weight" in keys:
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    return None


def _check_arch(expected: str, found: str, source: str) -> None:
    if expected != found:
        raise _invalid(
            f"base model {source} is an {ARCH_NAMES[found]} model but the spec says arch={expected!r}: "
            f"set model.arch to {found!r} or choose a {ARCH_NAMES[expected]} model"
        )


# ------------------------------------------------------------------------- single-file reading

def read_checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a single-file checkpoint; clear errors for empty, corrupt or unsafe files."""
    size = path.stat().st_size
    if size == 0:
        raise _invalid(f"base model {path} is an empty file (0 bytes): the download or upload was cut short")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise _invalid(f"base model {path} is not a readable .safetensors file ({e})") from e
    try:
        sd = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
    except Exception as e:
        raise _invalid(
            f"base model {path} cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e}); "
            "convert it to .safetensors"
        ) from e
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise _invalid(f"base model {path} holds no state dict")
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _count(shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def infer_unet_config(shapes: dict, arch: str, base: dict) -> dict:
    p = UNET_PREFIX
    if p + "input_blocks.0.0.weight" not in shapes:
        raise _invalid("no UNet weights (model.diffusion_model.*) found")
    levels = _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    n_input = _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    layers = n_input // levels - 1
    channels, attention, depth = [], [], []
    for level in range(levels):
        first = f"{p}input_blocks.{1 + level * (layers + 1)}"
        channels.append(shapes[f"{first}.0.out_layers.3.weight"][0])
        has_attention = f"{first}.1.proj_in.weight" in shapes
        attention.append(has_attention)
        depth.append(_count(shapes, re.escape(first) + r"\.1\.transformer_blocks\.(\d+)\.") if has_attention else 1)
    k_key = next((k for k in shapes if k.endswith("attn2.to_k.weight") and k.startswith(p)), None)
    proj_in = next((k for k in shapes if k.endswith(".proj_in.weight") and k.startswith(p)), None)
    if k_key is None or proj_in is None:
        raise _invalid("the UNet has no cross-attention layers (attn2); not a Stable Diffusion UNet")
    config = dict(base)
    config.update(
        in_channels=shapes[p + "input_blocks.0.0.weight"][1],
        out_channels=shapes[p + "out.2.weight"][0],
        layers_per_block=layers,
        block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=shapes[k_key][1],
        use_linear_projection=len(shapes[proj_in]) == 2,
        attention_head_dim=8 if arch == "sd1" else [max(1, c // 64) for c in channels],
    )
    if arch == "sdxl":
        mid_depth = _count(shapes, re.escape(p) + r"middle_block\.1\.transformer_blocks\.(\d+)\.")
        depth[-1] = mid_depth or depth[-1]  # diffusers takes the mid-block depth from the last level
        config["transformer_layers_per_block"] = depth
        label = shapes.get(p + "label_emb.0.0.weight")
        te2_proj = shapes.get("conditioner.embedders.1.model.text_projection")
        if label is None or te2_proj is None:
            raise _invalid("SDXL checkpoint without label_emb or second text encoder projection")
        config["projection_class_embeddings_input_dim"] = label[1]
        config["addition_time_embed_dim"] = (label[1] - te2_proj[1]) // 6
    return config


def infer_vae_config(shapes: dict, prefix: str, base: dict) -> dict:
    p = prefix + "encoder."
    if p + "conv_in.weight" not in shapes:
        raise _invalid(f"no VAE weights ({prefix}encoder.*) found")
    levels = _count(shapes, re.escape(p) + r"down\.(\d+)\.")
    config = dict(base)
    config.update(
        in_channels=shapes[p + "conv_in.weight"][1],
        out_channels=shapes[prefix + "decoder.conv_out.weight"][0],
        latent_channels=shapes[prefix + "decoder.conv_in.weight"][1],
        layers_per_block=_count(shapes, re.escape(p) + r"down\.0\.block\.(\d+)\."),
        block_out_channels=[shapes[f"{p}down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return config


def infer_text_config(shapes: dict, prefix: str, layout: str, arch: str, base: dict) -> dict:
    config = dict(base)
    if layout == "hf":
        p = prefix + "text_model."
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        layers = _count(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        intermediate = shapes[f"{p}encoder.layers.0.mlp.fc1.weight"][0]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        act = "quick_gelu"
    else:
        vocab, hidden = shapes[prefix + "token_embedding.weight"]
        layers = _count(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        if arch == "sd2":
            layers -= 1  # SD2 conditions on OpenCLIP's penultimate layer: diffusers drops the last block
        intermediate = shapes[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"][0]
        positions = shapes[prefix + "positional_embedding"][0]
        act = "gelu"
        if prefix + "text_projection" in shapes:
            config["projection_dim"] = shapes[prefix + "text_projection"][1]
    config.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                  max_position_embeddings=positions, hidden_act=act, num_attention_heads=max(1, hidden // 64))
    return config


def find_tokenizer_dir(checkpoint: Path, arch: str, index: int) -> Path | None:
    """A tokenizer for a single file: a diffusers `tokenizer/` (`tokenizer_2/`) folder beside it,
    under `$LATHE_TOKENIZERS_DIR/<arch>/`, or the standard one in the local Hugging Face cache."""
    sub = "tokenizer" if index == 0 else "tokenizer_2"
    candidates = [checkpoint.parent / sub]
    tokenizers_dir = trainer_settings().tokenizers_dir
    if tokenizers_dir:
        candidates.append(Path(tokenizers_dir) / arch / sub)
    for c in candidates:
        if c.is_dir() and any(c.iterdir()):
            return c
    from transformers import CLIPTokenizer

    hub = standard_config(arch).get("tokenizer_hub" if index == 0 else "tokenizer_2_hub", [])
    for repo, subfolder in hub:
        try:
            tok = CLIPTokenizer.from_pretrained(repo, subfolder=subfolder or None, local_files_only=True)
        except Exception:  # not in the local cache: try the next
            continue
        if len(tok) < MIN_VOCAB:  # transformers 5 returns an empty tokenizer for files it cannot find
            continue
        out = Path(tempfile.mkdtemp(prefix="lathe-tok-"))
        tok.save_pretrained(out)
        return out
    return None


def write_single_file_config(path: Path, shapes: dict, arch: str, out: Path) -> None:
    """A diffusers config folder matching the checkpoint, for `from_single_file(config=...)`."""
    std = standard_config(arch)
    components = {"unet": infer_unet_config(shapes, arch, std["unet"]),
                  "vae": infer_vae_config(shapes, VAE_PREFIX, std["vae"]),
                  "scheduler": std["scheduler"]}
    model_index = {"_class_name": std["pipeline"], "_diffusers_version": "0.30.0",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", std["scheduler"]["_class_name"]]}
    for index, (prefix, layout) in enumerate(TEXT_ENCODER_PREFIXES[arch]):
        te_name = "text_encoder" if index == 0 else "text_encoder_2"
        tok_name = "tokenizer" if index == 0 else "tokenizer_2"
        if not any(k.startswith(prefix) for k in shapes):
            raise _invalid(f"base model {path}: no weights for text encoder {index + 1} ({prefix}*) found")
        te_config = infer_text_config(shapes, prefix, layout, arch, std[te_name])
        tok_dir = find_tokenizer_dir(path, arch, index)
        if tok_dir is None:
            raise _invalid(
                f"base model {path}: no {tok_name} found for this single-file checkpoint (offline). Put the "
                f"model's diffusers `{tok_name}/` folder next to the file, set LATHE_TOKENIZERS_DIR to a folder "
                f"with {arch}/{tok_name}/, or use the diffusers folder of the model"
            )
        shutil.copytree(tok_dir, out / tok_name)
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(out / tok_name))
        if len(tok) < MIN_VOCAB:
            raise _invalid(f"{tok_dir} holds no usable CLIP vocabulary ({len(tok)} tokens)")
        if len(tok) > te_config["vocab_size"]:
            raise _invalid(f"{tok_dir} has {len(tok)} tokens but text encoder {index + 1} of {path} only "
                           f"{te_config['vocab_size']}: the tokenizer belongs to another model")
        te_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        components[te_name] = te_config
        te_class = te_config["architectures"][0]
        model_index[te_name] = ["transformers", te_class]
        model_index[tok_name] = ["transformers", "CLIPTokenizer"]
    if arch != "sdxl":
        model_index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(model_index))
    for name, config in components.items():
        (out / name).mkdir(exist_ok=True)
        config_name = "scheduler_config.json" if name == "scheduler" else "config.json"
        (out / name / config_name).write_text(json.dumps(config))


def _pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def _components(pipe, arch: str) -> tuple[Any, Any, list, list]:
    if arch == "sdxl":
        return pipe.unet, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    return pipe.unet, pipe.vae, [pipe.text_encoder], [pipe.tokenizer]


def _check_loaded(module, name: str, source: str) -> None:
    missing = [k for k, v in module.state_dict().items() if v.is_meta]
    if missing:
        raise _invalid(f"base model {source}: {name} weights missing from the file, e.g. {missing[:3]}")


def load_single_file(path: Path, arch: str, dtype: torch.dtype):
    shapes = read_checkpoint_shapes(path)
    found = detect_checkpoint_arch(shapes)
    if found is None:
        sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
        raise _invalid(f"base model {path} is not a Stable Diffusion checkpoint with original key names "
                       f"(found {len(shapes)} tensors: {sample}, ...)")
    _check_arch(arch, found, str(path))
    with tempfile.TemporaryDirectory(prefix="lathe-config-") as config_dir:
        write_single_file_config(path, shapes, arch, Path(config_dir))
        try:
            pipe = _pipeline_class(arch).from_single_file(str(path), config=config_dir, local_files_only=True,
                                                          torch_dtype=dtype)
        except JobFailure:
            raise
        except Exception as e:
            raise _invalid(f"base model {path} could not be loaded as {ARCH_NAMES[arch]} ({type(e).__name__}: {e})") from e
    return pipe


def load_folder(folder: Path, arch: str, dtype: torch.dtype):
    if not (folder / "model_index.json").exists():
        raise _invalid(f"base model folder {folder} has no model_index.json: not a diffusers pipeline folder")
    _check_arch(arch, detect_folder_arch(folder), str(folder))
    try:
        extra = {} if arch == "sdxl" else {"safety_checker": None}
        return _pipeline_class(arch).from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype, **extra)
    except Exception as e:
        raise _invalid(f"base model folder {folder} could not be loaded ({type(e).__name__}: {e})") from e


def load_vae(vae_path: str, arch: str):
    """A separate VAE: a diffusers folder (config.json or vae/config.json) or a single file."""
    from diffusers import AutoencoderKL

    path = Path(vae_path)
    if not path.exists():
        raise _invalid(f"VAE {vae_path} not found")
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").exists() else None
        try:
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True)
        except Exception as e:
            raise _invalid(f"VAE folder {vae_path} could not be loaded ({type(e).__name__}: {e})") from e
    shapes = read_checkpoint_shapes(path)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in shapes) else ""
    if prefix + "encoder.conv_in.weight" not in shapes:
        raise _invalid(f"VAE {vae_path} holds no VAE weights (no encoder.conv_in)")
    if prefix + "encoder.down.0.block.0.conv1.weight" not in shapes:
        raise _invalid(f"VAE {vae_path} is not in the original LDM layout; use a diffusers VAE folder instead")
    with tempfile.TemporaryDirectory(prefix="lathe-vae-") as config_dir:
        (Path(config_dir) / "vae").mkdir()
        config = infer_vae_config(shapes, prefix, standard_config(arch)["vae"])
        (Path(config_dir) / "vae" / "config.json").write_text(json.dumps(config))
        try:
            vae = AutoencoderKL.from_single_file(str(path), config=config_dir, subfolder="vae", local_files_only=True)
        except Exception as e:
            raise _invalid(f"VAE {vae_path} could not be loaded ({type(e).__name__}: {e})") from e
    _check_loaded(vae, "VAE", vae_path)
    return vae


def load_model(model_spec: ModelSpec, *, weight_dtype: torch.dtype, vae_dtype: torch.dtype | None = None, device="cpu") -> ModelParts:
    """Load the base model a `ModelSpec` names (`uri` is a local path by now).

    Text encoders and UNet are cast to `weight_dtype`; the VAE to `vae_dtype`, else fp32 when
    `no_half_vae` is set, else `weight_dtype` (sd-scripts' rule). Everything is frozen.
    """
    from diffusers import DDPMScheduler

    arch = model_spec.arch
    source = Path(model_spec.uri)
    if not source.exists():
        raise _invalid(f"base model {source} not found")
    if source.is_dir():
        pipe = load_folder(source, arch, weight_dtype)
    elif source.suffix.lower() in SINGLE_FILE_SUFFIXES:
        pipe = load_single_file(source, arch, weight_dtype)
    else:
        raise _invalid(f"base model {source}: expected a diffusers folder or a "
                       f"{'/'.join(SINGLE_FILE_SUFFIXES)} file")
    unet, vae, text_encoders, tokenizers = _components(pipe, arch)
    for name, module in [("UNet", unet), ("VAE", vae)] + [(f"text encoder {i + 1}", te) for i, te in enumerate(text_encoders)]:
        _check_loaded(module, name, str(source))
    if model_spec.vae:
        vae = load_vae(model_spec.vae, arch)
    if vae_dtype is None:
        vae_dtype = torch.float32 if model_spec.no_half_vae else weight_dtype
    v_param = model_spec.v_parameterization
    folder_prediction = pipe.scheduler.config.get("prediction_type")
    if folder_prediction == "v_prediction" and not v_param:
        log.warning("%s is configured for v-prediction but v_parameterization is off", source)
    for module, dtype in [(unet, weight_dtype), (vae, vae_dtype)] + [(te, weight_dtype) for te in text_encoders]:
        module.requires_grad_(False)
        if module.dtype != dtype:
            module.to(dtype=dtype)
        module.to(device=device)
        module.eval()
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE, prediction_type="v_prediction" if v_param else "epsilon")
    return ModelParts(arch=arch, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                      noise_scheduler=noise_scheduler, v_parameterization=v_param,
                      vae_scaling_factor=float(vae.config.scaling_factor), source=str(source))


# ---------------------------------------------------------------------------------- text encoding

def _merge_chunks(states: torch.Tensor, batch: int, max_token_length: int | None, chunk_len: int) -> torch.Tensor:
    """(batch*n, 77, C) → sd-scripts' layout: BOS, the 75 tokens of each chunk, the last EOS/PAD."""
    states = states.reshape(batch, -1, states.shape[-1])
    if not max_token_length or states.shape[1] == chunk_len:
        return states
    parts = [states[:, :1]]
    for i in range(1, max_token_length, chunk_len):
        parts.append(states[:, i : i + chunk_len - 2])
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)


def _as_chunks(input_ids: torch.Tensor, chunk_len: int) -> torch.Tensor:
    if input_ids.ndim == 3:
        return input_ids.reshape(-1, chunk_len)
    if input_ids.ndim == 2 and input_ids.shape[1] % chunk_len == 0:
        return input_ids.reshape(-1, chunk_len)
    raise ValueError(f"input ids of shape {tuple(input_ids.shape)}: expected (batch, n, {chunk_len})")


def encode_prompts(parts: ModelParts, input_ids_per_encoder, *, clip_skip: int | None, max_token_length: int | None):
    """sd-scripts' text conditioning. Returns (hidden_states, pooled or None).

    `input_ids_per_encoder`: one (batch, n, 77) tensor per text encoder, n = max_token_length // 75
    chunks each framed by BOS/EOS (75 → n = 1). SD1/SD2: hidden_states[-clip_skip] through the final
    layer norm (last layer when clip_skip is None). SDXL: penultimate layers of both encoders
    concatenated (clip_skip does not apply), pooled = TE2's projected EOS state of the first chunk.
    """
    chunk_len = parts.tokenizers[0].model_max_length
    batch = input_ids_per_encoder[0].shape[0]
    if parts.arch != "sdxl":
        te = parts.text_encoders[0]
        ids = _as_chunks(input_ids_per_encoder[0], chunk_len).to(te.device)
        if clip_skip is None or clip_skip <= 1:
            states = te(ids, return_dict=True).last_hidden_state
        else:
            out = te(ids, output_hidden_states=True, return_dict=True)
            final_norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
            states = final_norm(out.hidden_states[-clip_skip])
        return _merge_chunks(states, batch, max_token_length, chunk_len), None
    te1, te2 = parts.text_encoders
    ids1 = _as_chunks(input_ids_per_encoder[0], chunk_len).to(te1.device)
    ids2 = _as_chunks(input_ids_per_encoder[1], chunk_len).to(te2.device)
    states1 = te1(ids1, output_hidden_states=True, return_dict=True).hidden_states[-2]
    out2 = te2(ids2, output_hidden_states=True, return_dict=True)
    states2 = out2.hidden_states[-2]
    # Pooled: the final-normed state at the first EOS, projected (sd-scripts' pool_workaround).
    eos_id = parts.tokenizers[1].eos_token_id
    eos_pos = (ids2 == eos_id).int().argmax(dim=-1)
    last = out2.last_hidden_state
    pooled = te2.text_projection(last[torch.arange(last.shape[0], device=last.device), eos_pos])
    n_chunks = ids2.shape[0] // batch
    pooled = pooled[::n_chunks]
    hidden = torch.cat([_merge_chunks(states1, batch, max_token_length, chunk_len),
                        _merge_chunks(states2, batch, max_token_length, chunk_len)], dim=-1)
    return hidden, pooled
