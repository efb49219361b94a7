"""Run setup on accelerate: devices, precision, seeding, the run folder, resumable training state.

A run folder holds `config.yaml`, `metrics.jsonl`, and `checkpoints/step_NNNNNNN/` written
atomically (accelerate state for model/optimizer/RNG, `ema.safetensors`, `trainer_state.json`).
"""
from __future__ import annotations

import difflib
import hashlib
import time
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from omegaconf import DictConfig, OmegaConf

from core import faults
from core.checkpoint import atomic_path, load_safetensors, save_safetensors
from core.config import ConfigError
from core.errors import CorruptFileError, UserError
from core.integrity import MANIFEST, folder_problems, write_manifest
from core.lock import WriterLock
from core.log import JsonlWriter, get_logger

log = get_logger("runtime")


# `train.log_with` values -> the packages that provide them (accelerate silently drops a tracker it cannot import).
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
TRACKING_PROJECT = "latentkit"  # the tracker project; TensorBoard writes to <run folder>/latentkit


def make_accelerator(mixed_precision: str = "auto", log_with: str | None = None,
                     run_dir: str | Path | None = None) -> Accelerator:
    """bf16 autocast on GPU, fp32 on CPU ("auto"); without CUDA, `cpu=True` is what makes torchrun give gloo DDP.
    `log_with` (train.log_with): a tracker that also gets the metrics, writing under `run_dir` (RunFolder.track)."""
    if log_with is not None:
        check_tracker(log_with)
    use_cpu = not torch.cuda.is_available()
    precision = ("no" if use_cpu else "bf16") if mixed_precision == "auto" else mixed_precision
    if use_cpu and precision == "bf16":
        log.info("bf16 autocast on CPU is slow; running fp32")
        precision = "no"
    return Accelerator(
        cpu=use_cpu, mixed_precision=precision,
        dataloader_config=DataLoaderConfiguration(split_batches=False),
        log_with=log_with, project_dir=None if log_with is None else str(run_dir),
    )


def check_tracker(name: str) -> None:
    if name not in TRACKERS:
        close = difflib.get_close_matches(name, list(TRACKERS), n=1, cutoff=0.5)
        raise ConfigError(f"train.log_with: unknown tracker {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; choose from {', '.join(TRACKERS)}, or null for metrics.jsonl alone")
    if not any(importlib.util.find_spec(package) for package in TRACKERS[name]):
        raise ConfigError(f"train.log_with={name} needs the {TRACKERS[name][0]} package, which is not installed "
                          f"(pip install {TRACKERS[name][0]}); or train.log_with=null for metrics.jsonl alone")


def derived_seed(*keys: int) -> int:
    """A 64-bit seed for a tuple of keys such as (seed, step, rank): SeedSequence hashes the tuple, so
    (seed, index) pairs never collide the way seed + index would."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])


def step_generators(seed: int, step: int, global_batch: int, rank: int, world: int) -> list[torch.Generator]:
    """One CPU generator per sample of this process's share of a training step, seeded by (seed, step, the
    sample's position in the global batch); rank r holds positions [r * local, (r + 1) * local), as the data
    samplers hand them out. Every random draw of a sample is then the same whichever process makes it, so
    1 or N processes with one global batch train the same weights, and a run resumes on any process count."""
    local = global_batch // world
    return [torch.Generator().manual_seed(derived_seed(seed, step, i)) for i in range(rank * local, (rank + 1) * local)]


def latest_checkpoint(run_dir: str | Path, fallback: bool = True) -> Path | None:
    """The newest finished `checkpoints/step_NNNNNNN` folder of a run whose files match its manifest, if any.

    A checkpoint with a truncated, changed or missing file is named in a warning and skipped for the one
    before it (`fallback`), or refused (`fallback=False`: sampling must not silently use older weights).
    """
    done = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file())
    bad = []
    for ckpt in reversed(done):
        problems = checkpoint_problems(ckpt)
        if not problems:
            if bad:
                log.warning("resuming from %s instead", ckpt)
            return ckpt
        if not fallback:
            older = next((p for p in reversed(done[: done.index(ckpt)]) if not checkpoint_problems(p)), None)
            raise CorruptFileError(f"checkpoint {ckpt} is damaged: {problems[0]}" + (
                f"; the previous good one is {older} (--checkpoint {older})" if older else "; no good checkpoint is left"))
        log.warning("checkpoint %s is damaged and is not used: %s", ckpt, "; ".join(problems[:3]))
        bad.append(ckpt)
    if bad:
        raise CorruptFileError(f"every checkpoint of {run_dir} is damaged ({', '.join(p.name for p in bad)}); the newest: "
                               f"{checkpoint_problems(bad[0])[0]}. Restore them or start a new run folder")
    return None


def finished_checkpoint(path: str | Path) -> Path:
    """A run's latest finished checkpoint folder, or `path` itself when it is a checkpoint folder; a damaged
    one (files that differ from its manifest) is refused, naming the file."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        if problems := checkpoint_problems(path):
            raise CorruptFileError(f"checkpoint {path} is damaged: {problems[0]}")
        return path
    last = latest_checkpoint(path, fallback=False)
    if last is None:
        raise FileNotFoundError(f"{path} is neither a run folder with a finished checkpoint nor a checkpoint folder")
    return last


