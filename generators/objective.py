"""What a generator's training step minimises: the flow loss, plus its training aids when the model has them.

- Internal Guidance (CVL-UESTC/Internal-Guidance): a model with an IG head (``model.ig_depth``) adds
  ``train.ig_weight`` x MSE(v_mid, v*), the head's velocity against the same target (0.5 in the release).
- REPA (sihyun-yu/REPA): a model with a projector (``model.repa_depth``) adds ``train.repa.weight`` x the
  alignment of its projected tokens with the encoder tokens of the batch's images (generators.repa).
- A semantic-first model (SFD) noises each channel group at its own time (generators.sfd) and weighs the
  semantic channels' squared error by ``flow.semantic_beta``.

What the model predicts (its ``prediction`` attribute) decides the target:
- ``velocity`` (the default): x - eps;
- ``x`` (JiT, WiT): the model predicts clean data and returns the velocity (x_hat - x_t) / max(1 - t, t_eps); the
  target is (x - x_t) / max(1 - t, t_eps) with the same clip (JiT's v-loss), which is x - eps wherever 1 - t > t_eps;
- ``waypoints`` (WiT's stage A, W_psi): the model predicts the clean waypoints s0 [B, N, d] of the batch (the loader's
  third output) and minimises ||s0_hat - s0||^2 / max(1 - t, t_eps)^2 (generators.wit.waypoint_loss).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from core.errors import MismatchError
from generators import flow, sfd
from generators.repa import match_grid, repa_loss
from generators.wit import waypoint_loss


class Objective:
    """The loss terms of one training step; which ones the built model decides (its IG head, its projector)."""

    def __init__(self, model: nn.Module, cfg: DictConfig) -> None:
        """`model` may live on the meta device: only its parts are looked at, and kept for `check_targets`."""
        self.model = model
        self.prediction = getattr(model, "prediction", "velocity")
        self.t_eps = float(getattr(model, "t_eps", 0.0))
        self.cos_weight = float(cfg.flow.cos_weight)
        self.ig = getattr(model, "ig_depth", None) is not None
        self.ig_weight = float(cfg.train.ig_weight)
        self.repa = getattr(model, "repa_depth", None) is not None
        r = cfg.train.repa
        self.repa_weight, self.repa_kind, self.interpolate = float(r.weight), str(r.loss), bool(r.interpolate)
        self.repa_until = None if r.until_step is None else int(r.until_step)
        # LightningDiT knows its target encoder (SFD's repa_dino_version); DiT^DH only its width (z_dim).
        self.repa_encoder = getattr(model, "repa_encoder", None) or cfg.model.repa_encoder
        self.semantic_first = sfd.is_semantic_first(model)
        self.channel_weights = None
        if self.semantic_first:
            self.delta, self.channels, self.semantic_chans = model.semfirst_delta_t, model.in_channels, model.semantic_chans
            self.channel_weights = sfd.channel_weights(self.channels, self.semantic_chans, cfg.flow.semantic_beta)

    def path(self, x: torch.Tensor, eps: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, the model's t, the velocity target) of data x, noise eps and time draws u [B]; a semantic-first
        model's t is [B, 2] = (t_tex, t_sem) and its channel groups are noised at their own times."""
        if not self.semantic_first:
            x_t = flow.interpolate(x, eps, u)
            if self.prediction == "x":
                return x_t, u, flow.x_to_velocity(x, x_t, u, self.t_eps)
            return x_t, u, flow.velocity_target(x, eps)
        target = flow.velocity_target(x, eps)
        t = sfd.times(u, self.delta)
        return flow.interpolate(x, eps, sfd.channel_times(t, self.channels, self.semantic_chans)), t, target

    def check_targets(self, latent_shape: tuple[int, int, int], feature_shape: tuple[int, int]) -> None:
        """REPA targets of `feature_shape` (tokens, dim) must fit the projector's output on latents of `latent_shape`,
        waypoint targets the waypoint generator's output: a MismatchError before any compute otherwise. Runs the
        model on the meta device (no memory, no work)."""
        with torch.device("meta"):
            model = self.model.to("meta")
            x, t = torch.zeros(1, *latent_shape), torch.zeros(1, 2) if self.semantic_first else torch.zeros(1)
            y = torch.zeros(1, dtype=torch.long)
            if self.prediction == "waypoints":
                out = tuple(model(x, t, y).shape[1:])
                if out != tuple(feature_shape):
                    raise MismatchError(f"the waypoint generator predicts {out[0]} tokens of {out[1]} dims, the "
                                        f"waypoint targets (train.waypoints) are {feature_shape[0]} x {feature_shape[1]}: "
                                        "the PCA's dim must be model.options.waypoint_dim, and the grid the model's")
                return
            _, projected = model(x, t, y, return_repa=True)
        tokens, dim = feature_shape
        if projected.shape[-1] != dim:
            raise MismatchError(f"REPA: the projector gives {projected.shape[-1]}-d tokens, the target features of "
                                f"{self.repa_encoder} are {dim}-d (model.repa_encoder names the encoder)")
        if not self.interpolate:
            match_grid(torch.zeros(1, tokens, dim, device="meta"), projected.shape[1], False)

    def repa_active(self, step: int) -> bool:
        return self.repa and (self.repa_until is None or step < self.repa_until)

    def __call__(self, forward: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], x_t: torch.Tensor,
                 t: torch.Tensor, y: torch.Tensor, drop: torch.Tensor, target: torch.Tensor,
                 features: torch.Tensor | None, step: int,
                 autocast: Callable[[], AbstractContextManager]) -> dict[str, torch.Tensor]:
        """Scalars ``loss`` (what is minimised), ``mse``, ``cos`` and, when on, ``ig_mse`` and ``repa``; a waypoint
        generator's are ``loss`` and ``mse`` (the unweighted squared error of its waypoints), `features` its targets."""
        if self.prediction == "waypoints":
            with autocast():
                s0_hat = forward(x_t, t, y, force_drop_ids=drop)
            loss = waypoint_loss(s0_hat, features.to(s0_hat.device), t, self.t_eps)
            return {"loss": loss, "mse": (s0_hat.float() - features.float().to(s0_hat.device)).pow(2).mean().detach()}
        with autocast():
            out = forward(x_t, t, y, force_drop_ids=drop, return_ig=self.ig, return_repa=self.repa)
        v, rest = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
        losses = flow.flow_loss(v, target, self.cos_weight, self.channel_weights)
        if self.ig:
            losses["ig_mse"] = (rest.pop(0).float() - target.float()).pow(2).mean()
            losses["loss"] = losses["loss"] + self.ig_weight * losses["ig_mse"]
        if self.repa:
            projected = rest.pop(0)
            if self.repa_active(step):
                aligned = match_grid(features.to(projected.device), projected.shape[1], self.interpolate)
                losses["repa"] = repa_loss(projected, aligned, self.repa_kind)
                losses["loss"] = losses["loss"] + self.repa_weight * losses["repa"]
            else:  # switched off (HASTE): the projector stays in the graph, so DDP finds every parameter used
                losses["loss"] = losses["loss"] + 0 * projected.sum()
        return losses
