"""shrink_file end to end on generated adapter files: exactness, output format, metadata, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from shrink_fixtures import best_rank_k_error, lora_delta, lora_layer

from trainer.shrink import NothingToShrink, ShrinkError, ShrinkReport, shrink_file
from trainer.models.adapter_file import sshs_hashes

SD1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SD1_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
SD1_SHORTCUT = "lora_unet_up_blocks_1_resnets_0_conv_shortcut"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def exact_rank_lora(name, out, inn, stored_rank, true_rank, alpha, kernel=()):
    """A LoRA layer of stored rank `stored_rank` whose delta has rank `true_rank` exactly."""
    torch.manual_seed(hash(name) % 1000)
    up = torch.randn(out, true_rank) @ torch.randn(true_rank, stored_rank) * 0.1
    down = torch.randn(stored_rank, inn, *kernel) * 0.1
    return {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_up.weight": up.reshape(out, stored_rank, *([1] * len(kernel))),
        f"{name}.alpha": torch.tensor(float(alpha)),
    }


@pytest.fixture
def rank4_file(tmp_path):
    tensors = {}
    tensors |= exact_rank_lora(SD1, 40, 48, 8, 4, alpha=4)
    tensors |= exact_rank_lora(SD1_CONV, 32, 24, 8, 4, alpha=8, kernel=(3, 3))
    tensors |= exact_rank_lora(SD1_SHORTCUT, 32, 16, 8, 4, alpha=1, kernel=(1, 1))
    tensors |= exact_rank_lora(TE, 32, 32, 8, 4, alpha=16)
    path = tmp_path / "in.safetensors"
    metadata = {
        "ss_network_dim": "8",
        "ss_network_alpha": "4",
        "ss_training_comment": "hello",
        "modelspec.title": "tiny",
        "ss_network_module": "networks.lora",
    }
    save_file(tensors, str(path), metadata=metadata)
    return path, tensors


@pytest.mark.parametrize("new_rank", [4, 6])
def test_rank_k_adapter_shrunk_to_k_or_more_is_lossless(rank4_file, tmp_path, new_rank):
    path, tensors = rank4_file
    out = tmp_path / "out.safetensors"
    report = shrink_file(str(path), str(out), base=None, rank=new_rank, save_precision="fp32")
    shrunk = load_file(str(out))
    for name in (SD1, SD1_CONV, SD1_SHORTCUT, TE):
        before, after = lora_delta(tensors, name), lora_delta(shrunk, name)
        assert (after - before).norm() / before.norm() < 1e-5, name
        # Rank ≤ the delta's own rank: a rank-4 layer keeps 4 even when 6 is asked for... as a product
        # it has 8 components, the 4 beyond its true rank being zero up to round-off.
        assert shrunk[f"{name}.lora_down.weight"].shape[0] == new_rank
    assert shrunk[f"{SD1_CONV}.lora_down.weight"].shape == (new_rank, 24, 3, 3)
    assert shrunk[f"{SD1_CONV}.lora_up.weight"].shape == (32, new_rank, 1, 1)
    assert shrunk[f"{SD1_SHORTCUT}.lora_down.weight"].shape == (new_rank, 16, 1, 1)
    # alpha keeps the input's alpha/dim ratio: 8/8 → alpha = rank for the conv layer.
    assert shrunk[f"{SD1_CONV}.alpha"].item() == pytest.approx(new_rank * 8 / 8)
    assert shrunk[f"{TE}.alpha"].item() == pytest.approx(new_rank * 16 / 8)
    assert all(row.rel_error < 1e-5 for row in report.layers)
    assert {row.old_rank for row in report.layers} == {8}


def test_metadata_updated_as_sd_scripts_resize_does(rank4_file, tmp_path):
    path, _ = rank4_file
    out = tmp_path / "out.safetensors"
    shrink_file(str(path), str(out), base=None, method="sv_fro", param=0.9)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(out))
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"] == "Dynamic resize with sv_fro: 0.9 from 8; hello"
    assert meta["modelspec.title"] == "tiny"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(tensors, meta)
    report = ShrinkReport.__struct_config__ and json.loads(meta["lathe_shrink_report"])
    assert report["rule"] == "method" and len(report["layers"]) == 4
    # fp32 input, no --save-precision: the output keeps fp32.
    assert tensors[f"{SD1}.lora_down.weight"].dtype == torch.float32

    shrink_file(str(path), str(out), base=None, rank=2, save_precision="fp16")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2"
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 2; hello"
    assert load_file(str(out))[f"{SD1}.lora_up.weight"].dtype == torch.float16


def test_sd_scripts_methods_pick_ranks_from_the_layer_spectrum(tmp_path):
    # Known spectrum: ΔW = (alpha/r)·U diag(s) Vᵀ with orthonormal U, V.
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    u, _ = torch.linalg.qr(torch.randn(40, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(48, 6, dtype=torch.float64))
    tensors = {
        f"{SD1}.lora_up.weight": (u * s.double()).float().contiguous(),
        f"{SD1}.lora_down.weight": v.T.float().contiguous(),
        f"{SD1}.alpha": torch.tensor(3.0),  # scale 0.5 does not change ratio rules
    }
    path = tmp_path / "spectrum.safetensors"
    save_file(tensors, str(path))
    out = str(tmp_path / "o.safetensors")
    for method, param, expected in [
        ("sv_ratio", 5.0, 3),  # 8/5 = 1.6: keeps 8, 4, 2
        ("sv_cumulative", 0.9, 4),  # shares .51 .76 .89 .95: the 4th is the first ≥ .9
        ("sv_fro", 0.99, 3),  # energy shares .750 .938 .985: the 3rd is the first ≥ .99² = .9801
    ]:
        rows = shrink_file(str(path), out, base=None, method=method, param=param).layers
        assert rows[0].new_rank == expected, method
        kept = s[:expected]
        assert rows[0].retained_fro == pytest.approx(math.sqrt(float((kept**2).sum() / (s**2).sum())), rel=1e-5)


def lycoris_like_tensors():
    """LoHa, LoKr, full, IA3 and norm layers with LyCORIS key conventions and random factors."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    loha = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    loha_conv = "lora_unet_down_blocks_1_resnets_0_conv2"
    lokr = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    full = "lora_unet_mid_block_attentions_0_proj_out"
    t = {
        f"{loha}.hada_w1_a": r(40, 4), f"{loha}.hada_w1_b": r(4, 64),
        f"{loha}.hada_w2_a": r(40, 4), f"{loha}.hada_w2_b": r(4, 64), f"{loha}.alpha": torch.tensor(2.0),
        # A non-Tucker LoHa conv stores its kernel flattened into hada_w*_b: 16·3·3 = 144.
        f"{loha_conv}.hada_w1_a": r(32, 2), f"{loha_conv}.hada_w1_b": r(2, 144),
        f"{loha_conv}.hada_w2_a": r(32, 2), f"{loha_conv}.hada_w2_b": r(2, 144),
        f"{lokr}.lokr_w1": r(4, 4), f"{lokr}.lokr_w2_a": r(10, 2), f"{lokr}.lokr_w2_b": r(2, 8),
        f"{lokr}.alpha": torch.tensor(1.0),
        f"{full}.diff": r(24, 24), f"{full}.diff_b": r(24),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v.weight": r(24),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v.on_input": torch.tensor(0),
        "lora_unet_mid_block_attentions_0_norm.w_norm": r(24),
        "lora_unet_mid_block_attentions_0_norm.b_norm": r(24),
    }
    return t, {"loha": loha, "loha_conv": loha_conv, "lokr": lokr, "full": full}


