"""The generator's optimizer: AdamW, or Muon for the 2-D weights with AdamW for the rest (`train.optimizer`):
"muon" as the Internal Guidance release, "gmuon" as RAEv2's.

Muon follows the Internal Guidance release (CVL-UESTC/Internal-Guidance, LightningDiT/train.py and
muon_new.py): every trainable 2-D weight (linear layers, the label embedding, the final layer) takes
Muon (Newton-Schulz orthogonalised Nesterov momentum) and the biases and norm gains take AdamW, both
at the same base lr. Both halves are torch's own optimizers (`torch.optim.Muon`, `torch.optim.AdamW`)
inside one `MuonAdamW`, so accelerate, gradient clipping, lr schedulers and checkpoints see one optimizer.

GMuon follows RAEv2 (nanovisionx/RAEv2, src/utils/optim_utils.py; reference/raev2.md §3.5): the Muon of the
`gram-newton-schulz` package (Dao-AILab; RAEv2 pins a fork of it, nanovisionx/gmuon, that could not be read) on every
trainable 2-D tensor, with the Polar-Express Newton-Schulz coefficients, Nesterov momentum and "rms_norm" lr scaling
(lr * 0.2 * sqrt(max(A, B)), no tall-weight factor), beside a torch AdamW on the rest, again in one `MuonAdamW`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from core.errors import UserError
from core.runtime import fused_adam_kwargs

OPTIMIZERS = ("adamw", "muon", "gmuon")
# What gram-newton-schulz's restart autotune picks for the Polar-Express schedule with its default one restart (the
# release's setting): given here, construction skips the autotune and its prints.
GMUON_RESTARTS = (2,)


class MuonAdamW(torch.optim.Optimizer):
    """A Muon (torch's, or gram-newton-schulz's) and a torch AdamW stepped as one optimizer.

    `param_groups` are the two optimizers' own group dicts (Muon's first), so a change of a group's lr
    (an lr scheduler) is what they step with; schedule by scaling each group's own lr (LambdaLR does), not by
    setting one lr for all: the groups of tall weights carry their factor (build_optimizer); `state` is a merged view of their states; `state_dict()`
    holds both, as {"muon": ..., "adamw": ...}. The groups are fixed at construction: `add_param_group`
    would add a group that neither optimizer steps.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        # Optimizer.__init__ keeps the group dicts themselves (it only replaces their "params" list by an
        # equal one), and gives us the step hooks and profiling every torch optimizer has.
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value: Mapping) -> None:
        # Optimizer.__init__ assigns an empty state; the real ones belong to the two optimizers.
        if value:
            raise ValueError("MuonAdamW's state is its Muon's and AdamW's; load it with load_state_dict")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.muon.param_groups for p in group["params"]]
        with muon_step_context(params[0].device.type if params else "cpu", len(params)):
            self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # torch's load_state_dict gives each optimizer new group dicts: ours must be those, or an lr set on them
        # (the warmup, a scheduler) would reach nothing that steps. (gram-newton-schulz's Muon keeps its own groups,
        # which its param_groups property returns: those are the ones it steps.)
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]


def muon_step_context(device_type: str, tensors: int) -> contextlib.AbstractContextManager:
    """How a Muon step of `tensors` 2-D tensors on `device_type` runs torch.compile'd code (gram-newton-schulz's; torch's
    Muon compiles nothing). The package compiles, with fullgraph, its momentum update once per batch of equal shapes
    and per list length, and its Newton-Schulz per shape: more graphs than dynamo's default recompile limit (8; IG-XL's
    222 tensors need about 17), which under fullgraph is a hard error, so the limit is raised to one graph per tensor.
    On CPU it runs eagerly: inductor's C++ build costs half a minute per shape, more than a CPU run's steps take."""
    if device_type == "cpu":
        return torch.compiler.set_stance("force_eager")
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, tensors))


