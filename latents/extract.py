"""`python -m latents.extract`: encode a data set (each image and its mirror) into a latent store.

    python -m latents.extract --pixels --data <name | yaml> --out images.zarr [--workers 4] [--seed 0]
        [--shard-size ROWS] [--strict] [data.key=value ...]       # an image store (latents/image_store.py)
    python -m latents.extract --tokenizer <saved folder | family:official_path> --data <name | yaml>
        --out <store path or fsspec URL> [--batch-size 64] [--strict] [--dtype float16|float32]
        [--stats channel|element] [--no-mean] [--sample-posterior | --store-moments] [--seed 0] [--workers 4]
        [--shard-size ROWS] [--bf16] [--features ENCODER [--features-weights FILE | --features-random-init]]
        [data.key=value ...]
    torchrun --standalone --nproc_per_node 8 -m latents.extract ...      # each rank writes whole shards

Rows are a seeded permutation of the data set; shards are written whole, each recorded when done
(latents/store.py). Started again on the same `--out`, the command checks that the store was made
with the same tokenizer, data and settings (else it stops, naming what differs) and resumes with the
unfinished shards; the result is bitwise equal to an uninterrupted run, whatever the number of
processes. Latents depend at the last bit on the batch composition, so batches never straddle a
shard and the batch size is one of the settings a resumed run must repeat; `--workers` is free.

REPA target features (`--features dinov2_b`): the same decoded batch also goes through the frozen encoder
(tokenizers.encoders.build_feature_encoder: REPA's preprocessing, position table fixed at load), and the
store gets `features` / `features_flip` [N, tokens, dim] float16 beside `latents` / `latents_flip`, written,
hashed, checked and resumed with them shard by shard. 768x16x16 tokens are 384 KB a view, so shards then
hold fewer rows. `--features-random-init` uses seeded random encoder weights (tests, demos; recorded in
the store's `features` attribute).

Posterior samples (`--sample-posterior`, the official VA-VAE recipe) use one generator per row and
view, seeded from (seed, source index, view), so they depend neither on batch size nor on processes.

Posterior moments (`--store-moments`, DDT's recipe): `latents` / `latents_flip` hold each view's posterior mean
and `logvar` / `logvar_flip` its log-variance (the tokenizer's `posterior(images)`, as it returns it: LDM and
diffusers clamp it to [-30, 20]), in `--dtype`, written, hashed, checked and resumed with the latents shard by
shard; the store's `extraction.moments` is true. The training loader then draws a fresh sample
mean + exp(logvar / 2) * eps at every load (latents/config.py `posterior: sample`). Any tokenizer with a
diagonal Gaussian posterior can (sdvae, vavae, semvae); one without (rae) is refused before it is loaded. The
statistics are the means' (as of any store) plus the sum of the posterior variances, from which those of the
samples follow exactly in expectation (latents/store.py). A store is twice the size of a store of means.

Bad files: a file that cannot be decoded is skipped, its row stays invalid (`valid` false, zeros),
and it is logged and listed with its reason in the store's `skipped` attribute. With `--strict`
the first bad file stops the command with an error naming it. What stays behind then: the shards
finished before it (each whole and recorded), never the shard holding the bad file, and the store
is not marked complete, so no reader opens it (LatentStore refuses incomplete stores). Fix the file
and run the same command to resume; or delete the store.

Log: JSON lines (start, one per shard, each skipped file, the final statistics) go next to a local
store as `<out>.extract.jsonl`; for a remote URL, to `./<store name>.extract.jsonl`.
"""
from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from omegaconf import DictConfig

from core import cli
from core.config import to_dict
from core.data import data_epilog, load_data_config
from core.errors import MismatchError, UserError
from core.images import Skipping, build_source, collate_items, default_workers
from core.lock import WriterLock
from core.log import JsonlWriter, get_logger
from core.runtime import derived_seed, make_accelerator, progress
from latents import store as zs
from latents.image_store import FORMAT as IMAGE_FORMAT, VERSION as IMAGE_VERSION, ImageStore, create_image_store, image_layout
from tokenizers.base import TOKENIZERS, Tokenizer, open_tokenizer
from tokenizers.encoders import ENCODERS, FrozenEncoder, build_feature_encoder

log = get_logger("latents.extract")

