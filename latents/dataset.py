"""Training batches of a latent config (latents/config.py): from latent stores, encoded on the fly (latents/online.py),
or images themselves for pixel-space generators (latents/pixels.py).

Reading: random rows straight from Zarr reach only a few thousand per second, so the loader copies
the valid rows of every store, both views, once into one uncompressed array [rows, 2, C, h, w] (in
RAM or memory-mapped) and gathers batches from it with one `index_select`.

Batches are a pure function of (seed, step) (`BatchSchedule`): the global batch at step k is positions
[k*B, (k+1)*B) of the concatenation of per-epoch permutations of the valid rows, each sample's view
(plain or mirrored) is drawn from a generator seeded with (seed, k), and rank r of W takes the r-th
of W equal slices. So a resumed run sees exactly the batches an uninterrupted one would, and
changing the number of processes changes only how a global batch is split. The online loader
follows the same rule over the images of its data source. With `flips: false` in the latent config every
sample is the plain view (no flip augmentation, DDT) and only the plain views are cached (half the memory).

Posterior samples (`posterior: sample`, moments stores from `latents.extract --store-moments`, DDT's recipe): the
cache holds each row's posterior mean and log-variance, and every load draws z = mean + exp(logvar / 2) * eps
afresh, eps from a CPU generator seeded by (seed, NOISE_STREAM, group, step, the sample's position in the global
batch) (`posterior_noise`). At a step the position fixes the row and its view, so each draw, like the batch, is a
pure function of (seed, step): the same on 1 or N processes and after a resume, new at every step (a row seen
again is sampled again), distinct for two samples of one row in a step, and independent of the flow's noise
(core.runtime.step_generators seeds by (seed, step, position)) and of the other groups of a composite. The
normalisation then uses the statistics of the samples (latents.store.Stats.of_samples). The draws cost about 11 ms
a step for 256 samples of 4x32x32 on one CPU core (a process draws only its share).
`posterior: stored` (the default) over a moments store trains on its posterior means, as on a store of means,
normalised by the means' statistics; that is said once in the log.

REPA target features: with a `FeatureRequest` (`features=` of build_latent_loader), `batch(step)` returns
`(x, y, feats)`, feats float32 [b, tokens, dim] on x's device (`feature_shape`): for a store, its
`features` / `features_flip` rows, taken with the same view as the latents (cached like them); online, the
encoder applied to the very images of the step. Without a request batches are `(x, y)`.

Composite configs (latents/config.py `groups`, e.g. SFD's [texture 32 | semantic 16]): `CompositeLoader` caches
each group's stores as above and joins a step's latents along channels, each group normalised by its own
statistics; one schedule picks the rows and views for every group, and the groups' stores hold the same images
in the same row order (latent_info checks it), so all channels of a sample come from one image and one view.
Labels are the first group's (equal in all); REPA features come from the first group whose stores hold them.
Online groups are not supported.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig

from core.errors import CorruptFileError, MismatchError, UnknownNameError, UserError
from core.integrity import sha256_file
from core.log import get_logger
from core.runtime import derived_seed
from latents.config import load_latent_config
from latents.normalize import GroupedNormalizer, Normalizer, normalizer_for, official_normalizer
from latents.store import VIEWS, LatentStore, check_aligned, check_made_by, check_moments, open_stores, shard_problem
from latents.waypoints import PCA
from tokenizers.encoders import ENCODERS, feature_shape

log = get_logger("latents.dataset")

NOISE_STREAM = 0x706F7374  # "post": keeps the posterior noise's seeds apart from every other (seed, step, ...) draw


@dataclass(frozen=True)
class FeatureRequest:
    """REPA target features asked of a loader: a frozen encoder of tokenizers.encoders.ENCODERS (REPA: dinov2_b,
    SFD: dinov2_b_reg) with its weights file (None: the Hugging Face cache, or any real weights a store used) or
    seeded random weights (tests, demos). A store must hold features of this encoder, random or not as asked and,
    when `weights` is given, of that file's bytes. `pca`: a WiT waypoint PCA file (latents/waypoints.py) fitted on
    this encoder's tokens, applied after it, so the features are WiT's waypoint targets [tokens, pca dim]; the PCA
    must have been fitted on the very encoder computed here (weights, depth, input size: its provenance).
    `cell`: a token per cell x cell image pixels (16: the encoder's own grid at 256 px; a smaller cell feeds it a
    larger image); `depth`: only the encoder's first blocks (a cheap random encoder for CPU demos). Both apply to
    the encoder run on images (online, pixel loaders), not to a store's features."""

    encoder: str
    weights: str | None = None
    random_init: bool = False
    pca: str | None = None
    cell: int = 16
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise UnknownNameError(f"unknown REPA feature encoder {self.encoder!r}; known: {sorted(ENCODERS)}")
        if self.weights is not None and self.random_init:
            raise UserError(f"REPA features of {self.encoder}: give either a weights file or random_init, not both")

    @classmethod
    def of(cls, value: "FeatureRequest | str | Mapping[str, Any] | None") -> "FeatureRequest | None":
        """A request from an encoder name, a mapping {encoder, weights, random_init, pca}, or a request; None stays None."""
        if value is None or isinstance(value, FeatureRequest):
            return value
        return cls(value) if isinstance(value, str) else cls(**dict(value))

    def extract_flags(self) -> list[str]:
        """The latents.extract options that store these features."""
        return ["--features", self.encoder] + (["--features-weights", self.weights] if self.weights else []) + (
            ["--features-random-init"] if self.random_init else [])

    def waypoints(self) -> PCA | None:
        """The waypoint PCA of `pca`, checked to be fitted on this request's encoder; None without one."""
        if self.pca is None:
            return None
        pca = PCA.load(self.pca)
        if pca.encoder != self.encoder:
            raise MismatchError(f"the waypoint PCA {self.pca} was fitted on tokens of {pca.encoder or 'an unnamed encoder'}, "
                                f"the features asked for are of {self.encoder}")
        return pca

    def shape(self, tokens: int, dim: int) -> tuple[int, int]:
        """(tokens, dim) of the features served, from the encoder's (tokens, dim): the PCA's dim when there is one."""
        pca = self.waypoints()
        if pca is not None and pca.mean.shape[0] != dim:
            raise MismatchError(f"the waypoint PCA {self.pca} takes {pca.mean.shape[0]}-d tokens, {self.encoder} gives {dim}-d")
        return tokens, dim if pca is None else pca.dim


