"""Optimizer-step time of a generator config's optimizer (train.optimizer) over the model's parameters, random gradients.

    .venv/bin/python bench/bench_optimizer.py --generator ditdh_ig_xl                      # GMuon, the released model
    .venv/bin/python bench/bench_optimizer.py --generator ditdh_ig_xl --optimizer muon
    .venv/bin/python bench/bench_optimizer.py --generator ditdh_ig_xl --per-shape          # CPU: an estimate

The whole model's step is timed (on GPU after one warm-up step, which holds gram-newton-schulz's compilation).
`--per-shape` times instead one step of the optimizer over one tensor of each distinct 2-D shape, and the other
tensors (AdamW's) at once, and reports their sum weighted by how many tensors share each shape: an estimate, labelled
so, for a CPU, where GMuon's fp16 Newton-Schulz makes a step of the released model take hours (2 CPU cores, AVX2,
torch 2.14: LightningDiT-B/1 18 min by --per-shape; IG-XL's 16 shapes did not finish in 40 min, ~5 h a step by the
Newton-Schulz FLOPs). Each shape's time goes to stderr as it is measured. CPU steps are first steps, so they include
the optimizer's state allocation: small beside Newton-Schulz, but it doubles AdamW's (IG-XL: 8.8 s whole, 18.7 s summed).
"""
from __future__ import annotations

import argparse
import sys

from common import device_label, emit, time_steps  # first: puts the repository on sys.path
import torch

from core.config import compose
from core.optim import OPTIMIZERS, build_optimizer
from generators.registry import build_generator


def step_seconds(params: list[torch.nn.Parameter], train_cfg, device: torch.device, steps: int) -> float:
    """Mean seconds of an optimizer step over `params` (random gradients), after one warm-up step on GPU (CPU steps run
    eagerly: nothing to warm up, and each takes minutes)."""
    holder = torch.nn.ParameterList(params)
    opt = build_optimizer(holder, train_cfg)
    for p in params:
        p.grad = torch.randn_like(p)
    if device.type == "cuda":
        opt.step()
    return time_steps(opt.step, steps, device) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="ditdh_ig_xl", help="a configs/generator/<name>.yaml")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=3, help="timed steps (on GPU after one warm-up step)")
    p.add_argument("--per-shape", action="store_true", help="one tensor per distinct 2-D shape, weighted by counts")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = compose("generator", args.generator)
    if args.optimizer:
        cfg.train.optimizer = args.optimizer
    model = build_generator(cfg.model).to(device)
    trainable = [q for q in model.parameters() if q.requires_grad]
    if args.per_shape:
        by_shape: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
        for q in trainable:
            if q.ndim == 2:
                by_shape.setdefault(tuple(q.shape), []).append(q)
        seconds = 0.0
        for shape, same in by_shape.items():
            one = step_seconds(same[:1], cfg.train, device, args.steps)
            print(f"{shape}: {one:.2f} s x {len(same)}", file=sys.stderr, flush=True)
            seconds += len(same) * one
        seconds += step_seconds([q for q in trainable if q.ndim != 2], cfg.train, device, args.steps)
    else:
        seconds = step_seconds(trainable, cfg.train, device, args.steps)
    config = {"generator": args.generator, "optimizer": cfg.train.optimizer, "device": device_label(device),
              "params_m": round(sum(q.numel() for q in trainable) / 1e6, 2), "steps": args.steps,
              "estimate": "per-shape: one tensor of each 2-D shape x its count" if args.per_shape else None}
    emit("optimizer_step", "step_time", seconds, "s", config)


if __name__ == "__main__":
    main()
