"""Exact thin SVDs of adapter weight deltas, computed from their factors.

A delta ΔW (out × in, convs flattened to out × in·kh·kw) is never formed when its factors are smaller:
- product ΔW = L·R of inner size k: QR both factors, SVD the k×k core (cost O((out+in)·k²));
- Kronecker ΔW = A ⊗ B: the singular triplets are the pairwise products of those of A and B, so only
  the kept singular vectors are ever built;
- Hadamard of two products (LoHa) is itself a product of inner size k1·k2 (face-splitting product).
Singular vectors are produced only for the components a rank rule keeps (`vectors(idx)`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import blas


class Spectrum:
    """Singular values `S` (descending, ≥ 0) of a delta, and its singular vectors on demand."""

    S: Tensor

    def vectors(self, idx: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(U[:, idx], Vh[idx, :]) so that ΔW ≈ U·diag(S[idx])·Vh for the chosen components; with
        `weights`, U's columns and Vh's rows come multiplied by them (cheaper here than after)."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError


class DenseSpectrum(Spectrum):
    """SVD of a delta given as a matrix (full/`diff` layers, or factors no smaller than ΔW)."""

    def __init__(self, matrix: Tensor, scale: float = 1.0) -> None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self._u = -u if scale < 0 else u
        self._vh = vh
        self.S = s * abs(scale)
        self._shape = (matrix.shape[0], matrix.shape[1])

    def vectors(self, idx: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _weighted(self._u[:, idx], self._vh[idx], weights)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape


class ProductSpectrum(Spectrum):
    """SVD of ΔW = scale · left @ right (left: m × k, right: k × n), from k×k work only.

    Built by `product_spectra`, which picks one of three routes per product (`mode`):
    - "gram32"/"gram64": the R factors of both factors come from Cholesky factorisations of their k×k Gram
      matrices (one GEMM each: far cheaper than Householder QR). The Gram is formed in float32 when
      both factors are well-conditioned once their columns (rows, for the right factor) are scaled to
      unit norm: κ ≤ FP32_GRAM_CONDITION. The float32 rounding of each Gram entry is relative to the
      two norms it multiplies, so it moves each σ by about u·κ² of itself, whatever the spread of the
      norms (a trained LoRA's decaying spectrum lives mostly there) — the round-off a float32 SVD of
      the materialised ΔW has anyway. Other factors up to MAX_CONDITION get a float64 Gram;
    - "qr": Householder QR, for rank-deficient or worse-conditioned factors;
    - "dense": the factors hold at least as many numbers as ΔW, so its plain SVD is the cheap exact path.
    Singular vectors are only formed when asked for, as left·(R_L⁻¹·U_core) and (V_coreᵀ·R_R⁻ᵀ)·right.
    """

    FP32_GRAM_CONDITION = 4.0
    MAX_CONDITION = 1e4

    def __init__(self, left: Tensor, right: Tensor, scale: float, mode: str, core: tuple[Tensor, Tensor, Tensor],
                 bases: tuple[Tensor, Tensor] | None = None) -> None:
        self._shape = (left.shape[0], right.shape[1])
        self._sign = -1.0 if scale < 0 else 1.0
        self._left, self._right = left, right
        self.mode = mode
        self._uc, s, self._vhc = core
        self._bases = bases  # (R_L, R_R) for "gram32"/"gram64", (Q_L, Q_R) for "qr"
        self._dtype = _compute_dtype(left)
        self.S = s.to(self._dtype) * abs(scale)

    def vectors(self, idx: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        uc, vhc = _weighted(self._uc[:, idx], self._vhc[idx], weights)  # k×k: cheap to weight here
        if self.mode in ("gram32", "gram64"):
            # Q_L·u = L·R_L⁻¹·u and vᵀ·Q_Rᵀ = (R_R⁻ᵀ·v)ᵀ·R, solved on the k×k blocks.
            r_left, r_right = self._bases
            x = torch.linalg.solve_triangular(r_left, uc, upper=True)
            y = torch.linalg.solve_triangular(r_right, vhc.T, upper=True)
            u = self._left.to(self._dtype) @ x.to(self._dtype)
            vh = y.T.to(self._dtype) @ self._right.to(self._dtype)
        elif self.mode == "qr":
            q_left, q_right = self._bases
            u, vh = q_left @ uc, vhc @ q_right.T
        else:
            u, vh = uc, vhc
        return (u * self._sign if self._sign < 0 else u), vh

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape


def product_spectrum(left: Tensor, right: Tensor, scale: float = 1.0) -> ProductSpectrum:
    return product_spectra([(left, right, scale)])[0]


# float32 bytes of the factors one batch stacks: bounds the memory a batch holds, and splits a file into
# enough batches for a pool of threads to share.
BATCH_BYTES = 8 << 20


def product_spectra(products: Sequence[tuple[Tensor, Tensor, float]], map_fn: Callable = map) -> list[ProductSpectrum]:
    """The spectrum of each (left, right, scale). Products of one shape are decomposed together: their
    factors stacked and upcast once, the Gram products and the k×k work (condition check, Cholesky,
    core SVD) done as batched calls. Each batch goes through `map_fn`: batches are a few large
    operations that release the GIL, so a pool of threads can share them out."""
    out: list[ProductSpectrum | None] = [None] * len(products)
    for i, (left, right, scale) in enumerate(products):
        if _no_smaller_than_delta(left, right):  # the plain SVD of ΔW is the cheap exact path
            dtype = _compute_dtype(left)
            core = torch.linalg.svd(left.to(dtype) @ right.to(dtype), full_matrices=False)
            out[i] = ProductSpectrum(left, right, scale, "dense", core)
    batches = _product_batches(products)
    for idx, spectra in zip(batches, map_fn(lambda idx: _gram_spectra([products[i] for i in idx]), batches)):
        for i, spec in zip(idx, spectra):
            out[i] = spec
    return out  # type: ignore[return-value]


def _no_smaller_than_delta(left: Tensor, right: Tensor) -> bool:
    """Whether the factors' rank k reaches min(m, n): then ΔW itself is no bigger than its factors."""
    return left.shape[1] >= min(left.shape[0], right.shape[1])


def _vectors_in(spec: Spectrum, idx: Tensor, weights: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`spec.vectors(idx, weights)` cast to `dtype`, each a contiguous tensor of its own."""
    u, vh = spec.vectors(idx, weights)
    return u.to(dtype).contiguous(), vh.to(dtype).contiguous()


def _product_batches(products: Sequence[tuple[Tensor, Tensor, float]]) -> list[list[int]]:
    """Indices of the products to decompose together: one shape (and dtype, device) per batch, at most
    BATCH_BYTES of float32 factors each. Products whose factors are no smaller than ΔW are left out."""
    groups: dict[tuple, list[int]] = {}
    for i, (left, right, _) in enumerate(products):
        (m, k), n = left.shape, right.shape[1]
        if not _no_smaller_than_delta(left, right):
            groups.setdefault((m, k, n, left.dtype, right.dtype, left.device), []).append(i)
    return [batch for (m, k, n, *_), idx in groups.items() for batch in _batches(idx, 4 * k * (m + n))]


def _batches(items: list, item_bytes: int) -> list[list]:
    size = max(1, BATCH_BYTES // max(item_bytes, 1))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _gram_spectra(products: list[tuple[Tensor, Tensor, float]]) -> list[ProductSpectrum]:
    return _decompose(products)[0]


def _decompose(products: list[tuple[Tensor, Tensor, float]]) -> tuple[list[ProductSpectrum], Tensor, Tensor]:
    """Spectra of products of one shape, from float32 Grams where both factors are well-conditioned
    (see `ProductSpectrum`); the others are redone one by one (`_careful_spectrum`). Also returns the
    batch's factors stacked in float32, for `_gram_vectors` to reuse while they are at hand."""
    left = _stacked([p[0] for p in products], "left")
    right = _stacked([p[1] for p in products], "right")
    g_left, g_right = left.mT @ left, right @ right.mT
    finite = torch.isfinite(g_left).flatten(1).all(1) & torch.isfinite(g_right).flatten(1).all(1)
    if not bool(finite.all()):  # NaN/inf factors: an identity stands in, the careful path reports them
        eye = torch.eye(g_left.shape[-1], dtype=g_left.dtype, device=g_left.device)
        g_left = torch.where(finite[:, None, None], g_left, eye)
        g_right = torch.where(finite[:, None, None], g_right, eye)
    conditioned = finite & _well_conditioned(g_left) & _well_conditioned(g_right)
    r_left, info_left = torch.linalg.cholesky_ex(g_left, upper=True)
    r_right, info_right = torch.linalg.cholesky_ex(g_right, upper=True)
    conditioned &= (info_left == 0) & (info_right == 0)
    uc, s, vhc = torch.linalg.svd(r_left @ r_right.mT)
    spectra = [
        ProductSpectrum(l_j, r_j, scale, "gram32", (uc[j], s[j], vhc[j]), (r_left[j], r_right[j]))
        if ok else _careful_spectrum(l_j, r_j, scale)
        for j, ((l_j, r_j, scale), ok) in enumerate(zip(products, conditioned.tolist()))
    ]
    return spectra, left, right


_workspace = threading.local()


def _stacked(factors: list[Tensor], slot: str) -> Tensor:
    """The factors stacked in float32 into this thread's reusable buffer `slot` (valid until the thread
    stacks its next batch). A fresh buffer per batch would cost a page fault per 4 KiB on first touch."""
    shape = (len(factors), *factors[0].shape)
    numel = math.prod(shape)
    key = (slot, factors[0].device)
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None:
        buffers = _workspace.buffers = {}
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:  # (numpy views make a storage non-resizable: a new one)
        buffer = buffers[key] = torch.empty(numel, dtype=torch.float32, device=factors[0].device)
    return torch.stack(factors, out=buffer[:numel].view(shape))


# What a rank rule keeps of a spectrum: (indices into its σ, a weight per kept component).
Kept = tuple[Tensor, Tensor]


def reduce_products(products: Sequence[tuple[Tensor, Tensor, float]],
                    select: Callable[[list[int], list[ProductSpectrum]], list[Kept]],
                    dtype: torch.dtype, map_fn: Callable = map) -> list[tuple[ProductSpectrum, Kept, tuple[Tensor, Tensor]]]:
    """`product_spectra` and `kept_factors` in one pass over each batch, for rank rules that decide
    each layer on its own: `select(positions, spectra)` is called on every batch (positions index
    `products`) and names what each product keeps; the kept factors are then formed from the batch's
    float32 factors while they are still at hand (in cache, not stacked and converted a second time).
    Returns (spectrum, kept, (U, Vh) in `dtype`) per product."""
    out: list = [None] * len(products)
    rest = [i for i, (left, right, _) in enumerate(products) if _no_smaller_than_delta(left, right)]
    dense = product_spectra([products[i] for i in rest])  # "dense": nothing to batch
    for i, spec, kept in zip(rest, dense, select(rest, dense) if rest else []):
        out[i] = (spec, kept, _vectors_in(spec, *kept, dtype))
    batches = _product_batches(products)

    def reduce(idx: list[int]) -> list:
        spectra, left, right = _decompose([products[i] for i in idx])
        kept = select(idx, spectra)
        factors: list = [None] * len(idx)
        gram = [j for j, s in enumerate(spectra) if s.mode == "gram32" and kept[j][0].numel()]
        for j in sorted(set(range(len(idx))) - set(gram)):
            factors[j] = _vectors_in(spectra[j], *kept[j], dtype)
        if gram:
            stacked = None
            if spectra[0]._dtype == left.dtype:  # float32 work: the stacked factors are the ones to use
                stacked = ([left[j] for j in gram], [right[j] for j in gram])
            formed = _gram_vectors([(spectra[j], *kept[j]) for j in gram], dtype, stacked)
            for j, pair in zip(gram, formed):
                factors[j] = pair
        return list(zip(spectra, kept, factors))

    for idx, results in zip(batches, map_fn(reduce, batches)):
        for i, result in zip(idx, results):
            out[i] = result
    return out


def kept_factors(requests: Sequence[tuple[Spectrum, Tensor, Tensor]], dtype: torch.dtype,
                 map_fn: Callable = map) -> list[tuple[Tensor, Tensor]]:
    """For each (spectrum, kept indices, weights): `vectors(idx, weights)` cast to `dtype`, each a
    tensor of its own (safetensors refuses to save views of one buffer).

    Gram-route products of one shape are formed together, in batches through `map_fn`, layers sorted by
    kept width."""
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, (spec, idx, weights) in enumerate(requests):
        if isinstance(spec, ProductSpectrum) and spec.mode in ("gram32", "gram64") and idx.numel():
            left, right = spec._left, spec._right
            groups.setdefault((spec.mode, *left.shape, right.shape[1], left.dtype, right.dtype, left.device), []).append(i)
        else:
            out[i] = _vectors_in(spec, idx, weights, dtype)
    batches = []
    for (_, m, k, n, *_), idx in groups.items():
        idx.sort(key=lambda i: requests[i][1].numel())
        batches += _batches(idx, 4 * (m + n) * (k + requests[idx[-1]][1].numel()))
    for idx, factors in zip(batches, map_fn(lambda idx: _gram_vectors([requests[i] for i in idx], dtype), batches)):
        for i, pair in zip(idx, factors):
            out[i] = pair
    return out  # type: ignore[return-value]


def _gram_vectors(requests: list[tuple[ProductSpectrum, Tensor, Tensor]], dtype: torch.dtype,
                  factors: tuple[list[Tensor], list[Tensor]] | None = None) -> list[tuple[Tensor, Tensor]]:
    """`kept_factors` for Gram-route products of one shape: U = L·(R_L⁻¹·U_c·w), Vh = (R_R⁻ᵀ·V_c·w)ᵀ·R.
    The k×k work is batched (kept columns padded to the widest, with weight 0); each layer's two
    products run at its own width. `factors`: each layer's (left, right) already in the compute dtype."""
    specs = [r[0] for r in requests]
    widths = [int(r[1].numel()) for r in requests]
    core = specs[0]._uc.dtype
    pad = torch.nn.utils.rnn.pad_sequence
    idx = pad([r[1].to(specs[0]._uc.device) for r in requests], batch_first=True)  # padding: column 0, weight 0
    weights = pad([r[2].to(core) for r in requests], batch_first=True)
    uc = torch.stack([s._uc for s in specs])
    vhc = torch.stack([s._vhc for s in specs])
    k, width = uc.shape[-1], idx.shape[1]
    uc = uc.gather(2, idx[:, None, :].expand(-1, k, width)) * weights[:, None, :]
    vc = vhc.gather(1, idx[:, :, None].expand(-1, width, k)).mT * weights[:, None, :]
    x = torch.linalg.solve_triangular(torch.stack([s._bases[0] for s in specs]), uc, upper=True)
    y = torch.linalg.solve_triangular(torch.stack([s._bases[1] for s in specs]), vc, upper=True)
    compute = specs[0]._dtype
    if any(s._sign < 0 for s in specs):
        x = x * torch.tensor([s._sign for s in specs], dtype=x.dtype, device=x.device)[:, None, None]
    lefts, rights = factors or ([s._left.to(compute) for s in specs], [s._right.to(compute) for s in specs])
    x, y_t = x.to(compute), y.mT.to(compute)
    u = blas.matmuls(lefts, [x[j, :, :w] for j, w in enumerate(widths)])
    vh = blas.matmuls([y_t[j, :w] for j, w in enumerate(widths)], rights)
    return [(a.to(dtype), b.to(dtype)) for a, b in zip(u, vh)]


def _compute_dtype(factor: Tensor) -> torch.dtype:
    """float32, or the factor's own dtype when wider (fp16/bf16 factors are upcast as they are used)."""
    return torch.promote_types(factor.dtype, torch.float32)


def _well_conditioned(grams: Tensor) -> Tensor:
    """Whether each factor, its columns scaled to unit norm, has κ² ≤ FP32_GRAM_CONDITION²: the eigenvalue
    ratio of its unit-diagonal Gram C. Float32 rounding moves those eigenvalues by ≈ u, so a ratio
    ≤ 16 measured here is a ratio ≤ 16 in truth.

    A cheap sufficient test settles most factors: λ_max(C) ≤ ‖C‖_∞ (its largest absolute row sum), and
    a Cholesky factorisation of C − t·I succeeds only if λ_min(C) > t; with t = ‖C‖_∞/16 (and a margin for
    the factorisation's own rounding) that proves the ratio. The rest get their eigenvalues computed."""
    limit = ProductSpectrum.FP32_GRAM_CONDITION**2
    norms = grams.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(grams.dtype).tiny).sqrt()
    scaled = grams / (norms[:, :, None] * norms[:, None, :])  # the Gram of the factor with unit-norm columns
    shift = 1.01 * scaled.abs().sum(-1).amax(-1) / limit
    eye = torch.eye(scaled.shape[-1], dtype=scaled.dtype, device=scaled.device)
    proven = torch.linalg.cholesky_ex(scaled - shift[:, None, None] * eye).info == 0
    if not bool(proven.all()):
        rest = ~proven
        proven[rest] = _eigenvalue_ratio(scaled[rest]) <= limit
    return proven


def _eigenvalue_ratio(symmetric: Tensor) -> Tensor:
    """λ_max/λ_min of each matrix in the batch; inf where it is not positive definite."""
    eig = torch.linalg.eigvalsh(symmetric)
    low, high = eig[:, 0], eig[:, -1]
    return torch.where(low > 0, high / low.clamp_min(torch.finfo(eig.dtype).tiny), torch.full_like(low, math.inf))


def _careful_spectrum(left: Tensor, right: Tensor, scale: float) -> ProductSpectrum:
    """One product whose factors are too ill-conditioned for a float32 Gram: float64 Gram while κ stays
    below MAX_CONDITION, Householder QR beyond (or for rank-deficient factors)."""
    r_left, r_right = _cholesky_r(left.T), _cholesky_r(right)
    if r_left is not None and r_right is not None:
        uc, s, vhc = torch.linalg.svd(r_left @ r_right.T)
        return ProductSpectrum(left, right, scale, "gram64", (uc, s, vhc), (r_left, r_right))
    dtype = _compute_dtype(left)
    q_left, ru = torch.linalg.qr(left.to(dtype))
    q_right, rd = torch.linalg.qr(right.T.to(dtype))
    return ProductSpectrum(left, right, scale, "qr", torch.linalg.svd(ru @ rd.T), (q_left, q_right))


def _cholesky_r(factor: Tensor) -> Tensor | None:
    """Upper-triangular R with Rᵀ·R = factor·factorᵀ (factor: k × n), in float64; None when the
    factor is (near) rank-deficient, where the Gram matrix would lose float32 accuracy."""
    wide = factor.to(torch.float64)
    gram = wide @ wide.T
    chol, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) != 0:
        return None
    diagonal = chol.diagonal().abs()
    if float(diagonal.min()) * ProductSpectrum.MAX_CONDITION < float(diagonal.max()):
        return None
    return chol


