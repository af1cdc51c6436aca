"""The shrunk file's tensors: each layer's kept factors as a plain LoRA (LoCon for convolutions), the
pass-through tensors, and the report's rows and totals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.core.shrink_errors import NothingToShrink

from .adapter_layers import AdapterLayer, ParsedAdapter
from .decompose import Decomposition
from .report import LayerRow, ShrinkTotals


@dataclass
class Assembled:
    """The output's tensors, one report row per input layer, the written layers' alphas and the
    convolutions' ranks (for the `ss_*` header), the pass-through keys, and Σσ² in all and kept."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    rows: list[LayerRow] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    conv_ranks: list[int] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)
    total_sq: float = 0.0
    kept_sq: float = 0.0


def assemble(parsed: ParsedAdapter, dec: Decomposition, save_dtype: torch.dtype, source: str) -> Assembled:
    """The output file's tensors and the report's rows; NothingToShrink when no layer keeps a rank."""
    out = Assembled()
    for layer, keep, root, (up, down), old_rank, energy, kept_i, dropped_i in zip(
        parsed.layers, dec.keeps, dec.roots, dec.factors, dec.old_ranks, dec.energies, dec.kept_energies,
        dec.dropped_energies,
    ):
        new_rank = _add_layer(out, layer, int(keep.numel()), root, up, down, save_dtype)
        if keep.numel() and not new_rank:
            kept_i, dropped_i = 0.0, energy  # all zeros in the save precision
        out.rows.append(LayerRow(
            name=layer.name, algo=layer.algo, old_rank=old_rank, new_rank=new_rank,
            retained_fro=math.sqrt(kept_i / energy) if energy > 0 else 1.0,
            rel_error=math.sqrt(dropped_i / energy) if energy > 0 else 0.0,
        ))
        out.total_sq += energy
        out.kept_sq += kept_i
    _add_passthrough(out, parsed.passthrough, save_dtype)
    if not any(k.endswith(".lora_down.weight") for k in out.tensors):
        raise NothingToShrink(
            f"{source}: every layer's rank came out 0 with this rule; loosen it (a lower thr, a higher"
            " --param, or --rank N)"
        )
    return out


def _add_layer(out: Assembled, layer: AdapterLayer, new_rank: int, root: Tensor, up: Tensor, down: Tensor,
               save_dtype: torch.dtype) -> int:
    """Adds the layer's LoRA tensors (shaped as its weight) to `out`; returns the rank written, 0 when
    nothing was kept or the factors vanish in the save precision."""
    if not new_rank:
        return 0
    up, down = up.to("cpu"), down.to("cpu")  # no-ops unless the work ran on a GPU
    rows, inn, *kernel = layer.weight_shape
    if kernel:
        down = down.reshape(new_rank, inn, *kernel)
        up = up.reshape(rows, new_rank, *([1] * len(kernel)))
    if _may_vanish(float(root.square().sum()), up, down, save_dtype) and not (bool(down.any()) and bool(up.any())):
        return 0
    alpha = layer.output_scale * new_rank
    out.tensors[f"{layer.name}.alpha"] = torch.tensor(alpha, dtype=save_dtype)
    out.tensors[f"{layer.name}.lora_down.weight"] = down
    out.tensors[f"{layer.name}.lora_up.weight"] = up
    out.alphas.append(alpha)
    if layer.is_conv:
        out.conv_ranks.append(new_rank)
    return new_rank


def _may_vanish(root_sq: float, up: Tensor, down: Tensor, dtype: torch.dtype) -> bool:
    """Whether a shrunk factor could be all zeros once cast to `dtype`. Both factors have squared
    Frobenius norm Σ√σ² = `root_sq` (orthonormal vectors scaled by √σ), so some entry is at least
    √(root_sq / numel); when that clears twice the smallest subnormal, the cast keeps it nonzero."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return root_sq / max(up.numel(), down.numel()) <= (2 * tiny) ** 2


def _add_passthrough(out: Assembled, passthrough: dict[str, Tensor], save_dtype: torch.dtype) -> None:
    """IA3, norm and full-bias tensors, copied in the save precision; all-zero deltas are dropped."""
    for key, value in passthrough.items():
        if key.endswith(".on_input"):
            continue  # copied with its IA3 weight below
        if value.is_floating_point() and not value.any():
            continue  # an all-zero IA3/norm/bias delta changes nothing
        out.tensors[key] = value.to(save_dtype) if value.is_floating_point() else value
        out.passthrough.append(key)
        flag = key.rsplit(".", 1)[0] + ".on_input"
        if key.endswith(".weight") and flag in passthrough:
            out.tensors[flag] = passthrough[flag]


def totals(tensors: dict[str, Tensor], out: Assembled) -> ShrinkTotals:
    """The report's totals, from the input's tensors and the assembled output."""
    rows, total_sq, kept_sq = out.rows, out.total_sq, out.kept_sq
    rel_errors = [r.rel_error for r in rows]
    return ShrinkTotals(
        layers_in=len(rows),
        layers_out=sum(1 for r in rows if r.new_rank > 0),
        layers_omitted=sum(1 for r in rows if r.new_rank == 0),
        passthrough_keys=len(out.passthrough),
        params_in=sum(t.numel() for t in tensors.values()),
        params_out=sum(t.numel() for t in out.tensors.values()),
        bytes_in=sum(t.numel() * t.element_size() for t in tensors.values()),
        bytes_out=sum(t.numel() * t.element_size() for t in out.tensors.values()),
        retained_fro=math.sqrt(kept_sq / total_sq) if total_sq > 0 else 1.0,
        rel_error=math.sqrt(max(total_sq - kept_sq, 0.0) / total_sq) if total_sq > 0 else 0.0,
        max_rel_error=max(rel_errors) if rel_errors else 0.0,
    )
