"""Latent stores: one Zarr v3 group per (tokenizer, data set, split), the format of DESIGN §3.

Layout of a store with N rows of latents shaped [C, h, w], written in S shards of `shard_rows` rows:

    zarr.json      attributes: format, version, ready, complete, tokenizer {name, config, checkpoint_sha256},
                   data {config, source}, image_size, latent_shape, num_classes, num_rows, preprocessing,
                   extraction {dtype, stats, center, sample_posterior, seed, noise_seed (when given), moments
                   (only when true), batch_size, autocast, shard_rows, chunk_rows}, created, command; when
                   complete also num_valid, num_skipped and skipped [{index, row, where, reason}]; features
                   (null, or the REPA target encoder: {encoder, timm_name, input_size, image_size (fed), grid,
                   tokens, dim, random_init, weights_file, weights_sha256, dtype, preprocessing})
    latents        [N, C, h, w] float16 (or float32), chunks (chunk_rows, C, h, w) inside shards of
                   (shard_rows, C, h, w), zstd
    latents_flip   same, encoded from the horizontally mirrored image
    features       [N, tokens, dim] float16, only when `features` is set: the encoder's patch tokens of the same
                   image (tokenizers.encoders.build_feature_encoder), shards of the same rows as the latents
    features_flip  same, of the mirrored image (a reader that takes latents_flip for a row takes these)
    logvar         [N, C, h, w], only in a *moments* store (extraction.moments true, `--store-moments`): the
                   posterior log-variance of each row, `latents` then holding its posterior mean; same dtype,
                   chunks and shards as the latents
    logvar_flip    same, of the mirrored image
    labels         [N] int32 class ids;   index [N] int64 source position of each row
    valid          [N] bool, False where the image was skipped (its latents are zeros)
    stats/         mean (absent when the statistics have no mean), std: float32, per channel [C] or per
                   element [C, h, w]; sum, sumsq float64 and count int64 (), the sums they come from; in a
                   moments store also var_sum float64, the sum of exp(logvar) over the same values (below)
    shards/        sum, sumsq [S, *stat_shape] float64: each shard's partial sums, one chunk per shard (and
                   var_sum in a moments store)
    shards/done/   one group per finished shard (`000003`) with attributes {num_valid, skipped, sha256 of each
                   per-row array written: latents, latents_flip, valid and, when present, features, features_flip}

Rows hold a seeded random permutation of the data set, so every chunk mixes classes. Zarr skips
chunks equal to the fill value, so a chunk's existence proves nothing: a shard counts as finished
only once its `shards/done/<k>` record exists, and that record is written last. Each shard is
written by one process in one call (two writers in one shard lose data). Statistics are float64
sums over every valid latent of both views, summed per shard and then over shards in shard order,
so they do not depend on the number of processes or on where a run was interrupted.

A moments store's `stats/mean` and `stats/std` are those of its `latents`, the posterior means, as in any store;
`stats/var_sum` adds what the posterior noise contributes, so the statistics of posterior samples
z = mean + exp(logvar / 2) * eps are exact in expectation over eps, with no draw: E[z] = sum / count and
E[z^2] = (sumsq + var_sum) / count (`Stats.of_samples`). A loader that samples afresh normalises by those; one that
reads the means (latents/config.py `posterior: stored`) by the means' own.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from core.errors import MismatchError, UserError
from core import faults

FORMAT = "latentkit.latent_store"
VERSION = 1
STAT_KINDS = ("channel", "element")
MAX_SHARD_BYTES = 64 << 20  # one shard of one view of its largest array stays modest in memory and in object size
MAX_SHARD_ROWS = 4096  # keeps several shards per data set for parallel writers and resumption
CHUNK_BYTES = 1 << 20  # inner chunk: the unit a reader decompresses
SUM_BLOCK_BYTES = 32 << 20  # float64 working memory while summing a shard
FEATURE_DTYPE = "float16"
VIEWS = {"latents": ("latents", "latents_flip"), "features": ("features", "features_flip"),
         "logvar": ("logvar", "logvar_flip")}  # (plain, mirrored)


@dataclass(frozen=True)
class Layout:
    num_rows: int
    shard_rows: int
    chunk_rows: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.shard_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.num_rows)


def make_layout(num_rows: int, latent_shape: tuple[int, ...], dtype: str, shard_rows: int | None = None,
                feature_shape: tuple[int, int] | None = None) -> Layout:
    """Shard and chunk sizes (in rows) of the latents; by default shards stay below 64 MiB and chunks near 1 MiB.
    `feature_shape`: the store also holds features, whose rows are usually the largest and so size the shards."""
    row_bytes = _row_bytes(latent_shape, dtype)
    if shard_rows is None:
        largest = max(row_bytes, _row_bytes(feature_shape, FEATURE_DTYPE) if feature_shape else 0)
        shard_rows = min(MAX_SHARD_ROWS, _pow2_floor(MAX_SHARD_BYTES // largest))
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    return Layout(num_rows, shard_rows, chunk_rows(shard_rows, row_bytes))


def chunk_rows(shard_rows: int, row_bytes: int) -> int:
    """Rows of an inner chunk near 1 MiB that divide the shard."""
    return math.gcd(shard_rows, _pow2_floor(CHUNK_BYTES // row_bytes))


def _row_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


# --- statistics --------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Normalisation statistics: `(z - mean) / std`, or `z / std` when `mean` is None."""

    kind: str  # "channel": [C]; "element": [C, h, w]
    mean: np.ndarray | None
    std: np.ndarray
    count: int  # values behind each statistic
    sum: np.ndarray  # float64 sums they were derived from (for combining stores)
    sumsq: np.ndarray
    var_sum: np.ndarray | None = None  # moments stores: float64 sum of the posterior variances exp(logvar)

    @classmethod
    def from_sums(cls, kind: str, center: bool, total: np.ndarray, total_sq: np.ndarray, count: int,
                  var_sum: np.ndarray | None = None) -> "Stats":
        if count <= 0:
            raise ValueError("no valid latents to compute statistics from")
        mean = total / count
        # The std is about the mean even when the mean is not subtracted, as in RAE's released statistics.
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
        return cls(kind, mean.astype(np.float32) if center else None, std.astype(np.float32), count, total, total_sq,
                   var_sum)

    def of_samples(self) -> "Stats":
        """The statistics of posterior samples mean + exp(logvar / 2) * eps of a moments store (these are of its
        means), exact in expectation over eps: the same mean, E[z^2] larger by the mean posterior variance."""
        if self.var_sum is None:
            raise ValueError("these statistics are not of a moments store (no posterior variances)")
        return Stats.from_sums(self.kind, self.mean is not None, self.sum, self.sumsq + self.var_sum, self.count)