class FeatureTargets:
    """A request's frozen encoder (and waypoint PCA) on a device: images [b, 3, S, S] in [-1, 1] -> float32
    [b, tokens, dim] (`shape`), under no_grad; the online and pixel loaders run it on the very images of a step."""

    def __init__(self, request: FeatureRequest, image_size: int, device: torch.device) -> None:
        from tokenizers.encoders import build_feature_encoder

        self.pca = request.waypoints()  # first: a PCA of another encoder is refused before any model is built
        self.encoder = build_feature_encoder(request.encoder, request.weights, request.random_init, image_size,
                                             request.cell, request.depth)
        if self.pca is not None:
            check_fitted_on(self.pca, request.pca, self.encoder.provenance())
        self.encoder.to(device)
        self.shape = request.shape(self.encoder.grid**2, self.encoder.feature_dim)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(images).float()
        return tokens if self.pca is None else self.pca.project(tokens)


# What a PCA's tokens depend on beyond the encoder's name: the same keys must hold for the encoder it projects.
FITTED_ON = ("timm_name", "input_size", "grid", "random_init", "depth", "weights_sha256")


def check_fitted_on(pca: PCA, path: str, encoder: dict[str, Any]) -> None:
    """A MismatchError unless the waypoint PCA at `path` was fitted on tokens of the encoder whose provenance is
    `encoder` (weights, depth, input size and grid); a PCA file without provenance is taken on its encoder name."""
    differ = [k for k in FITTED_ON if k in pca.provenance and pca.provenance[k] != encoder.get(k)]
    if differ:
        k = differ[0]
        raise MismatchError(f"the waypoint PCA {path} was fitted on {pca.encoder} tokens with {k}={pca.provenance[k]}, "
                            f"the encoder computed here has {k}={encoder.get(k)}: fit it on this encoder "
                            "(python -m latents.waypoints with the same weights, --depth and --cell)")


