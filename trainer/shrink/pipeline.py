"""`shrink_file`: read an adapter, pick each layer's rank, re-factor it exactly, write a plain LoRA."""

from __future__ import annotations

import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from trainer.models.adapter_file import SAVE_DTYPES, write_hashed
from trainer.core.host import cyclic_gc_paused, usable_cores

from . import blas
from .adapter_layers import AdapterLayer, parse_adapter, reductions_of, resolve_shape, spectra_of, spectrum_of
from .base_model import BaseModel
from trainer.core.shrink_errors import NothingToShrink, ShrinkError
from .metadata import shrunk_metadata
from trainer.core.shrink_choice import Recipe, Rule, make_rule
from .rank_rules import (
    MIN_SV,
    LayerRefs,
    recipe_scores_many,
    recipe_threshold,
    sd_scripts_ranks,
)
from .report import LayerRow, ShrinkReport, ShrinkTotals
from .spectrum import Spectrum, kept_factors

_DTYPE_NAMES = {v: k for k, v in SAVE_DTYPES.items()}




def detect_arch(names: list[str], metadata: dict[str, str]) -> str:
    """sd1 | sd2 | sdxl, from key naming first and sd-scripts metadata second."""
    sgm = re.compile(r"^lora_unet_(input_blocks|output_blocks|middle_block)_|^lora_te[12]_")
    if any(sgm.match(n) for n in names) or metadata.get("ss_base_model_version", "").startswith("sdxl"):
        return "sdxl"
    if metadata.get("ss_v2") == "True" or metadata.get("ss_base_model_version", "").startswith("sd_v2"):
        return "sd2"
    return "sd1"


def _bad_values(layer: AdapterLayer, source: str) -> ShrinkError:
    return ShrinkError(
        f"{source}: layer '{layer.name}' holds NaN/inf values (a diverged or fp16-overflowed training);"
        " there is nothing sound to shrink"
    )


def _spectrum(layer: AdapterLayer, device: torch.device, source: str) -> Spectrum:
    """The layer's exact spectrum; NaN/inf anywhere in its factors shows up in σ (or stops LAPACK)."""
    try:
        spec = spectrum_of(layer.structure(device))
    except RuntimeError as e:  # e.g. "linalg.svd: The algorithm failed to converge"
        raise _bad_values(layer, source) from e
    if not bool(torch.isfinite(spec.S).all()):
        raise _bad_values(layer, source)
    return spec


@contextmanager
def _failing_layer_named(layers: list[AdapterLayer], device: torch.device, source: str):
    """When LAPACK stops on a batch, the layers are redone one by one so that the error names the
    layer at fault."""
    try:
        yield
    except RuntimeError:
        for layer in layers:
            _spectrum(layer, device, source)
        raise


def _require_finite(layers: list[AdapterLayer], spectra: list[Spectrum], source: str) -> None:
    for layer, spec in zip(layers, spectra):
        if not bool(torch.isfinite(spec.S).all()):
            raise _bad_values(layer, source)


def _spectra(layers: list[AdapterLayer], device: torch.device, source: str, map_fn=map) -> list[Spectrum]:
    """Every layer's exact spectrum, decomposed together (`spectra_of`, batches through `map_fn`)."""
    with _failing_layer_named(layers, device, source):
        spectra = spectra_of([layer.structure(device, dtype=None) for layer in layers], map_fn)
    _require_finite(layers, spectra, source)
    return spectra


def _reduce(rule: Rule, layers: list[AdapterLayer], base: BaseModel | None, save_dtype: torch.dtype,
            device: torch.device, source: str, map_fn=map) -> tuple[list[Spectrum], list[Tensor], list[Tensor], list]:
    """Spectra, kept components (on the CPU), their weights √σ and the kept factors of every layer, for
    rules that decide each layer on its own: the rule runs on each batch as soon as it is decomposed
    (`reductions_of`), so the kept factors are formed while the batch's factors are at hand."""

    def select(positions: list[int], spectra: list[Spectrum]) -> list[tuple[Tensor, Tensor]]:
        batch = [layers[i] for i in positions]
        _require_finite(batch, spectra, source)
        # Already on a pool thread: the base-model reads of this batch run here, not through the pool.
        keeps, _ = _choose(rule, batch, spectra, _padded([spec.S.cpu() for spec in spectra]), base, save_dtype)
        return [(keep.to(spec.S.device), _roots(layer, spec, keep.to(spec.S.device), rule))
                for layer, spec, keep in zip(batch, spectra, keeps)]

    with _failing_layer_named(layers, device, source):
        reduced = reductions_of([layer.structure(device, dtype=None) for layer in layers], select, save_dtype, map_fn)
    return ([spec for spec, _, _ in reduced], [kept[0].cpu() for _, kept, _ in reduced],
            [kept[1] for _, kept, _ in reduced], [pair for _, _, pair in reduced])


