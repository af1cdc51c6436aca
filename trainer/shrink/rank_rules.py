"""Per-layer rank rules on singular spectra: sd-scripts' `resize_lora.py` and elias-gaeros' recipes.

Pure functions on descending spectra; they return how many (or which) components each layer keeps.

sd-scripts (`networks/resize_lora.py`, current version): `--new_rank N` keeps N; the dynamic methods
turn an index into a rank with `new_rank = index + 1`, where
- sv_ratio:      index = #(S > S[0]/param) − 1           (keeps every σ above S[0]/param),
- sv_cumulative: index = searchsorted(cumsum(S)/ΣS, param)  (first i whose cumulative share ≥ param),
- sv_fro:        index = searchsorted(cumsum(S²)/ΣS², param²),
each clamped to [0, len(S) − 1]; a layer whose top σ of the *unscaled* up@down is ≤ 1e-6 gets rank 1,
and the rank is capped at `--new_rank` (ours: `max_rank`). Older sd-scripts releases were off by one
(cumulative/fro before PR #2194, sv_ratio until 2026): `legacy_off_by_one=True`, or the method's
`_legacy` name (`sv_fro_legacy`, …), reproduces those.

resize_lora (elias-gaeros, `-r recipe`): score_i = log10(σ_i·rescale) − Σ_k w_k·log10(ref_k) with the
recipe weights normalised to sum 1 and refs: `fro_ckpt` ‖W_base‖_F, `spn_ckpt` ‖W_base‖_2, `spn_lora`
σ_0, `fro_lora` ‖σ‖, `params` out+in, `subspace` |u_iᵀ W_base v_i|; a component is kept iff
score > thr, or, with `size=MiB`, thr is chosen greedily so the output fits. Layers whose top σ < 1e-6
are dropped. σ here are those of the *scaled* delta (alpha/dim applied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from trainer.core.shrink_choice import (  # noqa: F401 (re-exported)
    BASE_SCORE_KEYS,
    SCORE_KEYS,
    SD_SCRIPTS_METHODS,
    Recipe,
    parse_recipe,
    split_method,
)
from trainer.core.shrink_errors import ShrinkError

MIN_SV = 1e-6  # sd-scripts' and resize_lora's "this layer is zero" threshold


# --- sd-scripts -------------------------------------------------------------------------------


def _clamp_index(index: int, n: int) -> int:
    return max(0, min(index, n - 1))


def index_sv_ratio(S: Tensor, target: float, legacy_off_by_one: bool = False) -> int:
    min_sv = S[0] / target
    count = int(torch.sum(S > min_sv).item())
    return _clamp_index(count if legacy_off_by_one else count - 1, len(S))


def index_sv_cumulative(S: Tensor, target: float, legacy_off_by_one: bool = False) -> int:
    cumulative = torch.cumsum(S, dim=0) / float(torch.sum(S))
    index = int(torch.searchsorted(cumulative, target)) + (1 if legacy_off_by_one else 0)
    return _clamp_index(index, len(S))


def index_sv_fro(S: Tensor, target: float, legacy_off_by_one: bool = False) -> int:
    squared = S.pow(2)
    cumulative = torch.cumsum(squared, dim=0) / float(torch.sum(squared))
    index = int(torch.searchsorted(cumulative, target**2)) + (1 if legacy_off_by_one else 0)
    return _clamp_index(index, len(S))


_INDEX_RULES: dict[str, Callable[[Tensor, float, bool], int]] = {
    "sv_ratio": index_sv_ratio,
    "sv_cumulative": index_sv_cumulative,
    "sv_fro": index_sv_fro,
}


def sd_scripts_rank(
    S_unscaled: Tensor,
    *,
    rank: int | None,
    method: str | None,
    param: float | None,
    max_rank: int | None = None,
    legacy_off_by_one: bool = False,
) -> int:
    """The rank sd-scripts' `rank_resize` picks for one layer (0 only for an exactly-zero delta).

    `S_unscaled` are the singular values of up@down without alpha/dim (what sd-scripts decomposes);
    ratios do not depend on the scale, only the zero test does.
    """
    n = len(S_unscaled)
    if n == 0 or float(S_unscaled[0]) == 0.0:
        return 0  # an all-zero layer (fp16 underflow): omitted rather than kept at rank 1
    if method is None:
        if rank is None:
            raise ShrinkError("a fixed rank (--rank) or a method (--method/--param) is required")
        new_rank = rank
    else:
        if param is None:
            raise ShrinkError(f"--method {method} needs --param")
        method, legacy = split_method(method)
        new_rank = _INDEX_RULES[method](S_unscaled, param, legacy_off_by_one or legacy) + 1
    if float(S_unscaled[0]) <= MIN_SV:
        new_rank = 1
    if max_rank is not None:
        new_rank = min(new_rank, max_rank)
    return min(new_rank, n)


def sd_scripts_ranks(
    S_unscaled: Tensor,
    lengths: list[int],
    *,
    rank: int | None,
    method: str | None,
    param: float | None,
    max_rank: int | None = None,
    legacy_off_by_one: bool = False,
) -> list[int]:
    """`sd_scripts_rank` for many layers at once: one zero-padded spectrum per row, `lengths` its true
    lengths. Padding changes nothing: it is never above a σ-ratio cut, and it repeats the last cumulative
    share, which a search that runs past the real entries is clamped back from."""
    if method is None and rank is None:
        raise ShrinkError("a fixed rank (--rank) or a method (--method/--param) is required")
    if method is not None and param is None:
        raise ShrinkError(f"--method {method} needs --param")
    n = torch.tensor(lengths, dtype=torch.long)
    if S_unscaled.shape[1] == 0:
        return [0] * len(lengths)
    top = S_unscaled[:, 0]
    if method is None:
        new_rank = torch.full_like(n, rank)
    else:
        method, legacy = split_method(method)
        legacy_off_by_one = legacy_off_by_one or legacy
        if method == "sv_ratio":
            count = (S_unscaled > top[:, None] / param).sum(1)
            index = count if legacy_off_by_one else count - 1
        else:
            values, target = (S_unscaled, param) if method == "sv_cumulative" else (S_unscaled.square(), param**2)
            cumulative = torch.cumsum(values, dim=1) / values.sum(1, keepdim=True)
            targets = torch.full((len(lengths), 1), target, dtype=cumulative.dtype)
            index = torch.searchsorted(cumulative, targets).squeeze(1) + (1 if legacy_off_by_one else 0)
        new_rank = torch.minimum(index.clamp_min(0), n - 1) + 1
    new_rank = torch.where(top <= MIN_SV, torch.ones_like(new_rank), new_rank)
    if max_rank is not None:
        new_rank = new_rank.clamp_max(max_rank)
    new_rank = torch.minimum(new_rank, n)
    new_rank = torch.where((n == 0) | (top == 0), torch.zeros_like(new_rank), new_rank)  # all-zero layers
    return new_rank.tolist()


# --- resize_lora recipes (parsed in .choice) ----------------------------------------------------


@dataclass
class LayerRefs:
    """What recipe scores compare a layer's σ against (base-model refs only when the recipe needs them)."""

    out_features: int
    in_features: int  # flattened (in·kh·kw)
    fro_ckpt: float | None = None
    spn_ckpt: float | None = None
    subspace: Tensor | None = None  # |u_iᵀ W_base v_i| per component


