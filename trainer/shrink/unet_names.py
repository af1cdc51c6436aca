"""UNet module paths from original LDM/SGM (`input_blocks.4.1…`) back to diffusers (`down_blocks.1.attentions.0…`).

The inverse of `trainer.models.keys.unet_ldm_path`: an SD1.x/2.x adapter names its layers after diffusers
paths while a single-file base checkpoint uses LDM paths. The layout is fixed by `layers_per_block`
(L): input block 1 + i·(L+1) + j holds down block i's resnet/attention j, input block (i+1)·(L+1) its
downsampler; output block i·(L+1) + j holds up block i's resnet/attention j, and its upsampler sits
after the attention (slot 2) or the resnet (slot 1).
"""

from __future__ import annotations

import re

from trainer.models.keys import RESNET_TO_LDM, TOP_TO_LDM

_RESNET_TO_DIFFUSERS = {v: k for k, v in RESNET_TO_LDM.items()}
_TOP_TO_DIFFUSERS = {v: k for k, v in TOP_TO_LDM.items()}


def _resnet_rest(rest: str, table: dict[str, str]) -> str:
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return rest


def ldm_to_diffusers(path: str, layers_per_block: int) -> str | None:
    """`input_blocks.4.1.proj_in.weight` -> `down_blocks.1.attentions.0.proj_in.weight` (L=2)."""
    step = layers_per_block + 1
    for src, dst in _TOP_TO_DIFFUSERS.items():
        if path.startswith(src + "."):
            return dst + path[len(src) :]
    m = re.match(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.+)$", path)
    if not m:
        return None
    block, n, slot, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    slot_i = int(slot) if slot is not None else 0
    if block == "middle_block":
        if n == 1:
            return f"mid_block.attentions.0.{rest}" if slot is None else f"mid_block.attentions.0.{slot}.{rest}"
        resnet = _resnet_rest(rest if slot is None else f"{slot}.{rest}", _RESNET_TO_DIFFUSERS)
        return f"mid_block.resnets.{n // 2}.{resnet}"
    if slot is None:
        return None
    if block == "input_blocks":
        if n == 0:
            return None  # conv_in handled above
        i, j = divmod(n - 1, step)
        if j == layers_per_block:
            return f"down_blocks.{i}.downsamplers.0.{rest.replace('op.', 'conv.', 1)}"
        if slot_i == 0:
            return f"down_blocks.{i}.resnets.{j}.{_resnet_rest(rest, _RESNET_TO_DIFFUSERS)}"
        return f"down_blocks.{i}.attentions.{j}.{rest}"
    i, j = divmod(n, step)
    if slot_i == 0:
        return f"up_blocks.{i}.resnets.{j}.{_resnet_rest(rest, _RESNET_TO_DIFFUSERS)}"
    if slot_i == 2 or rest.startswith("conv."):
        return f"up_blocks.{i}.upsamplers.0.{rest}"
    return f"up_blocks.{i}.attentions.{j}.{rest}"


def layers_per_block_from_ldm(keys: list[str]) -> int:
    """L from an LDM UNet's keys: the first downsampler (`input_blocks.N.0.op`) sits at N = L + 1."""
    found = [int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))]
    if found:
        return min(found) - 1
    counts = [int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))]
    return max(counts) if counts else 1


def up_blocks_with_attention(keys: list[str]) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
