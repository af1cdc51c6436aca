"""Where a module's saved tensors differ from its training form, so that the readers apply what was trained.

Readers (ComfyUI, A1111/Forge, diffusers, sd-scripts) apply a LoRA-style file as up·down·alpha/rank. Two
LyCORIS modules' own state dicts would not be applied as trained:
- DyLoRA scales its blocks by alpha/(blocks in use), not alpha/rank: at full rank its change is
  block_size times what a reader applies. The file's alpha is alpha·block_size, so the reader's
  up·down·(alpha·block_size)/rank is the trained change at every whole number of blocks (the first
  k·block_size ranks with the file's alpha are what training applied with k blocks), as sd-scripts'
  own DyLoRA files read at full rank.
- LoKr's Tucker form on 3x3 convolutions (`lokr_t2`, `lokr_w2_a`, `lokr_w2_b`) is rebuilt by ComfyUI
  with an einsum whose non-contiguous result its `torch.kron` cannot view: the layer is left unpatched.
  The file holds such a layer in LoKr's plain conv layout instead, the core folded into the input side:
  `lokr_w2_a` (out × rank) and `lokr_w2_b` (rank × in·k·k), whose product readers form with a matrix
  multiply. It is the same w2 at the same rank, so the file keeps its size and alpha/rank its meaning.
`from_file` is the inverse, for continuing from a file (`network.weights`): the Tucker factors come back
from w2 by a truncated higher-order SVD, exact because w2's first two mode ranks are at most the rank.
"""

from __future__ import annotations

import torch
from torch import nn

TUCKER_KEYS = ("lokr_t2", "lokr_w2_a", "lokr_w2_b")


def _kind(module: nn.Module) -> str | None:
    from lycoris.modules.dylora import DyLoraModule
    from lycoris.modules.lokr import LokrModule

    if isinstance(module, DyLoraModule):
        return "dylora"
    if isinstance(module, LokrModule) and module.tucker and not module.use_w2:
        return "lokr-tucker"
    return None


def to_file(module: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the adapter file holds for `module`, from its own state dict `sd` (suffix → tensor)."""
    kind = _kind(module)
    if kind == "dylora":
        return dict(sd, alpha=sd["alpha"] * module.block_size)
    if kind == "lokr-tucker":
        # w2[p, r, …] = Σ_i a[i, p] · (Σ_j t2[i, j, …] · b[j, r]): a LoKr conv w2 = w2_a · w2_b of the same rank.
        right = torch.einsum("i j ..., j r -> i r ...", sd["lokr_t2"], sd["lokr_w2_b"])
        out = {k: v for k, v in sd.items() if k not in TUCKER_KEYS}
        return out | {"lokr_w2_a": sd["lokr_w2_a"].T.contiguous(), "lokr_w2_b": right.flatten(1).contiguous()}
    return sd


def from_file(module: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`module`'s own state dict from the tensors an adapter file holds for it (the inverse of `to_file`)."""
    kind = _kind(module)
    if kind == "dylora" and "alpha" in sd:
        return dict(sd, alpha=sd["alpha"] / module.block_size)
    if kind == "lokr-tucker" and "lokr_t2" not in sd and "lokr_w2_a" in sd:
        out_size, in_size = module.lokr_w2_a.shape[1], module.lokr_w2_b.shape[1]
        w2 = (sd["lokr_w2_a"].double() @ sd["lokr_w2_b"].double()).reshape(out_size, in_size, *module.lokr_t2.shape[2:])
        t2, w2_a, w2_b = _tucker_factors(w2, module.lora_dim)
        return sd | {"lokr_t2": t2, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b}
    return sd


def _tucker_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(core, a, b) with LyCORIS' rebuild einsum("i j ..., i p, j r -> p r ...", core, a, b) = w when both
    of w's first two mode ranks are at most `rank` (a: rank × out, b: rank × in)."""

    def basis(unfolded: torch.Tensor) -> torch.Tensor:
        u = torch.linalg.svd(unfolded.double(), full_matrices=False)[0][:, :rank]
        return torch.nn.functional.pad(u, (0, rank - u.shape[1]))  # zero columns where the mode is smaller

    w = w.double()
    u_out = basis(w.flatten(1))
    u_in = basis(w.transpose(0, 1).flatten(1))
    core = torch.einsum("p r ..., p i, r j -> i j ...", w, u_out, u_in)
    return core.float().contiguous(), u_out.T.float().contiguous(), u_in.T.float().contiguous()