def test_lycoris_layers_become_plain_lora_with_optimal_error(tmp_path):
    from trainer.shrink.adapter_layers import materialize, parse_adapter, resolve_shape

    tensors, names = lycoris_like_tensors()
    path = tmp_path / "lyco.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    out = tmp_path / "out.safetensors"
    report = shrink_file(str(path), str(out), base=None, method="sv_fro", param=0.95, save_precision="fp32")
    shrunk = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "Dynamic" or "conv_dim" in meta["ss_network_args"]
    parsed = parse_adapter(tensors)
    rows = {row.name: row for row in report.layers}
    for layer in parsed.layers:
        resolve_shape(layer, None, "sd1", "t")
        dense = materialize(layer.structure())
        after = lora_delta(shrunk, layer.name)
        k = rows[layer.name].new_rank
        err = float((after.double() - dense.double()).norm() / dense.double().norm())
        assert err == pytest.approx(best_rank_k_error(dense, k), abs=1e-5), layer.name
        assert err == pytest.approx(rows[layer.name].rel_error, abs=1e-5)
        assert not any(k.startswith(layer.name + ".hada") or k.startswith(layer.name + ".lokr") for k in shrunk)
    assert shrunk[f"{names['loha_conv']}.lora_down.weight"].shape[1:] == (16, 3, 3)
    # IA3 / norm / diff_b tensors pass through unchanged.
    for key in (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v.weight",
        "lora_unet_mid_block_attentions_0_norm.w_norm",
        f"{names['full']}.diff_b",
    ):
        torch.testing.assert_close(shrunk[key], tensors[key])
    assert shrunk["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v.on_input"].item() == 0
    assert report.totals.passthrough_keys == 4