def _roots(layer: AdapterLayer, spec: Spectrum, keep: Tensor, rule: Rule) -> Tensor:
    """√σ of the kept components, in the output's scale: each shrunk factor carries one √σ."""
    rescale = rule.recipe.rescale if rule.recipe else 1.0
    return torch.sqrt(spec.S[keep] * (rescale / layer.output_scale))


def _layer_refs(layer: AdapterLayer, spec: Spectrum, recipe: Recipe, base: BaseModel | None) -> LayerRefs:
    out, in_flat = layer.weight_shape[0], math.prod(layer.weight_shape[1:])
    refs = LayerRefs(out_features=out, in_features=in_flat)
    w = recipe.weights
    if not recipe.needs_base:
        return refs
    assert base is not None
    if abs(w["fro_ckpt"]) > 1e-6:
        refs.fro_ckpt = base.frobenius_norm(layer.name)
    if abs(w["spn_ckpt"]) > 1e-6:
        refs.spn_ckpt = base.spectral_norm(layer.name)
    if abs(w["subspace"]) > 1e-6:
        u, vh = spec.vectors(torch.arange(len(spec.S), device=spec.S.device))
        w_base = base.weight(layer.name).to(device=u.device, dtype=u.dtype).flatten(1)
        refs.subspace = torch.linalg.vecdot(vh @ w_base.T, u.T).abs()
    return refs


def _worker_threads() -> int:
    """Threads that share the work out: one per core. Each task is a few large operations that release
    the GIL (a batch of same-shaped layers, or reading one base weight and its norm); per-layer small
    operations on two threads measured slower than on one, because of the GIL hand-offs between them."""
    limit = int(os.environ.get("LATHE_SHRINK_WORKERS", "0") or 0)
    return max(1, min(limit or usable_cores(), 8))


def _choose(rule: Rule, layers: list[AdapterLayer], spectra: list[Spectrum], S: Tensor, base: BaseModel | None,
            save_dtype: torch.dtype, map_fn=map) -> tuple[list[Tensor], float | None]:
    """The components each layer keeps (indices into its σ, on the CPU), and the recipe's threshold.
    S: the layers' spectra as one zero-padded matrix (`_padded`)."""
    if rule.kind != "recipe":  # sd-scripts decomposes up@down without alpha/dim: its σ are unscaled
        scales = torch.tensor([abs(layer.scale) or 1.0 for layer in layers], dtype=S.dtype)[:, None]
        ranks = sd_scripts_ranks(S / scales, [len(spec.S) for spec in spectra], rank=rule.rank, method=rule.method,
                                 param=rule.param, max_rank=rule.max_rank)
        return [torch.arange(rank) for rank in ranks], None
    recipe = rule.recipe
    # Base-model references are large reads and norms (they release the GIL): through the pool.
    refs = list(map_fn(lambda item: _layer_refs(*item, recipe, base), zip(layers, spectra)))
    zero = S[:, 0] < MIN_SV if S.shape[1] else torch.ones(len(layers), dtype=torch.bool)  # resize_lora drops these
    scores = recipe_scores_many(S, recipe, refs)
    if recipe.size_mib is None:
        threshold = recipe.threshold
    else:  # a size target needs every layer's scores before any cut
        elem = torch.finfo(save_dtype).bits // 8
        live = [i for i in range(len(layers)) if not zero[i]]
        threshold = recipe_threshold(
            [scores[i, : len(spectra[i].S)] for i in live],
            [elem * (refs[i].out_features + refs[i].in_features) for i in live],
            [len(spectra[i].S) for i in live],
            recipe,
        )
    keep = (scores > threshold) & ~zero[:, None]
    if rule.max_rank is not None:
        keep &= keep.cumsum(1) <= rule.max_rank
    columns = keep.nonzero()[:, 1]
    return list(columns.split(keep.sum(1).tolist())), threshold


def _padded(rows: list[Tensor]) -> Tensor:
    """Rows of different lengths as one matrix, zero-padded, in the widest of their dtypes."""
    dtype = torch.float32
    for row in rows:
        dtype = torch.promote_types(dtype, row.dtype)
    return torch.nn.utils.rnn.pad_sequence([row.to(dtype) for row in rows], batch_first=True)


def _energies(S: Tensor, keeps: list[Tensor]) -> tuple[list[float], list[float], list[float]]:
    """Each layer's Σσ², and the parts of it its kept and its dropped components carry (float64, for the
    report; the dropped part is summed, not subtracted, so a tiny truncation error stays exact)."""
    sq = S.double().square()
    kept = torch.zeros_like(sq, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(len(keeps)), torch.tensor([k.numel() for k in keeps], dtype=torch.long))
    if rows.numel():
        kept[rows, torch.cat(keeps)] = True
    return sq.sum(1).tolist(), (sq * kept).sum(1).tolist(), (sq * ~kept).sum(1).tolist()