@dataclass(frozen=True)
class ChannelGroup:
    """Consecutive channels of a latent source that one store group made: a composite config's group, or the
    whole latent of a single config (named "latents")."""

    name: str
    channels: int
    stores: tuple[LatentStore, ...]


@dataclass(frozen=True)
class LatentInfo:
    latent_shape: tuple[int, int, int]  # composite: the joined shape, (sum of the groups' channels, h, w)
    num_classes: int
    num_rows: int  # valid rows over all stores (of one group), or images of the online or pixel source
    stores: tuple[LatentStore, ...]  # online: the stores that supply statistics, if any; composite: every group's
    feature_shape: tuple[int, int] | None = None  # (tokens, dim) of the requested REPA features
    channel_groups: tuple[ChannelGroup, ...] = ()  # in channel order; their channels sum to latent_shape[0]


def latent_info(latent_cfg: str | Path | Mapping[str, Any],
                features: FeatureRequest | str | Mapping[str, Any] | None = None) -> LatentInfo:
    """Shape, classes and size of a latent config's source, from metadata only (no latents read or encoded).

    Online: the shape comes from the tokenizer (which is loaded) and the classes from the data source.
    `features`: REPA target features to be asked of the loader; a store must hold them (else a MismatchError
    naming the command that extracts them). A trainer checks these against its model before any compute.
    Composite (`groups`): the joined shape and `channel_groups`, after checking that the groups' stores hold the
    same images in the same row order on one latent grid (latents.store.check_aligned).
    """
    cfg = load_latent_config(latent_cfg)
    request = FeatureRequest.of(features)
    if cfg.groups is not None:
        return composite_info(cfg, request)
    if cfg.pixels is not None:
        from latents.pixels import pixel_info

        shape, num_classes, num_rows, fshape = pixel_info(cfg, request)
        return LatentInfo(shape, num_classes, num_rows, (), fshape, (ChannelGroup("pixels", 3, ()),))
    stores = open_stores(cfg.stores)
    fshape = None
    if cfg.online is not None:
        from latents.online import online_info, open_source

        shape, num_classes, num_rows, tok_info = online_info(cfg)
        for s in stores:  # they supply the statistics of latents encoded here
            if s.latent_shape != shape:
                raise MismatchError(f"latent store {s.url} holds {s.latent_shape} latents, the online source makes {shape}")
            check_made_by(tok_info, cfg.tokenizer, s)
        if request is not None:
            fshape = request.shape(*feature_shape(request.encoder, open_source(cfg)[1], request.cell))
    else:
        shape, num_classes, num_rows = stores[0].latent_shape, stores[0].num_classes, sum(s.num_valid for s in stores)
        if request is not None:
            fshape = store_feature_shape(stores, request)
        check_posterior_mode(cfg, stores)
    check_stats_shape(cfg, shape)
    return LatentInfo(shape, num_classes, num_rows, stores, fshape, (ChannelGroup("latents", shape[0], stores),))


_said_means: set[tuple[str | None, tuple[str, ...]]] = set()  # configs told once that they train on the means


def check_posterior_mode(cfg: DictConfig, stores: tuple[LatentStore, ...], group: str | None = None) -> None:
    """`posterior: sample` needs moments stores (else a MismatchError naming the command that makes one);
    `posterior: stored` over moments stores trains on their means, which is logged."""
    if cfg.posterior == "sample":
        check_moments(stores)
    elif any(s.moments for s in stores) and (group, tuple(s.url for s in stores)) not in _said_means:
        _said_means.add((group, tuple(s.url for s in stores)))
        log.info("%s: %s holds posterior moments and the latent config has posterior: stored, so training reads the "
                 "posterior means (posterior: sample draws a fresh sample at every load)",
                 f"group '{group}'" if group else "latent config", next(s.url for s in stores if s.moments))


def check_stats_shape(cfg: DictConfig, shape: tuple[int, int, int]) -> None:
    """A config's `stats` file must fit its latents, per channel or per element."""
    if cfg.stats and cfg.normalization == "store":
        std = official_normalizer(cfg).std
        if tuple(std.shape) not in (shape, (shape[0], 1, 1)):
            raise MismatchError(f"statistics {cfg.stats} are shaped {tuple(std.shape)}, the latents {shape}")


