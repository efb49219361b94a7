"""ADM-format sample files, the interface between sampling and evaluation: `arr_0` uint8 [N, H, W, 3] images and
an optional `arr_1` of integer labels (ADM's image_sample.py). Written by generators.sample and eval.make_ref, read
by eval (eval/npz.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.checkpoint import atomic_path
from core.errors import UserError


def check_uint8_nhwc(images: np.ndarray | torch.Tensor, what: str = "images") -> None:
    """Refuse anything but a uint8 [N, H, W, 3] array or tensor, the ADM sample layout."""
    dtype_ok = images.dtype in (np.uint8, torch.uint8)
    if not dtype_ok or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{what} must be uint8 [N, H, W, 3] (ADM layout), got {images.dtype} {tuple(images.shape)}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] floats in [-1, 1] -> uint8 [B, H, W, 3] by the official rule clamp(127.5·x + 128, 0, 255).

    The cast truncates, which equals rounding 127.5·x + 127.5 half up (DiT's sample_ddp.py, ADM).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    # float32 first: bf16 cannot hold 127.5·x + 128 to the unit.
    out = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def save_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write an ADM sample batch: `arr_0` uint8 NHWC and, if given, `arr_1` integer labels (ADM's image_sample.py)."""
    images = np.asarray(images)
    check_uint8_nhwc(images)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}")
        arrays["arr_1"] = labels
    with atomic_path(path) as tmp:
        save_npz(tmp, **arrays)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez to exactly `path` (given a name without ".npz", np.savez would append it)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)
