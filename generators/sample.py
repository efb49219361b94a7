"""`python -m generators.sample --run <run dir> --num N --out samples.npz [sample.key=value ...]`

Samples a trained generator (the EMA weights of its latest checkpoint, or `--checkpoint`), or
an official release (`--official file.pt --latent <name> [generator=<family file>]`; the default
generator is the latent config's; a pixel-space release, JiT's, takes `--pixels <data>` instead and decodes
nothing), decodes the latents with the latent config's tokenizer and
writes an ADM-format `.npz` (`arr_0` uint8 NHWC, `arr_1` labels) plus a PNG grid. Guidance: CFG
(`sample.cfg_scale`, interval, channels; or `sample.cfg_schedule`, a scale per time segment) and, on top
of it, AutoGuidance by a weaker model (`sample.autoguidance.guide=<run folder | checkpoint folder | official
file>`, `.scale`, `.interval`). Labels are class-balanced (sample i has class i mod num_classes) or random.
Sample i depends only on (seed, i): the result does not depend on the batch size or the number
of processes (`torchrun --nproc_per_node K -m generators.sample ...` splits the work). Chunks
are written as they finish, so an interrupted run resumes.

Encoder sharing (`sample.share`, generators/sharing.py): an encoder-decoder model (DiT^DH, DDT) reuses its encoder's
output between the recompute evaluations of a uniform or DP schedule; the DP's template pass runs once per run. The
record beside the samples (`sharing`) gives the schedule, the encoder and decoder evaluations per sample and the
sampling wall time of this invocation (the template pass timed apart), with or without sharing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from typing import Any, Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from core import cli
from core.checkpoint import atomic_path, load_safetensors, load_torch_weights
from core.cli import UsageError
from core.config import CONFIG_DIR, apply_overrides, compose, load_yaml, parse_overrides, split_cli, to_dict
from core.ema import weights_name
from core.errors import MismatchError, UserError
from core.integrity import problem, sha256_file, write_recorded
from core.lock import WriterLock
from core.log import get_logger
from core.provenance import code_version, provenance_file
from core.runtime import finished_checkpoint, keep_setup, make_accelerator, progress
from core.samples import save_npz, save_samples_npz, to_uint8
from generators import sfd, sharing
from generators.guidance import cfg as cfg_guidance
from generators.guidance import check_schedule, conditional, guided
from generators.registry import build_generator, run_config
from generators.sampling import DenoiseFn, evaluations, initial_noise, sample, sample_generators
from latents.config import load_latent_config
from latents.decode import latent_decoder

log = get_logger("generators.sample")


def parse(argv: list[str]) -> tuple[argparse.Namespace, DictConfig]:
    p = cli.ArgumentParser(prog="python -m generators.sample",
                           description="Sample a trained generator or an official release into an ADM .npz and a PNG grid.",
                           epilog="key=value overrides the run's config (sample.* keys: configs/generator/base.yaml)")
    p.add_argument("--run", help="a generator run folder (uses its config and EMA weights)")
    p.add_argument("--checkpoint", help="a checkpoints/step_NNNNNNN folder of the run (default: the latest)")
    p.add_argument("--official", help="an official checkpoint file; needs --latent and generator=<name>")
    p.add_argument("--latent", help="latent config (default: the run's)")
    p.add_argument("--pixels", metavar="DATA", help="an --official pixel-space model (JiT): the latent config pixels:DATA")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output .npz (a PNG grid is written beside it)")
    p.add_argument("--labels", choices=["balanced", "random"], default="balanced")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--part-size", type=int, default=500,
                   help="samples per part file: an interrupted run resumes after its last finished part")
    positional, preset, overrides = split_cli(argv)
    args = p.parse_args(positional)
    if args.pixels:
        if args.latent:
            raise UsageError("give --latent or --pixels, not both")
        args.latent = f"pixels:{args.pixels}"
    if args.run:
        config = Path(args.run) / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"--run {args.run}: not a generator run folder ({config} is missing)")
        cfg = with_new_sample_keys(run_config(config))
        apply_overrides(cfg, parse_overrides(overrides), "the sampling command line")
    elif args.official:
        if not args.latent:
            raise UsageError("--official needs --latent <name> (or --pixels <data> for a pixel-space model)")
        cfg = generator_config(args.latent, preset, overrides)
    else:
        raise UsageError("give --run <run folder> or --official <file> (see --help)")
    if args.latent:
        cfg.latent = args.latent
    check_cfg_schedule(cfg.sample)
    return args, cfg


def with_new_sample_keys(cfg: DictConfig) -> DictConfig:
    """A run config saved before `sample.last_step`, `sample.share`, `sample.cfg_schedule`, `sample.cfg_interval_open`,
    `sample.ema` and the noise scale existed gets their defaults (off; the noise scale that run trained with), so
    that its samples can set them."""
    base = load_yaml(CONFIG_DIR / "generator" / "base.yaml").sample
    for key in ("last_step", "share", "cfg_schedule", "cfg_interval_open", "ema"):
        if key not in cfg.sample:
            cfg.sample[key] = base[key]
    if "noise_scale" not in cfg.sample:
        cfg.sample.noise_scale = cfg.flow.get("noise_scale", 1.0)
    return cfg


def generator_config(latent: str, preset: str | None, overrides: list[str]) -> DictConfig:
    """The generator config of a latent config: `generator=NAME` among the overrides picks
    configs/generator/NAME.yaml, else the latent config's `generator`. Records latent, preset and
    generator, from which a sampling command rebuilds the latent config."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("generator=")]
    generator = chosen[-1] if chosen else load_latent_config(latent, preset).generator
    cfg = compose("generator", generator, preset, [o for o in overrides if not o.startswith("generator=")])
    OmegaConf.set_struct(cfg, False)
    cfg.latent, cfg.preset, cfg.generator = latent, preset, generator
    return cfg


