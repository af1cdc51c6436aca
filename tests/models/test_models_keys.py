"""sd-scripts key naming, including the full-size SDXL UNet checked against diffusers' own
SGM → diffusers converter (an independent implementation of the mapping)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from trainer.models import keys


@pytest.mark.parametrize(
    ("path", "arch", "expected"),
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sd1",
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl",
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", "sdxl",
         "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2"),
        ("down_blocks.0.resnets.1.conv1", "sdxl", "lora_unet_input_blocks_2_0_in_layers_2"),
        ("down_blocks.1.resnets.0.conv2", "sdxl", "lora_unet_input_blocks_4_0_out_layers_3"),
        ("down_blocks.1.resnets.0.time_emb_proj", "sdxl", "lora_unet_input_blocks_4_0_emb_layers_1"),
        ("down_blocks.1.resnets.0.conv_shortcut", "sdxl", "lora_unet_input_blocks_4_0_skip_connection"),
        ("down_blocks.0.downsamplers.0.conv", "sdxl", "lora_unet_input_blocks_3_0_op"),
        ("mid_block.attentions.0.proj_in", "sdxl", "lora_unet_middle_block_1_proj_in"),
        ("mid_block.resnets.1.conv2", "sdxl", "lora_unet_middle_block_2_out_layers_3"),
        ("up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0", "sdxl",
         "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_out_0"),
        ("up_blocks.0.upsamplers.0.conv", "sdxl", "lora_unet_output_blocks_2_2_conv"),
        ("up_blocks.1.upsamplers.0.conv", "sdxl", "lora_unet_output_blocks_5_2_conv"),
        ("up_blocks.2.resnets.2.conv_shortcut", "sdxl", "lora_unet_output_blocks_8_0_skip_connection"),
        ("conv_in", "sdxl", "lora_unet_input_blocks_0_0"),
        ("conv_out", "sdxl", "lora_unet_out_2"),
        ("time_embedding.linear_2", "sdxl", "lora_unet_time_embed_2"),
        ("add_embedding.linear_1", "sdxl", "lora_unet_label_emb_0_0"),
    ],
)
def test_unet_names(path, arch, expected):
    assert keys.sd_scripts_unet_name(path, arch) == expected


def test_ldm_paths_for_sd1_layout_and_parameters():
    # SD1's first up block has no attention: its upsampler sits in slot 1 (output_blocks.2.1.conv).
    sd1 = dict(layers_per_block=2, up_attention={1, 2, 3})
    assert keys.unet_ldm_path("up_blocks.0.upsamplers.0.conv.weight", **sd1) == "output_blocks.2.1.conv.weight"
    assert keys.unet_ldm_path("up_blocks.3.attentions.2.proj_out.bias", **sd1) == "output_blocks.11.1.proj_out.bias"
    assert keys.unet_ldm_path("down_blocks.3.resnets.1.norm2.weight", **sd1) == "input_blocks.11.0.out_layers.0.weight"
    assert keys.unet_ldm_path("conv_norm_out.weight", **sd1) == "out.0.weight"
    with pytest.raises(KeyError):
        keys.unet_ldm_path("down_blocks.0", **sd1)


def test_text_encoder_names():
    assert keys.text_encoder_prefix("sd1", 0) == "lora_te_"
    assert keys.text_encoder_prefix("sd2", 0) == "lora_te_"
    assert [keys.text_encoder_prefix("sdxl", i) for i in (0, 1)] == ["lora_te1_", "lora_te2_"]
    # transformers 5 flattened CLIPTextModel; sd-scripts' names keep the text_model level.
    assert (keys.sd_scripts_text_encoder_name("encoder.layers.0.self_attn.q_proj", "sd1", 0)
            == "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    assert (keys.sd_scripts_text_encoder_name("text_model.encoder.layers.3.mlp.fc2", "sdxl", 1)
            == "lora_te2_text_model_encoder_layers_3_mlp_fc2")
    with pytest.raises(ValueError):
        keys.text_encoder_prefix("sd1", 1)


def _real_unet_on_meta(arch: str):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = json.loads(resources.files("trainer.models").joinpath("configs", f"{arch}.json").read_text())["unet"]
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights():
        return UNet2DConditionModel(**config), config


def _networks_lora_layers(unet, *, conv: bool):
    """sd-scripts' networks.lora layer set: Linear/Conv2d inside Transformer2DModel (and resnet /
    down / up blocks when conv_dim is set)."""
    import torch

    classes = {"Transformer2DModel"} | ({"ResnetBlock2D", "Downsample2D", "Upsample2D"} if conv else set())
    out = []
    for name, module in unet.named_modules():
        if type(module).__name__ in classes:
            for child, leaf in module.named_modules():
                if isinstance(leaf, (torch.nn.Linear, torch.nn.Conv2d)):
                    out.append(f"{name}.{child}")
    return out


def test_full_sdxl_unet_names_match_sd_scripts_and_diffusers():
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    unet, config = _real_unet_on_meta("sdxl")
    layers = _networks_lora_layers(unet, conv=True)
    attn_layers = _networks_lora_layers(unet, conv=False)
    # sd-scripts logs "create LoRA for U-Net: 722 modules." for SDXL without conv_dim.
    assert len(attn_layers) == 722
    names = {path: keys.sd_scripts_unet_name(path, "sdxl") for path in layers}
    assert len(set(names.values())) == len(names)
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for n in names.values())
    # diffusers' kohya loader (SGM block mapping, then kohya → PEFT renaming) must bring every name
    # back to the module it came from.
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    one = torch.ones(1, 1)
    state = {}
    for name in names.values():
        state.update({f"{name}.lora_down.weight": one, f"{name}.lora_up.weight": one, f"{name}.alpha": torch.tensor(1.0)})
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state, unet.config))
    recovered = set()
    for key in converted:
        if not key.endswith("down.weight"):
            continue
        path = key[len("unet."):]
        if ".processor." in path:  # attention layers come back as "<attn>.processor.<proj>_lora.down.weight"
            attention, projection = path.split(".processor.")
            projection = projection.split("_lora.")[0]
            recovered.add(f"{attention}.{'to_out.0' if projection == 'to_out' else projection}")
        else:
            recovered.add(path[: -len(".lora.down.weight")])
    assert recovered == set(names)
    # Block indices (sd-scripts' block_dims for SDXL have 23 entries).
    indices = {keys.block_index(n, "sdxl") for n in names.values()}
    assert indices <= set(range(23)) and min(indices) >= 1 and max(indices) <= 21
    assert keys.block_count("sdxl") == 23


def test_sd1_block_indices_cover_25_blocks():
    unet, _ = _real_unet_on_meta("sd1")
    names = [keys.sd_scripts_unet_name(p, "sd1") for p in _networks_lora_layers(unet, conv=True)]
    assert len(_networks_lora_layers(unet, conv=False)) == 192  # sd-scripts: 192 UNet modules for SD1.5
    indices = {keys.block_index(n, "sd1") for n in names}
    assert -1 not in indices and indices <= set(range(25))
    assert keys.block_index("lora_unet_mid_block_attentions_0_proj_in", "sd1") == 12
    assert keys.block_index("lora_unet_up_blocks_3_attentions_2_proj_out", "sd1") == 24
    assert keys.block_count("sd1") == keys.block_count("sd2") == 25
