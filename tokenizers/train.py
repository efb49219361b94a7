"""Tokenizer training: `python -m tokenizers.train <family> [preset=NAME] [key=value ...]`.

Config: configs/tokenizer/base.yaml <- configs/tokenizer/<family>.yaml <- preset <- key=value
(`data=<name>` swaps in configs/data/<name>.yaml). One loop serves every autoencoder family
trained with LDM's recipe (reference/lightningdit_vavae.md §1.5-1.6): a generator step on the
family's loss plus a hinge-GAN term with an adaptive weight, then a discriminator step. A family
(`FAMILIES`, a `Family` subclass) supplies the trained module and its loss, and overrides what its
recipe does differently: RAE (reference/rae_ditdh.md §1.5) trains its decoder on noise-augmented
latents with a frozen-DINO discriminator behind DiffAug, random crops and a warm-up + cosine schedule.

The run folder holds config.yaml, metrics.jsonl, samples/step_NNNNNNN.png (originals over
reconstructions), checkpoints/ and, at the end, tokenizer/ (a `save_pretrained` folder, EMA weights
when EMA is on). Started again on the same folder, a run continues from its last checkpoint and ends
with the same parameters as an uninterrupted run (data order and every random draw are functions of
the step). Multi-GPU: `accelerate launch` or `torchrun`; `train.batch_size` is the global batch.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; set before timm/huggingface_hub load

import copy
import difflib
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig
from torch import nn

from core import cli
from core.checkpoint import atomic_path, load_safetensors
from core.cli import UsageError, config_help, groups_help, wants_help
from core.config import ConfigError, compose, split_cli, to_dict
from core.ema import EMA
from core.images import build_source, collate_items, iterate_images, Skipping
from core.log import get_logger
from core.runtime import RunFolder, latest_checkpoint, make_accelerator, progress, seed_everything
from tokenizers.base import Tokenizer
from tokenizers.discriminators import DinoDiscriminator, NLayerDiscriminator, diff_augment
from tokenizers.encoders import ENCODERS, build_encoder
from tokenizers.losses import (
    adaptive_weight, build_lpips, hinge_d_loss, hinge_g_loss, kl_loss, reconstruction_nll, vf_loss,
)
from tokenizers.rae import DECODERS, PATCH, RAE, noise_augment
from tokenizers.vavae import VAVAE

log = get_logger("tokenizers.train")

GAN_MAX_WEIGHT = 1e4  # LDM's clamp of the adaptive GAN weight
VF_MAX_WEIGHT = 1e8  # VA-VAE's clamp of the adaptive VF weight


# --- families --------------------------------------------------------------------------------------

class Family:
    """What the shared loop asks of a tokenizer family; the defaults are LDM's recipe (VA-VAE).

    A subclass sets `cfg` and `model` (the module the generator optimiser trains, holding the tokenizer
    as `model.tokenizer`) and supplies `generator_loss` and `decoder_last_layer`; it overrides the rest
    where its recipe differs.
    """

    cfg: DictConfig
    model: nn.Module
    disc_train_in_g_step = True  # LDM runs its discriminator in train mode in the generator step too
    adaptive_eps = 1e-4  # in the denominator of LDM's adaptive GAN weight

    def generator_loss(
        self, model: nn.Module, raw: nn.Module, images: torch.Tensor, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss without the GAN term, reconstruction loss the GAN weight balances, reconstructions, values to log)."""
        raise NotImplementedError

    def decoder_last_layer(self, raw: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def frozen(self) -> list[nn.Module]:
        """Frozen networks outside `model`, moved to the device by the loop."""
        return []

    def random_networks(self) -> list[str]:
        """Frozen networks running on random weights (tests and demos): recorded in the run's metrics."""
        return []

    @classmethod
    def source(cls, cfg: DictConfig) -> Any:
        """The training images (a class method: a missing data folder stops the run before any network is built)."""
        return build_source(cfg.data)

    def view(self, images: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        """The batch the step trains on (`rng` given) or the fixed sample images (`rng` None)."""
        return images

    def discriminator(self) -> nn.Module:
        return NLayerDiscriminator(3, self.cfg.discriminator.channels, self.cfg.discriminator.layers)

    def disc_update_start(self) -> int:
        """First step of discriminator updates (the generator's GAN term starts at `loss.disc_start`)."""
        return self.cfg.loss.disc_start

    def disc_input(self, images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """What the discriminator is shown of real or fake images."""
        return images

    def disc_fakes(self, raw: nn.Module, recon: torch.Tensor) -> torch.Tensor:
        """The discriminator step's fakes, after the generator update: LDM reuses that step's reconstructions."""
        return recon.detach()

    def lr_factors(self, step: int) -> tuple[float, float]:
        """Learning rates of the step, as fractions of `optim.lr` and `optim.disc_lr`: constant here."""
        return 1.0, 1.0

    def ema_source(self, raw: nn.Module) -> nn.Module:
        """What the EMA averages."""
        return raw.tokenizer

    def as_tokenizer(self, ema_module: nn.Module) -> Tokenizer:
        """The tokenizer with the EMA weights (samples, export)."""
        return ema_module


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


class VAVAEFamily(Family):
    """VA-VAE: nll (summed L1 + LPIPS) + KL + adaptive-weighted VF loss against a frozen DINOv2."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        tokenizer = VAVAE(**cfg.model)
        if cfg.data.image_size % tokenizer.downsample:
            raise ConfigError(f"data.image_size {cfg.data.image_size} is not a multiple of the downsample {tokenizer.downsample}")
        self.latent_shape = tokenizer.latent_shape(cfg.data.image_size)
        self.vf_encoder = build_vf_encoder(cfg.vf, self.latent_shape[-1])
        self.model = VAVAEModel(tokenizer, self.vf_encoder.feature_dim)
        self.model.linear_proj.requires_grad_(cfg.vf.train_proj)
        self.lpips = build_lpips(cfg.loss.lpips_random) if cfg.loss.perceptual_weight > 0 else None

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.vf_encoder, self.lpips) if m is not None]

    def random_networks(self) -> list[str]:
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

    def decoder_last_layer(self, raw: VAVAEModel) -> torch.Tensor:
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


# RAE's encoders by their names in configs (`encoder=dinov2_b`) -> tokenizers.encoders names.
RAE_ENCODERS = {"dinov2_b": "dinov2_b_reg", "siglip2_b": "siglip2_b", "mae_b": "mae_b"}


def rae_encoder_name(name: str) -> str:
    """The tokenizers.encoders name of an RAE encoder; `dinov2_b` is DINOv2-B with registers, as RAE's."""
    if name not in RAE_ENCODERS:
        raise ConfigError(f"encoder: unknown RAE encoder {name!r}; choose from {', '.join(RAE_ENCODERS)} "
                          "(dinov2_b is DINOv2-B with registers)")
    return RAE_ENCODERS[name]


def check_rae_config(cfg: DictConfig) -> None:
    rae_encoder_name(cfg.encoder)
    if cfg.model.decoder not in DECODERS:
        raise ConfigError(f"model.decoder: unknown RAE decoder {cfg.model.decoder!r}; choose from {sorted(DECODERS)}")
    if cfg.data.image_size % PATCH:
        raise ConfigError(f"data.image_size {cfg.data.image_size} is not a multiple of RAE's patch {PATCH}")
    if cfg.augment.resize_scale < 1:
        raise ConfigError(f"augment.resize_scale must be at least 1, got {cfg.augment.resize_scale}")


class RAEModel(nn.Module):
    """What RAE's generator optimiser trains: the decoder, fed noise-augmented latents of the frozen encoder.

    The RAE is an attribute, not a submodule, so that its frozen encoder stays out of DDP, the training
    checkpoints and the EMA (RAEFamily.frozen moves it to the device).
    """

    def __init__(self, tokenizer: RAE, noise_tau: float):
        super().__init__()
        self.decoder = tokenizer.decoder
        self.noise_tau = noise_tau
        object.__setattr__(self, "tokenizer", tokenizer)  # bypasses nn.Module's submodule registration

    def forward(self, images: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstructions of the noise-augmented latents, the clean latents)."""
        latents = self.tokenizer.encode(images)
        return self.tokenizer.decode(noise_augment(latents, self.noise_tau, generator=rng)), latents


def rae_with_decoder(rae: RAE, decoder: nn.Module) -> RAE:
    """The same RAE (config; frozen encoder shared, not copied) with another decoder: the EMA tokenizer."""
    view = copy.copy(rae)
    view._modules = {**rae._modules, "decoder": decoder}
    return view


def warmup_cosine(k: int, warmup: int, total: int, final_ratio: float) -> float:
    """RAE's learning rate at update k (from 0) as a fraction of the base rate: a linear warm-up (k + 1) / warmup,
    then a cosine from 1 down to `final_ratio` at update `total`, constant after."""
    if k < warmup:
        return (k + 1) / warmup
    if k >= total:
        return final_ratio
    progress = (k - warmup) / max(total - warmup, 1)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class RAEFamily(Family):
    """RAE: a ViT decoder trained on the frozen encoder's noise-augmented latents with L1 + LPIPS and an
    adaptive-weighted GAN term against a frozen-DINO discriminator (reference/rae_ditdh.md §1.3, §1.5).

    The logged `l1` is the official term, mean |x - x̂| on [0, 1] pixels (half of it on [-1, 1]).
    """

    disc_train_in_g_step = False  # as the official: spectral norm's power iteration runs in the D step only
    adaptive_eps = 1e-6

    def __init__(self, cfg: DictConfig):
        check_rae_config(cfg)
        self.cfg = cfg
        try:
            tokenizer = RAE(rae_encoder_name(cfg.encoder), cfg.model.decoder, cfg.data.image_size,
                            cfg.model.encoder_weights, cfg.model.random_init)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} [in this config: model.encoder_weights=<file>, or model.random_init=true]") from e
        self.model = RAEModel(tokenizer, cfg.model.noise_tau)
        self.lpips = build_lpips(cfg.loss.lpips_random) if cfg.loss.perceptual_weight > 0 else None
        self._latents: torch.Tensor | None = None  # the batch's clean latents, from generator_loss to disc_fakes

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.model.tokenizer.encoder, self.lpips) if m is not None]

    def random_networks(self) -> list[str]:
        cfg = self.cfg
        return ([f"RAE encoder {cfg.encoder}"] if cfg.model.random_init else []) + (
            ["LPIPS VGG16 trunk"] if self.lpips is not None and cfg.loss.lpips_random else []) + (
            ["discriminator DINO ViT-S/8"] if cfg.discriminator.random_init else [])

    @classmethod
    def source(cls, cfg: DictConfig) -> Any:
        """Images ADM-centre-cropped to `augment.resize_scale` x `data.image_size`; `view` crops them."""
        check_rae_config(cfg)  # the first thing a run does: bad settings stop it before the data is scanned
        return build_source({**to_dict(cfg.data), "image_size": int(cfg.data.image_size * cfg.augment.resize_scale)})

    def view(self, images: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        """A random `data.image_size` crop of each training image (official: Resize(384) + RandomCrop(256), no
        flip), the centre crop of the sample images."""
        size, full = self.cfg.data.image_size, images.shape[-1]
        if full == size:
            return images
        if rng is None:
            o = (full - size) // 2
            return images[..., o : o + size, o : o + size]
        top, left = torch.randint(0, full - size + 1, (2, images.shape[0]), generator=rng).tolist()
        return torch.stack([im[:, t : t + size, l : l + size] for im, t, l in zip(images, top, left)])

    def generator_loss(
        self, model: nn.Module, raw: RAEModel, images: torch.Tensor, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        recon, self._latents = model(images, rng)
        l1 = (images - recon).abs().mean() / 2  # on [0, 1] pixels, as the official
        nll, logs = l1, {"l1": l1}
        if self.lpips is not None:
            logs["lpips"] = self.lpips(images, recon).mean()
            nll = nll + self.cfg.loss.perceptual_weight * logs["lpips"]
        logs["nll"] = nll
        return nll, nll, recon, logs

    def decoder_last_layer(self, raw: RAEModel) -> torch.Tensor:
        return raw.decoder.decoder_pred.weight

    def discriminator(self) -> nn.Module:
        d = self.cfg.discriminator
        try:
            return DinoDiscriminator(d.weights, d.random_init, d.image_size, d.kernel_size)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} [in this config: discriminator.weights=<file>, or discriminator.random_init=true]") from e

    def disc_update_start(self) -> int:
        return self.cfg.loss.disc_update_start

    def disc_input(self, images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return diff_augment(images, rng)

    def disc_fakes(self, raw: RAEModel, recon: torch.Tensor) -> torch.Tensor:
        """Reconstructions of the clean latents by the updated decoder, clamped and quantised to 8 bits as real images are."""
        with torch.no_grad():
            fakes = raw.tokenizer.decode(self._latents).clamp(-1, 1)
        return torch.round((fakes + 1) * 127.5) / 127.5 - 1

    def lr_factors(self, step: int) -> tuple[float, float]:
        """Warm-up + cosine for both; the discriminator's clock starts with its updates (as the official scheduler,
        stepped only when D trains), so it ends well above `final_lr`. Both decay by the ratio final_lr / lr."""
        o, total = self.cfg.optim, self.cfg.train.steps
        ratio = o.final_lr / o.lr
        d_updates = max(step - self.disc_update_start(), 0)
        return warmup_cosine(step, o.warmup_steps, total, ratio), warmup_cosine(d_updates, o.warmup_steps, total, ratio)

    def ema_source(self, raw: RAEModel) -> nn.Module:
        return raw.decoder

    def as_tokenizer(self, ema_module: nn.Module) -> Tokenizer:
        return rae_with_decoder(self.model.tokenizer, ema_module)


FAMILIES: dict[str, type[Family]] = {"vavae": VAVAEFamily, "rae": RAEFamily}


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
    """The random generator of one step on one process (posterior or latent noise, crops, DiffAug): a function
    of the step, so resume is exact."""
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
    source = FAMILIES[family_name].source(cfg)
    family = FAMILIES[family_name](cfg)
    disc = family.discriminator()
    run = RunFolder(cfg.run.dir or f"runs/tokenizer/{family_name}", acc)
    run.save_config(cfg)
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

    step = 0
    latest = run.latest_checkpoint()
    if latest is not None:
        state, ema_state = run.load_training_state(latest)
        step = state["step"]
        if ema is not None:
            ema.load_state_dict(ema_state)
        log.info("resumed from %s (step %d)", latest, step)

    sample_images = family.view(next(iterate_images(source, cfg.log.sample_images)).images, None).to(acc.device)
    if acc.is_main_process:
        run.log(event="start", family=family_name, step=step, processes=acc.num_processes, data=source.describe(),
                tokenizer_params=sum(p.numel() for p in raw.tokenizer.parameters()),
                disc_params=sum(p.numel() for p in d_params), precision=acc.mixed_precision,
                random_weights=family.random_networks())
    if step == 0:
        sample(run, acc, raw.tokenizer, ema_tokenizer, sample_images, step)

    bar = progress(total=cfg.train.steps, initial=step, desc=f"train {family_name}", enabled=acc.is_main_process)
    sums: dict[str, torch.Tensor] = {}  # on the device: read back only when logged
    count, tick = 0, time.time()
    data = batches(source, cfg, step, acc.process_index, acc.num_processes) if step < cfg.train.steps else iter(())
    for images in data:
        logs = train_step(acc, cfg, family, (model, raw, opt_g), (disc, raw_disc, opt_d, d_params),
                          images.to(acc.device), step)
        step += 1
        if ema is not None:
            ema.update(family.ema_source(raw))
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
            sample(run, acc, raw.tokenizer, ema_tokenizer, sample_images, step)
        if step % cfg.log.checkpoint_every == 0 or step == cfg.train.steps:
            run.save_training_state(step, ema.state_dict() if ema else None, keep=cfg.log.keep_checkpoints)
        if step >= cfg.train.steps:
            break
    bar.close()

    if acc.is_main_process:
        final = ema_tokenizer if ema_tokenizer is not None else raw.tokenizer
        final.save_pretrained(run.path / "tokenizer")
        run.log(event="exported", step=step, tokenizer=str(run.path / "tokenizer"), ema=ema is not None)
        log.info("tokenizer saved to %s", run.path / "tokenizer")
    acc.wait_for_everyone()
    acc.end_training()
    return run.path


def train_step(acc: Any, cfg: DictConfig, family: Family, gen: tuple, dis: tuple, images: torch.Tensor,
               step: int) -> dict[str, torch.Tensor]:
    """One generator step on the family loss, then a discriminator step on the family's fakes (LDM: the same
    reconstructions). The GAN term starts at `loss.disc_start` (before it, LDM multiplies it by 0), the
    discriminator updates at `family.disc_update_start()`. `gen`: (prepared module, unwrapped module,
    optimiser); `dis`: the same plus the discriminator's trained parameters (built once by `train`). All
    randomness of the step (crops, noise, augmentation) comes from one generator seeded by the step, drawn in
    a fixed order."""
    model, raw, opt_g = gen
    disc, raw_disc, opt_d, d_params = dis
    rng = step_rng(cfg.train.seed, step, acc.process_index)
    images = family.view(images, rng)
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
        loss, nll, recon, logs = family.generator_loss(model, raw, images, rng)
        if gan_on:
            g_loss = hinge_g_loss(raw_disc(family.disc_input(recon, rng)))
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
            logits_real, logits_fake = disc(family.disc_input(images, rng)), disc(family.disc_input(fakes, rng))
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


def init_weights(path: Path, model: nn.Module, disc: nn.Module) -> None:
    """Weights (trained module and discriminator, strictly) from a run folder's last checkpoint or a checkpoint folder."""
    if (path / "checkpoints").is_dir():
        last = latest_checkpoint(path)
        if last is None:
            raise FileNotFoundError(f"run.init_from: {path} has no finished checkpoint")
        path = last
    model.load_state_dict(load_safetensors(path / "model.safetensors"), strict=True)
    disc.load_state_dict(load_safetensors(path / "model_1.safetensors"), strict=True)
    log.info("initialised from %s", path)


USAGE = "usage: python -m tokenizers.train <family> [preset=NAME] [data=NAME] [key=value ...]"


def usage(family: str | None) -> str:
    if family is None:
        lines = [USAGE, "", "families (`python -m tokenizers.train <family> --help` lists its keys):"]
        lines += [f"  {name}: {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in FAMILIES.items()]
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
                          + f"; trainable here: {', '.join(FAMILIES)}")
    if wants_help(positional):
        print(usage(family))
        return None
    if len(names) != 1 or len(positional) != 1:
        raise UsageError(f"give one tokenizer family and key=value overrides ({USAGE.removeprefix('usage: ')}); "
                         f"got {' '.join(positional) or 'no family'}")
    return train(family, compose("tokenizer", family, preset, overrides))


if __name__ == "__main__":
    cli.run(main)
