"""SFD's semantic-first diffusion (yuemingPAN/SFD): two clocks over one composite latent [texture | semantic].

Facts: reference ddt_sfd_repa_ig.md §2.3-§2.6, §6 items 7-10. Our time convention (t = 0 noise, 1 data) is
SFD's own. A semantic-first LightningDiT (``semantic_chans``, ``semfirst_delta_t`` = Δ) takes t [B, 2] =
(t_tex, t_sem); its last ``semantic_chans`` channels are the semantic group.

- Training: u ~ the flow config's time distribution (logit-normal(0, 1) in the release), τ = u (1 + Δ),
  t_sem = min(τ, 1), t_tex = max(τ - Δ, 0); each group is noised at its own time (the noise itself is one
  tensor, so the groups' noises are independent); no loss masking at the clamped ends (about 11.4% of draws
  at each end for Δ = 0.3); the semantic channels' squared error is weighted β (2.0) before the mean.
- Sampling: τ runs over [0, 1 + Δ]; the texture's velocity is zero while τ < Δ, the semantics' while τ > 1;
  Euler on a fixed grid or adaptive dopri5 (torchdiffeq; the release's solver, atol 1e-6, rtol 1e-3).
- Guidance: CFG ([cond; uncond] batch, null class) or, when a guide is set, AutoGuidance (a weaker model, the
  true label for both; it replaces CFG, as in SFD's code), over all channels. The scale is ``cfg_scale`` (CFG) or
  ``autoguidance.scale`` (AG), overridden per group by ``scale_tex``/``scale_sem``; guidance acts where the
  group's own time is >= ``cfg_interval_start``, tested per group as ``cfg_interval_mode`` says (both, tex or
  sem: SFD's ``semfirst_infer_interval_mode``; the other group is then guided throughout).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from core.errors import MismatchError, UserError
from generators import sampling

__all__ = ["is_semantic_first", "times", "channel_times", "channel_weights", "tau_velocity", "guided_velocity", "sample",
           "check_groups", "METHODS"]

METHODS = ("euler", "heun", "heun2", "dopri5")
Velocity2 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t [B, 2]) -> v


def is_semantic_first(model: nn.Module) -> bool:
    return bool(getattr(model, "semantic_first", False))


def times(u: torch.Tensor, delta: float) -> torch.Tensor:
    """Training times [B, 2] = (t_tex, t_sem) of draws u [B] in (0, 1): τ = u (1 + Δ), clamped per group."""
    tau = u * (1 + delta)
    return torch.stack([(tau - delta).clamp_min(0), tau.clamp_max(1)], dim=1)


def channel_times(t: torch.Tensor, channels: int, semantic_chans: int) -> torch.Tensor:
    """[B, 2] group times -> [B, C, 1, 1]: t_tex on the first C - semantic_chans channels, t_sem on the rest."""
    tex = t[:, :1].expand(-1, channels - semantic_chans)
    sem = t[:, 1:].expand(-1, semantic_chans)
    return torch.cat([tex, sem], dim=1)[:, :, None, None]


def channel_weights(channels: int, semantic_chans: int, beta: float) -> torch.Tensor:
    """[C] on the CPU (also under a meta default device): 1 on the texture channels, β on the semantic ones (SFD
    weights only the semantic MSE)."""
    return torch.cat([torch.ones(channels - semantic_chans, device="cpu"),
                      torch.full((semantic_chans,), float(beta), device="cpu")])


def _group_scales(s: DictConfig, autoguided: bool) -> tuple[float, float]:
    scale = float(s.autoguidance.scale if autoguided else s.cfg_scale)
    tex, sem = s.get("scale_tex"), s.get("scale_sem")
    return (scale if tex is None else float(tex)), (scale if sem is None else float(sem))


def guided_velocity(model: nn.Module, y: torch.Tensor, s: DictConfig, guide: nn.Module | None = None) -> Velocity2:
    """The guided velocity of a semantic-first model at (x, t [B, 2]), by the sample settings `s` (see the module
    docstring). AutoGuidance replaces CFG's unconditional branch when `guide` is given, as SFD's code does."""
    if model.training or (guide is not None and guide.training):
        raise ValueError("guidance needs the models in eval mode (label dropout is active in training mode)")
    if float(s.get("ig_scale", 1.0)) != 1:
        raise UserError("sample.ig_scale: Internal Guidance is not defined for semantic-first (SFD) sampling")
    if s.get("cfg_schedule") is not None:
        raise UserError("sample.cfg_schedule: semantic-first (SFD) sampling guides by scale_tex/scale_sem on "
                        "cfg_interval_start per group, not by a schedule; set it to null")
    scale_tex, scale_sem = _group_scales(s, guide is not None)
    start, mode = float(s.cfg_interval_start), str(s.get("cfg_interval_mode", "both"))
    tex_chans = model.in_channels - model.semantic_chans
    null = torch.full_like(y, model.num_classes)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if max(scale_tex, scale_sem) <= 1:
            return model(x, t, y)
        if guide is None:
            cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        else:
            cond, uncond = model(x, t, y), guide(x, t, y)
        out = cond.clone()
        for (lo, hi), scale, group_t, gated in (((0, tex_chans), scale_tex, t[:, 0], mode in ("both", "tex")),
                                                ((tex_chans, None), scale_sem, t[:, 1], mode in ("both", "sem"))):
            if scale <= 1:
                continue
            mixed = uncond[:, lo:hi] + scale * (cond[:, lo:hi] - uncond[:, lo:hi])
            active = group_t >= start if gated else torch.ones_like(group_t, dtype=torch.bool)
            out[:, lo:hi] = torch.where(active[:, None, None, None], mixed, cond[:, lo:hi])
        return out

    return fn


def tau_velocity(velocity: Velocity2, delta: float, tex_chans: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """d x / d τ at τ [B]: the model's velocity at (t_tex, t_sem) = (max(τ - Δ, 0), min(τ, 1)), the texture's
    zeroed while τ < Δ and the semantics' while τ > 1 (SFD's three phases)."""

    def fn(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        t = torch.stack([(tau - delta).clamp_min(0), tau.clamp_max(1)], dim=1)
        v = velocity(x, t)
        tex_on = (tau >= delta).to(v.dtype)[:, None, None, None]
        sem_on = (tau <= 1).to(v.dtype)[:, None, None, None]
        return torch.cat([v[:, :tex_chans] * tex_on, v[:, tex_chans:] * sem_on], dim=1)

    return fn


@torch.no_grad()
def sample(velocity: Velocity2, z: torch.Tensor, delta: float, tex_chans: int, steps: int, method: str = "euler",
           shift: float = 0.0, atol: float = 1e-6, rtol: float = 1e-3,
           counter: list[int] | None = None) -> torch.Tensor:
    """Integrate noise z [B, C, H, W] from τ = 0 to 1 + Δ.

    ``euler`` (``heun``, ``heun2``): ``steps`` grid points linspace(0, 1, steps) (shifted if ``shift`` > 0, as SFD
    applies a shift to τ / (1 + Δ)) times 1 + Δ, so Euler makes ``steps - 1`` model evaluations: the paper's
    "Euler 100" is ``steps=101``.
    ``dopri5``: torchdiffeq's adaptive solver from 0 to 1 + Δ with ``atol``/``rtol`` (the step count does not
    matter). ``counter``, if given, gets the number of model evaluations appended.
    """
    fn = tau_velocity(velocity, delta, tex_chans)
    evaluations = 0

    def counted(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        return fn(x, tau)

    if method in ("euler", "heun", "heun2"):
        out = sampling.sample(counted, z, steps, method, shift, span=1 + delta)
    elif method == "dopri5":
        from torchdiffeq import odeint

        span = torch.tensor([0.0, 1.0 + delta], device=z.device, dtype=torch.float64)
        out = odeint(lambda tau, x: counted(x, tau.to(x.dtype).expand(x.shape[0])), z, span, method="dopri5",
                     atol=atol, rtol=rtol)[-1]
    else:
        raise UserError(f"sample.method={method!r}: semantic-first sampling takes one of {', '.join(METHODS)}")
    if counter is not None:
        counter.append(evaluations)
    return out


def check_groups(model: nn.Module, groups: Sequence[Any]) -> None:
    """A semantic-first model's semantic channels must be the last group of a composite latent source
    (latents.dataset.ChannelGroup: name, channels); a single group may be split as the model says."""
    if len(groups) > 1 and is_semantic_first(model) and groups[-1].channels != model.semantic_chans:
        raise MismatchError(f"model.options.semantic_chans={model.semantic_chans}, but the latent source's last "
                            f"channel group ('{groups[-1].name}') has {groups[-1].channels} channels")