def _may_vanish(root_sq: float, up: Tensor, down: Tensor, dtype: torch.dtype) -> bool:
    """Whether a shrunk factor could be all zeros once cast to `dtype`. Both factors have squared
    Frobenius norm Σ√σ² = `root_sq` (orthonormal vectors scaled by √σ), so some entry is at least
    √(root_sq / numel); when that clears twice the smallest subnormal, the cast keeps it nonzero."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return root_sq / max(up.numel(), down.numel()) <= (2 * tiny) ** 2


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
    # A full collection walks every object torch's import left behind (~0.1 s here) and a shrink
    # allocates enough to trigger one; it builds no reference cycles, so the collector waits.
    with cyclic_gc_paused():
        return _shrink_file(in_path, out_path, base=base, rank=rank, method=method, param=param, recipe=recipe,
                            max_rank=max_rank, save_precision=save_precision, device=device, plot_path=plot_path,
                            report_names=report_names or {})


def _shrink_file(in_path: str, out_path: str, *, base: str | None, rank: int | None, method: str | None,
                 param: float | None, recipe: str | None, max_rank: int | None, save_precision: str | None,
                 device: str, plot_path: str | None, report_names: dict[str, str | None]) -> ShrinkReport:
    t_start = time.perf_counter()
    rule = make_rule(rank, method, param, recipe, max_rank)
    if save_precision is not None and save_precision not in SAVE_DTYPES:
        raise ShrinkError(f"--save-precision must be one of fp16, bf16, fp32 (got '{save_precision}')")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShrinkError("--device cuda: no CUDA device is available here; use --device cpu")
    if Path(out_path).resolve() == Path(in_path).resolve():
        raise ShrinkError(f"-o {out_path}: the output would overwrite the input; choose another path")
    source = str(in_path)
    try:
        with safe_open(source, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = safetensors.torch.load_file(source)
    except FileNotFoundError:
        raise ShrinkError(f"{source}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ShrinkError(f"{source}: not a readable .safetensors file ({e})") from e
    t_read = time.perf_counter()

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
    if rule.kind == "recipe" and rule.recipe.needs_base and base_model is None:
        raise ShrinkError(
            f"--recipe '{rule.recipe.text}' compares against the base model: pass --base CHECKPOINT"
            " (SGM .safetensors or diffusers folder), or use --rank / --method instead"
        )
    for layer in parsed.layers:
        base_shape = base_model.shape(layer.name) if base_model else None
        if base_model is not None and base_shape is None and rule.kind == "recipe" and rule.recipe.needs_base:
            base_model.weight(layer.name)  # raises the "no base weight for layer" error
        resolve_shape(layer, base_shape, arch, source)

    compute = torch.device(device)
    with ThreadPoolExecutor(max_workers=_worker_threads()) as pool, blas.single_threaded_blas():
        if rule.kind != "recipe" or rule.recipe.size_mib is None:  # each layer's rank is its own affair
            spectra, keeps, roots, factors = _reduce(rule, parsed.layers, base_model, save_dtype, compute, source,
                                                     pool.map)
            threshold = rule.recipe.threshold if rule.recipe else None
            padded = _padded([spec.S.cpu() for spec in spectra])
        else:  # a size target weighs every layer's spectrum before any cut
            spectra = _spectra(parsed.layers, compute, source, pool.map)
            padded = _padded([spec.S.cpu() for spec in spectra])
            keeps, threshold = _choose(rule, parsed.layers, spectra, padded, base_model, save_dtype, pool.map)
            roots = [_roots(layer, spec, keep.to(spec.S.device), rule)
                     for layer, spec, keep in zip(parsed.layers, spectra, keeps)]
            factors = kept_factors([(spec, keep.to(spec.S.device), root) for spec, keep, root in zip(spectra, keeps, roots)],
                                   save_dtype, pool.map)
    old_ranks = [len(spec.S) for spec in spectra]
    energies, kept_energies, dropped_energies = _energies(padded, keeps)
    del spectra  # they hold float32 copies of every factor

    out_tensors: dict[str, Tensor] = {}
    rows: list[LayerRow] = []
    kept_alphas: list[float] = []
    conv_ranks: list[int] = []
    total_sq = kept_sq = 0.0
    for layer, keep, root, (up, down), old_rank, energy, kept_i, dropped_i in zip(
        parsed.layers, keeps, roots, factors, old_ranks, energies, kept_energies, dropped_energies
    ):
        new_rank = int(keep.numel())
        if new_rank:
            up, down = up.to("cpu"), down.to("cpu")  # no-ops unless the work ran on a GPU
            out, inn, *kernel = layer.weight_shape
            if kernel:
                down = down.reshape(new_rank, inn, *kernel)
                up = up.reshape(out, new_rank, *([1] * len(kernel)))
            if _may_vanish(float(root.square().sum()), up, down, save_dtype) and not (bool(down.any()) and bool(up.any())):
                new_rank, kept_i, dropped_i = 0, 0.0, energy  # all zeros in the save precision
            else:
                alpha = layer.output_scale * new_rank
                out_tensors[f"{layer.name}.alpha"] = torch.tensor(alpha, dtype=save_dtype)
                out_tensors[f"{layer.name}.lora_down.weight"] = down
                out_tensors[f"{layer.name}.lora_up.weight"] = up
                kept_alphas.append(alpha)
                if layer.is_conv:
                    conv_ranks.append(new_rank)
        rows.append(LayerRow(
            name=layer.name, algo=layer.algo, old_rank=old_rank, new_rank=new_rank,
            retained_fro=math.sqrt(kept_i / energy) if energy > 0 else 1.0,
            rel_error=math.sqrt(dropped_i / energy) if energy > 0 else 0.0,
        ))
        total_sq += energy
        kept_sq += kept_i
    t_norms = base_model.seconds_reading if base_model is not None else 0.0
    t_svd = time.perf_counter()

    passthrough_names: list[str] = []
    for key, value in parsed.passthrough.items():
        if key.endswith(".on_input"):
            continue  # copied with its IA3 weight below
        if value.is_floating_point() and not value.any():
            continue  # an all-zero IA3/norm/bias delta changes nothing
        out_tensors[key] = value.to(save_dtype) if value.is_floating_point() else value
        passthrough_names.append(key)
        flag = key.rsplit(".", 1)[0] + ".on_input"
        if key.endswith(".weight") and flag in parsed.passthrough:
            out_tensors[flag] = parsed.passthrough[flag]
    if not any(k.endswith(".lora_down.weight") for k in out_tensors):
        raise NothingToShrink(
            f"{source}: every layer's rank came out 0 with this rule; loosen it (a lower thr, a higher"
            " --param, or --rank N)"
        )

    bytes_in = sum(t.numel() * t.element_size() for t in tensors.values())
    bytes_out = sum(t.numel() * t.element_size() for t in out_tensors.values())
    rel_errors = [r.rel_error for r in rows]
    totals = ShrinkTotals(
        layers_in=len(rows),
        layers_out=sum(1 for r in rows if r.new_rank > 0),
        layers_omitted=sum(1 for r in rows if r.new_rank == 0),
        passthrough_keys=len(passthrough_names),
        params_in=sum(t.numel() for t in tensors.values()),
        params_out=sum(t.numel() for t in out_tensors.values()),
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        retained_fro=math.sqrt(kept_sq / total_sq) if total_sq > 0 else 1.0,
        rel_error=math.sqrt(max(total_sq - kept_sq, 0.0) / total_sq) if total_sq > 0 else 0.0,
        max_rel_error=max(rel_errors) if rel_errors else 0.0,
    )

    def build_report(timings: dict[str, float]) -> ShrinkReport:
        return ShrinkReport(
            input=report_names.get("input") or source,
            output=report_names.get("output") or str(out_path),
            base=report_names.get("base", str(base) if base else None),
            rule=rule.kind,
            rank=rule.rank,
            method=rule.method,
            param=rule.param,
            recipe=rule.recipe.text if rule.recipe else None,
            threshold=threshold,
            max_rank=rule.max_rank,
            save_precision=_DTYPE_NAMES[save_dtype],
            device=device,
            layers=rows,
            passthrough=passthrough_names,
            totals=totals,
            timings_s=timings,
        )

    timings = {
        "read": round(t_read - t_start, 4),
        "decompose_and_select": round(t_svd - t_read, 4),  # base norms included
        "base_norms_thread_s": round(t_norms, 4),  # summed over worker threads
    }
    old_dim = metadata.get("ss_network_dim") or str(max(layer.nominal_rank for layer in parsed.layers))
    header = shrunk_metadata(
        metadata,
        out_tensors,
        build_report(timings),
        old_dim=old_dim,
        ranks=[r.new_rank for r in rows if r.new_rank],
        alphas=kept_alphas,
        converted_lycoris=any(layer.algo != "lora" for layer in parsed.layers),
        conv_ranks=conv_ranks,
    )
    write_hashed(out_tensors, out_path, header, file_sha256=False)
    if base_model is not None:
        base_model.save_cache()
    timings["write"] = round(time.perf_counter() - t_svd, 4)
    timings["total"] = round(time.perf_counter() - t_start, 4)
    report = build_report(timings)
    if plot_path:
        from .plot import plot_report

        plot_report(report, plot_path)
    return report