def ema_file(ckpt: Path, cfg: DictConfig) -> Path:
    """The EMA weights `sample.ema` picks in checkpoint `ckpt`: `ema.safetensors` for the first decay of
    `train.ema_decay` (or when unset), `ema_<decay>.safetensors` for another one the run keeps."""
    chosen = cfg.sample.get("ema")
    kept = cfg.train.ema_decay
    kept = [float(d) for d in kept] if OmegaConf.is_list(kept) else [float(kept)]
    if chosen is None or float(chosen) == kept[0]:
        return ckpt / "ema.safetensors"
    if float(chosen) not in kept:
        raise UserError(f"sample.ema={chosen}: the run keeps the EMA decays {kept} (train.ema_decay)")
    return ckpt / f"{weights_name(float(chosen))}.safetensors"


def load_model(args: argparse.Namespace, cfg: DictConfig, ckpt: Path | None = None) -> torch.nn.Module:
    """The official file, or the EMA weights of `ckpt` (default: the run's checkpoint, checked against its manifest)."""
    model = build_generator(cfg.model)
    if args.official:
        model.load_official_state_dict(load_torch_weights(args.official))
        return model.eval()
    ckpt = ckpt or finished_checkpoint(Path(args.checkpoint or args.run))
    weights = ema_file(ckpt, cfg)
    model.load_state_dict(load_safetensors(weights), strict=True)
    log.info("EMA weights from %s", weights)
    return model.eval()


def load_guide(cfg: DictConfig) -> torch.nn.Module | None:
    """The AutoGuidance model named by `sample.autoguidance.guide` (eval mode), or None when unset.

    `guide` is one of our run folders (the EMA weights of its latest checkpoint; family, size and
    options from its config.yaml), one of its `checkpoints/step_N` folders, or an official checkpoint
    file, built as the main model's family at `guide_size` (RAE's DiTDH-S_ep14/stage2_model.pt: S).
    """
    ag = cfg.sample.get("autoguidance")
    if ag is None or not ag.guide:
        return None
    path = Path(ag.guide)
    if path.is_file():
        model = build_generator(OmegaConf.merge(cfg.model, {"size": ag.guide_size}))
        model.load_official_state_dict(load_torch_weights(path))
    else:
        ckpt = finished_checkpoint(path)
        guide_model = run_config(ckpt.parent.parent / "config.yaml").model
        for key in ("in_channels", "input_size", "num_classes"):
            if guide_model[key] != cfg.model[key]:
                raise MismatchError(f"AutoGuidance guide {path} has model.{key}={guide_model[key]}, "
                                 f"the sampled model {cfg.model[key]}")
        model = build_generator(guide_model)
        model.load_state_dict(load_safetensors(ckpt / "ema.safetensors"), strict=True)
    log.info("AutoGuidance: guide %s at scale %s over t in %s", path, ag.scale, list(ag.interval))
    return model.eval()