# Attributes that a resumed extraction must share with the store it continues.
RESUME_KEYS = ("tokenizer", "data.source", "image_size", "latent_shape", "num_rows", "num_classes", "extraction",
               "features.encoder", "features.timm_name", "features.image_size", "features.random_init",
               "features.weights_sha256", "features.dtype")  # not the weights' path: the same file may move
IMAGE_RESUME_KEYS = ("data.source", "image_size", "num_rows", "num_classes", "extraction")  # of an image store


class StrictError(UserError):
    """--strict met an image that cannot be decoded."""


@dataclass(frozen=True)
class ExtractSettings:
    """Everything besides tokenizer and data that the stored latents depend on."""

    batch_size: int = 64
    dtype: str = "float16"
    stats: str = "channel"
    center: bool = True  # False: no mean in the statistics (RAE)
    sample_posterior: bool = False
    moments: bool = False  # store posterior means (latents) and log-variances (logvar) instead of one latent
    seed: int = 0
    noise_seed: int | None = None  # the posterior samples' seed; None: `seed` (a composite's groups need two)
    shard_rows: int | None = None  # None: sized by latents.store.make_layout
    autocast: bool = False  # bf16 autocast while encoding


def noise_seed(settings: ExtractSettings) -> int:
    """The seed of the posterior samples: --noise-seed, else --seed (which also orders the rows)."""
    return settings.seed if settings.noise_seed is None else settings.noise_seed


def log_path(out: str) -> Path:
    if "://" in out:
        return Path.cwd() / f"{Path(out.rstrip('/')).name}.extract.jsonl"
    return Path(out.rstrip("/") + ".extract.jsonl")


def both_views(images: torch.Tensor) -> torch.Tensor:
    """The images, then their horizontal mirrors (the `_flip` arrays), along the batch."""
    return torch.cat([images, images.flip(-1)])


def has_posterior(tokenizer: Tokenizer | type[Tokenizer]) -> bool:
    """Whether a tokenizer (or family) has a diagonal Gaussian posterior: `posterior(images) -> (mean, logvar)`."""
    return callable(getattr(tokenizer, "posterior", None))


def check_posterior(tokenizer: Tokenizer | type[Tokenizer], flag: str) -> None:
    """Refuse `flag` (--sample-posterior, --store-moments) for a tokenizer without a posterior, naming those with one."""
    if has_posterior(tokenizer):
        return
    import tokenizers.families  # noqa: F401  (registers every family)

    able = sorted(n for n, c in TOKENIZERS.items() if has_posterior(c) and not n.endswith("_test"))
    raise UserError(f"{flag}: the {tokenizer.name} tokenizer has no posterior to sample: it encodes deterministically, "
                    f"with no diagonal Gaussian posterior(images) -> (mean, logvar); families with one: {', '.join(able)}")


def tokenizer_family(spec: str) -> type[Tokenizer] | None:
    """The family class of a --tokenizer spec without loading any weights (None where it cannot be told)."""
    import tokenizers.families  # noqa: F401  (registers every family)
    from tokenizers.base import read_config

    try:
        family = read_config(Path(spec)).get("family") if Path(spec).is_dir() else spec.partition(":")[0]
    except (OSError, ValueError):
        return None
    return TOKENIZERS.get(family)


def moment_views(tokenizer: Tokenizer, images: torch.Tensor, settings: ExtractSettings) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((mean, mean of the mirrors), (logvar, logvar of the mirrors)) of the posterior, float32 on the CPU."""
    n = len(images)
    x = both_views(images)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=settings.autocast):
        mean, logvar = tokenizer.posterior(x)
    mean, logvar = mean.float().cpu(), logvar.float().cpu()
    return (mean[:n], mean[n:]), (logvar[:n], logvar[n:])


def encode_views(tokenizer: Tokenizer, images: torch.Tensor, indices: torch.Tensor, settings: ExtractSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of the images and of their horizontal mirrors, float32 on the CPU."""
    n = len(images)
    x = both_views(images)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=settings.autocast):
        if settings.sample_posterior:
            mean, logvar = tokenizer.posterior(x)
            # Drawn on the CPU, one generator per (row, view), as the official code draws on the CPU RNG.
            noise = torch.stack([
                torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(derived_seed(noise_seed(settings), int(i), view)))
                for view in (0, 1) for i in indices
            ]).to(mean.device)
            z = mean.float() + torch.exp(0.5 * logvar.float()) * noise
        else:
            z = tokenizer.encode(x)
    z = z.float().cpu()
    return z[:n], z[n:]