def recipe_scores(S: Tensor, recipe: Recipe, refs: LayerRefs) -> Tensor:
    """log10 scores of one layer's (scaled) singular values, in resize_lora's order of operations."""
    return recipe_scores_many(S[None], recipe, [refs])[0]


def recipe_scores_many(S: Tensor, recipe: Recipe, refs: list[LayerRefs]) -> Tensor:
    """`recipe_scores` of many layers at once: S holds one layer's spectrum per row, zero-padded (padding
    scores -inf, so no threshold keeps it); refs are the layers' references, in row order."""
    w = recipe.weights

    def column(values: list[float]) -> Tensor:  # one per-layer constant per row, as resize_lora's scalars
        return torch.tensor(values, dtype=S.dtype, device=S.device)[:, None]

    scores = torch.log10(S)
    scores += math.log10(recipe.rescale)
    if abs(w["subspace"]) > 1e-6:
        subspace = [_required(r.subspace, "subspace").to(S.dtype) for r in refs]
        padded = torch.ones_like(S)
        for row, values in zip(padded, subspace):
            row[: values.numel()] = values
        scores -= w["subspace"] * torch.log10(padded)
    if abs(w["spn_ckpt"]) > 1e-6:
        scores -= column([w["spn_ckpt"] * math.log10(_required(r.spn_ckpt, "spn_ckpt")) for r in refs])
    if abs(w["spn_lora"]) > 1e-6:
        scores -= w["spn_lora"] * torch.log10(S[:, :1])
    if abs(w["fro_ckpt"]) > 1e-6:
        scores -= column([w["fro_ckpt"] * math.log10(_required(r.fro_ckpt, "fro_ckpt")) for r in refs])
    if abs(w["fro_lora"]) > 1e-6:
        scores -= w["fro_lora"] * torch.log10(torch.linalg.vector_norm(S, dim=1, keepdim=True))
    if abs(w["params"]) > 1e-6:
        scores -= column([w["params"] * math.log10(r.out_features + r.in_features) for r in refs])
    return scores


def _required(value, key: str):
    if value is None:
        raise ShrinkError(f"recipe score '{key}' needs the base model: pass --base CHECKPOINT")
    return value


def recipe_threshold(
    scores: list[Tensor], sizes_per_rank: list[int], ranks: list[int], recipe: Recipe
) -> float:
    """The threshold: the recipe's `thr`, or the greedy-knapsack cut that fits `size` MiB."""
    if recipe.size_mib is None:
        assert recipe.threshold is not None
        return recipe.threshold
    if not scores:
        return -math.inf
    flat, order = torch.cat(scores).sort(descending=True)
    per_component = torch.repeat_interleave(
        torch.tensor(sizes_per_rank, dtype=torch.int64), torch.tensor(ranks, dtype=torch.int64)
    )
    cumulative = per_component[order].cumsum(0)
    target = recipe.size_mib * (1 << 20)
    if target < cumulative[-1]:
        return flat[int(torch.searchsorted(cumulative, target))].item()
    return -math.inf


def recipe_keep(scores: Tensor, threshold: float) -> Tensor:
    """Indices of the kept components (score strictly above the threshold)."""
    return torch.nonzero(scores > threshold).flatten()
