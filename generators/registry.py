"""Builds a generator (Denoiser) from the `model` section of a generator config."""
from __future__ import annotations

from typing import Any

from torch import nn

from core.config import to_dict


def build_generator(model_cfg: Any) -> nn.Module:
    cfg = to_dict(model_cfg) if not isinstance(model_cfg, dict) else dict(model_cfg)
    family = cfg.pop("family")
    size = cfg.pop("size")
    options = cfg.pop("options", None) or {}
    if family == "lightningdit":
        from generators.lightningdit import build_lightningdit

        return build_lightningdit(size, **cfg, **options)
    if family == "ddt":
        from generators.ddt import build_ddt

        return build_ddt(size, **cfg, **options)
    raise ValueError(f"unknown generator family {family!r}; known: lightningdit, ddt")
