"""Latents encoded on the fly: a latent config's `online` source, as the official RAE training does it.

RAE's latents are 768x16x16 (384 KB a view in float16, about 1 TB for ImageNet with flips), so
instead of reading a store the loader reads the images of step k, mirrors those whose view says so,
and encodes them with the frozen tokenizer on the training device. The rows and views of a step are
chosen exactly as for a store (`latents.dataset.BatchLoader`): a seeded permutation per epoch of
the data set and a flip drawn from (seed, step), so batches are a pure function of (seed, step)
and a resumed run sees the batches an uninterrupted one would. The latents are normalised with
the config's statistics (`stats`, e.g. RAE's released file, or the statistics of `stores`).

REPA target features (a `FeatureRequest`): the frozen encoder (tokenizers.encoders.build_feature_encoder), and the
request's waypoint PCA if it names one, run on the same device, under no_grad, on the very images the tokenizer
encodes (mirrored alike), and `batch(step)` returns them third (latents.dataset.FeatureTargets).

Images are decoded in `online.workers` background processes that work a few steps ahead
(latents/step_images.py, shared with the pixel loader); the encoder runs in the training process. An image that cannot be decoded is skipped and logged, so
that step's batch is one sample smaller.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from core.errors import MismatchError
from core.images import to_float
from core.log import get_logger
from latents.dataset import BatchLoader, FeatureRequest, FeatureTargets
from latents.decode import cached_tokenizer
from latents.normalize import Normalizer
from latents.step_images import DecodedRows, Prefetch, StepImages, cached_source, resolve_data
from latents.store import LatentStore

log = get_logger("latents.online")


def open_source(cfg: DictConfig) -> tuple[Any, int]:
    """The data source of an online config and its image size."""
    data = resolve_data(cfg.online.data)
    return cached_source(data), int(data["image_size"])


def online_info(cfg: DictConfig) -> tuple[tuple[int, int, int], int, int, dict[str, Any]]:
    """(latent shape, classes, images, tokenizer provenance) without encoding anything."""
    source, size = open_source(cfg)
    tok, tok_info = cached_tokenizer(str(cfg.tokenizer))
    expected = getattr(tok, "image_size", size)  # RAE is built for one image size; VA-VAE takes any multiple of 16
    if expected != size:
        raise MismatchError(f"tokenizer {cfg.tokenizer} encodes {expected} px images, the online data gives {size} px "
                         "(set image_size in the data config)")
    return tuple(tok.latent_shape(size)), int(source.num_classes), len(source), tok_info


class OnlineLoader(BatchLoader):
    """Batches encoded from images at every step, on `device` (see the module docstring)."""

    def __init__(self, cfg: DictConfig, normalizer: Normalizer, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, device: torch.device | str | None = None,
                 stores: tuple[LatentStore, ...] = (), features: FeatureRequest | None = None) -> None:
        source, size = open_source(cfg)
        self.device = torch.device(device or "cpu")
        super().__init__(len(source), normalizer.to(self.device), batch_size, seed, rank, world_size, start_step, cfg)
        self.stores = list(stores)  # the statistics' source, if any (decode_latents checks the tokenizer against it)
        self.tokenizer, _ = cached_tokenizer(str(cfg.tokenizer))
        self.tokenizer.to(self.device).eval()
        self.latent_shape, self.num_classes = tuple(self.tokenizer.latent_shape(size)), int(source.num_classes)
        self.targets = None if features is None else FeatureTargets(features, size, self.device)
        self.feature_shape = None if self.targets is None else self.targets.shape
        self.images = StepImages(DecodedRows(source), self.schedule)  # uint8, mirrored where drawn
        self._prefetch = Prefetch(self.images, cfg.online.workers, pin=self.device.type == "cuda")

    @torch.no_grad()
    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        images, labels, self.kept = self._prefetch(step)
        images = to_float(images.to(self.device, non_blocking=True))
        out = (self.normalizer.normalize(self.tokenizer.encode(images).float()), labels.to(self.device))
        return out if self.targets is None else (*out, self.targets(images))
