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
    multiplier: 1.0                       # x = normalised z * multiplier (LightningDiT's latent_multiplier);
                                          #   normalization: none with multiplier: 0.18215 is SD-VAE's x = 0.18215 z
    posterior: stored                     # stored: the stores' latents as they are (a moments store's means);
                                          #   sample: a fresh posterior sample mean + exp(logvar / 2) * eps at every
                                          #   load, from moments stores (latents.extract --store-moments), eps seeded
                                          #   by (seed, step, position in the global batch) (latents/dataset.py);
                                          #   normalization: store then uses the statistics of the samples
    flips: true                           # true: each sample is the plain or the mirrored view at random (seeded by
                                          #   (seed, step)); false: always the plain image, no flip augmentation (DDT)
    cache_dir: null                       # null: the loader caches the latents in RAM; a local folder:
                                          #   in a memory-mapped .npy there, shared by the ranks of a node
    generator: lightningdit_xl1           # configs/generator/<name>.yaml trained by default on these latents

A preset (`preset=demo` on the command line) may hold a section `latent: {<name>: {...}}` that is
merged into the latent config of that name, e.g. the demo's store and tokenizer paths.

A *composite* latent config joins the latents of several stores along channels (SFD's [texture 32 | semantic 16],
configs/latent/sfd.yaml):

    groups:                               # joined in this order: channels 0..C1-1 are the first group's, ...
      - name: texture                     # an inline group: stores, tokenizer, normalization, stats, multiplier
        stores: [/data/latents/tex.zarr]  #   as above, for this group's channels only
        tokenizer: vavae:/ckpt/ldm-imagenet256-f16d32-50ep.ckpt
        stats: /ckpt/latents_stats.pt     #   its own statistics (null: its stores')
      - name: semantic
        stores: [/data/latents/sem.zarr]
        tokenizer: semvae:/ckpt/semantic_ae_final.pt
        stats: /ckpt/latents_sv_stats.pt
      - vavae                             # or a configs/latent name (or YAML path); the group is then named so
    cache_dir: null                       # as above, for every group's cache
    flips: true                           # as above; one view index picks the view of every group
    generator: lightningdit_xl1           # as above

Only `groups`, `cache_dir`, `flips` and `generator` are given at the top of a composite config. Every group is a
store config (online groups are not supported) normalised as it would be alone, by its own statistics and
multiplier, and sampled from its moments where its `posterior` is `sample` (each group with its own noise); a
named config's own cache_dir and generator are not used, and its `flips` must equal the composite's. The stores
of the groups must hold the same images in the same row order (extract them from one `--data` with one `--seed`;
latents.dataset.latent_info checks it), and group i's k-th store is joined with every other group's k-th store.
The first group's tokenizer decodes: with the first group's statistics, on its channels only (SFD decodes the
texture latent); the other groups' tokenizers are never loaded (SFD's semantic VAE decodes to features, not
images).

A *pixel* config trains a tokenizer-free generator (JiT, WiT) on the images themselves (latents/pixels.py):

    pixels:
      data: imagenet                      # a data config name (configs/data), YAML path or mapping: ADM centre crops
                                          #   in [-1, 1] at its image_size, decoded by `workers` processes; may be
                                          #   null when `store` is given (the store knows its images)
      store: null                         # an image store (python -m latents.extract --pixels): pre-cropped uint8
                                          #   rows instead of JPEG decoding; with `data` too, both must be one data set
      workers: 4                          # decoding (or store-reading) processes per rank; default min(4, cores)
    flips: true                           # as above
    generator: jit_b16                    # as above; the default of a pixel config

Only `pixels`, `flips` and `generator` are given in a pixel config: no tokenizer, statistics or stores (the images
are the samples; latents/decode.py decodes by the identity). The spec `pixels:<data config name or YAML path>` is
accepted wherever a latent config name is (`load_latent_config("pixels:imagenet")`, `--pixels imagenet`); with a
preset, its section `latent.pixels` is merged into it, as `latent.<name>` into a named config (a demo preset
points `pixels.data` or `pixels.store` there).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from core.config import ConfigError, named_config
from core.images import default_workers

LATENT_DEFAULTS = {"stores": None, "tokenizer": None, "normalization": "store", "stats": None, "online": None,
                   "multiplier": 1.0, "posterior": "stored", "flips": True, "cache_dir": None,
                   "generator": "lightningdit_xl1", "groups": None, "pixels": None}
