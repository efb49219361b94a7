"""SFD's semantic VAE (SemVAE): a frozen DINOv2-B/14 with registers, whose 16 x 16 patch tokens a small
transformer VAE compresses to a 16 x 16 x 16 latent and decodes back to the 768-wide tokens.

A *feature* tokenizer (``decodes_to = "features"``): ``decode`` gives DINOv2 features [B, tokens, 768], not
images. Its latents are the semantic group of SFD's composite latent ([texture 32 | semantic 16] channels),
which a texture VAE decodes to pixels; nothing here turns them into images (reference/ddt_sfd_repa_ig.md §2.1).

The VAE is the official ``SemanticVariationalAutoEncoder`` with ``arch='transformer'`` (yuemingPAN/SFD
``tokenizer/semvae/models/vae.py`` @ 8b17273, config ``semvae_train/ch16.yaml``; reference §2.2), with its
parameter names and shapes, so the released ``semantic_ae_final.pt`` loads strictly:

    encoder.0        Linear 768 -> 768
    encoder.{1..4}   pre-LN blocks: norm1, attn (nn.MultiheadAttention, 6 heads), norm2, mlp.0 / mlp.2 (GELU)
    encoder.5, .6    LayerNorm, Linear 768 -> 32 (mean 16 | logvar 16)
    decoder.0        Linear 16 -> 768, decoder.{1..4} the same blocks, decoder.5 LayerNorm, decoder.6 768 -> 768

No positional embedding: the blocks see an unordered set of tokens, so any square token grid works (56 px
images give 4 x 4). The posterior is diffusers' ``DiagonalGaussianDistribution`` on the tokens laid out as
[B, 32, h, w] (token t = row * w + column): channels 0..15 the mean, 16..31 the log-variance clamped to
[-30, 20]. The official ``encode`` returns a sample; ours returns the mean unless asked (DESIGN §3), and
``latents.extract --sample-posterior`` draws one sample per view, as the released SFD data set stores.

The frozen encoder is REPA's target encoder (tokenizers.encoders.build_feature_encoder): ImageNet-normalised,
then bicubic-resized 256 -> 224 px, position table resampled once at load; that is how SFD's diffusion-latent
extraction feeds it. The release's SemVAE itself was trained on features of Resize(256) + CenterCrop(224)
images (a tighter crop), which this module does not reproduce.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.checkpoint import check_keys, load_torch_weights
from core.errors import MismatchError, UserError
from tokenizers.base import register
from tokenizers.encoders import FrozenEncoder, build_feature_encoder
from tokenizers.feature_vae import FeatureVAETokenizer, TokenVAE

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
PATCH = 16  # image pixels per latent position, each side, as released (DINOv2's 14 px patches of the 224 px resize)
RELEASE = "semantic_vae/dinov2_vitb14_reg/transformer_ch16"  # HF SFD-Project/SFD, .../checkpoints/semantic_ae_final.pt


class Block(nn.Module):
    """The official ``TransformerBlock``: pre-LN self-attention (torch's MultiheadAttention) and a GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        # need_weights=False: the official discards the weights too, and this lets torch use its fused kernel.
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def transformer(d_in: int, d_out: int, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.Sequential:
    """Linear d_in -> dim, `depth` blocks, LayerNorm, Linear dim -> d_out: one half of the VAE."""
    blocks = [Block(dim, num_heads, mlp_ratio) for _ in range(depth)]
    return nn.Sequential(nn.Linear(d_in, dim), *blocks, nn.LayerNorm(dim), nn.Linear(dim, d_out))


def token_grid(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        # The official pads or truncates to 16 x 16 here; a non-square count means the features are not a grid.
        raise UserError(f"SemVAE takes a square grid of tokens, got {tokens}")
    return side


class SemanticVAE(TokenVAE):
    """The trained part: features [B, L, D] <-> latents [B, C, h, w] (h = w = sqrt(L)); the official module's
    state_dict exactly (``encoder.*``, ``decoder.*``)."""

    def __init__(self, feature_dim: int = 768, hidden_dim: int = 768, depth: int = 4, num_heads: int = 6,
                 mlp_ratio: float = 4.0, latent_channels: int = 16):
        super().__init__()
        self.feature_dim, self.latent_channels = feature_dim, latent_channels
        self.encoder = transformer(feature_dim, 2 * latent_channels, hidden_dim, depth, num_heads, mlp_ratio)
        self.decoder = transformer(latent_channels, feature_dim, hidden_dim, depth, num_heads, mlp_ratio)

    def posterior(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clamped log-variance, each [B, C, h, w], of q(z | features [B, L, D])."""
        if features.ndim != 3 or features.shape[-1] != self.feature_dim:
            raise UserError(f"SemVAE expects features [B, tokens, {self.feature_dim}], got {tuple(features.shape)}")
        side = token_grid(features.shape[1])
        moments = self.encoder(features).transpose(1, 2).unflatten(2, (side, side))  # [B, 2C, h, w]
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> features [B, h*w, D]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise UserError(f"SemVAE expects latents [B, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        return self.decoder(latents.flatten(2).transpose(1, 2))


@register("semvae")
class SemVAE(FeatureVAETokenizer):
    """SFD's SemVAE: images [B, 3, S, S] in [-1, 1] -> latents [B, 16, S/16, S/16] -> DINOv2 features
    [B, (S/16)², 768]. The defaults are the release (57,924,896 parameters in ``vae``).

    ``encoder`` names the frozen feature encoder (tokenizers.encoders; the release: ``dinov2_b_reg``),
    ``encoder_weights`` its weights file (None: the Hugging Face cache), ``random_init`` seeded random weights
    (tests, demos). Its weights are never saved: they come from the file or the seed again.
    ``cell``: image pixels per latent position (the release's 16; 8 feeds DINOv2 twice the side, so that a
    64 px image gives the 8 x 8 grid of an f8 texture latent); ``encoder_depth``: the encoder's first blocks only
    (a cheap random encoder for CPU demos; None: all of it).
    """

    decodes_to = "features"
    releases = {"": (RELEASE,)}

    def __init__(self, encoder: str = "dinov2_b_reg", image_size: int = 256, hidden_dim: int = 768, depth: int = 4,
                 num_heads: int = 6, mlp_ratio: float = 4.0, latent_channels: int = 16,
                 encoder_weights: str | None = None, random_init: bool = False, cell: int = PATCH,
                 encoder_depth: int | None = None):
        super().__init__()
        if image_size % cell:
            raise UserError(f"SemVAE image size must be a multiple of its cell {cell}, got {image_size}")
        self.config = dict(encoder=encoder, image_size=image_size, hidden_dim=hidden_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, latent_channels=latent_channels,
                           encoder_weights=None if encoder_weights is None else str(encoder_weights),
                           random_init=random_init, cell=cell, encoder_depth=encoder_depth)
        self.image_size, self.downsample = image_size, cell
        self.feature_encoder: FrozenEncoder = build_feature_encoder(encoder, encoder_weights, random_init, image_size,
                                                                    cell, encoder_depth)
        self.vae = SemanticVAE(self.feature_encoder.feature_dim, hidden_dim, depth, num_heads, mlp_ratio,
                               latent_channels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> DINOv2 features [B, h*w, D] (``decodes_to = "features"``: not images)."""
        return self.vae.decode(latents)

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        return self.vae.state_dict()  # the official names; the frozen encoder comes from its file or seed

    def load_saved_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_vae_state_dict(state, "SemVAE saved weights")

    def load_vae_state_dict(self, state: dict[str, torch.Tensor], what: str) -> None:
        """Official-layout weights (``encoder.*``, ``decoder.*``), strictly: nothing missing, extra or reshaped."""
        check_keys(self.vae.state_dict(), state, what)
        self.vae.load_state_dict(state, strict=True)

    @classmethod
    def load_official(cls, path: str | Path, **config: Any) -> "SemVAE":
        """The released ``semantic_ae_final.pt`` (weights under ``model_state_dict``, read with weights_only=True);
        ``config`` as the constructor's (e.g. ``encoder_weights=<DINOv2-B reg file>``)."""
        state = load_torch_weights(path)
        if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
            state = state["model_state_dict"]
        if not isinstance(state, dict):
            raise MismatchError(f"{path} is not a SemVAE checkpoint ({{'model_state_dict': ...}}); got {type(state).__name__}")
        model = cls(**config)
        model.load_vae_state_dict(state, f"SemVAE official checkpoint {path}")
        return model.eval()

    @classmethod
    def released_config(cls, variant: str = "") -> dict[str, Any]:
        return dict(random_init=True)  # the encoder's weights are not needed for the shapes

    @classmethod
    def tiny_config(cls, variant: str, image_size: int) -> dict[str, Any]:
        return dict(image_size=image_size, hidden_dim=32, depth=1, num_heads=2, random_init=True)

