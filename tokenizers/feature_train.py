"""The training loop of feature autoencoders: a VAE learns to reconstruct a frozen encoder's patch tokens through a
small latent, with no pixels and no GAN. It trains SFD's SemVAE (tokenizers/semvae_train.py) and FAE's feature
stage (tokenizers/fae_train.py, ``stage=feature``):

    loss = mse_weight * MSE + cos_weight * (1 - cos) + kl_weight * KL

MSE is the mean over every feature element; KL is summed over the latent elements of each image and averaged over
the batch; the decoder sees a posterior sample. ``loss.cos_dim``: ``tokens`` is SFD's release's
``F.cosine_similarity(recon, target)``, whose default dim=1 on [B, L, D] compares each feature channel's column of
L token values; ``features`` is the per-token cosine over the D channels. AdamW with a linear warm-up from
``optim.warmup_start`` x lr, ``optim.constant_steps`` at lr, then a cosine to ``optim.final_ratio`` x lr at the
last step.

Data: images (``data=...``), turned into features by the tokenizer's frozen encoder at each step (in fp32), or the
``features`` arrays of a latent store (``features.store=<store>``, made by ``latents.extract --features <encoder>``),
plain views only.

The loop is its own (tokenizers.train's is built around a discriminator step): `tokenizers.train` hands a family
with a ``run`` to it. It keeps that loop's guarantees: the run folder, step-seeded batches (StepBatches) and
per-image posterior noise (core.runtime.step_generators), so a resumed run ends with the weights of an
uninterrupted one and the process count changes nothing but float reduction order.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from core.config import ConfigError
from core.ema import EMA
from core.errors import MismatchError, UserError
from core.images import build_source, iterate_images
from core.log import get_logger
from core.runtime import (RunFolder, StepMeans, fused_adam_kwargs, make_accelerator, progress,
                          seed_everything, step_generators, tokenizer_step_done)
from tokenizers.base import Tokenizer
from tokenizers.encoders import ENCODERS
from tokenizers.losses import kl_loss
from tokenizers.recipe import Family, export_tokenizer, init_weights, with_module

log = get_logger("tokenizers.train")

COS_DIMS = {"tokens": 1, "features": -1}  # loss.cos_dim -> the dim of F.cosine_similarity on [B, L, D]
STORE_FORMAT = "latentkit.latent_store"  # latents/store.py's FORMAT (tokenizers may not import latents)
STORE_CELL = 16  # image pixels per token of a store's REPA features


# --- loss and schedule ---------------------------------------------------------------------------------

def cosine_similarity(recon: torch.Tensor, target: torch.Tensor, cos_dim: str) -> torch.Tensor:
    """Mean cosine similarity of features [B, L, D] along the tokens (one value per (b, d): the release's
    loss) or along the features (one per (b, l): the paper's and the release's evaluation)."""
    if cos_dim not in COS_DIMS:
        raise ConfigError(f"loss.cos_dim: unknown {cos_dim!r}; choose from {', '.join(COS_DIMS)}")
    return F.cosine_similarity(recon, target, dim=COS_DIMS[cos_dim]).mean()


def feature_loss(recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                loss_cfg: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, its terms) in fp32: MSE + w_cos (1 - cos) + w_kl KL (summed per image, mean over the batch)."""
    recon, target = recon.float(), target.float()
    mse = F.mse_loss(recon, target)
    cos = cosine_similarity(recon, target, loss_cfg.cos_dim)
    kl = kl_loss(mean.float(), logvar.float())
    loss = loss_cfg.mse_weight * mse + loss_cfg.cos_weight * (1 - cos) + loss_cfg.kl_weight * kl
    return loss, {"mse": mse, "cos": cos, "kl": kl, "loss": loss}


def lr_factor(k: int, warmup: int, constant: int, total: int, start: float = 0.01, final: float = 0.1) -> float:
    """The release's learning rate at update k (from 0) as a fraction of the base rate: torch's LinearLR(start, 1,
    `warmup`), ConstantLR for `constant` updates, CosineAnnealingLR to `final` over the rest of `total`, chained
    by SequentialLR. So update 0 runs at `start`, update `warmup` at 1; `final` is reached at update `total`."""
    warmup = max(warmup, 1)  # as the release: no warm-up is one step
    if k < warmup:
        return start + (1 - start) * k / warmup
    if k < warmup + constant:
        return 1.0
    span = max(total - warmup - constant, 1)
    j = min(k - warmup - constant, span)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * j / span))


# --- data ------------------------------------------------------------------------------------------------