def composite_info(cfg: DictConfig, request: FeatureRequest | None) -> LatentInfo:
    """latent_info of a composite config: each group's stores checked as a single config's, then against the
    first group's, store by store (latents.store.check_aligned); REPA features from the group that holds them."""
    import tokenizers.families  # noqa: F401  (registers every family; here, as diffusers takes seconds to import)
    from tokenizers.base import TOKENIZERS

    opened = [open_stores(g.stores) for g in cfg.groups]
    groups = tuple(ChannelGroup(g.name, stores[0].latent_shape[0], stores) for g, stores in zip(cfg.groups, opened))
    first = groups[0]
    made_by = TOKENIZERS.get(first.stores[0].tokenizer.get("name"))
    if made_by is not None and made_by.decodes_to != "images":  # caught here, before training, not at the first sample grid
        raise MismatchError(f"latent config group '{first.name}' comes first, so its tokenizer decodes the composite "
                            f"latents, but its stores were made by {made_by.name}, which decodes to {made_by.decodes_to}, "
                            "not images; put the image group first (SFD: texture, then semantic)")
    for g, g_cfg in zip(groups, cfg.groups):
        check_stats_shape(g_cfg, g.stores[0].latent_shape)
        check_posterior_mode(g_cfg, g.stores, g.name)
    for g in groups[1:]:
        if len(g.stores) != len(first.stores):
            raise MismatchError(f"latent config group '{g.name}' has {len(g.stores)} stores, group '{first.name}' "
                                f"{len(first.stores)}: the k-th store of each group is joined with the k-th of the others")
        for a, b in zip(first.stores, g.stores):
            check_aligned(a, b)
    fshape = None if request is None else feature_group(groups, request)[1]
    shape = (sum(g.channels for g in groups), *first.stores[0].latent_shape[1:])
    return LatentInfo(shape, first.stores[0].num_classes, sum(s.num_valid for s in first.stores),
                      tuple(s for g in groups for s in g.stores), fshape, groups)


def feature_group(groups: tuple[ChannelGroup, ...] | list[ChannelGroup], request: FeatureRequest) -> tuple[int, tuple[int, int]]:
    """The first group whose stores all hold the requested REPA features, and their (tokens, dim); else a
    MismatchError naming each group's reason (what its stores hold and the command that adds the features)."""
    why = []
    for i, g in enumerate(groups):
        try:
            return i, store_feature_shape(g.stores, request)
        except MismatchError as e:
            why.append(f"group '{g.name}': {e}")
    raise MismatchError("no group of the composite latent config holds the REPA features asked for; " + "; ".join(why))


def weights_sha256(path: str | Path) -> str:
    """The sha256 of a weights file, read once per file state (a loader's setup asks for it once per group)."""
    st = os.stat(path)
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def store_feature_shape(stores: list[LatentStore] | tuple[LatentStore, ...], request: FeatureRequest) -> tuple[int, int]:
    """(tokens, dim) of the requested features, which every store must hold, all of one encoder; else a
    MismatchError naming the store, what it holds and the extraction command that stores them."""
    sha = weights_sha256(request.weights) if request.weights else None
    for s in stores:
        have = s.features
        fits = have is not None and have["encoder"] == request.encoder and have["random_init"] == request.random_init
        if not fits or (sha is not None and have["weights_sha256"] != sha):
            asked = request.encoder + (" with random weights" if request.random_init else
                                       f" with the weights of {request.weights}" if request.weights else "")
            raise MismatchError(f"latent store {s.url} holds {_held(have)}, not the REPA features of {asked} asked for; "
                                f"extract a store with them: {_features_command(s, request)}")
    first = stores[0].features
    for s in stores[1:]:
        keys = ("encoder", "image_size", "random_init", "weights_sha256")
        if any(s.features[k] != first[k] for k in keys):
            raise MismatchError(f"latent stores {stores[0].url} and {s.url} hold REPA features of different encoders: "
                                f"{ {k: first[k] for k in keys} } and { {k: s.features[k] for k in keys} }")
    if (pca := request.waypoints()) is not None:  # the stored tokens must be of the encoder the PCA was fitted on
        check_fitted_on(pca, request.pca, first)
    return request.shape(int(first["tokens"]), int(first["dim"]))


