"""The Tokenizer contract (DESIGN §3) and the registry of tokenizer families."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from core.checkpoint import save_safetensors
from core.errors import MismatchError, UserError
from core.integrity import sha256_file

TOKENIZERS: dict[str, type["Tokenizer"]] = {}


def register(name: str):
    """Class decorator: make a tokenizer family loadable by name from a saved folder."""

    def wrap(cls: type[Tokenizer]) -> type[Tokenizer]:
        cls.name = name
        TOKENIZERS[name] = cls
        return cls

    return wrap


class Tokenizer(torch.nn.Module):
    """Images in [-1, 1] <-> latents [B, C, h, w].

    A subclass stores its constructor keywords in ``self.config`` (plain JSON-able values), so
    ``save_pretrained`` / ``from_pretrained`` round-trip it without pickling anything.
    Latent normalisation is not done here: it belongs to the latent store's statistics.
    """

    name: ClassVar[str] = "tokenizer"
    latent_channels: int
    downsample: int
    config: dict[str, Any]
    # What `decode` gives: "images" in [-1, 1], or "features" [B, tokens, dim] of a frozen encoder (SemVAE).
    # A feature tokenizer's latents are one group of a composite latent (SFD's semantic channels), never
    # decoded to images on their own: code that treats decode's output as images must check this first.
    decodes_to: ClassVar[str] = "images"

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    # Weights that belong in a saved folder; frozen pretrained parts may be left out by a subclass.
    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"family": self.name, **self.config}
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        save_safetensors(self.saved_state_dict(), folder / "model.safetensors")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Tokenizer":
        return cls(**config)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Tokenizer":
        """A saved folder; on `Tokenizer` itself, of whatever registered family it holds."""
        folder = Path(folder)
        cfg = read_config(folder)
        family = cfg.pop("family", None)
        if family != cls.name and cls is not Tokenizer:
            raise MismatchError(f"{folder} holds a '{family}' tokenizer, not '{cls.name}'")
        if family not in TOKENIZERS:
            raise UserError(f"{folder}: unknown tokenizer family {family!r}; known: {sorted(TOKENIZERS)}")
        model = TOKENIZERS[family].from_config(cfg)
        model.load_saved_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()

    def load_saved_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)

    @classmethod
    def load_official(cls, path: str | Path, **kwargs: Any) -> "Tokenizer":
        raise NotImplementedError(f"{cls.name} has no official release loader")

    # What the tokenizer x generator compatibility matrix (tests/test_matrix.py, tools/matrix.py) asks of a family.
    # The official releases `load_official` reads, by variant.
    releases: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def variants(cls) -> tuple[str, ...]:
        """The family's variants whose latents differ (RAE: one per encoder); a single "" by default."""
        return ("",)

    @classmethod
    def released_config(cls, variant: str = "") -> dict[str, Any]:
        """Constructor keywords of the released model of `variant`; built on the meta device, it gives the shapes."""
        raise NotImplementedError(f"{cls.name} names no released configuration")

    @classmethod
    def tiny_config(cls, variant: str, image_size: int) -> dict[str, Any]:
        """Constructor keywords of a small model of the real architecture, for tests with random weights at `image_size`."""
        raise NotImplementedError(f"{cls.name} has no tiny configuration")


def shipped_tokenizers() -> dict[str, type[Tokenizer]]:
    """The families that ship with latentkit, not stand-ins that tests register."""
    import tokenizers.families  # noqa: F401  (registers every family)

    return {n: c for n, c in TOKENIZERS.items() if c.__module__.startswith("tokenizers.")}


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved tokenizer: {path} is missing")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load any saved tokenizer folder, whatever its family."""
    import tokenizers.families  # noqa: F401  (registers every family)

    return Tokenizer.from_pretrained(folder)


def open_tokenizer(spec: str, checksum: bool = True) -> tuple[Tokenizer, dict[str, Any]]:
    """The `--tokenizer` spec of every command: a saved tokenizer folder (or a training run holding one as
    `tokenizer/`), or `family:path[,key=value...]` of an
    official release (the options go to the family's `load_official`, e.g. `rae:<decoder model.pt>,encoder=siglip2_b`).
    Returns the tokenizer (eval mode) and its provenance. `checksum`: include the weights' sha256, a full read of
    the file that only a new store's provenance needs."""
    import difflib

    import tokenizers.families  # noqa: F401  (registers every family)
    from core.config import parse_overrides

    if Path(spec).is_dir():
        if not (Path(spec) / "model.safetensors").is_file() and (Path(spec) / "tokenizer" / "config.yaml").is_file():
            spec = str(Path(spec) / "tokenizer")  # a tokenizers.train run folder: its export
        tok = load_tokenizer(spec)
        return tok.eval(), describe(tok, spec if checksum else None)
    family, sep, rest = spec.partition(":")
    if not sep:
        raise FileNotFoundError(f"--tokenizer {spec}: no saved tokenizer folder there (nor is it family:path of an "
                                f"official release, with a family in {', '.join(sorted(TOKENIZERS))})")
    if family not in TOKENIZERS:
        close = difflib.get_close_matches(family, list(TOKENIZERS), n=1)
        raise UserError(f"--tokenizer {spec}: unknown tokenizer family {family!r}"
                        + (f"; did you mean {close[0]!r}?" if close else "") + f"; known: {', '.join(sorted(TOKENIZERS))}")
    path, *options = rest.split(",")
    tok = TOKENIZERS[family].load_official(path, **dict(parse_overrides(options)))
    info = describe(tok)
    if checksum and Path(path).is_file():
        info["checkpoint_sha256"] = sha256_file(path)
    return tok.eval(), info


def describe(tok: Tokenizer, folder: str | Path | None = None) -> dict[str, Any]:
    """Provenance for a latent store: family, config and the weights' sha256."""
    info: dict[str, Any] = {"name": tok.name, "config": json.loads(json.dumps(tok.config))}
    if folder is not None and (Path(folder) / "model.safetensors").is_file():
        info["checkpoint_sha256"] = sha256_file(Path(folder) / "model.safetensors")
    return info