class StoreFeatures(torch.utils.data.Dataset):
    """The plain-view ``features`` [tokens, dim] of a latent store's valid rows, read with zarr directly.

    An item is a list of positions (one step's share, from StepBatches), read in one orthogonal selection. The
    group is opened on first use, so each DataLoader worker opens its own.
    """

    def __init__(self, url: str, model: dict[str, Any], image_size: int):
        import zarr

        try:
            group = zarr.open_group(url, mode="r")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"features.store: no latent store at {url}") from e
        attrs = dict(group.attrs)
        if attrs.get("format") != STORE_FORMAT:
            raise UserError(f"features.store: {url} is not a latent store (format {attrs.get('format')!r})")
        if not attrs.get("complete"):
            raise UserError(f"features.store: {url} is not complete; finish its extraction first (run it again)")
        feats = attrs.get("features")
        fix = f"latents.extract --features {model['encoder']} --out <store> (data at {image_size} px)"
        if not feats:
            raise MismatchError(f"features.store: {url} holds no features; make one with {fix}")
        want = {"encoder": model["encoder"], "input_size": image_size, "random_init": bool(model["random_init"])}
        differ = {k: (feats.get(k), v) for k, v in want.items() if feats.get(k) != v}
        if differ:
            raise MismatchError(f"features.store: {url} has features of another encoder setup than the model "
                                + ", ".join(f"{k} {a!r} (model: {b!r})" for k, (a, b) in differ.items()) + f"; {fix}")
        self.url, self.shape = url, (int(feats["tokens"]), int(feats["dim"]))
        self.rows = np.flatnonzero(group["valid"][:])  # a skipped image's row holds zeros
        self.provenance = feats
        self._array = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions: list[int]) -> torch.Tensor:
        import zarr

        if self._array is None:
            self._array = zarr.open_group(self.url, mode="r")["features"]
        rows = self.rows[np.asarray(positions)]
        order = np.argsort(rows, kind="stable")
        block = self._array.get_orthogonal_selection((rows[order],))  # zarr reads increasing rows
        out = np.empty_like(block)
        out[order] = block
        return torch.from_numpy(out.astype(np.float32))

    def describe(self) -> dict[str, Any]:
        return {"store": self.url, "rows": len(self.rows), "features": self.provenance}


def feature_batches(cfg: DictConfig, data: Any, tokenizer: Tokenizer, start: int, rank: int, world: int,
                    device: torch.device) -> Iterator[torch.Tensor]:
    """This process's share of each step's features from step `start` on, on `device`."""
    from tokenizers.train import StepBatches, batches  # here: tokenizers.train imports this module

    if isinstance(data, StoreFeatures):
        if cfg.train.batch_size % world:
            raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by the {world} processes")
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, sampler=StepBatches(len(data), cfg.train.batch_size, cfg.train.seed, start, rank, world),
            num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda")
        for feats in loader:
            yield feats.to(device)
    else:
        for images in batches(data, cfg, start, rank, world):
            yield features_of(tokenizer, images.to(device))


def features_of(tokenizer: Tokenizer, images: torch.Tensor) -> torch.Tensor:
    # The targets in fp32 even under bf16 autocast, as pre-extracted features are.
    with torch.autocast(images.device.type, enabled=False):
        return tokenizer.features(images.float())


def sample_features(cfg: DictConfig, data: Any, tokenizer: Tokenizer, device: torch.device) -> torch.Tensor:
    """The fixed features every evaluation reconstructs: the first `log.sample_images` of the data."""
    n = cfg.log.sample_images
    if isinstance(data, StoreFeatures):
        return data[list(range(min(n, len(data))))].to(device)
    return features_of(tokenizer, next(iterate_images(data, n)).images.to(device))


@torch.no_grad()
def evaluate(vae: nn.Module, feats: torch.Tensor) -> dict[str, float]:
    """Reconstruction of features from the posterior mean: MSE and both cosines."""
    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.posterior(feats)[0]).float()
    vae.train(was_training)
    return {"eval_mse": F.mse_loss(recon, feats).item(),
            **{f"eval_cos_{d}": cosine_similarity(recon, feats, d).item() for d in COS_DIMS}}


def check_config(cfg: DictConfig) -> None:
    if cfg.model.encoder not in ENCODERS:
        raise ConfigError(f"model.encoder: unknown encoder {cfg.model.encoder!r}; known: {', '.join(sorted(ENCODERS))} "
                          "(SemVAE's release: dinov2_b_reg; FAE's paper: dinov2_g)")
    if cfg.data.image_size % cfg.model.cell:
        raise ConfigError(f"data.image_size {cfg.data.image_size} is not a multiple of model.cell {cfg.model.cell} (one "
                          "latent position per cell)")
    if cfg.features.store and (cfg.model.cell != STORE_CELL or cfg.model.encoder_depth is not None):
        raise ConfigError(f"features.store holds REPA features (a token per {STORE_CELL} px of the whole encoder); "
                          f"model.cell={cfg.model.cell} and model.encoder_depth={cfg.model.encoder_depth} need images")
    if cfg.loss.cos_dim not in COS_DIMS:
        raise ConfigError(f"loss.cos_dim: unknown {cfg.loss.cos_dim!r}; choose from {', '.join(COS_DIMS)}")
    if cfg.train.steps < 1 or cfg.train.batch_size < 1:
        raise ConfigError(f"train.steps and train.batch_size must be positive, got {cfg.train.steps}, {cfg.train.batch_size}")


