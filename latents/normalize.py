"""Latent normalisation: x = (z - mean) / std * multiplier, from a store's statistics or a released statistics file."""
from __future__ import annotations

import copy

import numpy as np
import torch
from omegaconf import DictConfig

from core.checkpoint import load_torch_weights
from core.errors import UserError
from latents.store import LatentStore, Stats, check_moments, combined_stats, open_stores


class Normalizer:
    """x = (z - mean) / std * multiplier, without the mean where there is none, and its inverse."""

    def __init__(self, mean: np.ndarray | None, std: np.ndarray | None, multiplier: float = 1.0) -> None:
        def shaped(a: np.ndarray | None) -> torch.Tensor | None:
            if a is None:
                return None
            t = torch.as_tensor(np.asarray(a), dtype=torch.float32)
            return t[:, None, None] if t.ndim == 1 else t  # per channel [C] or per element [C, h, w]

        self.mean = shaped(mean)
        self.std = shaped(std)
        self.multiplier = float(multiplier)
        # [1, 1, 1] rather than a 0-d tensor: a 0-d float32 would leave float16 input in float16.
        self.scale = self.multiplier / self.std if self.std is not None else torch.full((1, 1, 1), self.multiplier)
        self.shift = -self.mean * self.scale if self.mean is not None else None

    @classmethod
    def from_stats(cls, stats: Stats, multiplier: float = 1.0) -> "Normalizer":
        return cls(stats.mean, stats.std, multiplier)

    def to(self, device: torch.device | str) -> "Normalizer":
        """This normalisation with its tensors on `device`: batches there then need no copy per step."""
        moved = copy.copy(self)
        for name in ("mean", "std", "scale", "shift"):
            t = getattr(self, name)
            setattr(moved, name, None if t is None else t.to(device))
        return moved

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """float32 result; float16 input is converted in the same pass (the loader's hot path)."""
        scale = self.scale.to(z.device)
        if self.mean is None:
            return torch.mul(z, scale)
        return torch.addcmul(self.shift.to(z.device), z, scale)  # z * scale - mean * scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(torch.float32, copy=True).div_(self.scale.to(x.device))
        return z.add_(self.mean.to(x.device)) if self.mean is not None else z


class GroupedNormalizer:
    """The normalisation of latents joined along channels (a composite latent config): channels
    [sum(channels[:i]), sum(channels[:i + 1])) are group i's, normalised by `parts[i]`, its own statistics."""

    def __init__(self, parts: list[Normalizer], channels: list[int]) -> None:
        self.parts, self.channels = list(parts), [int(c) for c in channels]

    def _each(self, x: torch.Tensor, how: str) -> torch.Tensor:
        chunks = torch.split(x, self.channels, dim=1)
        return torch.cat([getattr(part, how)(chunk) for part, chunk in zip(self.parts, chunks)], dim=1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return self._each(z, "normalize")

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self._each(x, "denormalize")


def load_stats_file(path: str) -> tuple[np.ndarray | None, np.ndarray]:
    """(mean or None, std) float32 of a released statistics file, either
    - RAE's `stat.pt`, {'mean': Tensor | None, 'var': Tensor} per element: std = sqrt(var + 1e-5)
      (tokenizers.rae.load_official_stats); or
    - LightningDiT's and SFD's `latents_stats.pt` / `latents_sv_stats.pt`, {'mean', 'std'} shaped [1, C, 1, 1]:
      used as they are, (z - mean) / std, and returned per channel [C]."""
    from tokenizers.rae import load_official_stats

    state = load_torch_weights(path)
    if isinstance(state, dict) and "var" in state:
        return load_official_stats(path)
    mean, std = (state.get(k) if isinstance(state, dict) else None for k in ("mean", "std"))
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is not an RAE statistics file ({{'mean': Tensor or None, 'var': Tensor}}) nor a "
                        f"LightningDiT/SFD one ({{'mean': Tensor, 'std': Tensor}}); got {keys}")
    if mean.shape != std.shape:
        raise UserError(f"{path}: mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape")
    if mean.ndim == 4 and mean.shape[0] == 1 and mean.shape[2:] == (1, 1):  # the released [1, C, 1, 1]
        mean, std = mean.flatten(), std.flatten()
    return mean.float().numpy(), std.float().numpy()


def official_normalizer(cfg: DictConfig) -> Normalizer:
    """The normalisation of the config's `stats` file (load_stats_file: RAE's or LightningDiT's / SFD's format)."""
    mean, std = load_stats_file(cfg.stats)
    return Normalizer(mean, std, cfg.multiplier)


def normalizer_for(cfg: DictConfig, stores: tuple[LatentStore, ...] | None = None) -> Normalizer | GroupedNormalizer:
    """`stats` if given, else the stores' combined statistics (`stores` opened already, or those of `cfg`); with
    `posterior: sample`, those of the posterior samples (latents.store.Stats.of_samples), exact in expectation.

    A composite config (`groups`) gets a GroupedNormalizer, each group's as if it were alone; `stores` are then
    every group's, in group order (LatentInfo.stores)."""
    if cfg.get("groups") is not None:  # a group's own config has no 'groups'
        parts, channels, at = [], [], 0
        for group in cfg.groups:
            own = open_stores(group.stores) if not stores else tuple(stores[at : at + len(group.stores)])
            at += len(group.stores)
            parts.append(normalizer_for(group, own))
            channels.append(own[0].latent_shape[0])
        return GroupedNormalizer(parts, channels)
    if cfg.normalization == "none":
        return Normalizer(None, None, cfg.multiplier)
    if cfg.stats:
        return official_normalizer(cfg)
    stores = open_stores(cfg.stores) if stores is None else stores
    stats = combined_stats(list(stores))
    if cfg.get("posterior") == "sample":  # fresh posterior samples: their statistics, not the stored means'
        check_moments(stores)
        stats = stats.of_samples()
    return Normalizer.from_stats(stats, cfg.multiplier)
