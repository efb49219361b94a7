"""Training batches from latent stores or encoded on the fly, the latent config, and decoding of generated latents.

A latent config, `configs/latent/<name>.yaml` (selected by `--latent <name>`):

    stores: [/data/latents/a.zarr, ...]   # local paths or fsspec URLs, rows concatenated in this order
    tokenizer: vavae:/ckpt/vavae.pt       # decodes the latents: saved tokenizer folder or family:official_path
    normalization: store                  # store: (z - mean) / std with the statistics below
                                          #   (z / std where they have no mean); none: latents as stored
    stats: null                           # an RAE statistics file ({'mean': Tensor | None, 'var': Tensor}, as
                                          #   released): replaces the stores' statistics; null: the stores'
    online: null                          # {data: <data config name | YAML path | mapping>, workers: min(4, cores)}: read the
                                          #   images and encode them with `tokenizer` at every step instead of
                                          #   reading stores (latents/online.py); `stores`, if also given, only
                                          #   supply statistics, and one of `stats` or `stores` is required
    multiplier: 1.0                       # x = normalised z * multiplier (LightningDiT's latent_multiplier)
    cache_dir: null                       # null: the loader caches the latents in RAM; a local folder:
                                          #   in a memory-mapped .npy there, shared by the ranks of a node
    generator: lightningdit_xl1           # configs/generator/<name>.yaml trained by default on these latents

A preset (`preset=demo` on the command line) may hold a section `latent: {<name>: {...}}` that is
merged into the latent config of that name, e.g. the demo's store and tokenizer paths.

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

import copy
import difflib
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from core.config import ConfigError, named_config
from core.errors import CorruptFileError, MismatchError, UserError
from core.images import default_workers
from core.log import get_logger
from latents.store import LatentStore, Stats, combined_stats, shard_problem

log = get_logger("latents.dataset")

LATENT_DEFAULTS = {"stores": None, "tokenizer": None, "normalization": "store", "stats": None, "online": None,
                   "multiplier": 1.0, "cache_dir": None, "generator": "lightningdit_xl1"}
ONLINE_DEFAULTS = {"data": None, "workers": default_workers()}


def _check_keys(cfg: DictConfig, known: Mapping[str, Any], what: str) -> None:
    for key in cfg.keys():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            raise ConfigError(f"unknown {what} key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))


def load_latent_config(name_or_cfg: str | Path | Mapping[str, Any], preset: str | None = None) -> DictConfig:
    """A latent config by name (configs/latent), YAML path, or an already composed mapping; checked.

    `preset`: merge the section `latent.<name>` of configs/preset/<preset>.yaml, if it has one (a
    name or path only; a mapping is taken as already composed).
    """
    if isinstance(name_or_cfg, (str, Path)):
        cfg = named_config("latent", str(name_or_cfg))
        if preset is not None:
            section = OmegaConf.select(named_config("preset", preset), f"latent.{Path(str(name_or_cfg)).stem}")
            if section is not None:
                _check_keys(section, LATENT_DEFAULTS, f"preset/{preset}.yaml latent config")
                cfg = OmegaConf.merge(cfg, section)
    else:
        cfg = OmegaConf.create(OmegaConf.to_container(name_or_cfg, resolve=True) if isinstance(name_or_cfg, DictConfig) else dict(name_or_cfg))
    _check_keys(cfg, LATENT_DEFAULTS, "latent config")
    cfg = OmegaConf.merge(OmegaConf.create(LATENT_DEFAULTS), cfg)
    if isinstance(cfg.stores, str):
        cfg.stores = [cfg.stores]
    if cfg.online is not None:
        _check_keys(cfg.online, ONLINE_DEFAULTS, "latent config 'online'")
        cfg.online = OmegaConf.merge(OmegaConf.create(ONLINE_DEFAULTS), cfg.online)
        if not cfg.online.data:
            raise ConfigError("latent config 'online' needs 'data': a data config name (configs/data), a YAML path "
                              "or a mapping")
    elif not cfg.stores:
        raise ConfigError("a latent config needs 'stores' (latent store paths or URLs) or 'online' (images encoded "
                          "on the fly)")
    if not cfg.tokenizer:
        raise ConfigError("a latent config needs 'tokenizer': the tokenizer that decodes its latents")
    if cfg.normalization not in ("store", "none"):
        raise ConfigError(f"latent config 'normalization' must be 'store' or 'none', got {cfg.normalization!r}")
    if cfg.stats and cfg.normalization == "none":
        raise ConfigError("latent config gives 'stats' but normalization is 'none'; drop one of them")
    if cfg.online is not None and cfg.normalization == "store" and not cfg.stats and not cfg.stores:
        raise ConfigError(
            "an online latent config needs statistics to normalise the latents it encodes: 'stats: <file>' (an RAE "
            "stat.pt such as the released one) or 'stores' whose statistics are used (e.g. a store extracted with "
            "--stats element --no-mean); or set normalization: none")
    return cfg


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


@dataclass(frozen=True)
class LatentInfo:
    latent_shape: tuple[int, int, int]
    num_classes: int
    num_rows: int  # valid rows over all stores, or images of the online source
    stores: tuple[LatentStore, ...]  # online: the stores that supply statistics, if any


def open_stores(urls: list[str] | None) -> tuple[LatentStore, ...]:
    """The stores of a config, checked to agree on shape, classes and tokenizer."""
    stores = tuple(LatentStore(url) for url in urls or ())
    for first, s in zip(stores, stores[1:]):
        if s.latent_shape != first.latent_shape or s.num_classes != first.num_classes:
            raise MismatchError(f"latent stores disagree: {first.url} has shape {first.latent_shape} and {first.num_classes} "
                             f"classes, {s.url} has {s.latent_shape} and {s.num_classes}")
        if s.tokenizer.get("name") != first.tokenizer.get("name") or s.tokenizer.get("config") != first.tokenizer.get("config"):
            raise MismatchError(f"latent stores {first.url} and {s.url} were made by different tokenizers")
    return stores


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


def official_normalizer(cfg: DictConfig) -> Normalizer:
    """The normalisation of the config's `stats` file (RAE's released format; std = sqrt(var + 1e-5))."""
    from tokenizers.rae import load_official_stats

    mean, std = load_official_stats(cfg.stats)
    return Normalizer(mean, std, cfg.multiplier)


def normalizer_for(cfg: DictConfig, stores: tuple[LatentStore, ...] | None = None) -> Normalizer:
    """`stats` if given, else the stores' combined statistics (`stores` opened already, or those of `cfg`)."""
    if cfg.normalization == "none":
        return Normalizer(None, None, cfg.multiplier)
    if cfg.stats:
        return official_normalizer(cfg)
    stores = open_stores(cfg.stores) if stores is None else stores
    return Normalizer.from_stats(combined_stats(list(stores)), cfg.multiplier)


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


