"""Fixed 2-D sin-cos position tables (DiT/MAE layout), used by tokenizer decoders and generators alike."""
from __future__ import annotations

import torch

from core.errors import UserError


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed (grid_size², dim) table in DiT/MAE layout.

    The first dim/2 channels encode the column (w) coordinate, the second half the row (h);
    each half is [sin | cos] with frequencies 10000^(-k/(dim/4)). Computed in float64.
    """
    if dim % 4:
        raise UserError(f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)
