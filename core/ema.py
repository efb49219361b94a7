"""Exponential moving average of a model's parameters (fp32 copy, kept in eval mode)."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Keeps `decay * ema + (1 - decay) * param` for every parameter; buffers are copied.

    Starts as an exact copy of the model (as LightningDiT's EMA does). Registered with
    accelerate through `state_dict`/`load_state_dict`, so it resumes with the run.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach().float(), 1.0 - self.decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