def feature_views(encoder: FrozenEncoder, images: torch.Tensor, settings: ExtractSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """REPA target features [n, tokens, dim] of the images and of their mirrors, float32 on the CPU."""
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=settings.autocast):
        f = encoder(both_views(images))
    f = f.float().cpu()
    return f[: len(images)], f[len(images) :]


class ShardBuffer:
    """The rows of one shard while its batches are encoded; written to the store in one call when full."""

    def __init__(self, layout: zs.Layout, shard: int, latent_shape: tuple[int, int, int], dtype: str,
                 feature_shape: tuple[int, int] | None = None, moments: bool = False) -> None:
        self.start, self.stop = layout.shard_range(shard)
        n = self.stop - self.start
        self.latents, self.flips = np.zeros((n, *latent_shape), dtype), np.zeros((n, *latent_shape), dtype)
        self.features = None if feature_shape is None else tuple(
            np.zeros((n, *feature_shape), zs.FEATURE_DTYPE) for _ in zs.VIEWS["features"])  # (plain, mirrored)
        self.logvars = None if not moments else tuple(np.zeros((n, *latent_shape), dtype) for _ in zs.VIEWS["logvar"])
        self.valid = np.zeros(n, bool)
        self.skipped: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def put(self, rows: list[int], latents: torch.Tensor, flips: torch.Tensor, where: list[str],
            features: tuple[torch.Tensor, torch.Tensor] | None = None,
            logvars: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        pos = np.asarray(rows) - self.start
        lat, flip = _finite("latents", [latents, flips], self.latents.dtype, where, "try --dtype float32")
        if logvars is not None:
            for stored, values in zip(self.logvars, _finite("posterior log-variances", list(logvars), self.latents.dtype,
                                                            where, "try --dtype float32")):
                stored[pos] = values
        if features is not None:
            for stored, values in zip(self.features, _finite("features", features, zs.FEATURE_DTYPE, where, "")):
                stored[pos] = values
        self.latents[pos], self.flips[pos], self.valid[pos] = lat, flip, True


def _finite(what: str, views: list[torch.Tensor], dtype: Any, where: list[str], hint: str) -> list[np.ndarray]:
    """The views in the stored dtype, refused when a row is not finite there (float16 overflows at 65504)."""
    out = [v.numpy().astype(dtype) for v in views]
    finite = np.logical_and.reduce([np.isfinite(v.reshape(len(v), -1)).all(axis=1) for v in out])
    if not finite.all():
        bad = [w for w, ok in zip(where, finite) if not ok]
        raise UserError(f"non-finite {what} in {np.dtype(dtype)} for {bad[:5]}" + (f"; {hint}" if hint else ""))
    return out


def feature_attributes(encoder: FrozenEncoder, settings: ExtractSettings) -> dict[str, Any]:
    """The store's `features` attribute: the encoder's provenance and how its tokens were made."""
    info = encoder.provenance()
    return {**info, "dtype": zs.FEATURE_DTYPE,
            "preprocessing": f"REPA (sihyun-yu/REPA): [0, 1], mean/std, then bicubic resize {info['input_size']} -> "
                             f"{info['image_size']} px; position table resampled once at load to {info['grid']}x{info['grid']}; "
                             f"final-norm patch tokens, {encoder.prefix_tokens} class/register tokens dropped; features_flip "
                             f"of the mirrored image; {'bf16 autocast' if settings.autocast else 'fp32'}"}


def store_attributes(tok_info: dict[str, Any], source: Any, data_cfg: Any, latent_shape: tuple[int, int, int],
                     settings: ExtractSettings, layout: zs.Layout, command: str,
                     features: dict[str, Any] | None = None) -> dict[str, Any]:
    size = int(data_cfg["image_size"])
    encoding = ("posterior samples, one seeded generator per row and view" if settings.sample_posterior else
                "posterior moments: latents hold the means, logvar the log-variances" if settings.moments else
                "deterministic encode (posterior mean)")
    return zs.jsonable({
        "tokenizer": tok_info,
        "data": {"config": to_dict(data_cfg) if isinstance(data_cfg, DictConfig) else dict(data_cfg), "source": source.describe()},
        "image_size": size,
        "latent_shape": list(latent_shape),
        "num_rows": len(source),
        "num_classes": int(source.num_classes),
        "preprocessing": f"ADM center crop to {size}x{size}, RGB, [-1, 1]; latents_flip encodes the horizontal mirror; "
                         f"{encoding}; {'bf16 autocast' if settings.autocast else 'fp32'}",
        # noise_seed only when given and moments only when true, so the record of a store made before they existed
        # still matches on resume.
        "extraction": {**{k: v for k, v in asdict(settings).items()
                          if not (k == "noise_seed" and v is None or k == "moments" and not v)},
                       "shard_rows": layout.shard_rows, "chunk_rows": layout.chunk_rows},
        "features": features,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    })


def _select(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def prepare_store(out: str, attrs: dict[str, Any], layout: zs.Layout, settings: ExtractSettings,
                  latent_shape: tuple[int, int, int], perm: np.ndarray, labels: np.ndarray,
                  feature_shape: tuple[int, int] | None = None) -> str:
    """Create the store, or check that the one at `out` continues this extraction. Returns what it did."""
    def create(overwrite: bool) -> None:
        zs.create_store(out, attrs, layout, latent_shape, settings.dtype, settings.stats, perm,
                        labels[perm].astype(np.int32), overwrite=overwrite, feature_shape=feature_shape,
                        moments=settings.moments)

    return open_or_create(out, attrs, create, RESUME_KEYS)


def open_or_create(out: str, attrs: dict[str, Any], create: Callable[[bool], None], resume_keys: tuple[str, ...],
                   fmt: str = zs.FORMAT, version: int = zs.VERSION, what: str = "latent store") -> str:
    """`create(overwrite)` the store at `out`, or check that the one there continues this extraction (its
    `resume_keys` attributes equal `attrs`'). Returns what it did: created, resumed or complete."""
    try:
        group = zs.open_group(out, mode="r+")
    except FileNotFoundError:
        group = None
    except ValueError:
        if not Path(out).is_dir() or any(Path(out).iterdir()):
            raise UserError(f"--out {out} exists and is not a {what}; choose another path or delete it") from None
        group = None  # an empty folder
    if group is not None:
        zs.check_format(group, out, fmt, version, what)
    if group is None or not group.attrs.get("ready"):  # absent, or its creation was cut short
        create(group is not None or Path(out).is_dir())
        return "created"
    old = dict(group.attrs)
    diff = [k for k in resume_keys if _select(old, k) != _select(attrs, k)]
    if diff:
        details = "; ".join(f"{k}: store has {_select(old, k)!r}, this run {_select(attrs, k)!r}" for k in diff)
        raise MismatchError(f"{out} was made with other settings, so this run cannot resume it ({details}). "
                         "Use the same settings, another --out, or delete the store.")
    if old.get("complete"):
        return "complete"
    if "://" not in out:  # temporary files of writes cut short by a crash (zarr's LocalStore writes via *.partial)
        for stray in Path(out).rglob("*.partial"):
            stray.unlink()
    return "resumed"


def replace_damaged_shards(group: Any, layout: zs.Layout, out: str) -> list[int]:
    """Finished shards that no longer read back as they were written: named, and their done records dropped so that
    this run writes them again (a complete store becomes incomplete until then). Reads the whole store."""
    log.info("%s: checking the finished shards against their recorded hashes", out)
    bad = []
    for k in sorted(zs.finished_shards(group)):
        if (why := zs.shard_problem(group, layout, k)) is not None:
            log.warning("%s: %s; writing it again", out, why)
            zs.forget_shard(group, k)
            bad.append(k)
    if bad:
        group.attrs["complete"] = False
    return bad


def begin_writing(out: str, acc: Accelerator | PartialState, layout: zs.Layout, journal: JsonlWriter, command: str,
                  prepare: Callable[[], str], what: str = "latent store") -> list[int] | None:
    """The unfinished shards this process writes (dealt round-robin over the processes), after the main process
    locked the store, created or resumed it (`prepare`: latents.extract.open_or_create) and dropped the records of
    finished shards that no longer read back as written; None when the store is already complete."""
    rank, world = acc.process_index, acc.num_processes
    if acc.is_main_process:
        if "://" not in out:  # one writer per store; object stores have no such lock here
            WriterLock(log_path(out).with_suffix(".lock"), f"{what} {out}").acquire()
        state = prepare()
        if state != "created":
            replace_damaged_shards(zs.open_group(out, mode="r+"), layout, out)
    acc.wait_for_everyone()
    group = zs.open_group(out, mode="r+")
    if group.attrs.get("complete"):
        if acc.is_main_process:
            log.info("%s is already complete; nothing to do", out)
        return None
    done = zs.finished_shards(group)
    # Unfinished shards dealt round-robin (rank r: r, r+W, ...), balanced even when resuming with another W.
    todo = [k for k in range(layout.num_shards) if k not in done][rank::world]
    acc.wait_for_everyone()  # every rank has read the same `done` before any rank adds to it
    if acc.is_main_process:
        log.info("%s %s: %d rows in %d shards of %d, %d finished; %d process(es)", state, out, layout.num_rows,
                 layout.num_shards, layout.shard_rows, len(done), world)
        journal.write(event="start", state=state, out=out, num_rows=layout.num_rows, num_shards=layout.num_shards,
                      finished=len(done), world_size=world, command=command)
    return todo


def shard_batches(source: Any, perm: np.ndarray, layout: zs.Layout, todo: list[int], batch_size: int, workers: int,
                  acc: Accelerator | PartialState, strict: bool, journal: JsonlWriter, desc: str,
                  uint8: bool = False) -> Iterator[tuple[int, np.ndarray, Any, dict[int, int], list[dict[str, Any]]]]:
    """(shard, rows, decoded batch, source index -> row, skipped entries) of each batch of the shards `todo`, rows in
    order, decoded by `workers` processes (`uint8`: the crops as uint8). Batches never straddle shards, so no row
    depends on the process count. Bad files are logged and journaled; with `strict` the first one raises."""
    rank, world = acc.process_index, acc.num_processes
    bar = progress(total=sum(b - a for a, b in map(layout.shard_range, todo)), enabled=acc.is_main_process,
                   desc=desc + (f" (rank 0 of {world})" if world > 1 else ""))

    def plan():  # (shard, rows) of each batch
        for k in todo:
            start, stop = layout.shard_range(k)
            for a in range(start, stop, batch_size):
                yield k, np.arange(a, min(a + batch_size, stop))

    # Bad files come back as skipped items even when strict, so the error is the same with or without workers.
    loader = torch.utils.data.DataLoader(
        Skipping(source, uint8=uint8), batch_sampler=(perm[rows].tolist() for _, rows in plan()),
        collate_fn=collate_items, num_workers=workers, pin_memory=acc.device.type == "cuda",
    )
    try:
        for (k, rows), batch in zip(plan(), loader):
            row_of = dict(zip(perm[rows].tolist(), rows.tolist()))
            skipped = []
            for index, reason in batch.skipped:
                entry = {"index": int(index), "row": row_of[index], "where": source.where(index), "reason": reason}
                if strict:
                    journal.write(event="failed", rank=rank, shard=k, **entry)
                    raise StrictError(f"{reason} (--strict)")
                skipped.append(entry)
                log.warning("skipped %s (%s)", entry["where"], reason)
                journal.write(event="skipped", rank=rank, **entry)
            yield k, rows, batch, row_of, skipped
            bar.update(len(rows))
    finally:
        bar.close()


def journal_shard(journal: JsonlWriter, rank: int, shard: int, valid: np.ndarray, skipped: list[Any], t0: float) -> None:
    seconds = time.perf_counter() - t0
    journal.write(event="shard", rank=rank, shard=shard, rows=len(valid), valid=int(valid.sum()), skipped=len(skipped),
                  seconds=round(seconds, 3), images_per_s=round(len(valid) / seconds, 2))


def extract(tokenizer: Tokenizer, tok_info: dict[str, Any], source: Any, data_cfg: Any, out: str,
            settings: ExtractSettings = ExtractSettings(), strict: bool = False, workers: int = 0,
            accelerator: Accelerator | PartialState | None = None, command: str = "",
            features: FrozenEncoder | None = None) -> zs.LatentStore:
    """Encode `source` into the store at `out` (creating or resuming it); every process of `accelerator` calls this.

    Only the process layout and device of `accelerator` are used (default: accelerate's PartialState).
    `features`: a REPA target encoder (`build_feature_encoder` for the data's image size) whose tokens of every
    image and its mirror are stored too, computed from the same decoded batch as the latents.
    """
    acc = accelerator or PartialState()
    out = str(out)
    if settings.sample_posterior and settings.moments:
        raise UserError("--sample-posterior stores one posterior sample, --store-moments the posterior's mean and "
                        "log-variance to sample from at every load; give one of them")
    if settings.sample_posterior:
        check_posterior(tokenizer, "--sample-posterior")
    if settings.moments:
        check_posterior(tokenizer, "--store-moments")
    image_size = int(data_cfg["image_size"])
    latent_shape = tokenizer.latent_shape(image_size)
    feature_shape = None
    if features is not None:
        if features.input_size != image_size:
            raise MismatchError(f"the feature encoder {features.name} was built for {features.input_size} px images, "
                                f"the data gives {image_size} px")
        feature_shape = (features.grid**2, features.feature_dim)
    layout = zs.make_layout(len(source), latent_shape, settings.dtype, settings.shard_rows, feature_shape)
    perm = np.random.default_rng(settings.seed).permutation(len(source))
    attrs = store_attributes(tok_info, source, data_cfg, latent_shape, settings, layout, command,
                             None if features is None else feature_attributes(features, settings))
    journal = JsonlWriter(log_path(out))

    todo = begin_writing(out, acc, layout, journal, command, lambda: prepare_store(
        out, attrs, layout, settings, latent_shape, perm, np.asarray(source.labels), feature_shape))
    if todo is None:
        return zs.LatentStore(out)
    group = zs.open_group(out, mode="r+")
    tokenizer.to(acc.device).eval()
    if features is not None:
        features.to(acc.device)
    buf = None
    for k, rows, batch, row_of, skipped in shard_batches(source, perm, layout, todo, settings.batch_size, workers, acc,
                                                         strict, journal, f"encoding {Path(out).name}"):
        buf = buf or ShardBuffer(layout, k, latent_shape, settings.dtype, feature_shape, settings.moments)
        buf.skipped += skipped
        if len(batch.indices):
            images = batch.images.to(acc.device)
            logvars = None
            if settings.moments:
                (lat, flip), logvars = moment_views(tokenizer, images, settings)
            else:
                lat, flip = encode_views(tokenizer, images, batch.indices, settings)
            feats = None if features is None else feature_views(features, images, settings)
            buf.put([row_of[int(i)] for i in batch.indices], lat, flip, [source.where(int(i)) for i in batch.indices],
                    feats, logvars)
        if rows[-1] == buf.stop - 1:
            zs.write_shard(group, layout, k, buf.latents, buf.flips, buf.valid, buf.skipped, settings.stats,
                           buf.features, buf.logvars)
            journal_shard(journal, acc.process_index, k, buf.valid, buf.skipped, buf.t0)
            buf = None

    acc.wait_for_everyone()
    if acc.is_main_process:
        stats = zs.finalise(group, layout)
        skipped = group.attrs["num_skipped"]
        log.info("%s complete: %d valid rows, %d skipped; stats over %d values each", out, group.attrs["num_valid"], skipped, stats.count)
        journal.write(event="complete", num_valid=group.attrs["num_valid"], num_skipped=skipped,
                      std_mean=float(stats.std.mean()), mean_mean=None if stats.mean is None else float(stats.mean.mean()))
    acc.wait_for_everyone()
    return zs.LatentStore(out)


def extract_pixels(source: Any, data_cfg: Any, out: str, seed: int = 0, shard_rows: int | None = None,
                   strict: bool = False, workers: int = 0, batch_size: int = 64,
                   accelerator: Accelerator | PartialState | None = None, command: str = "") -> ImageStore:
    """Write `source`'s ADM crops as uint8 into the image store at `out` (latents/image_store.py), creating or
    resuming it shard by shard like a latent store; every process of `accelerator` calls this. `batch_size` only
    groups the decoding work: the stored bytes do not depend on it, nor on `workers` or the process count."""
    acc = accelerator or PartialState()
    out, size = str(out), int(data_cfg["image_size"])
    layout = image_layout(len(source), shard_rows)
    perm = np.random.default_rng(seed).permutation(len(source))
    attrs = zs.jsonable({
        "data": {"config": to_dict(data_cfg) if isinstance(data_cfg, DictConfig) else dict(data_cfg),
                 "source": source.describe()},
        "image_size": size, "num_rows": len(source), "num_classes": int(source.num_classes),
        "preprocessing": f"ADM center crop to {size}x{size}, RGB, uint8 [3, H, W]; no mirrored copy (a loader mirrors "
                         "at load)",
        "extraction": {"seed": seed, "shard_rows": layout.shard_rows, "chunk_rows": layout.chunk_rows},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
    })
    labels = np.asarray(source.labels)[perm].astype(np.int32)
    journal = JsonlWriter(log_path(out))
    todo = begin_writing(out, acc, layout, journal, command, lambda: open_or_create(
        out, attrs, lambda overwrite: create_image_store(out, attrs, layout, size, perm, labels, overwrite),
        IMAGE_RESUME_KEYS, IMAGE_FORMAT, IMAGE_VERSION, "image store"), "image store")
    if todo is None:
        return ImageStore(out)
    group = zs.open_group(out, mode="r+")
    images = valid = skipped = t0 = None
    for k, rows, batch, row_of, batch_skipped in shard_batches(source, perm, layout, todo, batch_size, workers, acc,
                                                               strict, journal, f"cropping {Path(out).name}", uint8=True):
        start, stop = layout.shard_range(k)
        if images is None:
            images, valid = np.zeros((stop - start, 3, size, size), np.uint8), np.zeros(stop - start, bool)
            skipped, t0 = [], time.perf_counter()
        skipped += batch_skipped
        at = np.asarray([row_of[int(i)] for i in batch.indices], dtype=np.int64) - start
        if len(at):
            images[at], valid[at] = batch.images.numpy(), True
        if rows[-1] == stop - 1:
            zs.put_shard(group, layout, k, {"images": images, "valid": valid}, skipped)
            journal_shard(journal, acc.process_index, k, valid, skipped, t0)
            images = None
    acc.wait_for_everyone()
    if acc.is_main_process:
        zs.mark_complete(group, layout)
        log.info("%s complete: %d valid images, %d skipped", out, group.attrs["num_valid"], group.attrs["num_skipped"])
        journal.write(event="complete", num_valid=group.attrs["num_valid"], num_skipped=group.attrs["num_skipped"])
    acc.wait_for_everyone()
    return ImageStore(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    import tokenizers.families  # noqa: F401  (registers every family, for the help text)

    families = ", ".join(sorted(k for k in TOKENIZERS if not k.endswith("_test")))
    p = cli.ArgumentParser(prog="python -m latents.extract", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"tokenizer families (--tokenizer family:path): {families}\n{data_epilog()}")
    p.add_argument("--tokenizer", help="saved tokenizer folder, or family:path[,key=value] of an official release")
    p.add_argument("--pixels", action="store_true",
                   help="write an image store instead: the ADM crops as uint8 [N, 3, S, S] for a pixel latent config's "
                        "pixels.store (no tokenizer; no mirrored copy, the loader mirrors at load); takes --data, "
                        "--out, --seed, --shard-size, --workers, --batch-size, --strict")
    p.add_argument("--data", required=True, help="data config name (configs/data) or YAML path")
    p.add_argument("--out", required=True, help="store path or fsspec URL")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--strict", action="store_true", help="stop at the first undecodable image instead of skipping it")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--stats", choices=list(zs.STAT_KINDS), default="channel", help="per channel [C] or per element [C,h,w]")
    p.add_argument("--no-mean", action="store_true", help="statistics without a mean: z / std (RAE)")
    posterior = p.add_mutually_exclusive_group()
    posterior.add_argument("--sample-posterior", action="store_true", help="store posterior samples (official VA-VAE recipe)")
    posterior.add_argument("--store-moments", action="store_true",
                           help="store each view's posterior mean (latents) and log-variance (logvar), to draw a fresh "
                                "sample at every load (DDT's recipe; latent config 'posterior: sample'); twice the size")
    p.add_argument("--seed", type=int, default=0, help="row permutation and posterior samples")
    p.add_argument("--noise-seed", type=int, default=None,
                   help="seed of the posterior samples (default: --seed); the sampled groups of a composite latent "
                        "(SFD's texture and semantic stores) share --seed and need different noise seeds")
    p.add_argument("--workers", type=int, default=default_workers(), help="image decoding processes per rank (default: min(4, cores))")
    p.add_argument("--shard-size", type=int, default=None, help="rows per shard (default: < 64 MiB, at most 4096)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast while encoding (default fp32)")
    p.add_argument("--features", choices=sorted(ENCODERS), default=None, metavar="ENCODER",
                   help=f"also store REPA target features of this frozen encoder ({', '.join(sorted(ENCODERS))}; "
                        "REPA's default dinov2_b, SFD's dinov2_b_reg)")
    p.add_argument("--features-weights", default=None, metavar="FILE",
                   help="weights file of the --features encoder (default: the Hugging Face cache)")
    p.add_argument("--features-random-init", action="store_true",
                   help="seeded random weights for the --features encoder (tests and demos only)")
    p.add_argument("overrides", nargs="*", help="data.key=value")
    return p.parse_intermixed_args(argv)  # data.key=value may come between options


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.pixels:
        return main_pixels(args, argv)
    if not args.tokenizer:
        raise cli.UsageError("give --tokenizer (a latent store) or --pixels (an image store)")
    settings = ExtractSettings(
        batch_size=args.batch_size, dtype=args.dtype, stats=args.stats, center=not args.no_mean,
        sample_posterior=args.sample_posterior, moments=args.store_moments, seed=args.seed, noise_seed=args.noise_seed, shard_rows=args.shard_size, autocast=args.bf16,
    )
    if (args.features_weights or args.features_random_init) and not args.features:
        raise cli.UsageError("--features-weights and --features-random-init need --features ENCODER")
    if args.features_weights and args.features_random_init:
        raise cli.UsageError("give either --features-weights or --features-random-init, not both")
    family = tokenizer_family(args.tokenizer)  # refused before any data or weights are opened where it can be told
    for flag, asked in (("--sample-posterior", args.sample_posterior), ("--store-moments", args.store_moments)):
        if asked and family is not None:
            check_posterior(family, flag)
    data_cfg = load_data_config(args.data, args.overrides)
    acc = make_accelerator(mixed_precision="no")
    source = build_source(data_cfg)
    features = None
    if args.features:
        try:
            features = build_feature_encoder(args.features, args.features_weights, args.features_random_init,
                                             image_size=int(data_cfg["image_size"]))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} [here: --features-weights FILE, or --features-random-init for a test]") from e
    tokenizer, tok_info = open_tokenizer(args.tokenizer)
    command = "python -m latents.extract " + " ".join(shlex.quote(a) for a in argv)
    try:
        extract(tokenizer, tok_info, source, data_cfg, args.out, settings, args.strict, args.workers, acc, command,
                features)
    except StrictError as e:
        raise StrictError(f"{e}. The store {args.out} is left incomplete: shards finished before this file are kept, "
                          "nothing of the shard holding it was written. Fix the file and run the same command to resume, "
                          "or delete the store.") from e



def main_pixels(args: argparse.Namespace, argv: list[str]) -> None:
    """`--pixels`: an image store; the options of a latent store are refused rather than ignored."""
    given = [flag for flag, value in (("--tokenizer", args.tokenizer), ("--features", args.features),
                                       ("--sample-posterior", args.sample_posterior), ("--store-moments", args.store_moments),
                                       ("--no-mean", args.no_mean), ("--bf16", args.bf16),
                                       ("--noise-seed", args.noise_seed is not None), ("--dtype", args.dtype != "float16"),
                                       ("--stats", args.stats != "channel")) if value]
    if given:
        raise cli.UsageError(f"--pixels writes uint8 images, encoded by nothing: {given[0]} does not apply")
    data_cfg = load_data_config(args.data, args.overrides)
    acc = make_accelerator(mixed_precision="no")
    command = "python -m latents.extract " + " ".join(shlex.quote(a) for a in argv)
    try:
        extract_pixels(build_source(data_cfg), data_cfg, args.out, args.seed, args.shard_size, args.strict,
                       args.workers, args.batch_size, acc, command)
    except StrictError as e:
        raise StrictError(f"{e}. The store {args.out} is left incomplete: shards finished before this file are kept. "
                          "Fix the file and run the same command to resume, or delete the store.") from e


if __name__ == "__main__":
    cli.run(main)