def stat_shape(kind: str, latent_shape: tuple[int, int, int]) -> tuple[int, ...]:
    if kind not in STAT_KINDS:
        raise ValueError(f"unknown statistics kind {kind!r}; expected one of {STAT_KINDS}")
    return (latent_shape[0],) if kind == "channel" else tuple(latent_shape)


def partial_sums(latents: np.ndarray, flips: np.ndarray, valid: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 sum and sum of squares over the valid rows of both views, in a fixed order."""
    axes = (0, 2, 3) if kind == "channel" else (0,)
    shape = stat_shape(kind, latents.shape[1:])
    rows = np.flatnonzero(valid)
    total, total_sq = np.zeros(shape), np.zeros(shape)
    block = max(1, SUM_BLOCK_BYTES // (int(np.prod(latents.shape[1:])) * 8))
    for start in range(0, len(rows), block):
        for view in (latents, flips):
            x = view[rows[start : start + block]].astype(np.float64)
            total += x.sum(axis=axes)
            total_sq += np.square(x).sum(axis=axes)
    return total, total_sq


def variance_sums(logvars: np.ndarray, flips: np.ndarray, valid: np.ndarray, kind: str) -> np.ndarray:
    """float64 sum of the posterior variances exp(logvar) over the valid rows of both views, in a fixed order."""
    axes = (0, 2, 3) if kind == "channel" else (0,)
    rows = np.flatnonzero(valid)
    total = np.zeros(stat_shape(kind, logvars.shape[1:]))
    block = max(1, SUM_BLOCK_BYTES // (int(np.prod(logvars.shape[1:])) * 8))
    for start in range(0, len(rows), block):
        for view in (logvars, flips):
            total += np.exp(view[rows[start : start + block]].astype(np.float64)).sum(axis=axes)
    return total


# --- writing -----------------------------------------------------------------------------------------


def create_store(url: str, attrs: dict[str, Any], layout: Layout, latent_shape: tuple[int, int, int], dtype: str,
                 stats_kind: str, index: np.ndarray, labels: np.ndarray, overwrite: bool = False,
                 feature_shape: tuple[int, int] | None = None, moments: bool = False) -> zarr.Group:
    """Create an empty store: arrays, `index`, `labels`, attributes. `overwrite` replaces what is at `url`.
    `feature_shape` (tokens, dim): also create `features` and `features_flip`. `moments`: also `logvar`,
    `logvar_flip` and the shards' variance sums (a moments store; `latents` then hold posterior means).

    `ready` becomes true only after everything is in place, so a creation cut short is recognisable.
    """
    g = zarr.open_group(url, mode="w" if overwrite else "w-", attributes={**attrs, "format": FORMAT, "version": VERSION,
                                                    "ready": False, "complete": False})
    n, shard, chunk = layout.num_rows, layout.shard_rows, layout.chunk_rows
    for name in VIEWS["latents"] + (VIEWS["logvar"] if moments else ()):
        g.create_array(name, shape=(n, *latent_shape), dtype=dtype, chunks=(chunk, *latent_shape),
                       shards=(shard, *latent_shape), compressors=[ZstdCodec(level=3)], fill_value=0,
                       dimension_names=("n", "c", "h", "w"))
    if feature_shape is not None:
        fchunk = chunk_rows(shard, _row_bytes(feature_shape, FEATURE_DTYPE))
        for name in VIEWS["features"]:
            g.create_array(name, shape=(n, *feature_shape), dtype=FEATURE_DTYPE, chunks=(fchunk, *feature_shape),
                           shards=(shard, *feature_shape), compressors=[ZstdCodec(level=3)], fill_value=0,
                           dimension_names=("n", "token", "dim"))
    sshape = stat_shape(stats_kind, latent_shape)
    for name in ("shards/sum", "shards/sumsq") + (("shards/var_sum",) if moments else ()):
        g.create_array(name, shape=(layout.num_shards, *sshape), dtype="float64", chunks=(1, *sshape), fill_value=0)
    create_rows(g, layout, index, labels)
    return g


def create_rows(group: zarr.Group, layout: Layout, index: np.ndarray, labels: np.ndarray) -> None:
    """What every store made shard by shard has (latent stores, image stores: latents/image_store.py): `labels`,
    `index`, `valid` and `shards/done/`; then `ready` is set, the last step of a store's creation."""
    for name, dt, fill in (("labels", "int32", -1), ("index", "int64", -1), ("valid", "bool", False)):
        group.create_array(name, shape=(layout.num_rows,), dtype=dt, chunks=(layout.shard_rows,),
                           compressors=[ZstdCodec(level=3)], fill_value=fill, dimension_names=("n",))
    group.create_group("shards/done")
    group["index"][:] = index
    group["labels"][:] = labels
    group.attrs["ready"] = True


def finished_shards(group: zarr.Group) -> set[int]:
    return {int(k) for k in group["shards/done"].group_keys()}


def write_shard(group: zarr.Group, layout: Layout, shard: int, latents: np.ndarray, flips: np.ndarray,
                valid: np.ndarray, skipped: list[dict[str, Any]], stats_kind: str,
                features: tuple[np.ndarray, np.ndarray] | None = None,
                logvars: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Write one whole shard, then record it as finished (the record goes last). `features`: (plain, mirrored) of
    the shard's rows, for a store created with a feature shape; they are hashed into the record like the latents.
    `logvars`: (plain, mirrored) posterior log-variances, for a moments store (`latents` and `flips` are then the
    means); hashed likewise, and their variance sums go with the shard's partial sums."""
    start, stop = layout.shard_range(shard)
    if len(latents) != stop - start:
        raise ValueError(f"shard {shard} holds rows {start}..{stop}, got {len(latents)} rows")
    if (features is not None) != ("features" in group.array_keys()):
        raise ValueError(f"shard {shard}: features {'given' if features is not None else 'missing'} for a store "
                         f"{'without' if features is not None else 'with'} feature arrays")
    if (logvars is not None) != ("logvar" in group.array_keys()):
        raise ValueError(f"shard {shard}: log-variances {'given' if logvars is not None else 'missing'} for a store "
                         f"{'without' if logvars is not None else 'with'} them (a moments store)")
    arrays = {"latents": latents, "latents_flip": flips, "valid": valid}
    if features is not None:
        arrays |= dict(zip(VIEWS["features"], features))
    if logvars is not None:
        arrays |= dict(zip(VIEWS["logvar"], logvars))
    total, total_sq = partial_sums(latents, flips, valid, stats_kind)
    group["shards/sum"][shard] = total
    group["shards/sumsq"][shard] = total_sq
    if logvars is not None:
        group["shards/var_sum"][shard] = variance_sums(*logvars, valid, stats_kind)
    put_shard(group, layout, shard, arrays, skipped)


def put_shard(group: zarr.Group, layout: Layout, shard: int, arrays: dict[str, np.ndarray],
              skipped: list[dict[str, Any]]) -> None:
    """Write the per-row `arrays` (`valid` among them) of one whole shard, then its done record with their sha256s:
    the record goes last, so a shard without one is unfinished, whatever was written."""
    start, stop = layout.shard_range(shard)
    for name, values in arrays.items():
        if len(values) != stop - start:
            raise ValueError(f"shard {shard} holds rows {start}..{stop}, got {len(values)} rows of '{name}'")
        group[name][start:stop] = values
    faults.point("shard")
    digests = {name: _digest(np.asarray(values, dtype=group[name].dtype)) for name, values in arrays.items()}
    group["shards/done"].create_group(f"{shard:06d}", attributes={"num_valid": int(arrays["valid"].sum()),
                                                                  "skipped": skipped, "sha256": digests})


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).data).hexdigest()


