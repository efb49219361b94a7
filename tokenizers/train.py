"""Tokenizer training: `python -m tokenizers.train <family> [preset=NAME] [key=value ...]`.

Config: configs/tokenizer/base.yaml <- configs/tokenizer/<family>.yaml <- preset <- key=value
(`data=<name>` swaps in configs/data/<name>.yaml). One loop serves every autoencoder family
trained with LDM's recipe (reference/lightningdit_vavae.md §1.5-1.6): a generator step on the
family's loss plus a hinge-GAN term with an adaptive weight, then a discriminator step. A family
(a `tokenizers.recipe.Family` subclass registered by its module: tokenizers/vavae_train.py,
tokenizers/rae_train.py) supplies the trained module and its loss, and overrides what its recipe does
differently: RAE (reference/rae_ditdh.md §1.5) trains its decoder on noise-augmented latents with a
frozen-DINO discriminator behind DiffAug, random crops and a warm-up + cosine schedule.

The run folder holds config.yaml, metrics.jsonl, samples/step_NNNNNNN.png (originals over
reconstructions), checkpoints/ and, at the end, tokenizer/ (a `save_pretrained` folder, EMA weights
when EMA is on). Started again on the same folder, a run continues from its last checkpoint and ends
with the same parameters as an uninterrupted run (data order and every random draw are functions of
the step). Multi-GPU: `accelerate launch` or `torchrun`; `train.batch_size` is the global batch. Each
image's random draws depend on its position in the global batch, not on the process that holds it, and
the adaptive weights use the global batch's gradients, so the process count changes nothing but float
reduction order (on CPU, until the PatchGAN's BatchNorm is on: see `train`), and a run may resume on
another process count.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; set before timm/huggingface_hub load

import difflib
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig
from torch import nn

from core.errors import UserError
from core import cli
from core.checkpoint import atomic_path
from core.cli import UsageError, config_help, groups_help, wants_help
from core.config import ConfigError, compose, split_cli
from core.ema import EMA
from core.images import collate_items, iterate_images, Skipping
from core.log import get_logger
from core.runtime import (RunFolder, StepMeans, make_accelerator, progress, seed_everything,
                          step_generators, tokenizer_step_done)
from tokenizers import vavae_train  # noqa: F401  (registers vavae; imported first, so listed first)
from tokenizers import rae_train  # noqa: F401  (registers rae)
from tokenizers import semvae_train  # noqa: F401  (registers semvae)
from tokenizers import fae_train  # noqa: F401  (registers fae)
from tokenizers.losses import adaptive_weight, hinge_d_loss, hinge_g_loss
from tokenizers.recipe import FAMILIES, Family, export_tokenizer, init_weights

log = get_logger("tokenizers.train")

GAN_MAX_WEIGHT = 1e4  # LDM's clamp of the adaptive GAN weight


# --- data ------------------------------------------------------------------------------------------

class StepBatches(torch.utils.data.Sampler):
    """Index batches for every step from `start` on: this process's share of the global batch.

    Epoch e visits the data in a permutation seeded by (seed, e) and drops the last partial batch,
    so the batch of any step is known without replaying the steps before it (exact resume).
    """

    def __init__(self, n: int, global_batch: int, seed: int, start: int, rank: int, world: int):
        if n < global_batch:
            raise UserError(f"the data set has {n} images, fewer than one batch ({global_batch})")
        self.n, self.global_batch, self.seed, self.start = n, global_batch, seed, start
        self.local = global_batch // world
        self.offset = rank * self.local

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.n // self.global_batch
        step, epoch, perm = self.start, -1, None
        while True:
            e, j = divmod(step, per_epoch)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            first = j * self.global_batch + self.offset
            yield perm[first : first + self.local].tolist()
            step += 1


def batches(source: Any, cfg: DictConfig, start: int, rank: int, world: int) -> Iterator[torch.Tensor]:
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by the {world} processes")
    loader = torch.utils.data.DataLoader(
        Skipping(source),
        batch_sampler=StepBatches(len(source), cfg.train.batch_size, cfg.train.seed, start, rank, world),
        collate_fn=collate_items, num_workers=cfg.train.num_workers, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.train.seed),  # worker seeds, without touching the global RNG
    )
    for batch in loader:
        for index, error in batch.skipped:
            log.warning("skipped %s (%s)", source.where(index), error)
        if batch.images.numel() == 0:
            raise RuntimeError(f"no image of a batch could be decoded (indices {[i for i, _ in batch.skipped]})")
        yield batch.images


# --- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def reconstruct(tokenizer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction (posterior mean), clamped to [-1, 1]."""
    was_training = tokenizer.training
    tokenizer.eval()
    out = tokenizer.decode(tokenizer.encode(images)).float().clamp(-1, 1)
    tokenizer.train(was_training)
    return out


