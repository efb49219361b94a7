"""Any diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema) as a baseline tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from tokenizers.base import register
from tokenizers.vavae import KLTokenizer


@register("sdvae")
class SDVAE(KLTokenizer):
    """A diffusers AutoencoderKL; `vae_config` is its diffusers config, so a saved folder is self-contained.

    Its `scaling_factor` / `shift_factor` are ignored: latent normalisation belongs to the latent store.
    """

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
            raise KeyError(f"{path}: weights do not match the AutoencoderKL config: {bad}")
        with torch.device("meta"):  # the weights come from the folder: skip a random initialisation
            model = cls(dict(vae.config))
        model.vae = vae
        return model.eval()


def _plain(value: Any) -> Any:
    """diffusers configs hold tuples; keep config.yaml plain lists."""
    return list(value) if isinstance(value, tuple) else value