def shard_problem(group: zarr.Group, layout: Layout, shard: int, arrays: dict[str, np.ndarray] | None = None) -> str | None:
    """None when shard `shard` reads back as it was written (the sha256 of each array in its done record); else
    what differs. `arrays`: the shard's rows already read, some of the recorded arrays (a loader checks what it
    reads); else every recorded array is read here. Shards recorded before hashes were stored cannot be checked and pass."""
    recorded = group["shards/done"][f"{shard:06d}"].attrs.get("sha256")
    if not recorded:
        return None
    start, stop = layout.shard_range(shard)
    if arrays is not None:
        recorded = {name: digest for name, digest in recorded.items() if name in arrays}
    for name, digest in recorded.items():
        try:
            values = arrays[name] if arrays is not None else group[name][start:stop]
        except Exception as e:  # a damaged compressed chunk fails to decode in zarr or the codec
            return f"shard {shard} (rows {start}..{stop}) of '{name}' cannot be read: {type(e).__name__}: {e}"
        if _digest(values) != digest:
            return f"shard {shard} (rows {start}..{stop}) of '{name}' has other bytes than were written"
    return None


def forget_shard(group: zarr.Group, shard: int) -> None:
    """Drop a shard's done record, so that extraction writes it again."""
    del group["shards/done"][f"{shard:06d}"]


