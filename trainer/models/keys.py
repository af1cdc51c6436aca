"""sd-scripts key naming for adapter files.

sd-scripts names an adapter module `lora_unet_<module path>` / `lora_te*_<module path>` with dots
turned into underscores, where the module path is the one of *its own* model classes:
- SD1.x/2.x: sd-scripts' UNet uses diffusers' names, so `down_blocks.0.attentions.0...` stays.
- SDXL: sd-scripts' UNet uses the original SGM/LDM layout (`input_blocks.1.1...`), so diffusers
  paths must be mapped. The same mapping gives the `model.diffusion_model.*` keys of single-file
  checkpoints for every architecture (LDM and SGM share the UNet layout).
- Text encoders: transformers >= 5.6 flattened `CLIPTextModel` (no `text_model.` level), while
  sd-scripts' names keep it (`lora_te_text_model_encoder_layers_0_...`); we put it back.

Pure functions, no torch: they work on dotted module paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

ARCHS = ("sd1", "sd2", "sdxl")
UNET_PREFIX = "lora_unet_"

# ResnetBlock2D (diffusers) → ResBlock (LDM) submodule names; trainer.shrink.unet_names inverts both tables.
RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Top-level UNet modules.
TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Real SDXL / SD1.x layouts: 2 resnets per down level, cross-attention in the up levels that
# carry an upsampler (SDXL up_blocks 0 and 1); SD1/SD2's up_blocks.0 has no attention.
_DEFAULT_UP_ATTENTION = {"sdxl": frozenset({0, 1}), "sd1": frozenset({1, 2, 3}), "sd2": frozenset({1, 2, 3})}

_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")
    return arch


def unet_layout(unet_config: Mapping | None, arch: str) -> tuple[int, frozenset[int]]:
    """(layers_per_block, indices of up blocks with cross-attention) from a diffusers UNet config."""
    if unet_config is None:
        return 2, _DEFAULT_UP_ATTENTION[check_arch(arch)]
    layers = unet_config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block has no LDM equivalent")
    up_types = unet_config.get("up_block_types", ())
    return layers, frozenset(i for i, t in enumerate(up_types) if "CrossAttn" in t)


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _resnet_tail(tail: str | None) -> str | None:
    if not tail:
        return None
    head, _, rest = tail.partition(".")
    if head not in RESNET_TO_LDM:
        raise KeyError(tail)
    return _join(RESNET_TO_LDM[head], rest)


def unet_ldm_path(path: str, *, layers_per_block: int = 2, up_attention: Iterable[int] = (0, 1)) -> str:
    """Map a diffusers UNet module or parameter path to the original LDM/SGM one.

    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` → `input_blocks.4.1.transformer_blocks.0.attn1.to_q`.
    Raises KeyError for a path with no LDM equivalent (a container such as `down_blocks.0`).
    """
    for name, ldm in TOP_TO_LDM.items():
        if path == name or path.startswith(name + "."):
            return ldm + path[len(name) :]
    per_level = layers_per_block + 1  # resnets (+ attentions) and the down/upsampler of one level
    m = _BLOCK_RE.match(path)
    if m:
        kind, level, sub, index, tail = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if sub == "downsamplers":
                if not tail or not tail.startswith("conv"):
                    raise KeyError(path)
                return _join(f"input_blocks.{(level + 1) * per_level}.0.op", tail[len("conv") :].lstrip("."))
            block = 1 + level * per_level + index
        else:
            if sub == "upsamplers":
                slot = 2 if level in set(up_attention) else 1
                return _join(f"output_blocks.{level * per_level + layers_per_block}.{slot}", tail)
            block = level * per_level + index
        blocks = "input_blocks" if kind == "down_blocks" else "output_blocks"
        if sub == "resnets":
            return _join(f"{blocks}.{block}.0", _resnet_tail(tail))
        return _join(f"{blocks}.{block}.1", tail)
    m = _MID_RE.match(path)
    if m:
        sub, index, tail = m.group(1), int(m.group(2)), m.group(3)
        if sub == "attentions":
            return _join("middle_block.1", tail)
        return _join(f"middle_block.{0 if index == 0 else 2}", _resnet_tail(tail))
    raise KeyError(path)


def sd_scripts_unet_name(diffusers_module_path: str, arch: str, *, unet_config: Mapping | None = None) -> str:
    """The sd-scripts adapter name of a UNet module given by its diffusers path.

    SD1/SD2 keep diffusers' path; SDXL uses the original SGM layout. `unet_config` (the diffusers UNet
    config) gives the layout for non-standard (tiny) UNets; the default is the real model's layout.
    """
    check_arch(arch)
    if arch == "sdxl":
        layers, up_attention = unet_layout(unet_config, arch)
        path = unet_ldm_path(diffusers_module_path, layers_per_block=layers, up_attention=up_attention)
    else:
        path = diffusers_module_path
    return UNET_PREFIX + path.replace(".", "_")


def text_encoder_prefix(arch: str, index: int) -> str:
    """`lora_te_` for the single encoder of SD1/SD2, `lora_te1_` / `lora_te2_` for SDXL (index 0/1)."""
    check_arch(arch)
    if arch == "sdxl":
        if index not in (0, 1):
            raise ValueError(f"SDXL has text encoders 0 and 1, not {index}")
        return f"lora_te{index + 1}_"
    if index != 0:
        raise ValueError(f"{arch} has one text encoder (index 0), not {index}")
    return "lora_te_"


def canonical_text_encoder_path(module_path: str) -> str:
    """The transformers-4 module path (`text_model.` level) sd-scripts names its keys after."""
    if module_path == "text_model" or module_path.startswith("text_model."):
        return module_path
    if module_path.startswith("text_projection"):
        return module_path
    return _join("text_model", module_path)


def sd_scripts_text_encoder_name(module_path: str, arch: str, index: int) -> str:
    return text_encoder_prefix(arch, index) + canonical_text_encoder_path(module_path).replace(".", "_")


def block_count(arch: str) -> int:
    """Number of `block_dims` values sd-scripts' networks.lora expects: 25 for SD1/SD2, 23 for SDXL."""
    return 23 if check_arch(arch) == "sdxl" else 25


_UPDOWN_RE = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def block_index(lora_name: str, arch: str) -> int:
    """sd-scripts' block index of an adapter module name (networks/lora.py `get_block_index`).

    SD1/SD2 (25 blocks): IN00..IN11 = 0..11 (IN00 holds nothing), MID = 12, OUT00..OUT11 = 13..24.
    SDXL (23 blocks): 0 = time/label embedding, 1..9 input_blocks, 10..12 middle_block, 13..21
    output_blocks, 22 = out. Returns -1 where sd-scripts finds no block (it then indexes the last).
    """
    if check_arch(arch) != "sdxl":
        m = _UPDOWN_RE.search(lora_name)
        if m:
            level, sub, j = int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * level + (2 if sub in ("upsamplers", "downsamplers") else j)
            return 1 + idx if m.group(1) == "down" else 13 + idx
        return 12 if "mid_block_" in lora_name else -1
    if not lora_name.startswith(UNET_PREFIX):
        return -1
    name = lora_name[len(UNET_PREFIX) :]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for start, offset in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(start):
            return offset + int(name.split("_")[2])
    return 22 if name.startswith("out_") else -1
