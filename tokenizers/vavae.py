"""VA-VAE (LightningDiT's f16d32 tokenizer) as a diffusers AutoencoderKL, and its official-checkpoint loader.

The official model is the LDM "KL" autoencoder with attention at the lowest-resolution level
(reference/lightningdit_vavae.md §1). diffusers represents it exactly with Attn* blocks at that
level; `ldm_to_diffusers` maps the official parameter names onto diffusers' ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from core.checkpoint import check_keys, load_torch_weights
from core.log import get_logger
from tokenizers.base import Tokenizer, register

log = get_logger(__name__)

AE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def sample_posterior(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * noise (reparameterised, so gradients reach mean and logvar)."""
    # Noise is drawn on the generator's device (the official code uses the CPU RNG), then moved.
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


class KLTokenizer(Tokenizer):
    """A diffusers AutoencoderKL (`self.vae`) as a tokenizer: images in [-1, 1] <-> posterior latents.

    No scaling factor is applied: latent normalisation belongs to the latent store.
    """

    vae: AutoencoderKL

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | images), the log-variance clamped to [-30, 20] as in LDM."""
        dist = self.vae.encode(images).latent_dist
        return dist.mean, dist.logvar

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        mean, logvar = self.posterior(images)
        return sample_posterior(mean, logvar, generator) if sample else mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


@register("vavae")
class VAVAE(KLTokenizer):
    """VA-VAE; the defaults are the official f16d32 model (69,836,067 parameters)."""

    releases = {"": ("vavae-imagenet256-f16d32-dinov2",)}

    def __init__(
        self,
        block_out_channels: tuple[int, ...] | list[int] = (128, 128, 256, 256, 512),
        layers_per_block: int = 2,
        latent_channels: int = 32,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        levels = len(block_out_channels)
        self.config = dict(
            block_out_channels=list(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
        )
        # Attention follows every resblock of the lowest-resolution level, as in the official model
        # (its attn_resolutions=(16,) at the nominal 256 px always selects the last level).
        self.vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
            up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            act_fn="silu",
        )

    def load_ldm_state_dict(self, state_dict: dict[str, torch.Tensor], what: str = "VA-VAE checkpoint") -> None:
        """Load official (LDM-named) weights strictly; keys outside the autoencoder are ignored."""
        ae = {k: v for k, v in state_dict.items() if k.startswith(AE_PREFIXES)}
        ignored = sorted({k.split(".")[0] for k in state_dict if not k.startswith(AE_PREFIXES)})
        if ignored:
            log.info("%s: ignoring %d non-autoencoder keys (prefixes %s)", what, len(state_dict) - len(ae), ignored)
        check_keys(diffusers_to_ldm(self.vae.state_dict()), ae, what)
        self.vae.load_state_dict(ldm_to_diffusers(ae), strict=True)

    @classmethod
    def load_official(cls, path: str | Path, **config: Any) -> "VAVAE":
        """Load the official release (`vavae-imagenet256-f16d32-dinov2.pt`, LDM names, maybe under 'state_dict')."""
        state = load_torch_weights(path)
        if isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        model = cls(**config)
        model.load_ldm_state_dict(state, what=f"VA-VAE official checkpoint {path}")
        return model.eval()

    @classmethod
    def released_config(cls, variant: str = "") -> dict[str, Any]:
        return {}

    @classmethod
    def tiny_config(cls, variant: str, image_size: int) -> dict[str, Any]:
        # Five levels as the official model (f16), so the latent grid is that of the release.
        return dict(block_out_channels=[8, 8, 16, 16, 16], layers_per_block=1, latent_channels=8, norm_num_groups=8)


# --- LDM <-> diffusers parameter names -------------------------------------------------------------
# Attention inside an attention block: LDM 1x1 convs, diffusers linears.
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}
_SIMPLE = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out")]
_MID = [("mid.block_1", "mid_block.resnets.0"), ("mid.block_2", "mid_block.resnets.1"), ("mid.attn_1", "mid_block.attentions.0")]


def _levels(names: list[str], pattern: str) -> int:
    return 1 + max(int(m.group(1)) for n in names if (m := re.match(pattern, n)))


def _is_attn_conv(diffusers_name: str) -> bool:
    return re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_name) is not None


def ldm_name_to_diffusers(name: str, levels: int) -> str:
    """One official (LDM) parameter name -> its diffusers AutoencoderKL name; `levels` = len(ch_mult)."""
    for ldm, diff in _MID:
        name = name.replace(f".{ldm}.", f".{diff}.")
    name = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", name)
    name = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", name)
    name = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", name)
    # LDM numbers decoder levels by resolution (up.0 is the finest), diffusers by execution order.
    kind = {"block": "resnets", "attn": "attentions", "upsample": "upsamplers.0"}
    name = re.sub(
        r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.",
        lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.{kind[m.group(2)]}.",
        name,
    )
    name = re.sub(
        r"(attentions\.\d+\.)(norm|q|k|v|proj_out)\.", lambda m: m.group(1) + _ATTN_LDM_TO_DIFFUSERS[m.group(2)] + ".", name
    )
    for ldm, diff in _SIMPLE:
        name = name.replace(f".{ldm}.", f".{diff}.")
    return name


def diffusers_name_to_ldm(name: str, levels: int) -> str:
    """Inverse of `ldm_name_to_diffusers`."""
    for ldm, diff in _SIMPLE:
        name = name.replace(f".{diff}.", f".{ldm}.")
    name = re.sub(
        r"(attentions\.\d+\.)(group_norm|to_q|to_k|to_v|to_out\.0)\.",
        lambda m: m.group(1) + _ATTN_DIFFUSERS_TO_LDM[m.group(2)] + ".",
        name,
    )
    kind = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}
    name = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.",
        lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.{kind[m.group(2)]}.",
        name,
    )
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    for ldm, diff in _MID:
        name = name.replace(f".{diff}.", f".{ldm}.")
    return name


def ldm_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official VA-VAE (LDM) autoencoder weights -> diffusers AutoencoderKL weights (pure; no I/O)."""
    levels = _levels(list(state_dict), r"^decoder\.up\.(\d+)\.")
    out = {}
    for name, tensor in state_dict.items():
        new = ldm_name_to_diffusers(name, levels)
        out[new] = tensor[:, :, 0, 0] if _is_attn_conv(new) else tensor
    return out


def diffusers_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL weights -> official VA-VAE (LDM) layout, e.g. to export or to test the loader."""
    levels = _levels(list(state_dict), r"^decoder\.up_blocks\.(\d+)\.")
    out = {}
    for name, tensor in state_dict.items():
        out[diffusers_name_to_ldm(name, levels)] = tensor[:, :, None, None] if _is_attn_conv(name) else tensor
    return out
