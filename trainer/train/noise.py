"""Noise, timesteps, targets and loss weights of one diffusion training step (pure torch).

The formulas follow kohya sd-scripts (library/custom_train_functions.py, train_util.
get_noise_noisy_latents_and_timesteps) so that a spec means the same thing here as the flag does there:
`noise_offset` wins over multires noise, timesteps are drawn uniformly from [min_timestep, max_timestep),
and min-SNR-γ divides by SNR for epsilon targets and by SNR + 1 for v-prediction targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_noise_offset(
    latents: torch.Tensor, noise: torch.Tensor, noise_offset: float | None, adaptive_noise_scale: float | None,
    *, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add a per-(sample, channel) constant to the noise (crosslabs' offset noise).

    With `adaptive_noise_scale` the offset grows with each channel's absolute latent mean, clamped at 0
    (a negative scale must not flip the offset's sign).
    """
    if not noise_offset:
        return noise
    offset: float | torch.Tensor = noise_offset
    if adaptive_noise_scale is not None:
        latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = (noise_offset + adaptive_noise_scale * latent_mean).clamp(min=0.0)
    shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                        device=latents.device, dtype=noise.dtype)
    return noise + offset * shift


def pyramid_noise_like(
    noise: torch.Tensor, iterations: int, discount: float, *, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise: upsampled coarser noise layers, weighted discount**i.

    Each level shrinks the resolution by a random factor r in [2, 4) (r**i for level i), stopping at 1×1,
    and the sum is rescaled to unit standard deviation, as sd-scripts does.
    """
    b, c, h, w = noise.shape
    out = noise.clone()
    upsample = torch.nn.Upsample(size=(h, w), mode="bilinear")
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        layer = torch.randn((b, c, hn, wn), generator=generator, dtype=torch.float32).to(noise.device)
        out = out + upsample(layer).to(noise.dtype) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_timesteps(
    batch_size: int, min_timestep: int, max_timestep: int, *, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep) (the upper bound is exclusive)."""
    if not 0 <= min_timestep < max_timestep:
        raise ValueError(f"need 0 <= min_timestep < max_timestep, got {min_timestep}, {max_timestep}")
    return torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator).to(device)


def all_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio per timestep: (sqrt(ᾱ) / sqrt(1 - ᾱ))² = ᾱ / (1 - ᾱ)."""
    alpha = alphas_cumprod.sqrt()
    sigma = (1.0 - alphas_cumprod).sqrt()
    return (alpha / sigma) ** 2


def min_snr_weight(snr: torch.Tensor, timesteps: torch.Tensor, gamma: float, *, v_prediction: bool) -> torch.Tensor:
    """Per-sample min-SNR-γ weights (Hang et al. 2023) as sd-scripts' apply_snr_weight computes them."""
    s = snr.to(timesteps.device)[timesteps].float()
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / (s + 1) if v_prediction else clipped / s


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    *, v_prediction: bool) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    if v_prediction:
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over channels and pixels, one value per sample (in fp32, whatever the compute dtype)."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def weighted_loss(
    pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, loss_weights: torch.Tensor, *,
    snr: torch.Tensor | None = None, min_snr_gamma: float | None = None, v_prediction: bool = False,
) -> torch.Tensor:
    """The scalar training loss: per-sample MSE × prior-loss weights (× min-SNR-γ weights), averaged."""
    loss = per_sample_loss(pred, target) * loss_weights.to(pred.device, torch.float32)
    if min_snr_gamma:
        if snr is None:
            raise ValueError("min_snr_gamma needs the scheduler's SNR table")
        loss = loss * min_snr_weight(snr, timesteps, min_snr_gamma, v_prediction=v_prediction)
    return loss.mean()
