"""Exact thin SVDs of adapter weight deltas, computed from their factors.

A delta ΔW (out × in, convs flattened to out × in·kh·kw) is never formed when its factors are smaller:
- product ΔW = L·R of inner size k: QR both factors, SVD the k×k core (cost O((out+in)·k²));
- Kronecker ΔW = A ⊗ B: the singular triplets are the pairwise products of those of A and B, so only
  the kept singular vectors are ever built;
- Hadamard of two products (LoHa) is itself a product of inner size k1·k2 (face-splitting product).
Singular vectors are produced only for the components a rank rule keeps (`vectors(idx)`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Spectrum:
    """Singular values `S` (descending, ≥ 0) of a delta, and its singular vectors on demand."""

    S: Tensor

    def vectors(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(U[:, idx], Vh[idx, :]) so that ΔW ≈ U·diag(S[idx])·Vh for the chosen components."""
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

    def vectors(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self._u[:, idx], self._vh[idx]

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape


class ProductSpectrum(Spectrum):
    """SVD of ΔW = scale · left @ right from the triangular factors of its two factors.

    R factors come from a Cholesky factorisation of each factor's Gram matrix in float64 (one GEMM
    each: far cheaper than Householder QR, and exact to float32 round-off while the factor's condition
    number stays below ~1e4); rank-deficient or ill-conditioned factors fall back to Householder QR.
    The r×r core R_L·R_Rᵀ is decomposed in float64; singular vectors are only formed when asked for,
    as left·(R_L⁻¹·U_core) and (V_coreᵀ·R_R⁻ᵀ)·right.
    """

    MAX_CONDITION = 1e4

    def __init__(self, left: Tensor, right: Tensor, scale: float = 1.0) -> None:
        m, k = left.shape
        n = right.shape[1]
        self._shape = (m, n)
        self._sign = -1.0 if scale < 0 else 1.0
        self._left, self._right = left, right
        self._mode = "dense"
        if k >= min(m, n):
            # The factors hold at least as many numbers as ΔW: forming it is the cheaper exact path.
            u, s, vh = torch.linalg.svd(left @ right, full_matrices=False)
            self._uc, self._vhc = u, vh
        else:
            r_left, r_right = _cholesky_r(left.T), _cholesky_r(right)
            if r_left is not None and r_right is not None:
                self._mode = "cholesky"
                uc, s, vhc = torch.linalg.svd(r_left @ r_right.T)
                self._r_left, self._r_right = r_left, r_right
                s = s.to(left.dtype)
            else:
                self._mode = "qr"
                qu, ru = torch.linalg.qr(left)
                qd, rd = torch.linalg.qr(right.T)
                uc, s, vhc = torch.linalg.svd(ru @ rd.T)
                self._qu, self._qd = qu, qd
            self._uc, self._vhc = uc, vhc
        self.S = s * abs(scale)

    def vectors(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        uc = self._uc[:, idx]
        vhc = self._vhc[idx]
        if self._mode == "cholesky":
            # Q_L·u = L·R_L⁻¹·u and vᵀ·Q_Rᵀ = (R_R⁻ᵀ·v)ᵀ·R, solved on the r×k blocks in float64.
            x = torch.linalg.solve_triangular(self._r_left, uc, upper=True)
            y = torch.linalg.solve_triangular(self._r_right, vhc.T, upper=True)
            u = self._left @ x.to(self._left.dtype)
            vh = y.T.to(self._right.dtype) @ self._right
        elif self._mode == "qr":
            u, vh = self._qu @ uc, vhc @ self._qd.T
        else:
            u, vh = uc, vhc
        return (u * self._sign if self._sign < 0 else u), vh

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape


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

    def vectors(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        pair = self._pair[idx]
        nb = self._b.S.shape[0]
        ua, vha = self._a.vectors(pair // nb)
        ub, vhb = self._b.vectors(pair % nb)
        k = pair.shape[0]
        u = (ua[:, None, :] * ub[None, :, :]).reshape(-1, k)
        vh = (vha[:, :, None] * vhb[:, None, :]).reshape(k, -1)
        return (u * self._sign if self._sign < 0 else u), vh

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

