"""The linear flow-matching path, its targets, time distributions and losses.

Convention (DESIGN §3): t in [0, 1], t = 0 is pure noise, t = 1 is data,
x_t = t * x + (1 - t) * eps, velocity v = x - eps. It is LightningDiT's/SiT's own convention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "interpolate",
    "velocity_target",
    "sample_t",
    "shift_time",
    "unshift_time",
    "dimension_shift",
    "flow_loss",
    "x_to_velocity",
]


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so it broadcasts against ``like``."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t * x + (1 - t) * eps for data x, noise eps and times t [B], or per channel [B, C, 1, 1] (SFD)."""
    tb = t.to(x.dtype) if t.ndim == x.ndim else _per_sample(t, x)
    return tb * x + (1 - tb) * eps


def velocity_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """d x_t / dt along the linear path: x - eps."""
    return x - eps


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's sampling shift t' = s t / (1 + (s - 1) t); s <= 0 means no shift.

    s < 1 moves points towards t = 0 (noise): s = 0.3 is the official setting. In noise time
    sigma = 1 - t this is the SD3/FLUX shift with alpha = 1/s.
    """
    if shift <= 0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of ``shift_time``: t = t' / (s - (s - 1) t')."""
    if shift <= 0:
        return t
    return t / (shift - (shift - 1) * t)


def dimension_shift(latent_numel: int, base: int = 4096) -> float:
    """RAE's resolution-dependent time shift, as the ``shift`` of ``shift_time`` in our convention.

    RAE writes time the other way (t_rae = 1 - t: 0 = data, 1 = noise) and shifts
    t_rae' = a t_rae / (1 + (a - 1) t_rae) with a = sqrt(latent_numel / base), base = 4096 for the
    32x32x4 SD-VAE latents the shift was tuned on. In our time t = 1 - t_rae the same map is

        1 - t_rae' = t / (a - (a - 1) t) = shift_time(t, 1 / a),

    so the shift here is 1 / a = sqrt(base / latent_numel): 0.1443 for 768x16x16 (a = 6.93) and
    0.0722 for 768x32x32 (a = 13.86). RAE applies it to the training times and to the sampling grid:
    ``sample_t(..., shift=s)`` and ``sampling.sample(..., shift=s)``. Its sampler, 50-point Euler
    (``num_steps: 50``: 49 model evaluations), is ``sample(fn, z, steps=50, method="euler", shift=s)``;
    the official grid is 1 - linspace(0, 0.999, 50) in t_rae, i.e. linspace(0, 0.999, 50) in ours
    before the shift, so it stops at t = 0.9931 where ours reaches t = 1 (the other points differ by
    less than 0.006, most near the data end).
    """
    return math.sqrt(base / latent_numel)


def sample_t(
    n: int,
    dist: str = "logit_normal",
    mu: float = 0.0,
    sigma: float = 1.0,
    shift: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times [n] in (0, 1): ``uniform`` or ``logit_normal`` (sigmoid of N(mu, sigma)),
    then ``shift_time(., shift)`` if shift > 0.

    LightningDiT trains with logit-normal(0, 1) and no shift. The generator, if given, must
    live on ``device``.
    """
    if dist == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif dist == "logit_normal":
        t = torch.sigmoid(mu + sigma * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown time distribution {dist!r}; choose 'uniform' or 'logit_normal'")
    return shift_time(t, shift)


def flow_loss(pred: torch.Tensor, target: torch.Tensor, cos_weight: float = 0.0,
              channel_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MSE (mean over C, H, W, then batch) plus ``cos_weight`` times the cosine term.

    ``channel_weights`` [C] weigh each channel's squared error before the mean (SFD: β on the semantic group).
    The cosine term is 1 - cos(pred, target) along the channel dimension, averaged over the
    spatial positions and the batch (LightningDiT uses weight 1). Computed in fp32. Returns
    scalars ``loss``, ``mse`` and ``cos`` (``cos`` is reported even when its weight is 0).
    """
    pred, target = pred.float(), target.float()
    err = (pred - target).pow(2)
    if channel_weights is not None:
        err = err * channel_weights.to(err.device).reshape(1, -1, *([1] * (err.ndim - 2)))
    mse = err.mean()
    cos = (1 - F.cosine_similarity(pred, target, dim=1)).mean()
    return {"loss": mse + cos_weight * cos, "mse": mse, "cos": cos}


def x_to_velocity(x_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, min_gap: float = 0.05) -> torch.Tensor:
    """Velocity implied by a clean-data prediction: (x_hat - x_t) / max(1 - t, min_gap) (JiT/WiT)."""
    return (x_hat - x_t) / (1 - _per_sample(t, x_t)).clamp_min(min_gap)
