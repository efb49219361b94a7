"""Tokenizer training: `python -m tokenizers.train <family> [preset=NAME] [key=value ...]`.

Config: configs/tokenizer/base.yaml <- configs/tokenizer/<family>.yaml <- preset <- key=value
(`data=<name>` swaps in configs/data/<name>.yaml). One loop serves every autoencoder family
trained with LDM's recipe (reference/lightningdit_vavae.md §1.5-1.6): a generator step on the
family's loss plus a hinge-GAN term with LDM's adaptive weight, then a discriminator step. A family
supplies the trained module and its loss (`FAMILIES`).

The run folder holds config.yaml, metrics.jsonl, samples/step_NNNNNNN.png (originals over
reconstructions), checkpoints/ and, at the end, tokenizer/ (a `save_pretrained` folder, EMA weights
when EMA is on). Started again on the same folder, a run continues from its last checkpoint and ends
with the same parameters as an uninterrupted run (data order and posterior noise are functions of
the step). Multi-GPU: `accelerate launch` or `torchrun`; `train.batch_size` is the global batch.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; set before timm/huggingface_hub load

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig
from torch import nn

from core.checkpoint import atomic_path, load_safetensors
from core.config import ConfigError, compose, split_cli
from core.ema import EMA
from core.images import build_source, collate_items, iterate_images, Skipping
from core.log import get_logger
from core.runtime import RunFolder, make_accelerator, progress, seed_everything
from tokenizers.discriminators import NLayerDiscriminator
from tokenizers.encoders import ENCODERS, build_encoder
from tokenizers.losses import (
    adaptive_weight, build_lpips, hinge_d_loss, hinge_g_loss, kl_loss, reconstruction_nll, vf_loss,
)
from tokenizers.vavae import VAVAE

log = get_logger("tokenizers.train")

GAN_MAX_WEIGHT = 1e4  # LDM's clamp of the adaptive GAN weight
VF_MAX_WEIGHT = 1e8  # VA-VAE's clamp of the adaptive VF weight


# --- families --------------------------------------------------------------------------------------

class VAVAEModel(nn.Module):
    """What VA-VAE's generator optimiser trains: the autoencoder and `linear_proj`, latent -> VF feature dim."""

    def __init__(self, tokenizer: VAVAE, feature_dim: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.linear_proj = nn.Conv2d(tokenizer.latent_channels, feature_dim, kernel_size=1, bias=False)

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mean, logvar = self.tokenizer.posterior(images)
        z = mean + torch.exp(0.5 * logvar) * noise  # the sampled latent feeds the decoder and the projection
        return self.tokenizer.decode(z), mean, logvar, self.linear_proj(z)


class VAVAEFamily:
    """VA-VAE: nll (summed L1 + LPIPS) + KL + adaptive-weighted VF loss against a frozen DINOv2."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        tokenizer = VAVAE(**cfg.model)
        grid = cfg.data.image_size // tokenizer.downsample
        if grid * tokenizer.downsample != cfg.data.image_size:
            raise ConfigError(f"data.image_size {cfg.data.image_size} is not a multiple of the downsample {tokenizer.downsample}")
        self.latent_shape = (tokenizer.latent_channels, grid, grid)
        self.vf_encoder = build_vf_encoder(cfg.vf, grid)
        self.model = VAVAEModel(tokenizer, self.vf_encoder.feature_dim)
        self.model.linear_proj.requires_grad_(cfg.vf.train_proj)
        self.lpips = build_lpips(cfg.loss.lpips_random) if cfg.loss.perceptual_weight > 0 else None

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.vf_encoder, self.lpips) if m is not None]

    def random_networks(self) -> list[str]:
        """Frozen networks running on random weights (tests and demos): recorded in the run's metrics."""
        names = [f"vf encoder {self.cfg.vf.encoder}"] if self.cfg.vf.random_init else []
        return names + (["LPIPS VGG16 trunk"] if self.lpips is not None and self.cfg.loss.lpips_random else [])

    def generator_loss(
        self, model: nn.Module, raw: VAVAEModel, images: torch.Tensor, noise_rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss without the GAN term, nll, reconstructions, values to log)."""
        cfg = self.cfg
        # Posterior noise from the CPU generator, as the official code draws it.
        noise = torch.randn((images.shape[0], *self.latent_shape), generator=noise_rng).to(images)
        recon, mean, logvar, z_proj = model(images, noise)
        nll = reconstruction_nll(images, recon, self.lpips, cfg.loss.perceptual_weight)
        kl = kl_loss(mean, logvar)
        with torch.no_grad():
            tokens = self.vf_encoder(images)
        if tokens.shape[1] != z_proj.shape[2] * z_proj.shape[3]:
            raise ValueError(f"VF encoder gives {tokens.shape[1]} tokens for a {tuple(z_proj.shape[2:])} latent grid")
        feats = tokens.transpose(1, 2).reshape(z_proj.shape)
        with torch.autocast(images.device.type, enabled=False):  # cosine matrices in fp32 under bf16 autocast
            vf = vf_loss(z_proj.float(), feats.float(), cfg.vf.cos_margin, cfg.vf.distmat_margin,
                         cfg.vf.cos_weight, cfg.vf.distmat_weight)
        vf_w = adaptive_weight(nll, vf, raw.tokenizer.vae.encoder.conv_out.weight, cfg.vf.weight, VF_MAX_WEIGHT)
        loss = nll + cfg.loss.kl_weight * kl + vf_w * vf
        l1 = (images - recon).abs().mean()
        return loss, nll, recon, {"nll": nll, "kl": kl, "vf": vf, "vf_weight": vf_w, "l1": l1}

    @staticmethod
    def decoder_last_layer(raw: VAVAEModel) -> torch.Tensor:
        return raw.tokenizer.vae.decoder.conv_out.weight


def build_vf_encoder(vf: DictConfig, grid: int) -> nn.Module:
    """The frozen VF encoder, fed the raw [-1, 1] image (VA-VAE feeds DINOv2 no mean/std), bilinearly resized
    so that its token grid equals the latent grid (224 px for DINOv2's 16x16 at patch 14, as the official)."""
    if vf.encoder not in ENCODERS:
        raise ConfigError(f"vf.encoder: unknown encoder {vf.encoder!r}; known: {sorted(ENCODERS)}")
    size = grid * ENCODERS[vf.encoder].patch_size
    try:
        encoder = build_encoder(vf.encoder, weights=vf.encoder_weights, random_init=vf.random_init, img_size=size,
                                normalize=False, resize_mode="bilinear")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} [in this config: vf.encoder_weights=<file>, or vf.random_init=true]") from e
    if vf.encoder_depth is not None:
        # A cut-down random encoder keeps CPU demos fast; real runs use the whole network.
        encoder.model.blocks = encoder.model.blocks[: vf.encoder_depth]
        log.warning("VF encoder %s cut to its first %d blocks", vf.encoder, vf.encoder_depth)
    return encoder


FAMILIES: dict[str, Callable[[DictConfig], Any]] = {"vavae": VAVAEFamily}


# --- data ------------------------------------------------------------------------------------------

class StepBatches(torch.utils.data.Sampler):
    """Index batches for every step from `start` on: this process's share of the global batch.

    Epoch e visits the data in a permutation seeded by (seed, e) and drops the last partial batch,
    so the batch of any step is known without replaying the steps before it (exact resume).
    """

    def __init__(self, n: int, global_batch: int, seed: int, start: int, rank: int, world: int):
        if n < global_batch:
            raise ValueError(f"the data set has {n} images, fewer than one batch ({global_batch})")
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


def step_rng(seed: int, step: int, rank: int) -> torch.Generator:
    """The posterior-noise generator of one step on one process: a function of the step, so resume is exact."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)


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
        raise ConfigError(f"unknown tokenizer family {family_name!r}; trainable here: {sorted(FAMILIES)}")
    acc = make_accelerator(cfg.train.precision)
    seed_everything(cfg.train.seed)
    # Data and networks first: a missing file stops the run before its folder and config exist.
    source = build_source(cfg.data)
    family = FAMILIES[family_name](cfg)
    disc = NLayerDiscriminator(3, cfg.discriminator.channels, cfg.discriminator.layers)
    run = RunFolder(cfg.run.dir or f"runs/tokenizer/{family_name}", acc)
    run.save_config(cfg)
    if cfg.run.init_from:
        init_weights(Path(cfg.run.init_from), family.model, disc)
    params = [p for p in family.model.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.optim.disc_lr, betas=tuple(cfg.optim.betas))
    for m in family.frozen():
        m.to(acc.device)
    model, disc, opt_g, opt_d = acc.prepare(family.model, disc, opt_g, opt_d)
    raw, raw_disc = acc.unwrap_model(model), acc.unwrap_model(disc)
    ema = EMA(raw.tokenizer, cfg.ema.decay) if cfg.ema.enabled else None

    step = 0
    latest = run.latest_checkpoint()
    if latest is not None:
        state, ema_state = run.load_training_state(latest)
        step = state["step"]
        if ema is not None:
            ema.load_state_dict(ema_state)
        log.info("resumed from %s (step %d)", latest, step)

    sample_images = next(iterate_images(source, cfg.log.sample_images)).images.to(acc.device)
    if acc.is_main_process:
        run.log(event="start", family=family_name, step=step, processes=acc.num_processes, data=source.describe(),
                tokenizer_params=sum(p.numel() for p in raw.tokenizer.parameters()),
                disc_params=sum(p.numel() for p in raw_disc.parameters()), precision=acc.mixed_precision,
                random_weights=family.random_networks())
    if step == 0:
        sample(run, acc, raw.tokenizer, ema, sample_images, step)

    bar = progress(total=cfg.train.steps, initial=step, desc=f"train {family_name}", enabled=acc.is_main_process)
    sums: dict[str, torch.Tensor] = {}  # on the device: read back only when logged
    count, tick = 0, time.time()
    data = batches(source, cfg, step, acc.process_index, acc.num_processes) if step < cfg.train.steps else iter(())
    for images in data:
        logs = train_step(acc, cfg, family, (model, raw, opt_g), (disc, raw_disc, opt_d), images.to(acc.device), step)
        step += 1
        if ema is not None:
            ema.update(raw.tokenizer)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count += 1
        bar.update(1)

        if step % cfg.log.every == 0 or step == cfg.train.steps:
            means = {k: v.item() / count for k, v in sums.items()}
            now = time.time()
            run.log(step=step, **means, sec_per_step=(now - tick) / count)
            bar.set_postfix(l1=f"{means['l1']:.4f}", nll=f"{means['nll']:.4g}")
            sums, count, tick = {}, 0, now
        if step % cfg.log.sample_every == 0 or step == cfg.train.steps:
            sample(run, acc, raw.tokenizer, ema, sample_images, step)
        if step % cfg.log.checkpoint_every == 0 or step == cfg.train.steps:
            run.save_training_state(step, ema.state_dict() if ema else None, keep=cfg.log.keep_checkpoints)
        if step >= cfg.train.steps:
            break
    bar.close()

    if acc.is_main_process:
        final = ema.model if ema is not None else raw.tokenizer
        final.save_pretrained(run.path / "tokenizer")
        run.log(event="exported", step=step, tokenizer=str(run.path / "tokenizer"), ema=ema is not None)
        log.info("tokenizer saved to %s", run.path / "tokenizer")
    acc.wait_for_everyone()
    acc.end_training()
    return run.path


def train_step(acc: Any, cfg: DictConfig, family: Any, gen: tuple, dis: tuple, images: torch.Tensor,
               step: int) -> dict[str, torch.Tensor]:
    """One generator step on the family loss, then, as LDM does, a discriminator step on the same
    reconstructions. The GAN term and the discriminator step start at `loss.disc_start` (before it, LDM
    multiplies both by 0). `gen` / `dis`: (prepared module, unwrapped module, optimiser)."""
    model, raw, opt_g = gen
    disc, raw_disc, opt_d = dis
    gan_on = step >= cfg.loss.disc_start
    model.train()
    disc.train()

    # The discriminator is called unwrapped and frozen here: it only supplies the GAN term.
    raw_disc.requires_grad_(False)
    with acc.autocast():
        loss, nll, recon, logs = family.generator_loss(model, raw, images, step_rng(cfg.train.seed, step, acc.process_index))
        if gan_on:
            g_loss = hinge_g_loss(raw_disc(recon))
            d_weight = adaptive_weight(nll, g_loss, family.decoder_last_layer(raw), cfg.loss.disc_weight, GAN_MAX_WEIGHT)
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss, d_weight=d_weight)
    opt_g.zero_grad(set_to_none=True)
    acc.backward(loss)
    opt_g.step()
    raw_disc.requires_grad_(True)
    logs["loss"] = loss

    if gan_on:
        with acc.autocast():
            logits_real, logits_fake = disc(images), disc(recon.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)
        opt_d.zero_grad(set_to_none=True)
        acc.backward(d_loss)
        opt_d.step()
        logs.update(d_loss=d_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
    return logs


def sample(run: RunFolder, acc: Any, tokenizer: nn.Module, ema: EMA | None, images: torch.Tensor, step: int) -> None:
    """Reconstruction grid (EMA weights when EMA is on) and PSNR on a fixed set of training images."""
    if acc.is_main_process:
        recon = reconstruct(tokenizer, images)
        values = {"psnr": psnr(images, recon)}
        if ema is not None:
            recon = reconstruct(ema.model, images)
            values["psnr_ema"] = psnr(images, recon)
        save_grid(images, recon, run.path / "samples" / f"step_{step:07d}.png")
        run.log(step=step, **values)
        log.info("step %d: reconstruction PSNR %s", step, ", ".join(f"{k} {v:.2f} dB" for k, v in values.items()))
    acc.wait_for_everyone()


def init_weights(path: Path, model: nn.Module, disc: nn.Module) -> None:
    """Weights (trained module and discriminator, strictly) from a run folder's last checkpoint or a checkpoint folder."""
    if (path / "checkpoints").is_dir():
        done = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file())
        if not done:
            raise FileNotFoundError(f"run.init_from: {path} has no finished checkpoint")
        path = done[-1]
    model.load_state_dict(load_safetensors(path / "model.safetensors"), strict=True)
    disc.load_state_dict(load_safetensors(path / "model_1.safetensors"), strict=True)
    log.info("initialised from %s", path)


def main(argv: list[str] | None = None) -> Path:
    positional, preset, overrides = split_cli(sys.argv[1:] if argv is None else argv)
    if len(positional) != 1:
        raise SystemExit(f"usage: python -m tokenizers.train {{{'|'.join(FAMILIES)}}} [preset=NAME] [key=value ...]")
    family = positional[0]
    try:
        if family not in FAMILIES:
            raise ConfigError(f"unknown tokenizer family {family!r}; trainable here: {sorted(FAMILIES)}")
        cfg = compose("tokenizer", family, preset, overrides)
        return train(family, cfg)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
