"""Pixel loader throughput at 256 px: (a) JPEG decoding + ADM crop, (b) reading an image store, images/s.

    .venv/bin/python bench/bench_pixels.py [--root ../shared/data/imagenet-sample] [--workers 0 1 2]
        [--batch-size 64] [--steps 15] [--gpu-images-per-s 1000] [--dir /tmp/...]

Times latents.pixels.PixelLoader batches (uint8 through the workers, float [-1, 1] on the CPU here) from the
files and from an image store written from them (latents.extract.extract_pixels, also timed), for each
worker count. `per_cpu_second` (workers 0: every cost in this process) is what one core sustains; with
`--gpu-images-per-s` R (a GPU's training rate, e.g. JiT-B/16's) `cores_for_8_gpus` = 8 R / that. On a machine
shared with other work the wall-clock rates show what the loader got, the per-CPU-second rates what it costs.
Prints JSON lines {"bench", "metric", "value", "unit", "config"}.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import emit  # first: puts the repository on sys.path
import torch

from core.images import ImageFolderSource
from latents.extract import extract_pixels
from latents.pixels import PixelLoader
from latents.config import load_latent_config

REPO = Path(__file__).resolve().parent.parent


def time_loader(cfg: dict, batch_size: int, steps: int) -> tuple[float, float]:
    """(images/s of wall time, images per CPU-second of this process) over `steps` batches after one warm-up."""
    loader = PixelLoader(load_latent_config(cfg), batch_size, seed=0)
    loader.batch(0)  # starts the workers
    t, cpu, n = time.perf_counter(), time.process_time(), 0
    for step in range(1, steps + 1):
        n += len(loader.batch(step)[1])
    return n / (time.perf_counter() - t), n / (time.process_time() - cpu)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "imagenet-sample"))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpu-images-per-s", type=float, default=None, help="one GPU's training rate, for cores_for_8_gpus")
    p.add_argument("--dir", default=None, help="where to put the image store (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = {"kind": "imagefolder", "root": args.root, "image_size": args.image_size}
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_pixels_"))
    store = str(root / "images.zarr")
    base = {"images": len(ImageFolderSource(args.root, args.image_size)), "image_size": args.image_size,
            "batch_size": args.batch_size, "threads": args.threads}
    try:
        source = ImageFolderSource(args.root, args.image_size)
        t = time.perf_counter()
        extract_pixels(source, data, store, workers=max(args.workers))
        emit("pixels", "store_write", len(source) / (time.perf_counter() - t), "images/s",
             {**base, "workers": max(args.workers)})
        for path, pixels in (("decode", {"data": data}), ("store", {"store": store})):
            for workers in args.workers:
                cfg = {**base, "path": path, "workers": workers}
                wall, per_cpu = time_loader({"pixels": {**pixels, "workers": workers}}, args.batch_size, args.steps)
                emit("pixels", "throughput", wall, "images/s", cfg)
                if workers == 0:
                    emit("pixels", "per_cpu_second", per_cpu, "images/cpu-s", cfg)
                    if args.gpu_images_per_s:
                        emit("pixels", "cores_for_8_gpus", 8 * args.gpu_images_per_s / per_cpu, "cores",
                             {**cfg, "gpu_images_per_s": args.gpu_images_per_s})
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
