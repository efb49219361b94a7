"""Decoding generated latents: the tokenizer a latent config names, checked against the stores it made."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from core.errors import MismatchError
from latents.config import load_latent_config
from latents.dataset import BatchLoader
from latents.normalize import normalizer_for
from latents.store import check_made_by, open_stores


@functools.lru_cache(maxsize=2)
def cached_tokenizer(spec: str) -> tuple[Any, dict[str, Any]]:
    """`latents.extract.open_tokenizer(spec)`, loaded once per process (decoding and online encoding share it).
    Only the name and config of its provenance are compared with stores, so the weights are not hashed."""
    from tokenizers.base import open_tokenizer

    return open_tokenizer(spec, checksum=False)


def latent_decoder(source: BatchLoader | str | Path | Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from normalised latents (as the loader gives and a generator samples) to images in [-1, 1].

    `source` is a loader from `build_latent_loader` or a latent config. The setup happens here, once: the
    tokenizer it names is loaded and checked against the one that made the stores, the statistics are
    read. The function runs the tokenizer on the latents' device.

    A composite config (`groups`) decodes with its first group's tokenizer and statistics, on that group's
    channels only (SFD decodes the texture latent with the texture statistics); the other groups' tokenizers
    are never loaded. A tokenizer that decodes to features (`decodes_to`, SemVAE) is refused.
    A pixel config (`pixels`) decodes by the identity: its samples are images in [-1, 1] already.
    """
    if isinstance(source, BatchLoader):
        if source.config is None:
            raise ValueError("this loader was not built from a latent config (build_latent_loader), so it names no tokenizer")
        if source.config.get("pixels") is not None:
            return _identity
        cfg, stores, normalizer = source.config, source.stores, source.normalizer
    else:
        cfg = load_latent_config(source)
        if cfg.pixels is not None:
            return _identity
        stores = open_stores(cfg.stores)
        normalizer = normalizer_for(cfg, stores)
    spec, channels, total = str(cfg.tokenizer), None, None
    if cfg.groups is not None:
        first = cfg.groups[0]
        stores = open_stores(first.stores)
        spec, channels, total = str(first.tokenizer), normalizer.channels[0], sum(normalizer.channels)
        normalizer = normalizer.parts[0]
    tok, tok_info = cached_tokenizer(spec)
    if tok.decodes_to != "images":  # SFD's semantic VAE gives DINOv2 features
        raise MismatchError(f"tokenizer {spec} decodes to {tok.decodes_to}, not images"
                            + (f"; the first group of a composite latent config decodes, so it must be the image one "
                               f"(SFD: texture first), not '{cfg.groups[0].name}'" if channels is not None else ""))
    if stores:
        check_made_by(tok_info, spec, stores[0])

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        if total is not None and latents.shape[1] != total:
            raise MismatchError(f"the groups {[g.name for g in cfg.groups]} of this composite latent config join "
                                f"{total} channels; these latents have {latents.shape[1]}")
        tok.to(latents.device)
        return tok.decode(normalizer.denormalize(latents if channels is None else latents[:, :channels]))

    return decode


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def decode_latents(source: BatchLoader | str | Path | Mapping[str, Any], latents: torch.Tensor) -> torch.Tensor:
    """`latent_decoder(source)(latents)`: for one batch; build the decoder once for many."""
    return latent_decoder(source)(latents)
