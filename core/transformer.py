"""Transformer parts shared by tokenizers and generators: RMSNorm, SwiGLU, 2-D RoPE and attention.

They live below both stages because FAE's feature decoder (tokenizers/fae.py) is built from LightningDiT's
blocks without the adaLN. Module and parameter names follow the official LightningDiT code, so its
checkpoints load strictly into models built from these pieces.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from core.errors import UserError


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight; normalised in fp32 so bf16 activations keep their precision."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def make_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """The block norm: RMSNorm, or DiT's affine-free LayerNorm (adaLN supplies scale and shift)."""
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class SwiGLUFFN(nn.Module):
    """Fused SwiGLU: ``w12`` yields [gate | value]; SiLU acts on the gate half."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def make_ffn(dim: int, mlp_ratio: float, use_swiglu: bool) -> nn.Module:
    """SwiGLU with hidden int(2/3 * ratio * dim) (same parameter budget), or timm's GELU-tanh Mlp."""
    hidden = int(dim * mlp_ratio)
    if use_swiglu:
        return SwiGLUFFN(dim, int(2 / 3 * hidden))
    return Mlp(dim, hidden, act_layer=functools.partial(nn.GELU, approximate="tanh"), drop=0)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a quarter turn of each adjacent pair."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRoPE2D(nn.Module):
    """2-D rotary embedding laid out as EVA-02's ``VisionRotaryEmbeddingFast``.

    The first half of each head's channels is rotated by the token's row index, the second
    half by its column index; each frequency 10000^(-4k/head_dim) drives one adjacent pair.
    Tokens are in row-major (PatchEmbed flatten) order. ``freqs_cos``/``freqs_sin`` (T, head_dim)
    are persistent buffers because the official checkpoints contain them.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        half = head_dim // 2
        inv_freq = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)
        # Written as EVA writes it (i / L * L) so the buffers match the official ones bit for bit.
        pos = torch.arange(grid_size) / grid_size * grid_size
        angles = torch.outer(pos, inv_freq).repeat_interleave(2, dim=-1)  # (L, half)
        rows = angles[:, None, :].expand(grid_size, grid_size, half)
        cols = angles[None, :, :].expand(grid_size, grid_size, half)
        freqs = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
        self.register_buffer("freqs_cos", freqs.cos())
        self.register_buffer("freqs_sin", freqs.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., T, head_dim) -> same shape and dtype."""
        return (x * self.freqs_cos + rotate_pairs(x) * self.freqs_sin).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention on SDPA; q/k norm (optional) then RoPE (optional) on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # The official q/k LayerNorm is timm's default nn.LayerNorm (affine, eps 1e-5).
        qk = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.q_norm = qk(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = qk(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor, rope: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, N, head_dim] of tokens x [B, N, D]: q and k normed, then rotated by `rope`."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        B, N, C = x.shape
        x = F.scaled_dot_product_attention(*self.heads(x, rope))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))