def denoise_fn(model: torch.nn.Module, y: torch.Tensor, s: DictConfig,
               guide: torch.nn.Module | None = None) -> DenoiseFn:
    """The velocity field that `sample` settings `s` describe: Internal Guidance (scale, interval) first, then
    CFG (scale, interval, channels), and on top of it AutoGuidance away from `guide` (scale, interval) when there
    is one. `cfg_schedule`, when set, replaces cfg_scale and cfg_interval_start. Configs from before Internal
    Guidance existed have no ig_* keys: no IG."""
    fn = cfg_guidance(model, y, s.cfg_scale, (s.cfg_interval_start, 1.0),
                      list(s.cfg_channels) if s.cfg_channels is not None else None,
                      s.get("ig_scale", 1.0), tuple(s.get("ig_interval", (0.0, 1.0))), s.get("cfg_schedule"),
                      bool(s.get("cfg_interval_open", False)))
    if guide is None:
        return fn
    return guided(fn, conditional(guide, y), s.autoguidance.scale, tuple(s.autoguidance.interval))


def check_cfg_schedule(s: DictConfig) -> None:
    """Refuse a bad `sample.cfg_schedule` before any model is loaded, and say that it overrides a cfg_scale that
    would otherwise guide."""
    if s.get("cfg_schedule") is None:
        return
    check_schedule(s.cfg_schedule)
    if s.cfg_scale > 1:
        log.info("sample.cfg_schedule %s replaces sample.cfg_scale=%s and sample.cfg_interval_start=%s",
                 to_dict(s.cfg_schedule), s.cfg_scale, s.cfg_interval_start)


def labels_for(num: int, num_classes: int, how: str, seed: int) -> np.ndarray:
    if how == "balanced":
        return np.arange(num) % num_classes
    return np.random.default_rng(seed).integers(0, num_classes, size=num)


def _trajectory_key(s: DictConfig, shape: tuple[int, ...], device: torch.device) -> tuple:
    """What a sampling trajectory depends on besides the weights, noise and labels: the key of a cached schedule."""
    settings = {k: v for k, v in to_dict(s).items() if k not in ("share", "seed") and not k.startswith("grid_")}
    return (json.dumps(settings, sort_keys=True, default=str), tuple(shape), str(device), torch.is_autocast_enabled())


def share_schedule(model: torch.nn.Module, guide: torch.nn.Module | None, s: DictConfig, shape: tuple[int, ...],
                   device: torch.device) -> dict[str, Any]:
    """`sharing.schedule_for` the settings `s`: {"schedule": recompute evaluations or None, "template": ...}. The
    DP's template pass samples `s.share.template` noises and random labels of `s.share.template_seed` with the
    run's sampler and guidance, every evaluation computed; cached per model, guide and settings."""
    n = evaluations(s.steps, s.method)

    def run_template(plan: sharing.Sharing) -> None:
        count, seed = int(s.share.template), int(s.share.template_seed)
        y = torch.randint(0, model.num_classes, (count,), generator=torch.Generator().manual_seed(seed)).to(device)
        z = start_noise(range(count), shape, seed, s, device)
        fn = plan.denoise(denoise_fn(plan.wrap(model), y, s, plan.wrap(guide, "guide")))
        sample(fn, z, s.steps, s.method, s.shift, generators=sample_generators(range(count), seed, stream=1),
               last_step=s.get("last_step"))

    return sharing.schedule_for(model, guide, s, n, run_template, _trajectory_key(s, shape, device))


def start_noise(indices: Any, shape: tuple[int, ...], seed: int, s: DictConfig, device: torch.device) -> torch.Tensor:
    """The sampler's start: `initial_noise` of these samples times `sample.noise_scale` (JiT: image size / 256)."""
    return initial_noise(indices, shape, seed, device) * float(s.get("noise_scale", 1.0))


