"""Latent configs: what `--latent <name>` selects.

A latent config, `configs/latent/<name>.yaml` (selected by `--latent <name>`):

    stores: [/data/latents/a.zarr, ...]   # local paths or fsspec URLs, rows concatenated in this order
    tokenizer: vavae:/ckpt/vavae.pt       # decodes the latents: saved tokenizer folder or family:official_path
    normalization: store                  # store: (z - mean) / std with the statistics below
                                          #   (z / std where they have no mean); none: latents as stored
    stats: null                           # an RAE statistics file ({'mean': Tensor | None, 'var': Tensor}, as
                                          #   released): replaces the stores' statistics; null: the stores'
    online: null                          # {data: <data config name | YAML path | mapping>, workers: min(4, cores)}: read the
                                          #   images and encode them with `tokenizer` at every step instead of
                                          #   reading stores (latents/online.py); `stores`, if also given, only
                                          #   supply statistics, and one of `stats` or `stores` is required
    multiplier: 1.0                       # x = normalised z * multiplier (LightningDiT's latent_multiplier)
    cache_dir: null                       # null: the loader caches the latents in RAM; a local folder:
                                          #   in a memory-mapped .npy there, shared by the ranks of a node
    generator: lightningdit_xl1           # configs/generator/<name>.yaml trained by default on these latents

A preset (`preset=demo` on the command line) may hold a section `latent: {<name>: {...}}` that is
merged into the latent config of that name, e.g. the demo's store and tokenizer paths.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from core.config import ConfigError, named_config
from core.images import default_workers

LATENT_DEFAULTS = {"stores": None, "tokenizer": None, "normalization": "store", "stats": None, "online": None,
                   "multiplier": 1.0, "cache_dir": None, "generator": "lightningdit_xl1"}
ONLINE_DEFAULTS = {"data": None, "workers": default_workers()}


def _check_keys(cfg: DictConfig, known: Mapping[str, Any], what: str) -> None:
    for key in cfg.keys():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            raise ConfigError(f"unknown {what} key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))


def load_latent_config(name_or_cfg: str | Path | Mapping[str, Any], preset: str | None = None) -> DictConfig:
    """A latent config by name (configs/latent), YAML path, or an already composed mapping; checked.

    `preset`: merge the section `latent.<name>` of configs/preset/<preset>.yaml, if it has one (a
    name or path only; a mapping is taken as already composed).
    """
    if isinstance(name_or_cfg, (str, Path)):
        cfg = named_config("latent", str(name_or_cfg))
        if preset is not None:
            section = OmegaConf.select(named_config("preset", preset), f"latent.{Path(str(name_or_cfg)).stem}")
            if section is not None:
                _check_keys(section, LATENT_DEFAULTS, f"preset/{preset}.yaml latent config")
                cfg = OmegaConf.merge(cfg, section)
    else:
        cfg = OmegaConf.create(OmegaConf.to_container(name_or_cfg, resolve=True) if isinstance(name_or_cfg, DictConfig) else dict(name_or_cfg))
    _check_keys(cfg, LATENT_DEFAULTS, "latent config")
    cfg = OmegaConf.merge(OmegaConf.create(LATENT_DEFAULTS), cfg)
    if isinstance(cfg.stores, str):
        cfg.stores = [cfg.stores]
    if cfg.online is not None:
        _check_keys(cfg.online, ONLINE_DEFAULTS, "latent config 'online'")
        cfg.online = OmegaConf.merge(OmegaConf.create(ONLINE_DEFAULTS), cfg.online)
        if not cfg.online.data:
            raise ConfigError("latent config 'online' needs 'data': a data config name (configs/data), a YAML path "
                              "or a mapping")
    elif not cfg.stores:
        raise ConfigError("a latent config needs 'stores' (latent store paths or URLs) or 'online' (images encoded "
                          "on the fly)")
    if not cfg.tokenizer:
        raise ConfigError("a latent config needs 'tokenizer': the tokenizer that decodes its latents")
    if cfg.normalization not in ("store", "none"):
        raise ConfigError(f"latent config 'normalization' must be 'store' or 'none', got {cfg.normalization!r}")
    if cfg.stats and cfg.normalization == "none":
        raise ConfigError("latent config gives 'stats' but normalization is 'none'; drop one of them")
    if cfg.online is not None and cfg.normalization == "store" and not cfg.stats and not cfg.stores:
        raise ConfigError(
            "an online latent config needs statistics to normalise the latents it encodes: 'stats: <file>' (an RAE "
            "stat.pt such as the released one) or 'stores' whose statistics are used (e.g. a store extracted with "
            "--stats element --no-mean); or set normalization: none")
    return cfg
