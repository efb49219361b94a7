"""`python -m generators.train --latent <name> | --pixels <data> [generator=<family file>] [preset=...] [key=value ...]`

Trains a generator on a latent source, or on images themselves (`--pixels <data config>`: the tokenizer-free JiT and
WiT, latents/pixels.py), with accelerate (one CPU ... many GPUs and nodes):
bf16 autocast on GPU, fused AdamW on CUDA, EMA, optional gradient clipping, gradient
checkpointing and torch.compile. The run folder (``run.dir``) holds the config, JSON-lines
metrics, periodic sample grids and atomic checkpoints; started again with the same folder the
run resumes exactly: the batch of step k depends only on (seed, k), each sample's noise, time and
label drop only on (seed, k, its position in the global batch), and model, EMA and optimizer come from
the last checkpoint. So the process count changes nothing but float reduction order: 1 or 8 processes
with one global batch train the same weights, and a run may resume on another process count. A
non-finite loss stops the run with the last good checkpoint kept.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core import cli
from core.config import named_config, split_cli
from core.errors import MismatchError, UserError
from core.ema import EMA
from core.log import get_logger
from core.runtime import RunFolder, make_accelerator, progress, seed_everything, step_generators
from core.optim import build_optimizer
from generators import flow, sfd
from generators.objective import Objective
from generators.registry import build_generator, upgrade_run_config
from generators.sample import check_cfg_schedule, generator_config, load_guide, sample_latents
from latents.config import load_latent_config
from latents.dataset import build_latent_loader, latent_info
from latents.decode import decode_latents

log = get_logger("generators.train")


# A run may be resumed with these changed: train longer, log or sample differently.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.log_with", "train.ckpt_every", "train.sample_every",
                     "train.keep_checkpoints", "sample.")


class NonFiniteLoss(RuntimeError):
    pass


def parse(argv: list[str]) -> tuple[DictConfig, DictConfig] | None:
    """Returns (run config, latent config), or None after printing the help. `generator=NAME` picks
    configs/generator/NAME.yaml."""
    parser = cli.ArgumentParser(prog="python -m generators.train", add_help=False,
                                description="Train a generator on a latent source (one CPU ... many GPUs and nodes); "
                                            "started again on its run folder, a run resumes exactly.",
                                usage="python -m generators.train --latent NAME | --pixels DATA [generator=NAME] [preset=NAME] "
                                      "[key=value ...]")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--latent", help="a configs/latent/<name>.yaml name or a YAML path")
    source.add_argument("--pixels", metavar="DATA",
                        help="train on the images of a configs/data/<name>.yaml name or YAML path, no tokenizer "
                             "(the latent config pixels:DATA; a preset's section latent.pixels may name an image store)")
    positional, preset, overrides = split_cli(argv)
    if cli.wants_help(positional):
        chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("generator=")]
        print(generator_help(parser, chosen[-1] if chosen else None))
        return None
    args = parser.parse_args(positional)
    if args.pixels:
        args.latent = f"pixels:{args.pixels}"
    latent_cfg = load_latent_config(args.latent, preset)  # the preset's section latent.<name>, if any
    cfg = generator_config(args.latent, preset, overrides)
    if cfg.run.dir is None:
        source = f"pixels_{Path(args.pixels).stem}" if args.pixels else Path(str(args.latent)).stem
        cfg.run.dir = f"runs/generator/{source}_{cfg.generator}"
    OmegaConf.resolve(cfg)  # a preset may write run.dir with ${latent}
    check_cfg_schedule(cfg.sample)  # the sample grids use it: refused now, not at the first grid
    return cfg, latent_cfg


def generator_help(parser: argparse.ArgumentParser, generator: str | None) -> str:
    return "\n".join([
        parser.format_help().rstrip(), "",
        "config groups:", cli.groups_help("latent", "generator", "preset"),
        "  (--latent NAME picks configs/latent/NAME.yaml, whose `generator` is the default; generator=NAME overrides it)", "",
        cli.config_help("generator", generator),
        *([] if generator else ["", "a family's own keys and values: python -m generators.train --help generator=<name>"]),
    ])


def check_against_data(model_cfg: DictConfig, shape: tuple[int, int, int], num_classes: int, latent: str) -> None:
    """Stop before any compute when the latent source does not fit the model."""
    c, h, w = shape
    problems = []
    if model_cfg.in_channels != c:
        problems.append(f"model.in_channels={model_cfg.in_channels} but the latents have {c} channels")
    if model_cfg.input_size != h or h != w:
        problems.append(f"model.input_size={model_cfg.input_size} but the latents are {h}x{w}")
    if num_classes > model_cfg.num_classes:
        problems.append(f"model.num_classes={model_cfg.num_classes} but the data has {num_classes} classes")
    if problems:
        raise MismatchError(f"latent source '{latent}' does not match the model: " + "; ".join(problems))


def step_randomness(seed: int, step: int, global_batch: int, rank: int, world: int, shape: tuple[int, ...],
                    cfg: DictConfig, drop_prob: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise, times and label drops of this process's share of one step, each sample's from its own generator
    (core.runtime.step_generators), drawn in that order."""
    gens = step_generators(seed, step, global_batch, rank, world)
    eps = torch.stack([torch.randn(shape, generator=g) for g in gens]) * float(cfg.noise_scale)
    t = torch.cat([flow.sample_t(1, cfg.time_dist, cfg.time_mu, cfg.time_sigma, cfg.time_shift, generator=g) for g in gens])
    drop = torch.cat([torch.rand(1, generator=g) for g in gens]) < drop_prob
    return eps.to(device), t.to(device), drop.to(device)


