"""The registry of generator families, and building a generator (Denoiser) from the `model` section of a config.

A family registers its builder with `register` (generators/families.py imports them all), together with
what the tokenizer x generator compatibility matrix needs (its released config, a tiny version of itself
and the official checkpoints it loads) and how it spells the training aids every generator has: a REPA
projector and an Internal Guidance head. A config asks for those family-independently
(`model.repa_depth`, `model.repa_encoder`, `model.ig_depth`); the family turns them into its official
constructor keywords, so a checkpoint of the official code that has them loads strictly.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from omegaconf import DictConfig, OmegaConf

from core.config import to_dict
from core.errors import MismatchError, UnknownNameError, UserError


@dataclass(frozen=True)
class Release:
    """An official checkpoint of a family, and the latents it was trained on: a tokenizer family and its variant
    (tokenizers.base.Tokenizer.variants), which must be the ones it is sampled with."""

    name: str
    tokenizer: str
    variant: str = ""


@dataclass(frozen=True)
class Needs:
    """What a run of a family needs besides its latent or pixel source (WiT's two stages): the config key that
    gives it, which a run without it names in its refusal, and what it is, for the compatibility matrix."""

    key: str
    what: str


@dataclass(frozen=True)
class GeneratorFamily:
    name: str
    build: Callable[..., nn.Module]  # build(size, **constructor keywords)
    config: str  # configs/generator/<config>.yaml of the released model
    tiny: dict[str, Any]  # `size` and `options` of a tiny model for tests; the latents give channels and grid
    repa: Callable[[int, str], dict[str, Any]]  # (block k, 1-based; encoder name) -> keywords of a REPA projector there
    ig: Callable[[int], dict[str, Any]]  # block k (1-based) -> keywords of an internal-guidance head there
    releases: tuple[Release, ...] = ()
    needs: Needs | None = None


GENERATORS: dict[str, GeneratorFamily] = {}


def register(name: str, config: str, tiny: dict[str, Any], repa: Callable[[int, str], dict[str, Any]],
             ig: Callable[[int], dict[str, Any]], releases: tuple[Release, ...] = (), needs: Needs | None = None):
    """Decorator of a family's builder `build(size, **constructor keywords)`: makes `model.family: <name>` build it."""

    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        GENERATORS[name] = GeneratorFamily(name, build, config, tiny, repa, ig, releases, needs)
        return build

    return wrap


def shipped_generators() -> dict[str, GeneratorFamily]:
    """The families that ship with latentkit, not stand-ins that tests register."""
    import generators.families  # noqa: F401  (registers every family)

    return {n: f for n, f in GENERATORS.items() if f.build.__module__.startswith("generators.")}


def build_generator(model_cfg: Any) -> nn.Module:
    import generators.families  # noqa: F401  (registers every family)

    cfg = to_dict(model_cfg) if not isinstance(model_cfg, dict) else dict(model_cfg)
    family = cfg.pop("family")
    size = cfg.pop("size")
    options = cfg.pop("options", None) or {}
    if family not in GENERATORS:
        close = difflib.get_close_matches(str(family), list(GENERATORS), n=1)
        raise UserError(f"model.family: unknown generator family {family!r}"
                        + (f"; did you mean {close[0]!r}?" if close else "") + f"; known: {', '.join(sorted(GENERATORS))}")
    aids = training_aid_options(GENERATORS[family], cfg.pop("repa_depth", None), cfg.pop("repa_encoder", None),
                                cfg.pop("ig_depth", None))
    if clash := sorted(set(aids) & set(options)):
        raise UserError(f"model.options sets {clash}, which model.repa_depth/ig_depth also set; keep one")
    try:
        return GENERATORS[family].build(size, **cfg, **aids, **options)
    except TypeError as e:  # a mistyped key of the free-form model.options
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"model.options: {family} {e.args[0].split('() ', 1)[-1]}") from e


def run_config(path: str | Path) -> DictConfig:
    """The config.yaml of one of our generator runs, in today's names (`upgrade_run_config`)."""
    return upgrade_run_config(OmegaConf.load(path))


def upgrade_run_config(cfg: DictConfig) -> DictConfig:
    """A run config saved by an older latentkit, in today's names. RAE's DiT^DH was family `ddt` until that name
    went to MCG-NJU's DDT; DiT^DH sizes (S, B, L, XL, DiTDH-*) have no patch, DDT's (B/2, L/2, XL/2) have one."""
    if cfg.model.family == "ddt" and "/" not in str(cfg.model.size):
        cfg.model.family = "ditdh"
    return cfg


def training_aid_options(family: GeneratorFamily, repa_depth: int | None, repa_encoder: str | None,
                         ig_depth: int | None) -> dict[str, Any]:
    """The family's constructor keywords for a REPA projector after block `repa_depth` (1-based) towards the
    tokens of `repa_encoder`, and an IG head after block `ig_depth`; none for what is None."""
    from tokenizers.encoders import ENCODERS

    out: dict[str, Any] = {}
    if repa_depth is not None:
        if repa_encoder not in ENCODERS:
            raise UnknownNameError(f"model.repa_encoder={repa_encoder!r}: REPA aligns with the tokens of one of "
                                   f"{sorted(ENCODERS)}")
        out |= family.repa(int(repa_depth), str(repa_encoder))
    if ig_depth is not None:
        out |= family.ig(int(ig_depth))
    return out


def latent_mismatch(model_cfg: Any, latent_shape: tuple[int, int, int]) -> str | None:
    """Why the model of `model_cfg`, built for latents [C, h, w], cannot take them (the family's own check,
    a MismatchError of its constructor), or None when it can. Built on the meta device: no memory, no weights.
    Every family takes square grids (`input_size`); generators.train.check_against_data refuses others."""
    c, h, _ = latent_shape
    cfg = {**(to_dict(model_cfg) if not isinstance(model_cfg, dict) else dict(model_cfg)), "in_channels": c, "input_size": h}
    try:
        with torch.device("meta"):
            build_generator(cfg)
    except MismatchError as e:
        return str(e)
    return None
