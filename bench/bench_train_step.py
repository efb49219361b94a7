"""Generator training-step throughput: images/s and peak memory for a model, batch and precision.

    .venv/bin/python bench/bench_train_step.py --generator lightningdit_b1 --batch 16 [--steps 10]
    .venv/bin/python bench/bench_train_step.py --generator lightningdit_xl1 --batch 256 --precision bf16 --compile

One step = forward + flow loss + backward + AdamW step (fused on CUDA) + EMA update, on random
latents of the model's shape, as generators.train runs it. Peak memory is CUDA's
max_memory_allocated on GPU, the process's peak RSS on CPU.
"""
from __future__ import annotations

import argparse
import time

from common import device_label, emit, peak_rss_mib, sync  # first: puts the repository on sys.path
import torch

from core.config import compose
from core.ema import EMA
from core.runtime import fused_adam_kwargs
from generators import flow
from generators.registry import build_generator


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="lightningdit_b1", help="a configs/generator/<name>.yaml")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = compose("generator", args.generator)
    cfg.model.options = {**cfg.model.options, "use_checkpoint": args.grad_checkpointing}
    model = build_generator(cfg.model).to(device).train()
    ema = EMA(model, 0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), **fused_adam_kwargs())
    fwd = torch.compile(model) if args.compile else model
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    x = torch.randn(args.batch, *shape, device=device)
    y = torch.randint(0, cfg.model.num_classes, (args.batch,), device=device)

    def step() -> None:
        eps = torch.randn_like(x)
        t = flow.sample_t(args.batch, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = fwd(flow.interpolate(x, eps, t), t, y)
        flow.flow_loss(pred, flow.velocity_target(x, eps), cfg.flow.cos_weight)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    for _ in range(3):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    n_params = sum(q.numel() for q in model.parameters())
    config = {"generator": args.generator, "params_m": round(n_params / 1e6, 2), "batch": args.batch,
              "precision": precision, "compile": args.compile, "grad_checkpointing": args.grad_checkpointing,
              "device": device_label(device)}
    emit("train_step", "images_per_s", args.batch * args.steps / seconds, "images/s", config)
    emit("train_step", "step_time", seconds / args.steps, "s", config)
    if device.type == "cuda":
        emit("train_step", "peak_memory", torch.cuda.max_memory_allocated() / 2**30, "GiB", config)
    else:
        emit("train_step", "peak_rss", peak_rss_mib(), "MiB", config)


if __name__ == "__main__":
    main()
