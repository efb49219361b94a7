"""Encoder sharing: reuse an encoder-decoder generator's encoder output across sampling steps (DDT §1.5).

A model with ``has_state = True`` (DiT^DH, DDT) returns its decoder's condition with ``return_state=True`` (last in
the tuple) and skips its encoder when given ``state``. That condition changes slowly along the trajectory, so a
sampling run may compute it only at some of its model evaluations and reuse it in between.

Schedules are lists of the evaluations 0..N-1 that recompute the state (N: the velocity-field calls of one
sampling run, ``sampling.evaluations``; evaluation 0 always recomputes):
- ``uniform(N, k)``: every k-th evaluation (DDT's ``state_refresh_rate``);
- ``dp(sim, K)``: DDT's statistic dynamic programming. ``sim[i][j]`` is the mean cosine similarity of the states at
  evaluations i and j, measured by a template pass (``similarity``); reusing j's state at i costs 1 - sim[i][j],
  and the K recomputes are placed to minimise the summed cost.

``Sharing`` is one sampling run's plan: ``denoise`` wraps the sampler's velocity field so that it counts the
evaluations, ``wrap`` turns a model into one that recomputes or reuses its state by that count, and counts the
encoder and decoder evaluations (per sample row: a CFG batch of B samples is 2B rows).

Guidance. Each guidance branch keeps its own state: the wrapper keys its cache by the rows' kind, conditional or
unconditional (label = the null class ``num_classes``). When CFG evaluates [cond ; uncond] as one batch the state
covers both halves, as DDT's does; when it evaluates the conditional half alone (outside ``cfg_interval``), the
conditional state is the one kept, and the first evaluation that needs the unconditional half computes its state
there (an extra encoder evaluation of that half only; counted). AutoGuidance's guide is a second model with its
own wrapper and cache: with ``has_state`` it follows the same schedule, without it is evaluated in full at every
step. Internal Guidance needs the encoder's block k at every evaluation (v_mid), so a reused state cannot give
it: sharing together with ``ig_scale != 1`` is refused (``check``).
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import MismatchError, UserError

__all__ = ["MODES", "uniform", "dp", "reuse_cost", "similarity", "check", "Sharing", "SharedModel", "schedule_for",
           "Record"]

MODES = ("none", "uniform", "dp")


# --------------------------------------------------------------------------------------------------- schedules
def uniform(n: int, every: int) -> list[int]:
    """Recompute at evaluations i with i % every == 0 (DDT's ``state_refresh_rate``)."""
    if n < 1 or every < 1:
        raise ValueError(f"uniform sharing needs n >= 1 and every >= 1, got n={n}, every={every}")
    return list(range(0, n, every))


def _cumulative_error(sim: np.ndarray) -> np.ndarray:
    """E[i][j] = sum_{k=j..i} (1 - sim[k][j]) for i >= j (the cost of computing at j and reusing it through i);
    +inf above the diagonal. Accumulated down each column in order, as DDT's code adds."""
    n = len(sim)
    err = np.full((n, n), np.inf)
    for j in range(n):
        err[j:, j] = np.cumsum(1.0 - sim[j:, j])
    return err


def dp(sim: Any, budget: int) -> list[int]:
    """The ``budget`` recompute evaluations (0 first) that minimise the summed reuse error (DDT's ``sharing_dp``).

    C[1][i] = E[i-1][0]; C[k][i] = min over j in [k-1, i) of C[k-1][j] + E[i-1][j] (the first minimum on ties, as
    the official loop); backtracked from C[budget][N].
    """
    sim = np.asarray(sim, dtype=np.float64)
    n = len(sim)
    if sim.shape != (n, n) or n < 1:
        raise ValueError(f"dp needs a square similarity matrix, got shape {sim.shape}")
    if not 1 <= budget <= n:
        raise ValueError(f"dp: the budget (recomputes) must lie in [1, {n}], got {budget}")
    err = _cumulative_error(sim)
    cost = np.full((budget + 1, n + 1), np.inf)
    parent = np.full((budget + 1, n + 1), -1, dtype=np.int64)
    cost[1, 1:] = err[:, 0]
    parent[1, 1:] = 0
    for k in range(2, budget + 1):
        # value[i, j] = C[k-1][j] + E[i-1][j] for j in [k-1, i); inf elsewhere (E is inf above the diagonal).
        value = cost[k - 1, None, :n] + err  # rows: i - 1 = 0..n-1, columns: j
        value[:, : k - 1] = np.inf
        best = np.argmin(value, axis=1)
        rows = np.arange(n)
        ok = rows + 1 >= k
        cost[k, 1:][ok] = value[rows, best][ok]
        parent[k, 1:][ok] = best[ok]
    steps = [n]
    for k in range(budget, 0, -1):
        steps.append(int(parent[k, steps[-1]]))
    steps.reverse()
    return steps[:-1]


def reuse_cost(sim: Any, schedule: Sequence[int]) -> float:
    """The summed reuse error of a schedule: each evaluation i pays 1 - sim[i][j], j the last recompute <= i."""
    sim = np.asarray(sim, dtype=np.float64)
    chosen = sorted(set(int(i) for i in schedule))
    if not chosen or chosen[0] != 0:
        raise ValueError(f"a schedule must recompute at evaluation 0, got {list(schedule)}")
    total, last = 0.0, 0
    for i in range(len(sim)):
        if i in chosen:
            last = i
        total += 1.0 - sim[i, last]
    return total


def similarity(states: dict[Any, dict[int, torch.Tensor]], n: int) -> np.ndarray:
    """sim [n, n] float64: the cosine similarity of the states at two evaluations, averaged over samples x tokens.

    ``states[kind][i]``: the L2-normalised (per token) states [rows, tokens, width] of one kind of rows (e.g. the
    conditional and the unconditional CFG halves) at evaluation i. A pair of evaluations averages over the rows
    both have; with every kind at every evaluation it is DDT's matrix over both CFG halves.
    """
    num = np.zeros((n, n))
    den = np.zeros((n, n))
    for per_eval in states.values():
        evals = sorted(per_eval)
        if not evals:
            continue
        first = per_eval[evals[0]]
        count = first.shape[0] * first.shape[1]  # rows x tokens
        gram = torch.zeros(len(evals), len(evals), dtype=torch.float64, device=first.device)
        chunk = max(1, 2**25 // len(evals))  # float64 pieces of about 256 MB
        # Stacked a piece at a time: the kept states are often gigabytes, and one stack of all would copy them.
        for start in range(0, first.numel(), chunk):
            piece = torch.stack([per_eval[i].reshape(-1)[start : start + chunk] for i in evals]).double()
            gram += piece @ piece.T
        idx = np.asarray(evals)
        num[np.ix_(idx, idx)] += gram.cpu().numpy()
        den[np.ix_(idx, idx)] += count
    if (den == 0).any():
        raise ValueError("similarity: some pair of evaluations shares no rows of any kind")
    return num / den


def check_given_state(model: str, state: torch.Tensor, want: tuple[int, ...], return_ig: bool,
                      return_repa: bool) -> None:
    """Refuse what a call with a given `state` cannot do (the encoder it skips is where the IG head and the REPA
    projector read) and a state not shaped `want` (batch, tokens, head width); `model` names the model."""
    if return_ig or return_repa:
        raise UserError(f"{model}: a given state skips the encoder, where the IG head and the REPA projector read; "
                        "call without state for return_ig / return_repa")
    if tuple(state.shape) != tuple(want):
        raise MismatchError(f"{model}: the given state is shaped {tuple(state.shape)}; this call needs a state of shape "
                            f"{tuple(want)} (batch, tokens, head width)")


# ---------------------------------------------------------------------------------------------- the run's plan
def check(model: Any, settings: Any, family: str | None = None) -> str:
    """The sharing mode of ``settings`` (a ``sample`` config), after refusing what cannot share: a model without
    ``has_state``, Internal Guidance, a semantic-first model, bad values. ``family`` names the model in errors."""
    share = settings.get("share") if hasattr(settings, "get") else None
    mode = "none" if share is None else str(share.get("mode", "none"))
    if mode not in MODES:
        raise UserError(f"sample.share.mode={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return mode
    name = family or getattr(model, "official_name", type(model).__name__)
    if not getattr(model, "has_state", False):
        raise UserError(f"sample.share.mode={mode}: {name} has no encoder state to reuse (only models with "
                        "has_state, the encoder-decoder families ditdh and ddt, can share); set sample.share.mode=none")
    if float(settings.get("ig_scale", 1.0)) != 1.0:
        raise UserError(f"sample.share.mode={mode} with sample.ig_scale={settings.ig_scale}: Internal Guidance reads "
                        "the encoder's block k at every evaluation, which a reused state skips; switch one off")
    every = int(share.get("every", 1))
    if every < 1:
        raise UserError(f"sample.share.every={every}: must be >= 1")
    if mode == "dp" and int(share.get("template", 8)) < 1:
        raise UserError(f"sample.share.template={share.template}: the template pass needs at least one sample")
    return mode


class Sharing:
    """One sampling run: the recompute schedule (None: compute everything, only count), the evaluation clock and
    the per-model counts. ``record=True`` keeps every computed state (normalised, float32) for ``similarity``."""

    def __init__(self, schedule: Sequence[int] | None, evaluations: int, record: bool = False):
        self.schedule = None if schedule is None else sorted(int(i) for i in schedule)
        if self.schedule is not None and (not self.schedule or self.schedule[0] != 0):
            raise ValueError(f"a sharing schedule must recompute at evaluation 0, got {schedule}")
        self.recompute = None if self.schedule is None else set(self.schedule)
        self.evaluations = evaluations
        self.record = record
        self.clock = -1  # the current evaluation of the sampler, -1 before the first
        self.models: dict[str, SharedModel] = {}
        self.states: dict[str, dict[bool, dict[int, torch.Tensor]]] = {}

    def denoise(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        """The sampler's velocity field ``fn(x, t)``, advancing the clock at every call."""

        def ticked(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.clock += 1
            if self.clock >= self.evaluations:
                raise RuntimeError(f"sharing: evaluation {self.clock} of a run planned for {self.evaluations}")
            return fn(x, t)

        return ticked

    def wrap(self, model: Any, name: str = "model") -> "SharedModel | None":
        if model is None:
            return None
        if name in self.models:
            raise ValueError(f"sharing: a model named {name!r} is already wrapped")
        self.models[name] = SharedModel(model, self, name)
        return self.models[name]

    def reuses(self) -> bool:
        """Whether the current evaluation may reuse a state (it is not on the schedule)."""
        return self.recompute is not None and self.clock >= 0 and self.clock not in self.recompute

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: {"encoder": m.encoder_rows, "decoder": m.decoder_rows, "shared": m.shares}
                for name, m in self.models.items()}


class SharedModel:
    """A model that recomputes its state on the plan's schedule and reuses it otherwise; other attributes are the
    model's (``num_classes``, ``training``, ...). Without a schedule, or for a model without ``has_state``, calls
    pass through unchanged (bit for bit) and are only counted."""

    def __init__(self, model: Any, plan: Sharing, name: str):
        self.model, self.plan, self.name = model, plan, name
        self.shares = plan.schedule is not None and bool(getattr(model, "has_state", False))
        self.encoder_rows = self.decoder_rows = 0
        self.full: tuple[torch.Tensor, torch.Tensor] | None = None  # (null-row mask, state) of the last call
        self.kinds: dict[bool, torch.Tensor] = {}  # state of the conditional (False) / unconditional (True) rows

    def __getattr__(self, key: str) -> Any:
        if key in ("model", "plan", "name"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(key)
        return getattr(self.model, key)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs: Any):
        rows = x.shape[0]
        if not self.shares:
            self.encoder_rows += rows
            self.decoder_rows += rows
            return self.model(x, t, y, **kwargs)
        if kwargs:
            raise UserError(f"sharing: the {self.name} is called with {sorted(kwargs)}, which needs its encoder at "
                            "every evaluation (Internal Guidance, REPA); sharing cannot serve it")
        null = y == self.model.num_classes
        if not self.plan.reuses():
            return self._compute(x, t, y, null)
        if self.full is not None and torch.equal(self.full[0], null):
            self.decoder_rows += rows
            return self.model(x, t, y, state=self.full[1])
        # Another arrangement of the rows (CFG's conditional half alone, or both halves): a state per kind of row.
        present = [k for k in (False, True) if bool((null == k).any())]
        missing = [k for k in present if not self._has_kind(k, int((null == k).sum()))]
        if missing == present:  # nothing to reuse (e.g. a guide first called here): compute
            return self._compute(x, t, y, null)
        self.decoder_rows += rows
        if not missing:
            state = self._assemble(null)
            self.full = (null, state)
            return self.model(x, t, y, state=state)
        # One kind has a state (the conditional half), the other none yet: compute that one, reuse the other.
        new = null == missing[0]
        old = ~new
        v_new, s_new = self.model(x[new], t[new], y[new], return_state=True)
        self.encoder_rows += int(new.sum())
        self.kinds[missing[0]] = s_new
        v_old = self.model(x[old], t[old], y[old], state=self._assemble(null[old]))
        v = v_new.new_empty((rows, *v_new.shape[1:]))
        v[new], v[old] = v_new, v_old
        self.full = (null, self._assemble(null))
        return v

    def _compute(self, x, t, y, null):
        v, state = self.model(x, t, y, return_state=True)
        self.encoder_rows += x.shape[0]
        self.decoder_rows += x.shape[0]
        self.full, self.kinds = (null, state), {}
        if self.plan.record:
            for kind in (False, True):
                if bool((null == kind).any()):
                    self._keep(state[null == kind], kind)
        return v

    def _keep(self, state: torch.Tensor, kind: bool) -> None:
        if self.plan.record:
            per_kind = self.plan.states.setdefault(self.name, {}).setdefault(kind, {})
            per_kind[self.plan.clock] = F.normalize(state.float(), dim=-1)

    def _has_kind(self, kind: bool, count: int) -> bool:
        if kind not in self.kinds and self.full is not None and bool((self.full[0] == kind).any()):
            self.kinds[kind] = self.full[1][self.full[0] == kind]
        return kind in self.kinds and self.kinds[kind].shape[0] == count

    def _assemble(self, null: torch.Tensor) -> torch.Tensor:
        first = self.kinds[bool(null[0])]
        state = first.new_empty((null.shape[0], *first.shape[1:]))
        for kind in (False, True):
            if bool((null == kind).any()):
                state[null == kind] = self.kinds[kind]
        return state


# ------------------------------------------------------------------------------------------ schedules, cached
_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple, dict[str, Any]]]" = weakref.WeakKeyDictionary()


def _weights_key(model: Any) -> tuple:
    """Changes when the model's parameters are replaced, moved or modified in place (their version counters)."""
    if model is None:
        return ()
    return (id(model), tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters()))


def schedule_for(model: Any, guide: Any, settings: Any, evaluations: int,
                 run_template: Callable[[Sharing], None], key: tuple = ()) -> dict[str, Any]:
    """The recompute schedule of ``settings.share`` for ``model`` (and AutoGuidance ``guide``) over ``evaluations``
    model evaluations, as ``{"schedule", "template"}`` (``template``: samples, seed and seconds of the dp template
    pass, None for uniform). Mode none: None.

    ``dp`` runs ``run_template(plan)`` once, a full sampling pass of ``settings.share.template`` samples through
    ``plan`` (every evaluation computed, states kept), and solves the DP on its states' similarities. The similarities
    are cached per model (its weights), guide, ``evaluations``, template size and seed and ``key`` (the caller's
    sampling settings the trajectory depends on: sampler, grid, guidance, latent shape, device), and the DP's
    schedule per budget on them: one template pass serves every budget.
    """
    mode = check(model, settings)
    if mode == "none":
        return {"schedule": None, "template": None}
    share = settings.share
    every = int(share.get("every", 1))
    if mode == "uniform":
        return {"schedule": uniform(evaluations, every), "template": None}
    budget = share.get("budget")
    budget = max(1, evaluations // every) if budget is None else int(budget)
    if not 1 <= budget <= evaluations:
        raise UserError(f"sample.share.budget={budget}: the number of recomputes must lie in [1, {evaluations}] "
                        f"(the run makes {evaluations} model evaluations)")
    template, seed = int(share.get("template", 8)), int(share.get("template_seed", 0))
    entry_key = (_weights_key(model), _weights_key(guide), evaluations, template, seed, key)
    cached = _CACHE.setdefault(model, {})
    entry = cached.get(entry_key)
    if entry is None or (guide is not None and entry["guide"]() is not guide):
        plan = Sharing(range(evaluations), evaluations, record=True)
        start = time.perf_counter()
        run_template(plan)
        _sync(model)
        seconds = time.perf_counter() - start
        if plan.clock + 1 != evaluations:
            raise RuntimeError(f"sharing: the template pass made {plan.clock + 1} evaluations, {evaluations} planned")
        entry = {"sim": similarity(plan.states["model"], evaluations), "seconds": round(seconds, 3), "schedules": {},
                 "guide": weakref.ref(guide) if guide is not None else (lambda: None)}
        while len(cached) >= 4:  # a few settings per model (a benchmark compares some); the oldest goes
            cached.pop(next(iter(cached)))
        cached[entry_key] = entry
    if budget not in entry["schedules"]:
        schedule = dp(entry["sim"], budget)
        entry["schedules"][budget] = {
            "schedule": schedule,
            "template": {"samples": template, "seed": seed, "seconds": entry["seconds"],
                         "reuse_cost": round(float(reuse_cost(entry["sim"], schedule)), 6)}}
    return entry["schedules"][budget]


def _sync(model: Any) -> None:
    p = next(iter(model.parameters()), None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


class Record:
    """What a sampling command measures across its batches: samples, sampling seconds (the template pass apart),
    encoder and decoder evaluations per model; ``summary`` is the metadata record."""

    def __init__(self, mode: str, schedule: dict[str, Any] | None, evaluations: int, settings: Any = None):
        self.mode, self.plan, self.evaluations = mode, schedule or {"schedule": None, "template": None}, evaluations
        self.share = settings
        self.samples, self.seconds = 0, 0.0
        self.rows: dict[str, dict[str, int]] = {}

    def add(self, plan: Sharing, samples: int, seconds: float) -> None:
        self.samples += samples
        self.seconds += seconds
        for name, c in plan.counts().items():
            mine = self.rows.setdefault(name, {"encoder": 0, "decoder": 0, "shared": c["shared"]})
            mine["encoder"] += c["encoder"]
            mine["decoder"] += c["decoder"]

    def summary(self) -> dict[str, Any]:
        per = max(self.samples, 1)
        return {
            "mode": self.mode,
            "settings": self.share,
            "evaluations": self.evaluations,  # velocity-field calls of one sampling run (N)
            "schedule": self.plan["schedule"],  # the evaluations that compute the state; null = all (no sharing)
            "recomputes": len(self.plan["schedule"]) if self.plan["schedule"] is not None else self.evaluations,
            "template": self.plan["template"],
            # network evaluations per sample, counted in rows (a CFG pair of halves is 2); "shared": whether that
            # model reused states (a guide without has_state is computed in full)
            "network_evaluations_per_sample": {
                name: {"encoder": r["encoder"] / per, "decoder": r["decoder"] / per, "shared": r["shared"]}
                for name, r in self.rows.items()},
            "samples_timed": self.samples,  # sampled by this process in this invocation (a resumed run skips parts)
            "seconds": round(self.seconds, 3),  # wall time of their sampling (latents; not decoding, not the template)
            "images_per_s": round(self.samples / self.seconds, 4) if self.seconds > 0 else None,
        }
