"""Training-loader throughput: latents/s for 32x16x16 float16 latents, global batch 256.

    .venv/bin/python bench/bench_loader.py [--rows 50000] [--steps 400] [--threads 2] [--dir /tmp/...]

Writes a synthetic store (random latents, 1000 classes, no tokenizer) with latents.store, then
times the cache build and LatentLoader batches, from a RAM cache and from a memory-mapped cache.
Prints JSON lines {"bench", "metric", "value", "unit", "config"}.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import emit  # first: puts the repository on sys.path
import numpy as np
import torch

from latents import store as zs
from latents.dataset import LatentLoader
from latents.normalize import Normalizer

SHAPE = (32, 16, 16)


def write_store(path: str, rows: int) -> None:
    layout = zs.make_layout(rows, SHAPE, "float16")
    rng = np.random.default_rng(0)
    attrs = {"latent_shape": list(SHAPE), "num_rows": rows, "num_classes": 1000, "created": "bench",
             "tokenizer": {"name": "none", "config": {}},
             "extraction": {"stats": "channel", "center": True, "shard_rows": layout.shard_rows, "chunk_rows": layout.chunk_rows}}
    g = zs.create_store(path, attrs, layout, SHAPE, "float16", "channel", np.arange(rows), rng.integers(0, 1000, rows))
    for k in range(layout.num_shards):
        start, stop = layout.shard_range(k)
        n = stop - start
        lat = rng.standard_normal((n, *SHAPE), dtype=np.float32).astype(np.float16)
        zs.write_shard(g, layout, k, lat, lat[..., ::-1], np.ones(n, bool), [], "channel")
    zs.finalise(g, layout)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to put the store (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_loader_"))
    path = str(root / "synthetic.zarr")
    config = {"rows": args.rows, "shape": list(SHAPE), "dtype": "float16", "batch_size": args.batch_size, "threads": args.threads}
    try:
        t = time.perf_counter()
        write_store(path, args.rows)
        emit("loader", "store_write", args.rows / (time.perf_counter() - t), "latents/s", config)
        store = zs.LatentStore(path)
        for cache_dir in (None, root / "cache"):
            cfg = {**config, "cache": "ram" if cache_dir is None else "mmap"}
            t = time.perf_counter()
            loader = LatentLoader([store], Normalizer.from_stats(store.stats), args.batch_size, seed=0, cache_dir=cache_dir)
            emit("loader", "cache_build", args.rows / (time.perf_counter() - t), "latents/s", cfg)
            it = iter(loader)
            for _ in range(10):  # warm-up
                next(it)
            t, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                x, y = next(it)
            dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
            assert x.shape == (args.batch_size, *SHAPE) and x.dtype == torch.float32
            emit("loader", "throughput", args.steps * args.batch_size / dt, "latents/s", cfg)
            # CPU seconds of all threads: on a shared machine this shows what the loader costs, not what it got.
            emit("loader", "throughput_per_cpu_second", args.steps * args.batch_size / dcpu, "latents/cpu-s", cfg)
            del loader, it
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
