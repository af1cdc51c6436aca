"""`merge`: adapters folded into their base, checked layer by layer against LyCORIS' forward pass.

For every algorithm Lathe trains, on tiny SD1.5 and SDXL: a network with random (non-identity) weights is
saved, merged into the single-file base at a negative ratio, and the merged file is loaded by diffusers'
single-file loader. Each adapted layer of the merged model must give the output the base layer gives with
the LyCORIS module hooked in at multiplier = ratio (the forward's meaning of the scale).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from trainer.models.adapter_file import save_adapter
from trainer.core.failures import EXIT_CODES, JobFailure, Reason
from trainer.models.merge import MERGE_JSON, MergeInput, merge_checkpoint
from trainer.core.spec import ModelSpec, NetworkSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")

RATIO = -1.7


def _net(**options: object) -> NetworkSpec:
    return NetworkSpec(**{"alpha": 2.0, **options})


# (algo, network options) for every algorithm Lathe trains that adds to or scales the base weights.
CASES = {
    "lora": dict(algo="lora"),
    "locon-tucker": dict(algo="locon", use_tucker=True, conv_dim=4, conv_alpha=1.0),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-decomposed": dict(algo="lokr", factor=4, decompose_both=True, dim=2),
    "full": dict(algo="full"),
    "dylora": dict(algo="dylora"),
    "ia3": dict(algo="ia3"),
    "lora-train-norm": dict(algo="lora", train_norm=True),  # GroupNorm/LayerNorm w_norm, b_norm
    "networks.lora": dict(module="networks.lora", alpha=3.0),
}


@pytest.fixture(scope="module")
def tiny(tiny_pipeline):
    from trainer.models.load import load_model

    out = {}
    for arch in ("sd1", "sdxl"):
        single = tiny_pipeline(arch, single_file=True, seed=1)
        out[arch] = (os.path.dirname(single), single, load_model(ModelSpec(uri=single, arch=arch), weight_dtype=torch.float32))
    return out


def _randomised_adapter(parts, options: dict, path) -> object:
    """Saves an adapter whose every tensor is far from its initial value (hooked in first, as training
    does: LyCORIS' full module only holds a difference once applied); returns LyCORIS' own reading of
    the saved file, the reference. A DyLoRA file is read as every loader reads it: a LoRA (alpha/dim)."""
    from trainer.models.network import build_network

    network = build_network(_net(**options), parts, train_unet=True, train_text_encoder=True)
    network.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(network.state_dict_for_save(torch.float32), str(path), metadata={}, dtype=torch.float32)
    network.restore()
    reading, source = options, path
    if options.get("algo") == "dylora":  # LyCORIS' DyLoRA saves a conv's up factor as a matrix
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        for key, value in tensors.items():
            down = tensors.get(key.replace("lora_up", "lora_down"))
            if key.endswith("lora_up.weight") and down is not None and down.dim() == 4:
                tensors[key] = value.reshape(*value.shape, 1, 1)
        # The file's alpha is the trained alpha times block_size (trainer.models.adapter_layout): LyCORIS' LoRA
        # module takes its scale from the constructor, not from a loaded alpha, so it is given here.
        trained = _net(**options)
        reading = dict(options, algo="lora", alpha=trained.alpha * trained.block_size)
        source = path.with_name("as-lora.safetensors")
        save_adapter(tensors, str(source), metadata={}, dtype=torch.float32)
    reference = build_network(_net(**reading), parts, train_unet=True, train_text_encoder=True)
    reference.load_weights(str(source))
    return reference


def _predict(parts) -> torch.Tensor:
    from trainer.models.load import encode_prompts

    g = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = []
    for tok in parts.tokenizers:
        body = tok("a photo of a cat", add_special_tokens=False).input_ids
        ids.append(torch.tensor([[[tok.bos_token_id, *body, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(body))]]))
    with torch.no_grad():
        states, pooled = encode_prompts(parts, ids, clip_skip=None, max_token_length=None)
        extra = {}
        if parts.arch == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        return parts.unet(latents, torch.tensor([500]), states, **extra).sample


def _paths(parts) -> dict[int, tuple[int, str]]:
    roots = [parts.unet, *parts.text_encoders]
    return {id(m): (i, name) for i, root in enumerate(roots) for name, m in root.named_modules()}


def _probe(module, g):
    if isinstance(module, torch.nn.Conv2d):
        return torch.randn(1, module.in_channels, 8, 8, generator=g)
    if isinstance(module, torch.nn.GroupNorm):
        return torch.randn(1, module.num_channels, 8, 8, generator=g)
    if isinstance(module, torch.nn.LayerNorm):
        return torch.randn(3, *module.normalized_shape, generator=g)
    return torch.randn(3, module.in_features, generator=g)


def _check_layers(network, base_parts, merged_parts, ratio: float) -> int:
    paths = _paths(base_parts)
    merged_roots = [merged_parts.unet, *merged_parts.text_encoders]
    g = torch.Generator().manual_seed(5)
    checked = 0
    for lyco in network.loras():
        lyco.multiplier = ratio
    network.eval()  # inference form: DyLoRA uses its whole rank, no dropout
    network.apply_to()
    try:
        with torch.no_grad():
            for lyco in network.loras():
                org = lyco.org_module[0]
                root, path = paths[id(org)]
                x = _probe(org, g)
                want = org(x)  # the base layer with the LyCORIS module hooked in
                got = merged_roots[root].get_submodule(path)(x)
                scale = want.abs().max().item() + 1e-6
                assert (got - want).abs().max().item() <= 2e-5 * scale, (lyco.lora_name, (got - want).abs().max())
                checked += 1
    finally:
        network.restore()
        for lyco in network.loras():
            lyco.multiplier = 1.0
    return checked


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_single_file_matches_the_lycoris_forward(tiny, tmp_path, arch, case):
    from trainer.models.load import load_model

    _, single, parts = tiny[arch]
    adapter = tmp_path / f"{case}.safetensors"
    network = _randomised_adapter(parts, CASES[case], adapter)
    out = Path(single).parent / f"merged-{case}.safetensors"  # beside the tokenizers the offline loader reads
    report = merge_checkpoint(single, [MergeInput(str(adapter), RATIO)], str(out), arch=arch)
    assert report.form == "single_file" and report.layers > 0
    with safe_open(single, framework="pt") as a, safe_open(str(out), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())  # the base's own SGM key names, nothing added or lost
        meta = b.metadata()
    assert meta["modelspec.architecture"] == ("stable-diffusion-xl-v1-base" if arch == "sdxl" else "stable-diffusion-v1")
    parts_meta = json.loads(meta["lathe.merge"])
    assert parts_meta["adapters"][0]["ratio"] == RATIO and parts_meta["adapters"][0]["name"] == adapter.name
    merged = load_model(ModelSpec(uri=str(out), arch=arch), weight_dtype=torch.float32)  # diffusers' single-file loader
    checked = _check_layers(network, parts, merged, RATIO)
    assert checked == len(network.loras())
    te_layers = [n for n in (m.lora_name for m in network.loras()) if n.startswith("lora_te")]
    assert te_layers  # text-encoder layers are merged too
    if CASES[case].get("train_norm"):  # the UNet's norm layers are among those checked
        norms = [m.lora_name for m in network.loras() if "Norm" in type(m.org_module[0]).__name__]
        assert any(n.startswith("lora_unet") for n in norms)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_merge_diffusers_folder_gives_a_folder_with_its_description(tiny, tmp_path, arch):
    from trainer.models.load import load_model

    folder, single, parts = tiny[arch]
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    net_a = _randomised_adapter(parts, CASES["lora"], first)
    _randomised_adapter(parts, CASES["loha"], second)
    out = tmp_path / "merged"
    report = merge_checkpoint(folder, [MergeInput(str(first), 0.5), MergeInput(str(second), 0.0)], str(out), arch=arch)
    assert report.form == "diffusers"
    description = json.loads((out / MERGE_JSON).read_text())
    assert [a["ratio"] for a in description["adapters"]] == [0.5, 0.0]
    assert all(len(a["sha256"]) == 64 for a in description["adapters"])
    merged = load_model(ModelSpec(uri=str(out), arch=arch), weight_dtype=torch.float32)
    assert _check_layers(net_a, parts, merged, 0.5) == len(net_a.loras())
    # The whole model: text encoders + UNet of the merged folder predict what the base predicts with the
    # adapter hooked in at the same ratio (same latents, timestep and prompt).
    for lyco in net_a.loras():
        lyco.multiplier = 0.5
    net_a.apply_to()
    try:
        want = _predict(parts)
    finally:
        net_a.restore()
    got = _predict(merged)
    assert not torch.allclose(_predict(parts), want, atol=1e-3)  # the adapter changes the prediction
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), (got - want).abs().max()


def test_an_adapter_of_another_architecture_is_an_adapter_mismatch(tiny, tmp_path):
    _, single_sd1, parts_sd1 = tiny["sd1"]
    _, single_xl, _ = tiny["sdxl"]
    adapter = tmp_path / "sd1.safetensors"
    _randomised_adapter(parts_sd1, CASES["lora"], adapter)
    with pytest.raises(JobFailure) as exc:
        merge_checkpoint(single_xl, [MergeInput(str(adapter), 1.0)], str(tmp_path / "out.safetensors"), arch="sdxl")
    assert exc.value.reason == Reason.ADAPTER_MISMATCH and exc.value.exit_code == EXIT_CODES[Reason.ADAPTER_MISMATCH]
    assert "sd1.safetensors" in exc.value.message and "lora_" in exc.value.message
    assert not (tmp_path / "out.safetensors").exists()


def test_a_file_that_is_not_an_adapter_and_a_ratio_out_of_range_are_refused(tiny, tmp_path):
    _, single, _ = tiny["sd1"]
    with pytest.raises(JobFailure) as exc:
        merge_checkpoint(single, [MergeInput(single, 1.0, label="model.safetensors")], str(tmp_path / "o.safetensors"), arch="sd1")
    assert exc.value.reason == Reason.ADAPTER_MISMATCH and "model.safetensors" in exc.value.message
    with pytest.raises(JobFailure) as exc:
        merge_checkpoint(single, [MergeInput(single, 10.5)], str(tmp_path / "o.safetensors"), arch="sd1")
    assert exc.value.reason == Reason.SPEC_INVALID and "10.5" in exc.value.message


def test_zero_tensor_check_counts_weights_and_warns_above_five_percent(tmp_path):
    from trainer.models.adapter_file import zero_tensor_check

    tensors = {}
    for i in range(20):
        tensors[f"lora_unet_l{i}.lora_down.weight"] = torch.randn(2, 8)
        tensors[f"lora_unet_l{i}.lora_up.weight"] = torch.randn(8, 2)
        tensors[f"lora_unet_l{i}.alpha"] = torch.tensor(0.0)  # scalars never count, zero or not
    path = tmp_path / "a.safetensors"
    tensors["lora_unet_l3.lora_up.weight"] = torch.zeros(8, 2)
    tensors["lora_unet_l7.lora_up.weight"] = torch.zeros(8, 2, dtype=torch.float32)
    save_adapter(tensors, str(path), metadata={}, dtype="fp16")
    check = zero_tensor_check(str(path))
    assert check.tensors == 40 and check.zero == ["lora_unet_l3.lora_up.weight", "lora_unet_l7.lora_up.weight"]
    assert check.warning("a.safetensors") is None  # 2 of 40 = 5 %: not above the threshold
    tensors["lora_unet_l9.lora_down.weight"] = torch.full((2, 8), 1e-9)  # underflows to 0 in fp16
    save_adapter(tensors, str(path), metadata={}, dtype="fp16")
    check = zero_tensor_check(str(path))
    message = check.warning("a.safetensors")
    assert len(check.zero) == 3 and message is not None
    assert "3 of 40" in message and "lora_unet_l9" in message and "fp16" in message
    assert check.summary() == {"tensors": 40, "zero": 3, "zero_names": check.zero}