def psnr(images: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (images.float() - recon.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean().item()


def save_grid(images: torch.Tensor, recon: torch.Tensor, path: Path) -> None:
    """Originals in the top row, reconstructions below."""
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image((torch.cat([images, recon]).float().cpu() + 1) / 2, str(tmp), nrow=len(images), format="png")


# --- training --------------------------------------------------------------------------------------

def train(family_name: str, cfg: DictConfig) -> Path:
    """Train (or resume) one tokenizer run; returns the run folder. The exported tokenizer is in `<run>/tokenizer`."""
    if family_name not in FAMILIES:
        raise ConfigError(f"unknown tokenizer family {family_name!r}; trainable here: {', '.join(sorted(FAMILIES))}")
    family_cls = FAMILIES[family_name].for_config(cfg)  # FAE: the class of its `stage`
    if family_cls.run is not None:  # a recipe with its own loop (semvae, FAE's feature stage: features, no GAN)
        return family_cls.run(cfg)
    run_dir = cfg.run.dir or f"runs/tokenizer/{family_cls.name}"
    acc = make_accelerator(cfg.train.precision, cfg.train.log_with, run_dir)
    seed_everything(cfg.train.seed)
    # Data and networks first: a missing file stops the run before its folder and config exist.
    source = family_cls.source(cfg)
    family = family_cls(cfg)
    disc = family.discriminator()
    if acc.num_processes > 1 and acc.device.type == "cuda":
        # BatchNorm statistics of the global batch, not of each process's share (the PatchGAN's). SyncBatchNorm
        # runs on GPUs only: a multi-process CPU (gloo) run keeps per-process statistics, so once its GAN is on
        # it no longer trains what one process would.
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    run = RunFolder(run_dir, acc)
    run.save_config(cfg, may_change=("train.log_with",))
    if cfg.run.init_from:
        init_weights(Path(cfg.run.init_from), family.model, disc)
    # Adam with no weight decay is AdamW with weight decay 0 (RAE's optimiser).
    params = [p for p in family.model.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    d_params = [p for p in disc.parameters() if p.requires_grad]  # a frozen backbone stays out
    opt_d = torch.optim.Adam(d_params, lr=cfg.optim.disc_lr, betas=tuple(cfg.optim.betas))
    for m in family.frozen():
        m.to(acc.device)
    model, disc, opt_g, opt_d = acc.prepare(family.model, disc, opt_g, opt_d)
    raw, raw_disc = acc.unwrap_model(model), acc.unwrap_model(disc)
    ema = EMA(family.ema_source(raw), cfg.ema.decay) if cfg.ema.enabled else None
    ema_tokenizer = family.as_tokenizer(ema.model) if ema is not None else None

    step = run.resume(ema)
    run.track(cfg, step)

    sample_images = family.view(next(iterate_images(source, cfg.log.sample_images)).images, None).to(acc.device)
    if acc.is_main_process:
        run.log(event="start", family=family_cls.name, step=step, processes=acc.num_processes, data=source.describe(),
                tokenizer_params=sum(p.numel() for p in raw.tokenizer.parameters()),
                disc_params=sum(p.numel() for p in d_params), precision=acc.mixed_precision,
                random_weights=family.random_networks())
    if step == 0:
        sample(run, acc, raw.tokenizer, ema_tokenizer, sample_images, step)

    bar = progress(total=cfg.train.steps, initial=step, desc=f"train {family_cls.name}", enabled=acc.is_main_process)
    means = StepMeans()
    data = batches(source, cfg, step, acc.process_index, acc.num_processes) if step < cfg.train.steps else iter(())
    for images in data:
        logs = train_step(acc, cfg, family, (model, raw, opt_g), (disc, raw_disc, opt_d, d_params),
                          images.to(acc.device), step)
        step += 1
        if ema is not None:
            ema.update(family.ema_source(raw))
        means.add(logs)
        tokenizer_step_done(run, cfg, step, means, bar, lambda s: sample(run, acc, raw.tokenizer, ema_tokenizer, sample_images, s),
                            ema, {"l1": "{:.4f}", "nll": "{:.4g}"})
        if step >= cfg.train.steps:
            break
    bar.close()

    final = ema_tokenizer if ema_tokenizer is not None else raw.tokenizer
    return export_tokenizer(run, acc, final, step, ema is not None)


def train_step(acc: Any, cfg: DictConfig, family: Family, gen: tuple, dis: tuple, images: torch.Tensor,
               step: int) -> dict[str, torch.Tensor]:
    """One generator step on the family loss, then a discriminator step on the family's fakes (LDM: the same
    reconstructions). The GAN term starts at `loss.disc_start` (before it, LDM multiplies it by 0), the
    discriminator updates at `family.disc_update_start()`. `gen`: (prepared module, unwrapped module,
    optimiser); `dis`: the same plus the discriminator's trained parameters (built once by `train`). All
    randomness of the step (crops, noise, augmentation) comes from one generator per image, seeded by the step
    and the image's position in the global batch, drawn in a fixed order."""
    model, raw, opt_g = gen
    disc, raw_disc, opt_d, d_params = dis
    # A batch with undecodable images skipped is shorter: its images keep the first generators.
    gens = step_generators(cfg.train.seed, step, cfg.train.batch_size, acc.process_index, acc.num_processes)[: len(images)]
    images = family.view(images, gens)
    gan_on = step >= cfg.loss.disc_start
    disc_on = step >= family.disc_update_start()
    g_lr, d_lr = family.lr_factors(step)
    for group in opt_g.param_groups:
        group["lr"] = cfg.optim.lr * g_lr
    for group in opt_d.param_groups:
        group["lr"] = cfg.optim.disc_lr * d_lr
    model.train()
    disc.train(family.disc_train_in_g_step)

    # The discriminator is called unwrapped and frozen here: it only supplies the GAN term.
    for p in d_params:
        p.requires_grad_(False)
    with acc.autocast():
        loss, nll, recon, logs = family.generator_loss(model, raw, images, gens)
        if gan_on:
            g_loss = hinge_g_loss(raw_disc(family.disc_input(recon, gens)))
            d_weight = adaptive_weight(nll, g_loss, family.decoder_last_layer(raw), cfg.loss.disc_weight, GAN_MAX_WEIGHT,
                                       family.adaptive_eps)
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss, d_weight=d_weight)
    opt_g.zero_grad(set_to_none=True)
    acc.backward(loss)
    opt_g.step()
    for p in d_params:
        p.requires_grad_(True)
    logs["loss"] = loss

    if disc_on:
        disc.train()
        with acc.autocast():
            fakes = family.disc_fakes(raw, recon)
            logits_real, logits_fake = disc(family.disc_input(images, gens)), disc(family.disc_input(fakes, gens))
            d_loss = hinge_d_loss(logits_real, logits_fake)
        opt_d.zero_grad(set_to_none=True)
        acc.backward(d_loss)
        opt_d.step()
        logs.update(d_loss=d_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
    return logs


def sample(run: RunFolder, acc: Any, tokenizer: nn.Module, ema_tokenizer: nn.Module | None, images: torch.Tensor,
           step: int) -> None:
    """Reconstruction grid (EMA weights when EMA is on) and PSNR on a fixed set of training images."""
    if acc.is_main_process:
        recon = reconstruct(tokenizer, images)
        values = {"psnr": psnr(images, recon)}
        if ema_tokenizer is not None:
            recon = reconstruct(ema_tokenizer, images)
            values["psnr_ema"] = psnr(images, recon)
        save_grid(images, recon, run.path / "samples" / f"step_{step:07d}.png")
        run.log(step=step, **values)
        log.info("step %d: reconstruction PSNR %s", step, ", ".join(f"{k} {v:.2f} dB" for k, v in values.items()))
    acc.wait_for_everyone()


USAGE = "usage: python -m tokenizers.train <family> [preset=NAME] [data=NAME] [key=value ...]"


def usage(family: str | None) -> str:
    if family is None:
        lines = [USAGE, "", "families (`python -m tokenizers.train <family> --help` lists its keys):"]
        lines += [f"  {name}: {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in sorted(FAMILIES.items())]
    else:
        lines = [USAGE.replace("<family>", family), "", config_help("tokenizer", family)]
    return "\n".join(lines + ["", "config groups (NAME=<name>):", groups_help("data", "preset")])


def main(argv: list[str]) -> Path | None:
    positional, preset, overrides = split_cli(argv)
    names = [p for p in positional if not p.startswith("-")]
    family = names[0] if names else None
    if family is not None and family not in FAMILIES:
        close = difflib.get_close_matches(family, list(FAMILIES), n=1)
        raise ConfigError(f"unknown tokenizer family {family!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                          + f"; trainable here: {', '.join(sorted(FAMILIES))}")
    if wants_help(positional):
        print(usage(family))
        return None
    if len(names) != 1 or len(positional) != 1:
        raise UsageError(f"give one tokenizer family and key=value overrides ({USAGE.removeprefix('usage: ')}); "
                         f"got {' '.join(positional) or 'no family'}")
    return train(family, compose("tokenizer", family, preset, overrides))


if __name__ == "__main__":
    cli.run(main)
