"""VA-VAE's training recipe for the shared loop (tokenizers.train): LDM's autoencoder losses plus the VF
loss against a frozen vision foundation model (reference/lightningdit_vavae.md §1.5-1.6)."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from core.config import ConfigError
from core.log import get_logger
from tokenizers.encoders import ENCODERS, build_encoder
from tokenizers.losses import adaptive_weight, build_lpips, kl_loss, reconstruction_nll, vf_loss
from tokenizers.recipe import Family, trainable
from tokenizers.vavae import VAVAE

log = get_logger("tokenizers.train")

VF_MAX_WEIGHT = 1e8  # VA-VAE's clamp of the adaptive VF weight


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


@trainable("vavae")
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
        self, model: nn.Module, raw: VAVAEModel, images: torch.Tensor, gens: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss without the GAN term, nll, reconstructions, values to log)."""
        cfg = self.cfg
        # Posterior noise from CPU generators, as the official code draws it.
        noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens]).to(images)
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
