"""FAE's training steps at the paper's size: images/s and peak memory of one stage's step for a batch and precision.

    .venv/bin/python bench/bench_fae.py --stage feature --batch 2 --steps 2          # CPU: DINOv2-g/14 + the VAE
    .venv/bin/python bench/bench_fae.py --stage pixel --batch 64 --precision bf16     # GPU
    .venv/bin/python bench/bench_fae.py --stage encode --batch 256 --precision bf16   # latents.extract's forward

One step, as tokenizers/fae_train.py runs it (random weights of the real architecture; the cost is the same):
- feature: the frozen DINOv2-g/14 on 256 px images (fed 224) in fp32, then the encoder and feature decoder forward
  and backward on a posterior sample, L2 + beta KL, and an AdamW step;
- pixel: the frozen encoder, noise, the ViT-L pixel decoder forward and backward on L1 (the LPIPS and the DINO
  discriminator of the GAN term are left out: they are RAE's and measured with it), and an Adam step;
- encode: the frozen encoder and the single-attention encoder's posterior mean, without gradients.
Peak memory is CUDA's max_memory_allocated on GPU, the process's peak RSS on CPU.
"""
from __future__ import annotations

import argparse

from common import device_label, emit_steps, time_steps  # first: puts the repository on sys.path
import torch
import torch.nn.functional as F

from tokenizers.fae import FAE
from tokenizers.losses import kl_loss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["feature", "pixel", "encode"], default="feature")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--encoder", default="dinov2_g")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = True
    fae = FAE(encoder=args.encoder, random_init=True, pixel_decoder="L").to(device)
    trained = {"feature": fae.vae, "pixel": fae.pixel_decoder, "encode": None}[args.stage]
    opt = None
    if trained is not None:
        trained.train()
        opt = torch.optim.AdamW([q for q in trained.parameters() if q.requires_grad], lr=1e-4, betas=(0.9, 0.999))
    images = torch.rand(args.batch, 3, 256, 256, device=device) * 2 - 1
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731

    def step() -> None:
        with torch.no_grad():
            feats = fae.features(images)  # fp32, as the stages run it
        if args.stage == "encode":
            with torch.no_grad(), autocast():
                fae.encode_features(feats)
            return
        with autocast():
            if args.stage == "feature":
                recon, mean, logvar = fae.vae(feats, torch.randn(args.batch, fae.latent_channels, 16, 16, device=device))
                loss = F.mse_loss(recon.float(), feats) + 1e-6 * kl_loss(mean.float(), logvar.float())
            else:
                out = fae.pixel_decoder(feats + 0.4 * torch.randn_like(feats))
                loss = (out.float() - images).abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    seconds = time_steps(step, args.steps, device)
    config = {"stage": args.stage, "encoder": args.encoder, "batch": args.batch, "precision": precision,
              "trained_params_m": round(sum(q.numel() for q in trained.parameters()) / 1e6, 2) if trained else 0.0,
              "device": device_label(device)}
    emit_steps("fae_step", args.batch, args.steps, seconds, device, config)


if __name__ == "__main__":
    main()
