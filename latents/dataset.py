"""Training batches of a latent config (latents/config.py): from latent stores, or encoded on the fly (latents/online.py).

Reading: random rows straight from Zarr reach only a few thousand per second, so the loader copies
the valid rows of every store, both views, once into one uncompressed array [rows, 2, C, h, w] (in
RAM or memory-mapped) and gathers batches from it with one `index_select`.

Batches are a pure function of (seed, step) (`BatchSchedule`): the global batch at step k is positions
[k*B, (k+1)*B) of the concatenation of per-epoch permutations of the valid rows, each sample's view
(plain or mirrored) is drawn from a generator seeded with (seed, k), and rank r of W takes the r-th
of W equal slices. So a resumed run sees exactly the batches an uninterrupted one would, and
changing the number of processes changes only how a global batch is split. The online loader
follows the same rule over the images of its data source.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig

from core.errors import CorruptFileError, MismatchError, UserError
from core.log import get_logger
from latents.config import load_latent_config
from latents.normalize import Normalizer, normalizer_for, official_normalizer
from latents.store import LatentStore, check_made_by, open_stores, shard_problem

log = get_logger("latents.dataset")

@dataclass(frozen=True)
class LatentInfo:
    latent_shape: tuple[int, int, int]
    num_classes: int
    num_rows: int  # valid rows over all stores, or images of the online source
    stores: tuple[LatentStore, ...]  # online: the stores that supply statistics, if any


def latent_info(latent_cfg: str | Path | Mapping[str, Any]) -> LatentInfo:
    """Shape, classes and size of a latent config's source, from metadata only (no latents read or encoded).

    Online: the shape comes from the tokenizer (which is loaded) and the classes from the data source.
    A trainer checks these against its model before any compute.
    """
    cfg = load_latent_config(latent_cfg)
    stores = open_stores(cfg.stores)
    if cfg.online is not None:
        from latents.online import online_info

        shape, num_classes, num_rows, tok_info = online_info(cfg)
        for s in stores:  # they supply the statistics of latents encoded here
            if s.latent_shape != shape:
                raise MismatchError(f"latent store {s.url} holds {s.latent_shape} latents, the online source makes {shape}")
            check_made_by(tok_info, cfg.tokenizer, s)
    else:
        shape, num_classes, num_rows = stores[0].latent_shape, stores[0].num_classes, sum(s.num_valid for s in stores)
    if cfg.stats and cfg.normalization == "store":
        std = official_normalizer(cfg).std
        if tuple(std.shape) not in (shape, (shape[0], 1, 1)):
            raise MismatchError(f"statistics {cfg.stats} are shaped {tuple(std.shape)}, the latents {shape}")
    return LatentInfo(shape, num_classes, num_rows, stores)


class BatchSchedule:
    """The rows and views of rank `rank`'s part of the global batch of every step, a pure function of (seed, step)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise UserError(f"global batch size {batch_size} is not divisible by the {world_size} processes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if num_rows == 0:
            raise UserError("the latent source holds no valid rows")
        self.num_rows, self.batch_size, self.local_batch_size = num_rows, batch_size, batch_size // world_size
        self.seed, self.rank = seed, rank
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_rows)
        return self._perms[epoch]

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of step `step` and their views (1: mirrored), int64."""
        lo = self.rank * self.local_batch_size
        pos = step * self.batch_size + lo + np.arange(self.local_batch_size)
        epochs, offsets = np.divmod(pos, self.num_rows)
        rows = np.empty(len(pos), dtype=np.int64)
        for e in np.unique(epochs):
            rows[epochs == e] = self._perm(int(e))[offsets[epochs == e]]
        flips = np.random.default_rng([self.seed, 1, step]).integers(0, 2, self.batch_size)[lo : lo + self.local_batch_size]
        return rows, flips


class BatchLoader:
    """Endless, deterministic, resumable batches of (normalised latents float32 [b, C, h, w], labels int64 [b]).

    `batch_size` is the global batch; each of the `world_size` ranks gets `batch_size // world_size` of it.
    `batch(step)` is a pure function of (seed, step): a subclass turns the rows and views that
    `self.schedule(step)` picks into latents. Iterating yields the batches of steps `step`,
    `step + 1`, ...; `state_dict()` holds the next step.
    """

    def __init__(self, num_rows: int, normalizer: Normalizer, batch_size: int, seed: int, rank: int, world_size: int,
                 start_step: int, config: DictConfig | None) -> None:
        self.schedule = BatchSchedule(num_rows, batch_size, seed, rank, world_size)
        self.num_rows, self.normalizer, self.config = num_rows, normalizer, config  # config: for decode_latents
        self.batch_size, self.seed, self.step = batch_size, seed, start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the global batch of training step `step`."""
        raise NotImplementedError

    def __iter__(self):
        while True:
            out = self.batch(self.step)
            self.step += 1
            yield out

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]}, this loader {getattr(self, key)}: "
                                 "a resumed run would see other batches")
        self.step = int(state["step"])