def build_optimizer(model: torch.nn.Module, train_cfg: Mapping) -> torch.optim.Optimizer:
    """The optimizer `train_cfg.optimizer` names, over `model`'s parameters.

    "adamw": `torch.optim.AdamW` with `lr`, `betas`, `weight_decay` over all of `model.parameters()`
    (frozen ones get no gradient and are never updated; they stay in the list so that checkpoints of
    earlier runs, whose state was saved this way, still load).

    "muon": a `MuonAdamW` over the trainable parameters (frozen ones, e.g. a fixed pos_embed, go nowhere):
      - 2-D weights: `torch.optim.Muon` with `muon.momentum`, `muon.nesterov`, `muon.ns_steps`,
        `muon.weight_decay` (decoupled, lr * wd), and `adjust_lr_fn="match_rms_adamw"`: a weight of shape
        [A, B] moves by lr * 0.2 * sqrt(max(A, B)) times its orthogonalised update, so Muon can use AdamW's lr.
        The release's Muon also multiplies a tall weight's update (A > B: qkv, the MLP input, the adaLN
        projection) by sqrt(A / B), Keller Jordan's scale, while its decay stays lr * wd. torch's Muon has
        one scale, so the tall weights sit in groups by that factor f, with lr * f and weight decay wd / f:
        the same update and the same decay as the release's.
      - everything else: `torch.optim.AdamW` with `lr`, `betas`, `weight_decay` and torch's eps 1e-8
        (the release: betas (0.9, beta2), weight decay 0, eps 1e-8, which base.yaml's values give).
      - weights with more than 2 dims (the Conv2d patch embedding [out, in, p, p]) go to AdamW, as
        RAEv2's code does and torch's Muon requires (it takes 2-D parameters only). The Internal Guidance
        code instead flattens them to [out, in*p*p] for its own Muon, with decay 0.01 and the lr scaled by
        0.2 * sqrt(max(out, in)); here that one tensor gets AdamW's update and `weight_decay`.

    "gmuon": a `MuonAdamW` of gram-newton-schulz's Muon over every trainable 2-D tensor (RAEv2's rule: linear weights,
    the label table, learnable tokens) with `muon.momentum`, `muon.nesterov`, `muon.weight_decay` (decay lr * wd), the
    Polar-Express coefficients (five iterations, so `muon.ns_steps` is not read), Gram Newton-Schulz with one restart,
    bf16 momentum-update casts as the package does and its torch path (`ns_use_kernels` false, the release's setting),
    and update lr * 0.2 * sqrt(max(A, B)) * NS(U); torch's AdamW on the rest as for "muon".
    """
    name = train_cfg["optimizer"]
    lr, betas, weight_decay = train_cfg["lr"], tuple(train_cfg["betas"]), train_cfg["weight_decay"]
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                                 **fused_adam_kwargs())
    if name not in OPTIMIZERS:
        raise UserError(f"unknown train.optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    muon_cfg = train_cfg["muon"]
    adamw = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim != 2]}], lr=lr, betas=betas,
                              weight_decay=weight_decay, **fused_adam_kwargs())
    if name == "gmuon":
        return MuonAdamW(gram_muon([p for p in trainable if p.ndim == 2], lr, muon_cfg), adamw)
    by_factor: dict[float, list[torch.Tensor]] = {}
    for p in trainable:
        if p.ndim == 2:
            by_factor.setdefault(math.sqrt(max(1.0, p.shape[0] / p.shape[1])), []).append(p)
    wd = muon_cfg["weight_decay"]
    # At least one group (of no tensors, if need be), so a model without 2-D weights still builds.
    groups = [{"params": ps, "lr": lr * f, "weight_decay": wd / f} for f, ps in sorted(by_factor.items())]
    muon = torch.optim.Muon(groups or [{"params": []}], lr=lr, weight_decay=wd, momentum=muon_cfg["momentum"],
                            nesterov=muon_cfg["nesterov"], ns_steps=muon_cfg["ns_steps"],
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw)


def gram_muon(params: list[torch.Tensor], lr: float, muon_cfg: Mapping) -> torch.optim.Optimizer:
    """gram-newton-schulz's Muon with RAEv2's settings (build_optimizer, "gmuon")."""
    try:
        from gram_newton_schulz import Muon
    except ImportError as e:
        raise UserError("train.optimizer=gmuon needs the gram-newton-schulz package (a dependency of this project on "
                        f"Linux: pip install gram-newton-schulz): {e}") from e
    return Muon([{"params": params}], lr=lr, weight_decay=muon_cfg["weight_decay"], momentum=muon_cfg["momentum"],
                nesterov=muon_cfg["nesterov"], adjust_lr="rms_norm", ns_coefficients_preset="POLAR_EXPRESS_COEFFICIENTS",
                ns_use_kernels=False, gram_newton_schulz_restart_iterations=GMUON_RESTARTS)