def checkpoint_problems(folder: Path) -> list[str]:
    """What is wrong with a checkpoint folder against its manifest (none for folders written before manifests)."""
    if not (folder / MANIFEST).is_file():
        return []  # written before manifests existed: nothing to check against
    return folder_problems(folder)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def keep_setup(path: Path, setup: dict[str, Any], what: str, remedy: str) -> dict[str, Any]:
    """Write the settings a resumable folder's partial results belong to (`path`, a JSON file), or check that those
    already there are the same: partial results of other settings must never be mixed into these. Returns the
    settings as stored (JSON types)."""
    setup = json.loads(json.dumps(setup))
    if path.is_file():
        old = json.loads(path.read_text())
        if old != setup:
            differ = sorted(k for k in old.keys() | setup.keys() if old.get(k) != setup.get(k))
            raise UserError(f"{path.parent} holds {what} with other settings (they differ in: {', '.join(differ)}); {remedy}")
        return setup
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(setup, indent=2))
    return setup


class RunFolder:
    """The folder of one run: config, metrics, checkpoints; only the main process writes."""

    def __init__(self, path: str | Path, accelerator: Accelerator) -> None:
        self.path = Path(path)
        self.acc = accelerator
        self.ckpt_dir = self.path / "checkpoints"
        if accelerator.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.lock = WriterLock(self.path / ".lock", f"run folder {self.path}").acquire()
        accelerator.wait_for_everyone()
        self.metrics = JsonlWriter(self.path / "metrics.jsonl")

    def save_config(self, cfg: DictConfig, may_change: tuple[str, ...] = (), defaults: DictConfig | None = None,
                    upgrade: Callable[[DictConfig], DictConfig] | None = None) -> None:
        """Write the config. A resumed run must use the config it started with, except for keys
        under the prefixes in `may_change` (e.g. more steps, other logging intervals). A key the saved config
        lacks (added by a later version of latentkit) is no difference while it has its `defaults` value, the
        one that does what the older version did; `upgrade` renames what a later version renamed."""
        path = self.path / "config.yaml"
        if path.is_file():
            saved = OmegaConf.load(path)
            old, new = _flat(upgrade(saved) if upgrade else saved), _flat(cfg)
            default = _flat(defaults) if defaults is not None else {}
            missing = object()
            diff = sorted(k for k in set(old) | set(new)
                          if old.get(k, default.get(k, missing)) != new.get(k) and not k.startswith(tuple(may_change)))
            if diff:
                raise UserError(
                    f"{self.path} holds a run with a different config ({', '.join(diff[:8])} differ); "
                    "use a new run folder, or the same settings to resume"
                )
        if self.acc.is_main_process:
            path.write_text(OmegaConf.to_yaml(cfg))

    def track(self, cfg: DictConfig, step: int) -> None:
        """Start the tracker of `make_accelerator(log_with=...)`, if any. A new run records its config; a resumed
        one (`step` > 0, its checkpoint's) continues the same TensorBoard folder and W&B run, and TensorBoard
        hides what a crashed run logged after that checkpoint (`purge_step`), so no step appears twice."""
        if not self.acc.log_with:
            return
        first = step + 1 if step else 0  # the first step this run logs (a new one logs step 0)
        init_kwargs = {"tensorboard": {"purge_step": first},
                       # One W&B run per run folder: its id comes from the folder's path.
                       "wandb": {"name": self.path.name, "dir": str(self.path), "resume": "allow",
                                 "id": hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:16]}}
        config = None if step else {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
                                    for k, v in _flat(cfg).items()}
        self.acc.init_trackers(TRACKING_PROJECT, config=config, init_kwargs=init_kwargs)

    def log(self, **fields: Any) -> None:
        """A record of metrics.jsonl; its numbers also go to the tracker, at its step (event records do not)."""
        if self.acc.is_main_process:
            self.metrics.write(**fields)
            if self.acc.trackers and "step" in fields and "event" not in fields:
                self.acc.log({k: v for k, v in fields.items()
                              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)},
                             step=fields["step"])

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def save_training_state(self, step: int, ema_state: dict[str, torch.Tensor] | None, keep: int = 2,
                            more_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """All ranks call this. Writes to a temporary folder, then the main process renames it. `more_weights`:
        {file stem: state} of further weights-only snapshots (the averages of more EMA decays)."""
        final = self.ckpt_dir / f"step_{step:07d}"
        tmp = self.ckpt_dir / f".step_{step:07d}.tmp"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp), safe_serialization=True)
        if self.acc.is_main_process:
            if ema_state is not None:
                save_safetensors(ema_state, tmp / "ema.safetensors")
            for stem, state in (more_weights or {}).items():
                save_safetensors(state, tmp / f"{stem}.safetensors")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
            faults.point("checkpoint")
            write_manifest(tmp)  # last: a checkpoint is trusted only with it
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if keep > 0:  # the newest `keep` checkpoints stay, this one included
                for old in sorted(self.ckpt_dir.glob("step_*"))[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def resume(self, ema: Any | None) -> int:
        """Load the latest checkpoint, if any (model, optimizers and RNG through accelerate, and `ema`'s weights):
        the step to continue from, 0 for a new run."""
        latest = self.latest_checkpoint()
        if latest is None:
            return 0
        state, ema_state = self.load_training_state(latest)
        if ema is not None:
            ema.load_state_dict(ema_state)
            if extra := getattr(ema, "extra_state_dicts", lambda: {})():
                missing = [stem for stem in extra if not (latest / f"{stem}.safetensors").is_file()]
                if missing:
                    raise UserError(f"{latest} holds no {missing[0]}.safetensors, but the run keeps that EMA decay: "
                                    "resume with the decays it was started with")
                ema.load_extra_state_dicts({stem: load_safetensors(latest / f"{stem}.safetensors") for stem in extra})
        log.info("resumed from %s at step %d", latest, state["step"])
        return int(state["step"])

    def load_training_state(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        self.acc.load_state(str(folder))
        state = json.loads((folder / "trainer_state.json").read_text())
        ema = load_safetensors(folder / "ema.safetensors") if (folder / "ema.safetensors").is_file() else None
        return state, ema


def _flat(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in _walk(OmegaConf.to_container(cfg, resolve=True))}


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


def progress(iterable=None, total: int | None = None, desc: str = "", initial: int = 0, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True)


class StepMeans:
    """A training loop's step logs averaged between two reports; the sums stay on the device until reported."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.tick = 0, time.time()

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.count += 1

    def report(self) -> dict[str, float]:
        """The means since the last report and `sec_per_step`; starts the next interval."""
        now = time.time()
        means = {k: v.item() / self.count for k, v in self.sums.items()}
        means["sec_per_step"] = (now - self.tick) / self.count
        self.sums, self.count, self.tick = {}, 0, now
        return means


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, sample, checkpoint) runs after `step`: every `every` steps and at the last."""
    return step % every == 0 or step == last


def tokenizer_step_done(run: RunFolder, cfg: DictConfig, step: int, means: StepMeans, bar: Any,
                        evaluate: Callable[[int], None], ema: Any, postfix: dict[str, str]) -> None:
    """A tokenizer loop's bookkeeping after update `step` (its logs already in `means`): the bar, the interval's means
    logged when `log.every` is due (`postfix`: bar key -> format of a logged value), `evaluate(step)` when
    `log.sample_every` is, and a checkpoint (with the EMA weights) when `log.checkpoint_every` is."""
    bar.update(1)
    if due(step, cfg.log.every, cfg.train.steps):
        logged = means.report()
        run.log(step=step, **logged)
        bar.set_postfix({key: fmt.format(logged[key]) for key, fmt in postfix.items()})
    if due(step, cfg.log.sample_every, cfg.train.steps):
        evaluate(step)
    if due(step, cfg.log.checkpoint_every, cfg.train.steps):
        run.save_training_state(step, ema.state_dict() if ema else None, keep=cfg.log.keep_checkpoints)


def fused_adam_kwargs() -> dict[str, Any]:
    return {"fused": True} if torch.cuda.is_available() else {}
