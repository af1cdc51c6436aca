"""Noise, timesteps, targets and min-SNR weights on known values (sd-scripts' formulas)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.train import noise as N


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=prediction_type)


def test_noise_offset_adds_one_constant_per_sample_and_channel() -> None:
    latents = torch.zeros(2, 4, 8, 8)
    noise = torch.zeros(2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = N.apply_noise_offset(latents, noise, 0.1, None, generator=g)
    expected = 0.1 * torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, expected.expand(2, 4, 8, 8))
    # None / 0 leaves the noise untouched
    assert N.apply_noise_offset(latents, noise, None, None) is noise
    assert N.apply_noise_offset(latents, noise, 0.0, 0.5) is noise


def test_adaptive_noise_scale_follows_the_channel_mean_and_clamps_at_zero() -> None:
    latents = torch.full((1, 2, 4, 4), -2.0)
    latents[:, 1] = 0.5
    noise = torch.zeros_like(latents)
    shift = torch.randn((1, 2, 1, 1), generator=torch.Generator().manual_seed(3))
    out = N.apply_noise_offset(latents, noise, 0.1, 0.05, generator=torch.Generator().manual_seed(3))
    # offset = 0.1 + 0.05 * |mean|: channel 0 → 0.2, channel 1 → 0.125
    assert torch.allclose(out[0, 0], torch.full((4, 4), float(0.2 * shift[0, 0])))
    assert torch.allclose(out[0, 1], torch.full((4, 4), float(0.125 * shift[0, 1])))
    # a negative scale that would flip the sign is clamped to 0
    out = N.apply_noise_offset(latents, noise, 0.1, -1.0, generator=torch.Generator().manual_seed(3))
    assert torch.all(out[0, 0] == 0)


def test_pyramid_noise_has_unit_std_and_differs_from_plain_noise() -> None:
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = N.pyramid_noise_like(noise, 6, 0.3, generator=torch.Generator().manual_seed(1))
    assert out.shape == noise.shape
    assert math.isclose(float(out.std()), 1.0, rel_tol=1e-5)
    assert not torch.allclose(out, noise / noise.std())
    # low-frequency content: neighbouring pixels correlate more than in white noise
    def neighbour_corr(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    strong = N.pyramid_noise_like(noise, 6, 0.9, generator=torch.Generator().manual_seed(1))
    assert neighbour_corr(strong) > neighbour_corr(out) > neighbour_corr(noise)
    assert neighbour_corr(strong) > 0.2
    # one iteration adds one full-size layer: (noise + n0) / std
    one = N.pyramid_noise_like(noise, 1, 0.3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.rand((), generator=g)
    n0 = torch.randn((2, 4, 32, 32), generator=g)
    assert torch.allclose(one, (noise + n0) / (noise + n0).std(), atol=1e-5)
    again = N.pyramid_noise_like(noise, 6, 0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_timesteps_stay_in_the_half_open_range() -> None:
    t = N.sample_timesteps(5000, 200, 210, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 200 and int(t.max()) == 209
    assert t.dtype == torch.int64
    with pytest.raises(ValueError):
        N.sample_timesteps(1, 10, 10)


def test_snr_table_matches_alphas_cumprod() -> None:
    sched = _scheduler()
    snr = N.all_snr(sched.alphas_cumprod)
    ac = sched.alphas_cumprod
    assert torch.allclose(snr, ac / (1 - ac), rtol=1e-4)
    assert float(snr[0]) > 100 and float(snr[-1]) < 0.01  # high SNR early, low late


def test_min_snr_weights_epsilon_and_v_prediction() -> None:
    snr = torch.tensor([100.0, 5.0, 1.0, 0.25])
    t = torch.tensor([0, 1, 2, 3])
    eps = N.min_snr_weight(snr, t, 5.0, v_prediction=False)
    v = N.min_snr_weight(snr, t, 5.0, v_prediction=True)
    assert torch.allclose(eps, torch.tensor([5 / 100, 1.0, 1.0, 1.0]))
    assert torch.allclose(v, torch.tensor([5 / 101, 5 / 6, 1 / 2, 0.25 / 1.25]))


def test_weighted_loss_applies_prior_and_snr_weights() -> None:
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.ones(2, 1, 2, 2)
    target[1] *= 2  # per-sample MSE: 1 and 4
    w = torch.tensor([1.0, 0.5])
    assert math.isclose(float(N.weighted_loss(pred, target, torch.tensor([0, 0]), w)), (1 + 2) / 2)
    snr = torch.tensor([10.0, 2.0])
    loss = N.weighted_loss(pred, target, torch.tensor([0, 1]), w, snr=snr, min_snr_gamma=5.0)
    assert math.isclose(float(loss), (1 * 0.5 + 2 * 1.0) / 2, rel_tol=1e-6)


def test_v_prediction_target_is_the_schedulers_velocity() -> None:
    sched = _scheduler("v_prediction")
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 900])
    v = N.training_target(sched, latents, noise, t, v_prediction=True)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(v, a * noise - s * latents, atol=1e-6)
    assert N.training_target(sched, latents, noise, t, v_prediction=False) is noise
