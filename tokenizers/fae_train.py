"""FAE's three training stages (reference/fae_wit_jit.md §1.1, §1.6), each a run folder that resumes:

    python -m tokenizers.train fae stage=feature    # encoder + feature decoder: L2 + beta KL on the frozen features
    python -m tokenizers.train fae stage=pixel      # pixel decoder on noisy real features x + N(0, sigma^2)
    python -m tokenizers.train fae stage=finetune   # the same pixel decoder on the feature decoder's output

``feature`` runs in the feature-autoencoder loop (tokenizers/feature_train.py; loss.cos_weight 0 leaves the paper's
plain L2 + beta KL). ``pixel`` and ``finetune`` run in the shared GAN loop (tokenizers.train) with RAE's decoder
recipe (tokenizers/rae_train.py: L1 + LPIPS, an adaptive-weighted hinge GAN against the frozen-DINO discriminator
behind DiffAug): the paper names GAN + perceptual + reconstruction losses "following TiTok" and gives no weights,
norm or discriminator, so these are RAE's. Each stage reads the previous stage's exported tokenizer
(``previous``, by default the previous stage's default run folder) and exports a whole FAE: after ``feature`` one
without a pixel decoder (it encodes; a latent store needs no more), after ``pixel`` and ``finetune`` a full one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from torch import nn

from core.config import ConfigError
from core.errors import MismatchError
from core.integrity import sha256_file
from core.images import build_source, iterate_images
from core.log import get_logger
from tokenizers.base import Tokenizer, read_config
from tokenizers.fae import FAE
from tokenizers.feature_train import FeatureFamily, check_config, lr_factor
from tokenizers.losses import build_lpips
from tokenizers.rae_train import RAEFamily
from tokenizers.recipe import Family, trainable, with_module

log = get_logger("tokenizers.train")

# The paper's sigma 0.4 is DINOv2-g/14's; we apply it unscaled to every DINOv2 [ours], other encoders scale it.
DINOV2_SIGMA_ENCODERS = ("dinov2_",)
# model.* keys a later stage takes from the previous stage's tokenizer; its own config must agree on them.
SHARED_MODEL_KEYS = ("encoder", "random_init", "latent_channels", "num_heads", "head_dim", "encoder_act",
                     "decoder_depth", "decoder_heads", "mlp_ratio", "cell", "encoder_depth")


def fae_model_kwargs(cfg: DictConfig, pixel_decoder: str | None) -> dict[str, Any]:
    m = cfg.model
    return dict(encoder=m.encoder, image_size=cfg.data.image_size, latent_channels=m.latent_channels,
                num_heads=m.num_heads, head_dim=m.head_dim, encoder_act=m.encoder_act, decoder_depth=m.decoder_depth,
                decoder_heads=m.decoder_heads, mlp_ratio=m.mlp_ratio, pixel_decoder=pixel_decoder,
                encoder_weights=m.encoder_weights, random_init=m.random_init, cell=m.cell, encoder_depth=m.encoder_depth)


def build_fae(kwargs: dict[str, Any]) -> FAE:
    try:
        return FAE(**kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} [in this config: model.encoder_weights=<file>, or model.random_init=true]") from e


def previous_stage(cfg: DictConfig) -> str:
    order = list(STAGES)  # each stage reads the export of the one before it
    return order[order.index(cfg.stage) - 1]


def previous_run(cfg: DictConfig) -> Path:
    """The previous stage's run folder: `previous`, or that stage's default folder."""
    return Path(cfg.previous or f"runs/tokenizer/fae_{previous_stage(cfg)}")


def previous_tokenizer(cfg: DictConfig) -> Path:
    """The previous stage's exported tokenizer folder, checked before any network is built."""
    before = previous_stage(cfg)
    folder = previous_run(cfg) / "tokenizer"
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"stage={cfg.stage} trains on the {before} stage's tokenizer {folder}, which is not "
                                f"there: run `python -m tokenizers.train fae stage={before}` to the end first (again, "
                                f"if it stopped: it resumes), or set previous=<its run folder>")
    saved = read_config(folder)
    if saved.get("family") != "fae":
        raise MismatchError(f"previous={previous_run(cfg)}: its tokenizer is a {saved.get('family')!r}, not an FAE")
    if cfg.stage == "finetune" and saved.get("pixel_decoder") is None:
        raise MismatchError(f"previous={previous_run(cfg)}: a feature-stage export (no pixel decoder); stage=finetune "
                            "fine-tunes the pixel stage's decoder: give the pixel stage's run folder")
    keys = SHARED_MODEL_KEYS + (("pixel_decoder",) if cfg.stage == "finetune" else ())
    differ = {k: (saved.get(k), cfg.model[k]) for k in keys if saved.get(k) != cfg.model[k]}
    if saved.get("image_size") != cfg.data.image_size:
        differ["data.image_size"] = (saved.get("image_size"), cfg.data.image_size)
    if differ:
        raise MismatchError(f"stage={cfg.stage}: the {before} stage's tokenizer {folder} was trained with "
                            + ", ".join(f"{k} {a!r} (this config: {b!r})" for k, (a, b) in differ.items()))
    return folder