class KronSpectrum(Spectrum):
    """SVD of ΔW = scale · A ⊗ B: σ = σ_A(i)·σ_B(j), u = u_A(i) ⊗ u_B(j), v = v_A(i) ⊗ v_B(j)."""

    def __init__(self, a: Spectrum, b: Spectrum, scale: float = 1.0) -> None:
        self._a, self._b = a, b
        self._sign = -1.0 if scale < 0 else 1.0
        products = torch.outer(a.S, b.S).flatten() * abs(scale)
        self.S, self._pair = torch.sort(products, descending=True)
        (ma, na), (mb, nb) = a.shape, b.shape
        self._shape = (ma * mb, na * nb)

    def vectors(self, idx: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pair = self._pair[idx]
        nb = self._b.S.shape[0]
        ua, vha = self._a.vectors(pair // nb)
        ub, vhb = self._b.vectors(pair % nb)
        k = pair.shape[0]
        u = (ua[:, None, :] * ub[None, :, :]).reshape(-1, k)
        vh = (vha[:, :, None] * vhb[:, None, :]).reshape(k, -1)
        return _weighted(u * self._sign if self._sign < 0 else u, vh, weights)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape


def _weighted(u: Tensor, vh: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    if weights is None:
        return u, vh
    return u * weights.to(u.dtype), weights.to(vh.dtype)[:, None] * vh

