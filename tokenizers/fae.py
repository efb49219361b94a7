"""FAE ("One Layer Is Enough", Gao, Chen, Chen, Gu; Apple; arXiv 2512.07829): a frozen encoder's patch tokens
compressed to a 32-channel latent by ONE attention layer, decoded back to features by a small transformer and to
pixels by a ViT-L (reference/fae_wit_jit.md §1, §4.1). No code has been released; this is the paper's text, and
where the paper is silent the choice is ours, named here and in configs/tokenizer/fae.yaml.

    images -> frozen encoder (DINOv2-g/14, 256 px resized to 224)  -> x [B, 256, 1536]
    x -> single-attention encoder -> (mean, log-variance)            -> z [B, 32, 16, 16]
    z -> feature decoder (6 LightningDiT blocks without adaLN)        -> x̂ [B, 256, 1536]
    x̂ -> pixel decoder (ViT-L, 24 x 1024, 16 heads)                  -> images [B, 3, 256, 256] in [-1, 1]

Decoding never touches the frozen encoder. Our choices for what the paper does not state:
- Encoder: merged q|k|v projection D -> 3 x 24 x 256 (hidden 6144) with biases, softmax attention, an output
  projection 6144 -> D with bias added to the input (the skip), GELU (`encoder_act`), Linear D -> 2C (mean |
  log-variance, the log-variance clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution). No norm and no
  position table: the frozen encoder's tokens are layer-normed and carry their positions. 37.87M parameters at
  g/14 against the paper's 38.17M (-0.8%): the paper's split of its parameters is not known.
- Feature decoder: Linear C -> D, a fixed 2-D sin-cos table (a frozen parameter, counted as LightningDiT counts
  its own), 6 pre-norm blocks of RMSNorm, attention (q|k|v with bias, 24 heads of 64, 2-D RoPE), RMSNorm and
  SwiGLU (hidden 2/3 x 4D = 4096), no final norm or projection: 170,426,880 parameters, the paper's 170.43M.
- Pixel decoder: RAE's ViT decoder (tokenizers.rae.ViTDecoder: class token, fixed sin-cos table, HF-ViT blocks,
  a linear to one p x p patch per token) predicting [-1, 1] pixels: 304.94M at L against the paper's 305.36M
  (-0.14%); the stated shapes give no more, and we do not add parameters to meet a count.
- The latent is the posterior mean unless `sample=True` (DESIGN §3); the paper does not say which it stores.

``cell`` is the image pixels per latent position (16: the paper's 256 px -> 16 x 16); 8 feeds the encoder twice
the side, for a 64 px CPU demo with an 8 x 8 grid. ``encoder_depth`` keeps the encoder's first blocks only
(cheap random encoders for demos). ``pixel_decoder=None`` is an FAE trained through the feature stage only: it
encodes (a latent store needs no more) and decodes to features, and refuses to decode to images.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import check_keys
from core.errors import UnknownNameError, UserError
from core.positions import sincos_pos_embed_2d
from core.transformer import Attention, RMSNorm, VisionRoPE2D, make_ffn
from tokenizers.base import register
from tokenizers.encoders import ENCODERS, FrozenEncoder, build_feature_encoder
from tokenizers.feature_vae import FeatureVAETokenizer, TokenVAE
from tokenizers.rae import DECODERS, ViTDecoder

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
CELL = 16  # image pixels per latent position: 256 px images give the paper's 16 x 16 grid
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}


class AttentionEncoder(nn.Module):
    """One self-attention layer with a wide head (24 x 256 at g/14) and a residual, then an activation and a linear
    map to the mean and log-variance of the latent: tokens [B, L, D] -> moments [B, L, 2C]."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, latent_channels: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise UnknownNameError(f"FAE encoder activation {act!r}; choose from {', '.join(ACTIVATIONS)}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.act = ACTIVATIONS[act]()
        self.out = nn.Linear(dim, 2 * latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1)
        return self.out(self.act(x + self.proj(attn)))


