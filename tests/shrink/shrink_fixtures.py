"""Adapter state dicts for the shrink tests: random factors of realistic shapes, and LyCORIS modules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize(module: nn.Module, std: float = 0.3) -> None:
    """LyCORIS zero-initialises one factor; give every adapter parameter random values instead."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("org_module"):
                p.copy_(torch.randn_like(p) * std)


def lycoris_state_dict(module) -> dict[str, torch.Tensor]:
    """The module's tensors under its sd-scripts name, as LyCORIS writes them to a file."""
    return {
        f"{module.lora_name}.{k}": v.detach().clone().contiguous()
        for k, v in module.state_dict().items()
        if not k.startswith("org_module")
    }


def applied_delta(module, org: nn.Module, w0: torch.Tensor, applied: bool = False) -> torch.Tensor:
    """ΔW as LyCORIS applies it at inference, read off the patched layer's forward on unit inputs."""
    if not applied:
        module.apply_to()
    with torch.no_grad():
        if isinstance(org, nn.Linear):
            eye = torch.eye(org.in_features)
            out = org(eye) - org(torch.zeros_like(eye))  # the (possibly adapted) bias cancels
            delta = out.T - w0
        else:
            # A conv's weight is recovered from its response to single-pixel impulses per input channel.
            kh, kw = org.kernel_size
            c = org.in_channels
            x = torch.zeros(c * kh * kw, c, kh, kw)
            for ci in range(c):
                for i in range(kh):
                    for j in range(kw):
                        x[ci * kh * kw + i * kw + j, ci, i, j] = 1.0
            patched = org(x) - org(torch.zeros_like(x))  # with 'same' padding the centre pixel sees the kernel
            ref = F.conv2d(x, w0, None, padding=org.padding)
            diff = (patched - ref)[:, :, kh // 2, kw // 2]  # (c·kh·kw, out)
            delta = diff.T.reshape(w0.shape[0], c, kh, kw)
    return delta


def lora_layer(name: str, out: int, inn: int, rank: int, alpha: float, kernel: tuple[int, ...] = (),
               dtype=torch.float32, std: float = 0.05) -> dict[str, torch.Tensor]:
    """sd-scripts LoRA tensors with random factors: down (r, in[, kh, kw]), up (out, r[, 1, 1])."""
    down = torch.randn(rank, inn, *kernel) * std
    up = torch.randn(out, rank, *([1] * len(kernel))) * std
    return {
        f"{name}.lora_down.weight": down.to(dtype),
        f"{name}.lora_up.weight": up.to(dtype),
        f"{name}.alpha": torch.tensor(float(alpha), dtype=dtype),
    }


def lora_delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW of an sd-scripts LoRA layer (flattened to out × in·k) as loaders compute it."""
    down = tensors[f"{name}.lora_down.weight"].float()
    up = tensors[f"{name}.lora_up.weight"].float()
    alpha = float(tensors[f"{name}.alpha"].float())
    return (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))


def best_rank_k_error(delta: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return math.sqrt(float((s[k:] ** 2).sum()) / float((s**2).sum()))
