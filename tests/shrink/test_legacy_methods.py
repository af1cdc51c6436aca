"""The `_legacy` method names: sd-scripts' rank rules before its PR #2194, one component more per layer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trainer.core.shrink_choice import SD_SCRIPTS_METHODS, SHRINK_METHODS, make_rule, split_method
from trainer.core.shrink_errors import ShrinkError
from trainer.shrink import shrink_file
from trainer.shrink.cli import build_parser
from trainer.shrink.rank_rules import sd_scripts_rank, sd_scripts_ranks

# Cumulative shares of S: .533 .800 .933 .987 1.0; of S²: .756 .945 .992 .9995 1.0. Every param below
# falls strictly between two shares, so no index is clamped and the forms differ by exactly one.
S = torch.tensor([8.0, 4.0, 2.0, 0.8, 0.2])
CASES = [  # method, param, rank of the current form (sd-scripts after PR #2194)
    ("sv_ratio", 3.0, 2),  # 8/3 = 2.67: keeps 8, 4; the older form counted one more
    ("sv_cumulative", 0.85, 3),  # first share ≥ .85 is the 3rd
    ("sv_fro", 0.9, 2),  # first energy share ≥ .81 is the 2nd
]


@pytest.mark.parametrize("method,param,current", CASES)
def test_legacy_name_keeps_one_more_component(method, param, current):
    assert sd_scripts_rank(S, rank=None, method=method, param=param) == current
    legacy = sd_scripts_rank(S, rank=None, method=f"{method}_legacy", param=param)
    assert legacy == current + 1
    assert legacy == sd_scripts_rank(S, rank=None, method=method, param=param, legacy_off_by_one=True)
    padded = torch.stack([S, torch.cat([S[:3], torch.zeros(2)])])
    many = sd_scripts_ranks(padded, [5, 3], rank=None, method=f"{method}_legacy", param=param)
    assert many == [current + 1, sd_scripts_rank(S[:3], rank=None, method=f"{method}_legacy", param=param)]


def test_the_method_table_names_both_forms():
    assert SHRINK_METHODS == SD_SCRIPTS_METHODS + tuple(f"{m}_legacy" for m in SD_SCRIPTS_METHODS)
    assert [split_method(m) for m in ("sv_fro", "sv_fro_legacy")] == [("sv_fro", False), ("sv_fro", True)]
    assert make_rule(None, "sv_ratio_legacy", 3.0, None, None).method == "sv_ratio_legacy"
    with pytest.raises(ShrinkError, match="sv_fro_legacy"):
        make_rule(None, "sv_fro_old", 0.9, None, None)
    args = build_parser().parse_args(["in.safetensors", "-o", "o.safetensors", "--method", "sv_fro_legacy",
                                      "--param", "0.9"])
    assert args.method == "sv_fro_legacy"


def test_shrink_file_applies_the_legacy_rule(tmp_path):
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    u, _ = torch.linalg.qr(torch.randn(40, 5, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(48, 5, dtype=torch.float64))
    path = tmp_path / "spectrum.safetensors"
    save_file({f"{layer}.lora_up.weight": (u * S.double()).float().contiguous(),
               f"{layer}.lora_down.weight": v.T.float().contiguous(),
               f"{layer}.alpha": torch.tensor(5.0)}, str(path))
    for method, param, current in CASES:
        report = shrink_file(str(path), str(tmp_path / "o.safetensors"), base=None, method=f"{method}_legacy",
                             param=param)
        assert report.method == f"{method}_legacy"
        assert report.layers[0].new_rank == current + 1, method
