"""RAE (Representation Autoencoder, bytetriper/RAE): a frozen pretrained encoder and a trained ViT decoder.

The latent is the encoder's final patch tokens, [B, D, h, w] (768 x 16 x 16 for a ViT-B at 256 px),
after its final LayerNorm with the affine part removed (a plain per-token LN). The encoder is fed
an image resized so that it yields one token per 16 x 16 output patch: DINOv2 (patch 14) sees
224 px for a 256 px image, SigLIP2 and MAE (patch 16) see 256 px. The decoder is an MAE-style ViT
that predicts pixels in the encoder's normalised pixel space; ``decode`` maps them back to [-1, 1]
(no clamping). Parameter names and shapes are the official ``GeneralDecoder``'s, so the released
decoders load strictly (reference/rae_ditdh.md §1).

Latent normalisation is not done here (DESIGN §3): the released per-element statistics load with
``load_official_stats``. The decoder-training noise augmentation is ``noise_augment``; ``encode``
is always deterministic.

RAEv2 (nanovisionx/RAEv2, reference/raev2.md §1-2) is the same tokenizer with a DINOv3 ViT-L/16 at 256 px
(``encoder=dinov3_l_k7`` in configs): ``layers`` picks its layer set (``LAYER_SETS``: k1 is the final block
alone; k7 and k23 average several blocks' final-norm outputs and add the last one's token mean,
``FrozenEncoder.layer_mean``) and its decoder predicts [0, 1] pixels (``pixels="unit"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from core.checkpoint import check_keys, load_torch_weights
from core.errors import UnknownNameError, UserError
from core.positions import sincos_pos_embed_2d
from tokenizers.base import Tokenizer, register
from tokenizers.encoders import ENCODERS, FrozenEncoder, build_encoder

# RAE's encoders by their names in configs (`encoder=dinov2_b`) -> the RAE constructor's encoder keywords
# (`encoder`: a tokenizers.encoders name). The dinov3_l_* ones are RAEv2's (their decoders predict [0, 1] pixels).
RAE_ENCODERS: dict[str, dict[str, str]] = {
    "dinov2_b": dict(encoder="dinov2_b_reg"), "siglip2_b": dict(encoder="siglip2_b"), "mae_b": dict(encoder="mae_b"),
    "dinov3_l_k1": dict(encoder="dinov3_l", layers="k1"),
    "dinov3_l_k7": dict(encoder="dinov3_l", layers="k7"),
    "dinov3_l_k23": dict(encoder="dinov3_l", layers="k23"),
}
# RAEv2's layer sets of the 24-block DINOv3 ViT-L, 0-based block indices (reference/raev2.md §1.1): k1 is the final
# block's tokens alone (no added mean); "k7" is EVERY OTHER block from 11 to 23, not the last 7; k23 all but block 0.
LAYER_SETS: dict[str, tuple[int, ...] | None] = {"k1": None, "k7": tuple(range(11, 24, 2)), "k23": tuple(range(1, 24))}
# What the decoder predicts: RAE's encoder-normalised pixels, or RAEv2's [0, 1] ones.
PIXELS = ("encoder", "unit")
PATCH = 16  # output pixels per latent position, each side
NOISE_TAU = 0.8  # decoder-training noise level of the released decoders (`n08`)
STATS_EPS = 1e-5  # z / sqrt(var + eps) with the released statistics

# The official decoder configs (configs/decoder/ViT*); "tiny" is for tests and CPU demos.
DECODERS: dict[str, dict[str, int]] = {
    "B": dict(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16, mlp_dim=4096),
    # RAEv2's ViTSO (a SigLIP decoder config): the official loader replaces its patch 14 by 16 and its width by the
    # latent's, which leaves XL's shapes.
    "SO": dict(hidden_size=1152, depth=28, num_heads=16, mlp_dim=4096),
    "tiny": dict(hidden_size=64, depth=2, num_heads=4, mlp_dim=128),
}

# RAE runs MAE through Hugging Face's ViTMAE, which differs from timm's: LayerNorm eps 1e-12, and the
# 14x14 position table resized to the token grid with bicubic interpolation without antialiasing.
HF_MAE_ENCODERS = {"mae_b"}
HF_MAE_LN_EPS = 1e-12


# --- encoder --------------------------------------------------------------------------------------

def build_rae_encoder(
    name: str, image_size: int = 256, weights: str | Path | None = None, random_init: bool = False,
    layers: str | None = None, size: dict[str, Any] | None = None,
) -> FrozenEncoder:
    """The frozen encoder as RAE uses it: one token per 16 px of ``image_size``, final LN without affine.

    layers: a name in ``LAYER_SETS`` (RAEv2); k7 and k23 average those blocks' final-norm outputs (the norm without
    affine, as the final one) and add the last one's token mean; None or k1: the final tokens.
    size: timm keywords over the encoder's architecture, random weights only (``tokenizers.encoders.build_encoder``).
    """
    if name not in ENCODERS:
        raise UnknownNameError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    if layers is not None and layers not in LAYER_SETS:
        raise UnknownNameError(f"unknown RAE layer set {layers!r}; choose from {sorted(LAYER_SETS)}")
    if image_size % PATCH:
        raise UserError(f"RAE image size must be a multiple of {PATCH}, got {image_size}")
    grid = image_size // PATCH
    enc = build_encoder(name, weights=weights, random_init=random_init, img_size=grid * ENCODERS[name].patch_size,
                        size=size)
    model = enc.model
    blocks = LAYER_SETS[layers] if layers is not None else None
    if blocks is not None:
        if max(blocks) >= len(model.blocks):
            raise UserError(f"RAE layer set {layers} takes blocks {blocks[0]}..{blocks[-1]}; encoder {name} has "
                            f"{len(model.blocks)} blocks")
        if model.num_prefix_tokens != enc.prefix_tokens:
            raise UserError(f"encoder {name}: timm drops {model.num_prefix_tokens} prefix tokens, its spec "
                            f"{enc.prefix_tokens}")
        enc.layers = blocks
    eps = model.norm.eps
    if name in HF_MAE_ENCODERS:
        eps = HF_MAE_LN_EPS
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
        _resize_pos_embed(model, grid)
    model.norm = nn.LayerNorm(enc.feature_dim, eps=eps, elementwise_affine=False)
    return enc


def _resize_pos_embed(model: nn.Module, grid: int) -> None:
    """Resize a timm ViT's absolute position table to grid x grid once, without antialiasing (as HF does)."""
    old = tuple(model.patch_embed.grid_size)
    if old == (grid, grid):
        return
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    table = resample_abs_pos_embed(model.pos_embed.detach(), [grid, grid], list(old), prefix, antialias=False)
    model.patch_embed.set_input_size(img_size=grid * model.patch_embed.patch_size[0])
    model.pos_embed = nn.Parameter(table, requires_grad=False)


