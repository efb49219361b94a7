"""RAE's decoder training recipe for the shared loop (tokenizers.train): a ViT decoder on the frozen encoder's
noise-augmented latents, a frozen-DINO discriminator behind DiffAug, random crops and a warm-up + cosine
schedule (reference/rae_ditdh.md §1.3, §1.5).

RAEv2's recipe (`encoder=dinov3_l_k7`, reference/raev2.md §2.3) is the same loop, losses, schedule, EMA and
discriminator; what differs is its encoder, its decoder's [0, 1] pixels (tokenizers.rae, `pixels`) and its
images: plain 256 px centre crops, no random crop (`augment.resize_scale` null takes the encoder's default)."""
from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from core.config import ConfigError, to_dict
from core.images import build_source
from tokenizers.base import Tokenizer
from tokenizers.discriminators import DinoDiscriminator, diff_augment
from tokenizers.losses import build_lpips
from tokenizers.rae import DECODERS, PATCH, RAE, RAE_ENCODERS, noise_augment
from tokenizers.recipe import Family, trainable, with_module



# The training images' resize scale of each recipe (`augment.resize_scale: null`): RAE's Resize(384) + RandomCrop(256),
# RAEv2's pre-centre-cropped 256 px images as they are.
RAEV2_RESIZE_SCALE, RAE_RESIZE_SCALE = 1.0, 1.5


def rae_encoder_options(name: str) -> dict[str, str]:
    """The RAE constructor's encoder keywords of an encoder of configs; `dinov2_b` is DINOv2-B with registers, as
    RAE's; `dinov3_l_k7` is RAEv2's DINOv3-L with its k7 layer set."""
    if name not in RAE_ENCODERS:
        raise ConfigError(f"encoder: unknown RAE encoder {name!r}; choose from {', '.join(RAE_ENCODERS)} "
                          "(dinov2_b is DINOv2-B with registers)")
    return RAE_ENCODERS[name]


def resize_scale(cfg: DictConfig) -> float:
    """`augment.resize_scale`, or when null the encoder's recipe's (RAEv2's layer-set encoders: 1, RAE's: 1.5)."""
    if cfg.augment.resize_scale is not None:
        return float(cfg.augment.resize_scale)
    return RAEV2_RESIZE_SCALE if "layers" in rae_encoder_options(cfg.encoder) else RAE_RESIZE_SCALE


def encoder_size(cfg: DictConfig) -> dict[str, Any] | None:
    """`model.encoder_size` as a plain dict (timm keywords over the random encoder's architecture), or None."""
    size = cfg.model.get("encoder_size")
    if size is None:
        return None
    if not isinstance(size, DictConfig):
        raise ConfigError(f"model.encoder_size must be a mapping of timm keywords such as {{embed_dim: 64, num_heads: 2}}, "
                          f"got {size!r}")
    return to_dict(size)


def check_rae_config(cfg: DictConfig) -> None:
    rae_encoder_options(cfg.encoder)
    if cfg.model.decoder not in DECODERS:
        raise ConfigError(f"model.decoder: unknown RAE decoder {cfg.model.decoder!r}; choose from {sorted(DECODERS)}")
    if cfg.data.image_size % PATCH:
        raise ConfigError(f"data.image_size {cfg.data.image_size} is not a multiple of RAE's patch {PATCH}")
    if resize_scale(cfg) < 1:
        raise ConfigError(f"augment.resize_scale must be at least 1, got {cfg.augment.resize_scale}")
    if (size := encoder_size(cfg)) is not None and not cfg.model.random_init:
        raise ConfigError(f"model.encoder_size {size} needs model.random_init=true: pretrained encoder weights have "
                          "the released architecture")


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

    def forward(self, images: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstructions of the noise-augmented latents, the clean latents)."""
        latents = self.tokenizer.encode(images)
        return self.tokenizer.decode(noise_augment(latents, self.noise_tau, gens)), latents


def warmup_cosine(k: int, warmup: int, total: int, final_ratio: float) -> float:
    """RAE's learning rate at update k (from 0) as a fraction of the base rate: a linear warm-up (k + 1) / warmup,
    then a cosine from 1 down to `final_ratio` at update `total`, constant after."""
    if k < warmup:
        return (k + 1) / warmup
    if k >= total:
        return final_ratio
    progress = (k - warmup) / max(total - warmup, 1)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@trainable("rae")
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
            tokenizer = RAE(decoder=cfg.model.decoder, image_size=cfg.data.image_size,
                            encoder_weights=cfg.model.encoder_weights, random_init=cfg.model.random_init,
                            encoder_size=encoder_size(cfg), **rae_encoder_options(cfg.encoder))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} [in this config: model.encoder_weights=<file>, or model.random_init=true]") from e
        self.model = RAEModel(tokenizer, cfg.model.noise_tau)
        self.lpips = build_lpips(cfg.loss.lpips_random) if cfg.loss.perceptual_weight > 0 else None
        self._latents: torch.Tensor | None = None  # the batch's clean latents, from generator_loss to disc_fakes

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.model.tokenizer.encoder, self.lpips) if m is not None]

    def random_networks(self) -> list[str]:
        cfg = self.cfg
        size = encoder_size(cfg)
        return ([f"RAE encoder {cfg.encoder}" + (f" (size {size})" if size else "")] if cfg.model.random_init else []) + (
            ["LPIPS VGG16 trunk"] if self.lpips is not None and cfg.loss.lpips_random else []) + (
            ["discriminator DINO ViT-S/8"] if cfg.discriminator.random_init else [])

    @classmethod
    def source(cls, cfg: DictConfig) -> Any:
        """Images ADM-centre-cropped to `augment.resize_scale` x `data.image_size`; `view` crops them."""
        check_rae_config(cfg)  # the first thing a run does: bad settings stop it before the data is scanned
        return build_source({**to_dict(cfg.data), "image_size": int(cfg.data.image_size * resize_scale(cfg))})

    def view(self, images: torch.Tensor, gens: list[torch.Generator] | None) -> torch.Tensor:
        """A random `data.image_size` crop of each training image (official: Resize(384) + RandomCrop(256), no
        flip), the centre crop of the sample images."""
        size, full = self.cfg.data.image_size, images.shape[-1]
        if full == size:
            return images
        if gens is None:
            o = (full - size) // 2
            return images[..., o : o + size, o : o + size]
        corners = [torch.randint(0, full - size + 1, (2,), generator=g).tolist() for g in gens]
        return torch.stack([im[:, t : t + size, l : l + size] for im, (t, l) in zip(images, corners)])

    def generator_loss(
        self, model: nn.Module, raw: RAEModel, images: torch.Tensor, gens: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        recon, self._latents = model(images, gens)
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

    def disc_input(self, images: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        return diff_augment(images, gens)

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
        return with_module(self.model.tokenizer, "decoder", ema_module)