def check_finished(group: zarr.Group, layout: Layout) -> None:
    missing = sorted(set(range(layout.num_shards)) - finished_shards(group))
    if missing:
        raise RuntimeError(f"cannot finalise: shards {missing[:10]} are not finished")


def finalise(group: zarr.Group, layout: Layout) -> Stats:
    """Sum the shards' partial sums in shard order, write `stats/`, list skipped files, mark complete."""
    check_finished(group, layout)
    ex = group.attrs["extraction"]
    valid = group["valid"][:]
    per_row = 1 if ex["stats"] == "element" else int(np.prod(group.attrs["latent_shape"][1:]))
    sums, sumsqs = group["shards/sum"], group["shards/sumsq"]
    total, total_sq = np.zeros(sums.shape[1:]), np.zeros(sums.shape[1:])
    for k in range(layout.num_shards):
        total += sums[k]
        total_sq += sumsqs[k]
    var_sum = None
    if ex.get("moments"):
        var_sum, var_sums = np.zeros(sums.shape[1:]), group["shards/var_sum"]
        for k in range(layout.num_shards):
            var_sum += var_sums[k]
    stats = Stats.from_sums(ex["stats"], ex["center"], total, total_sq, 2 * int(valid.sum()) * per_row, var_sum)
    write_stats(group, stats)
    mark_complete(group, layout)
    return stats


