"""What SemVAE (tokenizers/semvae.py) and FAE (tokenizers/fae.py) share: a VAE over a frozen encoder's patch tokens.

A subclass builds ``feature_encoder`` (tokenizers.encoders.build_feature_encoder) and ``vae``, a ``TokenVAE`` with
``posterior(features) -> (mean, logvar)`` [B, C, h, w], ``decode(latents) -> features`` [B, h*w, D], and the
attributes ``latent_channels`` and ``feature_dim``; it sets ``image_size`` and ``downsample`` (image pixels per latent
position). The frozen encoder's weights are never saved: they come from their file or seed again.
"""
from __future__ import annotations

import torch

from core.errors import UserError
from tokenizers.base import Tokenizer
from tokenizers.encoders import FrozenEncoder


class TokenVAE(torch.nn.Module):
    """A VAE of tokens; a subclass supplies ``posterior`` and ``decode``. No parameters of its own, so a subclass
    keeps its official state_dict names."""

    def posterior(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(reconstructed features of the sample mean + std * noise, mean, logvar): the training pass."""
        mean, logvar = self.posterior(features)
        return self.decode(mean + torch.exp(0.5 * logvar) * noise.to(mean)), mean, logvar


class FeatureVAETokenizer(Tokenizer):
    feature_encoder: FrozenEncoder
    vae: torch.nn.Module
    image_size: int

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(tokens, dim) of the frozen encoder's features, ``encode_features``' input and ``decode_features``' output."""
        return (self.image_size // self.downsample) ** 2, self.vae.feature_dim

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's patch tokens [B, L, D] of images [B, 3, S, S] in [-1, 1]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise UserError(f"{type(self).__name__} expects images [B, 3, {self.image_size}, {self.image_size}], "
                            f"got {tuple(images.shape)}")
        return self.feature_encoder(images)

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance [B, C, h, w] of q(z | images) (latents.extract --sample-posterior uses this)."""
        return self.vae.posterior(self.features(images))

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return self.encode_features(self.features(images), sample, generator)

    def encode_features(self, features: torch.Tensor, sample: bool = False,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Features [B, L, D] -> latents [B, C, sqrt(L), sqrt(L)]: the posterior mean, or a sample when `sample`
        (noise from `generator`, on its device, else the global RNG)."""
        mean, logvar = self.vae.posterior(features)
        if not sample:
            return mean
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode_features(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> reconstructed encoder features [B, h*w, D]."""
        return self.vae.decode(latents)