def _held(features: dict[str, Any] | None) -> str:
    if features is None:
        return "no REPA features"
    weights = "random weights" if features["random_init"] else f"weights sha256 {str(features['weights_sha256'])[:12]}"
    return f"REPA features of {features['encoder']} ({weights}, {features['tokens']}x{features['dim']})"


def _features_command(store: LatentStore, request: FeatureRequest) -> str:
    """The store's own extraction command with the requested features, into a new store beside it."""
    recorded = shlex.split(store.attrs.get("command") or "python -m latents.extract --tokenizer ... --data ...")
    drop_with_value, drop = {"--features", "--features-weights", "--out"}, {"--features-random-init"}
    argv, skip = [], False
    for a in recorded:
        if skip or a in drop or a.split("=", 1)[0] in drop_with_value and "=" in a:
            skip = False
            continue
        if a in drop_with_value:
            skip = True
            continue
        argv.append(a)
    url = store.url.rstrip("/")
    out = f"{url.removesuffix('.zarr')}_{request.encoder}.zarr"
    return shlex.join(argv + request.extract_flags() + ["--out", out])


class BatchSchedule:
    """The rows and views of rank `rank`'s part of the global batch of every step, a pure function of (seed, step)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 flips: bool = True) -> None:
        if batch_size % world_size:
            raise UserError(f"global batch size {batch_size} is not divisible by the {world_size} processes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if num_rows == 0:
            raise UserError("the latent source holds no valid rows")
        self.num_rows, self.batch_size, self.local_batch_size = num_rows, batch_size, batch_size // world_size
        self.seed, self.rank, self.flips = seed, rank, bool(flips)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_rows)
        return self._perms[epoch]

    def positions(self) -> np.ndarray:
        """The positions in the global batch of this rank's samples (the same at every step), int64."""
        return self.rank * self.local_batch_size + np.arange(self.local_batch_size)

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of step `step` and their views (1: mirrored; all 0 when `flips` is false), int64."""
        lo = self.rank * self.local_batch_size
        pos = step * self.batch_size + self.positions()
        epochs, offsets = np.divmod(pos, self.num_rows)
        rows = np.empty(len(pos), dtype=np.int64)
        for e in np.unique(epochs):
            rows[epochs == e] = self._perm(int(e))[offsets[epochs == e]]
        if not self.flips:
            return rows, np.zeros(len(pos), dtype=np.int64)
        flips = np.random.default_rng([self.seed, 1, step]).integers(0, 2, self.batch_size)[lo : lo + self.local_batch_size]
        return rows, flips


def posterior_noise(seed: int, step: int, positions: np.ndarray, shape: tuple[int, ...], group: int = 0) -> torch.Tensor:
    """eps [len(positions), *shape] float32 of the posterior samples of step `step`: one CPU generator per sample,
    seeded by (seed, NOISE_STREAM, group, step, position in the global batch) (module docstring)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        derived_seed(seed, NOISE_STREAM, group, step, int(p)))) for p in positions])