def test_zero_layers_are_omitted(tmp_path):
    tensors = lora_layer(SD1, 40, 48, 4, 4) | lora_layer(TE, 32, 32, 4, 4)
    tensors[f"{TE}.lora_up.weight"].zero_()  # an fp16-underflowed layer
    path = tmp_path / "z.safetensors"
    save_file(tensors, str(path))
    out = tmp_path / "o.safetensors"
    report = shrink_file(str(path), str(out), base=None, rank=4)
    keys = load_file(str(out)).keys()
    assert not any(k.startswith(TE) for k in keys)
    assert report.totals.layers_omitted == 1 and report.totals.layers_out == 1


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda t: t.__setitem__(f"{SD1}.dora_scale", torch.ones(40, 1)), ShrinkError, "DoRA"),
        (lambda t: t[f"{SD1}.lora_up.weight"].__setitem__((0, 0), float("nan")), ShrinkError, "NaN"),
        (lambda t: t.__setitem__(f"{SD1}.oft_blocks", torch.ones(2, 2, 2)), ShrinkError, "OFT"),
        (lambda t: t.__setitem__(f"{SD1}.mystery", torch.ones(2)), ShrinkError, "no known adapter"),
    ],
)
def test_bad_inputs_are_refused_with_the_layer_named(tmp_path, mutate, error, match):
    tensors = lora_layer(SD1, 40, 48, 4, 4)
    mutate(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(error, match=match) as info:
        shrink_file(str(path), str(tmp_path / "o.safetensors"), base=None, rank=2)
    assert SD1 in str(info.value) or "NaN" in str(info.value)


def test_file_level_refusals(tmp_path):
    ia3_only = {"lora_unet_x_to_k.weight": torch.ones(8), "lora_unet_x_to_k.on_input": torch.tensor(0)}
    save_file(ia3_only, str(tmp_path / "ia3.safetensors"))
    with pytest.raises(NothingToShrink, match="ia3"):
        shrink_file(str(tmp_path / "ia3.safetensors"), str(tmp_path / "o.safetensors"), base=None, rank=2)
    peft = {"unet.down.lora_A.weight": torch.ones(2, 4), "unet.down.lora_B.weight": torch.ones(4, 2)}
    save_file(peft, str(tmp_path / "peft.safetensors"))
    with pytest.raises(ShrinkError, match="sd-scripts naming"):
        shrink_file(str(tmp_path / "peft.safetensors"), str(tmp_path / "o.safetensors"), base=None, rank=2)
    save_file(lora_layer(SD1, 40, 48, 4, 4), str(tmp_path / "ok.safetensors"))
    with pytest.raises(ShrinkError, match="--base"):
        shrink_file(str(tmp_path / "ok.safetensors"), str(tmp_path / "o.safetensors"), base=None, recipe="fro_ckpt=1,thr=-3.55")
    with pytest.raises(ShrinkError, match="needs --param"):
        shrink_file(str(tmp_path / "ok.safetensors"), str(tmp_path / "o.safetensors"), base=None, method="sv_ratio")
    with pytest.raises(ShrinkError, match="no such file"):
        shrink_file(str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors"), base=None, rank=2)
    with pytest.raises(ShrinkError, match="overwrite"):
        shrink_file(str(tmp_path / "ok.safetensors"), str(tmp_path / "ok.safetensors"), base=None, rank=2)


def test_size_target_cuts_where_its_threshold_would(tmp_path):
    """A size target (`size=MiB`) weighs every layer before any cut (two passes); a plain threshold
    decides each layer as it is decomposed (one pass). With the size run's threshold, the threshold
    run must keep exactly the same ranks, and the size run must fit its target."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for b in range(6):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_{b}_attn1_to_q"
        decay = torch.exp(-torch.arange(16.0) / (2 + b))
        tensors[f"{name}.lora_up.weight"] = torch.randn(40, 16, generator=g) * decay
        tensors[f"{name}.lora_down.weight"] = torch.randn(16, 48, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(8.0)
    path = tmp_path / "in.safetensors"
    save_file(tensors, str(path))
    target_mib = 0.02
    sized = shrink_file(str(path), str(tmp_path / "sized.safetensors"), base=None, recipe=f"spn_lora=1,size={target_mib}",
                        save_precision="fp32")
    params = sum(r.new_rank * (40 + 48) for r in sized.layers)
    assert 0 < params * 4 <= target_mib * 2**20
    assert len({r.new_rank for r in sized.layers}) > 1  # the target cuts layers differently
    cut = shrink_file(str(path), str(tmp_path / "cut.safetensors"), base=None,
                      recipe=f"spn_lora=1,thr={sized.threshold!r}", save_precision="fp32")
    assert [r.new_rank for r in cut.layers] == [r.new_rank for r in sized.layers]