def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample_latents(model: torch.nn.Module, y: torch.Tensor, indices: list[int], shape: tuple[int, ...], s: DictConfig,
                   device: torch.device, guide: torch.nn.Module | None = None,
                   record: sharing.Record | None = None) -> torch.Tensor:
    """Latents of the samples `indices` (their noise is seeded per index) with labels `y`, by the settings `s`
    (encoder sharing by `s.share` included). `record`: gets the evaluation counts and the sampling wall time."""
    z = start_noise(indices, shape, s.seed, s, device)
    sharing.check(model, s)
    start = time.perf_counter()
    if sfd.is_semantic_first(model):
        if s.get("last_step") is not None:
            raise UserError("sample.last_step: semantic-first (SFD) sampling integrates its own grid over [0, 1 + delta]; "
                            "set it to null")
        out = sfd.sample(sfd.guided_velocity(model, y, s, guide), z, model.semfirst_delta_t,
                         model.in_channels - model.semantic_chans, s.steps, s.method, s.shift,
                         s.get("atol", 1e-6), s.get("rtol", 1e-3))
        plan = sharing.Sharing(None, 0)
    else:
        # A command's record holds the plan made once before its first part; without one, the (cached) schedule.
        schedule = record.plan["schedule"] if record is not None else None
        if schedule is None:
            schedule = share_schedule(model, guide, s, shape, device)["schedule"]
        plan = sharing.Sharing(schedule, evaluations(s.steps, s.method))
        start = time.perf_counter()  # after the template pass, if this call ran it
        gens = sample_generators(indices, s.seed, stream=1)  # the SDE's per-step noise, per sample
        fn = plan.denoise(denoise_fn(plan.wrap(model), y, s, plan.wrap(guide, "guide")))
        out = sample(fn, z, s.steps, s.method, s.shift, generators=gens, last_step=s.get("last_step"))
    if record is not None:
        _sync(device)
        record.add(plan, len(indices), time.perf_counter() - start)
    return out


def sharing_record(model: torch.nn.Module, guide: torch.nn.Module | None, cfg: DictConfig,
                   device: torch.device) -> sharing.Record:
    """The sharing plan of a sampling command, made once before its first part (the DP's template pass runs here,
    timed apart), as the record its batches add to. Refuses a model that cannot share, naming its family."""
    s = cfg.sample
    mode = sharing.check(model, s, family=f"model.family={cfg.model.family}")
    if sfd.is_semantic_first(model):
        return sharing.Record(mode, None, None, to_dict(s.get("share")) if s.get("share") is not None else None)
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    plan = share_schedule(model, guide, s, shape, device)
    if plan["schedule"] is not None:
        log.info("encoder sharing (%s): %d of %d evaluations compute the state: %s", mode, len(plan["schedule"]),
                 evaluations(s.steps, s.method), plan["schedule"])
    return sharing.Record(mode, plan, evaluations(s.steps, s.method), to_dict(s.share) if s.get("share") is not None else None)


def sample_chunk(model, cfg: DictConfig, decode: Callable[[torch.Tensor], torch.Tensor], indices: np.ndarray,
                 labels: np.ndarray, batch_size: int, device: torch.device,
                 guide: torch.nn.Module | None = None, record: sharing.Record | None = None) -> np.ndarray:
    """uint8 images of the samples `indices`; `decode` from latents.decode.latent_decoder."""
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    out = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        y = torch.as_tensor(labels[idx], device=device)
        out.append(to_uint8(decode(sample_latents(model, y, idx.tolist(), shape, cfg.sample, device, guide, record))))
    return np.concatenate(out)


def sample_provenance(args: argparse.Namespace, cfg: DictConfig, ckpt: Path | None) -> dict[str, Any]:
    """What the samples depend on, for their record `<out>.json` (eval.gen puts it in metrics.json): the
    generator's and guide's weights with their sha256, the labels, every sampling setting, the code version.

    `ckpt`: the checkpoint the weights came from (None for an official file), resolved once before sampling, so
    a run that saves a newer checkpoint meanwhile is not named for the one used.
    """
    if args.official:
        generator = {"official_file": str(Path(args.official).resolve()), "sha256": sha256_file(args.official),
                     "ema": "unknown: official file (its 'ema' entry is used if it has one)"}
    else:
        weights = ema_file(ckpt, cfg)
        generator = {"run": str(Path(args.run).resolve()), "checkpoint": str(ckpt.resolve()), "ema": True,
                     "weights": weights.name, "sha256": sha256_file(weights)}
    ag = cfg.sample.get("autoguidance")
    guide = None
    if ag is not None and ag.guide:
        weights = Path(ag.guide) if Path(ag.guide).is_file() else finished_checkpoint(Path(ag.guide)) / "ema.safetensors"
        guide = {"weights": str(weights.resolve()), "sha256": sha256_file(weights)}
    return {
        "command": "generators.sample",
        "num_samples": args.num,
        "labels": args.labels,  # balanced: sample i has class i mod num_classes; random: drawn with sample.seed
        "num_classes": cfg.model.num_classes,
        # sampler, steps, shift, seed, CFG scale/interval/channels, AutoGuidance; the grid_* keys only shape training grids
        "sample": {k: v for k, v in to_dict(cfg.sample).items() if not k.startswith("grid_")},
        "generator": generator,
        "guide": guide,
        "model": to_dict(cfg.model),
        "latent": str(cfg.latent),
        "preset": cfg.get("preset"),
        "code_version": code_version(),
    }