COMPOSITE_KEYS = ("groups", "cache_dir", "flips", "generator")  # the top of a composite config
GROUP_KEYS = ("name", "stores", "tokenizer", "normalization", "stats", "multiplier", "posterior")  # the keys of a group
POSTERIOR_MODES = ("stored", "sample")
ONLINE_DEFAULTS = {"data": None, "workers": default_workers()}
PIXEL_KEYS = ("pixels", "flips", "generator")  # all that a pixel config takes
PIXEL_DEFAULTS = {"data": None, "store": None, "workers": default_workers()}
PIXEL_GENERATOR = "jit_b16"  # a pixel config's default generator
PIXELS_SPEC = "pixels:"  # `pixels:<data config>`: a pixel config by its data


def _check_keys(cfg: DictConfig, known: Mapping[str, Any], what: str) -> None:
    for key in cfg.keys():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            raise ConfigError(f"unknown {what} key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))


def load_latent_config(name_or_cfg: str | Path | Mapping[str, Any], preset: str | None = None) -> DictConfig:
    """A latent config by name (configs/latent), YAML path, or an already composed mapping; checked.

    `preset`: merge the section `latent.<name>` of configs/preset/<preset>.yaml, if it has one (a
    name or path only; a mapping is taken as already composed). `pixels:<data config>` is a pixel config of that data
    (module docstring), whose preset section is `latent.pixels`.
    """
    if isinstance(name_or_cfg, (str, Path)):
        name = str(name_or_cfg)
        cfg = pixels_spec(name) if name.startswith(PIXELS_SPEC) else named_config("latent", name)
        if preset is not None:
            key = "pixels" if name.startswith(PIXELS_SPEC) else Path(name).stem
            section = OmegaConf.select(named_config("preset", preset), f"latent.{key}")
            if section is not None:
                _check_keys(section, LATENT_DEFAULTS, f"preset/{preset}.yaml latent config")
                cfg = OmegaConf.merge(cfg, section)
    else:
        cfg = OmegaConf.create(OmegaConf.to_container(name_or_cfg, resolve=True) if isinstance(name_or_cfg, DictConfig) else dict(name_or_cfg))
    _check_keys(cfg, LATENT_DEFAULTS, "latent config")
    if cfg.get("pixels") is not None and "generator" not in cfg:
        cfg.generator = PIXEL_GENERATOR
    cfg = OmegaConf.merge(OmegaConf.create(LATENT_DEFAULTS), cfg)
    if not isinstance(cfg.flips, bool):
        raise ConfigError(f"latent config 'flips' must be true or false, got {cfg.flips!r}")
    if cfg.pixels is not None:
        return _pixels(cfg)
    if cfg.groups is not None:
        return _composite(cfg, preset)
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
    if cfg.posterior not in POSTERIOR_MODES:
        close = difflib.get_close_matches(str(cfg.posterior), POSTERIOR_MODES, n=1)
        raise ConfigError(f"latent config 'posterior' must be one of {', '.join(POSTERIOR_MODES)}, got {cfg.posterior!r}"
                          + (f"; did you mean '{close[0]}'?" if close else ""))
    if cfg.posterior == "sample" and cfg.online is not None:
        raise ConfigError("latent config 'posterior: sample' draws from the posterior moments of stores (latents.extract "
                          "--store-moments); an online source encodes the posterior mean, so drop one of them")
    if cfg.online is not None and cfg.normalization == "store" and not cfg.stats and not cfg.stores:
        raise ConfigError(
            "an online latent config needs statistics to normalise the latents it encodes: 'stats: <file>' (an RAE "
            "stat.pt such as the released one) or 'stores' whose statistics are used (e.g. a store extracted with "
            "--stats element --no-mean); or set normalization: none")
    return cfg


def pixels_spec(spec: str) -> DictConfig:
    """The pixel config of `pixels:<data config name or YAML path>` (not yet checked)."""
    data = spec[len(PIXELS_SPEC):]
    if not data:
        raise ConfigError(f"latent spec {spec!r} names no data: write pixels:<data config name or YAML path>, e.g. "
                          "pixels:imagenet")
    return OmegaConf.create({"pixels": {"data": data}})


def _pixels(cfg: DictConfig) -> DictConfig:
    """A pixel config with its `pixels` section completed and checked (module docstring)."""
    # Compared with the defaults rather than by presence: an already composed config holds every key.
    stray = [k for k in LATENT_DEFAULTS if k not in PIXEL_KEYS and cfg[k] != LATENT_DEFAULTS[k]]
    if stray:
        why = {"tokenizer": "the images are the samples, so nothing decodes them",
               "stores": "an image store goes in 'pixels.store'", "online": "there is nothing to encode",
               "groups": "pixels are not joined with latents",
               "cache_dir": "images are read by workers, not cached"}.get(stray[0], "images in [-1, 1] are not normalised")
        raise ConfigError(f"a pixel latent config (pixels) takes only {', '.join(PIXEL_KEYS)}; '{stray[0]}' does not "
                          f"apply ({why})")
    if not isinstance(cfg.pixels, DictConfig):
        raise ConfigError(f"latent config 'pixels' must be a mapping {{data, store, workers}}, got {cfg.pixels!r}")
    _check_keys(cfg.pixels, PIXEL_DEFAULTS, "latent config 'pixels'")
    pixels = OmegaConf.merge(OmegaConf.create(PIXEL_DEFAULTS), cfg.pixels)
    if not pixels.data and not pixels.store:
        raise ConfigError("latent config 'pixels' needs 'data' (a data config name, YAML path or mapping) or 'store' "
                          "(an image store from python -m latents.extract --pixels)")
    if isinstance(pixels.data, str):
        named_config("data", pixels.data)  # an unknown name fails here, naming the available ones
    if not isinstance(pixels.workers, int) or isinstance(pixels.workers, bool) or pixels.workers < 0:
        raise ConfigError(f"latent config 'pixels.workers' must be a whole number >= 0, got {pixels.workers!r}")
    return OmegaConf.merge(OmegaConf.create(LATENT_DEFAULTS),
                           {"pixels": pixels, "flips": cfg.flips, "generator": cfg.generator})


def _composite(cfg: DictConfig, preset: str | None) -> DictConfig:
    """A composite config with every group loaded and checked as a latent config of its own (module docstring)."""
    # Compared with the defaults rather than by presence: an already composed config holds every key.
    stray = [k for k in LATENT_DEFAULTS if k not in COMPOSITE_KEYS and cfg[k] != LATENT_DEFAULTS[k]]
    if stray:
        raise ConfigError(f"a composite latent config (groups) takes only {', '.join(COMPOSITE_KEYS)} at its top; "
                          f"'{stray[0]}' belongs to a group")
    if not isinstance(cfg.groups, ListConfig) or not cfg.groups:
        raise ConfigError("latent config 'groups' must be a non-empty list of latent configs (configs/latent names "
                          "or mappings with stores, tokenizer, ...), joined along channels in that order")
    groups = []
    for i, group in enumerate(cfg.groups):
        try:
            groups.append(_group(group, i, preset, cfg.flips))
        except ConfigError as e:  # say which group; the message is the group's own
            raise ConfigError(f"latent config group {i}{f' ({group})' if isinstance(group, str) else ''}: {e}") from e
    names = [g.name for g in groups]
    if len(set(names)) < len(names):
        raise ConfigError(f"latent config groups need distinct names, got {names}")
    return OmegaConf.merge(OmegaConf.create(LATENT_DEFAULTS),
                           {"groups": groups, "cache_dir": cfg.cache_dir, "flips": cfg.flips, "generator": cfg.generator})


def _group(group: Any, i: int, preset: str | None, flips: bool = True) -> DictConfig:
    """Group `i`: a configs/latent name (or YAML path), or a mapping of GROUP_KEYS; only its GROUP_KEYS are kept.
    `flips`: the composite's, which a named config's own must equal (one view index picks every group's view)."""
    if isinstance(group, str):
        name, loaded = Path(group).stem, load_latent_config(group, preset)
        if loaded.groups is not None:
            raise ConfigError("it is itself composite; list its groups instead")
        if loaded.online is not None or loaded.pixels is not None:
            raise ConfigError(f"it {'encodes online' if loaded.online is not None else 'gives pixels'}, but the groups "
                              "of a composite config must be stores (online and pixel groups are not supported)")
        if loaded.flips != flips:
            raise ConfigError(f"it sets flips: {str(loaded.flips).lower()}, the composite config flips: "
                              f"{str(flips).lower()}; one view index picks the view of every group, so set 'flips' "
                              "at the top of the composite config")
    elif isinstance(group, DictConfig):
        for key, why in (("online", "must be stores (online groups are not supported)"),
                         ("pixels", "must be stores (pixel groups are not supported)"),
                         ("groups", "cannot be composite themselves"),
                         ("cache_dir", "take the composite config's 'cache_dir'"),
                         ("flips", "take the composite config's 'flips'"),
                         ("generator", "take the composite config's 'generator'")):
            if group.get(key) not in (None, LATENT_DEFAULTS[key]):
                raise ConfigError(f"it gives '{key}', but the groups of a composite config {why}")
        _check_keys(group, {**LATENT_DEFAULTS, "name": None}, "latent config group")
        name = str(group.get("name") or f"group{i}")
        loaded = load_latent_config({k: v for k, v in group.items() if k != "name"})
    else:
        raise ConfigError(f"a group must be a configs/latent name or a mapping, got {group!r}")
    return OmegaConf.create({"name": name, **{k: loaded[k] for k in GROUP_KEYS if k != "name"}})
