"""LDM/SGM → diffusers UNet paths invert trainer.models.keys.unet_ldm_path on the real SD1.x and SDXL layouts."""

from __future__ import annotations

import pytest

from trainer.models.keys import unet_ldm_path
from trainer.shrink.unet_names import layers_per_block_from_ldm, ldm_to_diffusers


def diffusers_paths(levels: int, attention_down: set[int], attention_up: set[int]) -> list[str]:
    paths = ["conv_in.weight", "time_embedding.linear_1.weight", "conv_out.weight"]
    for i in range(levels):
        for j in range(2):
            paths += [f"down_blocks.{i}.resnets.{j}.conv1.weight", f"down_blocks.{i}.resnets.{j}.time_emb_proj.weight"]
            if i in attention_down:
                paths.append(f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.to_q.weight")
        if i < levels - 1:
            paths.append(f"down_blocks.{i}.downsamplers.0.conv.weight")
        for j in range(3):
            paths += [f"up_blocks.{i}.resnets.{j}.conv2.weight", f"up_blocks.{i}.resnets.{j}.conv_shortcut.weight"]
            if i in attention_up:
                paths.append(f"up_blocks.{i}.attentions.{j}.proj_in.weight")
        if i < levels - 1:
            paths.append(f"up_blocks.{i}.upsamplers.0.conv.weight")
    paths += ["mid_block.resnets.0.conv1.weight", "mid_block.attentions.0.proj_out.weight", "mid_block.resnets.1.norm2.weight"]
    return paths


@pytest.mark.parametrize(
    "levels,down_att,up_att",
    [(4, {0, 1, 2}, {1, 2, 3}), (3, {1, 2}, {0, 1})],  # SD1.x/2.x, SDXL
    ids=["sd1", "sdxl"],
)
def test_round_trip_on_real_layouts(levels, down_att, up_att):
    paths = diffusers_paths(levels, down_att, up_att)
    ldm = [unet_ldm_path(p, layers_per_block=2, up_attention=up_att) for p in paths]
    assert layers_per_block_from_ldm(ldm) == 2
    assert [ldm_to_diffusers(p, 2) for p in ldm] == paths


def test_known_pairs():
    assert ldm_to_diffusers("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", 2) == (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    )
    assert ldm_to_diffusers("input_blocks.3.0.op.weight", 2) == "down_blocks.0.downsamplers.0.conv.weight"
    assert ldm_to_diffusers("output_blocks.2.1.conv.weight", 2) == "up_blocks.0.upsamplers.0.conv.weight"
    assert ldm_to_diffusers("output_blocks.5.2.conv.weight", 2) == "up_blocks.1.upsamplers.0.conv.weight"
    assert ldm_to_diffusers("output_blocks.11.1.proj_out.weight", 2) == "up_blocks.3.attentions.2.proj_out.weight"
    assert ldm_to_diffusers("middle_block.2.out_layers.3.weight", 2) == "mid_block.resnets.1.conv2.weight"
    assert ldm_to_diffusers("output_blocks.0.0.skip_connection.weight", 2) == "up_blocks.0.resnets.0.conv_shortcut.weight"
    assert ldm_to_diffusers("label_emb.0.0.weight", 2) == "add_embedding.linear_1.weight"
