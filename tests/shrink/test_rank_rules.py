"""Each rank rule picks the rank its definition gives on hand-made spectra."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.core.shrink_errors import ShrinkError
from trainer.shrink.rank_rules import (
    LayerRefs,
    parse_recipe,
    recipe_keep,
    recipe_scores,
    recipe_threshold,
    sd_scripts_rank,
)

S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])


def rank(S, **kw):
    kw.setdefault("rank", None)
    kw.setdefault("method", None)
    kw.setdefault("param", None)
    return sd_scripts_rank(S, **kw)


def test_sv_ratio_keeps_values_strictly_above_top_over_ratio():
    assert rank(S, method="sv_ratio", param=4.0) == 2  # 10/4 = 2.5: keeps 10, 5
    assert rank(S, method="sv_ratio", param=5.0) == 2  # 2.0 is not > 10/5
    assert rank(S, method="sv_ratio", param=5.01) == 3
    assert rank(S, method="sv_ratio", param=1.0) == 1  # nothing is > S[0]: clamped to one
    assert rank(S, method="sv_ratio", param=1e9) == 5
    # sd-scripts before its 2026 fix returned one more.
    assert rank(S, method="sv_ratio", param=4.0, legacy_off_by_one=True) == 3


def test_sv_cumulative_is_the_first_prefix_reaching_the_share():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative shares 0.4 0.7 0.9 1.0
    assert rank(s, method="sv_cumulative", param=0.4) == 1
    assert rank(s, method="sv_cumulative", param=0.41) == 2
    assert rank(s, method="sv_cumulative", param=0.85) == 3
    assert rank(s, method="sv_cumulative", param=1.0) == 4
    assert rank(s, method="sv_cumulative", param=0.41, legacy_off_by_one=True) == 3  # pre-PR #2194


def test_sv_fro_compares_squared_shares_with_param_squared():
    s = torch.tensor([4.0, 3.0])  # energy shares 0.64, 1.0 → Frobenius shares 0.8, 1.0
    assert rank(s, method="sv_fro", param=0.8) == 1
    assert rank(s, method="sv_fro", param=0.81) == 2
    assert rank(s, method="sv_fro", param=0.81, legacy_off_by_one=True) == 2  # clamped at len(S)


def test_fixed_rank_caps_and_zero_layers():
    assert rank(S, rank=3) == 3
    assert rank(S, rank=64) == 5  # never above the layer's own rank: shrinking to ≥ k is lossless
    assert rank(S, method="sv_ratio", param=1e9, max_rank=2) == 2
    assert rank(torch.tensor([5e-7, 1e-7]), method="sv_ratio", param=1e9) == 1  # sd-scripts' MIN_SV rule
    assert rank(torch.zeros(4), rank=4) == 0  # exactly zero (fp16 underflow): the layer is omitted


def test_recipe_parsing_normalises_weights_and_names_bad_keys():
    r = parse_recipe("fro_ckpt=1,spn_ckpt=3,thr=-2")
    assert r.weights["fro_ckpt"] == pytest.approx(0.25) and r.weights["spn_ckpt"] == pytest.approx(0.75)
    assert r.threshold == -2 and r.needs_base
    assert parse_recipe("spn_lora,size=1.5").weights["spn_lora"] == 1.0
    assert not parse_recipe("spn_lora=1,thr=-1").needs_base
    with pytest.raises(ShrinkError, match="unknown key 'frob'"):
        parse_recipe("frob=1,thr=-1")
    with pytest.raises(ShrinkError, match="threshold"):
        parse_recipe("fro_ckpt=1")
    with pytest.raises(ShrinkError, match="score weight"):
        parse_recipe("thr=-1")
    with pytest.raises(ShrinkError, match="not a number"):
        parse_recipe("fro_ckpt=x,thr=-1")


def test_fro_ckpt_keeps_sigma_above_ten_to_thr_times_base_norm():
    recipe = parse_recipe("fro_ckpt=1,thr=-1")
    refs = LayerRefs(out_features=8, in_features=8, fro_ckpt=10.0)
    keep = recipe_keep(recipe_scores(torch.tensor([5.0, 1.5, 1.0, 0.2]), recipe, refs), recipe.threshold)
    assert keep.tolist() == [0, 1]  # σ > 10^-1·10 = 1, strictly


def test_geometric_mix_of_two_references_and_rescale():
    recipe = parse_recipe("fro_ckpt=1,spn_ckpt=1,thr=-1,rescale=2")
    refs = LayerRefs(out_features=8, in_features=8, fro_ckpt=100.0, spn_ckpt=1.0)  # geometric mean 10
    s = torch.tensor([3.0, 0.6, 0.4])  # ×2 = 6, 1.2, 0.8 against 1
    assert recipe_keep(recipe_scores(s, recipe, refs), recipe.threshold).tolist() == [0, 1]


def test_spn_lora_is_sv_ratio_and_params_uses_layer_size():
    recipe = parse_recipe("spn_lora=1,thr=-0.5")
    s = torch.tensor([10.0, 4.0, 3.0, 1.0])  # kept iff σ/10 > 10^-0.5 ≈ 0.316
    assert recipe_keep(recipe_scores(s, recipe, LayerRefs(4, 4)), recipe.threshold).tolist() == [0, 1]
    recipe = parse_recipe("params=1,thr=-1")  # σ > (out + in)/10 = 2
    assert recipe_keep(recipe_scores(s, recipe, LayerRefs(12, 8)), recipe.threshold).tolist() == [0, 1, 2]


def test_size_target_cuts_the_best_scores_that_fit():
    recipe = parse_recipe("spn_lora=1,size=0.001")  # 1048.576 bytes
    scores = [torch.tensor([0.0, -1.0, -2.0]), torch.tensor([-0.5, -1.5])]
    sizes = [200, 300]  # bytes per kept component of each layer
    # Sorted: 0.0(200) -0.5(300) -1.0(200) -1.5(300) -2.0(200): cumulative 200 500 700 1000 1200.
    threshold = recipe_threshold(scores, sizes, [3, 2], recipe)
    assert threshold == -2.0  # components scoring > -2.0 fit in 1000 bytes
    kept = [recipe_keep(s, threshold).numel() for s in scores]
    assert kept == [2, 2]
    assert recipe_threshold(scores, sizes, [3, 2], parse_recipe("spn_lora=1,size=1")) == -math.inf


def test_recipe_scores_of_many_layers_equal_one_layer_at_a_time():
    """The pipeline scores every layer at once on zero-padded spectra; each row must equal the layer's own
    scores bit for bit, and the padding must never be kept."""
    from trainer.shrink.rank_rules import recipe_scores_many

    g = torch.Generator().manual_seed(1)
    spectra = [torch.sort(torch.rand(n, generator=g) * 3, descending=True).values for n in (5, 2, 8)]
    refs = [LayerRefs(40 + i, 30, fro_ckpt=1.5 + i, spn_ckpt=0.7 + i, subspace=torch.rand(len(s), generator=g) + 0.1)
            for i, s in enumerate(spectra)]
    padded = torch.zeros(3, 8)
    for row, s in zip(padded, spectra):
        row[: len(s)] = s
    for text in ("fro_ckpt=1,thr=-2", "spn_ckpt=1,spn_lora=1,thr=-1", "subspace=1,fro_lora=0.5,params=0.2,thr=0",
                 "fro_ckpt=1,rescale=2,thr=-1"):
        recipe = parse_recipe(text)
        many = recipe_scores_many(padded, recipe, refs)
        for i, (s, r) in enumerate(zip(spectra, refs)):
            one = recipe_scores(s, recipe, r)
            if text.startswith("subspace"):  # fro_lora's norm runs over the padded row: equal to round-off
                torch.testing.assert_close(many[i, : len(s)], one)
            else:
                assert torch.equal(many[i, : len(s)], one), text
            assert not (many[i, len(s):] > -1e30).any()


@pytest.mark.parametrize("legacy", [False, True])
def test_sd_scripts_ranks_of_many_layers_equal_one_layer_at_a_time(legacy):
    """The pipeline ranks every layer at once on zero-padded spectra: each must get what sd-scripts' rule
    gives that layer alone, including the tiny (MIN_SV) and all-zero layers and the caps."""
    from trainer.shrink.rank_rules import sd_scripts_ranks

    g = torch.Generator().manual_seed(2)
    spectra = []
    for i in range(60):
        n = 1 + i % 9
        decay = torch.exp(-torch.arange(n, dtype=torch.float32) * (0.1 + (i % 5) * 0.4))
        spectra.append(decay * torch.rand(1, generator=g).item() * 10)
    spectra += [torch.full((4,), 5e-7), torch.zeros(3), torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0])]
    padded = torch.zeros(len(spectra), 9)
    for row, s in zip(padded, spectra):
        row[: len(s)] = s
    lengths = [len(s) for s in spectra]
    cases = [dict(rank=3, method=None, param=None), dict(rank=None, method="sv_ratio", param=4.0),
             dict(rank=None, method="sv_fro", param=0.9), dict(rank=None, method="sv_cumulative", param=0.7),
             dict(rank=None, method="sv_fro", param=1.0), dict(rank=None, method="sv_cumulative", param=0.5, max_rank=2)]
    for case in cases:
        many = sd_scripts_ranks(padded, lengths, legacy_off_by_one=legacy, **case)
        one = [sd_scripts_rank(s, legacy_off_by_one=legacy, **case) for s in spectra]
        assert many == one, case
