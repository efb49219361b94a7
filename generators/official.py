"""Loading official generator checkpoints strictly, whatever wrapper the release put around them."""
from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
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
    return {unwrap_name(name): tensor for name, tensor in state.items()}


def unwrap_name(name: str) -> str:
    """A parameter name without its wrapper prefixes, also when nested."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.removeprefix("module.").removeprefix("_orig_mod.")
    return name


def load_official_weights(model: nn.Module, state: dict, what: str) -> None:
    """Load an official checkpoint dict into ``model``: every key present, none extra, same shapes."""
    state = unwrap_state_dict(state)
    check_keys(model.state_dict(), state, what)
    model.load_state_dict(state, strict=True)


class OfficialCheckpointMixin(PyTorchModelHubMixin):
    """Strict loading for a generator with official checkpoints, from the release (``load_official_state_dict``)
    and from our own ``save_pretrained`` folders (``from_pretrained``, a ``PyTorchModelHubMixin`` method).

    ``official_name`` names the model in the errors of a mismatching checkpoint.
    """

    official_name: str

    def load_official_state_dict(self, state: dict) -> None:
        """Load an official checkpoint dict strictly.

        Accepts a bare state dict, or a training dict (``'ema'`` is preferred, as the official
        inference does, then ``'model'``); DDP/compile prefixes are stripped.
        """
        load_official_weights(self, state, f"{self.official_name} official checkpoint")

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs) -> "OfficialCheckpointMixin":
        # PyTorchModelHubMixin loads non-strictly by default; our checkpoints must match exactly.
        return super()._from_pretrained(strict=strict, **kwargs)
