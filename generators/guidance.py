"""Guidance: turn conditional (and weaker/unconditional) predictions into one ``denoise_fn``.

v = v_uncond + scale * (v_cond - v_uncond), where ``v_uncond`` is the unconditional prediction for
classifier-free guidance, or a second, weaker model for AutoGuidance: ``guided`` takes both
as callables, ``cfg`` is the batched classifier-free case for one class-conditional model.

Options, as LightningDiT uses them:
- ``interval=(lo, hi)``: guide only samples with lo <= t <= hi, where t is the (already
  shifted) time the sampler passes; elsewhere the conditional prediction is used alone.
  LightningDiT's ``cfg_interval_start=0.11`` is ``interval=(0.11, 1.0)``: the noisy start
  (t < 0.11) is unguided.
- ``channels``: guide only these output channels; the others keep the conditional
  prediction. The published LightningDiT results guide channels [0, 1, 2] only (its Internal Guidance
  release guides all); None = all.
- ``scale <= 1``: no guidance, the plain conditional prediction.
- ``schedule`` (``cfg`` only): ``[(t_lo, t_hi, scale), ...]`` segments in the same time, replacing ``scale`` and
  ``interval``: each sample takes the scale of the segment holding its t, 1 outside every segment (FAE's
  three-part CFG). Every scale != 1 is applied, 0.9 too (it leans towards the unconditional prediction); samples
  whose scale is 1 need no unconditional call, as outside an interval. Segments are closed and may share an
  end, where the later one applies.

Internal Guidance (CVL-UESTC/Internal-Guidance) needs no second pass: a model with an IG head returns its
final velocity and the head's, ``model(x, t, y, return_ig=True) -> (v, v_mid)``, and ``internal`` turns
them into v_mid + w (v - v_mid) (w = 1: v itself) on its own time interval. It is applied first, to every
branch the model computes (both halves of the CFG batch), then CFG and AutoGuidance act on the result, as the
official sampler does; ``ig_scale=1`` switches it off (and skips the head).

Encoder sharing (``sharing.py``) wraps the models these functions call, not the functions: each call is
``model(x, t, y)`` (or ``return_ig=True``), and the wrapper tells the branches apart by their rows' labels (the
null class is the unconditional half). ``cfg``'s batch [cond ; uncond] therefore carries one state over both halves
and its conditional-only calls (outside the interval) the conditional state; AutoGuidance's guide is its own
wrapped model with its own state; Internal Guidance cannot be served by a reused state and is refused with sharing.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from core.errors import UserError
from generators.sampling import DenoiseFn

__all__ = ["combine", "guided", "cfg", "check_schedule", "conditional", "autoguidance", "internal", "Velocity",
           "Segment"]

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, y) -> v
Segment = tuple[float, float, float]  # (t_lo, t_hi, scale) of a CFG schedule


def combine(
    v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, channels: Sequence[int] | None = None
) -> torch.Tensor:
    """v_uncond + scale * (v_cond - v_uncond), on ``channels`` only (others stay v_cond)."""
    if channels is None:
        return v_uncond + scale * (v_cond - v_uncond)
    out = v_cond.clone()
    idx = list(channels)
    out[:, idx] = v_uncond[:, idx] + scale * (v_cond[:, idx] - v_uncond[:, idx])
    return out


def _in_interval(t: torch.Tensor, interval: tuple[float, float], open_ends: bool = False) -> torch.Tensor:
    lo, hi = interval
    if open_ends:  # JiT's rule: t < hi and (lo == 0 or t > lo)
        return (t < hi) & ((t > lo) if lo > 0 else torch.ones_like(t, dtype=torch.bool))
    return (t >= lo) & (t <= hi)


def _select(active: torch.Tensor, guided_v: torch.Tensor, cond_v: torch.Tensor) -> torch.Tensor:
    return torch.where(active.reshape(-1, *([1] * (cond_v.ndim - 1))), guided_v, cond_v)


def check_schedule(schedule: Sequence[Sequence[float]], key: str = "sample.cfg_schedule") -> list[Segment]:
    """The segments of a CFG schedule as float triples sorted by time; a one-line UserError naming ``key`` unless
    every segment is [t_lo, t_hi, scale] with 0 <= t_lo <= t_hi <= 1 and no two overlap (sharing an end is allowed)."""
    def refuse(why: str) -> UserError:
        return UserError(f"{key}={_show(schedule)}: {why}; give [[t_lo, t_hi, scale], ...] with "
                         "0 <= t_lo <= t_hi <= 1 (t = 0 is noise), segments not overlapping")

    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise refuse("not a list of segments")
    segments = []
    for seg in schedule:
        if (isinstance(seg, (str, bytes)) or not isinstance(seg, Sequence) or len(seg) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in seg)):
            raise refuse(f"segment {_show(seg)} is not three numbers [t_lo, t_hi, scale]")
        lo, hi, scale = (float(v) for v in seg)
        if not 0 <= lo <= hi <= 1:
            raise refuse(f"segment {_show(seg)} is not inside [0, 1] with t_lo <= t_hi")
        segments.append((lo, hi, scale))
    segments.sort()
    for (_, hi, _), nxt in zip(segments, segments[1:]):
        if nxt[0] < hi:
            raise refuse(f"segments overlap on [{nxt[0]:g}, {min(hi, nxt[1]):g}]")
    return segments


def _show(value: object) -> str:
    """A schedule as the command line writes it (an OmegaConf list prints as a plain one)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def guided(
    cond_fn: DenoiseFn,
    uncond_fn: DenoiseFn,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
    channels: Sequence[int] | None = None,
) -> DenoiseFn:
    """Guide ``cond_fn`` away from ``uncond_fn`` (unconditional branch or weaker model).

    ``uncond_fn`` is only called for steps where some sample is inside the interval.
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        active = _in_interval(t, interval)
        if scale <= 1 or not bool(active.any()):
            return cond_fn(x, t)
        v_cond = cond_fn(x, t)
        return _select(active, combine(v_cond, uncond_fn(x, t), scale, channels), v_cond)

    return fn


def internal(model: nn.Module, scale: float = 1.0, interval: tuple[float, float] = (0.0, 1.0)) -> Velocity:
    """``model``'s velocity with Internal Guidance: v_mid + scale (v - v_mid) for samples with lo <= t <= hi
    (our time, 0 = noise), v elsewhere. The official LightningDiT-IG sampler guides when t <= ig_interval
    (default 1: always), i.e. ``interval=(0, ig_interval)``. ``scale == 1`` is the plain model."""
    if scale == 1:
        return model

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v, v_mid = model(x, t, y, return_ig=True)
        return _select(_in_interval(t, interval), v_mid + scale * (v - v_mid), v)

    return fn


def conditional(model: nn.Module, y: torch.Tensor, ig_scale: float = 1.0,
                ig_interval: tuple[float, float] = (0.0, 1.0)) -> DenoiseFn:
    """The class-conditional velocity ``model(x, t, y)``, with Internal Guidance when ``ig_scale != 1``."""
    velocity = internal(model, ig_scale, ig_interval)
    return lambda x, t: velocity(x, t, y)


def cfg(
    model: nn.Module,
    y: torch.Tensor,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
    channels: Sequence[int] | None = None,
    ig_scale: float = 1.0,
    ig_interval: tuple[float, float] = (0.0, 1.0),
    schedule: Sequence[Sequence[float]] | None = None,
    interval_open: bool = False,
) -> DenoiseFn:
    """Classifier-free guidance for ``model(x, t, y)``: one forward on [cond ; uncond].

    The unconditional half uses the null class ``model.num_classes``. With ``ig_scale != 1`` both halves are
    internally guided first (``internal``). ``schedule``, when given, replaces ``scale`` and ``interval`` (module
    docstring). ``interval_open``: ``interval`` excludes its ends, lo < t < hi (lo = 0 keeps t = 0), as JiT's
    sampler guides; on JiT's 51-point grid the interval (0.1, 1) then leaves t = 0.1 itself unguided.
    The model must be in eval mode, or its label dropout would corrupt the conditional half.
    """
    if model.training:
        raise ValueError("cfg needs the model in eval mode (label dropout is active in training mode)")
    if schedule is not None:
        segments = check_schedule(schedule)
    else:
        segments = [(*interval, scale)] if scale > 1 else []
    null = torch.full_like(y, model.num_classes)
    velocity = internal(model, ig_scale, ig_interval)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Each sample's segment, the later one where two share an end; -1 outside every segment.
        segment = torch.full_like(t, -1, dtype=torch.long)
        for i, (lo, hi, _) in enumerate(segments):
            segment = torch.where(_in_interval(t, (lo, hi), interval_open and schedule is None), i, segment)
        guides = [(segment == i, w) for i, (_, _, w) in enumerate(segments) if w != 1]
        if not guides or not bool(torch.stack([m for m, _ in guides]).any()):
            return velocity(x, t, y)
        v_cond, v_uncond = velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        out = v_cond
        for active, w in guides:
            out = _select(active, combine(v_cond, v_uncond, w, channels), out)
        return out

    return fn


def autoguidance(
    model: nn.Module,
    guide_model: nn.Module,
    y: torch.Tensor,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
    channels: Sequence[int] | None = None,
    ig_scale: float = 1.0,
    ig_interval: tuple[float, float] = (0.0, 1.0),
) -> DenoiseFn:
    """AutoGuidance: guide ``model`` (internally guided first when ``ig_scale != 1``) away from a weaker ``guide_model`` (e.g. an early checkpoint
    of a small model), both conditioned on the same labels ``y``.

    RAE's released 256 px result is DiT^DH-XL guided by DiT^DH-S after 14 epochs at scale 1.42
    over the whole time range. RAE's configs give the interval in its own time t_rae = 1 - t:
    their (t_min, t_max) is ``interval=(1 - t_max, 1 - t_min)`` here (the same for CFG).
    The result is a ``denoise_fn`` like ``cfg``'s, so it can itself
    be the conditional branch of ``guided``. Both models must be in eval mode (label dropout).
    """
    for what, m in (("model", model), ("guide_model", guide_model)):
        if m.training:
            raise ValueError(f"autoguidance needs {what} in eval mode (label dropout is active in training mode)")
    return guided(conditional(model, y, ig_scale, ig_interval), conditional(guide_model, y), scale, interval, channels)
