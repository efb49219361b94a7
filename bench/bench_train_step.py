"""Generator training-step throughput: images/s and peak memory for a model, batch and precision.

    .venv/bin/python bench/bench_train_step.py --generator lightningdit_b1 --batch 16 [--steps 10]
    .venv/bin/python bench/bench_train_step.py --generator lightningdit_xl1 --batch 256 --precision bf16 --compile
    .venv/bin/python bench/bench_train_step.py --generator lightningdit_xl1 --batch 64 --ig-depth 8
    .venv/bin/python bench/bench_train_step.py --generator lightningdit_xl1 --batch 64 --repa-depth 8 --repa store
    .venv/bin/python bench/bench_train_step.py --generator lightningdit_xl1 --batch 64 --repa-depth 8 --repa online
    .venv/bin/python bench/bench_train_step.py --generator ditdh_ig_xl --batch 128 --precision bf16   # RAEv2, GMuon

One step = forward + the training objective (generators.objective: flow loss, and the IG head's MSE and the
REPA term when asked) + backward + optimizer step (train.optimizer of the config, or --optimizer) + EMA
update, on random latents of the model's shape, as generators.train runs it. REPA targets: `store` gives the
step fp16 features as a store read returns them (the read itself is bench_loader's), `online` computes them
from the step's 256 px images with the target encoder (DINOv2-B at 224 px; random weights of the real
architecture: the cost is the same). Peak memory is CUDA's max_memory_allocated on GPU, the process's peak RSS
on CPU.
"""
from __future__ import annotations

import argparse

from common import device_label, emit_steps, time_steps  # first: puts the repository on sys.path
import torch

from core.config import compose
from core.ema import EMA
from core.optim import OPTIMIZERS, build_optimizer
from generators import flow
from generators.objective import Objective
from generators.registry import build_generator
from tokenizers.encoders import build_feature_encoder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="lightningdit_b1", help="a configs/generator/<name>.yaml")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: the config's")
    p.add_argument("--ig-depth", type=int, default=None, help="an internal-guidance head after this block (default: the config's)")
    p.add_argument("--repa-depth", type=int, default=None, help="a REPA projector after this block (default: the config's)")
    p.add_argument("--repa", choices=["store", "online"], default="store", help="where the REPA targets come from")
    p.add_argument("--repa-encoder", default=None, help="default: the config's")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = compose("generator", args.generator)
    cfg.model.options = {**cfg.model.options, "use_checkpoint": args.grad_checkpointing}
    for key, value in (("ig_depth", args.ig_depth), ("repa_depth", args.repa_depth), ("repa_encoder", args.repa_encoder)):
        if value is not None:
            cfg.model[key] = value
    if args.optimizer:
        cfg.train.optimizer = args.optimizer
    model = build_generator(cfg.model).to(device).train()
    objective = Objective(model, cfg)
    ema = EMA(model, 0.9999)
    opt = build_optimizer(model, cfg.train)
    fwd = torch.compile(model) if args.compile else model
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    x = torch.randn(args.batch, *shape, device=device)
    y = torch.randint(0, cfg.model.num_classes, (args.batch,), device=device)
    encoder = build_feature_encoder(cfg.model.repa_encoder, random_init=True).to(device) if objective.repa else None
    images = torch.rand(args.batch, 3, 256, 256, device=device) * 2 - 1
    stored = encoder(images[:1]).expand(args.batch, -1, -1).half().contiguous() if encoder is not None else None
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731

    def targets() -> torch.Tensor | None:
        if encoder is None:
            return None
        if args.repa == "store":
            return stored.float()
        with torch.no_grad(), autocast():
            return encoder(images).float()

    def step() -> None:
        eps = torch.randn_like(x)
        t = flow.sample_t(args.batch, device=device)
        drop = torch.zeros(args.batch, dtype=torch.bool, device=device)
        x_t, t, target = objective.path(x, eps, t)  # x-prediction models (RAEv2's, JiT) clip their target
        losses = objective(fwd, x_t, t, y, drop, target, targets(), 0, autocast)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    for _ in range(3):
        step()
    seconds = time_steps(step, args.steps, device)
    n_params = sum(q.numel() for q in model.parameters())
    config = {"generator": args.generator, "params_m": round(n_params / 1e6, 2), "batch": args.batch,
              "precision": precision, "compile": args.compile, "grad_checkpointing": args.grad_checkpointing,
              "optimizer": cfg.train.optimizer, "ig_depth": cfg.model.ig_depth, "repa_depth": cfg.model.repa_depth,
              "repa": args.repa if objective.repa else None, "device": device_label(device)}
    emit_steps("train_step", args.batch, args.steps, seconds, device, config)


if __name__ == "__main__":
    main()