class BatchLoader:
    """Endless, deterministic, resumable batches of (normalised latents float32 [b, C, h, w], labels int64 [b]),
    and REPA target features float32 [b, tokens, dim] third when they were requested (`feature_shape` is then
    (tokens, dim), else None).

    `batch_size` is the global batch; each of the `world_size` ranks gets `batch_size // world_size` of it. A loader
    that reads images may leave out one that cannot be decoded: `kept` (bool [b], or None for all) then says which
    of the last batch's positions it holds, so that a trainer keeps those positions' noise and times.
    `batch(step)` is a pure function of (seed, step): a subclass turns the rows and views that
    `self.schedule(step)` picks into latents. Iterating yields the batches of steps `step`,
    `step + 1`, ...; `state_dict()` holds the next step.
    """

    feature_shape: tuple[int, int] | None = None
    kept: torch.Tensor | None = None

    def __init__(self, num_rows: int, normalizer: Normalizer, batch_size: int, seed: int, rank: int, world_size: int,
                 start_step: int, config: DictConfig | None, flips: bool | None = None) -> None:
        # flips: the config's `flips` (None: it, or true without a config)
        flips = (True if config is None else bool(config.get("flips", True))) if flips is None else flips
        self.schedule = BatchSchedule(num_rows, batch_size, seed, rank, world_size, flips)
        self.num_rows, self.normalizer, self.config = num_rows, normalizer, config  # config: for decode_latents
        self.batch_size, self.seed, self.step = batch_size, seed, start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """This rank's part of the global batch of training step `step`: (x, y), or (x, y, feats) (see the class)."""
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
    """Batches from latent stores, cached whole (see the module docstring).

    `flips`: mirrored views may be drawn (None: the config's `flips`, true without one); false caches the plain views
    only. `sample`: draw posterior samples from the stores' moments (None: the config's `posterior` is `sample`);
    `group`: the group index of a composite config, which keeps each group's posterior noise its own."""

    def __init__(self, stores: list[LatentStore], normalizer: Normalizer, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start_step: int = 0, cache_dir: str | Path | None = None,
                 config: DictConfig | None = None, features: FeatureRequest | str | Mapping[str, Any] | None = None,
                 flips: bool | None = None, sample: bool | None = None, group: int = 0) -> None:
        self.stores = list(stores)
        self.latent_shape, self.num_classes = self.stores[0].latent_shape, self.stores[0].num_classes
        request = FeatureRequest.of(features)
        self.feature_shape = None if request is None else store_feature_shape(self.stores, request)
        if sample is None:
            sample = config is not None and config.get("posterior") == "sample"
        if sample:
            check_moments(self.stores)
        kinds = ("latents",) + (("logvar",) if sample else ()) + (("features",) if request is not None else ())
        flips = (True if config is None else bool(config.get("flips", True))) if flips is None else flips
        self.num_views, self.group = 2 if flips else 1, int(group)
        caches, labels = load_cache(self.stores, cache_dir, kinds, self.num_views)
        super().__init__(len(labels), normalizer, batch_size, seed, rank, world_size, start_step, config, flips)
        # Row r of each: 2r plain, 2r+1 mirrored (r alone with the plain views only), so one index picks the same
        # view of latents, log-variances and features.
        def views_of(kind: str, shape: tuple[int, ...]) -> torch.Tensor | None:
            return torch.from_numpy(caches[kind]).view(self.num_views * self.num_rows, *shape) if kind in caches else None

        self._views = views_of("latents", self.latent_shape)
        self._logvar_views = views_of("logvar", self.latent_shape)
        self._feature_views = None if request is None else views_of("features", caches["features"].shape[2:])
        self._pca = None if request is None else request.waypoints()  # stored tokens -> waypoint targets at load
        self._labels = torch.from_numpy(labels)

    @property
    def samples_posterior(self) -> bool:
        """Whether batches are fresh posterior samples of moments stores (`posterior: sample`)."""
        return self._logvar_views is not None

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        return self.take(*self.schedule(step), step=step)

    def take(self, rows: np.ndarray, flips: np.ndarray, step: int | None = None,
             positions: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
        """(x, y) or (x, y, feats) of the given rows and views (1: mirrored). Posterior samples need the `step` and
        the samples' `positions` in the global batch (default: this rank's, `BatchSchedule.positions`)."""
        rows_t, flips_t = torch.from_numpy(rows), torch.from_numpy(flips)
        if self.num_views == 1 and bool(flips_t.any()):
            raise ValueError("this loader holds the plain views only (flips: false); a mirrored view was asked for")
        views = self.num_views * rows_t + flips_t
        z = self._views.index_select(0, views)
        if self._logvar_views is not None:
            if step is None:
                raise ValueError("posterior samples are drawn per (seed, step, position): give the step")
            positions = self.schedule.positions() if positions is None else np.asarray(positions)
            if len(positions) != len(rows):
                raise ValueError(f"{len(rows)} rows but {len(positions)} positions")
            eps = posterior_noise(self.seed, step, positions, self.latent_shape, self.group)
            z = torch.addcmul(z.float(), torch.exp(0.5 * self._logvar_views.index_select(0, views).float()), eps)
        out = (self.normalizer.normalize(z), self._labels[rows_t])
        if self._feature_views is None:
            return out
        feats = self._feature_views.index_select(0, views).float()
        return *out, feats if self._pca is None else self._pca.project(feats)


class CompositeLoader(BatchLoader):
    """Batches of a composite config: each group's latents as a LatentLoader of its stores gives them (normalised
    by the group's own statistics), joined along channels in group order (see the module docstring).
    `groups`: LatentInfo.channel_groups, whose stores latent_info has checked to hold the same images in one order."""

    def __init__(self, groups: tuple[ChannelGroup, ...] | list[ChannelGroup], normalizer: GroupedNormalizer,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 cache_dir: str | Path | None = None, config: DictConfig | None = None,
                 features: FeatureRequest | str | Mapping[str, Any] | None = None) -> None:
        request = FeatureRequest.of(features)
        self.features_from = None if request is None else feature_group(groups, request)[0]
        self.groups = tuple(groups)
        flips = True if config is None else bool(config.get("flips", True))
        group_cfgs = list(config.groups) if config is not None else [None] * len(groups)
        self.parts = [LatentLoader(list(g.stores), part, batch_size, seed, rank, world_size, start_step, cache_dir, None,
                                   request if i == self.features_from else None, flips=flips,
                                   sample=g_cfg is not None and g_cfg.get("posterior") == "sample", group=i)
                      for i, (g, part, g_cfg) in enumerate(zip(groups, normalizer.parts, group_cfgs))]
        first = self.parts[0]
        super().__init__(first.num_rows, normalizer, batch_size, seed, rank, world_size, start_step, config, flips)
        self.stores = [s for g in groups for s in g.stores]
        self.latent_shape = (sum(p.latent_shape[0] for p in self.parts), *first.latent_shape[1:])
        self.num_classes = first.num_classes
        self.feature_shape = None if request is None else self.parts[self.features_from].feature_shape

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        rows, flips = self.schedule(step)  # the same rows and views for every group
        outs = [part.take(rows, flips, step) for part in self.parts]  # each group draws its own posterior noise
        x, y = torch.cat([o[0] for o in outs], dim=1), outs[0][1]
        return (x, y) if self.features_from is None else (x, y, outs[self.features_from][2])


def load_cache(stores: list[LatentStore], cache_dir: str | Path | None, kinds: tuple[str, ...] = ("latents",),
               views: int = 2) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All valid rows, both views, of each kind ("latents": [rows, 2, C, h, w]; "features": [rows, 2, tokens, dim];
    "logvar" of a moments store as "latents"), and the labels int64 [rows]; in RAM, or memory-mapped under cache_dir
    (one file per kind, built once). `views=1`: the plain views only ([rows, 1, ...], latent configs with flips: false)."""
    if views not in (1, 2):
        raise ValueError(f"views must be 1 (plain) or 2 (plain and mirrored), got {views}")
    rows = sum(s.num_valid for s in stores)
    dtypes = {k: np.result_type(*[s.array(VIEWS[k][0]).dtype for s in stores]) for k in kinds}
    shapes = {k: (rows, views, *stores[0].array(VIEWS[k][0]).shape[1:]) for k in kinds}
    nbytes = {k: int(np.prod(shapes[k])) * dtypes[k].itemsize for k in kinds}
    if cache_dir is None:
        import psutil

        available = psutil.virtual_memory().available
        if sum(nbytes.values()) > 0.8 * available:
            raise MemoryError(f"the {' and '.join(kinds)} need {sum(nbytes.values()) / 2**30:.1f} GiB in RAM and "
                              f"{available / 2**30:.1f} GiB are available; set cache_dir in the latent config to a "
                              "local folder to memory-map them instead")
        caches, labels = {k: np.empty(shapes[k], dtypes[k]) for k in kinds}, np.empty(rows, np.int64)
        fill_cache(stores, caches, labels)
        return caches, labels
    key = hashlib.sha1(json.dumps([[s.url, s.attrs["created"], s.num_rows] for s in stores]).encode()).hexdigest()[:16]
    paths = {k: Path(cache_dir) / f"{k}{'-plain' if views == 1 else ''}-{key}.npy" for k in kinds}
    labels_path = paths["latents"].with_suffix(".labels.npy")  # written with the latents' file, before its rename
    missing = [k for k in kinds if not paths[k].is_file()]
    if missing:  # concurrent builders each write temporary files; the last rename wins
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmps = {k: paths[k].with_name(f".{paths[k].stem}.{os.getpid()}.tmp.npy") for k in missing}
        caches = {k: np.lib.format.open_memmap(tmps[k], mode="w+", dtype=dtypes[k], shape=shapes[k]) for k in missing}
        labels = np.empty(rows, np.int64)
        fill_cache(stores, caches, labels)
        for k in missing:
            caches[k].flush()
        del caches
        if "latents" in missing:
            np.save(labels_path, labels)
        for k in missing:
            os.replace(tmps[k], paths[k])
    for k in kinds:
        log.info("memory-mapping the %s cache %s (%.1f GiB)", k, paths[k], nbytes[k] / 2**30)
    # Copy-on-write mapping: writable for torch, never written, pages shared with other processes.
    return {k: np.load(paths[k], mmap_mode="c") for k in kinds}, np.load(labels_path)


def fill_cache(stores: list[LatentStore], caches: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Copy the valid rows of each store into the cache of each kind (VIEWS: its plain and mirrored arrays; the
    plain alone where the cache holds one view), shard by shard (whole-shard reads are the fast way through Zarr),
    checking what is read against the shard's hashes."""
    at = 0
    for store in stores:
        layout = store.layout
        arrays = {n: store.array(n) for k, c in caches.items() for n in VIEWS[k][: c.shape[1]]} | {"valid": store.array("valid")}
        lab = store.array("labels")
        for k in range(layout.num_shards):
            start, stop = layout.shard_range(k)
            try:
                block = {n: a[start:stop] for n, a in arrays.items()}
            except Exception as e:  # a damaged compressed chunk fails to decode in zarr or its codec
                raise CorruptFileError(f"latent store {store.url}: shard {k} (rows {start}..{stop}) cannot be read "
                                       f"({type(e).__name__}: {e}); run its extraction command again to write it anew: "
                                       f"{store.attrs.get('command', 'python -m latents.extract ...')}") from e
            if (why := shard_problem(store.group, layout, k, block)) is not None:
                raise CorruptFileError(f"latent store {store.url}: {why}. Run its extraction command again to write that "
                                       f"shard anew: {store.attrs.get('command', 'python -m latents.extract ...')}")
            keep = block["valid"]
            n = int(keep.sum())
            for kind, cache in caches.items():
                for v in range(cache.shape[1]):  # 0: plain, 1: mirrored
                    cache[at : at + n, v] = block[VIEWS[kind][v]][keep]
            labels[at : at + n] = lab[start:stop][keep]
            at += n


def build_latent_loader(latent_cfg: str | Path | Mapping[str, Any], batch_size: int, seed: int = 0, rank: int = 0,
                        world_size: int = 1, start_step: int = 0, device: torch.device | str | None = None,
                        info: LatentInfo | None = None,
                        features: FeatureRequest | str | Mapping[str, Any] | None = None) -> BatchLoader:
    """The training loader of a latent config; `batch_size` is global (split over `world_size` ranks).

    `device`: where an online source encodes (and returns) its latents, and a pixel source its images (latents/pixels.py);
    store batches stay on the CPU.
    `info`: the config's `latent_info`, when the caller has it already (it opens stores and statistics).
    `features`: REPA target features returned third by `batch(step)`: an encoder name, a mapping
    {encoder, weights, random_init} or a FeatureRequest (module docstring).
    """
    cfg = load_latent_config(latent_cfg)
    request = FeatureRequest.of(features)
    if cfg.pixels is not None:  # images: nothing to normalise, no stores
        from latents.pixels import PixelLoader

        return PixelLoader(cfg, batch_size, seed, rank, world_size, start_step, device, request)
    info = info or latent_info(cfg, request)
    normalizer = normalizer_for(cfg, info.stores)
    if cfg.online is not None:
        from latents.online import OnlineLoader

        return OnlineLoader(cfg, normalizer, batch_size, seed, rank, world_size, start_step, device, info.stores, request)
    if cfg.groups is not None:
        return CompositeLoader(info.channel_groups, normalizer, batch_size, seed, rank, world_size, start_step,
                               cfg.cache_dir, cfg, request)
    return LatentLoader(list(info.stores), normalizer, batch_size, seed, rank, world_size, start_step, cfg.cache_dir, cfg,
                        request)
