"""The shrink report: per-layer ranks and errors, totals, and how the ranks were chosen."""

from __future__ import annotations

from typing import Any

import msgspec


class LayerRow(msgspec.Struct, frozen=True):
    name: str
    algo: str  # input algorithm: lora | loha | lokr | full
    old_rank: int  # rank bound of the input delta (LoRA: dim; LoHa: ≤ dim²; LoKr: product of halves)
    new_rank: int  # 0 = layer omitted
    retained_fro: float  # ‖ΔW_kept‖_F / ‖ΔW‖_F
    rel_error: float  # ‖ΔW − ΔW_kept‖_F / ‖ΔW‖_F (SVD truncation; before the save-precision cast)


class ShrinkTotals(msgspec.Struct, frozen=True):
    layers_in: int
    layers_out: int
    layers_omitted: int  # rank chosen 0 or all-zero input
    passthrough_keys: int  # IA3 / norm / diff_b tensors copied unchanged
    params_in: int
    params_out: int
    bytes_in: int
    bytes_out: int
    retained_fro: float  # over all layers: sqrt(Σ kept σ² / Σ σ²)
    rel_error: float  # over all layers: sqrt(Σ dropped σ² / Σ σ²)
    max_rel_error: float


class ShrinkReport(msgspec.Struct, frozen=True):
    input: str
    output: str
    base: str | None
    rule: str  # "rank" | "method" | "recipe"
    rank: int | None
    method: str | None
    param: float | None
    recipe: str | None
    threshold: float | None  # recipe threshold actually applied (size= recipes choose it)
    max_rank: int | None
    save_precision: str
    device: str
    layers: list[LayerRow]
    passthrough: list[str]
    totals: ShrinkTotals
    timings_s: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    def header_json(self) -> str:
        """Compact JSON for the safetensors header (`lathe_shrink_report`)."""
        return msgspec.json.encode(self).decode()
