"""Extraction throughput (images/s, each image encoded with its mirror) and peak memory at two data-set sizes.

    .venv/bin/python bench/bench_extract.py [--sizes 500 2000] [--model tiny|full] [--image-size 64]
                                            [--batch-size 32] [--workers 0] [--shard-size 256]

Each size runs `latents.extract.extract` on synthetic images in a fresh subprocess, so its peak
RSS (getrusage: the process, and separately its children such as DataLoader workers) belongs to
that size alone. Peak RSS should not grow with the number of images: a process holds one shard
at a time (shards of 256 rows here, so both sizes write several).
`--model full` is the official VA-VAE f16d32 architecture with random weights (slow on a CPU);
`tiny` is a small VA-VAE of the same family. Prints JSON lines {"bench", "metric", "value", "unit", "config"}.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, peak_rss_mib  # first: puts the repository on sys.path

REPO = Path(__file__).resolve().parent.parent
TINY = dict(block_out_channels=(16, 16, 32, 32, 32), layers_per_block=1, latent_channels=32, norm_num_groups=8)


def child(args: argparse.Namespace) -> None:
    import torch

    from core.images import SyntheticSource
    from latents.extract import ExtractSettings, extract
    from tokenizers.base import describe
    from tokenizers.vavae import VAVAE

    torch.manual_seed(0)
    tok = (VAVAE() if args.model == "full" else VAVAE(**TINY)).eval()
    source = SyntheticSource(args.child, args.image_size, num_classes=10)
    config = {"images": args.child, "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
              "shard_rows": args.shard_size, "workers": args.workers, "threads": torch.get_num_threads(), "device": "cpu"}
    rss_before = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        store = extract(tok, describe(tok), source, {"kind": "synthetic", "image_size": args.image_size},
                        f"{tmp}/bench.zarr", ExtractSettings(batch_size=args.batch_size, shard_rows=args.shard_size), workers=args.workers)
        seconds = time.perf_counter() - t
        assert store.num_valid == args.child
    peak = peak_rss_mib()
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # DataLoader workers, if any
    for metric, value, unit in [("throughput", args.child / seconds, "images/s"),
                                ("peak_rss_before_extract", rss_before, "MiB"),
                                ("peak_rss", peak, "MiB"),
                                ("peak_rss_children", children_peak, "MiB")]:
        emit("extract", metric, value, unit, config)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--model", choices=["tiny", "full"], default="tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=256, help="rows per shard: below both sizes, so each run writes several")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(args)
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--model", args.model, "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--shard-size", str(args.shard_size)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"benchmark run for {n} images failed:\n{out.stderr[-3000:]}")
        sys.stdout.write(out.stdout)


if __name__ == "__main__":
    main()
