"""Any diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema) as a baseline tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from core.errors import StateDictMismatch
from tokenizers.base import register
from tokenizers.vavae import KLTokenizer


# The architecture of stabilityai/sd-vae-ft-ema (its config.json): f8, 4 latent channels, attention in the mid block only.
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
)


@register("sdvae")
class SDVAE(KLTokenizer):
    """A diffusers AutoencoderKL; `vae_config` is its diffusers config, so a saved folder is self-contained.

    Its `scaling_factor` / `shift_factor` are ignored: latent normalisation belongs to the latent store.
    """

    releases = {"": ("stabilityai/sd-vae-ft-ema",)}

    def __init__(self, vae_config: dict[str, Any]):
        super().__init__()
        # Keys starting with "_" are diffusers bookkeeping (class name, version, defaults used).
        self.config = {"vae_config": {k: _plain(v) for k, v in vae_config.items() if not k.startswith("_")}}
        self.vae = AutoencoderKL.from_config(self.config["vae_config"])

    @classmethod
    def load_official(cls, path: str | Path, **_: Any) -> "SDVAE":
        """Load a local diffusers AutoencoderKL folder (config.json + weights), refusing missing or unexpected keys."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a diffusers AutoencoderKL folder (no config.json); download one first, e.g. "
                f"`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir {path}`"
            )
        vae, info = AutoencoderKL.from_pretrained(path, output_loading_info=True)
        bad = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
        if bad:
            raise StateDictMismatch(f"{path}: weights do not match the AutoencoderKL config: {bad}")
        with torch.device("meta"):  # the weights come from the folder: skip a random initialisation
            model = cls(dict(vae.config))
        model.vae = vae
        return model.eval()

    @classmethod
    def released_config(cls, variant: str = "") -> dict[str, Any]:
        return {"vae_config": SD_VAE_CONFIG}

    @classmethod
    def tiny_config(cls, variant: str, image_size: int) -> dict[str, Any]:
        return {"vae_config": {**SD_VAE_CONFIG, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1,
                               "norm_num_groups": 8}}


def _plain(value: Any) -> Any:
    """diffusers configs hold tuples; keep config.yaml plain lists."""
    return list(value) if isinstance(value, tuple) else value
