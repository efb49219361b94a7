"""Speed of the gFID path: Inception feature extraction, precision/recall, Fréchet distance.

    .venv/bin/python bench/bench_inception.py [--device cuda] [--batch-size 16] [--images 64] [--size 256]

Prints one JSON line per measurement. Random Inception weights unless --weights is given (speed is the
same; the numbers computed on the way are never metrics).
"""
from __future__ import annotations

import argparse
import time

from common import emit, sync  # first: puts the repository on sys.path
import numpy as np
import torch

from eval.fid import InceptionFeatures, frechet_distance, stats
from eval.metrics import precision_recall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", default=None, help="Inception weights file (default: random weights)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=64, help="images timed (after one warm-up batch)")
    p.add_argument("--size", type=int, default=256, help="input resolution (uint8, resized to 299 inside)")
    p.add_argument("--pr-n", type=int, default=2000, help="features per set for precision/recall (0: skip)")
    p.add_argument("--fid-dim", type=int, default=2048, help="feature dimension for the Fréchet distance (0: skip)")
    args = p.parse_args()
    device = torch.device(args.device)

    extractor = InceptionFeatures(args.weights, random_weights=args.weights is None, device=device)
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (args.images + args.batch_size, args.size, args.size, 3), dtype=np.uint8)
    extractor(images[: args.batch_size])  # warm-up
    sync(device)
    start = time.perf_counter()
    extractor.extract(images[args.batch_size :], args.batch_size)
    sync(device)
    seconds = time.perf_counter() - start
    config = {"device": str(device), "batch_size": args.batch_size, "images": args.images, "size": args.size,
              "threads": torch.get_num_threads(), "weights": "real" if extractor.is_real else "random"}
    emit("inception_features", "throughput", args.images / seconds, "images/s", config)

    if args.pr_n:
        ref, smp = rng.rand(args.pr_n, 2048).astype(np.float32), rng.rand(args.pr_n, 2048).astype(np.float32)
        start = time.perf_counter()
        precision_recall(ref, smp, device=device)
        sync(device)
        emit("precision_recall", "time", time.perf_counter() - start, "s", {"device": str(device), "n": args.pr_n, "dim": 2048})

    if args.fid_dim:
        a, b = stats(rng.randn(2 * args.fid_dim, args.fid_dim)), stats(rng.randn(2 * args.fid_dim, args.fid_dim) + 0.1)
        start = time.perf_counter()
        frechet_distance(*a, *b)
        emit("frechet_distance", "time", time.perf_counter() - start, "s", {"dim": args.fid_dim, "method": "scipy.linalg.sqrtm"})


if __name__ == "__main__":
    main()
