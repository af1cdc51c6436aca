"""Adapter networks: every algorithm built, applied, trained one manual step, saved with sd-scripts
names, reloaded (network_weights) to the same output; lora/locon files load in diffusers."""

from __future__ import annotations

import pytest
import torch

from trainer.models.adapter_file import read_metadata, save_adapter
from trainer.core.failures import JobFailure
from trainer.core.spec import NetworkSpec
from trainer.models.load import encode_prompts
from trainer.models.network import ALGOS, build_network

SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dylora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "alpha"},
    "ia3": {"weight", "on_input"},
    "full": {"diff", "diff_b"},
    "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"},
    "boft": {"oft_blocks", "alpha"},
    "diag-oft": {"oft_blocks", "alpha"},
}


def _inputs(parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = []
    for tok in parts.tokenizers:
        body = tok("a photo of a cat", add_special_tokens=False).input_ids
        row = [tok.bos_token_id, *body, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(body))
        ids.append(torch.tensor([[row]]))
    return latents, torch.tensor([500]), ids


def _unet_out(parts, latents, t, ids):
    states, pooled = encode_prompts(parts, ids, clip_skip=None, max_token_length=None)
    extra = {}
    if parts.arch == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return parts.unet(latents, t, states, **extra).sample


def _train_one_step(network, parts):
    """One SGD step with a large rate, so every adapter ends far from its identity init."""
    network.apply_to()
    groups = network.param_groups(unet_lr=1.0, text_encoder_lr=1.0)
    optimizer = torch.optim.SGD(groups, lr=1.0)
    latents, t, ids = _inputs(parts)
    loss = _unet_out(parts, latents, t, ids).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    # A second, random nudge reaches parameters whose first gradient is zero (zero-initialised halves).
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for group in groups:
            for p in group["params"]:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", ALGOS)
def test_algo_build_train_save_reload(parts_for, tmp_path, arch, algo):
    parts = parts_for(arch)
    spec = NetworkSpec(algo=algo, dim=4, alpha=2.0, factor=4 if algo in ("lokr", "boft", "diag-oft") else -1)
    latents, t, ids = _inputs(parts)
    with torch.no_grad():
        base = _unet_out(parts, latents, t, ids)
    network = build_network(spec, parts, train_unet=True, train_text_encoder=True)
    try:
        _train_one_step(network, parts)
        with torch.no_grad():
            trained = _unet_out(parts, latents, t, ids)
        assert not torch.allclose(base, trained, atol=1e-5)
        tensors = network.state_dict_for_save(torch.float32)
        counts = network.modules_count()
        assert counts["unet"] > 0 and sum(v for k, v in counts.items() if k != "unet") > 0
    finally:
        network.restore()
    names = {k.split(".", 1)[0] for k in tensors}
    suffixes = {k.split(".", 1)[1] for k in tensors}
    assert suffixes & SUFFIXES[algo] == SUFFIXES[algo] - ({"lokr_w2"} if algo == "lokr" else set()) or algo == "lokr"
    te_prefixes = ("lora_te1_", "lora_te2_") if arch == "sdxl" else ("lora_te_",)
    assert all(n.startswith(("lora_unet_", *te_prefixes)) for n in names)
    for prefix in te_prefixes:
        assert any(n.startswith(prefix + "text_model_encoder_layers_") for n in names)
    if arch == "sdxl":
        assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    path = tmp_path / f"{algo}.safetensors"
    save_adapter(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"}, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(_unet_out(parts, latents, t, ids), base, atol=1e-5)  # restore() unhooked all
    again = build_network(spec, parts, train_unet=True, train_text_encoder=True)
    again.load_weights(str(path))
    again.apply_to()
    try:
        with torch.no_grad():
            reloaded = _unet_out(parts, latents, t, ids)
    finally:
        again.restore()
    assert torch.allclose(reloaded, trained, atol=1e-5), (reloaded - trained).abs().max()


def test_networks_lora_layer_set_and_scale(parts_for):
    parts = parts_for("sd1")
    plain = build_network(NetworkSpec(module="networks.lora", dim=4, alpha=2.0), parts,
                          train_unet=True, train_text_encoder=True)
    names = set(dict(plain.named_children()))
    # Transformer2DModel linears (+ its 1x1 proj convs) and CLIP attention/MLP only: no resnet layer.
    assert not any("resnets" in n or "samplers" in n or "conv_in" in n or "time_embedding" in n for n in names)
    # 6 transformers (2 down, 1 mid, 3 up) x (8 attention + 2 ff + 2 proj) linears; 3 CLIP layers x 6.
    assert plain.modules_count() == {"unet": 72, "text_encoder": 18}
    with_conv = build_network(NetworkSpec(module="networks.lora", dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0),
                              parts, train_unet=True, train_text_encoder=False)
    conv_names = dict(with_conv.named_children())
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in conv_names
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in conv_names
    conv = conv_names["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.lora_down.weight.shape[0] == 2 and float(conv.alpha) == 1.0
    # sd-scripts' forward: base + up(down(x)) * alpha / dim.
    module = dict(plain.named_children())["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    layer = parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        module.lora_up.weight.normal_()
    x = torch.randn(2, layer.in_features)
    plain.apply_to()
    try:
        with torch.no_grad():
            got = layer(x)
            expected = torch.nn.functional.linear(x, layer.weight, layer.bias) + (
                x @ module.lora_down.weight.T @ module.lora_up.weight.T) * (2.0 / 4)
    finally:
        plain.restore()
    assert torch.allclose(got, expected, atol=1e-5)


def test_block_dims(parts_for):
    parts = parts_for("sdxl")
    dims = [0] * 23
    dims[5] = 8  # input_blocks.4 (SDXL tiny: the first transformer of the attention level)
    net = build_network(NetworkSpec(module="networks.lora", block_dims=dims), parts, train_unet=True,
                        train_text_encoder=False)
    names = [n for n, _ in net.named_children()]
    assert names and all(n.startswith("lora_unet_input_blocks_4_1_") for n in names)
    assert all(m.lora_down.weight.shape[0] == 8 for m in net.children())
    with pytest.raises(JobFailure) as err:
        build_network(NetworkSpec(module="networks.lora", block_dims=[4] * 25), parts, train_unet=True,
                      train_text_encoder=False)
    assert "block_dims has 25 values; sdxl needs 23" in err.value.message


def test_presets_param_groups_and_max_norm(parts_for):
    parts = parts_for("sdxl")
    counts = {}
    for preset in ("full", "full-lin", "attn-mlp", "attn-only", "unet-transformer-only", "unet-convblock-only"):
        net = build_network(NetworkSpec(preset=preset), parts, train_unet=True, train_text_encoder=True)
        counts[preset] = net.modules_count()
        assert not any("add_embedding" in n or "label_emb" in n for n, _ in net.named_children())
    assert counts["full"]["unet"] > counts["full-lin"]["unet"] > counts["attn-mlp"]["unet"] > counts["attn-only"]["unet"]
    assert counts["unet-transformer-only"]["text_encoder_1"] == 0 and counts["unet-convblock-only"]["text_encoder_2"] == 0
    net = build_network(NetworkSpec(dim=4, alpha=4.0), parts, train_unet=True, train_text_encoder=True)
    groups = net.param_groups(unet_lr=1e-4, text_encoder_lr=[5e-5, 0.0])
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder1", 5e-5), ("unet", 1e-4)]
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    scaled, mean_norm, max_norm = net.apply_max_norm(1.0, "cpu")
    assert scaled > 0 and max_norm == pytest.approx(1.0, rel=1e-3) and 0 < mean_norm <= max_norm + 1e-6
    unet_only = build_network(NetworkSpec(), parts, train_unet=True, train_text_encoder=False)
    assert unet_only.modules_count()["text_encoder_1"] == 0
    no_conv = build_network(NetworkSpec(conv_dim=0), parts, train_unet=True, train_text_encoder=False)
    assert 0 < no_conv.modules_count()["unet"] < unet_only.modules_count()["unet"]
    assert not any(getattr(m, "lora_down", None) is not None and m.lora_down.weight.ndim == 4
                   and m.lora_down.weight.shape[-1] == 3 for m in no_conv.children())
    assert (net.algo, net.dim, net.alpha, net.conv_dim) == ("lora", 4, 4.0, None)


def test_network_weights_of_another_model_are_refused(parts_for, tmp_path):
    sd1 = build_network(NetworkSpec(), parts_for("sd1"), train_unet=True, train_text_encoder=True)
    path = tmp_path / "sd1.safetensors"
    save_adapter(sd1.state_dict_for_save(torch.float16), str(path), metadata={}, dtype="fp16")
    sdxl = build_network(NetworkSpec(), parts_for("sdxl"), train_unet=True, train_text_encoder=True)
    with pytest.raises(JobFailure) as err:
        sdxl.load_weights(str(path))
    assert str(path) in err.value.message and "another architecture" in err.value.message
    assert read_metadata(str(path))["sshs_legacy_hash"]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_lora_and_locon_files_load_in_diffusers(tiny_models, parts_for, tmp_path, arch):
    from diffusers import DiffusionPipeline

    parts = parts_for(arch)
    latents, t, ids = _inputs(parts)
    for algo, conv_dim in (("lora", None), ("locon", 2)):
        network = build_network(NetworkSpec(algo=algo, dim=4, alpha=2.0, conv_dim=conv_dim), parts,
                                train_unet=True, train_text_encoder=True)
        try:
            _train_one_step(network, parts)
            with torch.no_grad():
                ours = _unet_out(parts, latents, t, ids)
            tensors = network.state_dict_for_save(torch.float32)
        finally:
            network.restore()
        path = tmp_path / f"{arch}-{algo}.safetensors"
        save_adapter(tensors, str(path), metadata={}, dtype=torch.float32)
        pipe = DiffusionPipeline.from_pretrained(tiny_models[arch][0], local_files_only=True)
        diffusers_parts = type(parts)(**{**parts.__dict__, "unet": pipe.unet,
                                         "text_encoders": [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])})
        with torch.no_grad():
            base = _unet_out(diffusers_parts, latents, t, ids)
        pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
        with torch.no_grad():
            loaded = _unet_out(diffusers_parts, latents, t, ids)
        assert not torch.allclose(base, loaded, atol=1e-4)
        assert torch.allclose(loaded, ours, atol=1e-4), (algo, (loaded - ours).abs().max())


@pytest.mark.parametrize("module_name", ["networks.lora", "lycoris.kohya"])
def test_lora_layers_run_in_bypass_form_with_the_rebuild_forms_output(parts_for, module_name):
    """LoRA/LoCon layers add up(down(x)) instead of rebuilding W + ΔW (rank-r work, not out×in per step);
    the output is the rebuild form's to fp32 round-off, on linear and conv layers alike."""
    parts = parts_for("sd1")
    spec = NetworkSpec(module=module_name, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0)
    network = build_network(spec, parts, train_unet=True, train_text_encoder=False)
    modules = network.loras()
    assert modules and all(m.bypass_mode for m in modules)
    assert any(m.isconv for m in modules)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in modules:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    latents, t, ids = _inputs(parts)
    network.apply_to()
    try:
        with torch.no_grad():
            bypass = _unet_out(parts, latents, t, ids)
            for m in modules:
                m.bypass_mode = False
            rebuilt = _unet_out(parts, latents, t, ids)
    finally:
        network.restore()
    assert not torch.allclose(bypass, _unet_out(parts, latents, t, ids), atol=1e-3)  # the adapter does act
    assert torch.allclose(bypass, rebuilt, atol=1e-5), (bypass - rebuilt).abs().max()


def test_lycoris_dropouts_keep_lycoris_rebuild_meaning(parts_for):
    """LyCORIS defines rank dropout on rows of ΔW in its default (rebuild) form: a lycoris.kohya job that
    asks for a dropout keeps that form; sd-scripts' networks.lora always drops on the rank axis (bypass)."""
    parts = parts_for("sd1")
    lyco = build_network(NetworkSpec(module="lycoris.kohya", dim=4, alpha=2.0, rank_dropout=0.1), parts,
                         train_unet=True, train_text_encoder=False)
    assert not any(m.bypass_mode for m in lyco.loras())
    kohya = build_network(NetworkSpec(module="networks.lora", dim=4, alpha=2.0, rank_dropout=0.1), parts,
                          train_unet=True, train_text_encoder=False)
    assert all(m.bypass_mode for m in kohya.loras())
    loha = build_network(NetworkSpec(algo="loha", dim=4, alpha=2.0), parts, train_unet=True, train_text_encoder=False)
    assert not any(m.bypass_mode for m in loha.loras())


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_networks_lora_dropouts_follow_sd_scripts(parts_for, layer_kind):
    """networks.lora in training: neuron dropout on lx = down(x), then a per-sample rank mask and the
    1/(1 − rank_dropout) rescale, exactly as sd-scripts' LoRAModule (same random draws, same output);
    in eval mode neither applies."""
    parts = parts_for("sd1")
    spec = NetworkSpec(module="networks.lora", dim=8, alpha=4.0, conv_dim=8, conv_alpha=4.0,
                        dropout=0.3, rank_dropout=0.25)
    network = build_network(spec, parts, train_unet=True, train_text_encoder=False)
    modules = dict(network.named_children())
    if layer_kind == "linear":
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        layer = parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        x = torch.randn(3, 5, layer.in_features)
    else:
        name = "lora_unet_down_blocks_0_resnets_0_conv1"
        layer = parts.unet.down_blocks[0].resnets[0].conv1
        x = torch.randn(3, layer.in_channels, 6, 6)
    module = modules[name]
    with torch.no_grad():
        module.lora_up.weight.normal_()

    def sd_scripts(x):  # sd-scripts networks/lora.py LoRAModule.forward, training branch
        lx = module.lora_down(x)
        lx = torch.nn.functional.dropout(lx, p=0.3)
        mask = torch.rand((lx.size(0), 8), device=lx.device) > 0.25
        mask = mask.unsqueeze(1) if lx.dim() == 3 else mask.unsqueeze(-1).unsqueeze(-1)
        return layer(x) + module.lora_up(lx * mask) * (4.0 / 8) * (1.0 / (1.0 - 0.25))

    with torch.no_grad():
        expected_eval = layer(x) + module.lora_up(module.lora_down(x)) * (4.0 / 8)
        torch.manual_seed(7)
        expected = sd_scripts(x)
    network.apply_to()
    try:
        network.train()
        with torch.no_grad():
            torch.manual_seed(7)
            got = layer(x)
            torch.manual_seed(8)
            other = layer(x)
            network.eval()
            got_eval = layer(x)
    finally:
        network.restore()
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got, other, atol=1e-4)  # the dropouts do draw
    assert torch.allclose(got_eval, expected_eval, atol=1e-5)


def test_networks_lora_ignores_lycoris_only_options(parts_for):
    """The spec warns that networks.lora ignores LyCORIS options (as sd-scripts does): they must not
    reach the modules (use_scalar would add a trained scalar that sd-scripts' files do not have)."""
    parts = parts_for("sd1")
    plain = build_network(NetworkSpec(module="networks.lora", dim=4, alpha=2.0), parts,
                          train_unet=True, train_text_encoder=False)
    flagged = build_network(NetworkSpec(module="networks.lora", dim=4, alpha=2.0, use_scalar=True,
                                         rank_dropout_scale=True), parts, train_unet=True, train_text_encoder=False)
    assert set(flagged.state_dict()) == set(plain.state_dict())
    assert not any(isinstance(m.scalar, torch.nn.Parameter) for m in flagged.loras())