class FeatureFamily(Family):
    """What the feature loop asks of a family: its `name` and, built from the config, `tokenizer` (with `features`,
    `feature_shape`, `feature_encoder`, and its trained VAE as the module `vae`) and `model` (that VAE; SemVAE's and
    FAE's have one interface: posterior, decode, forward)."""

    tokenizer: Tokenizer

    @classmethod
    def data(cls, cfg: DictConfig) -> Any:
        """The training data: a store's features, or images (a missing folder stops the run before any network)."""
        check_config(cfg)
        if cfg.features.store:
            return StoreFeatures(str(cfg.features.store), dict(cfg.model), cfg.data.image_size)
        return build_source(cfg.data)

    @classmethod
    def run(cls, cfg: DictConfig) -> Path:
        return train(cfg, cls)


def train(cfg: DictConfig, family_cls: type[FeatureFamily]) -> Path:
    """Train (or resume) one feature-autoencoder run; returns the run folder. The exported tokenizer is in
    `<run>/tokenizer`."""
    name = family_cls.name
    run_dir = cfg.run.dir or f"runs/tokenizer/{name}"
    acc = make_accelerator(cfg.train.precision, cfg.train.log_with, run_dir)
    seed_everything(cfg.train.seed)
    data = family_cls.data(cfg)
    family = family_cls(cfg)
    tokenizer = family.tokenizer
    if isinstance(data, StoreFeatures) and data.shape != tokenizer.feature_shape:
        raise MismatchError(f"features.store: {data.url} holds features {data.shape}, the model takes {tokenizer.feature_shape}")
    run = RunFolder(run_dir, acc)
    run.save_config(cfg, may_change=("train.log_with",))
    if cfg.run.init_from:
        init_weights(Path(cfg.run.init_from), family.model)
    o = cfg.optim
    opt = torch.optim.AdamW(family.model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                            **fused_adam_kwargs())
    tokenizer.feature_encoder.to(acc.device)
    model, opt = acc.prepare(family.model, opt)
    raw = acc.unwrap_model(model)
    ema = EMA(raw, cfg.ema.decay) if cfg.ema.enabled else None

    step = run.resume(ema)
    run.track(cfg, step)

    fixed = sample_features(cfg, data, tokenizer, acc.device)
    if acc.is_main_process:
        run.log(event="start", family=name, step=step, processes=acc.num_processes, data=data.describe(),
                tokenizer_params=sum(p.numel() for p in raw.parameters()), precision=acc.mixed_precision,
                random_weights=family.random_networks())
    if step == 0:
        evaluation(run, acc, raw, ema, fixed, step)

    bar = progress(total=cfg.train.steps, initial=step, desc=f"train {name}", enabled=acc.is_main_process)
    means = StepMeans()
    feats_iter = feature_batches(cfg, data, tokenizer, step, acc.process_index, acc.num_processes, acc.device) \
        if step < cfg.train.steps else iter(())
    for feats in feats_iter:
        logs = train_step(acc, cfg, model, opt, feats, step)
        step += 1
        if ema is not None:
            ema.update(raw)
        means.add(logs)
        tokenizer_step_done(run, cfg, step, means, bar, lambda s: evaluation(run, acc, raw, ema, fixed, s), ema,
                            {"loss": "{:.4g}", "cos": "{:.4f}"})
        if step >= cfg.train.steps:
            break
    bar.close()

    final = with_module(tokenizer, "vae", ema.model) if ema is not None else tokenizer
    return export_tokenizer(run, acc, final, step, ema is not None)


def train_step(acc: Any, cfg: DictConfig, model: nn.Module, opt: torch.optim.Optimizer, feats: torch.Tensor,
               step: int) -> dict[str, torch.Tensor]:
    """One AdamW update at the step's scheduled rate; each image's posterior noise comes from its own generator."""
    o = cfg.optim
    for group in opt.param_groups:
        group["lr"] = o.lr * lr_factor(step, o.warmup_steps, o.constant_steps, cfg.train.steps, o.warmup_start,
                                       o.final_ratio)
    gens = step_generators(cfg.train.seed, step, cfg.train.batch_size, acc.process_index, acc.num_processes)
    side = math.isqrt(feats.shape[1])
    c = acc.unwrap_model(model).latent_channels
    noise = torch.stack([torch.randn((c, side, side), generator=g) for g in gens[: len(feats)]]).to(feats.device)
    model.train()
    with acc.autocast():
        recon, mean, logvar = model(feats, noise)
    loss, logs = feature_loss(recon, feats, mean, logvar, cfg.loss)
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    opt.step()
    logs["lr"] = torch.tensor(opt.param_groups[0]["lr"])
    return logs


def evaluation(run: RunFolder, acc: Any, raw: nn.Module, ema: EMA | None, feats: torch.Tensor, step: int) -> None:
    """Reconstruction of the fixed features (EMA weights too, when EMA is on), logged."""
    if acc.is_main_process:
        values = evaluate(raw, feats)
        if ema is not None:
            values |= {f"{k}_ema": v for k, v in evaluate(ema.model, feats).items()}
        run.log(step=step, **values)
        log.info("step %d: features %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    acc.wait_for_everyone()
