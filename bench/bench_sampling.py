"""Sampling throughput of a generator: images/s (latents, before decoding) for a sampler setting.

    .venv/bin/python bench/bench_sampling.py --generator lightningdit_b1 --batch 8 --steps 50 --cfg-scale 4
    .venv/bin/python bench/bench_sampling.py --generator sfd_xl1 --batch 8 --method dopri5 --run runs/generator/sfd_sfd_xl1
    .venv/bin/python bench/bench_sampling.py --generator sfd_xl1 --batch 8 --method euler --steps 101 --run ...
    .venv/bin/python bench/bench_sampling.py --generator ditdh_xl --batch 16 --steps 50 --share uniform:2 --share dp:10
    .venv/bin/python bench/bench_sampling.py --generator ddt_xl --batch 16 --steps 251 --cfg-scale 2 --share uniform:4

Samples through `generators.sample.sample_latents` (the command's path) with classifier-free guidance (2 forwards
per evaluation inside the interval) on random weights: the speed of a fixed grid does not depend on the weights.
The generator config's `sample` settings apply (shift, `cfg_interval_start`, `last_step`) unless `--shift` /
`--cfg-interval-start` override them; `key=value` arguments override the config (e.g. `model.input_size=4` for a
small CPU figure; `sample.cfg_schedule=[[0,0.1,0.9],[0.3,1,2.5]]` replaces `--cfg-scale` and the interval). A
semantic-first (SFD) generator samples through `generators.sfd.sample`, and the record gives its model evaluations:
dopri5 chooses its steps from the velocity field, so its count means something only for trained weights (`--run`,
the EMA weights of a run's latest checkpoint); on untrained ones (a zero output layer) it is the minimum.

`--share MODE:K` (repeatable; `uniform:K` recomputes every K-th evaluation, `dp:K` spends K recomputes by DDT's
DP) times encoder sharing (generators/sharing.py) against the unshared run with the same noise and labels: images/s
of both and their ratio, the encoder and decoder evaluations per sample (rows: a CFG pair counts 2), the DP's
template pass (timed apart, not in the shared run's time), and the mean squared difference of the shared latents
from the unshared ones (`mse_vs_unshared`, and divided by the unshared latents' mean square). Random weights give
a zero velocity (zero-initialised output layers), hence identical samples: `--perturb STD` adds N(0, STD^2) noise
to every weight so that the difference is measurable, a pipeline check only; a quality figure needs `--run` or
`--official`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import device_label, emit, sync  # first: puts the repository on sys.path
import torch

from omegaconf import OmegaConf

from core.checkpoint import load_safetensors, load_torch_weights
from core.config import compose
from generators import sfd, sharing
from generators.registry import build_generator, run_config
from core.runtime import finished_checkpoint
from generators.sample import sample_latents, share_schedule
from generators.sampling import evaluations, initial_noise


def parse_share(spec: str) -> dict:
    mode, _, k = spec.partition(":")
    if mode not in ("uniform", "dp") or not k.isdigit() or int(k) < 1:
        raise SystemExit(f"--share {spec!r}: give uniform:K or dp:K with K >= 1")
    return {"mode": "uniform", "every": int(k)} if mode == "uniform" else {"mode": "dp", "budget": int(k)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="lightningdit_b1")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="grid points (steps - 1 model evaluations)")
    p.add_argument("--method", default="euler")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--shift", type=float, default=None, help="default: the config's sample.shift")
    p.add_argument("--cfg-interval-start", type=float, default=None, help="default: the config's")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--run", help="a generator run folder: its config and EMA weights instead of --generator's")
    p.add_argument("--official", help="an official checkpoint file for --generator's model")
    p.add_argument("--share", action="append", default=[], help="uniform:K or dp:K (repeatable)")
    p.add_argument("--perturb", type=float, default=0.0, help="add N(0, STD^2) to every weight (random weights only)")
    p.add_argument("--repeat", type=int, default=1,
                   help="with --share: time every setting this many times, interleaved, and keep the fastest")
    args, rest = p.parse_known_args()
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    if len(overrides) != len(rest):
        p.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides)}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = run_config(f"{args.run}/config.yaml") if args.run else compose("generator", args.generator, None, overrides)
    model = build_generator(cfg.model).to(device).eval()
    if args.run:
        model.load_state_dict(load_safetensors(finished_checkpoint(Path(args.run)) / "ema.safetensors"))
    elif args.official:
        model.load_official_state_dict(load_torch_weights(args.official))
    if args.perturb > 0:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for q in model.parameters():
                if q.requires_grad:
                    q.add_(torch.randn(q.shape, generator=g).to(q) * args.perturb)
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    y = torch.randint(0, cfg.model.num_classes, (args.batch,), generator=torch.Generator().manual_seed(0)).to(device)
    indices = list(range(args.batch))
    changes = {"steps": args.steps, "method": args.method, "cfg_scale": args.cfg_scale, "share": {"mode": "none"}}
    if args.shift is not None:
        changes["shift"] = args.shift
    if args.cfg_interval_start is not None:
        changes["cfg_interval_start"] = args.cfg_interval_start
    settings = OmegaConf.merge(cfg.sample, changes)
    config = {"generator": args.run or args.generator, "batch": args.batch, "steps": args.steps, "method": args.method,
              "cfg_scale": args.cfg_scale, "precision": args.precision, "trained": bool(args.run or args.official),
              "device": device_label(device)}
    if settings.get("cfg_schedule") is not None:  # it replaces the scale (generators.guidance.cfg)
        del config["cfg_scale"]
        config["cfg_schedule"] = OmegaConf.to_container(settings.cfg_schedule)
    if args.share:
        config |= {"shift": settings.shift, "cfg_interval_start": settings.cfg_interval_start,
                   "last_step": settings.get("last_step"), "perturb": args.perturb, "overrides": overrides}

    def timed(s, record: sharing.Record | None = None) -> tuple[torch.Tensor, float]:
        """The latents and the seconds of their sampling (a template pass, if one runs here, is not counted)."""
        record = record or sharing.Record("", None, 0)
        sync(device)
        out = sample_latents(model, y, indices, shape, s, device, record=record)
        return out, record.seconds

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        if sfd.is_semantic_first(model):
            if args.share:
                raise SystemExit("--share: semantic-first (SFD) models have no encoder state to share")
            counts: list[int] = []
            velocity = sfd.guided_velocity(model, y, settings)
            z = initial_noise(indices, shape, 0, device)
            run = lambda steps: sfd.sample(velocity, z, model.semfirst_delta_t,  # noqa: E731
                                           model.in_channels - model.semantic_chans, steps, args.method,
                                           settings.shift, settings.atol, settings.rtol, counter=counts)
            run(3)  # warm-up
            sync(device)
            start = time.perf_counter()
            run(args.steps)
            sync(device)
            seconds = time.perf_counter() - start
            emit("sampling", "images_per_s", args.batch / seconds, "images/s", config)
            emit("sampling", "model_evaluations", counts[-1], "calls", config)
            return
        timed(OmegaConf.merge(settings, {"steps": 3}))  # warm-up
        n = evaluations(args.steps, args.method)
        if not args.share:
            _, seconds = timed(settings)
            emit("sampling", "images_per_s", args.batch / seconds, "images/s", config)
            return
        runs = {"none": (settings, {"schedule": None, "template": None})}
        for spec in args.share:
            s = OmegaConf.merge(settings, {"share": parse_share(spec)})
            runs[spec] = (s, share_schedule(model, None, s, shape, device))  # the DP's template pass, timed apart
        best: dict[str, float] = {}
        outs: dict[str, torch.Tensor] = {}
        records: dict[str, sharing.Record] = {}
        for _ in range(max(1, args.repeat)):  # interleaved, so that a slow spell of a shared machine hits all alike
            for spec, (s, plan) in runs.items():
                record = sharing.Record(str(s.share.mode), plan, n)
                outs[spec], seconds = timed(s, record)
                best[spec] = min(best.get(spec, float("inf")), seconds)
                records[spec] = record
        base = outs["none"].float()
        for spec, (s, plan) in runs.items():
            c = {**config, "share": spec, "repeat": args.repeat}
            emit("sampling", "images_per_s", args.batch / best[spec], "images/s", c)
            emit_counts(records[spec], c)
            if spec == "none":
                continue
            emit("sampling", "speedup_vs_unshared", best["none"] / best[spec], "x", c)
            emit("sampling", "recomputes", len(plan["schedule"]), "evaluations", c)
            mse = (outs[spec].float() - base).pow(2).mean().item()
            # emit rounds to 4 decimals: the differences are given in millionths
            emit("sampling", "mse_vs_unshared", mse * 1e6, "1e-6 latent^2", c)
            emit("sampling", "relative_mse_vs_unshared", mse / max(base.pow(2).mean().item(), 1e-30) * 1e6,
                 "1e-6 of the unshared mean square", c)
            if plan["template"] is not None:
                emit("sampling", "template_seconds", plan["template"]["seconds"], "s", c)


def emit_counts(record: sharing.Record, config: dict) -> None:
    for name, n in record.summary()["network_evaluations_per_sample"].items():
        emit("sampling", f"{name}_encoder_evaluations", n["encoder"], "per sample", config)
        emit("sampling", f"{name}_decoder_evaluations", n["decoder"], "per sample", config)


if __name__ == "__main__":
    main()
