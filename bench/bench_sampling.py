"""Sampling throughput of a generator: images/s (latents, before decoding) for a sampler setting.

    .venv/bin/python bench/bench_sampling.py --generator lightningdit_b1 --batch 8 --steps 50 --cfg-scale 4
    .venv/bin/python bench/bench_sampling.py --generator sfd_xl1 --batch 8 --method dopri5 --run runs/generator/sfd_sfd_xl1
    .venv/bin/python bench/bench_sampling.py --generator sfd_xl1 --batch 8 --method euler --steps 101 --run ...

Times `generators.sampling.sample` with classifier-free guidance (2 forwards per evaluation
inside the interval) on random weights: the speed of a fixed grid does not depend on the weights.
A semantic-first (SFD) generator samples through `generators.sfd.sample`, and the record gives its model
evaluations: dopri5 chooses its steps from the velocity field, so its count means something only for trained
weights (`--run`, the EMA weights of a run's latest checkpoint); on untrained ones (a zero output layer) it is
the minimum.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import device_label, emit, sync  # first: puts the repository on sys.path
import torch

from omegaconf import OmegaConf

from core.checkpoint import load_safetensors
from core.config import compose
from generators import sfd
from generators.guidance import cfg as cfg_guidance
from generators.registry import build_generator, run_config
from generators.sample import finished_checkpoint
from generators.sampling import initial_noise, sample


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="lightningdit_b1")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="grid points (steps - 1 model evaluations)")
    p.add_argument("--method", default="euler")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--run", help="a generator run folder: its config and EMA weights instead of --generator's")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = run_config(f"{args.run}/config.yaml") if args.run else compose("generator", args.generator)
    model = build_generator(cfg.model).to(device).eval()
    if args.run:
        model.load_state_dict(load_safetensors(finished_checkpoint(Path(args.run)) / "ema.safetensors"))
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    y = torch.randint(0, cfg.model.num_classes, (args.batch,), device=device)
    z = initial_noise(range(args.batch), shape, 0, device)
    counts: list[int] = []
    if sfd.is_semantic_first(model):
        settings = OmegaConf.merge(cfg.sample, {"cfg_scale": args.cfg_scale})
        velocity = sfd.guided_velocity(model, y, settings)
        run = lambda steps: sfd.sample(velocity, z, model.semfirst_delta_t, model.in_channels - model.semantic_chans,  # noqa: E731
                                       steps, args.method, counter=counts)
    else:
        fn = cfg_guidance(model, y, args.cfg_scale)
        run = lambda steps: sample(fn, z, steps, args.method)  # noqa: E731
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        run(3)  # warm-up
        sync(device)
        start = time.perf_counter()
        run(args.steps)
        sync(device)
    seconds = time.perf_counter() - start
    config = {"generator": args.run or args.generator, "batch": args.batch, "steps": args.steps, "method": args.method,
              "cfg_scale": args.cfg_scale, "precision": args.precision, "trained": bool(args.run),
              "device": device_label(device)}
    emit("sampling", "images_per_s", args.batch / seconds, "images/s", config)
    if counts:
        emit("sampling", "model_evaluations", counts[-1], "calls", config)


if __name__ == "__main__":
    main()
