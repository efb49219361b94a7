"""Transformer pieces shared by the diffusion generators (LightningDiT, DiT-DH, ...); the norm, SwiGLU, RoPE and
attention are core/transformer.py's, which FAE's feature decoder uses too.

Module and parameter names follow the official LightningDiT code, so its checkpoints load
strictly into models built from these pieces.
"""
from __future__ import annotations

import math

import torch
from timm.layers import PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.errors import UserError
from core.transformer import Attention, RMSNorm, SwiGLUFFN, VisionRoPE2D, make_ffn, make_norm, rotate_pairs

__all__ = [
    "RMSNorm",
    "make_norm",
    "SwiGLUFFN",
    "make_ffn",
    "VisionRoPE2D",
    "rotate_pairs",
    "Attention",
    "modulate",
    "adaln_modulation",
    "TimestepEmbedder",
    "timestep_embedding",
    "LabelEmbedder",
    "PatchEmbed",
    "LightningDiTBlock",
    "FinalLayer",
    "repa_mlp",
    "check_depth",
    "pack_outputs",
    "run_block",
]


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift on tokens x [B, T, D]; shift may be absent (LightningDiT's wo_shift).

    shift/scale are per sample [B, D] (broadcast over the tokens) or per token [B, T, D] (DiT^DH's head).
    """
    if scale.ndim < x.ndim:
        scale = scale.unsqueeze(1)
        shift = None if shift is None else shift.unsqueeze(1)
    x = x * (1 + scale)
    return x if shift is None else x + shift


def adaln_modulation(dim: int, chunks: int) -> nn.Sequential:
    """SiLU -> Linear(dim, chunks*dim); the Linear is zeroed at init (adaLN-Zero) by the model."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous t (used raw, no x1000), ordered [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding with a null row (index ``num_classes``) for classifier-free guidance.

    As in the official code the null row exists only when ``dropout_prob > 0``. Labels are
    dropped at random only in training mode; ``force_drop_ids`` (bool or 0/1 per sample)
    drops exactly those samples in any mode.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            drop = force_drop_ids.bool()
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = None
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class LightningDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero; chunk order shift, scale, gate (x2).

    The condition c is one vector per sample [B, D] or one per token [B, T, D] (DiT^DH's head).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        use_qknorm: bool = False,
        use_swiglu: bool = False,
        use_rmsnorm: bool = False,
        wo_shift: bool = False,
    ):
        super().__init__()
        self.norm1 = make_norm(hidden_size, use_rmsnorm)
        self.norm2 = make_norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        self.mlp = make_ffn(hidden_size, mlp_ratio, use_swiglu)
        self.wo_shift = wo_shift
        self.adaLN_modulation = adaln_modulation(hidden_size, 4 if wo_shift else 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        if mod.ndim < x.ndim:  # one condition per sample: broadcast it over the tokens
            mod = mod.unsqueeze(1)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Norm, adaLN (shift, scale; no gate) and the linear map from tokens to patch pixels.

    The condition c is one vector per sample [B, D] or one per token [B, T, D] (DiT^DH's head).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        self.norm_final = make_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = adaln_modulation(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def zero_modulation_and_output(blocks: nn.ModuleList, final_layer: nn.Module) -> None:
    """adaLN-Zero init: every modulation output and the final projection start at zero."""
    for layer in [b.adaLN_modulation[-1] for b in blocks] + [final_layer.adaLN_modulation[-1], final_layer.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def repa_mlp(hidden_size: int, projector_dim: int, feature_dim: int) -> nn.Sequential:
    """REPA's token-wise projector (sihyun-yu/REPA, SFD): Linear, SiLU, Linear, SiLU, Linear (keys .0, .2, .4)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, feature_dim),
    )


def check_depth(what: str, keyword: str, depth: int, num_blocks: int) -> None:
    """A 1-based block number (as the REPA and IG papers count) must name one of the first `num_blocks` blocks."""
    if not 1 <= depth <= num_blocks:
        raise UserError(f"{keyword}={depth}: the {what} reads the output of block {depth} (1-based), "
                        f"but the model has blocks 1..{num_blocks}")


def pack_outputs(v: torch.Tensor, v_mid: torch.Tensor | None, repa: torch.Tensor | None, return_ig: bool,
                 return_repa: bool) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A generator forward's result: v alone, or (v, v_mid) with ``return_ig``, (v, repa tokens) with
    ``return_repa``, (v, v_mid, repa tokens) with both. Asking for what the model lacks is an error."""
    if return_ig and v_mid is None:
        raise UserError("return_ig=True, but this model has no internal-guidance head (set model.ig_depth)")
    if return_repa and repa is None:
        raise UserError("return_repa=True, but this model has no REPA projector (set model.repa_depth)")
    extra = ([v_mid] if return_ig else []) + ([repa] if return_repa else [])
    return (v, *extra) if extra else v


def run_block(
    block: nn.Module, x: torch.Tensor, c: torch.Tensor, rope: nn.Module | None, use_checkpoint: bool
) -> torch.Tensor:
    """block(x, c, rope), recomputed in the backward pass instead of storing activations when
    ``use_checkpoint`` is set and gradients are on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, x, c, rope, use_reentrant=False)
    return block(x, c, rope)
