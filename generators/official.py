"""Loading official generator checkpoints strictly, whatever wrapper the release put around them."""
from __future__ import annotations

import torch
from torch import nn

from core.checkpoint import check_keys

# Prefixes of DDP (`module.`) and torch.compile (`_orig_mod.`) wrapped training checkpoints.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """The model weights of an official checkpoint dict.

    A bare state dict is returned as is; a training dict yields ``'ema'`` (what the official
    inference loads) or else ``'model'``. Wrapper prefixes are stripped, also when nested.
    """
    for key in ("ema", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    out = {}
    for name, tensor in state.items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name.removeprefix("module.").removeprefix("_orig_mod.")
        out[name] = tensor
    return out


def load_official_weights(model: nn.Module, state: dict, what: str) -> None:
    """Load an official checkpoint dict into ``model``: every key present, none extra, same shapes."""
    state = unwrap_state_dict(state)
    check_keys(model.state_dict(), state, what)
    model.load_state_dict(state, strict=True)