# --- decoder --------------------------------------------------------------------------------------

class _Dense(nn.Module):
    """A Linear nested as `<name>.dense`, as Hugging Face's ViT names them."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (proj(x).view(B, N, self.num_heads, -1).transpose(1, 2) for proj in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attention = _SelfAttention(dim, num_heads)
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class DecoderLayer(nn.Module):
    """Pre-LN ViT block (HF ``ViTMAELayer``): exact GELU, LayerNorm eps 1e-12."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.attention = _Attention(dim, num_heads)
        self.intermediate = _Dense(dim, mlp_dim)
        self.output = _Dense(mlp_dim, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(F.gelu(self.intermediate(self.layernorm_after(x))))


class ViTDecoder(nn.Module):
    """Latent tokens [B, grid², latent_dim] -> pixels [B, 3, p grid, p grid] (p = `patch`, 16 in RAE); RAE's are in
    its encoder's normalised pixel space, FAE's pixel decoder (tokenizers/fae.py) predicts [-1, 1] directly.

    A trainable class token (zero-init) is prepended and dropped at the end; the position table is
    MAE's fixed 2-D sin-cos (column coordinate in the first half) with a zero class row, a frozen
    parameter as in the official checkpoints. Linears and norms keep PyTorch's default init, as the
    official decoder (a plain nn.Module) does.
    """

    def __init__(self, latent_dim: int, grid: int, hidden_size: int, depth: int, num_heads: int, mlp_dim: int,
                 patch: int = PATCH):
        super().__init__()
        self.grid, self.patch = grid, patch
        self.decoder_embed = nn.Linear(latent_dim, hidden_size)
        table = torch.cat([torch.zeros(1, hidden_size, dtype=torch.float64), sincos_pos_embed_2d(hidden_size, grid)])
        self.decoder_pos_embed = nn.Parameter(table.float()[None], requires_grad=False)
        self.decoder_layers = nn.ModuleList(DecoderLayer(hidden_size, num_heads, mlp_dim) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.decoder_pred = nn.Linear(hidden_size, patch * patch * 3)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(tokens)
        x = torch.cat([self.trainable_cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.decoder_pos_embed
        for layer in self.decoder_layers:
            x = layer(x)
        patches = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return unpatchify(patches, self.grid, self.patch)


def unpatchify(patches: torch.Tensor, grid: int, patch: int = PATCH) -> torch.Tensor:
    """[B, grid², p·p·3] -> [B, 3, p grid, p grid]; within a patch: row, column, channel (fastest)."""
    b = patches.shape[0]
    x = patches.reshape(b, grid, grid, patch, patch, 3)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, grid * patch, grid * patch)


# --- tokenizer ------------------------------------------------------------------------------------

@register("rae")
class RAE(Tokenizer):
    """A frozen encoder (a name in ``tokenizers.encoders.ENCODERS``; the released models use
    ``dinov2_b_reg``, ``siglip2_b``, ``mae_b``, and RAEv2's ``dinov3_l`` with ``layers`` k1, k7 or k23) and a ViT
    decoder (``DECODERS``: B, L, XL, SO, tiny).

    ``layers``: RAEv2's layer set (``LAYER_SETS``), None for RAE's final tokens. ``pixels``: what the decoder
    predicts, "encoder" (RAE: the encoder's normalised pixels) or "unit" (RAEv2: [0, 1]); by default "unit" when
    a layer set is named, else "encoder". ``decode`` returns [-1, 1] either way.
    ``random_init=True`` gives the encoder random weights (tests, demos); its weights are then
    saved with the decoder, whereas a pretrained encoder comes from its spec and is not saved.
    ``encoder_size``: timm keywords over the encoder's architecture, with ``random_init`` only, e.g.
    ``{"embed_dim": 64, "num_heads": 2}`` for a narrow DINOv3-L that keeps its 24 blocks (CPU demos); the latents
    are then that wide. Kept in ``config``, so a saved folder rebuilds the same architecture.
    """

    downsample = PATCH
    # The released decoders (reference/rae_ditdh.md §1.4), by the encoder names of configs (tokenizers.rae_train).
    releases = {"dinov2_b": ("decoders/dinov2/wReg_base/ViTXL_n08",),
                "siglip2_b": ("decoders/siglip2/base_p16_i256/ViTXL_n08",), "mae_b": ("decoders/mae/base_p16/ViTXL_n08",),
                # RAEv2 (nyu-visionx/RAEv2-models): stage1/{imagenet,general}/dinov3l-k*/decoder.pt, with stats.pt
                **{f"dinov3_l_{k}": (f"stage1/imagenet/dinov3l-{k}", f"stage1/general/dinov3l-{k}") for k in ("k1", "k7", "k23")}}
    # Rows of the tokenizer x generator matrix: RAE's three encoders and RAEv2's k7 (whose test encoder keeps its 24
    # blocks, narrow: tests/test_matrix.py); k1 and k23 differ from k7 only by the blocks read.
    matrix_variants = ("dinov2_b", "siglip2_b", "mae_b", "dinov3_l_k7")

    def __init__(
        self,
        encoder: str = "dinov2_b_reg",
        decoder: str = "XL",
        image_size: int = 256,
        encoder_weights: str | None = None,
        random_init: bool = False,
        layers: str | None = None,
        pixels: str | None = None,
        encoder_size: dict[str, Any] | None = None,
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise UnknownNameError(f"unknown RAE decoder size {decoder!r}; choose from {sorted(DECODERS)}")
        pixels = pixels or ("encoder" if layers is None else "unit")
        if pixels not in PIXELS:
            raise UnknownNameError(f"unknown RAE decoder pixels {pixels!r}; choose from {PIXELS}")
        self.config = dict(
            encoder=encoder,
            decoder=decoder,
            image_size=image_size,
            encoder_weights=None if encoder_weights is None else str(encoder_weights),
            random_init=random_init,
            layers=layers,
            pixels=pixels,
            encoder_size=None if encoder_size is None else dict(encoder_size),
        )
        self.image_size = image_size
        self.grid = image_size // PATCH
        self.pixels = pixels
        self.encoder = build_rae_encoder(encoder, image_size, encoder_weights, random_init, layers, encoder_size)
        self.decoder = ViTDecoder(self.encoder.feature_dim, self.grid, **DECODERS[decoder])

    @property
    def latent_channels(self) -> int:
        return self.encoder.feature_dim

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] (S = ``image_size``) -> latents [B, D, S/16, S/16], row-major tokens.

        The encoder is frozen, so no gradient flows. RAE has no posterior: ``sample=True`` is refused
        (the decoder-training noise is ``noise_augment``).
        """
        if sample:
            raise ValueError("RAE has no posterior to sample; its training noise is tokenizers.rae.noise_augment")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"RAE expects images [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
        tokens = self.encoder(images)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.grid, self.grid)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, D, h, w] -> images [B, 3, 16 h, 16 w] in [-1, 1] (not clamped); RAEv2's decoders predict
        [0, 1] pixels (mapped by 2 x - 1), RAE's the encoder's normalised ones."""
        expected = (self.latent_channels, self.grid, self.grid)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"RAE expects latents [B, {', '.join(map(str, expected))}], got {tuple(latents.shape)}")
        pixels = self.decoder(latents.flatten(2).transpose(1, 2))
        if self.pixels == "unit":
            return pixels * 2 - 1
        return (pixels * self.encoder.std + self.encoder.mean) * 2 - 1

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        if self.config["random_init"]:
            return state
        return {k: v for k, v in state.items() if k.startswith("decoder.")}

    def load_saved_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_keys(self.saved_state_dict(), state, "RAE saved weights")
        if self.config["random_init"]:
            self.load_state_dict(state, strict=True)
        else:
            self.decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in state.items()}, strict=True)

    def load_official_decoder(self, state: dict[str, torch.Tensor], what: str = "RAE official decoder") -> None:
        """Load a released decoder state dict (``decoder_*`` names) strictly."""
        check_keys(self.decoder.state_dict(), state, what)
        self.decoder.load_state_dict(state, strict=True)

    @classmethod
    def load_official(cls, path: str | Path, encoder: str | None = None, **config: Any) -> "RAE":
        """A released decoder ``model.pt`` (e.g. ``decoders/dinov2/wReg_base/ViTXL_n08/model.pt``; RAEv2's
        ``stage1/imagenet/dinov3l-k7/decoder.pt`` with ``encoder="dinov3_l", layers="k7"``) with the encoder it was
        trained with; ``config`` as the constructor's (default: XL decoder, 256 px).

        ``encoder`` is required: every 768-wide encoder's decoder has the same shapes, so a decoder paired
        with the wrong encoder would load strictly and decode garbage.
        """
        if encoder is None:
            raise UserError(f"RAE.load_official({str(path)!r}) needs the encoder its decoder was trained with: "
                             f"one of {sorted(ENCODERS)} (the releases use dinov2_b_reg, siglip2_b, mae_b); "
                             f"on the command line: --tokenizer rae:{path},encoder=dinov2_b_reg")
        model = cls(encoder=encoder, **config)
        model.load_official_decoder(load_torch_weights(path), what=f"RAE official decoder {path}")
        return model.eval()

    @classmethod
    def variants(cls) -> tuple[str, ...]:
        return cls.matrix_variants

    @classmethod
    def released_config(cls, variant: str = "") -> dict[str, Any]:
        # random_init: the released encoder's weights are not needed for its shapes.
        return dict(**RAE_ENCODERS[variant], random_init=True)

    @classmethod
    def tiny_config(cls, variant: str, image_size: int) -> dict[str, Any]:
        return dict(**RAE_ENCODERS[variant], decoder="tiny", image_size=image_size, random_init=True)


