"""Samplers that integrate a velocity field from noise (t = 0) to data (t = 1).

``denoise_fn(x, t) -> velocity`` with x [B, ...] and t [B] (a model with its conditioning
and guidance bound, see ``guidance.py``). The time grid is LightningDiT's: ``steps`` grid
points ``linspace(0, 1, steps)``, optionally shifted (``flow.shift_time``), so there are
``steps - 1`` intervals and t = 1 is never given to the model by Euler; the official
setting "250 steps" is ``steps=250`` (249 model evaluations). Codes that count intervals
instead (JiT/WiT "50 Heun steps" = linspace(0, 1, 51)) need ``steps = intervals + 1``. DDT's grid ends in a short last interval: ``last_step`` gives
linspace(0, 1 - last_step, steps - 1) followed by 1.0 (its "250 steps" are ``steps=251,
last_step=0.04``: 250 evaluations), shifted afterwards as DDT shifts its whole grid.

Seeds: ``initial_noise`` draws each sample's noise from its own generator, seeded from
(seed, global sample index), so a sample does not depend on the batch size or on the
number of processes that share the work.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from core.runtime import derived_seed
from generators.flow import shift_time

__all__ = ["DenoiseFn", "time_grid", "evaluations", "sample", "sample_generators", "initial_noise", "METHODS"]

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("euler", "heun", "heun2", "euler_maruyama")


def time_grid(steps: int, shift: float = 0.0, last_step: float | None = None) -> torch.Tensor:
    """float32 [steps]: linspace(0, 1, steps), or with ``last_step`` linspace(0, 1 - last_step, steps - 1) then 1.0
    (DDT's), mapped through ``shift_time`` (s <= 0: unshifted)."""
    if steps < 2:
        raise ValueError(f"the time grid needs at least 2 points, got steps={steps}")
    if last_step is None:
        grid = torch.linspace(0, 1, steps)
    else:
        if not 0 < last_step < 1:
            raise ValueError(f"last_step must lie in (0, 1), got {last_step}")
        if steps == 2:  # one interval: it is the last one, [0, 1] (DDT's code does the same for one step)
            grid = torch.tensor([0.0, 1.0])
        else:
            grid = torch.cat([torch.linspace(0, 1 - last_step, steps - 1), torch.ones(1)])
    return shift_time(grid, shift)


def evaluations(steps: int, method: str) -> int:
    """How many times ``sample`` calls the velocity field on a grid of ``steps`` points."""
    n = steps - 1
    counts = {"euler": n, "euler_maruyama": n, "heun": 2 * n - 1, "heun2": 2 * n}
    if method not in counts:
        raise ValueError(f"unknown sampling method {method!r}; choose from {METHODS}")
    return counts[method]


def sample_generators(indices: Sequence[int], seed: int, stream: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from (seed, global index, stream).

    ``initial_noise`` uses stream 0; pass ``stream=1`` for the SDE's per-step noise.
    """
    return [torch.Generator().manual_seed(derived_seed(seed, int(i), stream)) for i in indices]


def _randn(generators: Sequence[torch.Generator], shape: Sequence[int], device) -> torch.Tensor:
    # Drawn on the CPU so the noise is the same whatever device samples it.
    return torch.stack([torch.randn(*shape, generator=g) for g in generators]).to(device)


def initial_noise(
    indices: Sequence[int], shape: Sequence[int], seed: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """z [len(indices), *shape] ~ N(0, I); row k depends only on (seed, indices[k])."""
    return _randn(sample_generators(indices, seed), shape, device)


def _euler(fn: DenoiseFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = x + (t1 - t0) * fn(x, t0.expand(x.shape[0]))
    return x


def _heun(fn: DenoiseFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Heun's second-order method; the last interval is a plain Euler step (as EDM and JiT do),
    so the model is never evaluated at t = 1."""
    n = len(grid) - 1
    for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t1 - t0
        d0 = fn(x, t0.expand(x.shape[0]))
        if i == n - 1:
            x = x + dt * d0
        else:
            d1 = fn(x + dt * d0, t1.expand(x.shape[0]))
            x = x + dt * (d0 + d1) / 2
    return x


def _heun2(fn: DenoiseFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Heun's method on every interval, the last included (torchdiffeq's fixed-grid ``heun2``, the ODE sampler
    of LightningDiT and its Internal Guidance release): the model is evaluated at t = 1 too."""
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        d0 = fn(x, t0.expand(x.shape[0]))
        d1 = fn(x + dt * d0, t1.expand(x.shape[0]))
        x = x + dt * (d0 + d1) / 2
    return x


def _euler_maruyama(
    fn: DenoiseFn, x: torch.Tensor, grid: torch.Tensor, generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """SiT's reverse SDE with diffusion coefficient w(t) = 1 - t (SiT's ``"sigma"`` form, norm 1).

    dx = [v + w * score] dt + sqrt(2 w) dW, with the score of the linear path
    score = (t v - x) / (1 - t); so w * score = t v - x, finite at t = 1. The last
    interval takes the mean (no noise), as SiT's ``last_step="Mean"`` does.
    """
    n = len(grid) - 1
    for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t1 - t0
        v = fn(x, t0.expand(x.shape[0]))
        x = x + dt * (v + (t0 * v - x))
        if i < n - 1:
            w = 1 - t0
            noise = torch.randn_like(x) if generators is None else _randn(generators, x.shape[1:], x.device)
            x = x + torch.sqrt(2 * w * dt) * noise.to(x.dtype)
    return x


@torch.no_grad()
def sample(
    denoise_fn: DenoiseFn,
    z: torch.Tensor,
    steps: int,
    method: str = "euler",
    shift: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    span: float = 1.0,
    last_step: float | None = None,
) -> torch.Tensor:
    """Integrate from noise z (t = 0) to t = 1 on ``time_grid(steps, shift, last_step)``.

    ``span``: the grid is scaled to [0, span] (SFD's τ runs to 1 + Δ; the ODE methods only).

    ``method``: ``euler`` (steps - 1 evaluations, the official sampler), ``heun``
    (2 (steps - 1) - 1 evaluations: the last interval is Euler), ``heun2`` (2 (steps - 1)), or ``euler_maruyama`` (SDE, steps - 1 evaluations;
    its noise comes from ``generators``, one per sample, e.g. ``sample_generators(indices,
    seed, stream=1)``, or from the global RNG when None).
    """
    grid = time_grid(steps, shift, last_step).to(z.device) * span
    if span != 1.0 and method == "euler_maruyama":
        raise ValueError("the SDE sampler integrates t over [0, 1] only")
    if method == "euler":
        return _euler(denoise_fn, z, grid)
    if method == "heun":
        return _heun(denoise_fn, z, grid)
    if method == "heun2":
        return _heun2(denoise_fn, z, grid)
    if method == "euler_maruyama":
        if generators is not None and len(generators) != z.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {z.shape[0]}")
        return _euler_maruyama(denoise_fn, z, grid, generators)
    raise ValueError(f"unknown sampling method {method!r}; choose from {METHODS}")
