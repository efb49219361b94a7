"""What the shared tokenizer training loop (tokenizers.train) asks of a family, and the families it can train.

A family module (tokenizers/vavae_train.py, tokenizers/rae_train.py) subclasses `Family` and registers it
with `@trainable(name)`; tokenizers.train imports those modules, so `python -m tokenizers.train <name>`
finds it. The base class and the registry live here, not in tokenizers/train.py, because
`python -m tokenizers.train` runs that file as `__main__`: a family module importing it would get a
second copy with a second, empty registry.
"""
from __future__ import annotations

import copy

from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from core.checkpoint import load_safetensors
from core.images import build_source
from core.log import get_logger
from core.runtime import latest_checkpoint
from tokenizers.base import Tokenizer
from tokenizers.discriminators import NLayerDiscriminator

FAMILIES: dict[str, type["Family"]] = {}


def trainable(name: str) -> Callable[[type["Family"]], type["Family"]]:
    """Class decorator: `python -m tokenizers.train <name>` trains this family."""

    def wrap(cls: type[Family]) -> type[Family]:
        cls.name = name
        FAMILIES[name] = cls
        return cls

    return wrap


class Family:
    """What the shared loop asks of a tokenizer family; the defaults are LDM's recipe (VA-VAE).

    A subclass sets `cfg` and `model` (the module the generator optimiser trains, holding the tokenizer
    as `model.tokenizer`) and supplies `generator_loss` and `decoder_last_layer`; it overrides the rest
    where its recipe differs. `gens` holds one CPU generator per image of the batch
    (core.runtime.step_generators): each image's random draws come from its own, so that they do not depend
    on how the global batch is split over processes.
    """

    name: str  # the registered name; a staged family's stage classes name themselves (fae_pixel): the default run folder
    cfg: DictConfig
    model: nn.Module
    disc_train_in_g_step = True  # LDM runs its discriminator in train mode in the generator step too
    adaptive_eps = 1e-4  # in the denominator of LDM's adaptive GAN weight
    # A recipe with its own loop (SemVAE: features, no GAN) sets a class method run(cfg) -> run folder; the shared
    # GAN loop of tokenizers.train runs the others.
    run: Callable[[DictConfig], Path] | None = None

    @classmethod
    def for_config(cls, cfg: DictConfig) -> type["Family"]:
        """The class that trains this config: the family itself, or the class of a staged family's `stage` (FAE)."""
        return cls

    def generator_loss(
        self, model: nn.Module, raw: nn.Module, images: torch.Tensor, gens: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss without the GAN term, reconstruction loss the GAN weight balances, reconstructions, values to log)."""
        raise NotImplementedError

    def decoder_last_layer(self, raw: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def frozen(self) -> list[nn.Module]:
        """Frozen networks outside `model`, moved to the device by the loop."""
        return []

    def random_networks(self) -> list[str]:
        """Frozen networks running on random weights (tests and demos): recorded in the run's metrics."""
        return []

    @classmethod
    def source(cls, cfg: DictConfig) -> Any:
        """The training images (a class method: a missing data folder stops the run before any network is built)."""
        return build_source(cfg.data)

    def view(self, images: torch.Tensor, gens: list[torch.Generator] | None) -> torch.Tensor:
        """The batch the step trains on (`gens` given) or the fixed sample images (`gens` None)."""
        return images

    def discriminator(self) -> nn.Module:
        return NLayerDiscriminator(3, self.cfg.discriminator.channels, self.cfg.discriminator.layers)

    def disc_update_start(self) -> int:
        """First step of discriminator updates (the generator's GAN term starts at `loss.disc_start`)."""
        return self.cfg.loss.disc_start

    def disc_input(self, images: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """What the discriminator is shown of real or fake images."""
        return images

    def disc_fakes(self, raw: nn.Module, recon: torch.Tensor) -> torch.Tensor:
        """The discriminator step's fakes, after the generator update: LDM reuses that step's reconstructions."""
        return recon.detach()

    def lr_factors(self, step: int) -> tuple[float, float]:
        """Learning rates of the step, as fractions of `optim.lr` and `optim.disc_lr`: constant here."""
        return 1.0, 1.0

    def ema_source(self, raw: nn.Module) -> nn.Module:
        """What the EMA averages."""
        return raw.tokenizer

    def as_tokenizer(self, ema_module: nn.Module) -> Tokenizer:
        """The tokenizer with the EMA weights (samples, export)."""
        return ema_module


def with_module(tokenizer: Tokenizer, name: str, module: nn.Module) -> Tokenizer:
    """The same tokenizer (config; its other modules, the frozen encoder among them, shared, not copied) with
    module `name` replaced: the EMA tokenizer a run exports."""
    view = copy.copy(tokenizer)
    view._modules = {**tokenizer._modules, name: module}
    return view


def init_weights(path: Path, model: nn.Module, disc: nn.Module | None = None) -> None:
    """Weights (the trained module and the discriminator, if any, strictly) from a run folder's last checkpoint or
    a checkpoint folder (`run.init_from`)."""
    if (path / "checkpoints").is_dir():
        last = latest_checkpoint(path)
        if last is None:
            raise FileNotFoundError(f"run.init_from: {path} has no finished checkpoint")
        path = last
    model.load_state_dict(load_safetensors(path / "model.safetensors"), strict=True)
    if disc is not None:
        disc.load_state_dict(load_safetensors(path / "model_1.safetensors"), strict=True)
    get_logger(__name__).info("initialised from %s", path)


def export_tokenizer(run: Any, acc: Any, tokenizer: Tokenizer, step: int, ema: bool) -> Path:
    """A run's end: the main process saves the tokenizer (the EMA view when `ema`) to `<run>/tokenizer` and logs it;
    every process waits and ends the training. Returns the run folder."""
    if acc.is_main_process:
        tokenizer.save_pretrained(run.path / "tokenizer")
        run.log(event="exported", step=step, tokenizer=str(run.path / "tokenizer"), ema=ema)
        get_logger(__name__).info("tokenizer saved to %s", run.path / "tokenizer")
    acc.wait_for_everyone()
    acc.end_training()
    return run.path
