"""Exponential moving averages of a model's parameters (fp32 copies, kept in eval mode), one or several decays."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch


class EMA:
    """Keeps `decay * ema + (1 - decay) * param` for every parameter and every decay; buffers are copied.

    Each average starts as an exact copy of the model (as LightningDiT's and JiT's EMAs do). `decay` may be a
    list: JiT keeps several at once and the best is chosen at sampling. The first is the primary one: `model`,
    `state_dict` (the checkpoint's `ema.safetensors`, what sampling uses by default) and the training sample
    grids are its; `extra_state_dicts` are the others, saved as `ema_<decay>.safetensors` (`weights_name`).
    Registered with the run folder through these, so every average resumes with the run.
    """

    def __init__(self, model: torch.nn.Module, decay: float | Sequence[float]) -> None:
        self.decays = [float(d) for d in decay] if isinstance(decay, Sequence) else [float(decay)]
        if not self.decays or len(set(self.decays)) < len(self.decays):
            raise ValueError(f"EMA decays must be distinct and at least one, got {self.decays}")
        self.decay = self.decays[0]
        self.models = [copy.deepcopy(model).float().eval().requires_grad_(False) for _ in self.decays]
        self.model = self.models[0]

    def to(self, device: torch.device | str) -> "EMA":
        """Move every average (not only the primary) to `device`."""
        for m in self.models:
            m.to(device)
        return self

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [(name, p.detach().float()) for name, p in model.named_parameters()]
        buffers = list(model.named_buffers())
        for decay, ema_model in zip(self.decays, self.models):
            ema_params = dict(ema_model.named_parameters())
            for name, p in params:
                ema_params[name].lerp_(p, 1.0 - decay)
            ema_buffers = dict(ema_model.named_buffers())
            for name, b in buffers:
                ema_buffers[name].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def extra_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """{file stem: state} of the averages after the first."""
        return {weights_name(d): m.state_dict() for d, m in zip(self.decays[1:], self.models[1:])}

    def load_extra_state_dicts(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        for d, m in zip(self.decays[1:], self.models[1:]):
            m.load_state_dict(states[weights_name(d)], strict=True)


def weights_name(decay: float) -> str:
    """The file stem of the average with this decay beside the primary `ema`: `ema_0.9996`."""
    return f"ema_{float(decay)!r}"  # repr: distinct decays never share a file (0.9999995 is not ema_1)