# --- stage feature ------------------------------------------------------------------------------------------

class FeatureStage(FeatureFamily):
    """FAE stage feature: the single-attention encoder and the feature decoder, L2 + beta KL on frozen features."""

    name = "fae_feature"

    def __init__(self, cfg: DictConfig):
        check_config(cfg)
        if cfg.previous is not None:
            raise ConfigError(f"previous={cfg.previous}: stage=feature is the first stage and reads no other run")
        self.cfg = cfg
        self.tokenizer = build_fae(fae_model_kwargs(cfg, pixel_decoder=None))
        self.model = self.tokenizer.vae

    def random_networks(self) -> list[str]:
        return [f"FAE frozen encoder {self.cfg.model.encoder}"] if self.cfg.model.random_init else []


# --- stages pixel and finetune ------------------------------------------------------------------------------

class PixelModel(nn.Module):
    """What the pixel stages' generator optimiser trains: the pixel decoder. Stage pixel feeds it the frozen
    encoder's features plus N(0, sigma^2) noise, stage finetune the feature decoder's reconstruction of them
    (from the posterior mean), without noise. The FAE is an attribute, not a submodule, so its frozen parts stay out
    of DDP, the checkpoints and the EMA (PixelStage.frozen moves them to the device)."""

    def __init__(self, tokenizer: FAE, stage: str, sigma: float):
        super().__init__()
        self.decoder = tokenizer.pixel_decoder
        self.stage, self.sigma = stage, sigma
        object.__setattr__(self, "tokenizer", tokenizer)  # bypasses nn.Module's submodule registration

    @torch.no_grad()
    def clean_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The pixel decoder's input before any noise: real features, or their reconstruction (finetune)."""
        tok = self.tokenizer
        with torch.autocast(images.device.type, enabled=False):  # frozen parts in fp32, as a store's features
            feats = tok.features(images.float())
            if self.stage == "finetune":
                feats = tok.vae.decode(tok.vae.posterior(feats)[0])
        return feats

    def forward(self, images: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstructions, the clean inputs). The noise of image i comes from gens[i]."""
        clean = self.clean_inputs(images)
        inputs = clean
        if self.stage == "pixel":
            noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in gens]).to(clean)
            inputs = clean + self.sigma * noise
        return self.decoder(inputs), clean


def check_pixel_config(cfg: DictConfig) -> None:
    """What the pixel stages refuse before any work (the model keys are checked against the previous export)."""
    if cfg.model.pixel_decoder is None:
        raise ConfigError(f"model.pixel_decoder: stage={cfg.stage} trains the pixel decoder; name its size")
    if cfg.features.store:
        raise ConfigError(f"features.store: stage={cfg.stage} trains on images (the store's features are the feature "
                          "stage's data)")
    if cfg.optim.weight_decay:
        raise ConfigError(f"optim.weight_decay {cfg.optim.weight_decay}: the pixel stages' optimiser is the shared GAN "
                          "loop's Adam, without weight decay")


def noise_sigma(cfg: DictConfig, tokenizer: FAE) -> float:
    """Stage pixel's noise level: `noise.sigma` (the paper's 0.4 for DINOv2), scaled by this encoder's mean token
    norm over the first `noise.norm_images` images divided by `noise.norm_reference` (DINOv2's) when that is set."""
    n = cfg.noise
    if n.norm_reference is None:
        if not cfg.model.encoder.startswith(DINOV2_SIGMA_ENCODERS):
            raise ConfigError(f"noise.sigma {n.sigma} is the paper's value for DINOv2; for encoder {cfg.model.encoder} "
                              "set noise.norm_reference=<DINOv2-g/14's mean token norm> to scale it by the feature "
                              "norms (as the paper does), or set noise.sigma for this encoder and noise.norm_reference=1 "
                              "with noise.norm_images=0")
        return float(n.sigma)
    if n.norm_images == 0:
        return float(n.sigma) / float(n.norm_reference)
    # On the GPU when there is one (the frozen encoder is moved back after): DINOv2-g over 256 images.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = tokenizer.feature_encoder.to(device)
    batch = next(iterate_images(build_source(cfg.data), n.norm_images)).images
    with torch.no_grad():
        norm = torch.cat([encoder(chunk.to(device)).norm(dim=-1).flatten().cpu() for chunk in batch.split(32)]).mean().item()
    tokenizer.feature_encoder.to("cpu")
    log.info("noise: mean token norm %.4g over %d images; sigma %.4g", norm, len(batch), n.sigma * norm / n.norm_reference)
    return float(n.sigma) * norm / float(n.norm_reference)


class PixelStage(RAEFamily):
    """FAE stage pixel: the pixel decoder on noisy real features, RAE's decoder recipe (L1 + LPIPS + GAN)."""

    name = "fae_pixel"

    def __init__(self, cfg: DictConfig):  # not RAEFamily's, which builds an RAE
        check_pixel_config(cfg)
        self.cfg = cfg
        folder = previous_tokenizer(cfg)
        record_previous(cfg, folder)
        saved = {**read_config(folder), "pixel_decoder": cfg.model.pixel_decoder,
                 "encoder_weights": cfg.model.encoder_weights}
        saved.pop("family")
        tokenizer = self.load_previous(folder, saved)
        self.sigma = noise_sigma(cfg, tokenizer) if cfg.stage == "pixel" else 0.0
        self.model = PixelModel(tokenizer, cfg.stage, self.sigma)
        self.lpips = build_lpips(cfg.loss.lpips_random) if cfg.loss.perceptual_weight > 0 else None
        self._latents: torch.Tensor | None = None  # the batch's clean inputs, from generator_loss to disc_fakes
        log.info("stage %s from %s", cfg.stage, folder)

    def load_previous(self, folder: Path, config: dict[str, Any]) -> FAE:
        """The feature stage's FAE with a new pixel decoder (this module's RNG draws its initial weights)."""
        tokenizer = build_fae(config)
        state = load_file(str(folder / "model.safetensors"))
        tokenizer.vae.load_state_dict({k.removeprefix("vae."): v for k, v in state.items() if k.startswith("vae.")},
                                      strict=True)
        return tokenizer

    @classmethod
    def source(cls, cfg: DictConfig) -> Any:
        """ADM centre crops at data.image_size (the paper's preprocessing; no random crop, no flip)."""
        check_pixel_config(cfg)
        previous_tokenizer(cfg)  # a missing previous stage stops the run before the data is scanned
        return build_source(cfg.data)

    def frozen(self) -> list[nn.Module]:
        tok = self.model.tokenizer
        return [m for m in (tok.feature_encoder, tok.vae, self.lpips) if m is not None]

    def random_networks(self) -> list[str]:
        cfg = self.cfg
        return ([f"FAE frozen encoder {cfg.model.encoder}"] if cfg.model.random_init else []) + (
            ["LPIPS VGG16 trunk"] if self.lpips is not None and cfg.loss.lpips_random else []) + (
            ["discriminator DINO ViT-S/8"] if cfg.discriminator.random_init else [])

    def disc_fakes(self, raw: PixelModel, recon: torch.Tensor) -> torch.Tensor:
        """Decodes of the clean inputs by the updated decoder, clamped and quantised to 8 bits as real images are."""
        with torch.no_grad():
            fakes = raw.decoder(self._latents).clamp(-1, 1)
        return torch.round((fakes + 1) * 127.5) / 127.5 - 1

    def lr_factors(self, step: int) -> tuple[float, float]:
        """The paper's cosine with a linear warm-up (feature_train.lr_factor, no constant part) for both networks;
        the discriminator's clock starts with its updates."""
        o, total = self.cfg.optim, self.cfg.train.steps
        d_updates = max(step - self.disc_update_start(), 0)
        return tuple(lr_factor(k, o.warmup_steps, o.constant_steps, total, o.warmup_start, o.final_ratio)
                     for k in (step, d_updates))

    def as_tokenizer(self, ema_module: nn.Module) -> Tokenizer:
        return with_module(self.model.tokenizer, "pixel_decoder", ema_module)


class FinetuneStage(PixelStage):
    """FAE stage finetune: the pixel stage's decoder fine-tuned on the feature decoder's reconstructions."""

    name = "fae_finetune"

    def load_previous(self, folder: Path, config: dict[str, Any]) -> FAE:
        """The pixel stage's whole FAE (its exported pixel decoder: the EMA weights when EMA was on)."""
        tokenizer = build_fae(config)
        tokenizer.load_saved_state_dict(load_file(str(folder / "model.safetensors")))
        return tokenizer


def record_previous(cfg: DictConfig, folder: Path) -> None:
    """The previous export's sha256 in the run's config, so that a resumed run refuses to continue on another one
    (a previous stage retrained or extended meanwhile)."""
    cfg.previous_sha256 = sha256_file(folder / "model.safetensors")


STAGES: dict[str, type[Family]] = {"feature": FeatureStage, "pixel": PixelStage, "finetune": FinetuneStage}


@trainable("fae")
class FAEFamily(Family):
    """FAE (One Layer Is Enough): one attention layer over a frozen encoder, in three stages (stage=feature|pixel|finetune)."""

    @classmethod
    def for_config(cls, cfg: DictConfig) -> type[Family]:
        if cfg.stage not in STAGES:
            raise ConfigError(f"stage: unknown FAE stage {cfg.stage!r}; choose from {', '.join(STAGES)}")
        return STAGES[cfg.stage]