def mark_complete(group: zarr.Group, layout: Layout) -> None:
    """List the skipped files of every shard's record in the attributes, count the valid rows, mark complete."""
    check_finished(group, layout)
    done = group["shards/done"]
    skipped = [s for k in range(layout.num_shards) for s in done[f"{k:06d}"].attrs["skipped"]]
    group.attrs.update({"num_valid": int(group["valid"][:].sum()), "num_skipped": len(skipped), "skipped": skipped,
                        "complete": True})


def write_stats(group: zarr.Group, stats: Stats) -> None:
    arrays = {"std": stats.std, "sum": stats.sum, "sumsq": stats.sumsq}
    if stats.mean is not None:
        arrays["mean"] = stats.mean
    if stats.var_sum is not None:
        arrays["var_sum"] = stats.var_sum
    for name, value in arrays.items():
        group.create_array(f"stats/{name}", shape=value.shape, dtype=value.dtype, fill_value=0, overwrite=True)[...] = value
    group.create_array("stats/count", shape=(), dtype="int64", fill_value=0, overwrite=True)[...] = stats.count


# --- reading -----------------------------------------------------------------------------------------


def open_group(url: str | Path, mode: str = "r") -> zarr.Group:
    """Open a store's root group, with a clear error when there is none."""
    url = str(url)
    exists = "://" not in url and Path(url).exists()
    try:
        if "://" not in url and not exists:
            raise FileNotFoundError(url)
        return zarr.open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError) as e:
        if not exists:
            raise FileNotFoundError(f"no latent store at {url}") from e
        raise UserError(f"{url} is not a latent store: there is no Zarr group there") from e


def check_format(group: zarr.Group, url: str, expected: str = FORMAT, version: int = VERSION,
                 what: str = "latent store") -> None:
    fmt, found = group.attrs.get("format"), group.attrs.get("version")
    if fmt != expected:
        raise UserError(f"{url} is not a {what} (its 'format' attribute is {fmt!r}, expected {expected!r})")
    if found != version:
        raise UserError(f"{url} is a {what} of format version {found}; this code reads version {version}")


