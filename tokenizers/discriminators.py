"""The PatchGAN discriminator of taming/LDM autoencoder training (parameter names as `loss.discriminator.*`)."""
from __future__ import annotations

import torch
from torch import nn


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