def noise_augment(
    latents: torch.Tensor, tau: float = NOISE_TAU, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """RAE's decoder-training noise: z + sigma N(0, I) with sigma = tau U(0, 1), one sigma per sample.

    Applied to the raw (un-normalised) latents of ``encode`` in the generator step only; the
    discriminator sees reconstructions of clean latents. The official code draws sigma uniformly,
    the paper describes |N(0, tau²)|. ``generators``: one CPU generator per sample (its sigma, then its
    noise), so a sample's noise does not depend on the batch it is in; without them the global RNG.
    """
    b = latents.shape[0]
    if generators is None:
        sigma = tau * torch.rand(b, device=latents.device)
        noise = torch.randn(latents.shape, device=latents.device)
    else:
        sigma = tau * torch.cat([torch.rand(1, generator=g) for g in generators])
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    return latents + (sigma.view(b, *([1] * (latents.ndim - 1))) * noise).to(latents)


def load_official_stats(path: str | Path) -> tuple[np.ndarray | None, np.ndarray]:
    """(mean or None, std) float32 from a released ``stat.pt`` (``{'mean': Tensor | None, 'var': Tensor}``).

    std = sqrt(var + 1e-5), so ``(z - mean) / std`` (``z / std`` when mean is None, as in the
    DINOv2-B release, which has no mean) is the official normalisation; the statistics are per
    element ([C, h, w]). The released DiTs were trained on exactly these, not on recomputed ones.
    """
    state = load_torch_weights(path)
    if not isinstance(state, dict) or not isinstance(state.get("var"), torch.Tensor):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is not an RAE statistics file ({{'mean': Tensor or None, 'var': Tensor}}); got {keys}")
    var = state["var"].float()
    mean = state.get("mean")
    if mean is not None and tuple(mean.shape) != tuple(var.shape):
        raise UserError(f"{path}: mean {tuple(mean.shape)} and var {tuple(var.shape)} differ in shape")
    std = torch.sqrt(var + STATS_EPS)
    return (None if mean is None else mean.float().numpy()), std.numpy()
