"""The shrink's per-layer phase: every layer's exact spectrum, the components its rank rule keeps, and
those components re-formed as a shrunk LoRA's factors. Same-shaped layers go in batches, shared out
by a thread pool."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.core.host import usable_cores
from trainer.core.settings import trainer_settings
from trainer.core.shrink_choice import Recipe, Rule
from trainer.core.shrink_errors import ShrinkError

from . import blas
from .adapter_layers import AdapterLayer, reductions_of, spectra_of, spectrum_of
from .base_model import BaseModel
from .rank_rules import MIN_SV, LayerRefs, recipe_scores_many, recipe_threshold, sd_scripts_ranks
from .spectrum import Spectrum, kept_factors


@dataclass
class Decomposition:
    """Per layer, in the adapter's layer order: the kept components (indices into its σ, on the CPU),
    their weights √σ, the kept factors (up, down), the old rank, and Σσ² split into its kept and dropped
    parts; plus the recipe's threshold (None for sd-scripts' rules)."""

    keeps: list[Tensor]
    roots: list[Tensor]
    factors: list[tuple[Tensor, Tensor]]
    old_ranks: list[int]
    energies: list[float]
    kept_energies: list[float]
    dropped_energies: list[float]
    threshold: float | None


def decompose(rule: Rule, layers: list[AdapterLayer], base: BaseModel | None, save_dtype: torch.dtype,
              device: torch.device, source: str) -> Decomposition:
    """Every layer's spectrum and kept factors under `rule` (`source` names the file in errors)."""
    with ThreadPoolExecutor(max_workers=_worker_threads()) as pool, blas.single_threaded_blas():
        if rule.kind != "recipe" or rule.recipe.size_mib is None:  # each layer's rank is its own affair
            spectra, keeps, roots, factors = _reduce(rule, layers, base, save_dtype, device, source, pool.map)
            threshold = rule.recipe.threshold if rule.recipe else None
            padded = _padded([spec.S.cpu() for spec in spectra])
        else:  # a size target weighs every layer's spectrum before any cut
            spectra = _spectra(layers, device, source, pool.map)
            padded = _padded([spec.S.cpu() for spec in spectra])
            keeps, threshold = _choose(rule, layers, spectra, padded, base, save_dtype, pool.map)
            roots = [_roots(layer, spec, keep.to(spec.S.device), rule)
                     for layer, spec, keep in zip(layers, spectra, keeps)]
            factors = kept_factors([(spec, keep.to(spec.S.device), root)
                                    for spec, keep, root in zip(spectra, keeps, roots)], save_dtype, pool.map)
    energies, kept_energies, dropped_energies = _energies(padded, keeps)
    return Decomposition(keeps, roots, factors, [len(spec.S) for spec in spectra], energies, kept_energies,
                         dropped_energies, threshold)


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
    limit = trainer_settings().shrink_workers
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