def repa_features(objective: Objective, cfg: DictConfig, pixels: bool = False) -> dict[str, Any] | None:
    """What the loader must give beside the latents: REPA's target tokens when the model has a projector, WiT's
    waypoint targets (the PCA'd tokens of `train.waypoints.encoder`) for a waypoint generator."""
    if objective.prediction == "waypoints":
        w = cfg.train.waypoints
        if not w.encoder or not w.pca:
            raise UserError("a waypoint generator (WiT stage A) learns the PCA'd tokens of a frozen encoder: set "
                            "train.waypoints.encoder and train.waypoints.pca (python -m latents.waypoints fits it)")
        # On pixels a token per model patch: the waypoints' grid is then the model's (W_psi's tokens, G_theta's);
        # on latents the encoder's own grid (16 px), which check_targets compares with the model's tokens.
        cell = int(objective.model.patch_size) if pixels else 16
        return {"encoder": str(w.encoder), "weights": w.weights, "random_init": bool(w.random_init), "pca": str(w.pca),
                "cell": cell, "depth": w.depth}
    if not objective.repa:
        return None
    r = cfg.train.repa
    return {"encoder": objective.repa_encoder, "weights": r.encoder_weights, "random_init": bool(r.random_init)}


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The lr multiplier of step `step` (0-based): step / warmup_steps during the warmup, as JiT's per-iteration
    schedule (its first step has lr 0), then 1. A pure function of the step, so a resumed run continues it."""
    return min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0


def decay_factor(step: int, start: int, end: int, final_ratio: float) -> float:
    """The lr multiplier of step `step` (0-based) under a linear decay: 1 before `start`, then linearly down to
    `final_ratio` at `end`, and `final_ratio` from there on (RAEv2's "linear" schedule after its constant
    warmup_epochs, the step of each update as LambdaLR counts it)."""
    if step < start:
        return 1.0
    if step >= end:
        return final_ratio
    return 1.0 - (1.0 - final_ratio) * (step - start) / (end - start)


def lr_factor(step: int, train_cfg: DictConfig) -> float:
    """The lr multiplier of step `step`: the warmup's times the decay's (train.lr_decay), a pure function of the step."""
    factor = warmup_factor(step, int(train_cfg.warmup_steps))
    d = train_cfg.lr_decay
    if d.start is not None:
        factor *= decay_factor(step, int(d.start), int(d.end), float(d.final_lr) / float(train_cfg.lr))
    return factor


def check_lr_schedule(train_cfg: DictConfig) -> None:
    """Refuse a warmup or decay (train.warmup_steps, train.lr_decay) that lr_factor cannot follow."""
    if train_cfg.warmup_steps < 0:
        raise UserError(f"train.warmup_steps={train_cfg.warmup_steps}: give a number of steps >= 0 (0 = no warmup)")
    d = train_cfg.lr_decay
    if (d.start is None) != (d.end is None) or (d.start is None) != (d.final_lr is None):
        raise UserError("train.lr_decay: give start, end and final_lr together (all null: no decay), got "
                        f"start={d.start}, end={d.end}, final_lr={d.final_lr}")
    if d.start is not None and not (0 <= d.start <= d.end and d.final_lr > 0 and train_cfg.lr > 0):
        raise UserError(f"train.lr_decay: need 0 <= start <= end and final_lr, train.lr > 0, got start={d.start}, "
                        f"end={d.end}, final_lr={d.final_lr}, train.lr={train_cfg.lr}")


@torch.no_grad()
def sample_grid(model: torch.nn.Module, cfg: DictConfig, latents: Any, shape: tuple[int, ...],
                device: torch.device, guide: torch.nn.Module | None = None) -> torch.Tensor:
    """Decoded images [N, 3, H, W] of the grid classes, seeded by the sample seed.

    `latents`: the training loader or a latent config (either names the decoding tokenizer).
    `guide`: the AutoGuidance model of `sample.autoguidance` (generators.sample.load_guide), if any.
    """
    s = cfg.sample
    classes = [c for c in s.grid_classes if c < cfg.model.num_classes] or list(range(min(8, cfg.model.num_classes)))
    y = torch.tensor([c for c in classes for _ in range(s.grid_per_class)], device=device)
    return decode_latents(latents, sample_latents(model, y, list(range(len(y))), shape, s, device, guide))


def train(cfg: DictConfig, latent_cfg: DictConfig) -> Path:
    acc = make_accelerator(cfg.train.precision, cfg.train.log_with, cfg.run.dir)
    # Metadata and a model on the meta device only: a missing or mismatched store, or REPA targets that do not fit
    # the projector, stop before the run folder exists.
    info = latent_info(latent_cfg)
    check_against_data(cfg.model, info.latent_shape, info.num_classes, cfg.latent)
    with torch.device("meta"):
        objective = Objective(build_generator(cfg.model), cfg)
    sfd.check_groups(objective.model, info.channel_groups)
    if latent_cfg.pixels is not None and cfg.flow.noise_scale != cfg.model.input_size / 256:
        log.warning("flow.noise_scale=%s on %d px images; JiT's rule is image size / 256 = %g", cfg.flow.noise_scale,
                    cfg.model.input_size, cfg.model.input_size / 256)
    features = repa_features(objective, cfg, pixels=latent_cfg.pixels is not None)
    if features is not None:
        try:
            info = latent_info(latent_cfg, features=features)
        except UserError as e:  # say which setting asked for them: REPA's are named so already
            if objective.prediction != "waypoints":
                raise
            raise type(e)(f"the waypoint targets of train.waypoints ({features['encoder']}): {e}") from e
        objective.check_targets(info.latent_shape, info.feature_shape)
    check_lr_schedule(cfg.train)  # before the run folder: a refused schedule must not become the folder's config
    run = RunFolder(cfg.run.dir, acc)
    run.save_config(cfg, may_change=RESUMABLE_CHANGES, defaults=named_config("generator", "base"), upgrade=upgrade_run_config)
    world, rank = acc.num_processes, acc.process_index
    if cfg.train.global_batch % world:
        raise UserError(f"train.global_batch={cfg.train.global_batch} is not divisible by {world} processes")

    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    model_cfg = OmegaConf.merge(cfg.model, {"options": {"use_checkpoint": cfg.train.grad_checkpointing}})
    model = build_generator(model_cfg)
    if hasattr(model, "prepare_training") and run.latest_checkpoint() is None:
        model.prepare_training(cfg.flow)  # frozen parts trained elsewhere (WiT's W_psi); a resumed run has them already
    loader = build_latent_loader(latent_cfg, cfg.train.global_batch, cfg.run.seed, rank, world, device=acc.device,
                                 info=info, features=features)
    ema = EMA(model, cfg.train.ema_decay).to(acc.device)
    opt = build_optimizer(model, cfg.train)
    base_lrs = [group["lr"] for group in opt.param_groups]
    model, opt = acc.prepare(model, opt)
    step = run.resume(ema)
    run.track(cfg, step)
    forward = torch.compile(model) if cfg.train.compile else model
    n_params = sum(p.numel() for p in acc.unwrap_model(model).parameters())
    log.info("model %s %s: %.2fM parameters; %d process(es), batch %d per process",
             cfg.model.family, cfg.model.size, n_params / 1e6, world, cfg.train.global_batch // world)

    guide = load_guide(cfg) if acc.is_main_process else None  # only the main process draws sample grids
    if guide is not None:
        guide.to(acc.device)
    shape = loader.latent_shape
    drop_prob = acc.unwrap_model(model).y_embedder.dropout_prob
    grids = objective.prediction != "waypoints"  # a waypoint generator makes no images: no sample grids
    if not grids:
        log.info("a waypoint generator predicts waypoints, not images: no sample grids")
    bar = progress(total=cfg.train.steps, initial=step, desc="train", enabled=acc.is_main_process)
    model.train()
    while step < cfg.train.steps:
        x, y, *features = loader.batch(step)
        x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
        eps, t, drop = step_randomness(cfg.run.seed, step, cfg.train.global_batch, rank, world, shape, cfg.flow,
                                       drop_prob, acc.device)
        if loader.kept is not None and not bool(loader.kept.all()):  # an image of this step could not be decoded
            kept = loader.kept.to(acc.device)
            eps, t, drop = eps[kept], t[kept], drop[kept]
        x_t, t, target = objective.path(x, eps, t)
        losses = objective(forward, x_t, t, y, drop, target, features[0] if features else None, step, acc.autocast)
        acc.backward(losses["loss"])
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.train.grad_clip) if cfg.train.grad_clip > 0 else None
        loss_value = acc.reduce(losses["loss"].detach(), "mean").item()
        if not math.isfinite(loss_value):
            kept = run.latest_checkpoint()
            raise NonFiniteLoss(f"loss is {loss_value} at step {step}; stopped without updating the weights. "
                                f"Last good checkpoint: {kept or 'none yet'} (kept). Lower train.lr, set "
                                "train.grad_clip=1.0 or model.options.use_qknorm=true, and resume.")
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * lr_factor(step, cfg.train)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(acc.unwrap_model(model))
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            fields = {k: loss_value if k == "loss" else acc.reduce(v.detach(), "mean").item() for k, v in losses.items()}
            if grad_norm is not None:
                fields["grad_norm"] = float(grad_norm)
            fields["lr"] = opt.param_groups[-1]["lr"]  # the update just made (AdamW's group: train.lr x the schedule)
            run.log(step=step, **fields)
            bar.set_postfix(loss=f"{fields['loss']:.4f}")
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            run.save_training_state(step, ema.state_dict(), keep=cfg.train.keep_checkpoints,
                                    more_weights=ema.extra_state_dicts())
        if grids and acc.is_main_process and (step % cfg.train.sample_every == 0 or step == cfg.train.steps):
            save_samples(ema.model, cfg, loader, shape, acc.device, run.path / "samples" / f"step_{step:07d}.png", guide)
    bar.close()
    acc.wait_for_everyone()
    acc.end_training()
    return run.path


def save_samples(model: torch.nn.Module, cfg: DictConfig, latents: Any, shape: tuple[int, ...],
                 device: torch.device, path: Path, guide: torch.nn.Module | None = None) -> None:
    from torchvision.utils import save_image

    images = sample_grid(model.eval(), cfg, latents, shape, device, guide)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images.float().clamp(-1, 1) + 1) / 2, str(path), nrow=cfg.sample.grid_per_class * 4)


def main(argv: list[str]) -> None:
    parsed = parse(argv)
    if parsed is None:
        return
    cfg, latent_cfg = parsed
    try:
        path = train(cfg, latent_cfg)
    except NonFiniteLoss as e:
        log.error("%s", e)
        raise SystemExit(3) from e
    log.info("done: %s", path)


if __name__ == "__main__":
    cli.run(main)
