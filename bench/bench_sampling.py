"""Sampling throughput of a generator: images/s (latents, before decoding) for a sampler setting.

    .venv/bin/python bench/bench_sampling.py --generator lightningdit_b1 --batch 8 --steps 50 --cfg-scale 4

Times `generators.sampling.sample` with classifier-free guidance (2 forwards per evaluation
inside the interval) on random weights: the speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import time

from common import device_label, emit, sync  # first: puts the repository on sys.path
import torch

from core.config import compose
from generators.guidance import cfg as cfg_guidance
from generators.registry import build_generator
from generators.sampling import initial_noise, sample


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="lightningdit_b1")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="grid points (steps - 1 model evaluations)")
    p.add_argument("--method", default="euler")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = compose("generator", args.generator)
    model = build_generator(cfg.model).to(device).eval()
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    y = torch.randint(0, cfg.model.num_classes, (args.batch,), device=device)
    z = initial_noise(range(args.batch), shape, 0, device)
    fn = cfg_guidance(model, y, args.cfg_scale)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        sample(fn, z, 3, args.method)  # warm-up
        sync(device)
        start = time.perf_counter()
        sample(fn, z, args.steps, args.method)
        sync(device)
    seconds = time.perf_counter() - start
    config = {"generator": args.generator, "batch": args.batch, "steps": args.steps, "method": args.method,
              "cfg_scale": args.cfg_scale, "precision": args.precision,
              "device": device_label(device)}
    emit("sampling", "images_per_s", args.batch / seconds, "images/s", config)


if __name__ == "__main__":
    main()
