"""GAN discriminators of autoencoder training and the augmentation their inputs get.

`NLayerDiscriminator`: the PatchGAN of taming/LDM (parameter names as `loss.discriminator.*`), used by VA-VAE.
`DinoDiscriminator` + `diff_augment`: RAE's discriminator, a frozen DINO ViT-S/8 with trainable heads
(after StyleGAN-T), and the DiffAug it sees every input through (reference/rae_ditdh.md §1.5).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from tokenizers.encoders import build_encoder


class NLayerDiscriminator(nn.Module):
    """Pix2Pix PatchGAN as taming builds it: 4x4 convs, BatchNorm, LeakyReLU(0.2); logits per patch [B, 1, h, w].

    `layers` stride-2 convs (the first without norm), then one stride-1 conv with norm and the 1-channel
    output conv. Widths double from `channels` up to 8x. Needs images of at least 2**(layers+2) px.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            # No conv bias before BatchNorm (its shift replaces it).
            seq += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        self.apply(weights_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def weights_init(m: nn.Module) -> None:
    """taming's init: conv weights N(0, 0.02) (biases keep torch's default), BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# --- RAE: frozen DINO ViT-S/8 with trainable heads ------------------------------------------------------

DINO_KEY_BLOCKS = (2, 5, 8, 11)  # blocks whose patch tokens feed a head (the official "S_8" recipe)


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


def _sn_conv(c_in: int, c_out: int, kernel_size: int) -> nn.Conv1d:
    # One power iteration per forward in train mode, none in eval mode (the official SpectralNorm's settings).
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12)


def _head_block(dim: int, kernel_size: int) -> nn.Sequential:
    # The official BatchNormLocal with a virtual batch of 1 normalises each sample's channels over its
    # tokens (biased variance, eps 1e-6, affine): exactly an affine InstanceNorm1d.
    return nn.Sequential(_sn_conv(dim, dim, kernel_size), nn.InstanceNorm1d(dim, eps=1e-6, affine=True), nn.LeakyReLU(0.2))


def _head(dim: int, kernel_size: int) -> nn.Sequential:
    """Tokens [B, dim, N] -> one logit per token [B, 1, N]."""
    return nn.Sequential(
        _head_block(dim, 1), _Residual(_head_block(dim, kernel_size)), spectral_norm(nn.Conv1d(dim, 1, 1), eps=1e-12)
    )


class DinoDiscriminator(nn.Module):
    """Images in [-1, 1] -> logits [B, 5 N] (N = tokens per feature map), RAE's "DINO-S/8" discriminator.

    The image is bilinearly resized to `image_size` (224 officially: 28 x 28 = 784 tokens) and
    ImageNet-normalised for a frozen DINO ViT-S/8 (always in eval mode); the patch tokens of the final
    block and of blocks 2, 5, 8, 11 (the final block is block 11: its tokens feed two heads, as in the
    official code) each go through a trainable head of spectral-normalised 1-D convs. Only the heads
    train. `weights`: a DINO ViT-S/8 file (the official `dino_vit_small_patch8_224.pth`, or timm's);
    without it the Hugging Face cache (`timm/vit_small_patch8_224.dino`); `random_init` for tests and demos.
    """

    def __init__(
        self, weights: str | Path | None = None, random_init: bool = False, image_size: int = 224, kernel_size: int = 9
    ):
        super().__init__()
        self.backbone = build_encoder(
            "dino_s8", weights=weights, random_init=random_init, img_size=image_size, resize_mode="bilinear"
        )
        blocks = self.backbone.model.blocks
        if len(blocks) != DINO_KEY_BLOCKS[-1] + 1:
            raise ValueError(f"the DINO backbone has {len(blocks)} blocks; the heads expect {DINO_KEY_BLOCKS[-1] + 1}")
        with torch.no_grad():
            for block in blocks:
                # The official loader zeroes the key bias (it adds the same value to every logit of a query,
                # so attention does not change).
                bias = block.attn.qkv.bias
                bias[bias.numel() // 3 : 2 * bias.numel() // 3] = 0
        dim = self.backbone.feature_dim
        self.heads = nn.ModuleList(_head(dim, kernel_size) for _ in range(len(DINO_KEY_BLOCKS) + 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.model.forward_intermediates(
            self.backbone.pixels(images), indices=list(DINO_KEY_BLOCKS), norm=False, output_fmt="NLC",
            intermediates_only=True,
        )
        feats = [feats[-1], *feats]  # the final block's output (no final norm) first, as the official
        return torch.cat([head(f.transpose(1, 2)).flatten(1) for head, f in zip(self.heads, feats)], dim=1)


def diff_augment(
    images: torch.Tensor, generators: list[torch.Generator] | None = None, shift: float = 0.125
) -> torch.Tensor:
    """DiffAug as RAE uses it (StyleGAN-T's, no cutout), differentiable, with per-image random draws.

    Translation by whole pixels, up to `shift` of the side each way, zero fill; then colour: brightness
    + U(-0.5, 0.5), saturation x U(0, 2) about the channel mean, contrast x U(0.5, 1.5) about the image
    mean. Image i's five draws come from `generators[i]` (CPU generators, so a step's augmentation is
    reproducible and the same however the batch is split over processes); without them the global RNG.
    """
    b, _, h, w = images.shape
    u = torch.rand(5, b) if generators is None else torch.stack([torch.rand(5, generator=g) for g in generators], dim=1)
    dy, dx = round(h * shift), round(w * shift)
    ty = (u[0] * (2 * dy + 1)).floor().long() - dy
    tx = (u[1] * (2 * dx + 1)).floor().long() - dx
    # Output pixel (y, x) reads input (y + ty, x + tx); outside the image it reads the zero border of the padding.
    rows = (torch.arange(h)[None] + ty[:, None] + 1).clamp(0, h + 1).to(images.device)  # [b, h]
    cols = (torch.arange(w)[None] + tx[:, None] + 1).clamp(0, w + 1).to(images.device)  # [b, w]
    x = F.pad(images.float(), [1, 1, 1, 1])
    x = x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
    x = x.gather(3, cols[:, None, None, :].expand(-1, x.shape[1], h, -1))

    brightness, saturation, contrast = (v.view(b, 1, 1, 1).to(images.device) for v in (u[2] - 0.5, u[3] * 2, u[4] + 0.5))
    x = x + brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * saturation + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast + mean