@functools.lru_cache(maxsize=2)
def cached_tokenizer(spec: str) -> tuple[Any, dict[str, Any]]:
    """`latents.extract.open_tokenizer(spec)`, loaded once per process (decoding and online encoding share it).
    Only the name and config of its provenance are compared with stores, so the weights are not hashed."""
    from tokenizers.base import open_tokenizer

    return open_tokenizer(spec, checksum=False)


def check_made_by(tok_info: Mapping[str, Any], spec: str, store: LatentStore) -> None:
    made_by = store.tokenizer
    if tok_info["name"] != made_by.get("name") or tok_info["config"] != made_by.get("config"):
        raise MismatchError(f"tokenizer {spec} ({tok_info['name']}) is not the one that made {store.url} "
                         f"({made_by.get('name')} with config {made_by.get('config')})")


def latent_decoder(source: BatchLoader | str | Path | Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from normalised latents (as the loader gives and a generator samples) to images in [-1, 1].

    `source` is a loader from `build_latent_loader` or a latent config. The setup happens here, once: the
    tokenizer it names is loaded and checked against the one that made the stores, the statistics are
    read. The function runs the tokenizer on the latents' device.
    """
    if isinstance(source, BatchLoader):
        if source.config is None:
            raise ValueError("this loader was not built from a latent config (build_latent_loader), so it names no tokenizer")
        cfg, stores, normalizer = source.config, source.stores, source.normalizer
    else:
        cfg = load_latent_config(source)
        stores = open_stores(cfg.stores)
        normalizer = normalizer_for(cfg, stores)
    tok, tok_info = cached_tokenizer(str(cfg.tokenizer))
    if stores:
        check_made_by(tok_info, cfg.tokenizer, stores[0])

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        tok.to(latents.device)
        return tok.decode(normalizer.denormalize(latents))

    return decode


def decode_latents(source: BatchLoader | str | Path | Mapping[str, Any], latents: torch.Tensor) -> torch.Tensor:
    """`latent_decoder(source)(latents)`: for one batch; build the decoder once for many."""
    return latent_decoder(source)(latents)
