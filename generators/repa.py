"""REPA's alignment term (Yu et al. 2025): a generator's projected tokens after block k against a frozen encoder's.

The model holds the projector (its family's official one) and returns its output with ``return_repa=True``;
the targets are the encoder's final-norm patch tokens of the batch's images, from the latent store or computed
online (latents.dataset.build_latent_loader ``features=``). Facts: reference ddt_sfd_repa_ig.md §3, §5, §6.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.errors import MismatchError, UserError

LOSSES = ("cos", "cos_mse", "mse")


def match_grid(target: torch.Tensor, tokens: int, interpolate: bool) -> torch.Tensor:
    """Targets [B, T', D] on the model's grid of `tokens` tokens: as they are when T' == tokens, else resampled
    (bilinear, antialiased when it shrinks) if `interpolate`, else a MismatchError that names both grids.
    REPA itself never resamples: its 224 px DINOv2 grid is 16x16, the SiT-XL/2 grid at 256 px."""
    have = target.shape[1]
    if have == tokens:
        return target
    side, want = math.isqrt(have), math.isqrt(tokens)
    if not interpolate or side * side != have or want * want != tokens:
        raise MismatchError(f"REPA: the target features have {have} tokens ({side}x{side}) but the model's block "
                            f"has {tokens} ({want}x{want}); feed the encoder another image size, or set "
                            "train.repa.interpolate=true to resample the targets")
    grid = target.transpose(1, 2).reshape(target.shape[0], -1, side, side).float()
    grid = F.interpolate(grid, size=(want, want), mode="bilinear", align_corners=False, antialias=want < side)
    return grid.flatten(2).transpose(1, 2).to(target.dtype)


def repa_loss(projected: torch.Tensor, target: torch.Tensor, kind: str = "cos") -> torch.Tensor:
    """The alignment loss of projected tokens [B, T, D] against targets [B, T, D], in fp32.

    ``cos``: mean over tokens and batch of 1 - cos (REPA's -cos, up to the constant; DDT, SFD's 4M recipe);
    ``cos_mse``: SFD's 80-epoch (cos + MSE) / 2; ``mse``: RAEv2's MSE.
    """
    if kind not in LOSSES:
        raise UserError(f"train.repa.loss={kind!r}; choose from {', '.join(LOSSES)}")
    if projected.shape != target.shape:
        raise MismatchError(f"REPA: the projector gives tokens {tuple(projected.shape[1:])}, the targets are "
                            f"{tuple(target.shape[1:])}: model.repa_encoder must name the encoder of the features")
    projected, target = projected.float(), target.float()
    cos = (1 - F.cosine_similarity(projected, target, dim=-1)).mean()
    if kind == "cos":
        return cos
    mse = (projected - target).pow(2).mean()
    return mse if kind == "mse" else (cos + mse) / 2
