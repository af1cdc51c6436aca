"""sd-scripts' `networks.lora` forward on LyCORIS' LoRA module.

The tensors, names and state dict are LyCORIS' `LoConModule`'s (so files and resume stay as they
are); only the training-time branch differs, to give the dropouts the meaning sd-scripts' LoRAModule
(and the guides) give them. LyCORIS drops neuron outputs after `lora_up`; sd-scripts drops the low-rank
activations `lx = lora_down(x)`, then masks whole ranks per sample with `rank_dropout` and scales the
branch by 1/(1 − rank_dropout) to keep its expectation. Imported only when a networks.lora network
is built (LyCORIS is a heavy import).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lycoris.modules.locon import LoConModule
from torch import nn


class KohyaLoRAModule(LoConModule):
    """y = W·x + up(drop(down(x)) ⊙ rank_mask) · scale · multiplier, as networks.lora computes it."""

    def bypass_forward_diff(self, x: torch.Tensor, scale: float = 1) -> torch.Tensor:
        down, up = self.lora_down, self.lora_up
        # .to(x): under autocast x is already in the compute dtype; without it, the weights meet x's dtype.
        if self.isconv:
            lx = F.conv2d(x, down.weight.to(x), None, down.stride, down.padding, down.dilation, down.groups)
        else:
            lx = F.linear(x, down.weight.to(x))
        gamma = self.scale * scale
        if self.training:
            p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
            if p:
                lx = F.dropout(lx, p=p)
            if self.rank_dropout:
                keep = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
                if lx.dim() == 3:  # (batch, tokens, rank)
                    keep = keep.unsqueeze(1)
                elif lx.dim() == 4:  # (batch, rank, h, w)
                    keep = keep[:, :, None, None]
                lx = lx * keep.to(lx.dtype)
                gamma = gamma / (1.0 - self.rank_dropout)
        out = F.conv2d(lx, up.weight.to(lx)) if self.isconv else F.linear(lx, up.weight.to(lx))
        return out * gamma