class LatentLoader(BatchLoader):
    """Batches from latent stores, cached whole (see the module docstring)."""

    def __init__(self, stores: list[LatentStore], normalizer: Normalizer, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start_step: int = 0, cache_dir: str | Path | None = None,
                 config: DictConfig | None = None) -> None:
        self.stores = list(stores)
        self.latent_shape, self.num_classes = self.stores[0].latent_shape, self.stores[0].num_classes
        cache, labels = load_cache(self.stores, cache_dir)
        super().__init__(len(labels), normalizer, batch_size, seed, rank, world_size, start_step, config)
        self._views = torch.from_numpy(cache).view(2 * self.num_rows, *self.latent_shape)  # row r: 2r plain, 2r+1 mirrored
        self._labels = torch.from_numpy(labels)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, flips = self.schedule(step)
        rows_t = torch.from_numpy(rows)
        z = self._views.index_select(0, 2 * rows_t + torch.from_numpy(flips))
        return self.normalizer.normalize(z), self._labels[rows_t]


def load_cache(stores: list[LatentStore], cache_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """All valid rows, both views: ([rows, 2, C, h, w], labels int64), in RAM or memory-mapped under cache_dir."""
    dtype = np.result_type(*[s.array("latents").dtype for s in stores])
    shape = (sum(s.num_valid for s in stores), 2, *stores[0].latent_shape)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if cache_dir is None:
        import psutil

        available = psutil.virtual_memory().available
        if nbytes > 0.8 * available:
            raise MemoryError(f"the latents need {nbytes / 2**30:.1f} GiB in RAM and {available / 2**30:.1f} GiB are "
                              "available; set cache_dir in the latent config to a local folder to memory-map them instead")
        cache, labels = np.empty(shape, dtype), np.empty(shape[0], np.int64)
        fill_cache(stores, cache, labels)
        return cache, labels
    key = hashlib.sha1(json.dumps([[s.url, s.attrs["created"], s.num_rows] for s in stores]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"latents-{key}.npy"
    if not path.is_file():  # concurrent builders each write a temporary file; the last rename wins
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        labels = np.empty(shape[0], np.int64)
        fill_cache(stores, cache, labels)
        cache.flush()
        del cache
        np.save(path.with_suffix(".labels.npy"), labels)
        os.replace(tmp, path)
    log.info("memory-mapping the latent cache %s (%.1f GiB)", path, nbytes / 2**30)
    # Copy-on-write mapping: writable for torch, never written, pages shared with other processes.
    return np.load(path, mmap_mode="c"), np.load(path.with_suffix(".labels.npy"))


def fill_cache(stores: list[LatentStore], cache: np.ndarray, labels: np.ndarray) -> None:
    """Copy the valid rows of each store, shard by shard (whole-shard reads are the fast way through Zarr)."""
    at = 0
    for store in stores:
        layout = store.layout
        lat, flip, lab, valid = (store.array(n) for n in ("latents", "latents_flip", "labels", "valid"))
        for k in range(layout.num_shards):
            start, stop = layout.shard_range(k)
            try:
                block = {"latents": lat[start:stop], "latents_flip": flip[start:stop], "valid": valid[start:stop]}
            except Exception as e:  # a damaged compressed chunk fails to decode in zarr or its codec
                raise CorruptFileError(f"latent store {store.url}: shard {k} (rows {start}..{stop}) cannot be read "
                                       f"({type(e).__name__}: {e}); run its extraction command again to write it anew: "
                                       f"{store.attrs.get('command', 'python -m latents.extract ...')}") from e
            if (why := shard_problem(store.group, layout, k, block)) is not None:
                raise CorruptFileError(f"latent store {store.url}: {why}. Run its extraction command again to write that "
                                       f"shard anew: {store.attrs.get('command', 'python -m latents.extract ...')}")
            keep = block["valid"]
            n = int(keep.sum())
            cache[at : at + n, 0] = block["latents"][keep]
            cache[at : at + n, 1] = block["latents_flip"][keep]
            labels[at : at + n] = lab[start:stop][keep]
            at += n


def build_latent_loader(latent_cfg: str | Path | Mapping[str, Any], batch_size: int, seed: int = 0, rank: int = 0,
                        world_size: int = 1, start_step: int = 0, device: torch.device | str | None = None,
                        info: LatentInfo | None = None) -> BatchLoader:
    """The training loader of a latent config; `batch_size` is global (split over `world_size` ranks).

    `device`: where an online source encodes (and returns) its latents; store batches stay on the CPU.
    `info`: the config's `latent_info`, when the caller has it already (it opens stores and statistics).
    """
    cfg = load_latent_config(latent_cfg)
    info = info or latent_info(cfg)
    normalizer = normalizer_for(cfg, info.stores)
    if cfg.online is not None:
        from latents.online import OnlineLoader

        return OnlineLoader(cfg, normalizer, batch_size, seed, rank, world_size, start_step, device, info.stores)
    return LatentLoader(list(info.stores), normalizer, batch_size, seed, rank, world_size, start_step, cfg.cache_dir, cfg)
