"""`shrink_file`: read an adapter, pick each layer's rank, re-factor it exactly, write a plain LoRA.

The phases: read and plan (the file, the rule, the save precision, each layer's shape), decompose
(`decompose.py`), assemble the output's tensors (`assemble.py`), write the file and report."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from trainer.core.shrink_choice import Rule, make_rule
from trainer.core.shrink_errors import NothingToShrink, ShrinkError
from trainer.models.adapter_file import SAVE_DTYPES, write_hashed

from .adapter_layers import ParsedAdapter, parse_adapter, resolve_shape
from .assemble import Assembled, assemble, totals
from .base_model import BaseModel
from .decompose import decompose
from .metadata import shrunk_metadata
from .report import ShrinkReport

_DTYPE_NAMES = {v: k for k, v in SAVE_DTYPES.items()}


def detect_arch(names: list[str], metadata: dict[str, str]) -> str:
    """sd1 | sd2 | sdxl, from key naming first and sd-scripts metadata second."""
    sgm = re.compile(r"^lora_unet_(input_blocks|output_blocks|middle_block)_|^lora_te[12]_")
    if any(sgm.match(n) for n in names) or metadata.get("ss_base_model_version", "").startswith("sdxl"):
        return "sdxl"
    if metadata.get("ss_v2") == "True" or metadata.get("ss_base_model_version", "").startswith("sd_v2"):
        return "sd2"
    return "sd1"


@dataclass
class _Plan:
    """What reading the input settles before any decomposition."""

    source: str
    metadata: dict[str, str]
    tensors: dict[str, Tensor]
    parsed: ParsedAdapter
    save_dtype: torch.dtype
    base_model: BaseModel | None


def shrink_file(
    in_path: str,
    out_path: str,
    *,
    base: str | None,
    rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    recipe: str | None = None,
    max_rank: int | None = None,
    save_precision: str | None = None,
    device: str = "cpu",
    plot_path: str | None = None,
    report_names: dict[str, str | None] | None = None,
) -> ShrinkReport:
    """Shrink one adapter file; returns the report (also stored in the output's header).
    `report_names` ({"input", "output", "base"}) replaces the local paths the report names, so a job's
    report says which of its files and models it means and nothing about the machine it ran on."""
    report_names = report_names or {}
    t_start = time.perf_counter()
    rule = make_rule(rank, method, param, recipe, max_rank)
    _check_arguments(in_path, out_path, save_precision, device)
    metadata, tensors = _read(str(in_path))
    t_read = time.perf_counter()
    plan = _plan(str(in_path), metadata, tensors, rule, save_precision, base)
    dec = decompose(rule, plan.parsed.layers, plan.base_model, plan.save_dtype, torch.device(device), plan.source)
    out = assemble(plan.parsed, dec, plan.save_dtype, plan.source)
    t_norms = plan.base_model.seconds_reading if plan.base_model is not None else 0.0
    t_svd = time.perf_counter()
    summary = totals(plan.tensors, out)

    def build_report(timings: dict[str, float]) -> ShrinkReport:
        return ShrinkReport(
            input=report_names.get("input") or plan.source,
            output=report_names.get("output") or str(out_path),
            base=report_names.get("base", str(base) if base else None),
            rule=rule.kind, rank=rule.rank, method=rule.method, param=rule.param,
            recipe=rule.recipe.text if rule.recipe else None, threshold=dec.threshold, max_rank=rule.max_rank,
            save_precision=_DTYPE_NAMES[plan.save_dtype], device=device, layers=out.rows,
            passthrough=out.passthrough, totals=summary, timings_s=timings,
        )

    timings = {
        "read": round(t_read - t_start, 4),
        "decompose_and_select": round(t_svd - t_read, 4),  # base norms included
        "base_norms_thread_s": round(t_norms, 4),  # summed over worker threads
    }
    _write(plan, out, build_report(timings), out_path)
    timings["write"] = round(time.perf_counter() - t_svd, 4)
    timings["total"] = round(time.perf_counter() - t_start, 4)
    report = build_report(timings)
    if plot_path:
        from .plot import plot_report

        plot_report(report, plot_path)
    return report


def _check_arguments(in_path: str, out_path: str, save_precision: str | None, device: str) -> None:
    if save_precision is not None and save_precision not in SAVE_DTYPES:
        raise ShrinkError(f"--save-precision must be one of fp16, bf16, fp32 (got '{save_precision}')")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShrinkError("--device cuda: no CUDA device is available here; use --device cpu")
    if Path(out_path).resolve() == Path(in_path).resolve():
        raise ShrinkError(f"-o {out_path}: the output would overwrite the input; choose another path")


def _read(source: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The input's header metadata and tensors."""
    try:
        with safe_open(source, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = safetensors.torch.load_file(source)
    except FileNotFoundError:
        raise ShrinkError(f"{source}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ShrinkError(f"{source}: not a readable .safetensors file ({e})") from e
    return metadata, tensors


def _plan(source: str, metadata: dict[str, str], tensors: dict[str, Tensor], rule: Rule,
          save_precision: str | None, base: str | None) -> _Plan:
    """The input's layers with their shapes resolved, the save precision and the base model."""
    parsed = parse_adapter(tensors, source=source)
    if not parsed.layers:
        kinds = sorted(set(parsed.passthrough_kinds.values())) or ["none"]
        raise NothingToShrink(
            f"{source}: no low-rank-convertible layer (found only: {', '.join(kinds)}); nothing to shrink"
        )
    float_dtypes = [t.dtype for t in tensors.values() if t.is_floating_point()]
    save_dtype = SAVE_DTYPES[save_precision] if save_precision else max(
        set(float_dtypes), key=float_dtypes.count
    )
    arch = detect_arch([layer.name for layer in parsed.layers], metadata)
    base_model = BaseModel(base) if base else None
    needs_base = rule.kind == "recipe" and rule.recipe.needs_base
    if needs_base and base_model is None:
        raise ShrinkError(
            f"--recipe '{rule.recipe.text}' compares against the base model: pass --base CHECKPOINT"
            " (SGM .safetensors or diffusers folder), or use --rank / --method instead"
        )
    for layer in parsed.layers:
        base_shape = base_model.shape(layer.name) if base_model else None
        if base_model is not None and base_shape is None and needs_base:
            base_model.weight(layer.name)  # raises the "no base weight for layer" error
        resolve_shape(layer, base_shape, arch, source)
    return _Plan(source, metadata, tensors, parsed, save_dtype, base_model)


def _write(plan: _Plan, out: Assembled, report: ShrinkReport, out_path: str) -> None:
    """The shrunk file, its header carrying `report`; and the base model's norm cache."""
    layers = plan.parsed.layers
    header = shrunk_metadata(
        plan.metadata,
        out.tensors,
        report,
        old_dim=plan.metadata.get("ss_network_dim") or str(max(layer.nominal_rank for layer in layers)),
        ranks=[r.new_rank for r in out.rows if r.new_rank],
        alphas=out.alphas,
        converted_lycoris=any(layer.algo != "lora" for layer in layers),
        conv_ranks=out.conv_ranks,
    )
    write_hashed(out.tensors, out_path, header, file_sha256=False)
    if plan.base_model is not None:
        plan.base_model.save_cache()