def main(argv: list[str]) -> None:
    args, cfg = parse(argv)
    acc = make_accelerator("no")
    out = Path(args.out)
    parts = out.with_name(out.stem + ".parts")
    lock = WriterLock(out.with_name(out.name + ".lock"), f"samples {out}").acquire() if acc.is_main_process else None
    # Resolved and checked once: verifying a checkpoint reads every byte of it.
    ckpt = None if args.official else finished_checkpoint(Path(args.checkpoint or args.run))
    model = load_model(args, cfg, ckpt).to(acc.device)
    guide = load_guide(cfg)
    guide = guide.to(acc.device) if guide is not None else None
    sharing.check(model, cfg.sample, family=f"model.family={cfg.model.family}")  # before any sampling
    provenance = sample_provenance(args, cfg, ckpt) if acc.is_main_process else None
    decode = latent_decoder(load_latent_config(cfg.latent, cfg.get("preset")))
    labels = labels_for(args.num, cfg.model.num_classes, args.labels, cfg.sample.seed)
    if acc.is_main_process:
        keep_setup(parts / "setup.json", {"num": args.num, "part_size": args.part_size, "labels": args.labels,
                                          "model": to_dict(cfg.model), "sample": to_dict(cfg.sample), "latent": str(cfg.latent),
                                          "weights": args.official or str(ckpt)},
                   "the parts of an interrupted sampling run", "run it with the same settings to finish it, or delete the folder")
    acc.wait_for_everyone()
    record = sharing_record(model, guide, cfg, acc.device)  # the DP's template pass, once
    starts = list(range(0, args.num, args.part_size))
    mine = [s for k, s in enumerate(starts) if k % acc.num_processes == acc.process_index]
    for start in progress(mine, desc="sample", enabled=acc.is_main_process):
        part = parts / f"{start:08d}.npz"
        if (why := problem(part)) is None:
            continue
        if part.is_file():
            log.warning("sampling part again: %s", why)
        images = sample_chunk(model, cfg, decode, np.arange(start, min(start + args.part_size, args.num)), labels,
                              args.batch_size, acc.device, guide, record)
        write_recorded(part, lambda tmp: save_npz(tmp, images=images))
    acc.wait_for_everyone()
    if acc.is_main_process:
        # Every part was checked (or written) by the process that owns it in the loop above.
        images = np.concatenate([np.load(parts / f"{s:08d}.npz")["images"] for s in starts])
        save_samples_npz(out, images, labels)
        with atomic_path(provenance_file(out)) as tmp:  # before the parts go: a crash here resumes
            tmp.write_text(json.dumps({**provenance, "sharing": record.summary(), "samples_sha256": sha256_file(out)},
                                      indent=2))
        save_grid(images, labels, cfg.model.num_classes, out.with_suffix(".png"))
        shutil.rmtree(parts)
        lock.release()
        log.info("wrote %d samples to %s (grid: %s)", len(images), out, out.with_suffix(".png"))


def save_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, path: Path, per_class: int = 8,
              max_classes: int = 16) -> None:
    """One row per class (the first `max_classes` classes present), `per_class` samples each."""
    from torchvision.utils import save_image

    rows = []
    for c in range(num_classes):
        picked = np.flatnonzero(labels == c)[:per_class]
        if len(picked) == per_class:
            rows.append(images[picked])
        if len(rows) == max_classes:
            break
    if not rows:
        return
    grid = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 255
    save_image(grid, str(path), nrow=per_class)


if __name__ == "__main__":
    cli.run(main)
