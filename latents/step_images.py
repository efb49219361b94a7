"""The images of a training step, read ahead of the step by DataLoader worker processes.

Shared by the loaders that train on images: latents/online.py encodes them, latents/pixels.py trains on them.
Item k of `StepImages` is one rank's part of step k's global batch, rows and views as `BatchSchedule(k)` picks
them: uint8 images [b, 3, H, W] (mirrored where the view says so) and int64 labels. uint8 is a quarter of the
float32 bytes through the worker queues, the pinned buffers and the host-to-device copy; the loader converts
on its device (core.images.to_float: the same bits as the sources' own float images).

Rows come from a `RowReader`: `DecodedRows` decodes and ADM-crops the files of a data source, skipping and
logging those that cannot be decoded (core.images.Skipping), so that step's batch is smaller by them; an image
store (latents/image_store.py) reads its pre-cropped rows instead.
"""
from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Protocol

import numpy as np
import torch

from core.config import named_config, to_dict
from core.images import Skipping, build_source
from core.log import get_logger

log = get_logger("latents.step_images")


def resolve_data(data: Any) -> dict[str, Any] | None:
    """A latent config's `online.data` or `pixels.data`: a data config name (configs/data), a YAML path or the config
    itself, as a plain dict; None when not given."""
    if not data:
        return None
    return to_dict(named_config("data", data) if isinstance(data, str) else data)


def cached_source(data: dict[str, Any]) -> Any:
    """core.images.build_source(data), built once per process: listing ImageNet takes seconds, and latent_info and
    the loader both need the source."""
    return _source(json.dumps(data, sort_keys=True))


@functools.lru_cache(maxsize=2)
def _source(data_json: str) -> Any:
    return build_source(json.loads(data_json))


class RowReader(Protocol):
    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(uint8 images [n, 3, H, W], int64 labels [n], kept: bool [len(rows)]) of the source rows `rows`, in
        their order; n = kept.sum(), the rows that could be read."""


class DecodedRows:
    """Rows of a data source (core.images.build_source), decoded and ADM-cropped; bad files skipped and logged."""

    def __init__(self, source: Any) -> None:
        self.source, self.items = source, Skipping(source, uint8=True)

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        items = [self.items[r] for r in rows.tolist()]
        for item in items:
            if item.error is not None:
                log.warning("skipped %s (%s)", self.source.where(item.index), item.error)
        good = [item for item in items if item.error is None]
        size = self.source.image_size
        images = torch.stack([item.image for item in good]) if good else torch.empty((0, 3, size, size), dtype=torch.uint8)
        labels = torch.tensor([item.label for item in good], dtype=torch.int64)
        return images, labels, np.array([item.error is None for item in items], dtype=bool)


class StepImages(torch.utils.data.Dataset):
    """Item k: (uint8 images [n, 3, H, W], labels int64 [n], kept bool [b]) of one rank's part of step k, mirrored
    where drawn; `kept` says which of its b positions could be read (n of them)."""

    def __init__(self, read: RowReader, schedule: Any) -> None:
        self.read, self.schedule = read, schedule

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, flips = self.schedule(step)
        images, labels, kept = self.read(rows)
        if not len(labels):
            raise ValueError(f"no image of step {step} could be read")
        mirror = torch.from_numpy(flips[kept].astype(bool))
        images[mirror] = images[mirror].flip(-1)
        return images, labels, torch.from_numpy(kept)


class Prefetch:
    """Item `step` of a dataset indexed by step, made by `workers` processes a few steps ahead (pinned with `pin`);
    a call at another step than the next (start, resume) restarts them there. `workers=0`: made in this process."""

    def __init__(self, dataset: torch.utils.data.Dataset, workers: int, pin: bool) -> None:
        self.dataset, self.workers, self.pin = dataset, int(workers), pin
        self._items, self._next = None, None

    def __call__(self, step: int) -> Any:
        if self.workers == 0:
            return self.dataset[step]
        if self._next != step:
            self._items = iter(torch.utils.data.DataLoader(
                self.dataset, batch_size=None, sampler=itertools.count(step), num_workers=self.workers,
                pin_memory=self.pin))
        self._next = step + 1
        return next(self._items)