class DecoderBlock(nn.Module):
    """LightningDiT's block without adaLN: x + attn(RMSNorm x) with 2-D RoPE, then x + SwiGLU(RMSNorm x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = make_ffn(dim, mlp_ratio, use_swiglu=True)

    def forward(self, x: torch.Tensor, rope: nn.Module) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class FeatureDecoder(nn.Module):
    """Latent tokens [B, grid², C] -> features [B, grid², D]."""

    def __init__(self, latent_channels: int, dim: int, grid: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.embed = nn.Linear(latent_channels, dim)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid).float()[None], requires_grad=False)
        self.rope = VisionRoPE2D(dim // num_heads, grid)
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, mlp_ratio) for _ in range(depth))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos_embed
        for block in self.blocks:
            x = block(x, self.rope)
        return x


class FeatureVAE(TokenVAE):
    """The feature stage's trained part: features [B, L, D] <-> latents [B, C, h, w] (h = w = sqrt(L)), with the
    interface of SemVAE's (posterior, decode, forward), so that one feature-VAE loop trains both."""

    def __init__(self, feature_dim: int, grid: int, latent_channels: int, num_heads: int, head_dim: int, act: str,
                 decoder_depth: int, decoder_heads: int, mlp_ratio: float):
        super().__init__()
        self.feature_dim, self.latent_channels, self.grid = feature_dim, latent_channels, grid
        self.encoder = AttentionEncoder(feature_dim, num_heads, head_dim, latent_channels, act)
        self.decoder = FeatureDecoder(latent_channels, feature_dim, grid, decoder_depth, decoder_heads, mlp_ratio)

    def posterior(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clamped log-variance, each [B, C, h, w], of q(z | features [B, L, D])."""
        expected = (self.grid**2, self.feature_dim)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected:
            raise UserError(f"FAE expects features [B, {expected[0]}, {expected[1]}], got {tuple(features.shape)}")
        moments = self.encoder(features).transpose(1, 2).unflatten(2, (self.grid, self.grid))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> features [B, h*w, D]."""
        expected = (self.latent_channels, self.grid, self.grid)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != expected:
            raise UserError(f"FAE expects latents [B, {', '.join(map(str, expected))}], got {tuple(latents.shape)}")
        return self.decoder(latents.flatten(2).transpose(1, 2))


@register("fae")
class FAE(FeatureVAETokenizer):
    """FAE: images [B, 3, S, S] in [-1, 1] -> latents [B, 32, S/16, S/16] -> features -> images. The defaults are
    the paper's ImageNet model (DINOv2-g/14 without registers, a 32-channel latent, an L pixel decoder).

    ``encoder`` names the frozen encoder (tokenizers.encoders: dinov2_g, dinov2_b, siglip2_b, dinov3_b, ...),
    ``encoder_weights`` its weights file (None: the Hugging Face cache), ``random_init`` seeded random weights
    (tests, demos); its weights are never saved. ``pixel_decoder``: a size of tokenizers.rae.DECODERS, or None.
    """

    def __init__(self, encoder: str = "dinov2_g", image_size: int = 256, latent_channels: int = 32,
                 num_heads: int = 24, head_dim: int = 256, encoder_act: str = "gelu", decoder_depth: int = 6,
                 decoder_heads: int = 24, mlp_ratio: float = 4.0, pixel_decoder: str | None = "L",
                 encoder_weights: str | None = None, random_init: bool = False, cell: int = CELL,
                 encoder_depth: int | None = None):
        super().__init__()
        if encoder not in ENCODERS:
            raise UnknownNameError(f"unknown FAE encoder {encoder!r}; known: {sorted(ENCODERS)}")
        if pixel_decoder is not None and pixel_decoder not in DECODERS:
            raise UnknownNameError(f"unknown FAE pixel decoder size {pixel_decoder!r}; choose from {sorted(DECODERS)}")
        if image_size % cell:
            raise UserError(f"FAE image size must be a multiple of its cell {cell}, got {image_size}")
        self.config = dict(encoder=encoder, image_size=image_size, latent_channels=latent_channels,
                           num_heads=num_heads, head_dim=head_dim, encoder_act=encoder_act,
                           decoder_depth=decoder_depth, decoder_heads=decoder_heads, mlp_ratio=mlp_ratio,
                           pixel_decoder=pixel_decoder,
                           encoder_weights=None if encoder_weights is None else str(encoder_weights),
                           random_init=random_init, cell=cell, encoder_depth=encoder_depth)
        self.image_size, self.downsample, self.grid = image_size, cell, image_size // cell
        self.feature_encoder: FrozenEncoder = build_feature_encoder(encoder, encoder_weights, random_init, image_size,
                                                                    cell, encoder_depth)
        dim = self.feature_encoder.feature_dim
        self.vae = FeatureVAE(dim, self.grid, latent_channels, num_heads, head_dim, encoder_act, decoder_depth,
                              decoder_heads, mlp_ratio)
        self.pixel_decoder = None if pixel_decoder is None else ViTDecoder(dim, self.grid, **DECODERS[pixel_decoder],
                                                                          patch=cell)

    def decode_pixels(self, features: torch.Tensor) -> torch.Tensor:
        """Features [B, L, D] (real, noisy or reconstructed) -> images [B, 3, S, S] in [-1, 1] (not clamped)."""
        if self.pixel_decoder is None:
            raise UserError("this FAE has no pixel decoder (it was trained through stage=feature only); train "
                            "`python -m tokenizers.train fae stage=pixel` on its run to decode to images")
        return self.pixel_decoder(features)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> feature decoder -> pixel decoder -> images [B, 3, S, S] in [-1, 1]."""
        return self.decode_pixels(self.vae.decode(latents))

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        # The frozen encoder comes from its file or seed again; everything else is trained.
        return {k: v for k, v in self.state_dict().items() if not k.startswith("feature_encoder.")}

    def load_saved_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_keys(self.saved_state_dict(), state, "FAE saved weights")
        self.load_state_dict(state, strict=False)  # strict on what is saved (check_keys); the encoder is not

    @classmethod
    def released_config(cls, variant: str = "") -> dict[str, Any]:
        return dict(random_init=True)  # no release: the paper's sizes; the encoder's weights are not needed for shapes

    @classmethod
    def tiny_config(cls, variant: str, image_size: int) -> dict[str, Any]:
        return dict(encoder="dinov2_b", image_size=image_size, latent_channels=8, num_heads=2, head_dim=32,
                    decoder_depth=1, decoder_heads=4, pixel_decoder="tiny", random_init=True, encoder_depth=1)