class FinishedStore:
    """What latent and image stores share: opened from a local path or any fsspec URL, checked to be of the class's
    format and complete (else the command that finishes it); its attributes and row counts."""

    format, version, what, command = FORMAT, VERSION, "latent store", "python -m latents.extract ..."

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self.group = open_group(self.url)
        check_format(self.group, self.url, self.format, self.version, self.what)
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        if not self.attrs.get("complete"):
            done = len(finished_shards(self.group)) if self.attrs.get("ready") else 0
            raise UserError(
                f"{self.what} {self.url} is incomplete ({done} of {self.layout.num_shards} shards finished); finish it "
                f"by running the extraction again with the same arguments: {self.attrs.get('command', self.command)}")

    @property
    def layout(self) -> Layout:
        ex = self.attrs["extraction"]
        return Layout(self.attrs["num_rows"], ex["shard_rows"], ex["chunk_rows"])

    @property
    def num_rows(self) -> int:
        return int(self.attrs["num_rows"])

    @property
    def num_valid(self) -> int:
        return int(self.attrs["num_valid"])

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])


class LatentStore(FinishedStore):
    """A finished latent store, opened from a local path or any fsspec URL."""

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.attrs["latent_shape"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.attrs["tokenizer"]

    @property
    def moments(self) -> bool:
        """Whether this is a moments store: `latents` are posterior means and `logvar` their log-variances."""
        return bool(self.attrs["extraction"].get("moments"))

    @property
    def features(self) -> dict[str, Any] | None:
        """The encoder of the stored REPA features (see the module docstring), None when the store has none."""
        return self.attrs.get("features")

    def array(self, name: str) -> zarr.Array:
        """One of latents, latents_flip, labels, index, valid; features, features_flip where `features` is set;
        logvar, logvar_flip in a moments store."""
        return self.group[name]

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows start..stop of every per-row array but the features (read shard- or chunk-aligned blocks for speed);
        a moments store's logvar and logvar_flip too."""
        names = ("latents", "latents_flip", "labels", "index", "valid") + (VIEWS["logvar"] if self.moments else ())
        return {name: self.group[name][start:stop] for name in names}

    @property
    def stats(self) -> Stats:
        g = self.group["stats"]
        names = set(g.array_keys())
        return Stats(
            kind=self.attrs["extraction"]["stats"],
            mean=g["mean"][...] if "mean" in names else None,
            std=g["std"][...],
            count=int(g["count"][...]),
            sum=g["sum"][...],
            sumsq=g["sumsq"][...],
            var_sum=g["var_sum"][...] if "var_sum" in names else None,
        )

    def __repr__(self) -> str:
        return f"LatentStore({self.url!r}, rows={self.num_rows}, valid={self.num_valid}, shape={self.latent_shape})"


def combined_stats(stores: list[LatentStore]) -> Stats:
    """Statistics over several stores (e.g. train shards) from their float64 sums, in store order.

    For one store this is exactly that store's statistics. The posterior variance sums (moments stores) are combined
    too when every store has them; `of_samples` then gives the statistics of posterior samples over all stores.
    """
    all_stats = [store.stats for store in stores]  # each read is several Zarr arrays
    first = all_stats[0]
    total, total_sq, count = np.zeros_like(first.sum), np.zeros_like(first.sumsq), 0
    var_sum = None if any(s.var_sum is None for s in all_stats) else np.zeros_like(first.sum)
    for store, s in zip(stores, all_stats):
        if s.kind != first.kind or (s.mean is None) != (first.mean is None) or s.sum.shape != first.sum.shape:
            raise MismatchError(f"cannot combine statistics of {stores[0].url} and {store.url}: different kind, shape or centring")
        total += s.sum
        total_sq += s.sumsq
        count += s.count
        if var_sum is not None:
            var_sum += s.var_sum
    return Stats.from_sums(first.kind, first.mean is not None, total, total_sq, count, var_sum)


def jsonable(value: Any) -> Any:
    """What a value reads back as after a trip through Zarr's JSON attributes."""
    return json.loads(json.dumps(value))


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


def check_aligned(a: LatentStore, b: LatentStore) -> None:
    """Refuse two stores whose latents cannot be joined along channels row by row (a composite latent config):
    they must hold the same images in the same row order (row count, `index`, `valid`, `labels`, image size and
    data source record) on one latent grid. Metadata and the per-row id arrays only; no latents are read."""
    grid = [f"{s.latent_shape[1]}x{s.latent_shape[2]}" for s in (a, b)]
    if grid[0] != grid[1]:
        raise MismatchError(f"latent stores {a.url} and {b.url} cannot be joined along channels: their latent grids "
                            f"are {grid[0]} and {grid[1]}")
    what = [f"{label} {va} and {vb}" for label, va, vb in (
        ("rows", a.num_rows, b.num_rows),
        ("image size", a.attrs.get("image_size"), b.attrs.get("image_size")),
        ("data source", (a.attrs.get("data") or {}).get("source"), (b.attrs.get("data") or {}).get("source"))) if va != vb]
    if not what:
        for name, meaning in (("index", "source positions"), ("valid", "valid masks"), ("labels", "labels")):
            differ = np.flatnonzero(a.array(name)[:] != b.array(name)[:])
            if len(differ):
                what.append(f"{meaning} ('{name}') differ in {len(differ)} of {a.num_rows} rows, first row {differ[0]}")
    if what:
        raise MismatchError(f"latent stores {a.url} and {b.url} cannot be joined along channels: they do not hold the "
                            f"same images in the same row order ({'; '.join(what)}); extract both from one --data "
                            "with one --seed")
    ea, eb = a.attrs.get("extraction") or {}, b.attrs.get("extraction") or {}
    noise = [e.get("noise_seed", e.get("seed")) for e in (ea, eb)]
    if ea.get("sample_posterior") and eb.get("sample_posterior") and noise[0] == noise[1]:
        # The draws are seeded by (noise seed, row, view): equal seeds would give both groups the same noise.
        raise MismatchError(f"latent stores {a.url} and {b.url} hold posterior samples drawn with the same noise seed "
                            f"({noise[0]}), so their noises are one draw, not independent; extract one of them again "
                            "with another --noise-seed")


def check_moments(stores: list[LatentStore] | tuple[LatentStore, ...]) -> None:
    """Refuse stores that hold no posterior moments where a latent config asks to sample from them (`posterior:
    sample`), naming the store and the extraction command that makes a moments store of the same images."""
    import shlex

    for s in stores:
        if s.moments:
            continue
        recorded = shlex.split(s.attrs.get("command") or "python -m latents.extract --tokenizer ... --data ...")
        argv, skip = [], False
        for a in recorded:
            if skip:
                skip = False
            elif a in ("--out", "--noise-seed"):
                skip = True
            elif a.split("=", 1)[0] not in ("--out", "--noise-seed", "--sample-posterior", "--store-moments"):
                argv.append(a)
        out = f"{s.url.rstrip('/').removesuffix('.zarr')}_moments.zarr"
        held = "posterior samples" if (s.attrs.get("extraction") or {}).get("sample_posterior") else "latents"
        raise MismatchError(f"latent store {s.url} holds {held}, not posterior moments (mean and log-variance) to draw "
                            f"a fresh sample from at every load, as the latent config's 'posterior: sample' asks; extract "
                            f"a moments store: {shlex.join(argv + ['--store-moments', '--out', out])} (or set posterior: "
                            "stored to train on these latents as they are)")


def check_made_by(tok_info: dict[str, Any], spec: str, store: LatentStore) -> None:
    """Refuse a tokenizer (its provenance, `tokenizers.base.describe`) other than the one that made `store`."""
    made_by = store.tokenizer
    if tok_info["name"] != made_by.get("name") or tok_info["config"] != made_by.get("config"):
        raise MismatchError(f"tokenizer {spec} ({tok_info['name']}) is not the one that made {store.url} "
                         f"({made_by.get('name')} with config {made_by.get('config')})")
